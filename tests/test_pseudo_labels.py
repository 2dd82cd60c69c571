import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils.crf import DenseCRF
from models.pseudo_labels import (UpsampledFeatures, background_attention_2d,
                                 background_prototypes_2d, box_masks, make_pseudo_labels,
                                 retrieval_scores, unary_probabilities)

CRF = DenseCRF.from_list([4, 55, 3, 3, 3])
SIZES = [((5, 7), (23, 31)), ((1, 4), (9, 13)), ((6, 6), (6, 6)), ((3, 5), (40, 17)),
         ((6, 8), (48, 64))]


def upsample(features, size):
    """The slow, obvious F↑: D×H×W floats."""
    return F.interpolate(features[None], size=size, mode="bilinear", align_corners=True)[0]


def random_features(d, h, w, seed):
    return torch.rand(d, h, w, generator=torch.Generator().manual_seed(seed))


def clipped(boxes):
    """Boxes with negative corners moved to 0, so that slices cover what the box covers."""
    return np.concatenate([boxes[:, :4].clip(0), boxes[:, 4:]], 1)


def fill(boxes, height, width):
    bg = np.ones((height, width), np.uint8)
    for x1, y1, x2, y2, _ in clipped(boxes):
        bg[y1:y2, x1:x2] = 0
    return bg


@pytest.mark.parametrize("low,size", SIZES)
def test_upsampled_features_match_explicit_upsampling(low, size):
    f = random_features(9, *low, seed=0) - 0.3  # signed, to exercise the Gram form fully
    up = upsample(f, size)
    feats = UpsampledFeatures(f, size)
    vectors = torch.randn(3, 9, generator=torch.Generator().manual_seed(1))
    masks = (torch.rand(2, *size, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    torch.testing.assert_close(feats.norm, up.norm(dim=0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats.dot(vectors), torch.einsum("kd,dyx->kyx", vectors, up),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats.masked_sum(masks), torch.einsum("kyx,dyx->kd", masks, up),
                               rtol=1e-4, atol=1e-4)
    cos = torch.einsum("kd,dyx->kyx", F.normalize(vectors, dim=1), F.normalize(up, dim=0))
    torch.testing.assert_close(feats.cosine(vectors), cos, rtol=1e-4, atol=1e-5)


def test_signed_features_that_cancel_get_the_norm_of_explicit_upsampling(monkeypatch):
    """Between two opposite feature vectors F↑ nearly vanishes: the Gram form's float32 error is
    then larger than |F↑|² itself (it gave norms off by 200 % here); those pixels are recomputed
    from their corners, as accurate as upsampling in float32. Non-negative (post-ReLU) features
    cannot cancel and never take that path."""
    f = torch.randn(16, 5, 6, generator=torch.Generator().manual_seed(0))
    f[:, :, 1::2] = -1.0001 * f[:, :, 0::2]  # every odd column opposes its left neighbour
    size = (37, 45)
    exact = upsample(f.double(), size).norm(dim=0)
    float32 = upsample(f, size).norm(dim=0).double()
    ours = UpsampledFeatures(f, size).norm.double()
    error = ((ours - exact).abs() / exact).max()
    assert error < 5 * ((float32 - exact).abs() / exact).max() and error < 1e-3

    def refuse(*args):
        raise AssertionError("non-negative features took the direct path")

    monkeypatch.setattr(UpsampledFeatures, "_direct_square_norm", refuse)
    UpsampledFeatures(f.relu(), size)
    UpsampledFeatures(random_features(32, 7, 9, seed=3), (51, 63))


def test_cam_at_feature_resolution_equals_cam_of_upsampled_features():
    """w·F is linear in F, so bilinear(w·F) = w·bilinear(F) exactly (up to float rounding), while
    the cosine is not: upsampling cos(F, v) would change the result, so it is never done."""
    f = random_features(16, 6, 8, seed=3)
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    feats = UpsampledFeatures(f, (48, 64))
    up = upsample(f, (48, 64))
    cam_full = torch.einsum("cd,dyx->cyx", w, up).relu()
    torch.testing.assert_close(feats.dot(w).relu(), cam_full, rtol=1e-5, atol=1e-5)
    cos_low = torch.einsum("cd,dij->cij", F.normalize(w, dim=1), F.normalize(f, dim=0))
    cos_full = torch.einsum("cd,dyx->cyx", F.normalize(w, dim=1), F.normalize(up, dim=0))
    assert (upsample(cos_low, (48, 64)) - cos_full).abs().max() > 1e-3
    torch.testing.assert_close(feats.cosine(w), cos_full, rtol=1e-4, atol=1e-5)


def test_background_prototypes_are_masked_means_per_cell():
    """G = 3 on 20×23: cells are 7×8 with the last row/column of cells cut short; the top-left
    cell has no background and is invalid."""
    f = random_features(5, 4, 5, seed=5)
    size = (20, 23)
    bg = torch.ones(size, dtype=torch.uint8)
    bg[:7, :8] = 0
    bg[10:, 3:12] = 0
    protos, valid = background_prototypes_2d(UpsampledFeatures(f, size), bg, 3)
    up = upsample(f, size)
    for r in range(3):
        for s in range(3):
            m = torch.zeros(size)
            m[7 * r:7 * r + 7, 8 * s:8 * s + 8] = bg[7 * r:7 * r + 7, 8 * s:8 * s + 8]
            j = 3 * r + s
            assert bool(valid[j]) == bool(m.sum() > 0)
            expected = (up * m).sum((1, 2)) / m.sum() if m.sum() > 0 else torch.zeros(5)
            torch.testing.assert_close(protos[j], expected, rtol=1e-4, atol=1e-5)
    assert not valid[0]


def reference_unary(features, weight, boxes, bg_mask, grid, tau, use_u0):
    """SPEC §3 steps 1–3 with F↑ built explicitly and loops over cells and boxes; where two boxes
    of a class overlap the larger normalised CAM wins."""
    height, width = bg_mask.shape
    boxes = clipped(boxes)
    up = upsample(features, (height, width))
    unit = F.normalize(up, dim=0)
    inside = torch.zeros(height, width, dtype=torch.bool)
    for x1, y1, x2, y2, _ in boxes:
        inside[y1:y2, x1:x2] = True
    ch, cw = -(-height // grid), -(-width // grid)
    attns = []
    for r in range(grid):
        for s in range(grid):
            m = torch.zeros(height, width)
            m[r * ch:(r + 1) * ch, s * cw:(s + 1) * cw] = \
                torch.as_tensor(bg_mask[r * ch:(r + 1) * ch, s * cw:(s + 1) * cw]).float()
            if m.sum() > 0:
                q = (up * m).sum((1, 2)) / m.sum()
                attns.append((unit * F.normalize(q, dim=0)[:, None, None]).sum(0).relu())
    attn = torch.stack(attns).mean(0) if attns else torch.zeros(height, width)
    attn[attn < tau * attn.max()] = 0
    bg = torch.ones(height, width)
    bg[inside] = attn[inside] if use_u0 else 0.0
    channels = [bg]
    for c in sorted(set(boxes[:, 4].tolist())):
        cam = (weight[c][:, None, None] * up).sum(0).relu()
        u = torch.zeros(height, width)
        for x1, y1, x2, y2, k in boxes:
            if k == c:
                part = cam[y1:y2, x1:x2]
                u[y1:y2, x1:x2] = torch.maximum(u[y1:y2, x1:x2], part / max(part.max(), 1e-12))
        channels.append(u)
    unary = torch.stack(channels)
    unary[:, inside] = unary[:, inside].softmax(0)
    return unary


def reference_retrieval(features, weight, boxes, y_crf_ids):
    """SPEC §3 step 6 on VOC ids, with F↑ built explicitly."""
    height, width = y_crf_ids.shape
    boxes = clipped(boxes)
    up = upsample(features, (height, width))
    unit = F.normalize(up, dim=0)
    labels = [0] + sorted(set(boxes[:, 4].tolist()))
    y = torch.as_tensor(y_crf_ids.astype(np.int64))
    scores = []
    for k in labels:
        pix = y == k
        p = up[:, pix].mean(1) if pix.any() else weight[k]
        s = (unit * F.normalize(p, dim=0)[:, None, None]).sum(0).relu()
        region = torch.zeros(height, width, dtype=torch.bool)
        for x1, y1, x2, y2, c in boxes:
            if k == 0 or c == k:
                region[y1:y2, x1:x2] = True
        s = torch.where(region, s, 1.0 if k == 0 else 0.0)
        scores.append(s)
    return torch.stack(scores)


def random_scene(seed, stride=8, height=48, width=64, d=12, num_classes=21):
    """Random non-negative features at `stride`, random classifier, boxes with two overlapping
    boxes of class 5, one of class 9 across them, and a box partly off the image."""
    g = torch.Generator().manual_seed(seed)
    features = torch.rand(d, (height - 1) // stride + 1, (width - 1) // stride + 1, generator=g)
    weight = torch.randn(num_classes, d, generator=g)
    boxes = np.array([[4, 6, 30, 40, 5], [20, 2, 44, 30, 5], [26, 18, 60, 47, 9],
                      [-5, 38, 10, 60, 2]])
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return features, weight, image, boxes, fill(boxes, height, width)


def internals(features, weight, boxes, bg_mask):
    height, width = bg_mask.shape
    classes, channel = np.unique(boxes[:, 4], return_inverse=True)
    feats = UpsampledFeatures(features, (height, width))
    return feats, weight[classes], torch.as_tensor(channel), box_masks(boxes, height, width)


@pytest.mark.parametrize("grid,use_u0", [(1, True), (2, True), (1, False)])
def test_unary_probabilities_match_the_slow_reference(grid, use_u0):
    features, weight, _, boxes, bg = random_scene(6)
    feats, class_weight, channel, masks = internals(features, weight, boxes, bg)
    attn = background_attention_2d(feats, *background_prototypes_2d(feats, torch.as_tensor(bg),
                                                                     grid))
    inside = torch.as_tensor(bg == 0)
    assert 0 < ((attn >= 0.9 * attn.max()) & inside).sum() < inside.sum()  # τ matters here
    probs = unary_probabilities(feats, class_weight, torch.as_tensor(bg), masks, channel, grid,
                                0.9, use_u0)
    expected = reference_unary(features, weight, boxes, bg, grid, 0.9, use_u0)
    torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(probs.sum(0), torch.ones(48, 64))


def test_background_attention_is_the_mean_relu_cosine_over_valid_cells():
    f = random_features(6, 4, 5, seed=7) - 0.5
    feats = UpsampledFeatures(f, (15, 19))
    protos = torch.randn(3, 6, generator=torch.Generator().manual_seed(8))
    valid = torch.tensor([True, False, True])
    unit = F.normalize(upsample(f, (15, 19)), dim=0)
    cos = torch.einsum("kd,dyx->kyx", F.normalize(protos, dim=1), unit)
    torch.testing.assert_close(background_attention_2d(feats, protos, valid),
                               cos[[0, 2]].relu().mean(0), rtol=1e-4, atol=1e-5)
    assert not background_attention_2d(feats, protos, torch.zeros(3, dtype=torch.bool)).any()


def test_box_cam_all_zero_gives_zero_not_nan():
    features, weight, _, boxes, bg = random_scene(8)
    weight[5] = 0  # the CAM of class 5 is 0 in both its boxes
    feats, class_weight, channel, masks = internals(features, weight, boxes, bg)
    probs = unary_probabilities(feats, class_weight, torch.as_tensor(bg), masks, channel, 1, 0.99)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs, reference_unary(features, weight, boxes, bg, 1, 0.99, True),
                               rtol=1e-4, atol=1e-5)


def test_retrieval_scores_match_the_slow_reference():
    features, weight, _, boxes, bg = random_scene(9)
    feats, _, channel, masks = internals(features, weight, boxes, bg)
    classes = np.unique(boxes[:, 4])
    regions = torch.stack([masks[torch.as_tensor(boxes[:, 4] == c)].any(0) for c in classes])
    rng = np.random.default_rng(0)
    y_index = rng.integers(0, len(classes), (48, 64))  # class 9 (index 3) never occurs: uses w_9
    ids = np.concatenate([[0], classes])
    scores = retrieval_scores(feats, weight[torch.as_tensor(ids)], torch.as_tensor(y_index),
                              regions)
    expected = reference_retrieval(features, weight, boxes, ids[y_index])
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)


def test_labels_match_the_slow_reference_pipeline():
    features, weight, image, boxes, bg = random_scene(10, stride=4)
    y_crf, y_ret = make_pseudo_labels(features, weight, image, boxes, bg, 1, 0.99, CRF)
    probs = reference_unary(features, weight, boxes, bg, 1, 0.99, True)
    refined = CRF(image, probs.numpy())
    ids = np.concatenate([[0], np.unique(boxes[:, 4])])
    for k, c in enumerate(ids[1:], 1):
        refined[k] *= fill(boxes[boxes[:, 4] == c], 48, 64) == 0
    expected_crf = ids[refined.argmax(0)]
    expected_ret = ids[reference_retrieval(features, weight, boxes, expected_crf).argmax(0).numpy()]
    assert (y_crf == expected_crf).mean() > 0.999
    assert (y_ret == expected_ret).mean() > 0.999
    assert len(np.unique(y_crf)) > 2  # a non-trivial case


def check_invariants(y_crf, y_ret, boxes, height, width):
    outside = fill(boxes, height, width) == 1
    for y in (y_crf, y_ret):
        assert y.dtype == np.uint8 and y.shape == (height, width)
        assert (y[outside] == 0).all()
        assert set(np.unique(y)) <= {0, *boxes[:, 4].tolist()}
        for c in np.unique(y[y > 0]):
            in_class_box = fill(boxes[boxes[:, 4] == c], height, width) == 0
            assert in_class_box[y == c].all()


@pytest.mark.parametrize("seed,grid", [(11, 1), (12, 1), (14, 2)])
def test_labels_stay_in_their_boxes(seed, grid):
    features, weight, image, boxes, bg = random_scene(seed)
    y_crf, y_ret = make_pseudo_labels(features, weight, image, boxes, bg, grid, 0.99, CRF)
    check_invariants(y_crf, y_ret, boxes, 48, 64)
    assert len(np.unique(y_crf)) >= 3 and len(np.unique(y_ret)) >= 3  # not a trivial case


def object_scene(stride=1):
    """48×64 image; an ellipse of class 12 inside a larger box. Features (D=2): [1,0] on the object,
    [0,1] elsewhere; classifier row 12 = [1,0], background row = [0,1]."""
    height, width = 48, 64
    yy, xx = np.mgrid[:height, :width]
    obj = ((yy - 24) / 14) ** 2 + ((xx - 30) / 20) ** 2 <= 1
    feats = np.stack([obj, ~obj]).astype(np.float32)[:, ::stride, ::stride]
    weight = torch.zeros(21, 2)
    weight[0] = torch.tensor([0.0, 1.0])
    weight[12] = torch.tensor([1.0, 0.0])
    weight[1:12] = weight[13:] = torch.tensor([0.3, 0.3])
    image = np.where(obj[..., None], np.uint8([180, 60, 40]), np.uint8([40, 90, 160]))
    boxes = np.array([[4, 4, 58, 44, 12]])
    return torch.as_tensor(feats), weight, image.astype(np.uint8), boxes, obj


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_separating_features_recover_a_non_rectangular_object():
    features, weight, image, boxes, obj = object_scene()
    bg = fill(boxes, 48, 64)
    y_crf, y_ret = make_pseudo_labels(features, weight, image, boxes, bg, 1, 0.99, CRF)
    box = bg == 0
    assert iou(obj, box) < 0.7  # the box alone is a poor label
    assert iou(y_crf == 12, obj) > 0.98
    assert iou(y_ret == 12, obj) > 0.98
    check_invariants(y_crf, y_ret, boxes, 48, 64)


def test_use_u0_changes_labels_only_inside_boxes():
    features, weight, image, boxes, bg = random_scene(11)
    with_u0 = make_pseudo_labels(features, weight, image, boxes, bg, 1, 0.99, CRF)
    without = make_pseudo_labels(features, weight, image, boxes, bg, 1, 0.99, CRF, use_u0=False)
    outside = bg == 1
    for a, b in zip(with_u0, without):
        np.testing.assert_array_equal(a[outside], b[outside])
    assert (with_u0[0] != without[0]).any()
    check_invariants(*without, boxes, 48, 64)


def test_labels_are_deterministic():
    features, weight, image, boxes, bg = random_scene(14)
    first = make_pseudo_labels(features, weight, image, boxes, bg, 2, 0.99, CRF)
    second = make_pseudo_labels(features.clone(), weight.clone(), image.copy(), boxes.copy(),
                                bg.copy(), 2, 0.99, CRF)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_overlapping_boxes_of_different_classes():
    """Class 3 (a disc, left box) and class 7 (a square, right box); the boxes overlap and each
    object reaches into the overlap. D=3 features: [1,0,0] disc, [0,1,0] square, [0,0,1] rest."""
    height, width = 48, 64
    yy, xx = np.mgrid[:height, :width]
    disc = (yy - 24) ** 2 + (xx - 22) ** 2 <= 14 ** 2
    square = (yy >= 12) & (yy < 40) & (xx >= 33) & (xx < 56) & ~disc
    rest = ~disc & ~square
    features = torch.as_tensor(np.stack([disc, square, rest]).astype(np.float32))
    weight = torch.full((21, 3), 0.2)
    weight[0], weight[3], weight[7] = torch.eye(3)[2], torch.eye(3)[0], torch.eye(3)[1]
    image = np.select([disc[..., None], square[..., None]],
                      [np.uint8([200, 50, 50]), np.uint8([50, 200, 50])], np.uint8([40, 40, 160]))
    boxes = np.array([[6, 8, 40, 42, 3], [30, 10, 60, 44, 7]])
    bg = fill(boxes, height, width)
    y_crf, y_ret = make_pseudo_labels(features, weight, image.astype(np.uint8), boxes, bg, 1,
                                      0.99, CRF)
    check_invariants(y_crf, y_ret, boxes, height, width)
    overlap = (fill(boxes[:1], height, width) == 0) & (fill(boxes[1:], height, width) == 0)
    assert (disc & overlap).any() and (square & overlap).any()
    for y in (y_crf, y_ret):
        assert iou(y == 3, disc) > 0.95
        assert iou(y == 7, square) > 0.95
        assert (y[disc & overlap] == 3).mean() > 0.95 and (y[square & overlap] == 7).mean() > 0.95


def test_features_at_stride_eight_still_find_the_object():
    features, weight, image, boxes, obj = object_scene(stride=8)
    y_crf, y_ret = make_pseudo_labels(features, weight, image, boxes, fill(boxes, 48, 64), 1,
                                      0.99, CRF)
    assert iou(y_crf == 12, obj) > 0.9
    check_invariants(y_crf, y_ret, boxes, 48, 64)


def test_an_image_without_boxes_is_all_background():
    features, weight, image, _, _ = random_scene(15)
    for boxes in (np.zeros((0, 5), np.int64), []):
        y_crf, y_ret = make_pseudo_labels(features, weight, image, boxes,
                                          np.ones((48, 64), np.uint8), 1, 0.99, CRF)
        assert y_crf.dtype == np.uint8 and y_crf.shape == (48, 64)
        assert not y_crf.any() and not y_ret.any()


def test_input_errors():
    features, weight, image, boxes, bg = random_scene(16)
    with pytest.raises(ValueError, match=r"box classes \[2, 5, 9\] must lie in \[1, 8\]"):
        make_pseudo_labels(features, weight[:9], image, boxes, bg, 1, 0.99, CRF)
    with pytest.raises(ValueError, match="feature channels"):
        make_pseudo_labels(features[:5], weight, image, boxes, bg, 1, 0.99, CRF)
    with pytest.raises(ValueError, match="bg_mask"):
        make_pseudo_labels(features, weight, image, boxes, bg[:40], 1, 0.99, CRF)
    with pytest.raises(ValueError, match=r"\(K,5\)"):
        make_pseudo_labels(features, weight, image, boxes[:, :4], bg, 1, 0.99, CRF)


def test_box_scores_are_the_per_box_normalised_cam_and_leave_the_labels_unchanged():
    """box k's score = ReLU(w_c · F↑) / its maximum over box k, 0 outside box k; the two
    overlapping boxes of class 5 each get their own normalisation (no max over boxes here)."""
    features, weight, image, boxes, bg = random_scene(15)
    y_crf, y_ret, scores = make_pseudo_labels(features, weight, image, boxes, bg, 1, 0.99, CRF,
                                              return_box_scores=True)
    up = upsample(features, (48, 64))
    expected = np.zeros((len(boxes), 48, 64), np.float32)
    for k, (x1, y1, x2, y2, c) in enumerate(clipped(boxes)):
        cam = (weight[c][:, None, None] * up).sum(0).relu()[y1:y2, x1:x2]
        expected[k, y1:y2, x1:x2] = (cam / max(cam.max(), 1e-12)).numpy()
    assert scores.dtype == np.float32 and scores.shape == (4, 48, 64)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    peaks = scores.max((1, 2))  # 1, or 0 for a box whose CAM is 0 everywhere in it
    assert np.all(np.isclose(peaks, 1, atol=1e-5) | (peaks == 0)) and (peaks > 0).sum() >= 3
    labels = make_pseudo_labels(features, weight, image, boxes, bg, 1, 0.99, CRF)
    np.testing.assert_array_equal(labels[0], y_crf)
    np.testing.assert_array_equal(labels[1], y_ret)
    empty = make_pseudo_labels(features, weight, image, boxes[:0], bg * 0 + 1, 1, 0.99, CRF,
                               return_box_scores=True)
    assert empty[2].shape == (0, 48, 64) and not empty[0].any()
