"""Check a stage's inputs before anything expensive (a network built, weights downloaded, worker
processes started) and report every problem at once.

A user with a wrong DATA.ROOT *and* no stage-1 checkpoint learns both from one run:

    problems = Problems("stage 2")
    dataset = problems.check(lambda: open_dataset(cfg))
    problems.check(lambda: require_checkpoint(cfg, "stage 1", ...))
    problems.raise_if_any()
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, TypeVar

from utils.errors import BanaError

T = TypeVar("T")


class Problems:
    """Collects the BanaErrors of independent checks; `raise_if_any` raises one naming them all."""

    def __init__(self, what: str):
        self.what = what
        self.messages: list[str] = []

    def check(self, fn: Callable[[], T]) -> T | None:
        """fn(), or None after recording its BanaError."""
        try:
            return fn()
        except BanaError as e:
            if str(e) not in self.messages:
                self.messages.append(str(e))
            return None

    def passes(self, fn: Callable[[], object]) -> bool:
        """Whether fn() ran without a BanaError (recording it if not)."""
        before = len(self.messages)
        try:
            fn()
        except BanaError as e:
            self.messages.append(str(e))
        return len(self.messages) == before

    def raise_if_any(self) -> None:
        if len(self.messages) == 1:
            raise BanaError(self.messages[0])
        if self.messages:
            listed = "\n".join(f"  {k}. {m}" for k, m in enumerate(self.messages, 1))
            raise BanaError(f"{self.what} cannot start; {len(self.messages)} problems with its "
                            f"inputs:\n{listed}")


def require_data_root(cfg) -> None:
    """DATA.ROOT must be a folder; every other dataset check needs it, so callers skip those
    when this one fails (one message, not five saying the same). Only for the benchmarks
    (PASCAL VOC's own classes, COCO 2017's class maps) does the message say how to download."""
    root = cfg.data_root
    if Path(root).is_dir():
        return
    data = cfg.DATA
    download = ""
    if data.DATASET == "voc" and not data.CLASSES:
        download = " (PASCAL VOC 2012: `bash data/setup_voc.bash PATH` downloads it)"
    elif data.DATASET == "coco" and data.CLASS_MAP != "all":
        download = " (MS-COCO 2017: from https://cocodataset.org)"
    raise BanaError(f"DATA.ROOT {root} does not exist or is not a folder: give the root of "
                    f"your {data.DATASET.upper()}-layout dataset with --opts DATA.ROOT PATH"
                    f"{download}.")


def require_init(init: str, named=("none", "imagenet"),
                 what: str = "a state dict (.pth), or a stage-1 checkpoint (.ckpt)") -> None:
    """A MODEL.INIT that is not one of the `named` initialisations ('imagenet' downloads later,
    'none' is random) must be a file: the path of `what`."""
    if init in named:
        return
    if not Path(os.path.expanduser(init)).is_file():
        raise BanaError(f"MODEL.INIT is {init!r}, which is not a file: expected "
                        f"{', '.join(repr(n) for n in named)}, or the path of {what}.")


def require_checkpoint(path: Path, key: str, fix: str) -> None:
    if not Path(path).is_file():
        raise BanaError(f"{key} names {path}, which does not exist. {fix}")


def require_writable(folder: Path, key: str) -> None:
    """`folder` can be created and written: its nearest existing ancestor is a writable folder."""
    folder = Path(os.path.expanduser(folder))
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise BanaError(f"{key} {folder} cannot be created: {probe} is a file, not a folder. Move "
                        f"the file away, or choose a writable folder instead ({key}).")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BanaError(f"{key} {folder} cannot be written: {probe} is not writable. Fix the "
                        f"permissions, or choose a writable folder instead ({key}).")


def require_unused_weights(cfg, stage: str, scored: str) -> None:
    """Training stages start from MODEL.INIT; MODEL.WEIGHTS names an earlier stage's output for
    stage 2 and evaluate.py, which a training stage ignores. Refused: any MODEL.WEIGHTS for
    stage 1 (`scored` empty), and for stage 3 an existing file that is not a stage-3 checkpoint
    (say, the stage-1 model given in the hope of starting from it). A stage-3 config naming the
    checkpoint evaluate.py will score (`scored`), existing or not yet, is fine."""
    if not cfg.MODEL.WEIGHTS:
        return
    path = cfg.output_path(cfg.MODEL.WEIGHTS)
    if scored:
        # This run's own checkpoint (the usual config), or one not written yet: nothing to read.
        if not path.is_file() or (cfg.run_dir / "checkpoints").resolve() in path.resolve().parents:
            return
        from models.zoo import UnsafeCheckpoint, read_checkpoint_meta

        try:  # the stage alone: no weights read, nothing in the file run
            if read_checkpoint_meta(path)[0] == 3:
                return
        except UnsafeCheckpoint as e:  # a file that would run code is refused wherever named
            raise BanaError(f"MODEL.WEIGHTS: {e} Drop MODEL.WEIGHTS, or name a checkpoint "
                            "stage 3 wrote.") from None
        except BanaError:  # unreadable: evaluate.py will say so; not this check's business
            return
    raise BanaError(f"MODEL.WEIGHTS is {cfg.MODEL.WEIGHTS!r}, but {stage} does not read it (it "
                    "names an earlier stage's output for stage 2 and evaluate.py"
                    + (f"; here only {scored}" if scored else "") + "). To start training from "
                    "a checkpoint, set MODEL.INIT to its path; otherwise drop MODEL.WEIGHTS.")
