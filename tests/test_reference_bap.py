"""The default stage-1 head samples and pools boxes exactly as the authors' code (SPEC §2.3).

`slow_reference_logits` is the obvious per-box loop written from the SPEC: normalise the box,
count its samples, `torch.linspace` + `grid_sample` it, take the attention on the samples, and
pool each axis with replicate padding and (possibly overlapping) sum windows. The vectorised
head must agree with it to 1e-5 on every kind of box: fractional, on the borders, one feature
pixel wide or tall, in an image that falls back to GAP, and in an image with no background.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from models.labeler import Labeler
from models.pooling import _window_membership, grid_padding, sample_counts
from tests.test_labeler import _Identity


def _pad_for_grid(x, g):
    """The authors' rule, spelled out: even padding split between both sides, odd at the end."""
    ph, pw = (g - x.shape[2] % g) % g, (g - x.shape[3] % g) % g
    top = ph // 2 if ph % 2 == 0 else 0
    left = pw // 2 if pw % 2 == 0 else 0
    return F.pad(x, [left, pw - left, top, ph - top])


def _pool_axis(values, weights, out, axis, pad_at_start):
    """Sum windows along `axis` (2 = rows, 3 = cols) with the reference's stride/kernel rules."""
    n = values.shape[axis]
    stride = n // out
    if stride == 0:
        stride, pad = 1, out - n
        spec = [0, 0, 0, pad] if axis == 2 else [pad, 0, 0, 0]
        if not pad_at_start and axis == 3:
            spec = [0, pad, 0, 0]
        values = F.pad(values, spec, mode="replicate")
        weights = F.pad(weights, spec, mode="replicate")
    kernel = max(n - (out - 1) * stride, 1)
    pieces_v, pieces_w = [], []
    for o in range(out):
        sl = [slice(None)] * 4
        sl[axis] = slice(o * stride, o * stride + kernel)
        pieces_v.append(values[tuple(sl)].sum(axis, keepdim=True))
        pieces_w.append(weights[tuple(sl)].sum(axis, keepdim=True))
    return torch.cat(pieces_v, axis), torch.cat(pieces_w, axis)


def slow_reference_logits(labeler, features, boxes, bg_mask):
    """Per image, per box, per cell: the reference's computation in plain loops."""
    n, d, fh, fw = features.shape
    height, width = bg_mask.shape[2:]
    g = labeler.grid_size
    small = F.interpolate(bg_mask, (fh, fw), mode="nearest")
    pmask, pfeat = _pad_for_grid(small, g), _pad_for_grid(features, g)
    ch, cw = pmask.shape[2] // g, pmask.shape[3] // g
    protos, valids = [], []
    for i in range(n):
        q, v = [], []
        for gy in range(g):
            for gx in range(g):
                m = pmask[i, :, gy * ch:(gy + 1) * ch, gx * cw:(gx + 1) * cw]
                f = pfeat[i, :, gy * ch:(gy + 1) * ch, gx * cw:(gx + 1) * cw]
                q.append((m * f).sum((1, 2)) / (m.sum() + 1e-12))
                v.append(bool(m.sum() > 0))
        protos.append(q)
        valids.append(v)
    rh, rw = labeler.roi_size
    rows, targets = [], []
    for i, image_boxes in enumerate(boxes):
        bap = labeler.pooling == "bap" and bool(bg_mask[i].mean() > labeler.bg_fraction_min) \
            and any(valids[i])
        for box in image_boxes:
            x1, y1, x2, y2 = [float(torch.tensor(float(c), dtype=torch.float32)) for c in box[:4]]
            nx1 = float(torch.tensor(x1, dtype=torch.float32) / torch.tensor((width - 1) / 2, dtype=torch.float32) - 1)
            nx2 = float(torch.tensor(x2, dtype=torch.float32) / torch.tensor((width - 1) / 2, dtype=torch.float32) - 1)
            ny1 = float(torch.tensor(y1, dtype=torch.float32) / torch.tensor((height - 1) / 2, dtype=torch.float32) - 1)
            ny2 = float(torch.tensor(y2, dtype=torch.float32) / torch.tensor((height - 1) / 2, dtype=torch.float32) - 1)
            fx1, fx2 = [(torch.tensor(v, dtype=torch.float32) * ((fw - 1) / 2) + (fw - 1) / 2)
                        for v in (nx1, nx2)]
            fy1, fy2 = [(torch.tensor(v, dtype=torch.float32) * ((fh - 1) / 2) + (fh - 1) / 2)
                        for v in (ny1, ny2)]
            bw = max(int(fx2.ceil() - fx1.floor()), 1)
            bh = max(int(fy2.ceil() - fy1.floor()), 1)
            gxs = torch.linspace(nx1, nx2, bw)
            gys = torch.linspace(ny1, ny2, bh)
            grid = torch.stack(torch.meshgrid(gys, gxs, indexing="ij")[::-1], -1)[None]
            roi = F.grid_sample(features[i:i + 1], grid.to(features.dtype), align_corners=False)
            if bap:
                scores = [F.relu((F.normalize(roi, dim=1)
                                  * F.normalize(protos[i][j], dim=0)[None, :, None, None]).sum(1))
                          for j in range(g * g) if valids[i][j]]
                a = 1 - torch.stack(scores).mean(0, keepdim=True)
            else:
                a = torch.ones(1, 1, bh, bw, dtype=features.dtype)
            num, den = _pool_axis(roi * a, a, rh, axis=2, pad_at_start=False)
            num, den = _pool_axis(num, den, rw, axis=3, pad_at_start=True)
            cells = num / (den + 1e-12)  # (1, D, rh, rw)
            rows += [cells[0, :, r, c] for r in range(rh) for c in range(rw)]
            targets += [int(box[4])] * (rh * rw)
    for i in range(n):
        for j in range(g * g):
            if valids[i][j]:
                rows.append(protos[i][j])
                targets.append(0)
    weight = labeler.classifier.weight[:, :, 0, 0]
    return torch.stack(rows) @ weight.T, torch.tensor(targets)


def _bg_mask(boxes, size, pad_rows=0):
    mask = torch.ones(1, *size, dtype=torch.float64)
    for x1, y1, x2, y2, _ in boxes.tolist():
        mask[0, int(y1):int(y2), int(x1):int(x2)] = 0
    if pad_rows:
        mask[0, -pad_rows:] = 0
    return mask


def _batch(seed, dtype=torch.float64):
    """Four 81×97 images (features 11×13: odd sizes, so the grid padding matters)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(4, 6, 11, 13, generator=g, dtype=dtype).relu()
    size = (81, 97)
    boxes = [
        # fractional; on the left/top border; on the right/bottom border; whole image
        torch.tensor([[3.3, 5.1, 40.7, 40.2, 4], [0.0, 0.0, 20.5, 17.0, 2],
                      [60.2, 50.9, 96.0, 80.0, 7]], dtype=dtype),
        # too little background -> GAP
        torch.tensor([[1.0, 1.0, 95.0, 79.0, 1]], dtype=dtype),
        # one feature pixel wide, one feature pixel tall, and a box inside one pixel
        torch.tensor([[50.2, 3.9, 52.0, 60.3, 3], [10.0, 44.0, 70.0, 45.5, 5],
                      [33.1, 33.2, 33.9, 33.8, 6]], dtype=dtype),
        # three boxes overlapping, one tiny
        torch.tensor([[20.0, 20.0, 60.0, 60.0, 8], [30.5, 25.5, 75.5, 70.5, 8],
                      [5.0, 70.0, 9.0, 76.0, 9]], dtype=dtype),
    ]
    bg_mask = torch.stack([_bg_mask(boxes[0], size), _bg_mask(boxes[1], size),
                           _bg_mask(boxes[2], size, pad_rows=20), _bg_mask(boxes[3], size)])
    return features, boxes, bg_mask.to(dtype)


@pytest.mark.parametrize("pooling", ["bap", "gap"])
@pytest.mark.parametrize("roi_size,grid_size", [((2, 2), 4), ((3, 2), 3), ((2, 3), 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_head_matches_the_per_box_loop(pooling, roi_size, grid_size, seed):
    torch.manual_seed(seed)
    features, boxes, bg_mask = _batch(seed)
    assert bg_mask[1].mean() <= 1 / 8 < bg_mask[0].mean()
    labeler = Labeler(10, _Identity(6), pooling=pooling, roi_size=roi_size, grid_size=grid_size,
                      roi_sampling="reference").double()
    logits, targets = labeler.head(features, boxes, bg_mask)
    expected, expected_targets = slow_reference_logits(labeler, features, boxes, bg_mask)
    assert torch.equal(targets, expected_targets)
    assert (logits - expected).abs().max() <= 1e-5


def test_reference_is_the_default_and_differs_from_roi_align():
    torch.manual_seed(0)
    features, boxes, bg_mask = _batch(0, torch.float32)
    ref = Labeler(10, _Identity(6))
    assert ref.roi_sampling == "reference"
    fast = Labeler(10, _Identity(6), roi_sampling="roi_align")
    fast.load_state_dict(ref.state_dict())
    a, _ = ref.head(features, boxes, bg_mask)
    b, _ = fast.head(features, boxes, bg_mask)
    assert a.shape == b.shape and (a - b).abs().max() > 1e-4


def test_image_without_background_cells_pools_with_gap():
    """Every box pixel covered: no valid cell, so the boxes are plain averages (A_fg ≡ 1)."""
    torch.manual_seed(0)
    features = torch.rand(1, 4, 6, 6, dtype=torch.float64)
    boxes = [torch.tensor([[0.0, 0.0, 47.0, 47.0, 1]], dtype=torch.float64)]
    bg_mask = torch.zeros(1, 1, 48, 48, dtype=torch.float64)
    bap = Labeler(3, _Identity(4), pooling="bap").double()
    gap = Labeler(3, _Identity(4), pooling="gap").double()
    gap.load_state_dict(bap.state_dict())
    assert torch.allclose(bap.head(features, boxes, bg_mask)[0], gap.head(features, boxes, bg_mask)[0])


def test_sample_counts_follow_the_float32_arithmetic():
    """A 321-px crop has 41×41 features: x_f = x/8 in exact arithmetic. A box from 0 to 320
    spans the whole map (ceil(40) - floor(0) = 40 samples); one from 12 to 20 covers feature
    coordinates 1.5..2.5, so ceil(2.5) - floor(1.5) = 2."""
    rows, cols, _ = sample_counts(torch.tensor([[0.0, 0.0, 320.0, 320.0], [12.0, 12.0, 20.0, 20.0]]),
                                  (321, 321), (41, 41))
    assert cols.tolist() == [40, 2] and rows.tolist() == [40, 2]


@pytest.mark.parametrize("n,out", [(1, 2), (2, 2), (3, 2), (4, 2), (5, 2), (7, 3), (2, 3)])
def test_window_membership_hand_derived(n, out):
    """Windows [o·s, o·s + k) with s = n // O, k = n - (O-1)·s; n < O replicates one sample."""
    pos = torch.arange(n)
    rows = _window_membership(pos, torch.full((n,), n), out, pad_at_start=False)
    cols = _window_membership(pos, torch.full((n,), n), out, pad_at_start=True)
    s = n // out
    for o in range(out):
        if s == 0:
            expect_r = {min(o, n - 1)}
            expect_c = {max(o - (out - n), 0)}
        else:
            k = n - (out - 1) * s
            expect_r = expect_c = set(range(o * s, o * s + k))
        assert set(torch.nonzero(rows[:, o]).flatten().tolist()) == expect_r
        assert set(torch.nonzero(cols[:, o]).flatten().tolist()) == expect_c


@pytest.mark.parametrize("h,w,g,expected", [(11, 13, 4, (0, 3, 0, 1)), (10, 14, 4, (1, 1, 1, 1)),
                                            (8, 9, 4, (0, 3, 0, 0)), (7, 7, 1, (0, 0, 0, 0))])
def test_grid_padding_as_pad_for_grid(h, w, g, expected):
    assert grid_padding(h, w, g) == expected


def test_reference_head_gradients_reach_features_and_attention():
    torch.manual_seed(0)
    features, boxes, bg_mask = _batch(0)
    features.requires_grad_(True)
    labeler = Labeler(10, _Identity(6)).double()
    logits, targets = labeler.head(features, boxes, bg_mask)
    F.cross_entropy(logits, targets).backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    assert torch.isfinite(features.grad).all()
    assert math.isfinite(float(labeler.classifier.weight.grad.abs().sum()))
    # Finite differences, on strictly positive features: an all-zero feature vector is a kink of
    # the cosine (F.normalize), where no derivative exists.
    f = features.detach().clone() + 0.1
    def loss(x):
        out, t = labeler.head(x, boxes, bg_mask)
        return F.cross_entropy(out, t)
    assert torch.autograd.gradcheck(lambda x: loss(x), (f.requires_grad_(True),), eps=1e-6,
                                    atol=1e-5, nondet_tol=1e-7, fast_mode=True)
