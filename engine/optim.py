"""Optimisation of the training stages: SGD parameter groups and the learning-rate schedule."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from utils.errors import BanaError


def parameter_groups(pretrained: Iterable[nn.Module], new: Iterable[nn.Module], lr: float,
                     weight_decay: float) -> list[dict]:
    """Four SGD groups, as the authors' VGG-16 code makes them (`get_params` in their
    models/ClsNet.py and SegNet.py; SOLVER.PARAM_GROUPS four).

    Pretrained weights train at lr, their biases at 2*lr without decay (Caffe's habit, kept by
    DeepLab); newly initialised layers learn 10x faster (20x for biases) since they start from
    noise. A parameter found in a `new` module is new even if a `pretrained` module (e.g. the
    whole backbone) also contains it; frozen parameters are left out.
    """
    groups = {k: [] for k in ("pw", "pb", "nw", "nb")}
    seen: set[int] = set()
    for kind, modules in (("n", new), ("p", pretrained)):
        for module in modules:
            for name, param in module.named_parameters():
                if id(param) in seen or not param.requires_grad:
                    continue
                seen.add(id(param))
                groups[kind + ("b" if name.endswith("bias") else "w")].append(param)
    spec = {"pw": (1, weight_decay), "pb": (2, 0.0), "nw": (10, weight_decay), "nb": (20, 0.0)}
    return [{"params": groups[k], "lr": lr * mult, "weight_decay": wd, "name": k}
            for k, (mult, wd) in spec.items() if groups[k]]


def two_groups(pretrained: Iterable[nn.Module], new: Iterable[nn.Module], lr: float,
               weight_decay: float) -> list[dict]:
    """The authors' two SGD groups for DeepLab-V2 (`DeepLab_ASPP.get_1x_lr_params` and
    `get_10x_lr_params` in their models/SegNet.py): every parameter of the pretrained modules
    (convolutions and BatchNorm alike) at lr, every parameter of the new ones (DeepLab-V2's four
    dilated convolutions and the classifier) at 10*lr.

    Weight decay applies to both groups, BatchNorm included: their ResNet-101 stage 3 is not
    released, their stage3_res.yml sets one WEIGHT_DECAY, and the get_1x/get_10x pattern their
    model follows passes it to SGD for every group (inferred, see docs/SPEC.md §8). A parameter
    found in a `new` module is new; frozen parameters are left out (as `requires_grad` filters
    them in theirs).
    """
    groups = {"1x": [], "10x": []}
    seen: set[int] = set()
    for kind, modules in (("10x", new), ("1x", pretrained)):
        for module in modules:
            for param in module.parameters():
                if id(param) in seen or not param.requires_grad:
                    continue
                seen.add(id(param))
                groups[kind].append(param)
    return [{"params": groups[k], "lr": lr * mult, "weight_decay": weight_decay, "name": k}
            for k, mult in (("1x", 1), ("10x", 10)) if groups[k]]


# SOLVER.PARAM_GROUPS: name -> the function that makes the groups.
PARAM_GROUPS = {"four": parameter_groups, "two": two_groups}
# SOLVER.PARAM_GROUPS auto: the authors' scheme for each MODEL.BACKBONE. VGG-16 has their four
# groups (stages 1 and 3, models/ClsNet.py and SegNet.py `get_params`), DeepLab-V2's ResNet-101
# their two (`DeepLab_ASPP`). tiny is ours: it keeps four so the CPU demo's numbers stay put.
AUTHORS_PARAM_GROUPS = {"vgg16": "four", "resnet101": "two", "resnet101_torchvision": "two",
                        "tiny": "four"}


def param_group_scheme(choice: str, backbone: str) -> str:
    """The scheme SOLVER.PARAM_GROUPS `choice` means for MODEL.BACKBONE `backbone`."""
    if choice != "auto":
        return choice
    if backbone not in AUTHORS_PARAM_GROUPS:
        raise BanaError(f"SOLVER.PARAM_GROUPS auto has no scheme for MODEL.BACKBONE {backbone!r}: "
                        f"set SOLVER.PARAM_GROUPS to {' or '.join(PARAM_GROUPS)}, or add the "
                        "backbone to engine/optim.py AUTHORS_PARAM_GROUPS.")
    return AUTHORS_PARAM_GROUPS[backbone]


def network_groups(backbone: nn.Module, head: Iterable[nn.Module], solver, backbone_name: str):
    """Groups for a backbone (pretrained except its `new_modules()`) plus new head modules, in
    the scheme SOLVER.PARAM_GROUPS names for MODEL.BACKBONE `backbone_name`. solver: the
    config's SOLVER section (LR, WEIGHT_DECAY, PARAM_GROUPS)."""
    new = [*getattr(backbone, "new_modules", lambda: [])(), *head]
    make = PARAM_GROUPS[param_group_scheme(solver.PARAM_GROUPS, backbone_name)]
    return make([backbone], new, solver.LR, solver.WEIGHT_DECAY)


def lr_factor(iteration: int, solver) -> float:
    """Learning-rate multiplier at `iteration` (0-based) for the configured schedule, times a
    linear warm-up from 1/WARMUP_ITERS to 1 over the first WARMUP_ITERS iterations (if any)."""
    warmup = min(1.0, (iteration + 1) / solver.WARMUP_ITERS) if solver.WARMUP_ITERS else 1.0
    if solver.SCHEDULER == "poly":
        return warmup * max(0.0, 1.0 - iteration / solver.MAX_ITER) ** solver.POLY_POWER
    passed = sum(iteration >= m for m in solver.MILESTONES)
    return warmup * solver.LR_DECAY ** passed


def make_optimizer(groups: list[dict], solver):
    """SGD plus an iteration-based LambdaLR; Lightning steps the scheduler every iteration."""
    optimizer = torch.optim.SGD(groups, lr=solver.LR, momentum=solver.MOMENTUM,
                                weight_decay=solver.WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lambda it: lr_factor(it, solver))
    return {"optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
