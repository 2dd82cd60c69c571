"""YOLO-format boxes (data/yolo.py): the Ultralytics, Roboflow and supervision layouts read as the
tools write them, bad files named by file and line, and a YOLO dataset through every stage."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import open_layout
from tests.exports import (default_splits, make_images, write_cvat_yolo, write_datumaro_yolo,
                           write_globox_yolo, write_roboflow_yolo, write_supervision_yolo,
                           write_ultralytics_yolo)
from utils.errors import BanaError
from utils.io import atomic_write_png, read_index_png


@pytest.mark.parametrize("writer, val", [(write_ultralytics_yolo, "val"),
                                         (write_roboflow_yolo, "valid"),
                                         (write_supervision_yolo, "val")])
def test_the_boxes_and_classes_of_each_export_are_read_exactly(tmp_path, writer, val):
    """Every box comes back in pixel edges as the tool wrote it (within its rounding), with the
    class the export's data.yaml names; an image without boxes (no or an empty .txt) has none."""
    export = writer(tmp_path / "export", default_splits(make_images(7), val))
    data = open_layout("yolo", export.root, NUM_CLASSES=len(export.classes) + 1)
    assert data.classes == ("background", *export.classes)
    for split in export.splits:
        images = {im.path.stem: im for im in export.images[split]}
        assert set(data.split_ids(split)) == set(images)
        for image_id, image in images.items():
            ann = data.annotation(split, image_id)
            truth = np.array([[b.x1, b.y1, b.x2, b.y2] for b in image.boxes]).reshape(-1, 4)
            np.testing.assert_allclose(ann.boxes, truth, atol=1e-3)
            assert [data.classes[c] for c in ann.classes] == [b.label for b in image.boxes]


@pytest.fixture
def tiny_yolo(tmp_path):
    export = write_ultralytics_yolo(tmp_path / "Y", default_splits(make_images(5)))
    return export.root


@pytest.mark.parametrize("line, message", [
    ("0 0.5 0.5 0.2", r"expected `class cx cy w h` \(five numbers\), found 4 numbers"),
    ("0 0.1 0.1 0.2 0.1 0.3 0.3", r"five numbers\), found a polygon \(segmentation export\)"),
    ("cat 0.5 0.5 0.2 0.2", "expected an integer class and four numbers"),
    ("7 0.5 0.5 0.2 0.2", r"class 7 is not in the names of .*data.yaml \(0..2\)"),
    ("1 0.95 0.5 0.2 0.2", "empty or leaves the image"),
    ("1 0.5 0.5 0 0.2", "empty or leaves the image"),
])
def test_a_bad_line_is_named_by_file_and_line(tiny_yolo, line, message):
    txt = tiny_yolo / "labels" / "train" / "img_000.txt"
    txt.write_text("0 0.5 0.5 0.2 0.2\n\n" + line + "\n")
    data = open_layout("yolo", tiny_yolo)
    with pytest.raises(BanaError, match=rf"{txt}, line 3 \('{line}'\): .*{message}"):
        data.annotation("train", "img_000")


def test_names_as_list_or_mapping_and_the_class_count(tiny_yolo):
    path = tiny_yolo / "data.yaml"
    path.write_text(yaml.safe_dump({"names": ["a", "b", "c"]}))
    assert open_layout("yolo", tiny_yolo).classes == ("background", "a", "b", "c")
    path.write_text(yaml.safe_dump({"names": {0: "a", 2: "c"}}))
    with pytest.raises(BanaError, match="without gaps"):
        open_layout("yolo", tiny_yolo)
    path.write_text(yaml.safe_dump({"names": ["a", "b", "a"]}))
    with pytest.raises(BanaError, match="lists a more than once"):
        open_layout("yolo", tiny_yolo)
    path.write_text(yaml.safe_dump({"names": ["a", "b", "c"]}))
    with pytest.raises(BanaError, match=r"DATA.NUM_CLASSES must be 4, not 3"):
        open_layout("yolo", tiny_yolo, NUM_CLASSES=3)


def test_class_names_from_data_yaml_obj_names_or_the_config(tmp_path):
    """data.yaml, then a names file (darknet's obj.names, classes.txt), then DATA.CLASSES; a
    DATA.CLASSES that contradicts a file is refused, and no names at all says how to give them."""
    with pytest.raises(BanaError, match=r"names no classes.*globox.*DATA.CLASSES"):
        open_layout("yolo", tmp_path)
    assert open_layout("yolo", tmp_path, CLASSES=["a", "b"]).classes == ("background", "a", "b")
    (tmp_path / "obj.names").write_text("a\nb\n")
    assert open_layout("yolo", tmp_path).classes == ("background", "a", "b")
    with pytest.raises(BanaError, match=r"DATA.CLASSES \(b, a\) contradicts .*obj.names \(a, b\)"):
        open_layout("yolo", tmp_path, CLASSES=["b", "a"])
    (tmp_path / "data.yaml").write_text("names: [c]\n")
    assert open_layout("yolo", tmp_path).classes == ("background", "c")
    with pytest.raises(BanaError, match="no image folder for split 'train'.*obj_train_data"):
        open_layout("yolo", tmp_path).split_ids("train")


@pytest.mark.parametrize("writer", [write_datumaro_yolo, write_cvat_yolo, write_globox_yolo])
def test_darknet_and_globox_exports_are_read_exactly(tmp_path, writer):
    """Darknet exports (obj.names, labels beside the images in obj_<split>_data/) and globox's
    (no class file: DATA.CLASSES in the ids' order) give the boxes and classes the tools wrote."""
    export = writer(tmp_path / "export", default_splits(make_images(6)))
    keys = {"CLASSES": list(export.classes)} if writer is write_globox_yolo else {}
    data = open_layout("yolo", export.root, **keys)
    assert data.classes == ("background", *export.classes)
    for split in export.splits:
        for image in export.images[split]:
            ann = data.annotation(split, image.path.stem)
            truth = np.array([[b.x1, b.y1, b.x2, b.y2] for b in image.boxes]).reshape(-1, 4)
            np.testing.assert_allclose(ann.boxes, truth, atol=1e-3)
            assert [data.classes[c] for c in ann.classes] == [b.label for b in image.boxes]
        assert sorted(data.split_ids(split)) == sorted(im.path.stem for im in export.images[split])


def voc_as_yolo(voc: Path, out: Path) -> list[str]:
    """The synthetic VOC tree rewritten in the Ultralytics layout (PNG images, normalised boxes,
    GT masks in masks/<split>/ renumbered to YOLO's classes + 1); returns the class names."""
    from data.voc import parse_annotation
    from utils.palette import VOC_CLASSES

    names = ["bird", "car", "cat", "dog", "person"]
    lut = np.full(256, 255, np.uint8)
    lut[0] = 0
    for k, name in enumerate(names, start=1):
        lut[VOC_CLASSES.index(name)] = k
    for split in ("train", "val"):
        for image_id in (voc / "ImageSets/Segmentation" / f"{split}.txt").read_text().split():
            image = Image.open(voc / "JPEGImages" / f"{image_id}.jpg")
            (out / "images" / split).mkdir(parents=True, exist_ok=True)
            image.save(out / "images" / split / f"{image_id}.png")
            width, height = image.size
            boxes, classes = parse_annotation(voc / "Annotations" / f"{image_id}.xml")
            lines = [f"{names.index(VOC_CLASSES[c])} {(x1 + x2) / 2 / width} "
                     f"{(y1 + y2) / 2 / height} {(x2 - x1) / width} {(y2 - y1) / height}"
                     for (x1, y1, x2, y2), c in zip(boxes.tolist(), classes.tolist())]
            (out / "labels" / split).mkdir(parents=True, exist_ok=True)
            (out / "labels" / split / f"{image_id}.txt").write_text("\n".join(lines) + "\n")
            gt = read_index_png(voc / "SegmentationClassAug" / f"{image_id}.png")
            atomic_write_png(out / "masks" / split / f"{image_id}.png", lut[gt])
    (out / "data.yaml").write_text(yaml.safe_dump({"path": str(out), "train": "images/train",
                                                   "val": "images/val",
                                                   "names": dict(enumerate(names))}))
    return names


def test_a_voc_tree_as_yolo_reads_the_same_boxes_and_masks(synthetic_voc, tmp_path):
    from tests.conftest import open_layout as layout

    names = voc_as_yolo(synthetic_voc, tmp_path / "Y")
    yolo, voc = layout("yolo", tmp_path / "Y"), layout("voc", synthetic_voc)
    assert yolo.classes == ("background", *names)
    assert yolo.split_ids("train") == sorted(voc.split_ids("train"))
    for image_id in voc.split_ids("train"):
        ours, theirs = yolo.annotation("train", image_id), voc.annotation("train", image_id)
        np.testing.assert_allclose(ours.boxes, theirs.boxes, atol=1e-4)
        assert [yolo.classes[c] for c in ours.classes] == [voc.classes[c] for c in theirs.classes]
        assert yolo.bg_mask_path("train", image_id) == (tmp_path / "Y" / "BgMaskfromBoxes" /
                                                        "train" / f"{image_id}.png")
    assert yolo.has_gt("val") and yolo.gt_label("val", voc.split_ids("val")[0]).shape == (64, 64)


@pytest.mark.slow
def test_a_yolo_dataset_through_every_entry_point(synthetic_voc, tmp_path):
    """Stages 1-3 (background masks written on first use), evaluate.py in both modes and
    predict.py; labels are named by image stem."""
    from tests.test_own_data import _pipeline, _script

    root = tmp_path / "Y"
    names = voc_as_yolo(synthetic_voc, root)
    shutil.rmtree(root / "masks" / "train")  # box-only training data; val keeps its masks
    opts = ["DATA.DATASET", "yolo", "DATA.ROOT", str(root), "DATA.NUM_CLASSES",
            str(len(names) + 1), "DATA.SPLIT", "train", "DATA.VAL_SPLIT", "val"]
    out, pred = _pipeline(opts, tmp_path, root / "images" / "val", names, quality=False)
    assert len(list((root / "BgMaskfromBoxes" / "train").glob("*.png"))) == 12
    assert sorted(p.stem for p in (root / "Generation" / "Y_crf").glob("*.png")) == \
        sorted(p.stem for p in (root / "images" / "train").iterdir())
    for image in (root / "images" / "val").iterdir():
        np.testing.assert_array_equal(read_index_png(pred / f"{image.stem}.png"),
                                      read_index_png(out / "stage3/eval/pred" / image.name))
    folder = _script("evaluate.py", "--pred-dir", out / "stage3" / "eval" / "pred",
                     "--data-root", root, "--split", "val")
    assert "person" in folder and folder.splitlines()[-1].startswith("mIoU: ")


def test_data_yaml_with_an_alias_bomb_or_deep_nesting_is_named(tiny_yolo):
    """data.yaml is read within the bounds of every YAML file here (utils.parsing): before,
    `names:` as an alias bomb was expanded by str() for every name (memory), and nesting 100k
    deep was a RecursionError."""
    from tests.test_configs import _alias_bomb

    path = tiny_yolo / "data.yaml"
    path.write_text(_alias_bomb() + "names: *a6\n")
    with pytest.raises(BanaError, match=rf"{path} is not valid YAML: its aliases \(\*name\) "
                                        r"expand to more than 100,000 values"):
        open_layout("yolo", tiny_yolo)
    path.write_text("names: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(BanaError, match=rf"{path} is not valid YAML: the document nests more "
                                        r"than 100 levels deep"):
        open_layout("yolo", tiny_yolo)


def test_a_nan_coordinate_is_named_by_file_and_line(tiny_yolo):
    txt = tiny_yolo / "labels" / "train" / "img_000.txt"
    txt.write_text("0 0.5 0.5 0.2 0.2\n1 nan 0.5 0.2 0.2\n")
    with pytest.raises(BanaError, match=rf"{txt}: line 2 \('1 nan 0.5 0.2 0.2'\) has cx, cy, w, "
                                        r"h \[nan, 0.5, 0.2, 0.2\], which is not a finite number"):
        open_layout("yolo", tiny_yolo).annotation("train", "img_000")
