import math

import pytest
import torch
import torch.nn as nn

from models.labeler import Labeler
from models.zoo import ModelSpec, build
from tests.test_pooling import (reference_background_attention, reference_background_prototypes,
                                reference_box_prototypes)
from utils.errors import BanaError


class _Identity(nn.Module):
    """A 'backbone' whose features are the input, to drive `Labeler.head` with chosen features."""

    def __init__(self, out_channels):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x):
        return x

    def new_modules(self):
        return []


def reference_head(labeler, features, boxes, bg_mask):
    """Plain loops: nearest mask, G×G background cells, per-pixel attention, per-box cells."""
    n, _, h, w = features.shape
    big_h, big_w = bg_mask.shape[2:]
    small = torch.zeros(n, 1, h, w, dtype=features.dtype)
    for i in range(n):
        for y in range(h):
            for x in range(w):
                small[i, 0, y, x] = bg_mask[i, 0, math.floor(y * big_h / h), math.floor(x * big_w / w)]
    protos, valid = reference_background_prototypes(features, small, labeler.grid_size)
    a_fg = 1 - reference_background_attention(features, protos, valid)
    for i in range(n):
        if labeler.pooling == "gap" or bg_mask[i].mean() <= labeler.bg_fraction_min:
            a_fg[i] = 1
    rows, targets = [], []
    cells = labeler.roi_size[0] * labeler.roi_size[1]
    for i, image_boxes in enumerate(boxes):
        for box in image_boxes:
            roi = torch.cat([torch.tensor([float(i)], dtype=box.dtype), box[:4]])[None]
            rows.append(reference_box_prototypes(features, a_fg, roi, labeler.roi_size,
                                                 (h / big_h, w / big_w)))
            targets += [int(box[4])] * cells
    for i in range(n):
        for j in range(protos.shape[1]):
            if valid[i, j]:
                rows.append(protos[i, j][None])
                targets.append(0)
    weight = labeler.classifier.weight[:, :, 0, 0]
    return torch.cat(rows) @ weight.T, torch.tensor(targets)


def _bg_mask_from_boxes(boxes, size, pad_from=None):
    """1 outside every box, 0 inside (rows y1:y2, cols x1:x2 truncated) and in the padding."""
    mask = torch.ones(1, *size, dtype=torch.float64)
    for x1, y1, x2, y2, _ in boxes.tolist():
        mask[0, int(y1):int(y2), int(x1):int(x2)] = 0
    if pad_from is not None:
        mask[0, pad_from:, :] = 0
    return mask


def _batch(seed):
    """Three images 70×85 (features 9×11): two normal, one with too little background."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(3, 6, 9, 11, generator=g, dtype=torch.float64)
    boxes = [
        torch.tensor([[3.3, 5.1, 40.7, 40.2, 4], [30.0, 20.0, 80.5, 66.0, 9]], dtype=torch.float64),
        torch.tensor([[2.0, 1.0, 83.0, 67.0, 1]], dtype=torch.float64),  # ≤ 1/8 background
        torch.tensor([[50.2, 3.9, 60.1, 30.3, 2]], dtype=torch.float64),
    ]
    bg_mask = torch.stack([_bg_mask_from_boxes(boxes[0], (70, 85)),
                           _bg_mask_from_boxes(boxes[1], (70, 85)),
                           _bg_mask_from_boxes(boxes[2], (70, 85), pad_from=55)])
    return features, boxes, bg_mask


@pytest.mark.parametrize("pooling", ["bap", "gap"])
def test_head_matches_slow_reference(pooling):
    torch.manual_seed(0)
    features, boxes, bg_mask = _batch(0)
    assert bg_mask[1].mean() <= 1 / 8 < min(bg_mask[0].mean(), bg_mask[2].mean())
    labeler = Labeler(5 + 6, _Identity(6), pooling=pooling, roi_size=(2, 3), grid_size=4,
                      roi_sampling="roi_align").double()
    logits, targets = labeler.head(features, boxes, bg_mask)
    expected_logits, expected_targets = reference_head(labeler, features, boxes, bg_mask)
    assert torch.equal(targets, expected_targets)
    assert torch.allclose(logits, expected_logits)


def test_targets_on_a_hand_built_batch():
    """Image 0: boxes of class 3 and 5; image 1: one box of class 7; ROI 2×2 -> 12 foreground
    rows [3]*4 + [5]*4 + [7]*4. G = 2 on 4×4 features (32×32 images, stride 8): image 0 has
    background only in its top-left 16×16 quarter (1 valid cell), image 1 everywhere but the
    bottom-right quarter (3 valid cells) -> 4 background rows of class 0."""
    features = torch.rand(2, 3, 4, 4)
    boxes = [torch.tensor([[16.0, 0.0, 32.0, 16.0, 3], [0.0, 16.0, 32.0, 32.0, 5]]),
             torch.tensor([[16.0, 16.0, 32.0, 32.0, 7]])]
    bg_mask = torch.zeros(2, 1, 32, 32)
    bg_mask[0, 0, :16, :16] = 1
    bg_mask[1, 0] = 1
    bg_mask[1, 0, 16:, 16:] = 0
    labeler = Labeler(8, _Identity(3), grid_size=2)
    logits, targets = labeler.head(features, boxes, bg_mask)
    assert targets.tolist() == [3] * 4 + [5] * 4 + [7] * 4 + [0] * 4
    assert logits.shape == (16, 8)
    # The first background row is image 0's top-left cell: the mean of its 2×2 features.
    q = features[0, :, :2, :2].mean((1, 2))
    assert torch.allclose(logits[12], labeler.classifier.weight[:, :, 0, 0] @ q, atol=1e-6)


def _orthogonal_batch():
    """64×64 images, 8×8 features: positive features inside the boxes, negative outside.

    The background prototypes are then negative vectors, whose cosine with any foreground
    feature is < 0, so A_bg = 0 (A_fg = 1) on every pixel a box on pixel edges pools.
    """
    g = torch.Generator().manual_seed(5)
    # Every ROI cell spans whole feature pixels (box sides of an even number of pixels).
    boxes = [torch.tensor([[8.0, 8.0, 40.0, 40.0, 2]]),
             torch.tensor([[16.0, 0.0, 64.0, 48.0, 6], [0.0, 40.0, 32.0, 56.0, 1]])]
    bg_mask = torch.stack([_bg_mask_from_boxes(b, (64, 64)).float() for b in boxes])
    small = bg_mask[:, :, ::8, ::8]
    features = torch.rand(2, 5, 8, 8, generator=g) + 0.1
    features = torch.where(small.bool(), -features, features)
    return features, boxes, bg_mask


def test_bap_equals_gap_when_background_attention_vanishes():
    """With roi_align the attention is taken at feature pixels, so features orthogonal to the
    background inside the boxes give A_fg = 1 exactly. (The reference resamples across the box
    edge and blends in background features; tests/test_reference_bap.py covers it.)"""
    features, boxes, bg_mask = _orthogonal_batch()
    assert (bg_mask.flatten(1).mean(1) > 1 / 8).all()
    bap = Labeler(7, _Identity(5), pooling="bap", roi_sampling="roi_align")
    gap = Labeler(7, _Identity(5), pooling="gap", roi_sampling="roi_align")
    gap.load_state_dict(bap.state_dict())
    bap_logits, bap_targets = bap.head(features, boxes, bg_mask)
    gap_logits, gap_targets = gap.head(features, boxes, bg_mask)
    assert torch.equal(bap_targets, gap_targets)
    assert torch.allclose(bap_logits, gap_logits, atol=1e-6)

    # Make one background pixel inside the first box look like background: BAP now discounts it.
    features[0, :, 2, 2] = -features[0, :, 2, 2]
    bap_logits, _ = bap.head(features, boxes, bg_mask)
    gap_logits, _ = gap.head(features, boxes, bg_mask)
    assert not torch.allclose(bap_logits[:4], gap_logits[:4], atol=1e-4)


def test_too_little_background_falls_back_to_gap():
    """Image 0's background is exactly 1/8 of the image (<= 1/8 -> GAP); image 1's is more."""
    torch.manual_seed(6)
    features = torch.randn(2, 4, 8, 8)
    boxes = [torch.tensor([[0.0, 8.0, 64.0, 64.0, 3]]), torch.tensor([[0.0, 16.0, 64.0, 64.0, 3]])]
    bg_mask = torch.stack([_bg_mask_from_boxes(b, (64, 64)).float() for b in boxes])
    assert bg_mask[0].mean() == 1 / 8
    bap = Labeler(4, _Identity(4), pooling="bap")
    gap = Labeler(4, _Identity(4), pooling="gap")
    gap.load_state_dict(bap.state_dict())
    bap_logits, _ = bap.head(features, boxes, bg_mask)
    gap_logits, _ = gap.head(features, boxes, bg_mask)
    assert torch.allclose(bap_logits[:4], gap_logits[:4])
    assert not torch.allclose(bap_logits[4:8], gap_logits[4:8], atol=1e-4)
    attention = bap.attention(features, bg_mask)
    assert torch.equal(attention[0], torch.ones(8, 8))


def test_foreground_attention_lies_in_unit_interval():
    for seed in range(5):
        torch.manual_seed(seed)
        features = torch.randn(3, 7, 10, 12)
        bg_mask = (torch.rand(3, 1, 80, 96) > 0.5).float()
        attention = Labeler(3, _Identity(7)).attention(features, bg_mask)
        assert attention.shape == (3, 10, 12)
        assert attention.min() >= 0 and attention.max() <= 1
        assert attention.min() < 0.99  # not the GAP fallback


def test_gradients_reach_the_backbone():
    torch.manual_seed(7)
    labeler = build(ModelSpec("labeler", "tiny", 5))
    images = torch.rand(2, 3, 64, 64) * 255
    boxes = [torch.tensor([[5.0, 9.0, 40.0, 50.0, 2]]), torch.tensor([[20.0, 20.0, 60.0, 44.0, 4]])]
    bg_mask = torch.stack([_bg_mask_from_boxes(b, (64, 64)).float() for b in boxes])
    logits, targets = labeler(images, boxes, bg_mask)
    nn.functional.cross_entropy(logits, targets).backward()
    first_conv = labeler.backbone.features[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert labeler.classifier.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("pooling", ["bap", "gap"])
def test_gradient_flows_through_the_attention(pooling):
    """Foreground logits depend on far-away background pixels only through A_fg (via the
    background prototypes), so those pixels get a gradient with BAP and none with GAP."""
    torch.manual_seed(8)
    features = torch.randn(1, 4, 12, 12, requires_grad=True)
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 32.0, 1]])]  # feature pixels 0..3
    bg_mask = _bg_mask_from_boxes(boxes[0], (96, 96)).float()[None]
    logits, _ = Labeler(3, _Identity(4), pooling=pooling).head(features, boxes, bg_mask)
    logits[:4].sum().backward()
    far = features.grad[0, :, 6:, 6:]
    assert (far.abs().sum() > 0) == (pooling == "bap")


def test_labeler_construction():
    labeler = build(ModelSpec("labeler", "tiny", 21))
    assert labeler.classifier.weight.shape == (21, 128, 1, 1) and labeler.classifier.bias is None
    assert 0.005 < labeler.classifier.weight.std() < 0.015
    assert labeler.new_modules() == [labeler.classifier]
    with pytest.raises(BanaError, match="MODEL.POOLING"):
        Labeler(21, labeler.backbone, pooling="max")
