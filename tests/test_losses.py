import math

import pytest
import torch

from models.losses import (LOSSES, ce_loss, compute_loss, confidence_map, noise_aware_loss)

IGNORE = 255
PARAMS = dict(temperature=3.0, gamma=2.5, lam=0.3, beta=0.7)


def random_case(seed, n=2, c=4, h=3, w=5):
    """Cosine scores in [-1, 1] (float64) and two label maps that agree on about half the pixels,
    with padding (255 in both) and a few pixels void in only one of the maps."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(n, c, h, w, generator=g, dtype=torch.float64) * 2 - 1)
    y_crf = torch.randint(0, c, (n, h, w), generator=g)
    y_ret = torch.where(torch.rand(n, h, w, generator=g) < 0.5, y_crf,
                        torch.randint(0, c, (n, h, w), generator=g))
    y_crf[:, -1, :] = IGNORE
    y_ret[:, -1, :] = IGNORE
    y_ret[0, 0, 0] = IGNORE
    y_crf[1, 0, 1] = IGNORE
    return s, y_crf, y_ret


def reference_loss(name, s, y_crf, y_ret, temperature, gamma, lam, beta):
    """Pixel by pixel, straight from SPEC §4, with torch scalars so autograd gives reference
    gradients too."""
    n, c, h, w = s.shape
    reliable, unreliable = [], []  # (logits, scores, y_crf, y_ret) per pixel
    crf_pixels, ret_pixels = [], []
    for i in range(n):
        for r in range(h):
            for q in range(w):
                scores = [s[i, k, r, q] for k in range(c)]
                logits = [temperature * v for v in scores]
                a, b = int(y_crf[i, r, q]), int(y_ret[i, r, q])
                if a != IGNORE:
                    crf_pixels.append((logits, a))
                if b != IGNORE:
                    ret_pixels.append((logits, b))
                y_fin = a if a == b else IGNORE
                if y_fin != IGNORE:
                    reliable.append((logits, scores, a))
                elif a != IGNORE:
                    unreliable.append((logits, scores, a))

    def log_probs(logits):
        m = max(float(v.detach()) for v in logits)
        z = sum(torch.exp(v - m) for v in logits)
        return [v - m - torch.log(z) for v in logits]

    def mean(terms):
        return sum(terms) / len(terms) if terms else s.new_zeros(())

    def ce_over(pixels):
        return mean([-log_probs(logits)[y] for logits, y in pixels])

    ce = ce_over([(logits, y) for logits, _, y in reliable])
    if name == "ce_crf":
        return {"loss": ce_over(crf_pixels), "ce": ce_over(crf_pixels)}
    if name == "ce_ret":
        return {"loss": ce_over(ret_pixels), "ce": ce_over(ret_pixels)}
    if name == "baseline":
        return {"loss": ce, "ce": ce}
    if name == "nal":
        num, den = s.new_zeros(()), s.new_zeros(())
        for logits, scores, y in unreliable:
            sigma = ((1 + scores[y]) / max(1 + v for v in scores)) ** gamma
            num = num + sigma * -log_probs(logits)[y]
            den = den + sigma
        wce = num / den if unreliable else s.new_zeros(())
        return {"loss": ce + lam * wce, "ce": ce, "wce": wce}
    if name == "er":
        terms = []
        for logits, _, _ in unreliable:
            lp = log_probs(logits)
            terms.append(-sum(torch.exp(v) * v for v in lp))
        entropy = mean(terms)
        return {"loss": ce + lam * entropy, "ce": ce, "entropy": entropy}
    if name == "bs":
        terms = []
        for logits, _, y in unreliable:
            lp = log_probs(logits)
            target = [beta * (k == y) + (1 - beta) * torch.exp(lp[k]) for k in range(c)]
            terms.append(-sum(t * v for t, v in zip(target, lp)))
        bootstrap = mean(terms)
        return {"loss": ce + lam * bootstrap, "ce": ce, "bootstrap": bootstrap}
    raise AssertionError(name)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_per_pixel_reference_values_and_gradients(name, seed):
    s, y_crf, y_ret = random_case(seed)
    s_fast = s.clone().requires_grad_()
    s_slow = s.clone().requires_grad_()
    fast = compute_loss(name, s_fast, y_crf, y_ret, **PARAMS)
    slow = reference_loss(name, s_slow, y_crf, y_ret, **PARAMS)
    assert fast.keys() == slow.keys()
    for key in fast:
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-10, atol=1e-12)
    fast["loss"].backward()
    slow["loss"].backward()
    torch.testing.assert_close(s_fast.grad, s_slow.grad, rtol=1e-9, atol=1e-12)


def test_nal_equals_ce_on_y_crf_when_the_maps_agree():
    s, y_crf, _ = random_case(2)
    total, ce, wce = noise_aware_loss(s, y_crf, y_crf.clone(), 20.0, 7.0, 0.1)
    assert wce == 0
    torch.testing.assert_close(total, ce_loss(s, y_crf, 20.0))
    torch.testing.assert_close(ce, ce_loss(s, y_crf, 20.0))


def test_one_pixel_two_classes_by_hand():
    """s = (0, 0.5), T = 2, so logits (0, 1) and p = (1, e) / (1 + e).

    Reliable (Y_crf = Y_ret = 1): L_ce = -log p_1 = log(1 + 1/e), no U so L_wce = 0.
    Unreliable (Y_crf = 0, Y_ret = 1): nothing reliable so L_ce = 0; σ = ((1+0)/(1+0.5))^γ, and
    with one pixel L_wce = σ·CE/σ = CE = -log p_0 = log(1 + e). σ cancels in the value but not
    in the gradient's form: d(σ·CE/σ)/ds = (σ'CE + σ CE')/σ - σ CE σ'/σ² = CE', so
    dL/ds = λ·T·(p - onehot(0)) = λ·2·(-e/(1+e), e/(1+e)).
    """
    e = math.e
    s = torch.tensor([0.0, 0.5], dtype=torch.float64).reshape(1, 2, 1, 1).requires_grad_()
    one, zero = torch.ones(1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, dtype=torch.long)

    total, ce, wce = noise_aware_loss(s, one, one, 2.0, 2.0, 0.1)
    assert ce.item() == pytest.approx(math.log(1 + 1 / e), rel=1e-12)
    assert wce.item() == 0
    assert total.item() == pytest.approx(math.log(1 + 1 / e), rel=1e-12)

    total, ce, wce = noise_aware_loss(s, zero, one, 2.0, 2.0, 0.1)
    assert ce.item() == 0
    assert wce.item() == pytest.approx(math.log(1 + e), rel=1e-12)
    assert total.item() == pytest.approx(0.1 * math.log(1 + e), rel=1e-12)
    total.backward()
    expected = 0.1 * 2 * torch.tensor([-e / (1 + e), e / (1 + e)], dtype=torch.float64)
    torch.testing.assert_close(s.grad.reshape(2), expected)


def test_two_unreliable_pixels_weighted_by_confidence_by_hand():
    """T = 2, γ = 2, both pixels Y_crf = 0, Y_ret = 1 (so both in U).
    Pixel a: s = (0, 0.5): σ_a = (1/1.5)² = 4/9, CE_a = log(1 + e).
    Pixel b: s = (0.5, 0): class 0 is the arg-max so σ_b = 1, CE_b = log(1 + 1/e).
    L_wce = (4/9·CE_a + CE_b) / (13/9) = (4·log(1+e) + 9·log(1+1/e)) / 13.
    """
    s = torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=torch.float64).T.reshape(1, 2, 1, 2)
    y_crf = torch.zeros(1, 1, 2, dtype=torch.long)
    y_ret = torch.ones(1, 1, 2, dtype=torch.long)
    torch.testing.assert_close(confidence_map(s, y_crf, 2.0),
                               torch.tensor([[[4 / 9, 1.0]]], dtype=torch.float64))
    _, _, wce = noise_aware_loss(s, y_crf, y_ret, 2.0, 2.0, 0.1)
    expected = (4 * math.log(1 + math.e) + 9 * math.log(1 + 1 / math.e)) / 13
    assert wce.item() == pytest.approx(expected, rel=1e-12)


def test_confidence_in_unit_interval_and_one_at_the_argmax():
    s, y_crf, _ = random_case(3, c=6, h=8, w=8)
    sigma = confidence_map(s, y_crf, 7.0)
    assert sigma.shape == y_crf.shape
    assert ((sigma >= 0) & (sigma <= 1)).all()
    at_argmax = (s.argmax(dim=1) == y_crf)
    assert at_argmax.any() and (~at_argmax & (y_crf != IGNORE)).any()
    assert (sigma[at_argmax] == 1).all()
    assert (sigma[~at_argmax & (y_crf != IGNORE)] < 1).all()
    # Scores all at -1 tie every class for the maximum, and rounding just below -1 is clamped.
    flat = torch.full((1, 3, 1, 2), -1.0, dtype=torch.float64)
    flat[0, 1, 0, 1] = -1 - 1e-12
    labels = torch.tensor([[[2, 0]]])
    assert torch.equal(confidence_map(flat, labels, 0.5), torch.ones(1, 1, 2, dtype=torch.float64))


def test_confidence_carries_gradient():
    s, y_crf, y_ret = random_case(4)
    s = s.requires_grad_()
    _, _, wce = noise_aware_loss(s, y_crf, y_ret, 3.0, 2.5, 0.3)
    grad, = torch.autograd.grad(wce, s)
    ce_map = torch.nn.functional.cross_entropy(3.0 * s, y_crf, ignore_index=IGNORE,
                                               reduction="none")
    unreliable = (y_crf != y_ret) & (y_crf != IGNORE)
    sigma = torch.where(unreliable, confidence_map(s, y_crf, 2.5), 0).detach()
    detached, = torch.autograd.grad((sigma * ce_map).sum() / sigma.sum(), s)
    assert not torch.allclose(grad, detached)


def test_void_in_y_ret_only_is_unreliable_and_void_in_y_crf_is_never_trained():
    s = torch.tensor([0.2, -0.3], dtype=torch.float64).reshape(1, 2, 1, 1)
    valid_crf = torch.tensor([[[1]]])
    void = torch.tensor([[[IGNORE]]])
    _, ce, wce = noise_aware_loss(s, valid_crf, void, 2.0, 7.0, 0.1)
    assert ce.item() == 0
    torch.testing.assert_close(wce, ce_loss(s, valid_crf, 2.0))
    out = noise_aware_loss(s, void, valid_crf, 2.0, 7.0, 0.1)
    assert all(t.item() == 0 for t in out)


@pytest.mark.parametrize("name", LOSSES)
def test_padding_never_contributes(name):
    s, y_crf, y_ret = random_case(5)
    padded = (y_crf == IGNORE) & (y_ret == IGNORE)
    assert padded.sum() >= 5
    changed = s.clone()
    changed[padded.unsqueeze(1).expand_as(s)] = torch.linspace(-1, 1, int(padded.sum()) * 4,
                                                                 dtype=torch.float64)
    s = s.requires_grad_()
    changed = changed.requires_grad_()
    a = compute_loss(name, s, y_crf, y_ret, **PARAMS)
    b = compute_loss(name, changed, y_crf, y_ret, **PARAMS)
    for key in a:
        assert torch.equal(a[key], b[key])
    a["loss"].backward()
    b["loss"].backward()
    mask = padded.unsqueeze(1).expand_as(s)
    assert (s.grad[mask] == 0).all() and (changed.grad[mask] == 0).all()
    assert torch.equal(s.grad, changed.grad)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("case", ["maps agree", "all padding"])
def test_empty_sets_give_zero_terms_and_finite_gradients(name, case):
    s, y_crf, _ = random_case(6)
    if case == "all padding":
        y_crf = torch.full_like(y_crf, IGNORE)
    # -1 everywhere makes σ 0/0 if it were computed naively.
    s[0, :, 0, 0] = -1.0
    s = s.float().requires_grad_()
    out = compute_loss(name, s, y_crf, y_crf.clone(), **PARAMS)
    for key in ("wce", "entropy", "bootstrap"):
        if key in out:
            assert out[key].item() == 0
    if case == "all padding":
        assert out["loss"].item() == 0
    out["loss"].backward()
    assert torch.isfinite(s.grad).all()
    if case == "all padding":
        assert (s.grad == 0).all()


def test_ce_loss_with_every_pixel_ignored_is_zero_not_nan():
    s = torch.zeros(1, 3, 2, 2, requires_grad=True)
    loss = ce_loss(s, torch.full((1, 2, 2), IGNORE), 20.0)
    loss.backward()
    assert loss.item() == 0 and (s.grad == 0).all()


def test_bootstrap_is_a_blend_of_ce_and_entropy_on_u():
    """Soft bootstrapping with nothing detached: -Σ(β·onehot + (1-β)·p)·log p = β·CE + (1-β)·H,
    so the bootstrap term is β·wce(γ = 0) + (1-β)·entropy on U."""
    s, y_crf, y_ret = random_case(7)
    bs = compute_loss("bs", s, y_crf, y_ret, **PARAMS)["bootstrap"]
    flat_ce = compute_loss("nal", s, y_crf, y_ret, **{**PARAMS, "gamma": 0.0})["wce"]
    entropy = compute_loss("er", s, y_crf, y_ret, **PARAMS)["entropy"]
    beta = PARAMS["beta"]
    torch.testing.assert_close(bs, beta * flat_ce + (1 - beta) * entropy)


def test_unknown_name_and_bad_shapes_are_errors():
    s, y_crf, y_ret = random_case(8)
    with pytest.raises(ValueError, match="nal, ce_crf, ce_ret, baseline, er, bs"):
        compute_loss("focal", s, y_crf, y_ret, **PARAMS)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        compute_loss("nal", s, y_crf, y_ret[:, :, :4], **PARAMS)
