"""The training loop of stages 1 and 3 (and the instance task): the LightningModule base, the
trainer and its callbacks (finiteness, progress lines).

Lightning is imported here and in the stage modules, never in what the CRF workers import.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from utils.errors import BanaError


class BanaLitModule(pl.LightningModule):
    """What every training stage's LightningModule shares: the run's config among its
    hyper-parameters, a `FiniteWatch` of its losses, and the checkpoint entry describing its
    network (`models.zoo.checkpoint_entry`), so that any of its checkpoints can be read back by
    `models.zoo.read_checkpoint` without the config.

    Subclasses hold their network as `self.net` (`self.model` for Mask R-CNN) and set `STAGE`.
    """

    STAGE: int

    def __init__(self, cfg, spec, **extra):
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        self.extra = extra  # further checkpoint entries (the instance task's category ids)
        self.save_hyperparameters({"config": cfg.to_dict()})
        self.finite_watch = FiniteWatch()

    def on_save_checkpoint(self, checkpoint):
        from models.zoo import checkpoint_entry

        checkpoint["bana"] = checkpoint_entry(self.STAGE, self.spec, self.cfg.to_dict(),
                                              **self.extra)


def _nonfinite_error(iteration: int, found: str) -> BanaError:
    return BanaError(
        f"non-finite loss at iteration {iteration}: {found}. Training stopped; the last "
        "checkpoint was written before this iteration and is intact. Lower SOLVER.LR, check the "
        "labels, or rerun with --resume.")


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
            # A non-finite term makes the total non-finite too: name the terms first.
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
        from engine.runs import check_watch

        if trainer.global_step % self.every == 0:
            check_watch(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        from engine.runs import check_watch

        check_watch(trainer, pl_module)


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


class EndOnTerm(pl.Callback):
    """SIGTERM ends training at once, as Ctrl-C does (`utils.cli`), in every process.

    Once the trainer runs, Lightning calls its own SIGTERM handler first and the entry script's
    (`utils.cli.guarded`) after it. Under DDP its own broadcasts inside the handler: that waits
    for processes that may be gone or busy in another collective, and raises when one is gone,
    so that the script's handler never runs. This makes the script's handler the only one once
    training starts; like Lightning's, it first passes the signal on to the DDP processes
    Lightning started itself (--gpu-id 0,1 or cpu:N). Lightning's teardown puts the script's
    handler back."""

    def on_train_start(self, trainer, pl_module):
        import os
        import signal
        import threading

        from utils.cli import on_terminate, terminating

        if not terminating() or threading.current_thread() is not threading.main_thread():
            return
        launcher, owner = trainer.strategy.launcher, os.getpid()

        def handler(signum, frame):
            if os.getpid() == owner:  # not in a forked DataLoader worker
                for proc in getattr(launcher, "procs", None) or ():
                    if proc.poll() is None:
                        proc.send_signal(signum)
            on_terminate(signum, frame)

        signal.signal(signal.SIGTERM, handler)


def fit(trainer: pl.Trainer, module, **kwargs) -> None:
    """trainer.fit, with Ctrl-C reported as ours (exit 130, "rerun with --resume"): Lightning
    catches KeyboardInterrupt itself and exits with status 1 and its own message.

    A checkpoint resumed from (`ckpt_path`) is read with torch's weights-only loader, as
    `models.zoo` reads every checkpoint: it holds tensors and plain values, and a file that asks
    to run code is refused rather than run. (`engine.runs.check_resumable` has read the same
    file that way before, so this matters only where Lightning's default would differ.)"""
    if kwargs.get("ckpt_path") is not None:
        import inspect

        if "weights_only" in inspect.signature(trainer.fit).parameters:
            kwargs["weights_only"] = True
    try:
        trainer.fit(module, **kwargs)
    except SystemExit:
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    if trainer.interrupted:
        raise KeyboardInterrupt


def final_checkpoint(trainer: pl.Trainer, ckpt_dir: Path, stage: str, max_iter: int) -> Path:
    """ckpt_dir/final.ckpt after `fit`. A stage never reports a file it did not write: on the
    global-zero rank, a run that stopped before writing it (a failure Lightning swallowed, too few
    iterations) is an error that says how to finish it."""
    final = ckpt_dir / "final.ckpt"
    if trainer.is_global_zero and not final.is_file():
        raise BanaError(f"{stage} stopped after {trainer.global_step} of {max_iter} iterations "
                        f"without writing {final}; rerun with --resume to finish it.")
    return final


def needs_sync_batchnorm(net: nn.Module, devices) -> bool:
    """BatchNorm layers that train, on more than one device: their statistics must be computed
    over the whole batch (as the authors' SyncBatchNorm), not over each device's slice."""
    return devices.total > 1 and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.weight is not None
        and m.weight.requires_grad for m in net.modules())


def make_trainer(cfg, devices, callbacks: list[pl.Callback], *,
                 val_every: int | None = None, sync_batchnorm: bool = False) -> pl.Trainer:
    """An iteration-based Lightning trainer writing CSV and TensorBoard logs to the run folder."""
    from pytorch_lightning.callbacks import LearningRateMonitor, TQDMProgressBar
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from engine.runs import pending_record

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
                   progress, EndOnTerm(), *pending_record(cfg)],
        precision=cfg.TRAINER.PRECISION, num_nodes=devices.num_nodes,
        enable_progress_bar=True,
        default_root_dir=str(run_dir), deterministic=False, benchmark=devices.accelerator == "gpu",
        enable_model_summary=False, use_distributed_sampler=True, sync_batchnorm=sync_batchnorm,
        **kwargs)
