"""Stage 1: train the box classifier (`models.labeler.Labeler`) with BAP or GAP (SPEC §2)."""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from engine.common import (CHECKPOINT_DIR, AtomicCheckpoint, FiniteWatch, fit, make_optimizer,
                           make_trainer, network_groups, start_training)
from utils.config import Config

STAGE = 1


class Stage1LitModule(pl.LightningModule):
    """Wraps a built `Labeler`; one step = mean cross-entropy over all fg and bg prototypes."""

    def __init__(self, net, cfg: Config):
        super().__init__()
        self.net = net
        self.cfg = cfg
        self.save_hyperparameters({"config": cfg.to_dict()})
        self.finite_watch = FiniteWatch()

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
        groups = network_groups(self.net.backbone, [self.net.classifier], self.cfg.SOLVER)
        return make_optimizer(groups, self.cfg.SOLVER)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["bana"] = checkpoint_meta(self.net, self.cfg)


def checkpoint_meta(net, cfg: Config) -> dict:
    return {"stage": STAGE, "backbone": cfg.MODEL.BACKBONE, "num_classes": cfg.DATA.NUM_CLASSES,
            "pooling": cfg.MODEL.POOLING, "fc6_dilation": cfg.MODEL.FC6_DILATION,
            "input_norm": net.backbone.input_norm, "config": cfg.to_dict()}


def build_labeler(cfg: Config, init: str | None = None, input_norm: str | None = None):
    from models.backbones import build_backbone
    from models.labeler import Labeler

    backbone = build_backbone(cfg.MODEL.BACKBONE, fc6_dilation=cfg.MODEL.FC6_DILATION,
                              init=cfg.MODEL.INIT if init is None else init,
                              input_norm=cfg.MODEL.INPUT_NORM if input_norm is None
                              else input_norm)
    return Labeler(cfg.DATA.NUM_CLASSES, backbone, pooling=cfg.MODEL.POOLING,
                   roi_size=tuple(cfg.MODEL.ROI_SIZE), grid_size=cfg.MODEL.GRID_SIZE,
                   bg_fraction_min=cfg.MODEL.BG_FRACTION_MIN,
                   roi_sampling=cfg.MODEL.ROI_SAMPLING)


def open_train_dataset(cfg: Config):
    """The box dataset stage 1 trains on (no transform yet)."""
    from data.datasets import open_data

    return open_data(cfg).box_dataset(cfg.DATA.SPLIT)


def check_inputs(cfg: Config):
    """Every input of stage 1, checked before a network is built or weights are downloaded;
    returns the dataset."""
    from engine.preflight import (Problems, require_data_root, require_init, require_unused_weights,
                                  require_writable)

    problems = Problems("stage 1")
    dataset = None
    if problems.passes(lambda: require_data_root(cfg.data_root)):
        dataset = problems.check(lambda: open_train_dataset(cfg))
    problems.check(lambda: require_init(cfg.MODEL.INIT))
    problems.check(lambda: require_unused_weights(cfg, "stage 1", ""))
    problems.check(lambda: require_writable(cfg.run_dir, "OUTPUT_DIR"))
    problems.raise_if_any()
    return dataset


def train_loader(cfg: Config, dataset, per_device_batch: int, fill,
                 pin_memory: bool = False) -> DataLoader:
    from data.transforms import TrainTransform
    from data.voc import collate_boxes

    dataset.transform = TrainTransform(cfg.DATA.CROP_SIZE, scale_range=tuple(cfg.DATA.SCALE_RANGE),
                                       flip=cfg.DATA.FLIP,
                                       color_jitter=tuple(cfg.DATA.COLOR_JITTER), fill=fill)
    return DataLoader(dataset, batch_size=per_device_batch, shuffle=True, drop_last=True,
                      num_workers=cfg.DATA.NUM_WORKERS, collate_fn=collate_boxes,
                      persistent_workers=cfg.DATA.NUM_WORKERS > 0, pin_memory=pin_memory)


def run(cfg: Config, args: argparse.Namespace) -> dict:
    """Train stage 1; returns the final training metrics and the checkpoint path."""
    from utils.runlock import RunLock

    dataset = check_inputs(cfg)
    with RunLock(cfg.run_dir, "stage 1"):
        return _train(cfg, args, dataset)


def _train(cfg: Config, args: argparse.Namespace, dataset) -> dict:
    from models.backbones import MEAN_RGB

    devices, ckpt_path = start_training(cfg, args, STAGE)

    net = build_labeler(cfg)
    per_device = max(1, cfg.DATA.BATCH_SIZE // devices.total)
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
    final = ckpt_dir / "final.ckpt"
    if trainer.is_global_zero:
        print(f"Stage 1 done: {trainer.global_step} iterations, checkpoint {final}")
    return {"iterations": trainer.global_step, "checkpoint": str(final), **metrics}
