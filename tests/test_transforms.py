"""TrainTransform keeps boxes, bg masks and labels aligned with the image."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data.transforms import MEAN_RGB, TrainTransform
from utils.boxes import bg_mask_from_boxes


@st.composite
def scenes(draw):
    """An image with 1–4 integer boxes; label channel k paints box k (class k + 1) with 1."""
    height = draw(st.integers(12, 60))
    width = draw(st.integers(12, 60))
    boxes = []
    for k in range(draw(st.integers(1, 4))):
        x1 = draw(st.integers(0, width - 1))
        y1 = draw(st.integers(0, height - 1))
        x2 = draw(st.integers(x1 + 1, width))
        y2 = draw(st.integers(y1 + 1, height))
        boxes.append((x1, y1, x2, y2, k + 1))
    boxes = np.asarray(boxes, np.float32)
    label = np.zeros((len(boxes), height, width), np.int64)
    for k, (x1, y1, x2, y2, _) in enumerate(boxes.astype(int)):
        label[k, y1:y2, x1:x2] = 1
    sample = {
        "id": "scene",
        "image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8),
        "boxes": torch.from_numpy(boxes),
        "bg_mask": torch.from_numpy(bg_mask_from_boxes(boxes, height, width))[None],
        "label": torch.from_numpy(label),
    }
    crop = (draw(st.integers(8, 64)), draw(st.integers(8, 64)))
    return sample, crop, draw(st.integers(0, 2**31 - 1))


def _extent(channel: np.ndarray):
    """(x1, y1, x2, y2) pixel-edge box around the pixels equal to 1, or None."""
    rows, cols = np.nonzero(channel == 1)
    if rows.size == 0:
        return None
    return cols.min(), rows.min(), cols.max() + 1, rows.max() + 1


@settings(max_examples=60, deadline=None)
@given(scenes())
def test_boxes_follow_the_painted_regions_under_scale_crop_flip(scene):
    sample, crop, seed = scene
    # Pixel-edge boxes follow the painted pixels exactly; the authors' arithmetic (the default)
    # departs from them by design: tests/test_authors_recipe.py.
    transform = TrainTransform(crop, scale_range=(0.5, 1.5), color_jitter=(0.5, 0.5, 0.5, 0.0),
                               generator=torch.Generator().manual_seed(seed),
                               box_arithmetic="pixel_edges")
    out = transform(sample)
    label, bg = out["label"].numpy(), out["bg_mask"][0].numpy()
    assert out["image"].shape == (3, *crop) and out["image"].dtype == torch.uint8
    assert label.shape == (len(sample["boxes"]), *crop) and bg.shape == crop

    survivors = {int(c): box for *box, c in out["boxes"].tolist()}
    for k in range(label.shape[0]):
        extent = _extent(label[k])
        if k + 1 in survivors:
            x1, y1, x2, y2 = survivors[k + 1]
            if extent is None:
                # the reference keeps thin boxes: one under a pixel may cover no mask pixel
                assert min(x2 - x1, y2 - y1) < 1
            else:
                # nearest masks and scaled boxes agree up to the pixel grid: within 1 px
                assert np.allclose(extent, survivors[k + 1], atol=1.0), (extent, survivors[k + 1])
        elif extent is not None:
            # a dropped box leaves at most a sliver under 1 px of box size
            assert min(extent[2] - extent[0], extent[3] - extent[1]) <= 1

    # The bg mask went through the same geometry as the boxes' painted channels.
    in_any = (label == 1).any(0)
    assert np.array_equal(bg == 0, in_any)
    assert np.array_equal(bg == 255, (label == 255).all(0))
    outside = np.ones(crop, bool)
    for x1, y1, x2, y2 in survivors.values():
        outside[max(0, int(y1) - 1):int(np.ceil(y2)) + 1, max(0, int(x1) - 1):int(np.ceil(x2)) + 1] = False
    slivers = np.zeros(crop, bool)
    for k in range(label.shape[0]):
        if k + 1 not in survivors:
            slivers |= label[k] == 1
    assert np.isin(bg[outside & ~slivers], (1, 255)).all()


def test_padding_is_centred_with_the_fill_colour_and_ignore_for_masks():
    """10×12 into a 16×20 crop: ceil(6/2) = 3 rows above and below, ceil(8/2) = 4 columns left
    and right (the authors' centred padding); the crop offset floor(u · 0) is 0, so the image
    sits at rows 3..12, columns 4..15 and the box moves by (4, 3)."""
    image = torch.randint(0, 256, (3, 10, 12), dtype=torch.uint8)
    sample = {"image": image, "boxes": torch.tensor([[1.0, 2.0, 5.0, 6.0, 3.0]]),
              "bg_mask": torch.ones(1, 10, 12, dtype=torch.uint8),
              "label": torch.zeros(2, 10, 12, dtype=torch.int64)}
    out = TrainTransform((16, 20), scale_range=(1.0, 1.0), flip=False, color_jitter=(0, 0, 0, 0))(sample)
    mean = torch.tensor(MEAN_RGB, dtype=torch.uint8)[:, None, None]
    assert torch.equal(out["image"][:, 3:13, 4:16], image)
    for region in ((slice(None), slice(0, 3)), (slice(None), slice(13, 16)),
                   (slice(0, 16), slice(0, 4)), (slice(0, 16), slice(16, 20))):
        rows, cols = region if region[0] != slice(None) else (region[1], slice(None))
        assert (out["image"][:, rows, cols] == mean).all()
    assert (out["bg_mask"][:, 3:13, 4:16] == 1).all() and (out["bg_mask"][:, :3] == 255).all()
    assert (out["bg_mask"][:, :, :4] == 255).all() and (out["bg_mask"][:, 13:] == 255).all()
    assert (out["label"][:, :, 16:] == 255).all() and out["label"].dtype == torch.int64
    assert torch.equal(out["boxes"], torch.tensor([[5.0, 5.0, 9.0, 9.0, 3.0]]))


def test_odd_padding_pads_one_more_and_the_offset_stays_in_range():
    """2×2 into 3×3: diff 1 -> 1 pixel on each side (4×4), offset floor(u · 1) = 0 always."""
    sample = {"image": torch.full((3, 2, 2), 7, dtype=torch.uint8)}
    for seed in range(5):
        out = TrainTransform(3, scale_range=(1.0, 1.0), flip=False, color_jitter=(0, 0, 0, 0),
                             generator=torch.Generator().manual_seed(seed))(sample)
        assert (out["image"][:, 1:3, 1:3] == 7).all() and (out["image"][:, 0, :] != 7).all()


def test_thin_boxes_are_kept_and_boxes_outside_dropped():
    sample = {"image": torch.zeros(3, 20, 20, dtype=torch.uint8),
              "boxes": torch.tensor([[3.0, 3.0, 3.4, 15.0, 1.0], [5.0, 5.0, 6.0, 6.0, 2.0]])}
    out = TrainTransform(20, scale_range=(1.0, 1.0), flip=False, color_jitter=(0, 0, 0, 0))(sample)
    assert out["boxes"][:, 4].tolist() == [1.0, 2.0]


def test_float_fill_is_rounded_not_truncated():
    sample = {"image": torch.zeros(3, 2, 2, dtype=torch.uint8)}
    out = TrainTransform(3, scale_range=(1.0, 1.0), flip=False, color_jitter=(0, 0, 0, 0),
                         fill=(122.675, 116.669, 104.008))(sample)
    assert out["image"][:, 0, 0].tolist() == [123, 117, 104]


def test_colour_jitter_runs_after_the_crop_in_a_fixed_order():
    """Contrast after brightness: the same factors applied to the crop in that order, padding
    included (the crop's mean grey, not the original image's, drives contrast)."""
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (3, 6, 6), dtype=torch.uint8)
    t = TrainTransform(10, scale_range=(1.0, 1.0), flip=False, color_jitter=(0.5, 0.5, 0.5, 0.0),
                       generator=g)
    out = t({"image": image})["image"]
    g2 = torch.Generator().manual_seed(3)
    torch.rand((), generator=g2)  # scale
    # no pad offsets drawn for room 0 beyond two uniforms (rows, cols)
    torch.rand((), generator=g2)
    torch.rand((), generator=g2)
    factors = [0.5 + torch.rand((), generator=g2).item() for _ in range(3)]
    padded = TF.pad(image, [2, 2, 2, 2], fill=list(MEAN_RGB))
    expected = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(
        padded, factors[0]), factors[1]), factors[2])
    assert torch.equal(out, expected)


def test_flip_mirrors_image_masks_and_boxes():
    image = torch.randint(0, 256, (3, 8, 10), dtype=torch.uint8)
    sample = {"image": image, "boxes": torch.tensor([[1.0, 2.0, 4.0, 7.0, 5.0]]),
              "bg_mask": torch.from_numpy(bg_mask_from_boxes([[1, 2, 4, 7]], 8, 10))[None]}
    seen = set()
    for seed in range(20):
        transform = TrainTransform((8, 10), scale_range=(1.0, 1.0), color_jitter=(0, 0, 0, 0),
                                   generator=torch.Generator().manual_seed(seed))
        out = transform(sample)
        flipped = not torch.equal(out["image"], image)
        seen.add(flipped)
        if flipped:
            assert torch.equal(out["image"], image.flip(-1))
            assert torch.equal(out["bg_mask"], sample["bg_mask"].flip(-1))
            # x1' = W - x2 = 10 - 4, x2' = W - x1 = 10 - 1
            assert out["boxes"].tolist() == [[6.0, 2.0, 9.0, 7.0, 5.0]]
        else:
            assert torch.equal(out["boxes"], sample["boxes"])
    assert seen == {True, False}


def test_boxes_outside_the_crop_are_dropped_with_their_class():
    # Scale 1, crop 10x10 from a 10x40 image: at most one of the far-apart boxes survives.
    sample = {"image": torch.zeros(3, 10, 40, dtype=torch.uint8),
              "boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0, 1.0], [30.0, 2.0, 38.0, 9.0, 2.0]])}
    classes_seen = set()
    for seed in range(30):
        # Clipped to [0, 10] as pixel edges; the authors' x2 = 11 is tested in
        # tests/test_authors_recipe.py.
        out = TrainTransform(10, scale_range=(1.0, 1.0), flip=False, color_jitter=(0, 0, 0, 0),
                             generator=torch.Generator().manual_seed(seed),
                             box_arithmetic="pixel_edges")(sample)
        boxes = out["boxes"]
        assert boxes.shape[1] == 5 and len(boxes) <= 1
        assert (boxes[:, [0, 2]] >= 0).all() and (boxes[:, [0, 2]] <= 10).all()
        assert ((boxes[:, 2] - boxes[:, 0]) >= 1).all()
        classes_seen.update(boxes[:, 4].tolist())
    assert classes_seen == {1.0, 2.0}


def test_same_seed_same_output_and_global_rng_is_used():
    sample = {"image": torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8),
              "boxes": torch.tensor([[3.0, 4.0, 20.0, 25.0, 7.0]]),
              "bg_mask": torch.ones(1, 30, 40, dtype=torch.uint8)}
    transform = TrainTransform(24, color_jitter=(0.5, 0.5, 0.5, 0.1))
    torch.manual_seed(3)
    first = transform(sample)
    torch.manual_seed(3)
    second = transform(sample)
    third = transform(sample)
    for key in ("image", "boxes", "bg_mask"):
        assert torch.equal(first[key], second[key])
    assert not torch.equal(first["image"], third["image"])


def test_colour_jitter_changes_the_image_only():
    sample = {"image": torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8),
              "bg_mask": torch.ones(1, 16, 16, dtype=torch.uint8)}
    out = TrainTransform(16, scale_range=(1.0, 1.0), flip=False, color_jitter=(0.5, 0.5, 0.5, 0.0),
                         generator=torch.Generator().manual_seed(0))(sample)
    assert not torch.equal(out["image"], sample["image"])
    assert torch.equal(out["bg_mask"], sample["bg_mask"])


def test_crop_size_must_fit_in_a_sample_without_boxes():
    out = TrainTransform(5, scale_range=(0.5, 0.5))({"image": torch.zeros(3, 4, 4, dtype=torch.uint8)})
    assert out["image"].shape == (3, 5, 5) and "boxes" not in out


@pytest.mark.parametrize("crop", [7, (7, 9)])
def test_crop_size_int_or_pair(crop):
    out = TrainTransform(crop)({"image": torch.zeros(3, 20, 20, dtype=torch.uint8)})
    assert out["image"].shape[-2:] == ((7, 7) if crop == 7 else (7, 9))
