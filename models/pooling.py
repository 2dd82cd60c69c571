"""Prototypes and attention of background-aware pooling (SPEC §2), vectorised over images and boxes.

Shape shorthand: N images, D feature channels, h×w feature map, G×G background grid
(J = G*G cells, row-major), K boxes over the whole batch, Rh×Rw ROI grid per box.
"""

import numpy as np
import torch
import torch.nn.functional as F

# Guards divisions by a weight sum that is zero (a cell without background, a degenerate box):
# the numerator is then zero too, so the prototype is zero rather than NaN.
_EPS = 1e-12


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`. To a GPU it goes through pinned memory without blocking, so the
    host does not wait for the device's queue to drain (a plain copy would)."""
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def grid_padding(height: int, width: int, grid_size: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zeros that make height and width divide by G, placed as the
    reference's `pad_for_grid` places them: an even amount is split equally between both sides,
    an odd amount goes entirely to the bottom (right)."""
    pad_h, pad_w = -height % grid_size, -width % grid_size
    top = pad_h // 2 if pad_h % 2 == 0 else 0
    left = pad_w // 2 if pad_w % 2 == 0 else 0
    return left, pad_w - left, top, pad_h - top


def background_prototypes(features, bg_mask, grid_size):
    """Masked mean of the features in each cell of a G×G grid: q_j = Σ M F / Σ M.

    features (N,D,h,w); bg_mask (N,1,h,w), 1 = background, at feature resolution. Both are
    padded with zeros (`grid_padding`) so h and w divide by G; padding never counts.
    Returns protos (N,J,D) (zero for cells without background) and valid (N,J) bool, Σ M > 0.
    """
    n, d, h, w = features.shape
    g = grid_size
    pad = grid_padding(h, w, g)
    features, bg_mask = F.pad(features, pad), F.pad(bg_mask, pad)
    ch, cw = features.shape[2] // g, features.shape[3] // g
    num = (features * bg_mask).view(n, d, g, ch, g, cw).sum((3, 5)).flatten(2)  # (N,D,J)
    den = bg_mask.view(n, 1, g, ch, g, cw).sum((3, 5)).flatten(2)  # (N,1,J)
    # The reference divides by (den + 1e-12), not by a clamped den: the same wherever den > 0.
    protos = (num / (den + _EPS)).transpose(1, 2)
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
    # Imported here: stage 2's CRF workers import this module (grid_padding) and must not pay
    # for torchvision.
    from torchvision.ops import roi_align

    sy, sx = spatial_scale
    rois = boxes.to(features.dtype) * boxes.new_tensor([1.0, sx, sy, sx, sy], dtype=features.dtype)
    w = weights.unsqueeze(1)
    pooled = roi_align(torch.cat([features * w, w], 1), rois, tuple(roi_size), spatial_scale=1.0,
                       sampling_ratio=-1, aligned=True)  # (K,D+1,Rh,Rw)
    protos = pooled[:, :-1] / pooled[:, -1:].clamp_min(_EPS)
    return protos.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def sample_counts(boxes, image_size, feature_size):
    """How many samples the reference takes across each box, per axis: (rows (K,), cols (K,))
    int64, and the box corners in normalised coordinates (K,4) float32 (x1, y1, x2, y2).

    boxes (K,4) x1, y1, x2, y2 in input pixels; image_size (H, W); feature_size (h, w).
    Follows the reference's arithmetic in float32, in its order: x_n = x / ((W-1)/2) - 1, then
    x_f = x_n * (w-1)/2 + (w-1)/2, then count = ceil(x2_f) - floor(x1_f). A box whose count is 0
    (both edges on one integer feature coordinate) gets 1 sample, where the reference fails.
    """
    (height, width), (fh, fw) = image_size, feature_size
    b = np.asarray(boxes.detach().cpu().numpy() if torch.is_tensor(boxes) else boxes,
                   np.float32).reshape(-1, 4).copy()
    b[:, [0, 2]] = b[:, [0, 2]] / ((width - 1) / 2) - 1
    b[:, [1, 3]] = b[:, [1, 3]] / ((height - 1) / 2) - 1
    normalised = torch.from_numpy(b)
    half_w, half_h = (fw - 1) / 2, (fh - 1) / 2
    xs = normalised[:, [0, 2]] * half_w + half_w
    ys = normalised[:, [1, 3]] * half_h + half_h
    cols = (xs[:, 1].ceil() - xs[:, 0].floor()).long().clamp_min(1)
    rows = (ys[:, 1].ceil() - ys[:, 0].floor()).long().clamp_min(1)
    return rows, cols, normalised


def _linspace(start, end, steps, index):
    """torch.linspace(start, end, steps)[index], elementwise over boxes, with its float32
    arithmetic: the first half counts up from start, the second half down from end, and a single
    step is `start`."""
    step = (end - start) / (steps - 1).clamp_min(1).to(start.dtype)
    up = start + step * index.to(start.dtype)
    down = end - step * (steps - 1 - index).to(start.dtype)
    return torch.where(steps == 1, start, torch.where(index < steps // 2, up, down))


def _window_membership(position, length, out_size, pad_at_start):
    """(P, O) bool: whether sample `position` (P,) of an axis of `length` (P,) samples lies in
    each of the O pooling windows of the reference's weighted pooling.

    stride = n // O, kernel = n - (O-1)·stride: window o covers [o·stride, o·stride + kernel),
    and windows may overlap. When n < O, the input is replicate-padded to O samples (at the end
    for rows, at the start for columns) and each window holds one sample, which maps back to
    sample min(o, n-1) (padding at the end) or max(o - (O-n), 0) (padding at the start)."""
    o = torch.arange(out_size, device=position.device)[None]
    n, pos = length[:, None], position[:, None]
    stride = n // out_size
    kernel = n - (out_size - 1) * stride
    inside = (pos >= o * stride) & (pos < o * stride + kernel)
    if pad_at_start:
        replicated = pos == (o - (out_size - n)).clamp_min(0)
    else:
        replicated = pos == torch.minimum(o, n - 1)
    return torch.where(stride == 0, replicated, inside)


def sampled_box_prototypes(features, boxes, image_size, protos, valid, use_bap, roi_size):
    """Foreground prototypes exactly as the reference samples and pools them (SPEC §2.3).

    features (N,D,h,w); boxes (K,5) = image index, x1, y1, x2, y2 in input pixels, image-major;
    image_size (H, W) of the input; protos (N,J,D) and valid (N,J) the background cells;
    use_bap (N,) bool: images whose boxes are weighted by A_fg (the others pool with A_fg ≡ 1);
    roi_size (Rh, Rw). Returns (K*Rh*Rw, D): box order, cells row-major.

    Each box is resampled on a rows_k × cols_k grid (`sample_counts`) by `grid_sample`
    (bilinear, zero padding, align_corners=False). A_fg = 1 - mean_j ReLU(cos(roi, q_j)) is taken
    on the samples, and each ROI cell is the A_fg-weighted mean of the samples in its (possibly
    overlapping) pooling window, Σ A·roi / (Σ A + 1e-12).

    Vectorised over boxes: the samples of all boxes of an image are laid out in one row (P_i
    samples, padded to the longest image), sampled by one `grid_sample`, and every ROI cell is a
    row of a (cells × samples) weight matrix, so pooling is one batched matmul.
    """
    n, d, fh, fw = features.shape
    device = features.device
    rh, rw = roi_size
    cells = rh * rw
    k = len(boxes)
    if k == 0:
        return features.new_zeros(0, d)
    image = boxes[:, 0].long().cpu()
    rows, cols, corners = sample_counts(boxes[:, 1:5], image_size, (fh, fw))
    points = rows * cols
    # Layout of the samples: box-major, row-major inside a box; per image, one row of samples.
    box_start = torch.cumsum(points, 0) - points
    per_image = torch.zeros(n, dtype=torch.long).index_add_(0, image, points)
    image_start = torch.cumsum(per_image, 0) - per_image
    first_box = torch.zeros(n, dtype=torch.long).index_add_(0, image, torch.ones(k, dtype=torch.long))
    first_box = torch.cumsum(first_box, 0) - first_box
    local_box = torch.arange(k) - first_box[image]
    total, longest = int(points.sum()), int(per_image.max())
    max_boxes = int(local_box.max()) + 1

    point_box = torch.repeat_interleave(torch.arange(k), points)
    local = torch.arange(total) - box_start[point_box]
    y, x = local // cols[point_box], local % cols[point_box]
    c = corners[point_box]  # (P,4) float32, normalised
    gx = _linspace(c[:, 0], c[:, 2], cols[point_box], x)
    gy = _linspace(c[:, 1], c[:, 3], rows[point_box], y)
    point_image = image[point_box]
    slot = box_start - image_start[image]  # first slot of each box in its image's row
    position = slot[point_box] + local
    grid = torch.zeros(n, 1, longest, 2)
    grid[point_image, 0, position] = torch.stack([gx, gy], 1)
    roi = F.grid_sample(features, to_device(grid.to(features.dtype), device), mode="bilinear",
                        padding_mode="zeros", align_corners=False)[:, :, 0]  # (N,D,longest)

    cos = torch.einsum("njd,ndp->njp", F.normalize(protos, dim=2), F.normalize(roi, dim=1))
    a_bg = (cos.relu() * valid[:, :, None]).sum(1) / valid.sum(1).clamp_min(1)[:, None]
    bap = (use_bap & valid.any(1))[:, None]
    a_fg = torch.where(bap, 1 - a_bg, torch.ones_like(a_bg))  # (N,longest)

    member = (_window_membership(y, rows[point_box], rh, pad_at_start=False)[:, :, None]
              & _window_membership(x, cols[point_box], rw, pad_at_start=True)[:, None, :])
    member = to_device(member.reshape(total, cells), device)  # (P, cells)
    point_image_d, position_d = to_device(point_image, device), to_device(position, device)
    values = member * a_fg[point_image_d, position_d][:, None]
    row_of = to_device((local_box[point_box] * cells)[:, None] + torch.arange(cells), device)
    weights = features.new_zeros(n, max_boxes * cells, longest).index_put(
        (point_image_d[:, None].expand(-1, cells), row_of, position_d[:, None].expand(-1, cells)),
        values.to(features.dtype))
    num = torch.bmm(weights, roi.transpose(1, 2))  # (N, boxes*cells, D)
    den = weights.sum(2, keepdim=True)
    pooled = num / (den + _EPS)
    box_rows = (image * max_boxes * cells + local_box * cells)[:, None] + torch.arange(cells)
    return pooled.reshape(n * max_boxes * cells, d)[to_device(box_rows.reshape(-1), device)]
