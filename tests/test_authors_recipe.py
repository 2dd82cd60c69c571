"""The authors' recipe where it is arithmetic: optimiser groups, box coordinates, their released
files (GitHub issue 23). Expected numbers are computed by hand from the authors' formulas; each
docstring gives the derivation."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import load_config
from engine.optim import (AUTHORS_PARAM_GROUPS, make_optimizer, network_groups,
                          param_group_scheme)
from models.backbones import BACKBONES
from models.zoo import ModelSpec, build
from utils.errors import BanaError

REPO = Path(__file__).resolve().parents[1]

ROOT = Path(__file__).resolve().parents[1]


def _optimizer(config: str, *opts: str, kind: str = "deeplab"):
    """The optimiser and scheduler the stage's `configure_optimizers` makes for an untrained
    network of `config` (with `--opts`), and the network."""
    from engine.stage1 import Stage1LitModule
    from engine.stage3 import Stage3LitModule

    cfg = load_config(ROOT / config, list(opts))
    spec = ModelSpec(kind, cfg.MODEL.BACKBONE, num_classes=cfg.DATA.NUM_CLASSES,
                     fc6_dilation=cfg.MODEL.FC6_DILATION, frozen_bn=cfg.MODEL.FREEZE_BN)
    net = build(spec, "none")
    lit = (Stage3LitModule if kind == "deeplab" else Stage1LitModule)(net, cfg)
    out = lit.configure_optimizers()
    return out["optimizer"], out["lr_scheduler"]["scheduler"], net


def _ids(params):
    return {id(p) for p in params}


# ---------------------------------------------------------------------------------------------
# Item 2: SGD parameter groups

def test_resnet101_trains_in_the_authors_two_groups():
    """configs/stage3_res.yml (DeepLab-V2, LR 2.5e-4, WEIGHT_DECAY 5e-4), as the authors'
    `DeepLab_ASPP.get_1x_lr_params` / `get_10x_lr_params`:

    - 1x: every parameter of the ResNet-101 body. Its convolutions: the stem's 1, three per
      bottleneck over 3 + 4 + 23 + 3 = 33 bottlenecks = 99, one projection shortcut per layer = 4:
      104 convolutions, each followed by a BatchNorm with a weight and a bias, so 104 + 2 * 104
      = 312 tensors; lr = 2.5e-4, decay 5e-4 (BatchNorm too).
    - 10x: DeepLab-V2's four dilated 3x3 convolutions 2048 -> 256 (no bias) and the 1x1
      classifier 256 -> 21 (no bias): 5 tensors, 4 * 256 * 2048 * 9 + 21 * 256 = 18,874,368 +
      5,376 = 18,879,744 numbers; lr = 10 * 2.5e-4 = 2.5e-3, decay 5e-4.
    - Poly schedule with MAX_ITER 4: after 2 steps both are scaled by (1 - 2/4)^0.9 = 2^-0.9 =
      0.5358867312681466: 1.339716828e-4 and 1.339716828e-3.
    """
    optimizer, scheduler, net = _optimizer("configs/stage3_res.yml", "SOLVER.MAX_ITER", "4")
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["1x", "10x"]
    one, ten = groups["1x"], groups["10x"]
    assert (one["lr"], one["weight_decay"]) == pytest.approx((2.5e-4, 5e-4), rel=1e-12)
    assert (ten["lr"], ten["weight_decay"]) == pytest.approx((2.5e-3, 5e-4), rel=1e-12)
    assert len(one["params"]) == 312
    assert _ids(one["params"]) == _ids(net.backbone.body.parameters())
    bn = [m for m in net.backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn) == 104 and _ids(p for m in bn for p in m.parameters()) <= _ids(one["params"])
    assert len(ten["params"]) == 5 and sum(p.numel() for p in ten["params"]) == 18_879_744
    assert _ids(ten["params"]) == _ids([*net.backbone.head.parameters(), net.classifier.weight])
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    assert one["lr"] == pytest.approx(1.339716828e-4, rel=1e-9)
    assert ten["lr"] == pytest.approx(1.339716828e-3, rel=1e-9)


def test_two_groups_leave_frozen_batchnorm_out():
    """MODEL.FREEZE_BN true stops BatchNorm's gradients: the 1x group keeps the 104 convolution
    weights of the body (see above) and nothing else."""
    optimizer, _, net = _optimizer("configs/stage3_res.yml", "MODEL.FREEZE_BN", "true")
    one = next(g for g in optimizer.param_groups if g["name"] == "1x")
    convs = [m.weight for m in net.backbone.body.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(one["params"]) == 104 and _ids(one["params"]) == _ids(convs)


def test_vgg16_keeps_the_four_groups_exactly():
    """configs/stage3_vgg.yml (LR 1e-3, WEIGHT_DECAY 5e-4), as the authors' `get_params`: the 13
    convolutions plus fc6 and fc7 are pretrained, 15 weights at 1e-3 with decay and 15 biases at
    2 * 1e-3 = 2e-3 without; the classifier (no bias) is new, 10 * 1e-3 = 1e-2 with decay. No
    new bias exists, so there is no 20x group."""
    optimizer, _, net = _optimizer("configs/stage3_vgg.yml")
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["pw", "pb", "nw"]
    expected = {"pw": (1e-3, 5e-4, 15), "pb": (2e-3, 0.0, 15), "nw": (1e-2, 5e-4, 1)}
    for name, (lr, wd, count) in expected.items():
        assert (groups[name]["lr"], groups[name]["weight_decay"]) == pytest.approx((lr, wd))
        assert len(groups[name]["params"]) == count
    assert groups["nw"]["params"] == [net.classifier.weight]
    assert _ids(groups["pb"]["params"]) == _ids(p for n, p in net.backbone.named_parameters()
                                                 if n.endswith("bias"))


def test_tiny_keeps_four_groups_so_the_demo_does_not_move():
    """configs/demo: auto resolves to four for tiny in stage 1 and stage 3; the groups are the
    ones `four` makes, parameter for parameter (LR 0.01: 0.01, 0.02, 0.1)."""
    for config, kind in (("configs/demo/stage1.yml", "labeler"),
                         ("configs/demo/stage3.yml", "deeplab")):
        auto, _, net = _optimizer(config, kind=kind)
        cfg = load_config(ROOT / config, ["SOLVER.PARAM_GROUPS", "four"])
        four = make_optimizer(network_groups(net.backbone, [net.classifier], cfg.SOLVER, "tiny"),
                              cfg.SOLVER)["optimizer"]
        assert [(g["name"], g["lr"], g["weight_decay"], _ids(g["params"]))
                for g in auto.param_groups] == \
            [(g["name"], g["lr"], g["weight_decay"], _ids(g["params"])) for g in four.param_groups]
        assert [g["name"] for g in auto.param_groups] == ["pw", "pb", "nw"]
        assert [g["lr"] for g in auto.param_groups] == pytest.approx([0.01, 0.02, 0.1])


def test_the_key_overrides_the_backbone_default():
    """`four` on ResNet-101: its BatchNorm biases (104, see above) become pretrained biases at
    2 * 2.5e-4 = 5e-4 without decay. `two` on VGG-16: its 30 pretrained tensors at 1e-3, the
    classifier at 1e-2, all with decay 5e-4."""
    optimizer, _, _ = _optimizer("configs/stage3_res.yml", "SOLVER.PARAM_GROUPS", "four")
    pb = next(g for g in optimizer.param_groups if g["name"] == "pb")
    assert len(pb["params"]) == 104 and (pb["lr"], pb["weight_decay"]) == pytest.approx((5e-4, 0))
    optimizer, _, _ = _optimizer("configs/stage3_vgg.yml", "SOLVER.PARAM_GROUPS", "two")
    assert [(g["name"], len(g["params"])) for g in optimizer.param_groups] == \
        [("1x", 30), ("10x", 1)]
    assert [v for g in optimizer.param_groups for v in (g["lr"], g["weight_decay"])] == \
        pytest.approx([1e-3, 5e-4, 1e-2, 5e-4])


def test_every_backbone_has_the_authors_scheme_and_the_shipped_configs_use_it():
    assert set(AUTHORS_PARAM_GROUPS) == set(BACKBONES)
    assert {b: param_group_scheme("auto", b) for b in BACKBONES} == {
        "vgg16": "four", "tiny": "four", "resnet101": "two", "resnet101_torchvision": "two"}
    with pytest.raises(BanaError, match="AUTHORS_PARAM_GROUPS"):
        param_group_scheme("auto", "a_new_backbone")
    resolved = {name: param_group_scheme(cfg.SOLVER.PARAM_GROUPS, cfg.MODEL.BACKBONE)
                for name in ("stage1.yml", "stage3_vgg.yml", "stage3_res.yml")
                for cfg in [load_config(ROOT / "configs" / name)]}
    assert resolved == {"stage1.yml": "four", "stage3_vgg.yml": "four", "stage3_res.yml": "two"}


# ---------------------------------------------------------------------------------------------
# Item 3: box arithmetic (DATA.BOX_ARITHMETIC)

def test_stage2_boxes_take_the_authors_float32_round_trip():
    """Their `Normalize_Caffe` stores x_n = fl(fl(x / h) - 1) in float32 (h = (W-1)/2, exact
    in float32), their stage2.py computes fl(fl(x_n * h) + h) in float32 and truncates. fl
    rounds to the nearest float32 (ties to even); [a, b) names the binade, ulp its spacing.

    W = 14, h = 6.5, x = 3 -> 2:
      3 / 6.5 = 0.4615384615..., [1/4, 1/2), ulp 2^-25: * 2^25 = 15486660.92 -> 15486661 * 2^-25
      - 1 = -18067771 * 2^-25, [1/2, 1), ulp 2^-24: 9033885.5, a tie -> even -9033886 * 2^-24
      * 6.5 = -58720259 * 2^-24 = -3.49999994, [2, 4), ulp 2^-22: 14680064.75 -> -14680065 * 2^-22
      + 6.5 = 3 - 2^-22 = 2.99999976 (exact) -> truncated: 2.
    W = 14, x = 10 stays 10:
      10 / 6.5 = 1.538461..., [1, 2), ulp 2^-23: 12905550.77 -> 12905551 * 2^-23
      - 1 = 9033886 * 2^-24 (exact), * 6.5 = 58720259 * 2^-24 -> 14680065 * 2^-22 = 3.50000024
      + 6.5 = 10.00000024, [8, 16), ulp 2^-20: 10485760.25 -> 10485760 * 2^-20 = 10.0 -> 10.
    W = 500, h = 249.5, x = 30 -> 29:
      30 / 249.5 = 0.1202404809..., [1/16, 1/8), ulp 2^-27: 16138404.17 -> 16138404 * 2^-27
      - 1 = -118079324 * 2^-27 = -14759915.5 * 2^-24, a tie -> even -14759916 * 2^-24
      * 249.5 = -219.50002, [128, 256), ulp 2^-16: -14385152.51 -> -14385153 * 2^-16
      + 249.5 = 15728632 * 2^-19 = 30 - 2^-16 (exact) -> 29.
    W = 500, x = 400 stays 400:
      400 / 249.5 = 1.6032064..., ulp 2^-23: 13448670.14 -> 6724335 * 2^-22
      - 1 = 10120124 * 2^-24 (exact), * 249.5 = 150.4999958, ulp 2^-16: 9863167.73 -> 9863168
      * 2^-16 = 150.5, + 249.5 = 400 (exact) -> 400.
    H = 375, h = 187, y = 65 -> 64:
      65 / 187 = 0.3475935828..., ulp 2^-25: 11663305.24 -> 11663305 * 2^-25
      - 1 = -21891127 * 2^-25 = -10945563.5 * 2^-24, a tie -> even -10945564 * 2^-24
      * 187 = -121.99999, [64, 128), ulp 2^-17: -15990784.91 -> -15990785 * 2^-17
      + 187 = (65 * 2^17 - 1) * 2^-17 = 65 - 2^-17 (exact) -> 64.
    The class column is truncated with them. pixel_edges truncates the coordinates as they are.
    """
    from engine.stage2 import box_pixels

    small = [[3.0, 3.0, 10.0, 10.0, 7.0]]
    assert box_pixels(small, 14, 14, "reference").tolist() == [[2, 2, 10, 10, 7]]
    assert box_pixels(small, 14, 14, "pixel_edges").tolist() == [[3, 3, 10, 10, 7]]
    voc = [[30.0, 65.0, 400.0, 65.0, 15.0]]  # H = 375, W = 500
    assert box_pixels(voc, 375, 500, "reference").tolist() == [[29, 64, 400, 64, 15]]
    assert box_pixels(voc, 375, 500, "pixel_edges").tolist() == [[30, 65, 400, 65, 15]]
    assert box_pixels(voc, 375, 500, "reference").dtype.name == "int64"


def test_stage2_records_the_box_arithmetic_and_refuses_to_mix_old_labels(tmp_path):
    """Labels written before the key existed truncated the boxes as they are (pixel_edges): a
    rerun into their folder under the new default would mix two arithmetics, so it is refused,
    naming the key and both values."""
    import json

    from engine.stage2 import check_label_record, labelling_record

    weights = tmp_path / "final.ckpt"
    weights.write_bytes(b"a stage-1 model")
    cfg = load_config(ROOT / "configs/stage2.yml", [
        "DATA.ROOT", str(tmp_path / "voc"), "MODEL.WEIGHTS", str(weights)])
    assert labelling_record(cfg)["DATA.BOX_ARITHMETIC"] == "reference"
    old = {k: v for k, v in labelling_record(cfg).items() if k != "DATA.BOX_ARITHMETIC"}
    folder = cfg.pseudo_label_dir
    (folder / "Y_crf").mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps(old))
    with pytest.raises(BanaError, match=r"DATA.BOX_ARITHMETIC: 'pixel_edges' recorded, "
                                        r"'reference' now"):
        check_label_record(cfg, overwrite=False)
    cfg.DATA.BOX_ARITHMETIC = "pixel_edges"
    check_label_record(cfg, overwrite=False)


def _transform(crop, scale, arithmetic, flip=False, seed=0):
    from data.transforms import TrainTransform

    return TrainTransform(crop, scale_range=(scale, scale), flip=flip, color_jitter=(0, 0, 0, 0),
                          generator=torch.Generator().manual_seed(seed),
                          box_arithmetic=arithmetic)


def _sample(height, width, boxes):
    return {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(1)),
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "bg_mask": torch.ones(1, height, width, dtype=torch.uint8)}


def test_a_box_reaching_the_crop_edge_ends_one_past_it():
    """Their `clip_bbox` with the crop window [left, left + crop) sets x2 >= left + crop to
    crop + 1 (and y2 alike); their `RandomHFlip`, after the crop, mirrors about crop / 2:
    x1' = crop - x2, x2' = crop - x1.

    8 x 8 image, scale 1, crop 8: no padding, offset floor(u * 0) = 0. Box (2, 3, 8, 8):
    x2 = 8 >= 0 + 8 -> 9, y2 -> 9: (2, 3, 9, 9). Flipped: x1' = 8 - 9 = -1, x2' = 8 - 2 = 6:
    (-1, 3, 6, 9). Pixel edges: (2, 3, 8, 8), flipped (0, 3, 6, 8).
    20 x 20 image, crop 8, box (0, 0, 20, 20): whatever the offsets (0..12), x1 = 0 (either
    below the window or at its start) and x2 = 20 >= left + 8 -> 9: (0, 0, 9, 9).
    """
    sample = _sample(8, 8, [[2, 3, 8, 8, 4]])
    assert _transform(8, 1.0, "reference")(sample)["boxes"].tolist() == [[2, 3, 9, 9, 4]]
    assert _transform(8, 1.0, "pixel_edges")(sample)["boxes"].tolist() == [[2, 3, 8, 8, 4]]
    seen = set()
    for seed in range(12):
        ref = _transform(8, 1.0, "reference", flip=True, seed=seed)(sample)
        edges = _transform(8, 1.0, "pixel_edges", flip=True, seed=seed)(sample)
        flipped = torch.equal(ref["image"], sample["image"].flip(-1))
        seen.add(flipped)
        assert torch.equal(ref["image"], edges["image"])
        expected = ([[-1, 3, 6, 9, 4]], [[0, 3, 6, 8, 4]]) if flipped else \
            ([[2, 3, 9, 9, 4]], [[2, 3, 8, 8, 4]])
        assert (ref["boxes"].tolist(), edges["boxes"].tolist()) == expected
    assert seen == {True, False}
    whole = _sample(20, 20, [[0, 0, 20, 20, 1]])
    for seed in range(8):
        assert _transform(8, 1.0, "reference", seed=seed)(whole)["boxes"].tolist() == \
            [[0, 0, 9, 9, 1]]


def test_a_rescaled_box_is_scaled_by_the_drawn_factor():
    """Their `RandomScale` multiplies the box by s (float32) while cv2 resizes the image to
    round(side * s) pixels. 10 x 10 image, s = 0.75 (exact in float32): the image becomes
    round(7.5) = 8 pixels wide (ties to even), which the crop 8 takes whole (no padding, offset
    0).
    Box (2, 4, 6, 8) -> (1.5, 3, 4.5, 6); pixel edges scale by 8 / 10 = 0.8: (1.6, 3.2, 4.8, 6.4).
    Box (2, 4, 10, 10) -> (1.5, 3, 7.5, 7.5): 7.5 < 8 is not clipped, the box stops half a pixel
    short of the image's edge; pixel edges: (1.6, 3.2, 8, 8)."""
    sample = _sample(10, 10, [[2, 4, 6, 8, 3], [2, 4, 10, 10, 5]])
    ref = _transform(8, 0.75, "reference")(sample)
    edges = _transform(8, 0.75, "pixel_edges")(sample)
    assert ref["image"].shape == (3, 8, 8) and torch.equal(ref["image"], edges["image"])
    assert ref["boxes"].tolist() == [[1.5, 3.0, 4.5, 6.0, 3.0], [1.5, 3.0, 7.5, 7.5, 5.0]]
    assert edges["boxes"].flatten().tolist() == pytest.approx(
        [1.6, 3.2, 4.8, 6.4, 3.0, 1.6, 3.2, 8.0, 8.0, 5.0], abs=1e-6)


def test_padding_shifts_the_box_and_a_box_outside_the_crop_is_dropped():
    """6 x 6 image into crop 8: diff 2, padding ceil(2 / 2) = 1 on each side, offset 0. Box
    (1, 1, 6, 6) -> (2, 2, 7, 7): 7 < 8, not clipped.
    8 x 24 image, crop 8, scale 1, box (20, 0, 24, 8): the offset is left = floor(u * 16). The
    box meets the window [left, left + 8) when x1 = 20 < left + 8, i.e. left >= 13: then x1 =
    20 - left, x2 = 24 >= left + 8 -> 9, y2 = 8 >= 8 -> 9. Otherwise `clip_bbox` drops it with
    its class. (Column j of the image holds the value j, so the crop shows `left`.)"""
    padded = _transform(8, 1.0, "reference")(_sample(6, 6, [[1, 1, 6, 6, 2]]))
    assert padded["boxes"].tolist() == [[2, 2, 7, 7, 2]]
    sample = _sample(8, 24, [[20, 0, 24, 8, 6]])
    sample["image"] = torch.arange(24, dtype=torch.uint8).expand(3, 8, 24).clone()
    kept = set()
    for seed in range(40):
        out = _transform(8, 1.0, "reference", seed=seed)(sample)
        left = int(out["image"][0, 0, 0])
        kept.add(left >= 13)
        expected = [[20 - left, 0, 9, 9, 6]] if left >= 13 else []
        assert out["boxes"].tolist() == expected, left
    assert kept == {True, False}


@st.composite
def _scenes(draw):
    """An image with 1-4 integer boxes, a crop size and a seed."""
    height, width = draw(st.integers(6, 40)), draw(st.integers(6, 40))
    boxes = []
    for k in range(draw(st.integers(1, 4))):
        x1, y1 = draw(st.integers(0, width - 1)), draw(st.integers(0, height - 1))
        boxes.append([x1, y1, draw(st.integers(x1 + 1, width)), draw(st.integers(y1 + 1, height)),
                      k + 1])
    crop = (draw(st.integers(4, 40)), draw(st.integers(4, 40)))
    return _sample(height, width, boxes), crop, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=80, deadline=None)
@given(_scenes())
def test_at_scale_one_the_two_arithmetics_differ_only_at_the_far_edges(scene):
    """At scale 1 with integer boxes, the authors' boxes are the pixel-edge ones except where a
    pixel-edge box ends at the crop's far edge: x2 = crop_w (y2 = crop_h) is crop + 1 in theirs,
    and after a flip that edge is x1 = 0 in pixel edges, -1 in theirs. The same boxes are kept,
    and the image and masks are identical."""
    sample, (crop_h, crop_w), seed = scene
    ref = _transform((crop_h, crop_w), 1.0, "reference", flip=True, seed=seed)(sample)
    edges = _transform((crop_h, crop_w), 1.0, "pixel_edges", flip=True, seed=seed)(sample)
    assert torch.equal(ref["image"], edges["image"])
    assert torch.equal(ref["bg_mask"], edges["bg_mask"])
    assert ref["boxes"][:, 4].tolist() == edges["boxes"][:, 4].tolist()
    flipped = not torch.equal(
        _transform((crop_h, crop_w), 1.0, "pixel_edges", flip=False, seed=seed)(sample)["image"],
        edges["image"])
    expected = edges["boxes"].clone()
    if flipped:
        expected[:, 0][expected[:, 0] == 0] = -1
    else:
        expected[:, 2][expected[:, 2] == crop_w] = crop_w + 1
    expected[:, 3][expected[:, 3] == crop_h] = crop_h + 1
    assert ref["boxes"].tolist() == expected.tolist()


# ---------------------------------------------------------------------------------------------
# Item 4: the authors' released files (v1.0: BgMaskfromBoxes/, Generation/Ycrf, Generation/Yret)

def _save_theirs(path: Path, array, mode: str = "L"):
    """A PNG as the authors' code writes one: `Image.fromarray(uint8 array).save(path)` (mode L),
    or, for a background mask whose mode their release does not state, from a bool array (1-bit)
    or with a palette (P); their reader, np.array(Image.open(path)), gives 0/1 for all three."""
    import numpy as np
    from PIL import Image

    array = np.asarray(array, np.uint8)
    if mode == "1":
        image = Image.fromarray(array.astype(bool))
    elif mode == "P":
        image = Image.fromarray(array, mode="L").convert("P")
        image.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    else:
        image = Image.fromarray(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return image.mode


@pytest.mark.parametrize("mode", ["L", "1", "P"])
def test_their_background_masks_are_read_as_they_are(synthetic_voc_copy, mode):
    """Their stage 1 thresholds the mask's mean at 1/8 and their stage 2 uses it as the
    background unary outside the boxes: 1 = background, 0 = inside a box, read as np.array of
    the PNG. Such a file of any single-channel mode is read as is, value for value."""
    import numpy as np

    from data.datasets import open_data

    cfg = load_config(ROOT / "configs/demo/stage1.yml", ["DATA.ROOT", str(synthetic_voc_copy)])
    dataset = open_data(cfg).box_dataset("train")
    image_id = dataset.ids[0]
    path = dataset.bg_mask_path(image_id)
    ours = dataset[0]["bg_mask"][0].numpy()
    theirs = 1 - ours  # any 0/1 pattern: is it read as written?
    assert _save_theirs(path, theirs, mode) == mode
    assert np.array_equal(dataset[0]["bg_mask"][0].numpy(), theirs)


@pytest.mark.parametrize("values, mode, message", [
    ((0, 255), "L", r"values other than 0 and 1 \(e\.g\. 255\)"),
    ((0, 1), "RGB", r"is a RGB image; a background mask is a single-channel PNG"),
])
def test_other_background_mask_encodings_are_refused(synthetic_voc_copy, values, mode, message):
    """A 0/255 mask would pass their 1/8 threshold on almost every image and give stage 2 a
    background unary of 255: it is not their encoding, and is refused; so is a colour PNG."""
    import numpy as np
    from PIL import Image

    from data.datasets import open_data

    cfg = load_config(ROOT / "configs/demo/stage1.yml", ["DATA.ROOT", str(synthetic_voc_copy)])
    dataset = open_data(cfg).box_dataset("train")
    path = dataset.bg_mask_path(dataset.ids[0])
    mask = np.where(dataset[0]["bg_mask"][0].numpy() == 1, values[1], values[0]).astype(np.uint8)
    Image.fromarray(mask).convert(mode).save(path)
    with pytest.raises(BanaError, match=message):
        dataset[0]


@pytest.mark.slow
def test_the_pipeline_runs_on_their_released_files(synthetic_voc_copy, tmp_path):
    """The release as it is: BgMaskfromBoxes/<id>.png (0/1, here alternately 8-bit and 1-bit)
    for stages 1 and 2, Generation/Ycrf and Generation/Yret (class ids, `Image.fromarray(uint8)`
    as their stage2.py saves them, mode L) for stage 3 with DATA.PSEUDO_LABELS [Ycrf, Yret].
    Their masks are used untouched, and stage 3 trains on exactly the labels in their files."""
    import numpy as np

    from data.datasets import open_data
    from engine.stage1 import run as run_stage1
    from engine.stage2 import run as run_stage2
    from engine.stage3 import open_datasets, run as run_stage3
    from utils.io import read_index_png

    root, out = synthetic_voc_copy, tmp_path / "runs"
    data_opts = ["DATA.ROOT", str(root), "OUTPUT_DIR", str(out), "DATA.NUM_WORKERS", "0"]
    fmt = open_data(load_config(ROOT / "configs/demo/stage1.yml", data_opts))
    ids = fmt.split_ids("train_aug")
    written = {}
    for k, image_id in enumerate(ids):
        path = fmt.bg_mask_path("train_aug", image_id)
        mask = read_index_png(path)
        _save_theirs(path, mask, "1" if k % 2 else "L")
        written[path] = path.read_bytes()
        gt = read_index_png(root / "SegmentationClassAug" / f"{image_id}.png")
        y_crf = np.where(gt == 255, 0, gt)
        y_ret = y_crf.copy()
        y_ret[: y_ret.shape[0] // 3] = 0
        _save_theirs(root / "Generation/Ycrf" / f"{image_id}.png", y_crf)
        _save_theirs(root / "Generation/Yret" / f"{image_id}.png", y_ret)

    run_stage1(load_config(ROOT / "configs/demo/stage1.yml", data_opts + [
        "DATA.CROP_SIZE", "48", "DATA.BATCH_SIZE", "4", "SOLVER.MAX_ITER", "2",
        "SOLVER.MILESTONES", "[1]"]), devices="cpu")
    stage2 = run_stage2(load_config(ROOT / "configs/demo/stage2.yml", data_opts + [
        "DATA.PSEUDO_LABEL_DIR", "Generation_ours"]), devices="cpu", workers=1)
    assert stage2["labelled_now"] == len(fmt.split_ids("train"))
    assert all(path.read_bytes() == data for path, data in written.items())

    cfg3 = load_config(ROOT / "configs/demo/stage3.yml", data_opts + [
        "DATA.SPLIT", "train_aug", "DATA.PSEUDO_LABEL_DIR", "Generation",
        "DATA.PSEUDO_LABELS", "[Ycrf, Yret]", "DATA.CROP_SIZE", "48", "DATA.BATCH_SIZE", "4",
        "SOLVER.MAX_ITER", "2", "SOLVER.VAL_EVERY", "2"])
    train, _, _ = open_datasets(cfg3)
    item = train[0]
    expected = [read_index_png(root / "Generation" / d / f"{train.ids[0]}.png")
                for d in ("Ycrf", "Yret")]
    assert np.array_equal(item["label"].numpy(), np.stack(expected))
    assert run_stage3(cfg3, devices="cpu")["iterations"] == 2


# ---------------------------------------------------------------------------------------------
# Item 5: keys a stage does not use are not shipped, and a contradiction is refused

def _checkpoint(path: Path, stage: int, spec: ModelSpec):
    """A checkpoint as stages 1 and 3 write it, of an untrained network."""
    from models.zoo import checkpoint_entry

    net = build(spec, "none")
    prefix = "net."
    torch.save({"state_dict": {prefix + k: v for k, v in net.state_dict().items()},
                "bana": checkpoint_entry(stage, net.spec, {})}, path)
    return net.spec


def test_stage2_configs_set_no_key_their_checkpoint_decides():
    """Stage 2 builds the labeler from the stage-1 checkpoint: its fc6 dilation, input
    normalisation and initialisation are the checkpoint's."""
    import yaml

    for path in sorted((ROOT / "configs").rglob("stage2*.yml")):
        model = yaml.safe_load(path.read_text()).get("MODEL", {})
        assert not {"FC6_DILATION", "INPUT_NORM", "INIT"} & set(model), path


def test_stage2_refuses_a_config_that_contradicts_the_stage1_checkpoint(tmp_path):
    """The checkpoint holds fc6 dilation 1 and ImageNet normalisation (resolved from 'auto').
    MODEL.FC6_DILATION 12 or MODEL.INPUT_NORM caffe contradict it and are refused with both
    values; the defaults (1, 'auto') and a matching 'imagenet' are accepted."""
    from engine.stage2 import load_labeler

    path = tmp_path / "stage1.ckpt"
    spec = _checkpoint(path, 1, ModelSpec("labeler", "tiny", num_classes=21))
    assert (spec.fc6_dilation, spec.input_norm) == (1, "imagenet")

    def cfg(*opts):
        return load_config(ROOT / "configs/demo/stage2.yml", ["MODEL.WEIGHTS", str(path), *opts])

    load_labeler(cfg())
    load_labeler(cfg("MODEL.INPUT_NORM", "imagenet"))
    with pytest.raises(BanaError, match=r"with MODEL.FC6_DILATION 1, but MODEL.FC6_DILATION is "
                                        r"12 here. Set MODEL.FC6_DILATION 1"):
        load_labeler(cfg("MODEL.FC6_DILATION", "12"))
    with pytest.raises(BanaError, match=r"with MODEL.INPUT_NORM 'imagenet', but MODEL.INPUT_NORM "
                                        r"is 'caffe' here"):
        load_labeler(cfg("MODEL.INPUT_NORM", "caffe"))


def test_evaluate_refuses_a_config_that_contradicts_the_stage3_checkpoint(tmp_path):
    """A DeepLab-V1 checkpoint with fc6 dilation 12 (configs/stage3_vgg.yml): that config loads
    it; MODEL.FC6_DILATION 6 is refused, naming 12 and 6."""
    from engine.inference import load_model

    path = tmp_path / "stage3.ckpt"
    _checkpoint(path, 3, ModelSpec("deeplab", "vgg16", num_classes=21, fc6_dilation=12))
    load_model(path, load_config(ROOT / "configs/stage3_vgg.yml"))
    with pytest.raises(BanaError, match=r"with MODEL.FC6_DILATION 12, but MODEL.FC6_DILATION is "
                                        r"6 here"):
        load_model(path, load_config(ROOT / "configs/stage3_vgg.yml", ["MODEL.FC6_DILATION", "6"]))


def test_init_is_a_training_key_in_its_help():
    from engine.config import iter_keys

    help_text = dict((k, f.metadata["help"]) for k, f in iter_keys())["MODEL.INIT"]
    assert help_text.startswith("Training stages (1 and 3) only")


def test_a_one_pixel_box_the_round_trip_empties_labels_nothing():
    """W = H = 14: the box (2, 2, 3, 3) comes back as (2, 2, 2, 2) (x = 3 -> 2, derived in
    `test_stage2_boxes_take_the_authors_float32_round_trip`), an empty region: stage 2 labels no
    pixel of it instead of failing as their `.max()` over the empty region does."""
    import numpy as np

    from engine.stage2 import box_pixels
    from models.pseudo_labels import make_pseudo_labels
    from utils.crf import make_crf

    boxes = box_pixels([[2, 2, 3, 3, 1]], 14, 14, "reference")
    assert boxes.tolist() == [[2, 2, 2, 2, 1]]
    bg = np.ones((14, 14), np.uint8)
    bg[2, 2] = 0
    image = np.zeros((14, 14, 3), np.uint8)
    y_crf, y_ret = make_pseudo_labels(torch.randn(8, 2, 2), torch.randn(21, 8), image, boxes, bg,
                                      1, 0.99, make_crf([4, 55, 3, 3, 3], "pydensecrf"))[:2]
    assert not y_crf.any() and not y_ret.any()


def test_a_run_recorded_before_the_new_keys_resumes_as_it_behaved(tmp_path):
    """A config.yaml written before DATA.BOX_ARITHMETIC and SOLVER.PARAM_GROUPS existed holds
    the behaviour of that time (pixel edges, four groups): resuming with those values is
    accepted, resuming with the new defaults is refused, naming the key."""
    import yaml

    from engine.runs import check_resume_record

    opts = ["OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "10", "SOLVER.MILESTONES", "[8]"]
    old = load_config(REPO / "configs/demo/stage1.yml", opts).to_dict()
    del old["DATA"]["BOX_ARITHMETIC"], old["SOLVER"]["PARAM_GROUPS"]
    run_dir = tmp_path / "stage1"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    as_then = load_config(REPO / "configs/demo/stage1.yml",
                          [*opts, "DATA.BOX_ARITHMETIC", "pixel_edges",
                           "SOLVER.PARAM_GROUPS", "four"])
    check_resume_record(as_then, step=5, reconfigure=False)
    now = load_config(REPO / "configs/demo/stage1.yml", opts)
    with pytest.raises(BanaError, match=r"DATA.BOX_ARITHMETIC: 'pixel_edges' recorded, "
                                        r"'reference' now"):
        check_resume_record(now, step=5, reconfigure=False)
