"""Stage-3 losses on cosine-classifier outputs (SPEC §4): the noise-aware loss and its comparisons.

Shape shorthand: N images, C classes, H×W label resolution (the crop). `cos_logits` is (N, C, H, W)
with cosine similarities s in [-1, 1]; the network logits are T·s. Label maps `y_crf`, `y_ret` are
(N, H, W) long with class ids in 0..C-1 and `ignore_index` (255) for padding and void.

Pixel sets, following SPEC §4 literally:
- Y_fin = Y_crf where Y_crf == Y_ret, else 255.
- reliable R = {Y_fin != 255}: both maps agree on a real class. Only these pixels enter L_ce.
- unreliable U = {Y_fin == 255 and Y_crf != 255}.
A pixel where Y_crf has a class but Y_ret says 255 therefore lands in U and is trained on Y_crf
with the confidence weight σ; a pixel where Y_crf is 255 is never trained, whatever Y_ret says.
Augmentation pads both maps with 255 at the same places and stage 2 writes no void, so the two
only differ on hand-made inputs; the rule above is what the SPEC's set definitions say.

Every average is over pixels of the whole batch (not per image, then per batch), as a single
`F.cross_entropy` call over the batch would do. An empty set gives a term of exactly 0 that still
back-propagates (zero gradients), never NaN: a crop made only of padding, or one where the two
label maps agree everywhere, is a normal batch.
"""

import torch
import torch.nn.functional as F

from utils.precision import float32_region, full

def _check_shapes(cos_logits: torch.Tensor, *labels: torch.Tensor) -> None:
    if cos_logits.dim() != 4:
        raise ValueError(f"cos_logits must be (N, C, H, W), got shape {tuple(cos_logits.shape)}")
    expected = (cos_logits.shape[0], *cos_logits.shape[2:])
    for y in labels:
        if tuple(y.shape) != expected:
            raise ValueError(f"label map of shape {tuple(y.shape)} does not match cos_logits "
                             f"{tuple(cos_logits.shape)}: expected (N, H, W) = {expected}")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over `mask` (same shape), 0 for an empty mask.

    `where` instead of `values * mask` so a non-finite value outside the mask cannot leak into
    the sum; the count is clamped to 1 because the masked sum is then exactly 0.
    """
    total = torch.where(mask, values, values.new_zeros(())).sum()
    return total / mask.sum().clamp_min(1)


def _pixel_ce(cos_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
              ignore_index: int) -> torch.Tensor:
    """(N, H, W) cross-entropy of T·s against `labels`; 0 (and no gradient) at ignored pixels."""
    return F.cross_entropy(temperature * cos_logits, labels, ignore_index=ignore_index,
                           reduction="none")


def _pixel_sets(y_crf: torch.Tensor, y_ret: torch.Tensor, ignore_index: int):
    """Boolean (N, H, W) masks (reliable, unreliable) as defined in the module docstring."""
    reliable = (y_crf == y_ret) & (y_crf != ignore_index)
    unreliable = ~reliable & (y_crf != ignore_index)
    return reliable, unreliable


def ce_loss(cos_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
            ignore_index: int = 255) -> torch.Tensor:
    """Scalar mean cross-entropy of T·s (N, C, H, W) against `labels` (N, H, W) over non-ignored
    pixels; 0 if every pixel is ignored (where `F.cross_entropy` would return NaN)."""
    _check_shapes(cos_logits, labels)
    ce = _pixel_ce(cos_logits, labels, temperature, ignore_index)
    return _masked_mean(ce, labels != ignore_index)


def confidence_map(cos_logits: torch.Tensor, y_crf: torch.Tensor, gamma: float,
                   ignore_index: int = 255) -> torch.Tensor:
    """σ(p) = ((1 + s_{Y_crf(p)}(p)) / max_c (1 + s_c(p)))^γ, (N, H, W), in [0, 1].

    σ = 1 where Y_crf is the arg-max class. At pixels where Y_crf is ignored σ is set to 1 (it is
    never used there) so that neither the value nor its gradient can be NaN. Not detached.
    """
    _check_shapes(cos_logits, y_crf)
    valid = y_crf != ignore_index
    index = torch.where(valid, y_crf, torch.zeros_like(y_crf)).unsqueeze(1)
    # Bilinear upsampling keeps s in [-1, 1] only up to rounding; 1 + s slightly below 0 would
    # make a fractional power NaN.
    shifted = (1 + cos_logits).clamp_min(0)
    numerator = shifted.gather(1, index).squeeze(1)
    denominator = shifted.amax(dim=1)
    # All scores equal to -1 means every class ties for the maximum, so Y_crf is an arg-max:
    # σ = 1, not 0/0.
    usable = valid & (denominator > 0)
    ratio = numerator / torch.where(usable, denominator, torch.ones_like(denominator))
    ratio = torch.where(usable, ratio, torch.ones_like(ratio))
    return ratio.pow(gamma)


def noise_aware_loss(cos_logits: torch.Tensor, y_crf: torch.Tensor, y_ret: torch.Tensor,
                     temperature: float, gamma: float, lam: float, ignore_index: int = 255):
    """BANA's noise-aware loss L = L_ce + λ·L_wce; returns scalars (total, ce, wce).

    L_ce  = mean over reliable pixels R of CE(T·s, Y_crf)   (= CE against Y_fin, 255 ignored)
    L_wce = Σ_U σ·CE(T·s, Y_crf) / Σ_U σ, with σ from `confidence_map`.
    σ is not detached, as in the reference, so L_wce also pushes s_{Y_crf} up relative to the
    maximum score. If Σ_U σ is 0 (U empty, or every σ on U is 0) then so is the numerator and
    L_wce = 0.
    """
    _check_shapes(cos_logits, y_crf, y_ret)
    reliable, unreliable = _pixel_sets(y_crf, y_ret, ignore_index)
    ce_map = _pixel_ce(cos_logits, y_crf, temperature, ignore_index)
    ce = _masked_mean(ce_map, reliable)

    sigma = torch.where(unreliable, confidence_map(cos_logits, y_crf, gamma, ignore_index),
                        torch.zeros_like(ce_map))
    weight_sum = sigma.sum()
    # Dividing by 1 when the weights sum to 0 keeps the gradient finite (0/0 would be NaN even
    # through a `where`).
    wce = (sigma * ce_map).sum() / torch.where(weight_sum > 0, weight_sum,
                                               torch.ones_like(weight_sum))
    return ce + lam * wce, ce, wce


def baseline_loss(cos_logits: torch.Tensor, y_crf: torch.Tensor, y_ret: torch.Tensor,
                  temperature: float, ignore_index: int = 255) -> torch.Tensor:
    """L_ce alone: CE on the pixels where Y_crf and Y_ret agree; U is ignored."""
    _check_shapes(cos_logits, y_crf, y_ret)
    reliable, _ = _pixel_sets(y_crf, y_ret, ignore_index)
    return _masked_mean(_pixel_ce(cos_logits, y_crf, temperature, ignore_index), reliable)


def entropy_regularised_loss(cos_logits: torch.Tensor, y_crf: torch.Tensor, y_ret: torch.Tensor,
                             temperature: float, lam: float, ignore_index: int = 255):
    """L_ce + λ·(mean over U of the entropy of softmax(T·s)); returns scalars (total, ce, entropy).

    Minimising the entropy makes the network commit to some class on U without saying which.
    """
    _check_shapes(cos_logits, y_crf, y_ret)
    reliable, unreliable = _pixel_sets(y_crf, y_ret, ignore_index)
    ce = _masked_mean(_pixel_ce(cos_logits, y_crf, temperature, ignore_index), reliable)
    log_p = F.log_softmax(temperature * cos_logits, dim=1)
    entropy_map = -(log_p.exp() * log_p).sum(dim=1)
    entropy = _masked_mean(entropy_map, unreliable)
    return ce + lam * entropy, ce, entropy


def bootstrapping_loss(cos_logits: torch.Tensor, y_crf: torch.Tensor, y_ret: torch.Tensor,
                       temperature: float, lam: float, beta: float, ignore_index: int = 255):
    """L_ce + λ·(mean over U of CE against β·onehot(Y_crf) + (1−β)·p), p = softmax(T·s);
    returns scalars (total, ce, bootstrap).

    This is the soft bootstrapping of Reed et al. (2015), and like theirs nothing is detached:
    the target's prediction part carries gradient. Then the term is exactly
    β·CE(T·s, Y_crf) + (1−β)·H(p) per pixel, i.e. a blend of plain CE on Y_crf and entropy
    minimisation; detaching p would instead turn the (1−β) part into self-training on the
    current prediction, which is neither the published method nor a separate ablation.
    """
    _check_shapes(cos_logits, y_crf, y_ret)
    reliable, unreliable = _pixel_sets(y_crf, y_ret, ignore_index)
    ce_map = _pixel_ce(cos_logits, y_crf, temperature, ignore_index)
    ce = _masked_mean(ce_map, reliable)
    log_p = F.log_softmax(temperature * cos_logits, dim=1)
    soft_ce_map = -(log_p.exp() * log_p).sum(dim=1)
    # -Σ_c β·onehot_c·log p_c is β times the hard CE already computed (0 on ignored pixels).
    bootstrap_map = beta * ce_map + (1 - beta) * soft_ce_map
    bootstrap = _masked_mean(bootstrap_map, unreliable)
    return ce + lam * bootstrap, ce, bootstrap


def compute_loss(name: str, cos_logits: torch.Tensor, y_crf: torch.Tensor, y_ret: torch.Tensor,
                 *, temperature: float, gamma: float, lam: float, beta: float,
                 ignore_index: int = 255) -> dict[str, torch.Tensor]:
    """The stage-3 loss chosen by `name` (one of `LOSSES`, the config's `LOSS` key).

    Returns {"loss": total to back-propagate, plus its terms}: "ce" always; "wce" for nal,
    "entropy" for er, "bootstrap" for bs. Terms are not detached; detach them before logging.
    ce_crf / ce_ret train on one label map alone, every non-ignored pixel counting.
    Computed in float32 whatever autocast is active (utils/precision.py).
    """
    with float32_region(cos_logits.device.type):
        return _compute_loss(name, full(cos_logits), y_crf, y_ret, temperature=temperature,
                             gamma=gamma, lam=lam, beta=beta, ignore_index=ignore_index)


def _nal(cos_logits, y_crf, y_ret, *, temperature, gamma, lam, beta, ignore_index):
    total, ce, wce = noise_aware_loss(cos_logits, y_crf, y_ret, temperature, gamma, lam,
                                      ignore_index)
    return {"loss": total, "ce": ce, "wce": wce}


def _ce_on(which: int):
    def loss(cos_logits, y_crf, y_ret, *, temperature, gamma, lam, beta, ignore_index):
        ce = ce_loss(cos_logits, (y_crf, y_ret)[which], temperature, ignore_index)
        return {"loss": ce, "ce": ce}

    return loss


def _baseline(cos_logits, y_crf, y_ret, *, temperature, gamma, lam, beta, ignore_index):
    ce = baseline_loss(cos_logits, y_crf, y_ret, temperature, ignore_index)
    return {"loss": ce, "ce": ce}


def _er(cos_logits, y_crf, y_ret, *, temperature, gamma, lam, beta, ignore_index):
    total, ce, entropy = entropy_regularised_loss(cos_logits, y_crf, y_ret, temperature, lam,
                                                  ignore_index)
    return {"loss": total, "ce": ce, "entropy": entropy}


def _bs(cos_logits, y_crf, y_ret, *, temperature, gamma, lam, beta, ignore_index):
    total, ce, bootstrap = bootstrapping_loss(cos_logits, y_crf, y_ret, temperature, lam, beta,
                                              ignore_index)
    return {"loss": total, "ce": ce, "bootstrap": bootstrap}


# MODEL.LOSS: name -> loss(cos_logits, y_crf, y_ret, *, temperature, gamma, lam, beta,
# ignore_index) returning {"loss": total, plus its terms}.
LOSSES = {
    "nal": _nal,  # the noise-aware loss: L_ce + λ·L_wce
    "ce_crf": _ce_on(0),  # CE on Y_crf alone
    "ce_ret": _ce_on(1),  # CE on Y_ret alone
    "baseline": _baseline,  # L_ce alone: the pixels where Y_crf and Y_ret agree
    "er": _er,  # L_ce + λ·entropy on U
    "bs": _bs,  # L_ce + λ·bootstrapping on U
}


def _compute_loss(name, cos_logits, y_crf, y_ret, **options):
    if name not in LOSSES:
        raise ValueError(f"unknown stage-3 loss {name!r}; expected one of {', '.join(LOSSES)}")
    return LOSSES[name](cos_logits, y_crf, y_ret, **options)
