"""Stage-2 pseudo labels of one image (SPEC §3): unaries from the stage-1 network, DenseCRF ->
Y_crf, prototype retrieval -> Y_ret.

Shape shorthand: D feature channels, h×w backbone map, H×W image, K boxes, n classes present in
the boxes, L = 1 + n label channels (background first, then the present classes by increasing
id), J = G*G background cells.

Everything is defined on F↑, the features brought to H×W by bilinear interpolation
(align_corners=True, SPEC §3.1), but F↑ itself (D×H×W floats, 770 MB for a VOC image with D=1024)
is never built: every quantity of §3 is a linear map of F↑ or a cosine with it, and both can be
evaluated exactly from the h×w features (`UpsampledFeatures`). The cosines are still taken at every
image pixel, as the reference does, not upsampled from feature resolution (which would differ).
"""

import numpy as np
import torch
import torch.nn.functional as F

from models.pooling import grid_padding
from utils.boxes import pixel_ranges
from utils.crf import crf_in_regions

# Guards divisions by a sum or a maximum that is zero (a cell without background, a box whose CAM
# is zero everywhere); the numerator is then zero too. Same value as F.normalize's eps.
_EPS = 1e-12


def _interpolation_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """A (n_out, n_in): 1-D linear interpolation with align_corners=True as a matrix, taken from
    F.interpolate itself so that its weights are exactly those of the bilinear upsampling."""
    eye = torch.eye(n_in)[None]  # channel i holds the unit signal e_i
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=True)[0].T.contiguous()


def _corners(a: torch.Tensor):
    """For an interpolation matrix (n_out, n_in): the first source index i0 (n_out,) and the
    weights of i0 and i0 + 1 (n_out, 2); the second is 0 where i0 is the last index."""
    i0 = (a > 0).to(torch.int32).argmax(1)  # first non-zero; its weight is > 0 for linear weights
    padded = F.pad(a, (0, 1))
    rows = torch.arange(len(a), device=a.device)
    return i0, torch.stack([padded[rows, i0], padded[rows, i0 + 1]], 1)


class UpsampledFeatures:
    """F↑ = bilinear(F) at H×W (align_corners=True), evaluated through exact identities.

    F↑[:, y, x] = Σ_ij Ah[y, i] Aw[x, j] F[:, i, j] with interpolation matrices Ah (H,h), Aw (W,w)
    whose rows hold at most two adjacent non-zeros. Hence, with no D×H×W tensor:
    - v · F↑(p) = bilinear(v · F)(p)                          (linear in F)
    - Σ_p m(p) F↑(p) = Σ_ij (Ahᵀ m Aw)[i, j] F[:, i, j]         (linear in F)
    - |F↑(p)|² = Σ_ab α_a(p) α_b(p) <F(c_a), F(c_b)>, over the 4 corners c_a of the feature cell
      around p with bilinear weights α_a(p): a 4×4 Gram matrix per cell, computed at h×w.
    The Gram form loses precision where F↑(p) nearly cancels: its float32 error is about
    eps·(Σ_a α_a |F(c_a)|)², large against |F↑(p)|² only there. Post-ReLU (non-negative)
    features never cancel (|F↑|² ≥ (Σ_a α_a |F(c_a)|)² / 4, by Cauchy-Schwarz over the four
    corners), but signed ones can (the tiny backbone's, or any backbone without a final ReLU):
    wherever |F↑|² falls below CANCELLATION × (Σ_a α_a |F(c_a)|)², the norm is computed again
    directly from the four corner vectors, so every backbone gets exact cosines.

    features (D,h,w) float32; size (H, W).
    """

    # Below 1/4 (the non-negative bound), so post-ReLU features never take the direct path.
    CANCELLATION = 0.2

    def __init__(self, features: torch.Tensor, size):
        self.features = features
        self.size = (int(size[0]), int(size[1]))
        _, h, w = features.shape
        self.ah = _interpolation_matrix(h, self.size[0]).to(features.device)
        self.aw = _interpolation_matrix(w, self.size[1]).to(features.device)
        self.norm = self._norm()

    def _norm(self) -> torch.Tensor:
        """|F↑(p)| (H,W)."""
        _, h, w = self.features.shape
        padded = F.pad(self.features, (0, 1, 0, 1))  # the missing neighbour of the last row/col
        corners = [padded[:, r:r + h, s:s + w] for r in (0, 1) for s in (0, 1)]  # a = 2r + s
        gram = self.features.new_empty(4, 4, h, w)
        for a in range(4):
            for b in range(a, 4):
                gram[a, b] = gram[b, a] = (corners[a] * corners[b]).sum(0)
        i0, wy = _corners(self.ah)
        j0, wx = _corners(self.aw)
        # Contract the column corners at h×W, then the row corners at H×W.
        gram = gram.view(2, 2, 2, 2, h, w)[..., j0]  # (r,s,r',s',h,W)
        rows = torch.einsum("xs,xt,rsqtix->rqix", wx, wx, gram)[:, :, i0]  # (2,2,H,W)
        sq = torch.einsum("yr,yq,rqyx->yx", wy, wy, rows)
        # Σ_a α_a |F(c_a)| is the bilinear interpolation of the map |F|.
        spread = F.interpolate(self.features.norm(dim=0)[None, None], size=self.size,
                               mode="bilinear", align_corners=True)[0, 0]
        cancelled = sq < self.CANCELLATION * spread.square()
        if cancelled.any():
            sq = sq.clone()
            sq[cancelled] = self._direct_square_norm(cancelled, i0, wy, j0, wx)
        return sq.clamp_min(0).sqrt()

    def _direct_square_norm(self, where: torch.Tensor, i0, wy, j0, wx) -> torch.Tensor:
        """|F↑(p)|² at the pixels of `where` (H,W) bool, from the corner vectors themselves."""
        ys, xs = where.nonzero(as_tuple=True)
        padded = F.pad(self.features, (0, 1, 0, 1))
        total = 0
        for r in (0, 1):
            for c in (0, 1):
                corner = padded[:, i0[ys] + r, j0[xs] + c]  # (D, n)
                total = total + (wy[ys, r] * wx[xs, c]) * corner
        return total.square().sum(0)

    def dot(self, vectors: torch.Tensor) -> torch.Tensor:
        """v_k · F↑(p): vectors (K,D) -> (K,H,W)."""
        low = torch.einsum("kd,dij->kij", vectors, self.features)
        return F.interpolate(low[None], size=self.size, mode="bilinear", align_corners=True)[0]

    def cosine(self, vectors: torch.Tensor) -> torch.Tensor:
        """cos(F↑(p), v_k), a zero vector giving 0 as with F.normalize: (K,D) -> (K,H,W)."""
        scale = vectors.norm(dim=1).clamp_min(_EPS)[:, None, None] * self.norm.clamp_min(_EPS)
        return self.dot(vectors) / scale

    def masked_sum(self, masks: torch.Tensor) -> torch.Tensor:
        """Σ_p m_k(p) F↑(p): masks (K,H,W) float -> (K,D)."""
        weights = self.ah.T @ (masks @ self.aw)  # (K,h,w)
        return torch.einsum("kij,dij->kd", weights, self.features)


def background_prototypes_2d(feats: UpsampledFeatures, bg_mask: torch.Tensor, grid_size: int):
    """q_j = Σ_{p∈j} M(p) F↑(p) / Σ_{p∈j} M(p) over a G×G grid of the H×W image (SPEC §2 step 1,
    at full resolution as stage 2 does).

    bg_mask (H,W), 1 = background. Cells are those of the image padded to a multiple of G as the
    reference's pad_for_grid pads (`models.pooling.grid_padding`; padding is never background),
    as stage 1 does at feature resolution.
    Returns protos (J,D), zero for cells without background, and valid (J,) bool.
    """
    height, width = bg_mask.shape
    g = grid_size
    left, right, top, bottom = grid_padding(height, width, g)
    cell_h, cell_w = (height + top + bottom) // g, (width + left + right) // g
    device = bg_mask.device
    cell = (((torch.arange(height, device=device) + top) // cell_h)[:, None] * g
            + ((torch.arange(width, device=device) + left) // cell_w)[None])
    masks = (cell == torch.arange(g * g, device=device)[:, None, None]) & (bg_mask > 0)  # (J,H,W)
    counts = masks.sum((1, 2))
    protos = feats.masked_sum(masks.float()) / counts.clamp_min(1)[:, None]
    return protos, counts > 0


def background_attention_2d(feats: UpsampledFeatures, protos: torch.Tensor,
                            valid: torch.Tensor) -> torch.Tensor:
    """A_bg(p) = mean over the valid cells j of ReLU(cos(F↑(p), q_j)) (H,W); zero everywhere when
    no cell is valid (an image covered by its boxes), where the reference would give NaN."""
    if not valid.any():
        return feats.features.new_zeros(feats.size)
    return feats.cosine(protos[valid]).relu().mean(0)


def box_masks(boxes: np.ndarray, height: int, width: int, device=None) -> torch.Tensor:
    """(K,H,W) bool; box k covers rows y1:y2 and columns x1:x2 (as slices) after clipping to the
    image, so negative coordinates never wrap around. boxes (K,≥4) int, x1,y1,x2,y2 first."""
    b = torch.as_tensor(pixel_ranges(boxes, height, width), device=device)
    x1, y1, x2, y2 = b.unbind(1)
    ys, xs = torch.arange(height, device=b.device), torch.arange(width, device=b.device)
    rows = (ys >= y1[:, None]) & (ys < y2[:, None])  # (K,H)
    cols = (xs >= x1[:, None]) & (xs < x2[:, None])  # (K,W)
    return rows[:, :, None] & cols[:, None, :]


def box_cams(feats: UpsampledFeatures, class_weight: torch.Tensor, masks: torch.Tensor,
             box_channel: torch.Tensor) -> torch.Tensor:
    """The per-box normalised CAM (K,H,W): CAM_c = ReLU(w_c · F↑) of box k's class c, divided by
    its maximum inside box k, and 0 outside box k (SPEC §3 step 3). In [0, 1]; all 0 for a box
    whose CAM is 0 everywhere in it.

    class_weight (n,D): classifier rows of the present classes; masks (K,H,W) bool box regions;
    box_channel (K,) long in [0, n).
    """
    cam = feats.dot(class_weight).relu()  # (n,H,W)
    per_box = cam[box_channel] * masks
    return per_box / per_box.amax((1, 2)).clamp_min(_EPS)[:, None, None]


def unary_probabilities(feats: UpsampledFeatures, class_weight: torch.Tensor, bg_mask: torch.Tensor,
                        masks: torch.Tensor, box_channel: torch.Tensor, grid_size: int,
                        bg_threshold: float, use_u0: bool = True) -> torch.Tensor:
    """The CRF's input probabilities (L,H,W) (SPEC §3 steps 1–3).

    class_weight (n,D): classifier rows of the present classes; bg_mask (H,W) 1 = background, for
    the background prototypes; masks (K,H,W) bool box regions; box_channel (K,) long in [0, n),
    each box's class among the present ones.
    - background: u0 inside the boxes (0 without u0), 1 outside them; u0 = A_bg with the values
      below bg_threshold × max_p A_bg set to 0.
    - class c: CAM_c = ReLU(w_c · F↑) divided by its maximum inside each box of class c. Where two
      boxes of class c overlap, a pixel has one normalised value per box and keeps the larger (the
      reference overwrites with whichever box comes later in the annotation, an order that means
      nothing). 0 outside the boxes of class c.
    Inside the union of boxes the L channels go through a softmax; outside they stay (1, 0, …, 0).
    """
    n = len(class_weight)
    inside = masks.any(0)
    if use_u0:
        protos, valid = background_prototypes_2d(feats, bg_mask, grid_size)
        u0 = background_attention_2d(feats, protos, valid)
        u0 = torch.where(u0 < bg_threshold * u0.max(), 0.0, u0)
        bg = torch.where(inside, u0, 1.0)
    else:
        bg = (~inside).float()
    per_box = box_cams(feats, class_weight, masks, box_channel)
    index = box_channel[:, None, None].expand_as(per_box)
    fg = per_box.new_zeros(n, *feats.size).scatter_reduce_(0, index, per_box, "amax")
    unary = torch.cat([bg[None], fg])
    return torch.where(inside, unary.softmax(0), unary)


def retrieval_scores(feats: UpsampledFeatures, label_weight: torch.Tensor, y_crf: torch.Tensor,
                     class_regions: torch.Tensor) -> torch.Tensor:
    """S_k(p) (L,H,W) of Y_ret (SPEC §3 step 6).

    label_weight (L,D): classifier rows [w_0, w_c, …]; y_crf (H,W) long, channel index in [0, L);
    class_regions (L-1,H,W) bool, the union of each present class's boxes. p_k = mean of F↑ where
    y_crf = k (w_k if there is no such pixel); S_k = ReLU(cos(F↑, p_k)); the background score is 1
    outside every box; each class's score is 0 outside its own boxes.
    """
    labels = torch.arange(len(label_weight), device=y_crf.device)
    masks = y_crf[None] == labels[:, None, None]  # (L,H,W)
    counts = masks.sum((1, 2))
    means = feats.masked_sum(masks.float()) / counts.clamp_min(1)[:, None]
    protos = torch.where((counts > 0)[:, None], means, label_weight)
    scores = feats.cosine(protos).relu()
    scores[0] = torch.where(class_regions.any(0), scores[0], 1.0)
    scores[1:] *= class_regions
    return scores


def _as_float32(x, name: str, ndim: int, device=None) -> torch.Tensor:
    x = torch.as_tensor(x).detach().to(device or "cpu", torch.float32)
    if x.ndim != ndim:
        raise ValueError(f"make_pseudo_labels: {name} must have {ndim} dimensions, got shape "
                         f"{tuple(x.shape)}.")
    return x


class ImageState:
    """What one image's labelling keeps between its unaries and its retrieval, on the features'
    device: F↑, the classifier rows of background and the present classes (L,D), the box masks
    (K,H,W), each box's channel (K,), each present class's box union (L-1,H,W) and the class id
    of each channel (L,) uint8."""

    def __init__(self, feats, label_weight, masks, box_channel, class_regions, ids):
        self.feats, self.label_weight, self.masks = feats, label_weight, masks
        self.box_channel, self.class_regions, self.ids = box_channel, class_regions, ids


def check_inputs(features, classifier_weight, image_shape, boxes, bg_mask):
    """make_pseudo_labels' inputs as (features, weight) float32 tensors on the features' device,
    bg_mask tensor, boxes (K,5) array; ValueError naming what does not fit."""
    device = features.device if torch.is_tensor(features) else None
    features = _as_float32(features, "features (D,h,w)", 3, device)
    weight = _as_float32(classifier_weight, "classifier_weight (C,D)", 2, features.device)
    bg_mask = torch.as_tensor(np.asarray(bg_mask) if not torch.is_tensor(bg_mask) else bg_mask)
    boxes = np.asarray(boxes).reshape(-1, 5) if np.size(boxes) == 0 else np.asarray(boxes)
    if weight.shape[1] != features.shape[0]:
        raise ValueError(f"make_pseudo_labels: classifier_weight {tuple(weight.shape)} expects "
                         f"{weight.shape[1]} feature channels, features {tuple(features.shape)} "
                         f"have {features.shape[0]}.")
    if bg_mask.ndim != 2 or tuple(image_shape) != (*bg_mask.shape, 3):
        raise ValueError(f"make_pseudo_labels: image {tuple(image_shape)} must be (H,W,3) and "
                         f"bg_mask {tuple(bg_mask.shape)} (H,W) of the same image.")
    if boxes.ndim != 2 or boxes.shape[1] != 5:
        raise ValueError(f"make_pseudo_labels: boxes must be (K,5) = x1,y1,x2,y2,class, got shape "
                         f"{boxes.shape}.")
    if len(boxes):
        classes = np.unique(boxes[:, 4].astype(np.int64))
        if classes[0] < 1 or classes[-1] >= len(weight):
            raise ValueError(f"make_pseudo_labels: box classes {classes.tolist()} must lie in "
                             f"[1, {len(weight) - 1}] (the classifier has {len(weight)} rows, "
                             "row 0 = background).")
    return features, weight, bg_mask.to(features.device), boxes


def unaries(features: torch.Tensor, weight: torch.Tensor, boxes: np.ndarray, bg_mask: torch.Tensor,
            grid_size: int, bg_threshold: float, use_u0: bool = True):
    """SPEC §3 steps 1-3 on the features' device: (probs (L,H,W) float32, ImageState). Inputs as
    returned by `check_inputs`, with at least one box."""
    height, width = bg_mask.shape
    device = features.device
    classes, box_channel = np.unique(boxes[:, 4].astype(np.int64), return_inverse=True)
    box_channel = torch.as_tensor(box_channel.reshape(-1), dtype=torch.int64, device=device)
    masks = box_masks(boxes, height, width, device)
    class_regions = torch.zeros(len(classes), height, width, device=device).index_add_(
        0, box_channel, masks.float()) > 0
    label_weight = weight[torch.as_tensor(np.concatenate([[0], classes]), device=device)]
    feats = UpsampledFeatures(features, (height, width))
    probs = unary_probabilities(feats, label_weight[1:], bg_mask, masks, box_channel, grid_size,
                                bg_threshold, use_u0)
    ids = np.concatenate([[0], classes]).astype(np.uint8)
    return probs, ImageState(feats, label_weight, masks, box_channel, class_regions, ids)


def retrieval(state: ImageState, y_crf_channels, return_box_scores: bool = False):
    """SPEC §3 step 6 on the state's device: (y_crf, y_ret) uint8 (H,W) class ids, and with
    return_box_scores the per-box normalised CAM (K,H,W) float32."""
    device = state.feats.features.device
    channels = torch.as_tensor(np.asarray(y_crf_channels), device=device)
    y_ret = retrieval_scores(state.feats, state.label_weight, channels,
                             state.class_regions).argmax(0)
    ids = state.ids
    out = (ids[np.asarray(y_crf_channels)], ids[y_ret.cpu().numpy()])
    if not return_box_scores:
        return out
    scores = box_cams(state.feats, state.label_weight[1:], state.masks, state.box_channel)
    return (*out, scores.cpu().numpy())


def make_pseudo_labels(features, classifier_weight, image: np.ndarray, boxes, bg_mask: np.ndarray,
                       grid_size: int, bg_threshold: float, crf, use_u0: bool = True,
                       return_box_scores: bool = False):
    """Y_crf and Y_ret of one image (SPEC §3 steps 1–6).

    features (D,h,w) float, the backbone output (upsampled here); classifier_weight (C,D), row c =
    class c (row 0 = background); image uint8 (H,W,3) RGB; boxes (K,5) int = x1,y1,x2,y2,class in
    pixels, class in [1, C) (K may be 0); bg_mask (H,W), 1 outside every box (used for the
    background prototypes); crf: a `utils.crf.DenseCRF`. Returns (y_crf, y_ret), uint8 (H,W) class
    ids (those of the classifier rows). A pixel outside every box is 0 in both; a pixel labelled c
    lies in a box of class c. With return_box_scores, also the per-box normalised CAM float32
    (K,H,W) of `box_cams`, boxes in input order, which splits a class's pixels into instances
    (`utils.instances.instance_masks`).

    Runs where `features` lies (a tensor on a GPU: there, but the CRF on the CPU); stage 2 calls
    the three phases (`unaries`, `utils.crf.crf_in_regions`, `retrieval`) itself to overlap them.
    """
    features, weight, bg_mask, boxes = check_inputs(features, classifier_weight, np.shape(image),
                                                    boxes, bg_mask)
    height, width = bg_mask.shape
    if len(boxes) == 0:
        empty = np.zeros((height, width), np.uint8)
        return (empty, empty.copy(), np.zeros((0, height, width), np.float32)) \
            if return_box_scores else (empty, empty.copy())
    probs, state = unaries(features, weight, boxes, bg_mask, grid_size, bg_threshold, use_u0)
    channels = crf_in_regions(crf, image, probs.cpu().numpy(), state.class_regions.cpu().numpy())
    return retrieval(state, channels, return_box_scores)
