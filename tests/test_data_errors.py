"""Bad datasets: missing, empty or repeated split lists and files, images, masks and labels
that are corrupt, truncated, of another size or mode or out of the classes' range, broken
annotations, and ground truth read only by the reports. Each must stop with one message naming
the file and the fix; what can be read with a warning says how much it skipped."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.config import load_config
from helpers import (REPO, Cases, assert_fails_cleanly, evaluate, stage1, stage2, stage3,
                     truncate)
from utils.io import atomic_write_png, read_index_png


def write_noise_jpeg(path: Path, height: int, width: int) -> None:
    from utils.io import atomic_write_jpeg

    atomic_write_jpeg(path, np.random.default_rng(0).integers(0, 256, (height, width, 3),
                                                              dtype=np.uint8))


def set_label_value(path: Path, value: int) -> None:
    label = read_index_png(path)
    label[:4, :4] = value
    atomic_write_png(path, label)


CASES = Cases()
case = CASES.add


@case
def missing_data_root(env):
    root = env.tmp / "no_dataset"
    return stage1(env, root=root), [f"DATA.ROOT {root}"], "--opts DATA.ROOT PATH"


@case
def missing_gt_ids_file(env):
    path = env.tmp / "gt_ids.txt"
    return (stage3(env, "DATA.GT_IDS", str(path)), ["DATA.GT_IDS", str(path)],
            "one image id per line")


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
    return stage1(env, root=root), [str(path), "64x40"], "delete it, and it is made again"


@case
def pseudo_label_size_mismatch(env):
    root = env.copy(env.labelled)
    path = root / "Generation/Y_crf/train_00005.png"
    atomic_write_png(path, np.zeros((64, 50), np.uint8))
    return stage3(env, root=root), [str(path), "50x64"], "re-create it with stage 2"


@case
def image_size_mismatch_for_evaluate(env):
    root = env.copy()
    path = root / "JPEGImages/val_00003.jpg"
    write_noise_jpeg(path, 60, 64)
    return evaluate(env, root=root), [str(path), "64x60"], "re-create it"


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
def unknown_class_for_synthetic(env):
    return (["data/synthetic.py", "--out", str(env.tmp / "s"), "--classes", "cat", "unicorn"],
            ["unicorn"], "expected VOC class names")


@case
def missing_root_for_bbox_setup(env):
    root = env.tmp / "VOC2012"
    return ["data/voc_bbox_setup.py", "--data-root", str(root)], [str(root)], "the folder holding"


@case
def malformed_annotation(env):
    root = env.copy()
    shutil.rmtree(root / "BgMaskfromBoxes")
    path = root / "Annotations/train_00003.xml"
    path.write_text("<annotation><object><name>cat</name>")
    return (["data/voc_bbox_setup.py", "--data-root", str(root), "--workers", "1"], [str(path)],
            "re-create or re-export it")


# --- issue 16, class 1: reporting paths read ground truth the code never expected ---------------

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
    return stage3(env, root=root), [f"ground truth {gt}"], "re-create it"


# --- issue 16, class 5: garbage that used to be accepted without a word -------------------------

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


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_cleanly(outcomes, name):
    assert_fails_cleanly(*outcomes[name])


# --- issue 16, class 5: warnings with a count ---------------------------------------------------

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
