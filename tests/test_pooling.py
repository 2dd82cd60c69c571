"""Pooling against slow references written with plain loops (also used by test_labeler).

The box reference re-derives `roi_align(aligned=True, sampling_ratio=-1)`'s sampling explicitly:
each ROI cell is sampled on a ceil(cell size) grid, each sample spreads bilinear weights on
its four neighbouring feature pixels, and the prototype is the mean of the features under
(sample coverage × w). A second test uses boxes on pixel edges, where no sampling choice
matters: each cell must be the plain weighted mean of the pixels inside it.
"""

import math

import torch

from models.pooling import background_attention, background_prototypes, box_prototypes


def reference_background_prototypes(features, bg_mask, grid_size):
    """Cells of the map padded as the authors' pad_for_grid: an even padding is split between
    both sides, an odd one goes to the bottom/right; padded pixels are never background."""
    n, d, h, w = features.shape
    ch, cw = math.ceil(h / grid_size), math.ceil(w / grid_size)
    pad_h, pad_w = ch * grid_size - h, cw * grid_size - w
    top = pad_h // 2 if pad_h % 2 == 0 else 0
    left = pad_w // 2 if pad_w % 2 == 0 else 0
    protos = torch.zeros(n, grid_size * grid_size, d, dtype=features.dtype)
    valid = torch.zeros(n, grid_size * grid_size, dtype=torch.bool)
    for i in range(n):
        for gy in range(grid_size):
            for gx in range(grid_size):
                total, mass = torch.zeros(d, dtype=features.dtype), 0.0
                for y in range(max(gy * ch - top, 0), min((gy + 1) * ch - top, h)):
                    for x in range(max(gx * cw - left, 0), min((gx + 1) * cw - left, w)):
                        total += bg_mask[i, 0, y, x] * features[i, :, y, x]
                        mass += float(bg_mask[i, 0, y, x])
                if mass > 0:
                    protos[i, gy * grid_size + gx] = total / mass
                    valid[i, gy * grid_size + gx] = True
    return protos, valid


def reference_background_attention(features, protos, valid):
    n, _, h, w = features.shape
    out = torch.zeros(n, h, w, dtype=features.dtype)
    for i in range(n):
        cells = [protos[i, j] for j in range(protos.shape[1]) if valid[i, j]]
        for y in range(h):
            for x in range(w):
                f = features[i, :, y, x]
                scores = [max(0.0, float(f @ q) / float(f.norm() * q.norm())) for q in cells]
                out[i, y, x] = sum(scores) / len(scores) if scores else 0.0
    return out


def _bilinear_taps(y, x, h, w):
    """(row, col, weight) of one bilinear sample, with roi_align's border rules."""
    if y < -1 or y > h or x < -1 or x > w:
        return []
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return [(y0, x0, (1 - ly) * (1 - lx)), (y0, x1, (1 - ly) * lx),
            (y1, x0, ly * (1 - lx)), (y1, x1, ly * lx)]


def reference_cell_coverage(box, cell, roi_size, spatial_scale, h, w):
    """(h, w) summed bilinear weights of the samples of ROI cell (i, j) of box (x1, y1, x2, y2)."""
    (sy, sx), (rh, rw), (i, j) = spatial_scale, roi_size, cell
    x1, y1, x2, y2 = box
    top, left = y1 * sy - 0.5, x1 * sx - 0.5
    cell_h, cell_w = (y2 * sy - 0.5 - top) / rh, (x2 * sx - 0.5 - left) / rw
    steps_y, steps_x = math.ceil(cell_h), math.ceil(cell_w)
    cover = torch.zeros(h, w, dtype=torch.float64)
    for iy in range(steps_y):
        for ix in range(steps_x):
            y = top + i * cell_h + (iy + 0.5) * cell_h / steps_y
            x = left + j * cell_w + (ix + 0.5) * cell_w / steps_x
            for r, c, weight in _bilinear_taps(y, x, h, w):
                cover[r, c] += weight
    return cover


def reference_box_prototypes(features, weights, boxes, roi_size, spatial_scale):
    _, d, h, w = features.shape
    rows = []
    for box in boxes.tolist():
        image = int(box[0])
        for i in range(roi_size[0]):
            for j in range(roi_size[1]):
                cover = reference_cell_coverage(box[1:], (i, j), roi_size, spatial_scale, h, w)
                mass = cover.to(features.dtype) * weights[image]
                total = (features[image] * mass).sum((1, 2))
                empty = torch.zeros(d, dtype=features.dtype)
                rows.append(total / mass.sum() if mass.sum() > 0 else empty)
    return torch.stack(rows) if rows else torch.zeros(0, d, dtype=features.dtype)


def test_background_prototypes_match_reference_with_padding_and_empty_cells():
    torch.manual_seed(0)
    features = torch.randn(3, 5, 7, 10, dtype=torch.float64)
    bg_mask = (torch.rand(3, 1, 7, 10) > 0.6).double()
    bg_mask[0, :, :4, :] = 0  # the top row of cells of image 0 has no background
    bg_mask[2] = 0  # image 2 has no background at all
    protos, valid = background_prototypes(features, bg_mask, 4)
    expected_protos, expected_valid = reference_background_prototypes(features, bg_mask, 4)
    assert protos.shape == (3, 16, 5)
    assert torch.equal(valid, expected_valid)
    assert not valid[0, :4].any() and not valid[2].any() and valid[1].any()
    assert torch.allclose(protos, expected_protos)


def test_background_prototype_hand_computed():
    """2×2 map, G = 1, mask [[1, 0], [1, 1]], F = [[1, 100], [2, 6]] -> q = (1 + 2 + 6) / 3 = 3."""
    features = torch.tensor([[1.0, 100.0], [2.0, 6.0]]).view(1, 1, 2, 2)
    bg_mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).view(1, 1, 2, 2)
    protos, valid = background_prototypes(features, bg_mask, 1)
    assert protos.tolist() == [[[3.0]]] and valid.tolist() == [[True]]


def test_background_attention_matches_reference_and_lies_in_unit_interval():
    torch.manual_seed(1)
    features = torch.randn(3, 6, 5, 6, dtype=torch.float64)
    bg_mask = (torch.rand(3, 1, 5, 6) > 0.5).double()
    bg_mask[2] = 0
    protos, valid = background_prototypes(features, bg_mask, 2)
    attention = background_attention(features, protos, valid)
    assert torch.allclose(attention, reference_background_attention(features, protos, valid))
    assert attention.min() >= 0 and attention.max() <= 1
    assert torch.equal(attention[2], torch.zeros(5, 6, dtype=torch.float64))


def test_box_prototypes_match_reference_on_arbitrary_boxes():
    torch.manual_seed(2)
    features = torch.randn(2, 4, 9, 11, dtype=torch.float64)
    weights = torch.rand(2, 9, 11, dtype=torch.float64)
    boxes = torch.tensor([
        [0, 3.3, 5.1, 60.7, 40.2],  # ordinary box
        [1, 0.0, 0.0, 88.0, 72.0],  # the whole image
        [1, 70.2, 50.9, 95.0, 80.0],  # reaches past the bottom-right corner
        [0, 10.4, 20.6, 14.1, 23.3],  # smaller than one feature pixel
        [1, 17.0, 9.0, 49.0, 57.0],
    ], dtype=torch.float64)
    scale = (9 / 72, 11 / 88)
    out = box_prototypes(features, weights, boxes, (2, 3), scale)
    assert out.shape == (5 * 6, 4)
    assert torch.allclose(out, reference_box_prototypes(features, weights, boxes, (2, 3), scale))


def test_box_prototypes_on_pixel_edges_are_plain_weighted_means():
    torch.manual_seed(3)
    features = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    weights = torch.rand(1, 8, 8, dtype=torch.float64)
    # Image 64×64, stride 8: x 8..40 -> feature columns 1..4, y 16..48 -> rows 2..5.
    boxes = torch.tensor([[0, 8.0, 16.0, 40.0, 48.0]], dtype=torch.float64)
    out = box_prototypes(features, weights, boxes, (2, 2), (1 / 8, 1 / 8))
    for i, rows in enumerate(((2, 3), (4, 5))):
        for j, cols in enumerate(((1, 2), (3, 4))):
            f = features[0][:, rows[0]:rows[1] + 1, cols[0]:cols[1] + 1]
            a = weights[0][rows[0]:rows[1] + 1, cols[0]:cols[1] + 1]
            assert torch.allclose(out[i * 2 + j], (f * a).sum((1, 2)) / a.sum())


def test_box_prototypes_without_boxes():
    no_boxes = torch.zeros(0, 5)
    out = box_prototypes(torch.randn(2, 4, 5, 5), torch.ones(2, 5, 5), no_boxes, (2, 2), (1.0, 1.0))
    assert out.shape == (0, 4)


def test_pooling_gradients():
    torch.manual_seed(4)
    features = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 5, 6, dtype=torch.float64, requires_grad=True)
    bg_mask = (torch.rand(2, 1, 5, 6) > 0.5).double()
    boxes = torch.tensor([[0, 2.5, 3.0, 30.0, 22.0], [1, 10.0, 1.0, 40.0, 38.0]], dtype=torch.float64)

    def attention(f):
        return background_attention(f, *background_prototypes(f, bg_mask, 2))

    assert torch.autograd.gradcheck(attention, (features,))
    assert torch.autograd.gradcheck(
        lambda f, a: box_prototypes(f, a, boxes, (2, 2), (1 / 8, 1 / 8)), (features, weights))
