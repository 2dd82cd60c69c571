"""The authors' recipe where it is arithmetic: optimiser groups, box coordinates, their released
files (GitHub issue 23). Expected numbers are computed by hand from the authors' formulas; each
docstring gives the derivation."""

from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.optim import (AUTHORS_PARAM_GROUPS, make_optimizer, network_groups,
                          param_group_scheme)
from models.backbones import BACKBONES
from models.zoo import ModelSpec, build
from utils.errors import BanaError

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
