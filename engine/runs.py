"""Run folders: what a training run does first (`start_training`), the network its config
describes, its checkpoints (written atomically), and its record (config.yaml), which a resumed
run must match.

    OUTPUT_DIR/NAME/config.yaml                       the resolved config of the run
    OUTPUT_DIR/NAME/checkpoints/{last,final,best_on_val}.ckpt

Every checkpoint file is written to a temporary name and renamed, so a run killed at any moment
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytorch_lightning as pl

from utils.errors import BanaError

CHECKPOINT_DIR = "checkpoints"
# Picked by validation mIoU: scoring it on the validation split is selection on the test data.
BEST_ON_VAL = "best_on_val.ckpt"


def model_spec(cfg, kind: str, classes=None):
    """The `models.zoo.ModelSpec` of the network `kind` this config describes; classes: the
    class names of the data (background first), recorded with the network."""
    from models.zoo import ModelSpec

    m = cfg.MODEL
    common = {"num_classes": cfg.DATA.NUM_CLASSES,
              "classes": tuple(classes) if classes is not None else None}
    if kind == "maskrcnn":
        return ModelSpec(kind, m.BACKBONE, instance_size=tuple(m.INSTANCE_SIZE), **common)
    common.update(input_norm=m.INPUT_NORM, fc6_dilation=m.FC6_DILATION)
    if kind == "labeler":
        return ModelSpec(kind, m.BACKBONE, pooling=m.POOLING, roi_sampling=m.ROI_SAMPLING,
                         roi_size=tuple(m.ROI_SIZE), grid_size=m.GRID_SIZE,
                         bg_fraction_min=m.BG_FRACTION_MIN, **common)
    return ModelSpec(kind, m.BACKBONE, frozen_bn=m.FREEZE_BN, **common)


def check_steps(images: int, batch_size: int, devices, split: str) -> int:
    """The batch each process takes, after checking that a training run can make a step: every
    process gets its share of the split's images (the distributed sampler's ceil(N / processes))
    and drops its last incomplete batch, so a batch larger than that share trains nothing."""
    world = devices.total
    per_device = max(1, batch_size // world)
    share = math.ceil(images / world)
    if share < per_device:
        spread = (f" ({per_device} per process, over {world} processes that take {share} images "
                  "each)" if world > 1 else "")
        most = share * world if world > 1 else images
        raise BanaError(f"DATA.BATCH_SIZE {batch_size}{spread} is more than the {images} images "
                        f"of split '{split}': no training step could be made, and nothing would "
                        f"be trained. Lower DATA.BATCH_SIZE to at most {most}, or train on a "
                        "larger split.")
    return per_device


def match_classes(ckpt, classes, use: str) -> list[int] | None:
    """Compare a checkpoint's class names with the data's, wherever a checkpoint meets data.

    Returns None when they are the same names in the same order, or when the checkpoint records
    none (written before names were recorded: said once); the order to take the checkpoint's
    outputs in (data class k = checkpoint class order[k]) when the same names come in another
    order (said, and mapped by name); a BanaError naming both lists otherwise. use: what the
    checkpoint is for here ("stage 2", "evaluate.py"), for the messages.
    """
    classes = tuple(classes)
    stored = ckpt.spec.classes
    if stored is None:
        print(f"note: {ckpt.path} records no class names (written before they were recorded); "
              f"{use} assumes its classes are the data's: {', '.join(classes[1:])}.")
        return None
    if tuple(stored) == classes:
        return None
    if sorted(stored) == sorted(classes) and len(set(classes)) == len(classes):
        order = [stored.index(name) for name in classes]
        print(f"note: {ckpt.path} numbers the classes in another order than the data "
              f"({', '.join(stored[1:])} against {', '.join(classes[1:])}); {use} maps them by "
              "name.")
        return order
    missing = sorted(set(classes) - set(stored))
    extra = sorted(set(stored) - set(classes))
    raise BanaError(f"{ckpt.path} was trained on the classes {', '.join(stored[1:])}, but the data "
                    f"has {', '.join(classes[1:])}"
                    + (f" (the model lacks {', '.join(missing)}" if missing else " (")
                    + ("; " if missing and extra else "")
                    + (f"the data lacks {', '.join(extra)})" if extra else ")")
                    + f": {use} would score or label one class as another. Use a model trained "
                    "on these classes, or check DATA.CLASSES / DATA.CLASS_MAP / the annotation "
                    "files.")


def reorder_classifier(net, order: list[int] | None):
    """The network with its classifier's rows taken in `order` (see `match_classes`), so that
    output k is the data's class k."""
    if order is not None:
        import torch

        with torch.no_grad():
            net.classifier.weight.copy_(net.classifier.weight[order])
    return net


def expectations(cfg) -> dict:
    """What a checkpoint read for this config must match: {spec field: (config key, value)}.

    Stage 2, evaluate.py and predict.py build the network from the checkpoint's description, so
    MODEL.FC6_DILATION and MODEL.INPUT_NORM do not act there; a value that contradicts the
    checkpoint is refused rather than ignored. Only values set away from their defaults (1,
    'auto') are compared, so configs that leave them alone, old ones included, keep working."""
    m = cfg.MODEL
    expect = {"backbone": ("MODEL.BACKBONE", m.BACKBONE),
              "num_classes": ("DATA.NUM_CLASSES", cfg.DATA.NUM_CLASSES)}
    if m.TASK == "semantic":
        defaults = type(m)()
        if m.FC6_DILATION != defaults.FC6_DILATION:
            expect["fc6_dilation"] = ("MODEL.FC6_DILATION", m.FC6_DILATION)
        if m.INPUT_NORM != defaults.INPUT_NORM:
            expect["input_norm"] = ("MODEL.INPUT_NORM", m.INPUT_NORM)
    return expect


def check_watch(trainer, pl_module) -> None:
    """The module's `finite_watch.check` (engine/training.py's FiniteCheck), if it has one."""
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


def _held_checkpoints(cfg) -> list[Path]:
    folder = cfg.run_dir / CHECKPOINT_DIR
    return sorted(folder.glob("*.ckpt")) if folder.is_dir() else []


def _describe_checkpoints(paths: list[Path]) -> str:
    """'final.ckpt (iteration 600), last.ckpt (iteration 600)': what a run folder holds."""
    from models.zoo import read_checkpoint_meta

    described = []
    for path in paths:
        try:  # the iterations alone: no weights read, nothing in the file run
            described.append(f"{path.name} (iteration {read_checkpoint_meta(path)[1]})")
        except BanaError:
            described.append(f"{path.name} (unreadable)")
    return ", ".join(described)


def resume_path(cfg, resume: bool, stage: int, overwrite: bool = False,
                main: bool = True, classes=None) -> tuple[str | None, int]:
    """The checkpoint to resume from, or None for a fresh run.

    A run folder's checkpoints are never replaced without a flag: a fresh run refuses to start
    in a folder holding any checkpoint (the finished run's final.ckpt as much as last.ckpt)
    unless `overwrite`, which deletes them first; `resume` needs a last.ckpt, and says what the
    folder holds when there is none. The checkpoint resumed from must be this stage's, with the
    configured backbone and classes: Lightning would otherwise load whatever weights happen to
    fit, or fail with a traceback. Only the `main` process of a multi-process run deletes.
    """
    if resume and overwrite:
        raise BanaError("--resume continues a run and --overwrite starts it again: give one.")
    last = cfg.run_dir / CHECKPOINT_DIR / "last.ckpt"
    held = _held_checkpoints(cfg)
    if resume:
        if last.is_file():
            step = check_resumable(last, cfg, stage, classes)
            print(f"Resuming from {last}.")
            return str(last), step
        if held:
            raise BanaError(
                f"--resume: {cfg.run_dir} has no checkpoints/last.ckpt to continue from; it holds "
                f"{_describe_checkpoints(held)}. A finished run's final.ckpt is the model to use "
                "as it is (evaluate.py); to train the run again from iteration 0 pass "
                "--overwrite instead of --resume (its checkpoints are deleted), or choose another "
                "NAME (--opts NAME my_run).")
        raise BanaError(f"--resume: {cfg.run_dir} holds no checkpoint to continue from (nothing "
                        "was trained there yet): start the run without --resume.")
    if held and not overwrite:
        raise BanaError(
            f"{cfg.run_dir} already holds a run ({_describe_checkpoints(held)}). Pass --resume "
            "to continue it, --overwrite to train it again from the start (its checkpoints are "
            "deleted), or choose another OUTPUT_DIR/NAME (--opts NAME my_run).")
    if held and main:
        for path in held:
            path.unlink()
        print(f"--overwrite: deleted {', '.join(p.name for p in held)} in "
              f"{cfg.run_dir / CHECKPOINT_DIR}; training starts again from iteration 0.")
    return None, 0


def check_resumable(path: Path, cfg, stage: int, classes=None) -> int:
    """Check the checkpoint fits the config (and the data's class names, in the same order);
    returns the iterations it has trained."""
    from models.zoo import read_checkpoint

    hint = (f"A resumed run continues the run as it was trained: move {cfg.run_dir} away to "
            "start over, or choose another OUTPUT_DIR/NAME (--opts NAME my_run).")
    ckpt = read_checkpoint(path, stage=stage, expect=expectations(cfg), hint=hint)
    if classes is not None and ckpt.spec.classes is not None \
            and tuple(ckpt.spec.classes) != tuple(classes):
        raise BanaError(f"cannot resume from {path}: it was trained on the classes "
                        f"{', '.join(ckpt.spec.classes[1:])}, but the data now has "
                        f"{', '.join(tuple(classes)[1:])}. {hint}")
    return ckpt.step


# Keys that say where things are or how often to log, not what the run computes: a resumed run
# may change them freely. Every other key is part of the run's record (its config.yaml).
OPERATIONAL_KEYS = ("OUTPUT_DIR", "DATA.ROOT", "DATA.NUM_WORKERS", "DATA.PSEUDO_LABEL_DIR",
                    "DATA.BG_MASK_DIR",
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


# Keys added to the schema after runs were recorded without them, with the value that behaves as
# those runs did where that is not the key's default (the default changed the behaviour).
ADDED_KEYS = {"DATA.BOX_ARITHMETIC": "pixel_edges", "SOLVER.PARAM_GROUPS": "four"}


def record_differences(recorded: dict, cfg) -> list[tuple[str, object, object]]:
    """(key, recorded value, new value) for every run-defining key that differs. A key the
    record lacks was added to the schema after the run started: the record counts as holding
    the value that behaves as the run did (ADDED_KEYS, else the key's default)."""
    defaults = {**_flatten(type(cfg)().to_dict()), **ADDED_KEYS}
    new = _flatten(cfg.to_dict())
    old = {**{k: v for k, v in defaults.items() if k in new}, **_flatten(recorded)}
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if not k.startswith(OPERATIONAL_KEYS) and old.get(k) != new.get(k)]


def describe_differences(diffs) -> str:
    return "; ".join(f"{k}: {a!r} recorded, {b!r} now" for k, a, b in diffs[:8]) + (
        f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else "")


def check_resume_record(cfg, step: int, reconfigure: bool) -> list:
    """A resumed run continues the recorded one: the same run-defining keys (unless
    --reconfigure) and a MAX_ITER not below what the checkpoint already trained. Returns the
    differences --reconfigure accepts; nothing is written here (`write_record` does, once the
    resumed run has started)."""
    import yaml

    if cfg.SOLVER.MAX_ITER < step:
        raise BanaError(f"cannot resume {cfg.run_dir}: its checkpoint has trained {step} "
                        f"iterations, more than SOLVER.MAX_ITER {cfg.SOLVER.MAX_ITER}. Set "
                        f"SOLVER.MAX_ITER to at least {step} (the recorded run has "
                        f"{_recorded_max_iter(cfg)}), or use checkpoints/final.ckpt as it is.")
    path = cfg.run_dir / "config.yaml"
    if not path.is_file():
        return []
    recorded = yaml.safe_load(path.read_text()) or {}
    diffs = record_differences(recorded, cfg)
    if diffs and not reconfigure:
        raise BanaError(f"cannot resume {cfg.run_dir} with other settings than it was trained "
                        f"with ({path}): {describe_differences(diffs)}. Either resume with the "
                        "recorded settings, start a new run in another folder (--opts NAME "
                        "new_run), or pass --reconfigure to continue this run with the new "
                        "settings (the old record is kept as config.<n>.yaml).")
    return diffs


def write_record(cfg, diffs) -> None:
    """Save the run's resolved config as its record; the differences --reconfigure accepted
    (`check_resume_record`) first move the previous record to config.<n>.yaml."""
    path = cfg.run_dir / "config.yaml"
    if diffs and path.is_file():
        n = 1
        while (cfg.run_dir / f"config.{n}.yaml").exists():
            n += 1
        os.replace(path, cfg.run_dir / f"config.{n}.yaml")
        print(f"--reconfigure: {describe_differences(diffs)}; the previous record is "
              f"config.{n}.yaml.")
    cfg.save()


class RecordOnStart(pl.Callback):
    """Writes a resumed run's record (`write_record`) when training starts, after Lightning has
    restored the checkpoint: a resume that fails before (a checkpoint that cannot be restored, a
    batch the split cannot fill) leaves config.yaml as it was, so that the same command, or the
    recorded settings, can be tried again."""

    def __init__(self, cfg, diffs):
        self.cfg, self.diffs = cfg, diffs

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero and self.cfg is not None:
            write_record(self.cfg, self.diffs)
            self.cfg = None  # once


# Resumed runs whose record waits for their training to start, by run folder: `start_training`
# adds one, `pending_record` (called by `engine.training.make_trainer`) hands it to the trainer.
_PENDING_RECORDS: dict[str, RecordOnStart] = {}


def pending_record(cfg) -> list[pl.Callback]:
    """The `RecordOnStart` callback a resumed run of `cfg` waits on, or none."""
    pending = _PENDING_RECORDS.pop(str(cfg.run_dir.resolve()), None)
    return [pending] if pending is not None else []


def _recorded_max_iter(cfg):
    import yaml

    path = cfg.run_dir / "config.yaml"
    if path.is_file():
        return (yaml.safe_load(path.read_text()) or {}).get("SOLVER", {}).get("MAX_ITER", "?")
    return "?"


def start_training(cfg, devices: str, stage: int, resume: bool, reconfigure: bool,
                   overwrite: bool = False, classes=None):
    """What every training run does first, holding the run folder's lock: clean what a killed
    run left, pick devices, decide fresh vs resume (a resume must match the run's record; see
    `resume_path` for `overwrite`; classes: the data's class names, which a resumed checkpoint
    must have), seed, and save the resolved config (a resumed run's once its training has
    started: `RecordOnStart`, through `make_trainer`). Returns (Devices, checkpoint to resume from
    or None, the iterations it has trained)."""
    from utils.devices import resolve_devices
    from utils.distributed import detect_launch
    from utils.precision import check_precision
    from utils.runlock import clean_temporary_files

    _PENDING_RECORDS.pop(str(cfg.run_dir.resolve()), None)  # left by a resume that failed
    launch = detect_launch()
    resolved = resolve_devices(devices, launch=launch)
    check_precision(cfg.TRAINER.PRECISION, resolved.accelerator)
    if launch.is_main:
        print(resolved.note)
        clean_temporary_files(cfg.run_dir)
    ckpt_path, step = resume_path(cfg, resume, stage, overwrite, launch.is_main, classes)
    if ckpt_path is not None and step == cfg.SOLVER.MAX_ITER:
        return resolved, ckpt_path, step  # finished (`finished_run`): its record stays as it is
    diffs = []
    if ckpt_path is not None and launch.is_main:
        diffs = check_resume_record(cfg, step, reconfigure)
    # python's, numpy's and torch's generators, and the data loaders' workers.
    pl.seed_everything(cfg.SEED, workers=True, verbose=False)
    if launch.is_main:
        if ckpt_path is None:
            cfg.save()
        else:  # written once the checkpoint is restored (`RecordOnStart`)
            _PENDING_RECORDS[str(cfg.run_dir.resolve())] = RecordOnStart(cfg, diffs)
    return resolved, ckpt_path, step


def finished_run(cfg, ckpt_path, step: int, stage_name: str) -> dict | None:
    """A resumed run whose last.ckpt already trained SOLVER.MAX_ITER iterations has nothing left
    to do: say so (rather than report a score of nothing) and return the stage's result; None
    when there is training to do. A final.ckpt missing or older than last.ckpt (the run stopped
    between writing the two) is written from last.ckpt, which holds the same at the end."""
    if ckpt_path is None or step != cfg.SOLVER.MAX_ITER:
        return None
    from utils.distributed import detect_launch

    final = cfg.run_dir / CHECKPOINT_DIR / "final.ckpt"
    if detect_launch().is_main:
        if not final.is_file() or _checkpoint_step(final) != step:
            tmp = final.with_name(f".{final.name}.tmp")
            shutil.copyfile(ckpt_path, tmp)
            os.replace(tmp, final)
            print(f"{stage_name}: wrote {final} from last.ckpt (the run had stopped between "
                  "saving the two).")
        print(f"{stage_name}: {cfg.run_dir} already finished its {step} iterations; nothing to "
              f"train. Its model is {final}. To train longer, raise SOLVER.MAX_ITER and pass "
              "--resume --reconfigure.")
    return {"iterations": step, "checkpoint": str(final), "already_finished": True}


def _checkpoint_step(path: Path) -> int | None:
    from models.zoo import read_checkpoint_meta

    try:
        return read_checkpoint_meta(path)[1]
    except BanaError:
        return None
