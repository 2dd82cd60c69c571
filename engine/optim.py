"""Optimisation of the training stages: SGD parameter groups and the learning-rate schedule."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def parameter_groups(pretrained: Iterable[nn.Module], new: Iterable[nn.Module], lr: float,
                     weight_decay: float) -> list[dict]:
    """The reference's four SGD groups.

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


def network_groups(backbone: nn.Module, head: Iterable[nn.Module], solver):
    """Groups for a backbone (pretrained except its `new_modules()`) plus new head modules.
    solver: the config's SOLVER section (LR, WEIGHT_DECAY)."""
    new = [*getattr(backbone, "new_modules", lambda: [])(), *head]
    return parameter_groups([backbone], new, solver.LR, solver.WEIGHT_DECAY)


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
