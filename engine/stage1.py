"""Stage 1: train the box classifier (`models.labeler.Labeler`) with BAP or GAP (SPEC §2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from engine.config import Config
from engine.optim import make_optimizer, network_groups
from engine.runs import (CHECKPOINT_DIR, AtomicCheckpoint, check_steps, finished_run,
                         model_spec, start_training)
from engine.training import BanaLitModule, final_checkpoint, fit, make_trainer

STAGE = 1


class Stage1LitModule(BanaLitModule):
    """Wraps a built `Labeler`; one step = mean cross-entropy over all fg and bg prototypes."""

    STAGE = STAGE

    def __init__(self, net, cfg: Config):
        super().__init__(cfg, net.spec)
        self.net = net

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        # The boxes stay on the host: the reference BAP lays its samples out from their
        # coordinates there (models/pooling.py), which on the device would wait for the GPU.
        rest = {k: v for k, v in batch.items() if k != "boxes"}
        moved = super().transfer_batch_to_device(rest, device, dataloader_idx)
        return {**moved, "boxes": batch["boxes"]}

    def training_step(self, batch, batch_idx):
        images = batch["image"].float()
        # Padding is 255 in the bg mask: it is neither background nor inside a box.
        bg_mask = (batch["bg_mask"] == 1).float()
        logits, targets = self.net(images, batch["boxes"], bg_mask)
        loss = F.cross_entropy(logits, targets)
        self.finite_watch.update({"ce": loss}, self.global_step)
        with torch.no_grad():
            # Accuracies as ratios of counts: NaN (0/0) without foreground or background
            # prototypes, and no host-device synchronisation.
            correct = (logits.argmax(1) == targets).float()
            fg = (targets > 0).float()
            fg_acc = (correct * fg).sum() / fg.sum()
            bg_acc = (correct * (1 - fg)).sum() / (1 - fg).sum()
        n = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=False)
        self.log("train/fg_acc", fg_acc.float(), prog_bar=True, batch_size=n)
        self.log("train/bg_acc", bg_acc.float(), prog_bar=True, batch_size=n)
        return loss

    def configure_optimizers(self):
        groups = network_groups(self.net.backbone, [self.net.classifier], self.cfg.SOLVER,
                                self.cfg.MODEL.BACKBONE)
        return make_optimizer(groups, self.cfg.SOLVER)


def open_train_dataset(cfg: Config):
    """(The dataset, the box dataset stage 1 trains on, without transform yet.)"""
    from data.datasets import open_data

    data = open_data(cfg)
    return data, data.box_dataset(cfg.DATA.SPLIT)


def check_inputs(cfg: Config):
    """Every input of stage 1, checked before a network is built or weights are downloaded;
    returns (the dataset, the box dataset of DATA.SPLIT)."""
    from engine.preflight import (Problems, require_data_root, require_init, require_unused_weights,
                                  require_writable)

    problems = Problems("stage 1")
    opened = None
    if problems.passes(lambda: require_data_root(cfg)):
        opened = problems.check(lambda: open_train_dataset(cfg))
    problems.check(lambda: require_init(cfg.MODEL.INIT))
    problems.check(lambda: require_unused_weights(cfg, "stage 1", ""))
    problems.check(lambda: require_writable(cfg.run_dir, "OUTPUT_DIR"))
    problems.raise_if_any()
    return opened


def train_loader(cfg: Config, dataset, per_device_batch: int, fill,
                 pin_memory: bool = False) -> DataLoader:
    from data.base import collate_boxes
    from data.transforms import TrainTransform

    dataset.transform = TrainTransform(cfg.DATA.CROP_SIZE, scale_range=tuple(cfg.DATA.SCALE_RANGE),
                                       flip=cfg.DATA.FLIP,
                                       color_jitter=tuple(cfg.DATA.COLOR_JITTER), fill=fill,
                                       box_arithmetic=cfg.DATA.BOX_ARITHMETIC)
    return DataLoader(dataset, batch_size=per_device_batch, shuffle=True, drop_last=True,
                      num_workers=cfg.DATA.NUM_WORKERS, collate_fn=collate_boxes,
                      persistent_workers=cfg.DATA.NUM_WORKERS > 0, pin_memory=pin_memory)


def run(cfg: Config, *, devices: str = "0", resume: bool = False, reconfigure: bool = False,
        overwrite: bool = False) -> dict:
    """Train stage 1; returns the final training metrics and the checkpoint path.

    devices: as --gpu-id ("0", "0,1", "cpu", "cpu:2"); resume: continue the run's last.ckpt;
    reconfigure: with resume, continue with settings other than the run's record; overwrite:
    train a run folder that holds checkpoints again from the start (they are deleted)."""
    from utils.runlock import RunLock

    data, dataset = check_inputs(cfg)
    with RunLock(cfg.run_dir, "stage 1"):
        return _train(cfg, data, dataset, devices, resume, reconfigure, overwrite)


def _train(cfg: Config, data, dataset, devices, resume, reconfigure, overwrite) -> dict:
    import os

    from data.base import ensure_bg_masks
    from models.backbones import MEAN_RGB
    from models.zoo import build
    from utils.distributed import detect_launch

    ensure_bg_masks(data, cfg.DATA.SPLIT, min(8, os.cpu_count() or 1), detect_launch())
    devices, ckpt_path, step = start_training(cfg, devices, STAGE, resume, reconfigure, overwrite,
                                         data.classes)
    finished = finished_run(cfg, ckpt_path, step, "Stage 1")
    if finished is not None:
        return finished
    per_device = check_steps(len(dataset), cfg.DATA.BATCH_SIZE, devices, cfg.DATA.SPLIT)
    net = build(model_spec(cfg, "labeler", data.classes), init=cfg.MODEL.INIT)
    loader = train_loader(cfg, dataset, per_device, MEAN_RGB[net.backbone.input_norm],
                          pin_memory=devices.accelerator == "gpu")
    if devices.accelerator == "gpu":
        net = net.to(memory_format=torch.channels_last)
    module = Stage1LitModule(net, cfg)
    ckpt_dir = cfg.run_dir / CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    trainer = make_trainer(cfg, devices, [AtomicCheckpoint(ckpt_dir, cfg.SOLVER.CKPT_EVERY)])
    fit(trainer, module, train_dataloaders=loader, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    final = final_checkpoint(trainer, ckpt_dir, "stage 1", cfg.SOLVER.MAX_ITER)
    if trainer.is_global_zero:
        print(f"Stage 1 done: {trainer.global_step} iterations, checkpoint {final}")
    return {"iterations": trainer.global_step, "checkpoint": str(final), **metrics}
