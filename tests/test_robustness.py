"""Reliability of the entry points (issue 8): bad inputs, killed runs, non-finite losses and two
stage-2 runs writing the same folder.

The bad-input table runs every script as a user would, as a subprocess from the repository root,
and expects exit status 2, one paragraph on stderr naming the file or key and the fix, and no
traceback. Each process pays a few seconds for importing torch, so the table runs as one batch,
a few processes at a time, and each case is then checked as its own test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.optim import lr_factor
from engine.config import load_config
from utils.errors import BanaError
from utils.io import atomic_write_png, read_index_png

REPO = Path(__file__).resolve().parents[1]
PARALLEL = 3
# Small enough for a 2-core CPU; 3 iterations of batch 4 visit all 12 synthetic train images.
FAST = ["DATA.CROP_SIZE", "48", "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0",
        "SOLVER.LOG_EVERY", "1"]


def write_pseudo_labels(root: Path, split: str) -> None:
    """Y_crf = GT with the void band as background, Y_ret = Y_crf with its top quarter erased:
    two plausible, different label maps for stage 3."""
    for i in (root / "ImageSets/Segmentation" / f"{split}.txt").read_text().split():
        gt = read_index_png(root / "SegmentationClassAug" / f"{i}.png")
        y = np.where(gt == 255, 0, gt).astype(np.uint8)
        atomic_write_png(root / "Generation/Y_crf" / f"{i}.png", y)
        y[: y.shape[0] // 4] = 0
        atomic_write_png(root / "Generation/Y_ret" / f"{i}.png", y)


@pytest.fixture(scope="module")
def labelled_voc(synthetic_voc, tmp_path_factory) -> Path:
    """The synthetic tree plus pseudo labels of its train split, for stage 3."""
    root = Path(shutil.copytree(synthetic_voc, tmp_path_factory.mktemp("labelled") / "VOC"))
    write_pseudo_labels(root, "train")
    return root


@pytest.fixture(scope="module")
def artifacts(synthetic_voc, labelled_voc, tmp_path_factory):
    """The trees and a 2-iteration stage-1 and stage-3 checkpoint."""
    from engine.stage1 import run as run_stage1
    from engine.stage3 import run as run_stage3

    out = tmp_path_factory.mktemp("checkpoints")
    run_stage1(load_config(REPO / "configs/demo/stage1.yml", [
        "DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR", str(out), *FAST,
        "SOLVER.MAX_ITER", "2", "SOLVER.MILESTONES", "[1]"]), devices="cpu")
    run_stage3(load_config(REPO / "configs/demo/stage3.yml", [
        "DATA.ROOT", str(labelled_voc), "OUTPUT_DIR", str(out), *FAST,
        "SOLVER.MAX_ITER", "2", "SOLVER.VAL_EVERY", "2"]), devices="cpu")
    return {"voc": synthetic_voc, "labelled": labelled_voc,
            "stage1": out / "stage1/checkpoints/final.ckpt",
            "stage3": out / "stage3/checkpoints/final.ckpt"}


@dataclass
class Env:
    """What a bad-input case may use: a private folder, the pristine trees, the checkpoints."""

    tmp: Path
    voc: Path
    labelled: Path
    stage1_ckpt: Path
    stage3_ckpt: Path

    def copy(self, tree: Path | None = None) -> Path:
        """A private copy of a dataset tree (default: the synthetic one) to damage."""
        return Path(shutil.copytree(tree or self.voc, self.tmp / "VOC"))

    def config(self, template: str, text: str) -> Path:
        """A config file: a shipped demo config with the keys of `text` merged in (its values
        win), written as one YAML mapping (a section written twice is itself an error)."""
        import yaml

        def merge(base, extra):
            for key, value in extra.items():
                if isinstance(value, dict) and isinstance(base.get(key), dict):
                    merge(base[key], value)
                else:
                    base[key] = value
            return base

        base = yaml.safe_load((REPO / "configs/demo" / template).read_text())
        try:
            extra = yaml.safe_load(text)
        except yaml.YAMLError:  # deliberately broken YAML: append it as it is
            return self.raw_config(template, text)
        path = self.tmp / "config.yml"
        path.write_text(yaml.safe_dump(merge(base, extra or {}), sort_keys=False))
        return path

    def raw_config(self, template: str, text: str) -> Path:
        """A config file: a shipped demo config with `text` appended verbatim."""
        path = self.tmp / "config.yml"
        path.write_text((REPO / "configs/demo" / template).read_text() + "\n" + text)
        return path

    def a_file(self) -> Path:
        """A regular file, so that any folder below it cannot be created, even by root."""
        path = self.tmp / "a_file"
        path.write_text("not a folder\n")
        return path


def stage1(env: Env, *opts: str, root=None, config="configs/demo/stage1.yml", flags=(),
           gpu="cpu"):
    return ["stage1.py", "--config-file", str(config), "--gpu-id", gpu, *flags, "--opts",
            "DATA.ROOT", str(root or env.voc), "OUTPUT_DIR", str(env.tmp / "runs"), *FAST,
            "SOLVER.MAX_ITER", "3", "SOLVER.MILESTONES", "[2]", *opts]


def stage2(env: Env, *opts: str, root=None, config="configs/demo/stage2.yml", flags=(),
           gpu="cpu", workers=1):
    return ["stage2.py", "--config-file", str(config), "--gpu-id", gpu, "--workers", str(workers),
            *flags, "--opts", "DATA.ROOT", str(root or env.voc), "OUTPUT_DIR",
            str(env.tmp / "runs"), "DATA.NUM_WORKERS", "0", "DATA.SPLIT", "val",
            "DATA.PSEUDO_LABEL_DIR", str(env.tmp / "Generation"),
            "MODEL.WEIGHTS", str(env.stage1_ckpt), *opts]


def stage3(env: Env, *opts: str, root=None, config="configs/demo/stage3.yml", flags=(),
           gpu="cpu"):
    return ["stage3.py", "--config-file", str(config), "--gpu-id", gpu, *flags, "--opts",
            "DATA.ROOT", str(root or env.labelled), "OUTPUT_DIR", str(env.tmp / "runs"), *FAST,
            "SOLVER.MAX_ITER", "3", "SOLVER.VAL_EVERY", "3", *opts]


def evaluate(env: Env, *opts: str, root=None, config="configs/demo/stage3.yml", flags=(),
             checkpoint=None, gpu="cpu", workers=0):
    return ["evaluate.py", "--config-file", str(config), "--gpu-id", gpu, "--workers", str(workers),
            "--checkpoint", str(checkpoint or env.stage3_ckpt), *flags, "--opts",
            "DATA.ROOT", str(root or env.voc), "OUTPUT_DIR", str(env.tmp / "runs"),
            "DATA.NUM_WORKERS", "0", "TEST.SCALES", "[1.0]", "TEST.FLIP", "false",
            "TEST.CRF", "false", *opts]


def write_noise_jpeg(path: Path, height: int, width: int) -> None:
    from utils.io import atomic_write_jpeg

    atomic_write_jpeg(path, np.random.default_rng(0).integers(0, 256, (height, width, 3),
                                                              dtype=np.uint8))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def set_label_value(path: Path, value: int) -> None:
    label = read_index_png(path)
    label[:4, :4] = value
    atomic_write_png(path, label)


# Each case damages its own copy of what it needs and returns (argv, what the message must name,
# the fix it must give). Strings are compared with the message's line wrapping undone.
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


@case
def unknown_key_in_yaml(env):
    config = env.config("stage1.yml", "SOLVER:\n  MAX_ITERS: 10\n")
    return stage1(env, config=config), [str(config), "'SOLVER.MAX_ITERS'"], "SOLVER.MAX_ITER,"


@case
def unknown_key_in_opts(env):
    return stage3(env, "MODEL.LOS", "nal"), ["'MODEL.LOS'"], "configs/README.md"


@case
def wrong_type_in_opts(env):
    return stage1(env, "SOLVER.MAX_ITER", "ten"), ["SOLVER.MAX_ITER"], "expected an integer"


@case
def wrong_type_in_yaml(env):
    config = env.config("stage2.yml", "MODEL:\n  DCRF: 4\n")
    return stage2(env, config=config), [str(config), "MODEL.DCRF"], "expected a list of float"


@case
def impossible_value(env):
    return stage3(env, "SOLVER.LR", "-0.1"), ["SOLVER.LR"], "> 0"


@case
def invalid_yaml(env):
    config = env.config("stage2.yml", "DATA: [unclosed\n")
    return stage2(env, config=config), [str(config)], "not valid YAML"


@case
def missing_config_file(env):
    config = env.tmp / "nowhere.yml"
    return evaluate(env, config=config), [str(config)], "configs/demo/stage1.yml"


@case
def missing_data_root(env):
    root = env.tmp / "no_dataset"
    return stage1(env, root=root), [f"DATA.ROOT {root}"], "data/synthetic.py"


@case
def missing_init_weights(env):
    path = env.tmp / "vgg_caffe.pth"
    return stage1(env, "MODEL.INIT", str(path)), [str(path)], "MODEL.INIT"


@case
def missing_stage1_checkpoint(env):
    path = env.tmp / "stage1/final.ckpt"
    return stage2(env, "MODEL.WEIGHTS", str(path)), [str(path)], "python stage1.py"


@case
def missing_gt_ids_file(env):
    path = env.tmp / "gt_ids.txt"
    return (stage3(env, "DATA.GT_IDS", str(path)), ["DATA.GT_IDS", str(path)],
            "one image id per line")


@case
def missing_stage3_checkpoint(env):
    path = env.tmp / "best.ckpt"
    return evaluate(env, checkpoint=path), [str(path)], "python stage3.py"


@case
def missing_background_masks(env):
    root = env.copy()
    shutil.rmtree(root / "BgMaskfromBoxes")
    return stage1(env, root=root), ["BgMaskfromBoxes"], "python data/voc_bbox_setup.py"


@case
def missing_pseudo_label_file(env):
    root = env.copy(env.labelled)
    path = root / "Generation/Y_ret/train_00004.png"
    path.unlink()
    return stage3(env, root=root), [str(path)], "python stage2.py"


@case
def empty_split_for_stage1(env):
    root = env.copy()
    (root / "ImageSets/Segmentation/train_aug.txt").write_text("\n")
    return stage1(env, root=root), ["train_aug.txt is empty"], "one image id per line"


@case
def empty_val_split_for_stage3(env):
    root = env.copy(env.labelled)
    (root / "ImageSets/Segmentation/val.txt").write_text("")
    return stage3(env, root=root), ["val.txt is empty"], "one image id per line"


@case
def empty_split_for_evaluate(env):
    root = env.copy()
    (root / "ImageSets/Segmentation/val.txt").write_text("  \n")
    return evaluate(env, root=root), ["val.txt is empty"], "one image id per line"


@case
def empty_split_for_bbox_setup(env):
    root = env.copy()
    (root / "ImageSets/Segmentation/train.txt").write_text("")
    return (["data/voc_bbox_setup.py", "--data-root", str(root), "--splits", "train"],
            ["train.txt is empty"], "one image id per line")


@case
def background_mask_size_mismatch(env):
    root = env.copy()
    path = root / "BgMaskfromBoxes/train_00002.png"
    atomic_write_png(path, np.ones((40, 64), np.uint8))
    return stage1(env, root=root), [str(path), "64x40"], "python data/voc_bbox_setup.py"


@case
def pseudo_label_size_mismatch(env):
    root = env.copy(env.labelled)
    path = root / "Generation/Y_crf/train_00005.png"
    atomic_write_png(path, np.zeros((64, 50), np.uint8))
    return stage3(env, root=root), [str(path), "50x64"], "python stage2.py"


@case
def image_size_mismatch_for_evaluate(env):
    root = env.copy()
    path = root / "JPEGImages/val_00003.jpg"
    write_noise_jpeg(path, 60, 64)
    return evaluate(env, root=root), [str(path), "64x60"], "re-create the label"


@case
def prediction_size_mismatch(env):
    pred = env.tmp / "pred"
    for i in (env.voc / "ImageSets/Segmentation/val.txt").read_text().split():
        atomic_write_png(pred / f"{i}.png", np.zeros((64, 64 if i != "val_00001" else 32),
                                                     np.uint8))
    return (["evaluate.py", "--pred-dir", str(pred), "--data-root", str(env.voc)],
            [str(pred / "val_00001.png"), "32x64"], "at the full size of its image")


@case
def corrupt_jpeg_in_a_loader_worker(env):
    root = env.copy()
    path = root / "JPEGImages/train_00007.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return stage1(env, "DATA.NUM_WORKERS", "1", root=root), [str(path)], "Re-create"


@case
def truncated_jpeg_for_stage3(env):
    root = env.copy(env.labelled)
    path = root / "JPEGImages/train_00003.jpg"
    truncate(path, 0.4)
    return stage3(env, root=root), [str(path)], "Re-create"


@case
def corrupt_jpeg_for_stage2(env):
    root = env.copy()
    path = root / "JPEGImages/val_00000.jpg"
    path.write_bytes(b"GIF89a garbage")
    return stage2(env, root=root), [str(path)], "Re-create"


@case
def corrupt_jpeg_for_bbox_setup(env):
    root = env.copy()
    shutil.rmtree(root / "BgMaskfromBoxes")
    path = root / "JPEGImages/train_00001.jpg"
    path.write_bytes(b"")
    return (["data/voc_bbox_setup.py", "--data-root", str(root), "--workers", "1"], [str(path)],
            "Re-create")


@case
def corrupt_pseudo_label(env):
    root = env.copy(env.labelled)
    path = root / "Generation/Y_crf/train_00008.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return stage3(env, root=root), [str(path)], "Re-create"


@case
def corrupt_ground_truth(env):
    root = env.copy()
    path = root / "SegmentationClassAug/val_00002.png"
    truncate(path, 0.3)
    return evaluate(env, root=root), [str(path)], "Re-create"


@case
def colour_pseudo_label(env):
    root = env.copy(env.labelled)
    path = root / "Generation/Y_ret/train_00000.png"
    atomic_write_png(path, np.zeros((64, 64, 3), np.uint8))
    return stage3(env, root=root), [str(path)], "'P' or greyscale 'L'"


@case
def pseudo_label_value_out_of_range(env):
    root = env.copy(env.labelled)
    path = root / "Generation/Y_crf/train_00006.png"
    set_label_value(path, 30)
    return stage3(env, root=root), [str(path), "values 30"], "DATA.NUM_CLASSES"


@case
def ground_truth_value_out_of_range(env):
    root = env.copy()
    path = root / "SegmentationClassAug/val_00004.png"
    set_label_value(path, 21)
    return evaluate(env, root=root), [str(path), "values 21"], "DATA.NUM_CLASSES"


@case
def prediction_value_out_of_range(env):
    pred = env.tmp / "pred"
    for i in (env.voc / "ImageSets/Segmentation/val.txt").read_text().split():
        atomic_write_png(pred / f"{i}.png", np.full((64, 64), 255 if i == "val_00005" else 0,
                                                    np.uint8))
    return (["evaluate.py", "--pred-dir", str(pred), "--data-root", str(env.voc)],
            [str(pred / "val_00005.png"), "255"], "class ids only")


@case
def stage3_checkpoint_for_stage2(env):
    return (stage2(env, "MODEL.WEIGHTS", str(env.stage3_ckpt)),
            [str(env.stage3_ckpt), "stage 3"], "python stage1.py")


@case
def other_backbone_for_stage2(env):
    return (stage2(env, "MODEL.BACKBONE", "vgg16"), [str(env.stage1_ckpt), "'tiny'"],
            "MODEL.BACKBONE tiny")


@case
def stage1_checkpoint_for_evaluate(env):
    return (evaluate(env, checkpoint=env.stage1_ckpt), [str(env.stage1_ckpt), "stage 1"],
            "python stage3.py")


@case
def other_backbone_for_evaluate(env):
    return evaluate(env, "MODEL.BACKBONE", "resnet101"), ["MODEL.BACKBONE", "'tiny'"], "config"


@case
def garbage_checkpoint(env):
    path = env.tmp / "final.ckpt"
    path.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    return stage2(env, "MODEL.WEIGHTS", str(path)), [str(path)], "python stage1.py"


@case
def resume_from_another_stage(env):
    ckpt_dir = env.tmp / "runs/stage3/checkpoints"
    ckpt_dir.mkdir(parents=True)
    shutil.copy(env.stage1_ckpt, ckpt_dir / "last.ckpt")
    return (stage3(env, flags=["--resume"]), [str(ckpt_dir / "last.ckpt"), "stage 1"],
            "--opts NAME")


@case
def resume_with_another_backbone(env):
    ckpt_dir = env.tmp / "runs/stage3/checkpoints"
    ckpt_dir.mkdir(parents=True)
    shutil.copy(env.stage3_ckpt, ckpt_dir / "last.ckpt")
    return (stage3(env, "MODEL.BACKBONE", "vgg16", flags=["--resume"]),
            [str(ckpt_dir / "last.ckpt"), "'tiny'", "MODEL.BACKBONE"], "--opts NAME")


@case
def resume_from_truncated_checkpoint(env):
    ckpt_dir = env.tmp / "runs/stage1/checkpoints"
    ckpt_dir.mkdir(parents=True)
    shutil.copy(env.stage1_ckpt, ckpt_dir / "last.ckpt")
    truncate(ckpt_dir / "last.ckpt")
    return stage1(env, flags=["--resume"]), [str(ckpt_dir / "last.ckpt")], "--opts NAME"


@case
def gpu_3_for_stage1(env):
    return stage1(env, gpu="3"), ["--gpu-id 3"], "--gpu-id cpu"


@case
def gpu_3_for_evaluate(env):
    return evaluate(env, gpu="3"), ["--gpu-id 3"], "--gpu-id cpu"


@case
def output_dir_under_a_file_for_stage1(env):
    out = env.a_file() / "runs"
    argv = stage1(env, "OUTPUT_DIR", str(out))
    return argv, [str(env.a_file())], "writable folder"


@case
def label_dir_under_a_file_for_stage2(env):
    out = env.a_file() / "Generation"
    return stage2(env, "DATA.PSEUDO_LABEL_DIR", str(out)), [str(env.a_file())], "writable folder"


@case
def output_dir_under_a_file_for_evaluate(env):
    out = env.a_file() / "runs"
    return evaluate(env, "OUTPUT_DIR", str(out)), [str(env.a_file())], "writable folder"


@case
def report_dir_under_a_file_for_evaluate(env):
    pred = env.voc / "SegmentationClassAug"
    out = env.a_file() / "report"
    return (["evaluate.py", "--pred-dir", str(pred), "--data-root", str(env.voc), "--out",
             str(out)], [str(env.a_file())], "writable folder")


@case
def out_under_a_file_for_synthetic(env):
    out = env.a_file() / "synthetic"
    return (["data/synthetic.py", "--out", str(out), "--n-train", "1", "--n-val", "1"],
            [str(env.a_file())], "writable folder")


@case
def mask_folder_is_a_file_for_bbox_setup(env):
    root = env.copy()
    shutil.rmtree(root / "BgMaskfromBoxes")
    (root / "BgMaskfromBoxes").write_text("")
    return (["data/voc_bbox_setup.py", "--data-root", str(root), "--workers", "1"],
            [str(root / "BgMaskfromBoxes")], "writable folder")


@case
def foreign_folder_for_synthetic(env):
    out = env.tmp / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    return ["data/synthetic.py", "--out", str(out)], [str(out)], "empty or new folder"


@case
def unknown_class_for_synthetic(env):
    return (["data/synthetic.py", "--out", str(env.tmp / "s"), "--classes", "cat", "unicorn"],
            ["unicorn"], "expected VOC class names")


@case
def missing_root_for_bbox_setup(env):
    root = env.tmp / "VOC2012"
    return ["data/voc_bbox_setup.py", "--data-root", str(root)], [str(root)], "setup_voc.bash"


@case
def malformed_annotation(env):
    root = env.copy()
    shutil.rmtree(root / "BgMaskfromBoxes")
    path = root / "Annotations/train_00003.xml"
    path.write_text("<annotation><object><name>cat</name>")
    return (["data/voc_bbox_setup.py", "--data-root", str(root), "--workers", "1"], [str(path)],
            "re-create or re-download it")


@case
def no_crf_workers_for_stage2(env):
    return stage2(env, workers=0), ["--workers 0"], "at least 1"


# --- issue 16, class 1: reporting paths read ground truth the code never expected --------------

def crop_png(path: Path, rows: int = 4) -> None:
    atomic_write_png(path, read_index_png(path)[:-rows])


@case
def cropped_gt_in_the_stage2_report(env):
    root = env.copy()
    gt = root / "SegmentationClassAug/val_00002.png"
    crop_png(gt)
    return stage2(env, root=root), [str(gt), "ground truth"], "re-create it"


@case
def gt_value_out_of_range_in_the_stage2_report(env):
    root = env.copy()
    gt = root / "SegmentationClassAug/val_00001.png"
    set_label_value(gt, 40)
    return stage2(env, root=root), [str(gt), "values 40"], "or check DATA.NUM_CLASSES"


@case
def cropped_gt_in_folder_mode_is_blamed_on_the_gt(env):
    root = env.copy()
    pred = Path(shutil.copytree(root / "SegmentationClassAug", env.tmp / "pred"))
    gt = root / "SegmentationClassAug/val_00003.png"
    crop_png(gt)
    return (["evaluate.py", "--pred-dir", str(pred), "--data-root", str(root)],
            [f"ground truth {gt}"], "re-create it")


@case
def cropped_gt_in_stage3_validation(env):
    root = env.copy(env.labelled)
    gt = root / "SegmentationClassAug/val_00000.png"
    crop_png(gt)
    return stage3(env, root=root), [f"ground truth {gt}"], "re-create the label"


# --- class 4: paths that leave their place ------------------------------------------------------

@case
def name_dot_dot_for_stage1(env):
    return stage1(env, "NAME", ".."), ["NAME = '..'"], "plain folder name"


@case
def name_with_a_path_for_stage3(env):
    return stage3(env, "NAME", "a/../../escape"), ["NAME = 'a/../../escape'"], "plain folder name"


@case
def name_dot_for_evaluate(env):
    return evaluate(env, "NAME", "."), ["NAME = '.'"], "plain folder name"


@case
def label_dir_leaving_the_root_for_stage2(env):
    argv = stage2(env)
    argv[argv.index("DATA.PSEUDO_LABEL_DIR") + 1] = "../outside"
    return argv, ["DATA.PSEUDO_LABEL_DIR = '../outside'"], "an absolute path"


# --- class 5: garbage that used to be accepted without a word -----------------------------------

@case
def section_written_twice_in_yaml(env):
    config = env.raw_config("stage1.yml", "SOLVER:\n  MAX_ITER: 5\n")
    return stage1(env, config=config), [str(config), "'SOLVER' is written twice"], "Merge them"


@case
def empty_yaml_file(env):
    config = env.tmp / "empty.yml"
    config.write_text("# nothing here\n")
    return stage1(env, config=config), [str(config), "is empty"], "configs/stage1.yml"


@case
def duplicate_ids_in_a_split_list(env):
    root = env.copy()
    split = root / "ImageSets/Segmentation/train_aug.txt"
    split.write_text(split.read_text() + "train_00001\ntrain_00002\n")
    return stage1(env, root=root), [str(split), "train_00001"], "Remove the repeats"


@case
def inverted_box_in_an_annotation(env):
    root = env.copy()
    xml = root / "Annotations/train_00004.xml"
    text = xml.read_text()
    xmin = text.split("<xmin>")[1].split("<")[0]
    xmax = text.split("<xmax>")[1].split("<")[0]
    xml.write_text(text.replace(f"<xmin>{xmin}<", f"<xmin>{xmax}<", 1)
                   .replace(f"<xmax>{xmax}<", f"<xmax>{xmin}<", 1))
    return stage1(env, root=root), [str(xml), "swapped corners"], "Fix the export"


@case
def stage1_weights_given_to_stage3(env):
    return (stage3(env, "MODEL.WEIGHTS", str(env.stage1_ckpt)), ["MODEL.WEIGHTS",
            "stage 3 does not read it"], "set MODEL.INIT to its path")


@case
def weights_given_to_stage1(env):
    return (stage1(env, "MODEL.WEIGHTS", str(env.stage1_ckpt)), ["MODEL.WEIGHTS",
            "stage 1 does not read it"], "set MODEL.INIT to its path")


# --- class 2: a folder in use (a lock held by a live process: this test's own) -----------------

def hold_lock(folder: Path) -> Path:
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".lock").write_text(json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(), "started": "now", "what": "stage 9",
        "command": "another run"}))
    return folder / ".lock"


@case
def run_folder_in_use_for_stage1(env):
    lock = hold_lock(env.tmp / "runs" / "stage1")
    return stage1(env), [str(lock.parent), f"PID {os.getpid()}"], "choose another folder"


@case
def label_folder_in_use_for_stage2(env):
    lock = hold_lock(env.tmp / "Generation")
    return stage2(env), [str(lock.parent), "in use by another run"], f"delete {lock}"


@case
def eval_folder_in_use_for_evaluate(env):
    lock = hold_lock(env.tmp / "runs" / "stage3" / "eval")
    return evaluate(env), [str(lock.parent), "in use by another run"], "Wait for it to finish"


def run_script(argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def outcomes(request, artifacts, tmp_path_factory):
    """Set up and run the selected cases, PARALLEL processes at a time; name -> outcome."""
    selected = [item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_bad_input_fails_cleanly"
                and item.module is request.module]
    jobs = {}
    for name in selected:
        env = Env(tmp_path_factory.mktemp(name), artifacts["voc"], artifacts["labelled"],
                  artifacts["stage1"], artifacts["stage3"])
        jobs[name] = CASES[name](env)
    with ThreadPoolExecutor(PARALLEL) as pool:
        procs = dict(zip(jobs, pool.map(lambda job: run_script(job[0]), jobs.values())))
    return {name: (procs[name], *jobs[name]) for name in jobs}


def error_paragraph(proc: subprocess.CompletedProcess) -> str:
    """The one `error: ...` paragraph a failed script printed, last and on a line of its own,
    with its line wrapping undone."""
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err + proc.stdout, err[-3000:]
    before, found, message = err.rpartition("error: ")
    assert found and "error: " not in before, f"expected one 'error:' message:\n{err[-3000:]}"
    assert before == "" or before.endswith("\n"), f"the message starts mid-line:\n{err[-500:]}"
    # A blank line or a progress bar's carriage return would mean something followed it.
    assert "\n\n" not in message.strip() and "\r" not in message, f"not one paragraph:\n{message}"
    return " ".join(message.split())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_cleanly(outcomes, name):
    proc, argv, names, fix = outcomes[name]
    message = error_paragraph(proc)
    for where in names:
        assert where in message, f"{argv}\nthe message does not name {where!r}:\n{message}"
    assert fix in message, f"{argv}\nthe message does not give the fix {fix!r}:\n{message}"


def test_debug_shows_the_traceback():
    argv = ["stage1.py", "--config-file", "configs/demo/stage1.yml", "--gpu-id", "cpu", "--debug",
            "--opts", "SOLVER.MAX_ITER", "ten"]
    proc = run_script(argv)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "BanaError: --opts SOLVER.MAX_ITER" in proc.stderr


def test_a_message_raised_in_a_loader_worker_loses_the_worker_traceback():
    from torch._utils import ExceptionWrapper

    from utils.cli import error_message

    try:
        raise BanaError("image x.jpg is corrupt: re-create it.")
    except BanaError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(BanaError) as info:
        wrapped.reraise()  # what the DataLoader does in the main process
    assert "Traceback" in str(info.value)
    assert error_message(info.value) == "image x.jpg is corrupt: re-create it."
    assert error_message(BanaError("plain")) == "plain"


def test_os_errors_on_output_paths_become_messages_and_others_stay_bugs(tmp_path):
    from utils.cli import os_error_message

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError) as info:
        (blocker / "runs/stage1").mkdir(parents=True, exist_ok=True)
    assert f"{blocker} is a file, not a folder" in os_error_message(info.value)
    with pytest.raises(OSError) as info:
        blocker.mkdir(parents=True, exist_ok=True)
    assert "a file of that name exists" in os_error_message(info.value)
    with pytest.raises(OSError) as info:
        open(tmp_path / "missing.txt")
    assert os_error_message(info.value) is None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("log_every", [1, 100])
def test_a_nan_in_stage1_stops_at_that_iteration_and_keeps_the_last_checkpoint(
        synthetic_voc, tmp_path, monkeypatch, log_every):
    """CKPT_EVERY 2: last.ckpt holds step 4 when iteration 5 (0-based) computes a NaN loss.
    With LOG_EVERY 100 finiteness is read only before the checkpoint of step 6: the error still
    names iteration 5, and no checkpoint of NaN weights is written."""
    import models.zoo
    from engine.stage1 import run

    cfg = load_config(REPO / "configs/demo/stage1.yml", [
        "DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR", str(tmp_path), *FAST,
        "SOLVER.MAX_ITER", "8", "SOLVER.MILESTONES", "[6]", "SOLVER.CKPT_EVERY", "2",
        "SOLVER.LOG_EVERY", str(log_every)])
    last = cfg.run_dir / "checkpoints/last.ckpt"
    seen = {}

    build = models.zoo.build

    def poisoned_build(spec, init="none"):
        net = build(spec, init)
        forward, calls = net.forward, iter(range(10 ** 6))

        def forward_with_nan(*a, **kw):
            logits, targets = forward(*a, **kw)
            if next(calls) == 5:  # one forward per iteration: this is iteration 5
                seen["hash"], seen["step"] = sha256(last), load_ckpt(last)["global_step"]
                logits = logits * float("nan")
            return logits, targets

        net.forward = forward_with_nan
        return net

    # engine.stage1 imports the zoo's build when it trains, so patching the module is enough.
    monkeypatch.setattr(models.zoo, "build", poisoned_build)
    with pytest.raises(BanaError, match=r"non-finite loss at iteration 5: term 'ce' = nan"):
        run(cfg, devices="cpu")
    assert seen["step"] == 4 and sha256(last) == seen["hash"]
    assert not (cfg.run_dir / "checkpoints/final.ckpt").exists()

    monkeypatch.setattr(models.zoo, "build", build)
    assert run(cfg, devices="cpu", resume=True)["iterations"] == 8


def test_a_nan_term_in_stage3_is_named_before_the_total(labelled_voc, tmp_path, monkeypatch):
    import models.losses
    from engine.stage3 import run

    cfg = load_config(REPO / "configs/demo/stage3.yml", [
        "DATA.ROOT", str(labelled_voc), "OUTPUT_DIR", str(tmp_path), *FAST,
        "SOLVER.MAX_ITER", "6", "SOLVER.CKPT_EVERY", "2", "SOLVER.VAL_EVERY", "6"])
    last = cfg.run_dir / "checkpoints/last.ckpt"
    compute_loss, calls, seen = models.losses.compute_loss, iter(range(10 ** 6)), {}

    def loss_with_nan(*a, **kw):
        losses = compute_loss(*a, **kw)
        if next(calls) == 3:
            seen["hash"] = sha256(last)
            losses["wce"] = losses["wce"] * float("nan")
            losses["loss"] = losses["ce"] + losses["wce"]
        return losses

    # engine.stage3 imports compute_loss at each step, so patching the module is enough.
    monkeypatch.setattr(models.losses, "compute_loss", loss_with_nan)
    with pytest.raises(BanaError, match=r"iteration 3: term 'wce' = nan, term 'loss' = nan"):
        run(cfg, devices="cpu")
    assert sha256(last) == seen["hash"] and load_ckpt(last)["global_step"] == 2


def start(argv: list[str], log: Path) -> subprocess.Popen:
    """Start a script in its own process group (so that it can be killed with its workers); its
    output goes to `log`, since an unread pipe would block it. SIGINT is restored to its
    default in the child: a suite started as a background job of a non-interactive shell runs
    with SIGINT ignored, which children would otherwise inherit."""
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def kill_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 240) -> None:
    """SIGKILL `proc` and its children as soon as `ready()` holds; it must still be running."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, (f"the run ended (exit {proc.returncode}) before it was "
                                         f"killed:\n{log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, "timed out waiting to kill the run"
            time.sleep(0.02)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def ckpt_step(path: Path) -> int:
    return load_ckpt(path)["global_step"] if path.is_file() else -1


def logged_lrs(run_dir: Path, group: str = "pw") -> dict[int, float]:
    """step -> logged learning rate of a parameter group, over every launch of the run."""
    import csv

    lrs = {}
    for path in sorted((run_dir / "logs").glob("version_*/metrics.csv")):
        with open(path) as f:
            lrs.update({int(r["step"]): float(r[f"lr-SGD/{group}"]) for r in csv.DictReader(f)
                        if r.get(f"lr-SGD/{group}")})
    return lrs


def check_resumed_schedule(run_dir: Path, cfg, max_iter: int) -> None:
    final = load_ckpt(run_dir / "checkpoints/final.ckpt")
    assert final["global_step"] == max_iter
    assert final["lr_schedulers"][0]["last_epoch"] == max_iter
    mult = {"pw": 1, "pb": 2, "nw": 10, "nb": 20}
    for group in final["optimizer_states"][0]["param_groups"]:
        expected = mult[group["name"]] * cfg.SOLVER.LR * lr_factor(max_iter, cfg.SOLVER)
        assert group["lr"] == pytest.approx(expected, abs=1e-12)
    # Two launches, and every logged step's lr is the uninterrupted schedule's.
    assert len(list((run_dir / "logs").glob("version_*"))) == 2
    lrs = logged_lrs(run_dir)
    assert min(lrs) < 5 and max(lrs) >= max_iter - 2
    for step, lr in lrs.items():
        assert lr == pytest.approx(cfg.SOLVER.LR * lr_factor(step, cfg.SOLVER), abs=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_sigkill_mid_run_then_resume_finishes_the_same_schedule(stage, artifacts, tmp_path):
    """Killed once last.ckpt holds step >= 10 of 30 (written every 5), resumed with --resume."""
    opts = ["DATA.ROOT", str(artifacts["voc" if stage == 1 else "labelled"]), "OUTPUT_DIR",
            str(tmp_path), *FAST, "SOLVER.MAX_ITER", "30", "SOLVER.CKPT_EVERY", "5"]
    opts += ["SOLVER.MILESTONES", "[20]"] if stage == 1 else ["SOLVER.VAL_EVERY", "15"]
    config = f"configs/demo/stage{stage}.yml"
    argv = [f"stage{stage}.py", "--config-file", config, "--gpu-id", "cpu", "--opts", *opts]
    last = tmp_path / f"stage{stage}/checkpoints/last.ckpt"
    log = tmp_path / "killed.log"
    kill_when(start(argv, log), lambda: ckpt_step(last) >= 10, log)
    killed_at = ckpt_step(last)
    assert 10 <= killed_at < 30 and not (last.parent / "final.ckpt").exists()

    proc = run_script(argv[:5] + ["--resume"] + argv[5:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Resuming from {last}" in proc.stdout
    check_resumed_schedule(tmp_path / f"stage{stage}", load_config(REPO / config, opts), 30)


def stage2_argv(artifacts, out: Path) -> list[str]:
    return ["stage2.py", "--config-file", "configs/demo/stage2.yml", "--gpu-id", "cpu",
            "--workers", "1", "--opts", "DATA.ROOT", str(artifacts["voc"]), "OUTPUT_DIR",
            str(out), "DATA.NUM_WORKERS", "0", "DATA.SPLIT", "train", "DATA.PSEUDO_LABEL_DIR",
            str(out / "Generation"), "MODEL.WEIGHTS", str(artifacts["stage1"])]


def read_labels(folder: Path) -> dict[str, np.ndarray]:
    """Every label PNG under Y_crf/, Y_ret/ and Y_box/, decoded (a half-written one would fail
    here)."""
    return {f"{p.parent.name}/{p.name}": read_index_png(p)
            for p in sorted(folder.glob("Y_*/*.png"))}


def temporary_files(folder: Path) -> list[Path]:
    """What `utils.io`'s atomic writes leave behind only when killed mid-write."""
    return list(folder.rglob(".*.tmp"))


@pytest.fixture(scope="module")
def clean_labels(artifacts, tmp_path_factory) -> dict[str, np.ndarray]:
    """Stage 2's labels of the 12 train images from one uninterrupted run."""
    out = tmp_path_factory.mktemp("stage2_clean")
    proc = run_script(stage2_argv(artifacts, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = read_labels(out / "Generation")
    assert len(labels) == 3 * 12
    return labels


def assert_same_labels(labels: dict, expected: dict) -> None:
    assert labels.keys() == expected.keys()
    for name, label in labels.items():
        np.testing.assert_array_equal(label, expected[name], err_msg=name)


@pytest.mark.slow
def test_stage2_killed_mid_run_leaves_whole_labels_and_resumes(artifacts, clean_labels, tmp_path):
    argv = stage2_argv(artifacts, tmp_path)
    labels = tmp_path / "Generation"
    log = tmp_path / "killed.log"
    kill_when(start(argv, log), lambda: len(list(labels.glob("Y_ret/*.png"))) >= 2, log)
    partial = read_labels(labels)
    assert 2 <= len(partial) < len(clean_labels)
    assert_same_labels(partial, {k: clean_labels[k] for k in partial})

    proc = run_script(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Done = every label file of the image written (Y_crf, Y_ret, then Y_box).
    names = [k.split("/")[1] for k in partial]
    done_before = sum(names.count(n) == 3 for n in set(names))
    assert f"{done_before} already labelled" in proc.stdout
    assert_same_labels(read_labels(labels), clean_labels)


@pytest.mark.slow
def test_two_stage2_runs_on_one_folder_never_corrupt_a_label(artifacts, clean_labels, tmp_path):
    """Started together, one run takes the label folder's lock and the other is refused with a
    message naming the folder; the labels are those of one clean run."""
    argv = stage2_argv(artifacts, tmp_path)
    procs = [start(argv, tmp_path / f"run{k}.log") for k in range(2)]
    try:
        codes = [proc.wait(timeout=240) for proc in procs]
    finally:
        for proc in procs:
            stop(proc)
    logs = [(tmp_path / f"run{k}.log").read_text() for k in range(2)]
    assert sorted(codes) == [0, 2], logs
    refused = logs[codes.index(2)]
    assert "in use by another run" in " ".join(refused.split()) and "Traceback" not in refused
    assert_same_labels(read_labels(tmp_path / "Generation"), clean_labels)
    assert temporary_files(tmp_path / "Generation") == []
    assert not (tmp_path / "Generation" / ".lock").exists()


def test_two_stage3_runs_into_one_folder_one_is_refused(labelled_voc, tmp_path):
    env = Env(tmp_path, labelled_voc, labelled_voc, tmp_path, tmp_path)
    argv = stage3(env, "SOLVER.MAX_ITER", "6", "SOLVER.VAL_EVERY", "6")
    procs = [start(argv, tmp_path / f"run{k}.log") for k in range(2)]
    try:
        codes = [proc.wait(timeout=240) for proc in procs]
    finally:
        for proc in procs:
            stop(proc)
    logs = [(tmp_path / f"run{k}.log").read_text() for k in range(2)]
    assert sorted(codes) == [0, 2], logs
    assert ("in use by another run" in " ".join(logs[codes.index(2)].split())
            or "already holds a run" in " ".join(logs[codes.index(2)].split()))


def test_a_stale_lock_is_taken_over_and_a_live_one_refused(tmp_path):
    import socket

    from utils.runlock import RunLock

    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with RunLock(folder, "test"):
        assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(BanaError, match="in use by another run"):
            RunLock(folder, "second").__enter__()
    assert not (folder / ".lock").exists()
    # another host's lock is never judged stale from here
    (folder / ".lock").write_text(json.dumps({"pid": dead.pid, "host": "elsewhere"}))
    with pytest.raises(BanaError, match="on elsewhere"):
        RunLock(folder, "test").__enter__()


def test_secondary_ranks_run_under_rank_0s_lock(tmp_path, monkeypatch):
    from utils.runlock import RunLock

    monkeypatch.setenv("LOCAL_RANK", "1")
    with RunLock(tmp_path, "rank 1"):
        assert not (tmp_path / ".lock").exists()


# --- class 3: runs that change under their record -----------------------------------------------

@pytest.fixture(scope="module")
def trained_stage3(labelled_voc, tmp_path_factory):
    """A 4-iteration stage-3 run (its config.yaml and checkpoints)."""
    out = tmp_path_factory.mktemp("record")
    env = Env(out, labelled_voc, labelled_voc, out, out)
    proc = run_script(stage3(env, "SOLVER.MAX_ITER", "4", "SOLVER.VAL_EVERY", "4",
                             "SOLVER.CKPT_EVERY", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return env


def _copy_run(env: Env, tmp_path: Path) -> Env:
    shutil.copytree(env.tmp / "runs", tmp_path / "runs")
    return Env(tmp_path, env.voc, env.labelled, env.stage1_ckpt, env.stage3_ckpt)


@pytest.mark.parametrize("opts, names", [
    (["SOLVER.MAX_ITER", "2"], ["trained 4 iterations", "SOLVER.MAX_ITER 2"]),
    (["SOLVER.MAX_ITER", "6", "MODEL.LOSS", "ce_crf"], ["MODEL.LOSS: 'nal' recorded, 'ce_crf' now"]),
    (["SOLVER.MAX_ITER", "6", "SOLVER.LR", "0.5"], ["SOLVER.LR: 0.01 recorded, 0.5 now"]),
    (["SOLVER.MAX_ITER", "6", "DATA.CROP_SIZE", "40"], ["DATA.CROP_SIZE: 48 recorded, 40 now"]),
])
def test_resume_with_other_settings_is_refused_and_the_record_kept(trained_stage3, tmp_path,
                                                                   opts, names):
    env = _copy_run(trained_stage3, tmp_path)
    record = tmp_path / "runs/stage3/config.yaml"
    before = record.read_bytes()
    proc = run_script(stage3(env, *opts, flags=["--resume"]))
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and all(n in err for n in names), err
    assert "Traceback" not in proc.stderr
    assert record.read_bytes() == before


def test_reconfigure_continues_with_new_settings_and_keeps_the_old_record(trained_stage3,
                                                                          tmp_path):
    env = _copy_run(trained_stage3, tmp_path)
    proc = run_script(stage3(env, "SOLVER.MAX_ITER", "6", "SOLVER.VAL_EVERY", "6",
                             "MODEL.LOSS", "ce_crf", flags=["--resume", "--reconfigure"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MODEL.LOSS" in proc.stdout
    assert "loss: nal" in (tmp_path / "runs/stage3/config.1.yaml").read_text().lower()
    assert "ce_crf" in (tmp_path / "runs/stage3/config.yaml").read_text()
    assert torch.load(tmp_path / "runs/stage3/checkpoints/final.ckpt", weights_only=False,
                      map_location="cpu")["global_step"] == 6


def test_a_leftover_temporary_file_is_cleaned_up_on_resume(trained_stage3, tmp_path):
    env = _copy_run(trained_stage3, tmp_path)
    leftover = tmp_path / "runs/stage3/checkpoints/.last.ckpt.tmp"
    leftover.write_bytes(b"half a checkpoint")
    proc = run_script(stage3(env, "SOLVER.MAX_ITER", "4", "SOLVER.VAL_EVERY", "4",
                             flags=["--resume"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not leftover.exists() and "Removed 1 temporary file" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("opts, key", [(["MODEL.USE_U0", "false"], "MODEL.USE_U0"),
                                       (["MODEL.DCRF", "[3,50,3,3,3]"], "MODEL.DCRF"),
                                       (["MODEL.BG_THRESHOLD", "0.5"], "MODEL.BG_THRESHOLD")])
def test_relabelling_with_other_settings_is_refused_until_overwrite(artifacts, tmp_path, opts,
                                                                    key):
    env = Env(tmp_path, artifacts["voc"], artifacts["labelled"], artifacts["stage1"],
              artifacts["stage3"])
    first = run_script(stage2(env))
    assert first.returncode == 0, first.stderr[-3000:]
    record = (tmp_path / "Generation/labels.json").read_bytes()
    refused = run_script(stage2(env, *opts))
    err = " ".join(refused.stderr.split())
    assert refused.returncode == 2 and key in err and "--overwrite" in err, err
    assert (tmp_path / "Generation/labels.json").read_bytes() == record
    again = run_script(stage2(env, *opts, flags=["--overwrite"]))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "deleted the labels" in again.stdout and "0 already labelled" in again.stdout
    assert json.loads((tmp_path / "Generation/labels.json").read_text())[key] != \
        json.loads(record)[key]


# --- class 5 (warnings with a count) and class 6 (messages for real faults) ---------------------

def test_gt_ids_outside_the_split_warn_with_a_count(labelled_voc, tmp_path):
    from engine.stage3 import open_datasets

    ids = tmp_path / "ids.txt"
    ids.write_text("train_00001\nnot_an_image\nval_00000\n")
    cfg = load_config(REPO / "configs/demo/stage3.yml", ["DATA.ROOT", str(labelled_voc),
                                                         "DATA.GT_IDS", str(ids)])
    with pytest.warns(UserWarning, match="2 of 3 ids are not in the split 'train'"):
        open_datasets(cfg)


def test_a_16_bit_image_is_scaled_with_a_warning_not_read_as_white(tmp_path):
    from PIL import Image

    from utils.io import read_image

    Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)).save(tmp_path / "d.png")
    with pytest.warns(UserWarning, match="scaled to 8 bits"):
        rgb = read_image(tmp_path / "d.png")
    assert rgb.min() == 0 and 200 < rgb.max() < 255


@pytest.mark.parametrize("opts, key, expected", [
    (["SOLVER.LR", "1e-3"], "SOLVER.LR", 1e-3), (["SOLVER.LR", "5E-4"], "SOLVER.LR", 5e-4),
    (["NAME", "2024"], "NAME", "2024"), (["NAME", "1.10"], "NAME", "1.10"),
    (["SEED", "7"], "SEED", 7)])
def test_opts_are_read_as_a_person_means_them(opts, key, expected):
    cfg = load_config(REPO / "configs/demo/stage1.yml", opts)
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected and type(value) is type(expected)


def test_a_full_disk_names_the_file_being_written_and_leaves_no_tmp(tmp_path, monkeypatch):
    import errno

    from utils.cli import os_error_message
    from utils.io import atomic_write_png

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "labels" / "x.png"
    with pytest.raises(OSError) as info:
        atomic_write_png(target, np.zeros((4, 4), np.uint8))
    assert info.value.filename == str(target)
    assert list((tmp_path / "labels").iterdir()) == []
    message = os_error_message(info.value)
    assert str(target) in message and "--resume" in message


def test_a_full_disk_while_checkpointing_names_the_checkpoint(tmp_path):
    import errno

    from engine.runs import atomic_save_checkpoint

    class FullDisk:
        is_global_zero = True

        def save_checkpoint(self, path, weights_only=False):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", "/tmp/tmpabc")

    with pytest.raises(OSError) as info:
        atomic_save_checkpoint(FullDisk(), tmp_path / "last.ckpt")
    assert info.value.filename == str(tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_ctrl_c_in_stage3_exits_130_with_the_way_back(labelled_voc, tmp_path):
    env = Env(tmp_path, labelled_voc, labelled_voc, tmp_path, tmp_path)
    log = tmp_path / "run.log"
    proc = start(stage3(env, "SOLVER.MAX_ITER", "5000", "SOLVER.VAL_EVERY", "5000"), log)
    deadline = time.monotonic() + 120
    while "iter " not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    text = " ".join(log.read_text().split())
    assert "interrupted" in text and "add --resume" in text and "Traceback" not in text


@pytest.mark.slow
def test_evaluate_killed_mid_run_leaves_whole_files_and_reruns(artifacts, tmp_path):
    argv = ["evaluate.py", "--config-file", "configs/demo/stage3.yml", "--gpu-id", "cpu",
            "--workers", "0", "--save-pred", "--checkpoint", str(artifacts["stage3"]), "--opts",
            "DATA.ROOT", str(artifacts["voc"]), "OUTPUT_DIR", str(tmp_path), "DATA.NUM_WORKERS",
            "0", "TEST.SPLIT", "train"]
    eval_dir = tmp_path / "stage3/eval"
    log = tmp_path / "killed.log"
    kill_when(start(argv, log), lambda: len(list(eval_dir.glob("pred/*.png"))) >= 1, log)
    partial = {p.name: read_index_png(p) for p in eval_dir.glob("pred/*.png")}
    assert 1 <= len(partial) < 12 and not (eval_dir / "metrics.json").exists()

    proc = run_script(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["images"] == 12 and set(metrics["modes"]) == {
        "single", "multiscale", "single+crf", "multiscale+crf"}
    for name, pred in partial.items():
        np.testing.assert_array_equal(read_index_png(eval_dir / "pred" / name), pred)
    assert len(list(eval_dir.glob("pred/*.png"))) == 12
