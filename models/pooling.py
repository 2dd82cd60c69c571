"""Prototypes and attention of background-aware pooling (SPEC §2), vectorised over images and boxes.

Shape shorthand: N images, D feature channels, h×w feature map, G×G background grid
(J = G*G cells, row-major), K boxes over the whole batch, Rh×Rw ROI grid per box.
"""

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

# Guards divisions by a weight sum that is zero (a cell without background, a degenerate box):
# the numerator is then zero too, so the prototype is zero rather than NaN.
_EPS = 1e-12


def background_prototypes(features, bg_mask, grid_size):
    """Masked mean of the features in each cell of a G×G grid: q_j = Σ M F / Σ M.

    features (N,D,h,w); bg_mask (N,1,h,w), 1 = background, at feature resolution. Both are
    padded with zeros at the bottom/right so h and w divide by G (padding never counts).
    Returns protos (N,J,D) (zero for cells without background) and valid (N,J) bool, Σ M > 0.
    """
    n, d, h, w = features.shape
    g = grid_size
    pad = (0, -w % g, 0, -h % g)
    features, bg_mask = F.pad(features, pad), F.pad(bg_mask, pad)
    ch, cw = features.shape[2] // g, features.shape[3] // g
    num = (features * bg_mask).view(n, d, g, ch, g, cw).sum((3, 5)).flatten(2)  # (N,D,J)
    den = bg_mask.view(n, 1, g, ch, g, cw).sum((3, 5)).flatten(2)  # (N,1,J)
    protos = (num / den.clamp_min(_EPS)).transpose(1, 2)
    return protos, den[:, 0] > 0


def background_attention(features, protos, valid):
    """A_bg(p) = mean over the valid cells j of ReLU(cos(F(p), q_j)); 0 if an image has none.

    features (N,D,h,w); protos (N,J,D); valid (N,J) bool. Returns (N,h,w) in [0, 1].
    """
    cos = torch.einsum("njd,ndhw->njhw", F.normalize(protos, dim=2), F.normalize(features, dim=1))
    scores = cos.relu() * valid[:, :, None, None]
    return scores.sum(1) / valid.sum(1).clamp_min(1)[:, None, None]


def box_prototypes(features, weights, boxes, roi_size, spatial_scale):
    """Weighted mean of the features in each ROI cell of each box: r = Σ w F / Σ w.

    features (N,D,h,w); weights (N,h,w), e.g. A_fg (BAP) or ones (GAP); boxes (K,5) =
    (image index, x1, y1, x2, y2) in input pixels, edges (a box 0..W covers the whole image);
    roi_size (Rh, Rw); spatial_scale (sy, sx) = feature pixels per input pixel (h/H, w/W).
    Returns (K*Rh*Rw, D): box order, cells row-major.

    Sampling: `roi_align(aligned=True)` with adaptive sampling (about one bilinear sample per
    feature pixel per cell, at least one), applied to w·F and to w with the same samples, so the
    ratio is a convex combination of the feature vectors under the box cell, each weighted by w
    times its bilinear coverage. Feature pixel j covers [j, j+1) in scaled coordinates; a cell whose
    edges fall on pixel edges pools exactly the pixels inside it.
    """
    sy, sx = spatial_scale
    rois = boxes.to(features.dtype) * boxes.new_tensor([1.0, sx, sy, sx, sy], dtype=features.dtype)
    w = weights.unsqueeze(1)
    pooled = roi_align(torch.cat([features * w, w], 1), rois, tuple(roi_size), spatial_scale=1.0,
                       sampling_ratio=-1, aligned=True)  # (K,D+1,Rh,Rw)
    protos = pooled[:, :-1] / pooled[:, -1:].clamp_min(_EPS)
    return protos.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
