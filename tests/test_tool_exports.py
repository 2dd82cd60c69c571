"""Datasets as annotation and dataset tools export them (tests/exports.py writes each layout the
way the tool does), read through the README's own-data route ("Exports we read"): the keys a
user sets for that export, `open_data` on them, and the boxes and classes compared with what the
files say. The slow test takes every layout through stages 1, 2 and 3 and predict.py, box-only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tests.exports as X
from data.datasets import open_data
from engine.config import load_config
from utils.errors import BanaError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "bird")

# layout -> (DATA.DATASET, DATA.ROOT under the export, train split, val split, class list
# needed): the README's table "Exports we read", as keys.
ROUTES = {
    "supervision_coco": ("coco", ".", "train", "val", False),
    "supervision_voc": ("voc", ".", "train", "val", True),
    "supervision_yolo": ("yolo", ".", "train", "val", False),
    "globox_coco": ("coco", ".", "train", "val", False),
    "globox_voc": ("voc", ".", "train", "val", True),
    "globox_yolo": ("yolo", ".", "train", "val", True),
    "labelme2coco": ("coco", "runs/labelme2coco", "dataset", "dataset", False),
    "datumaro_coco": ("coco", ".", "train", "val", False),
    "datumaro_voc": ("voc", ".", "train", "val", False),
    "datumaro_yolo": ("yolo", ".", "train", "val", False),
    "cvat_coco": ("coco", ".", "train", "val", False),
    "cvat_voc": ("voc", ".", "train", "val", False),
    "cvat_yolo": ("yolo", ".", "train", "val", False),
    "ultralytics_yolo": ("yolo", ".", "train", "val", False),
    "labelimg_voc": ("voc", ".", "train", "val", True),
    "roboflow_yolo": ("yolo", ".", "train", "valid", False),
    "roboflow_coco": ("coco", ".", "train", "valid", False),
    "label_studio_coco": ("coco", ".", "train", "val", False),
}
# Exports whose numbers are not pixel edges: supervision's VOC writer adds 1 to all four corners;
# VOC XML is read as written (as the authors read PASCAL VOC), so its boxes sit 1 px lower right.
FILE_OFFSET = {"supervision_voc": 1.0}


def test_every_tool_layout_has_a_route():
    assert set(ROUTES) == set(X.WRITERS)


def export(layout: str, root: Path, n: int = 6) -> X.Export:
    images = X.make_images(n, (64, 48), CLASSES, seed=0)
    val = ROUTES[layout][3] if ROUTES[layout][3] != "dataset" else "val"
    return X.WRITERS[layout](root / layout, X.default_splits(images, val), CLASSES)


def keys(exp: X.Export) -> list[str]:
    """The --opts of the README's own-data route for this export."""
    dataset, root, train, val, needs_classes = ROUTES[exp.layout]
    opts = ["DATA.DATASET", dataset, "DATA.ROOT", str(exp.root / root), "DATA.SPLIT", train,
            "DATA.VAL_SPLIT", val, "TEST.SPLIT", val,
            "DATA.NUM_CLASSES", str(len(exp.classes) + 1)]
    if needs_classes:
        opts += ["DATA.CLASSES", "[" + ", ".join(exp.classes) + "]"]
    if dataset == "coco":
        opts += ["DATA.CLASS_MAP", "all"]
    return opts


@pytest.mark.parametrize("layout", sorted(ROUTES))
def test_each_export_is_read_as_its_files_say(layout, tmp_path):
    """Every image of every split, each box (in pixel edges, within the tool's rounding) and
    its class name as the export wrote them; the classes numbered in the order the export's
    class list (or ids) gives."""
    exp = export(layout, tmp_path)
    cfg = load_config(REPO / "configs/demo/stage1.yml", keys(exp))
    data = open_data(cfg)
    assert data.classes == ("background", *exp.classes)
    offset = FILE_OFFSET.get(layout, 0.0)
    for split in exp.splits:
        ours = ROUTES[layout][2] if split == "dataset" else split
        ids = data.split_ids(ours)
        by_path = {data.image_path(ours, i).resolve(): i for i in ids}
        assert sorted(by_path) == sorted(im.path.resolve() for im in exp.images[split])
        for image in exp.images[split]:
            ann = data.annotation(ours, by_path[image.path.resolve()])
            truth = np.array([[b.x1, b.y1, b.x2, b.y2] for b in image.boxes]).reshape(-1, 4)
            np.testing.assert_allclose(ann.boxes, truth + offset, atol=1e-3,
                                       err_msg=f"{layout} {image.path.name}")
            assert [data.classes[c] for c in ann.classes] == [b.label for b in image.boxes]
            assert not data.gt_ids(ours)  # box-only: nothing to score against


def test_a_voc_split_folder_finds_its_images_and_xml(tmp_path):
    """ROOT/<split>/ with images/ + labels/ (supervision), images/ + Annotations/ (globox), or
    both side by side (LabelImg): every image by stem, an image without XML has no objects and is
    counted in a note, and the masks go to BgMaskfromBoxes/<split>/."""
    exp = export("labelimg_voc", tmp_path)
    data = open_data(load_config(REPO / "configs/demo/stage1.yml", keys(exp)))
    ids = data.split_ids("train")
    assert ids == sorted(im.path.stem for im in exp.images["train"])
    assert len(data.annotation("train", "img_001").boxes) == 0  # LabelImg wrote no XML for it
    assert data.bg_mask_path("train", "img_000") == exp.root / "BgMaskfromBoxes/train/img_000.png"


def test_voc_split_folder_problems_are_named(tmp_path, capsys):
    exp = export("globox_voc", tmp_path)
    root = exp.root
    data = open_data(load_config(REPO / "configs/demo/stage1.yml", keys(exp)))
    with pytest.raises(BanaError, match=r"split 'test' not found .*no folder test/.*the split "
                                        r"folders there are: train, val"):
        data.split_ids("test")
    (root / "val/images/img_005.jpg").unlink()
    with pytest.raises(BanaError, match=r"1 XML file\(s\) in .*val/Annotations have no image in "
                                        r".*val/images \(e.g. img_005.xml\)"):
        data.split_ids("val")
    (root / "train/Annotations/img_003.xml").unlink()
    assert len(data.split_ids("train")) == 4
    assert "1 of 4 images of split 'train' have no train/Annotations/<id>.xml" in \
        capsys.readouterr().out


def test_bbox_setup_writes_the_masks_of_split_folders(tmp_path):
    from data.voc_bbox_setup import main

    exp = export("supervision_voc", tmp_path)
    counts = main(["--data-root", str(exp.root), "--splits", "train", "val", "--workers", "1"])
    assert counts["written"] == 6
    for split in exp.splits:
        for image in exp.images[split]:
            assert (exp.root / "BgMaskfromBoxes" / split / f"{image.path.stem}.png").is_file()


# --- every layout through every stage, box-only ------------------------------------------------

TINY = ["DATA.CROP_SIZE", "32", "DATA.BATCH_SIZE", "2", "DATA.NUM_WORKERS", "0",
        "SOLVER.MAX_ITER", "2", "SOLVER.CKPT_EVERY", "2", "SOLVER.VAL_EVERY", "2",
        "SOLVER.MILESTONES", "[1]", "SOLVER.LOG_EVERY", "1"]


def check_exports_against_labels(label_dir: Path, split: str) -> None:
    """Stage 2's exports of Y_crf, read back by their libraries, against the maps it wrote:
    each COCO instance lies on pixels of its class in Y_crf, VOC's SegmentationClass is Y_crf,
    and YOLO-seg has one label file per image."""
    from pycocotools.coco import COCO

    from data.labelset import LabelSet
    from utils.io import read_index_png

    labels = LabelSet(label_dir)
    exported = label_dir / "exports"
    coco = COCO(str(exported / "coco" / f"instances_{split}_Y_crf.json"))
    by_file = {rec["file_name"]: rec["id"] for rec in labels.records()}
    images = {im["id"]: by_file[im["file_name"]] for im in coco.dataset["images"]}
    assert sorted(images.values()) == sorted(labels.ids)
    for ann in coco.dataset["annotations"]:
        label = read_index_png(label_dir / "Y_crf" / f"{images[ann['image_id']]}.png")
        mask = coco.annToMask(ann).astype(bool)
        # index 0 is background; a tool may number a real category 0 (supervision, globox)
        class_index = labels.category_ids.index(ann["category_id"], 1)
        assert mask.any() and (label[mask] == class_index).all()
    for image_id in labels.ids:
        np.testing.assert_array_equal(
            read_index_png(exported / "voc/SegmentationClass" / f"{image_id}.png"),
            read_index_png(label_dir / "Y_crf" / f"{image_id}.png"))
    assert len(list((exported / "yolo_seg/labels" / split).glob("*.txt"))) == len(labels.ids)


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(ROUTES))
def test_each_export_goes_through_stages_1_to_3_and_predict(layout, tmp_path, capsys):
    """Box-only, no setup step: stage 1 writes the background masks it needs, stage 2 labels
    every training image, skips the quality report and exports its masks in the three formats
    (read back against its label maps), stage 3 trains without validation and
    says so, predict.py labels the validation images."""
    from engine import predict, stage1, stage2, stage3

    exp = export(layout, tmp_path)
    out = tmp_path / "runs"
    opts = [*keys(exp), "OUTPUT_DIR", str(out)]

    stage1.run(load_config(REPO / "configs/demo/stage1.yml", [*opts, *TINY]), devices="cpu")
    cfg2 = load_config(REPO / "configs/demo/stage2.yml",
                       [*opts, "DATA.NUM_WORKERS", "0", "DATA.EXPORTS", "[coco, yolo_seg, voc]"])
    stage2.run(cfg2, devices="cpu", workers=1)
    printed = capsys.readouterr().out
    assert "Background masks" in printed and "quality report" in printed and "skipped" in printed
    check_exports_against_labels(cfg2.pseudo_label_dir, ROUTES[layout][2])
    cfg3 = load_config(REPO / "configs/demo/stage3.yml",
                       [*opts, *TINY, "TEST.SCALES", "[1.0]", "TEST.FLIP", "false",
                        "TEST.CRF", "false"])
    stage3.run(cfg3, devices="cpu")
    assert "without validation" in capsys.readouterr().out
    assert (out / "stage3" / "checkpoints" / "final.ckpt").is_file()

    data = open_data(cfg3)
    train = ROUTES[layout][2]
    labels = sorted(p.stem for p in (cfg3.pseudo_label_dir / "Y_crf").glob("*.png"))
    assert labels == sorted(Path(data.label_name(i)).stem for i in data.split_ids(train))

    val_images = [im.path for im in exp.images[exp.splits[-1]]]
    predict.run(cfg3, inputs=[str(p) for p in val_images], output=tmp_path / "pred",
                devices="cpu")
    assert sorted(p.stem for p in (tmp_path / "pred").glob("*.png")) == \
        sorted(p.stem for p in val_images)
