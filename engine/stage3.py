"""Stage 3: train DeepLab on the pseudo labels with the noise-aware loss (SPEC §4)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from engine.config import Config
from engine.optim import make_optimizer, network_groups
from engine.runs import (CHECKPOINT_DIR, AtomicCheckpoint, check_steps, finished_run,
                         model_spec, start_training)
from engine.training import (BanaLitModule, final_checkpoint, fit, make_trainer,
                             needs_sync_batchnorm)
from utils.errors import BanaError

STAGE = 3


class Stage3LitModule(BanaLitModule):
    """Wraps a built `DeepLab`; trains with `models.losses.compute_loss`, validates mIoU. Its
    checkpoints record the class names, so that predict.py names the classes without the data."""

    STAGE = STAGE

    def __init__(self, net, cfg: Config):
        super().__init__(cfg, net.spec)
        from utils.metrics import ConfusionMatrix

        self.net = net
        self.confmat = ConfusionMatrix(cfg.DATA.NUM_CLASSES)

    def training_step(self, batch, batch_idx):
        from models.losses import compute_loss

        images, labels = batch["image"].float(), batch["label"].long()
        cos = self.net(images, out_size=images.shape[-2:])
        m = self.cfg.MODEL
        losses = compute_loss(m.LOSS, cos, labels[:, 0], labels[:, 1], temperature=m.TEMPERATURE,
                              gamma=m.GAMMA, lam=m.LAMBDA, beta=m.BETA)
        self.finite_watch.update(losses, self.global_step)
        n = images.shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=n)
        return losses["loss"]

    def on_validation_epoch_start(self):
        self.confmat.reset()

    def validation_step(self, batch, batch_idx):
        from engine.inference import single_scale

        images, gt = batch["image"].float(), batch["label"][:, 0]
        pred = single_scale(self.net, images).argmax(1)
        self.confmat.update(pred.cpu(), gt.cpu())

    def on_validation_epoch_end(self):
        # Each process saw a shard of the val split: add the confusion matrices up.
        mat = self.confmat.matrix.to(self.device, torch.float64)
        mat = self.trainer.strategy.reduce(mat, reduce_op="sum")
        self.confmat.matrix.copy_(mat.round().long().cpu())
        metrics = self.confmat.compute()
        self.log("val/miou", float(metrics["miou"]), prog_bar=True, sync_dist=False)
        self.log("val/pixel_acc", float(metrics["pixel_acc"]), sync_dist=False)

    def configure_optimizers(self):
        groups = network_groups(self.net.backbone, [self.net.classifier], self.cfg.SOLVER,
                                self.cfg.MODEL.BACKBONE)
        return make_optimizer(groups, self.cfg.SOLVER)


def read_gt_ids(path: str) -> set[str] | None:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise BanaError(f"DATA.GT_IDS names {p}, which does not exist. Give a text file with "
                        "one image id per line, or set DATA.GT_IDS to '' for no GT masks.")
    return {line.strip() for line in p.read_text().splitlines() if line.strip()}


def pseudo_label_dirs(cfg: Config) -> tuple[str, str]:
    root = cfg.pseudo_label_dir
    dirs = tuple(root / name for name in cfg.DATA.PSEUDO_LABELS)
    for d in dirs:
        if not d.is_dir():
            raise BanaError(
                f"pseudo labels {d} do not exist. Run stage 2 first: python stage2.py "
                f"--config-file configs/stage2.yml --opts DATA.ROOT {cfg.DATA.ROOT} "
                f"DATA.PSEUDO_LABEL_DIR {cfg.DATA.PSEUDO_LABEL_DIR}")
    return str(dirs[0]), str(dirs[1])


def excluded_images(cfg: Config, split_ids) -> set[str]:
    """The images DATA.EXCLUDE leaves out of training (said how many); empty without it."""
    from engine.labels import excluded_ids, read_exclusions

    if not cfg.DATA.EXCLUDE:
        return set()
    exclusions = read_exclusions(cfg.DATA.EXCLUDE, split_ids)
    boxes = sum(1 for v in exclusions.values() if v is not None)
    print(f"DATA.EXCLUDE {cfg.DATA.EXCLUDE}: {len(exclusions)} of {len(split_ids)} images of "
          f"'{cfg.DATA.SPLIT}' left out of training" + (f" ({boxes} of them for a marked box)"
                                                       if boxes else "") + ".", flush=True)
    return excluded_ids(exclusions)


def warn_on_labels(cfg: Config) -> None:
    """Stage 2's warnings about the labels this run trains on, again (they are in the label
    folder's manifest); only those about the variants DATA.PSEUDO_LABELS names."""
    from data.labelset import MANIFEST, LabelSet
    from engine.label_quality import format_warnings

    if not (cfg.pseudo_label_dir / MANIFEST).is_file():
        return
    used = set(cfg.DATA.PSEUDO_LABELS)
    found = [w for w in LabelSet(cfg.pseudo_label_dir).quality.get("warnings", [])
             if any(w.startswith(v) for v in used)]
    if found:
        print(format_warnings(found, str(cfg.pseudo_label_dir)), flush=True)


def open_datasets(cfg: Config):
    """(train, val, class names): the split with its pseudo labels (or GT for DATA.GT_IDS), and
    the images of DATA.VAL_SPLIT that have a ground truth, both without transforms; val is None
    when there are none (box-only data, or DATA.VAL_SPLIT '')."""
    from data.datasets import open_data

    data = open_data(cfg)
    label_dirs = pseudo_label_dirs(cfg)
    gt_ids = read_gt_ids(cfg.DATA.GT_IDS)
    if gt_ids:
        outside = sorted(gt_ids - set(data.split_ids(cfg.DATA.SPLIT)))
        if outside:
            import warnings

            warnings.warn(f"DATA.GT_IDS {cfg.DATA.GT_IDS}: {len(outside)} of {len(gt_ids)} ids "
                          f"are not in the split '{cfg.DATA.SPLIT}' and are ignored (e.g. "
                          f"{', '.join(outside[:3])}).", stacklevel=2)
    excluded = excluded_images(cfg, data.split_ids(cfg.DATA.SPLIT))
    train = data.mask_dataset(cfg.DATA.SPLIT, label_dirs=label_dirs, gt_ids=gt_ids,
                              exclude=excluded)
    warn_on_labels(cfg)
    val = None
    if cfg.DATA.VAL_SPLIT:
        val = data.mask_dataset(cfg.DATA.VAL_SPLIT, only_gt=True)
        total = len(data.split_ids(cfg.DATA.VAL_SPLIT))
        if not len(val):
            val = None
        elif len(val) < total:
            print(f"Validation on the {len(val)} of {total} images of '{cfg.DATA.VAL_SPLIT}' that "
                  "have a ground-truth mask.", flush=True)
    if val is None:
        where = (f"split '{cfg.DATA.VAL_SPLIT}' has no ground-truth masks" if cfg.DATA.VAL_SPLIT
                 else "DATA.VAL_SPLIT is empty")
        print(f"Stage 3 trains without validation: {where}. For a validation score, give some "
              "images of DATA.VAL_SPLIT a mask (they are scored alone), or score the final "
              "model with evaluate.py on a split that has masks.", flush=True)
    return train, val, list(data.classes)


def check_inputs(cfg: Config):
    """Every input of stage 3, checked before a network is built or weights are downloaded;
    returns (train, val datasets, class names)."""
    from engine.preflight import (Problems, require_data_root, require_init, require_unused_weights,
                                  require_writable)

    problems = Problems("stage 3")
    datasets = None
    if problems.passes(lambda: require_data_root(cfg)):
        datasets = problems.check(lambda: open_datasets(cfg))
    problems.check(lambda: read_gt_ids(cfg.DATA.GT_IDS))
    problems.check(lambda: require_unused_weights(cfg, "stage 3", "this run's checkpoint, "
                                                  "for evaluate.py"))
    problems.check(lambda: require_init(cfg.MODEL.INIT))
    problems.check(lambda: require_writable(cfg.run_dir, "OUTPUT_DIR"))
    problems.raise_if_any()
    return datasets


def loaders(cfg: Config, train, val, per_device_batch: int, fill,
            pin_memory: bool = False) -> tuple[DataLoader, DataLoader]:
    from data.base import collate_masks
    from data.transforms import TrainTransform

    train.transform = TrainTransform(cfg.DATA.CROP_SIZE, scale_range=tuple(cfg.DATA.SCALE_RANGE),
                                     flip=cfg.DATA.FLIP,
                                     color_jitter=tuple(cfg.DATA.COLOR_JITTER), fill=fill)
    workers = cfg.DATA.NUM_WORKERS
    train_loader = DataLoader(train, batch_size=per_device_batch, shuffle=True, drop_last=True,
                              num_workers=workers, collate_fn=collate_masks,
                              persistent_workers=workers > 0, pin_memory=pin_memory)
    # Val images differ in size: one at a time, at full resolution (SPEC §5 single scale).
    val_loader = None if val is None else DataLoader(
        val, batch_size=1, shuffle=False, num_workers=min(workers, 2), collate_fn=collate_masks,
        pin_memory=pin_memory)
    return train_loader, val_loader


def run(cfg: Config, *, devices: str = "0", resume: bool = False, reconfigure: bool = False,
        overwrite: bool = False) -> dict:
    """Train stage 3; returns the last validation metrics and the checkpoint paths. Options as
    `engine.stage1.run`'s."""
    from utils.runlock import ReadLock, RunLock

    train, val, classes = check_inputs(cfg)
    # The labels it trains on cannot be deleted or rewritten (stage 2) while it runs.
    with RunLock(cfg.run_dir, "stage 3"), ReadLock(cfg.pseudo_label_dir, "stage 3 (training)"):
        return _train(cfg, train, val, classes, devices, resume, reconfigure, overwrite)


def _train(cfg: Config, train, val, classes, devices, resume, reconfigure, overwrite) -> dict:
    from models.backbones import MEAN_RGB
    from models.zoo import build

    devices, ckpt_path, step = start_training(cfg, devices, STAGE, resume, reconfigure, overwrite,
                                         classes)
    finished = finished_run(cfg, ckpt_path, step, "Stage 3")
    if finished is not None:
        return finished
    per_device = check_steps(len(train), cfg.DATA.BATCH_SIZE, devices, cfg.DATA.SPLIT)
    net = build(model_spec(cfg, "deeplab", classes), init=cfg.MODEL.INIT)
    train_loader, val_loader = loaders(cfg, train, val, per_device,
                                       MEAN_RGB[net.backbone.input_norm],
                                       pin_memory=devices.accelerator == "gpu")
    if devices.accelerator == "gpu":
        net = net.to(memory_format=torch.channels_last)
    module = Stage3LitModule(net, cfg)
    ckpt_dir = cfg.run_dir / CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    validate = val_loader is not None
    val_every = min(cfg.SOLVER.VAL_EVERY, cfg.SOLVER.MAX_ITER) if validate else None
    checkpoint = AtomicCheckpoint(ckpt_dir, cfg.SOLVER.CKPT_EVERY,
                                  monitor="val/miou" if validate else None)
    trainer = make_trainer(cfg, devices, [checkpoint], val_every=val_every,
                           sync_batchnorm=needs_sync_batchnorm(net, devices))
    fit(trainer, module, train_dataloaders=train_loader, val_dataloaders=val_loader,
        ckpt_path=ckpt_path)
    if validate and trainer.global_step % val_every:
        trainer.validate(module, dataloaders=val_loader, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    final = final_checkpoint(trainer, ckpt_dir, "stage 3", cfg.SOLVER.MAX_ITER)
    if trainer.is_global_zero:
        score = (f"val mIoU {metrics.get('val/miou', float('nan')):.2f} (best during training "
                 f"{checkpoint.best:.2f}, selected on val)" if validate else "no validation")
        print(f"Stage 3 done: {trainer.global_step} iterations, {score}, checkpoints in "
              f"{ckpt_dir}")
    return {"iterations": trainer.global_step, "best_miou": checkpoint.best,
            "checkpoint": str(final), **metrics}
