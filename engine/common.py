"""Training plumbing shared by stage 1 and stage 3: optimiser groups, schedules, checkpoints,
the Lightning trainer, and loading an earlier stage's checkpoint.

Checkpoints are Lightning checkpoints with one extra entry, `checkpoint["bana"]`, saying which
stage wrote it and how to rebuild its network (backbone, classes, pooling, input norm). Every
checkpoint file is written to a temporary name and renamed, so a run killed at any moment leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from utils.config import Config, SolverConfig
from utils.errors import BanaError

CHECKPOINT_DIR = "checkpoints"
# Picked by validation mIoU: scoring it on the validation split is selection on the test data.
BEST_ON_VAL = "best_on_val.ckpt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def network_groups(backbone: nn.Module, head: Iterable[nn.Module], solver: SolverConfig):
    """Groups for a backbone (pretrained except its `new_modules()`) plus new head modules."""
    new = [*getattr(backbone, "new_modules", lambda: [])(), *head]
    return parameter_groups([backbone], new, solver.LR, solver.WEIGHT_DECAY)


def lr_factor(iteration: int, solver: SolverConfig) -> float:
    """Learning-rate multiplier at `iteration` (0-based) for the configured schedule, times a
    linear warm-up from 1/WARMUP_ITERS to 1 over the first WARMUP_ITERS iterations (if any)."""
    warmup = min(1.0, (iteration + 1) / solver.WARMUP_ITERS) if solver.WARMUP_ITERS else 1.0
    if solver.SCHEDULER == "poly":
        return warmup * max(0.0, 1.0 - iteration / solver.MAX_ITER) ** solver.POLY_POWER
    passed = sum(iteration >= m for m in solver.MILESTONES)
    return warmup * solver.LR_DECAY ** passed


def make_optimizer(groups: list[dict], solver: SolverConfig):
    """SGD plus an iteration-based LambdaLR; Lightning steps the scheduler every iteration."""
    optimizer = torch.optim.SGD(groups, lr=solver.LR, momentum=solver.MOMENTUM,
                                weight_decay=solver.WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lambda it: lr_factor(it, solver))
    return {"optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def _nonfinite_error(iteration: int, found: str) -> BanaError:
    return BanaError(
        f"non-finite loss at iteration {iteration}: {found}. Training stopped; the last "
        "checkpoint was written before this iteration and is intact. Lower SOLVER.LR, check the "
        "labels, or rerun with --resume.")


def check_finite(losses: dict[str, torch.Tensor], iteration: int) -> None:
    """Stop training at a non-finite loss, naming the terms, before anything is saved. Reads the
    values on the host: on a GPU it waits for the step (see `FiniteWatch` for the training loop).

    losses: scalar tensors; "loss" is the total, the other entries are its terms.
    """
    bad = [(name, value) for name, value in losses.items()
           if not torch.isfinite(value.detach()).all()]
    if not bad:
        return
    # A non-finite term makes the total non-finite too: name the terms first.
    bad.sort(key=lambda item: item[0] == "loss")
    found = ", ".join(f"term '{name}' = {value.detach().float().mean().item()}"
                      for name, value in bad)
    raise _nonfinite_error(iteration, found)


class FiniteWatch:
    """Finiteness of the training losses, checked without stopping the device every step.

    `update` records, on the device, the first iteration whose loss terms are not all finite and
    their values (no host-device synchronisation). `check` reads that record (one
    synchronisation) and raises naming the iteration and the terms; the training loop calls it
    every SOLVER.LOG_EVERY iterations and before every checkpoint is written, so a checkpoint
    never holds weights trained on a non-finite loss. Under DDP every process checks at the same
    iteration and all of them stop, whichever process saw the bad loss.
    """

    def __init__(self):
        self.names: list[str] | None = None
        self.first: torch.Tensor | None = None  # () long, -1 while every loss was finite
        self.values: torch.Tensor | None = None  # (terms,) float32, at the first bad iteration

    def update(self, losses: dict[str, torch.Tensor], iteration: int) -> None:
        values = torch.stack([v.detach().float().mean() for v in losses.values()])
        if self.first is None or self.first.device != values.device:
            self.names = list(losses)
            self.first = torch.full((), -1, dtype=torch.long, device=values.device)
            self.values = torch.zeros_like(values)
        new = (~torch.isfinite(values)).any() & (self.first < 0)
        self.first = torch.where(new, torch.full_like(self.first, iteration), self.first)
        self.values = torch.where(new, values, self.values)

    def check(self, strategy=None) -> None:
        if self.first is None:
            return
        first = self.first
        if strategy is not None and getattr(strategy, "world_size", 1) > 1:
            # The earliest bad iteration over all processes; -1 everywhere if none.
            everyone = strategy.all_gather(first).reshape(-1)
            bad = everyone[everyone >= 0]
            first = bad.min() if len(bad) else first
        iteration = int(first)
        if iteration < 0:
            return
        if int(self.first) == iteration:
            pairs = sorted(zip(self.names, self.values.tolist()), key=lambda p: p[0] == "loss")
            found = ", ".join(f"term '{n}' = {v}" for n, v in pairs if not math.isfinite(v))
        else:
            found = "in another process of this run"
        raise _nonfinite_error(iteration, found)


class FiniteCheck(pl.Callback):
    """Calls the module's `finite_watch.check` every `every` iterations and at the end of
    training (AtomicCheckpoint checks before writing)."""

    def __init__(self, every: int):
        self.every = max(1, every)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            check_watch(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        check_watch(trainer, pl_module)


def check_watch(trainer, pl_module) -> None:
    watch = getattr(pl_module, "finite_watch", None)
    if watch is not None:
        watch.check(trainer.strategy)


def atomic_save_checkpoint(trainer: pl.Trainer, path: Path) -> None:
    """trainer.save_checkpoint to a temporary file, then rename (rank 0 does the rename). A
    failed write (a full disk) removes the temporary file and names the checkpoint."""
    path = Path(path)
    check_watch(trainer, getattr(trainer, "lightning_module", None))
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        trainer.save_checkpoint(str(tmp), weights_only=False)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        errno_ = getattr(err, "errno", None) or (28 if "No space left" in str(err) else None)
        if errno_ is None:
            raise
        raise OSError(errno_, os.strerror(errno_), str(path)) from None
    if trainer.is_global_zero:
        os.replace(tmp, path)
    trainer.strategy.barrier("atomic_save_checkpoint")


class AtomicCheckpoint(pl.Callback):
    """`last.ckpt` every `every` iterations, `final.ckpt` when training reaches its last
    iteration, and `best_on_val.ckpt` on a better `monitor` value; all written atomically.

    `final.ckpt` is the model to report, as the authors do. `best_on_val.ckpt` is chosen by the
    validation mIoU, so a score of it on that same split is selected on the test data."""

    def __init__(self, dirpath: Path, every: int, monitor: str | None = None):
        self.dirpath = Path(dirpath)
        self.every = every
        self.monitor = monitor
        self.best = -math.inf

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every == 0 and step < trainer.max_steps:
            atomic_save_checkpoint(trainer, self.dirpath / "last.ckpt")

    def on_validation_end(self, trainer, pl_module):
        if self.monitor is None or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None and float(value) > self.best:
            self.best = float(value)
            atomic_save_checkpoint(trainer, self.dirpath / BEST_ON_VAL)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step >= trainer.max_steps:
            atomic_save_checkpoint(trainer, self.dirpath / "last.ckpt")
            atomic_save_checkpoint(trainer, self.dirpath / "final.ckpt")

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state_dict):
        self.best = state_dict.get("best", -math.inf)


class LineProgress(pl.callbacks.ProgressBar):
    """One line every `every` iterations with the logged scalars and the speed: readable in a
    log file, where a tqdm bar would print thousands of carriage returns."""

    def __init__(self, every: int):
        super().__init__()
        self.every = max(1, every)
        self._enabled = True
        self._start = None

    def disable(self):
        self._enabled = False

    def enable(self):
        self._enabled = True

    def on_train_start(self, trainer, pl_module):
        self._start = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not (self._enabled and trainer.is_global_zero) or (
                step % self.every and step != trainer.max_steps):
            return
        t0, s0 = self._start
        speed = (step - s0) / max(time.perf_counter() - t0, 1e-9)
        scalars = "  ".join(f"{k} {float(v):.4g}" for k, v in
                            sorted(self.get_metrics(trainer, pl_module).items())
                            if k.startswith(("train/", "val/")))
        print(f"iter {step}/{trainer.max_steps}  {scalars}  ({speed:.1f} it/s)", flush=True)

    def on_validation_end(self, trainer, pl_module):
        if self._enabled and trainer.is_global_zero and not trainer.sanity_checking:
            val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            print(f"validation at iter {trainer.global_step}: "
                  + "  ".join(f"{k} {v:.2f}" for k, v in sorted(val.items())), flush=True)


def resume_path(cfg: Config, resume: bool, stage: int) -> tuple[str | None, int]:
    """The checkpoint to resume from, or None for a fresh run.

    A fresh run refuses to start over an existing one, so nothing already trained is lost. The
    checkpoint resumed from must be this stage's, with the configured backbone and classes:
    Lightning would otherwise load whatever weights happen to fit, or fail with a traceback.
    """
    last = cfg.run_dir / CHECKPOINT_DIR / "last.ckpt"
    if resume:
        if last.is_file():
            step = check_resumable(last, cfg, stage)
            print(f"Resuming from {last}.")
            return str(last), step
        print(f"--resume: no checkpoint at {last} yet; starting from iteration 0.")
        return None, 0
    if last.is_file():
        raise BanaError(f"{cfg.run_dir} already holds a run ({last}). Pass --resume to continue "
                        "it, or choose another OUTPUT_DIR/NAME (--opts NAME my_run).")
    return None, 0


def check_resumable(path: Path, cfg: Config, stage: int) -> int:
    """Check the checkpoint fits the config; returns the iterations it has trained."""
    hint = (f"Move {cfg.run_dir} away to start over, or choose another OUTPUT_DIR/NAME "
            "(--opts NAME my_run).")
    ckpt = load_stage_checkpoint(path, stage, hint)
    meta = ckpt["bana"]
    for key, configured, stored in (("MODEL.BACKBONE", cfg.MODEL.BACKBONE, meta["backbone"]),
                                    ("DATA.NUM_CLASSES", cfg.DATA.NUM_CLASSES,
                                     meta["num_classes"])):
        if configured != stored:
            raise BanaError(f"cannot resume from {path}: it was trained with {key} "
                            f"{stored!r}, but the config says {configured!r}. Set {key} "
                            f"{stored} to resume it. {hint}")
    return int(ckpt.get("global_step", 0))


# Keys that say where things are or how often to log, not what the run computes: a resumed run
# may change them freely. Every other key is part of the run's record (its config.yaml).
OPERATIONAL_KEYS = ("OUTPUT_DIR", "DATA.ROOT", "DATA.NUM_WORKERS", "DATA.PSEUDO_LABEL_DIR",
                    "SOLVER.LOG_EVERY", "SOLVER.CKPT_EVERY", "SOLVER.VAL_EVERY", "MODEL.WEIGHTS",
                    "TEST.")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def record_differences(recorded: dict, cfg: Config) -> list[tuple[str, object, object]]:
    """(key, recorded value, new value) for every run-defining key that differs."""
    old, new = _flatten(recorded), _flatten(cfg.to_dict())
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if not k.startswith(OPERATIONAL_KEYS) and old.get(k) != new.get(k)]


def describe_differences(diffs) -> str:
    return "; ".join(f"{k}: {a!r} recorded, {b!r} now" for k, a, b in diffs[:8]) + (
        f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else "")


def check_resume_record(cfg: Config, step: int, reconfigure: bool) -> None:
    """A resumed run continues the recorded one: the same run-defining keys (unless
    --reconfigure) and a MAX_ITER not below what the checkpoint already trained. Nothing is
    rewritten when this refuses."""
    import yaml

    if cfg.SOLVER.MAX_ITER < step:
        raise BanaError(f"cannot resume {cfg.run_dir}: its checkpoint has trained {step} "
                        f"iterations, more than SOLVER.MAX_ITER {cfg.SOLVER.MAX_ITER}. Set "
                        f"SOLVER.MAX_ITER to at least {step} (the recorded run has "
                        f"{_recorded_max_iter(cfg)}), or use checkpoints/final.ckpt as it is.")
    path = cfg.run_dir / "config.yaml"
    if not path.is_file():
        return
    recorded = yaml.safe_load(path.read_text()) or {}
    diffs = record_differences(recorded, cfg)
    if diffs and not reconfigure:
        raise BanaError(f"cannot resume {cfg.run_dir} with other settings than it was trained "
                        f"with ({path}): {describe_differences(diffs)}. Either resume with the "
                        "recorded settings, start a new run in another folder (--opts NAME "
                        "new_run), or pass --reconfigure to continue this run with the new "
                        "settings (the old record is kept as config.<n>.yaml).")
    if diffs:
        n = 1
        while (cfg.run_dir / f"config.{n}.yaml").exists():
            n += 1
        os.replace(path, cfg.run_dir / f"config.{n}.yaml")
        print(f"--reconfigure: {describe_differences(diffs)}; the previous record is "
              f"config.{n}.yaml.")


def _recorded_max_iter(cfg: Config):
    import yaml

    path = cfg.run_dir / "config.yaml"
    if path.is_file():
        return (yaml.safe_load(path.read_text()) or {}).get("SOLVER", {}).get("MAX_ITER", "?")
    return "?"


def start_training(cfg: Config, args, stage: int):
    """What every training run does first, holding the run folder's lock: clean what a killed
    run left, pick devices, decide fresh vs resume (a resume must match the run's record), seed,
    and save the resolved config. Returns (devices, checkpoint to resume from or None)."""
    from utils.cli import resolve_devices
    from utils.runlock import clean_temporary_files

    from utils.distributed import detect_launch
    from utils.precision import check_precision

    launch = detect_launch()
    devices = resolve_devices(args.gpu_id, launch=launch)
    check_precision(cfg.TRAINER.PRECISION, devices.accelerator)
    if launch.is_main:
        print(devices.note)
        clean_temporary_files(cfg.run_dir)
    ckpt_path, step = resume_path(cfg, getattr(args, "resume", False), stage)
    if ckpt_path is not None and launch.is_main:
        check_resume_record(cfg, step, getattr(args, "reconfigure", False))
    seed_everything(cfg.SEED)
    pl.seed_everything(cfg.SEED, workers=True, verbose=False)
    if launch.is_main:
        cfg.save()
    return devices, ckpt_path


def fit(trainer: pl.Trainer, module, **kwargs) -> None:
    """trainer.fit, with Ctrl-C reported as ours (exit 130, "rerun with --resume"): Lightning
    catches KeyboardInterrupt itself and exits with status 1 and its own message."""
    try:
        trainer.fit(module, **kwargs)
    except SystemExit:
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    if trainer.interrupted:
        raise KeyboardInterrupt


def needs_sync_batchnorm(net: nn.Module, devices) -> bool:
    """BatchNorm layers that train, on more than one device: their statistics must be computed
    over the whole batch (as the authors' SyncBatchNorm), not over each device's slice."""
    return devices.total > 1 and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.weight is not None
        and m.weight.requires_grad for m in net.modules())


def make_trainer(cfg: Config, devices, callbacks: list[pl.Callback], *,
                 val_every: int | None = None, sync_batchnorm: bool = False) -> pl.Trainer:
    """An iteration-based Lightning trainer writing CSV and TensorBoard logs to the run folder."""
    from pytorch_lightning.callbacks import LearningRateMonitor, TQDMProgressBar
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    run_dir = cfg.run_dir
    # One version folder per launch (logs/version_0, version_1 after a resume, ...): a resumed
    # run must never delete the logs of the attempt before it.
    loggers = [CSVLogger(str(run_dir), name="logs"), TensorBoardLogger(str(run_dir), name="tb")]
    # A live bar on a terminal; plain periodic lines in logs (CI, nohup, the demo).
    progress = (TQDMProgressBar(refresh_rate=10) if sys.stdout.isatty()
                else LineProgress(cfg.SOLVER.LOG_EVERY * 5))
    strategy = "ddp" if devices.total > 1 else "auto"
    if strategy == "ddp" and devices.accelerator == "cpu":
        from pytorch_lightning.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo")
    kwargs = {}
    if val_every is not None:
        kwargs.update(val_check_interval=val_every, check_val_every_n_epoch=None,
                      num_sanity_val_steps=0)
    else:
        kwargs.update(limit_val_batches=0, num_sanity_val_steps=0)
    return pl.Trainer(
        accelerator=devices.accelerator, devices=devices.devices, strategy=strategy,
        max_steps=cfg.SOLVER.MAX_ITER, max_epochs=-1, logger=loggers,
        log_every_n_steps=cfg.SOLVER.LOG_EVERY, enable_checkpointing=False,
        callbacks=[FiniteCheck(cfg.SOLVER.LOG_EVERY), *callbacks, LearningRateMonitor("step"),
                   progress],
        precision=cfg.TRAINER.PRECISION, num_nodes=devices.num_nodes,
        enable_progress_bar=True,
        default_root_dir=str(run_dir), deterministic=False, benchmark=devices.accelerator == "gpu",
        enable_model_summary=False, use_distributed_sampler=True, sync_batchnorm=sync_batchnorm,
        **kwargs)


def load_stage_checkpoint(path: Path, stage: int, hint: str) -> dict:
    """Read a checkpoint and check it was written by `stage`; returns the checkpoint dict."""
    path = Path(path)
    if not path.is_file():
        raise BanaError(f"checkpoint {path} does not exist. {hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which, not a pickle traceback
        reason = str(e).split(". ")[0].strip()
        raise BanaError(f"cannot read checkpoint {path}: the file is truncated or not a "
                        f"checkpoint ({type(e).__name__}: {reason}). {hint}") from None
    meta = ckpt.get("bana") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "stage" not in meta:
        raise BanaError(f"{path} is not a checkpoint written by this project's stage {stage}. "
                        f"{hint}")
    if meta["stage"] != stage:
        raise BanaError(f"{path} was written by stage {meta['stage']}, but stage {stage}'s "
                        f"model is needed here. {hint}")
    return ckpt


def model_state(ckpt: dict, prefix: str = "net.") -> dict:
    """The wrapped network's weights from a LightningModule checkpoint."""
    return {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
