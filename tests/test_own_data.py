"""Your own boxes: a COCO-format export with made-up classes and a VOC-format export with its own
class list, through every stage, evaluate.py (both modes) and predict.py."""

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.coco import load_instances, rasterise_semantic
from data.datasets import detect_data
from data.synthetic_coco import CUSTOM_CATEGORIES, make_custom_coco
from data.voc import parse_annotation
from data.voc import read_class_list as read_classes
from tests.conftest import REPO
from tests.zygote import run_python
from utils.errors import BanaError
from utils.io import atomic_write_json, atomic_write_png, read_image, read_index_png


def read_class_list(value):
    return read_classes(value)[0]

CUSTOM_NAMES = [name for _, name in sorted(CUSTOM_CATEGORIES)]


@pytest.fixture(scope="module")
def custom_coco(tmp_path_factory):
    from data.coco_bbox_setup import write_bg_masks

    root = tmp_path_factory.mktemp("custom") / "R"
    make_custom_coco(root, n_train=10, n_val=4, size=64, seed=1)
    write_bg_masks(root, progress=False)
    return root


def _copy(root, tmp_path):
    return Path(shutil.copytree(root, tmp_path / "R"))


def _edit_annotations(root, split, edit):
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    edit(data)
    atomic_write_json(path, data)
    return path


# --- the export itself -------------------------------------------------------------------------

def test_the_custom_export_has_what_real_exports_have(custom_coco):
    data = json.loads((custom_coco / "annotations/instances_train.json").read_text())
    ids = [c["id"] for c in data["categories"]]
    assert ids != sorted(ids) and ids != list(range(1, len(ids) + 1))  # gappy, out of order
    segs = [a["segmentation"] for a in data["annotations"]]
    assert any(isinstance(s, list) for s in segs) and any(isinstance(s, dict) for s in segs)
    assert any(a["iscrowd"] for a in data["annotations"])
    annotated = {a["image_id"] for a in data["annotations"]}
    assert any(im["id"] not in annotated for im in data["images"])  # an image without boxes


def test_class_map_all_numbers_the_categories_by_ascending_id(custom_coco):
    data = detect_data(custom_coco, "train")
    data.box_dataset("train")
    assert data.classes == ("background", *CUSTOM_NAMES)
    assert data.class_map("train").index == {cat_id: k for k, (cat_id, _) in
                                             enumerate(sorted(CUSTOM_CATEGORIES), start=1)}


def test_num_classes_mismatch_names_the_right_number(custom_coco):
    from tests.conftest import open_layout

    data = open_layout("coco", custom_coco, NUM_CLASSES=7)
    with pytest.raises(BanaError, match="DATA.NUM_CLASSES must be 5, not 7"):
        data.box_dataset("train")


# --- semantic ground truth from instances ------------------------------------------------------

def test_rasterise_semantic_hand_made():
    """Two overlapping squares (the smaller, class 2, wins where they overlap), a crowd region
    and an instance of an unpredicted category (both 255), one given as a polygon."""
    h = w = 10
    big = {"size": [h, w], "counts": None}
    from pycocotools import mask as mask_utils

    m_big = np.zeros((h, w), np.uint8, order="F")
    m_big[1:7, 1:7] = 1
    big = mask_utils.encode(m_big)
    small_poly = [[4.0, 4.0, 8.0, 4.0, 8.0, 8.0, 4.0, 8.0]]  # pixels 4..7 (corners)
    m_crowd = np.zeros((h, w), np.uint8, order="F")
    m_crowd[9, :] = 1
    m_other = np.zeros((h, w), np.uint8, order="F")
    m_other[0, 8:] = 1
    label = rasterise_semantic(h, w, [36, 16, 10, 2], [1, 2, 1, 0], [False, False, True, False],
                               [big, small_poly, mask_utils.encode(m_crowd),
                                mask_utils.encode(m_other)])
    expected = np.zeros((h, w), np.uint8)
    expected[1:7, 1:7] = 1
    small = np.zeros((h, w), bool)
    small[mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(small_poly, h, w))) > 0] = True
    expected[small] = 2
    expected[9, :] = 255
    expected[0, 8:] = 255
    np.testing.assert_array_equal(label, expected)
    assert (label == 2).sum() >= 9


def test_a_split_without_segmentations_trains_but_is_not_scored(custom_coco, tmp_path):
    root = _copy(custom_coco, tmp_path)

    def strip(data):
        for a in data["annotations"]:
            a.pop("segmentation", None)
    _edit_annotations(root, "val", strip)
    data = detect_data(root, "val")
    assert not data.has_gt("val") and data.gt_ids("val") == []
    with pytest.raises(BanaError, match=r"4 of 4 images of split 'val' have no ground-truth "
                                        r"mask"):
        data.mask_dataset("val")
    assert len(data.mask_dataset("val", only_gt=True)) == 0
    (root / "labels").mkdir()
    for i in data.split_ids("val"):
        atomic_write_png(root / "labels" / f"{i}.png", np.zeros((64, 64), np.uint8))
    trainable = data.mask_dataset("val", label_dirs=("labels", "labels"))
    assert trainable[0]["label"].shape == (2, 64, 64)


# --- bad exports --------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"][0].update(category_id=999),
     r"annotation \d+ has category id 999, which is not in 'categories'"),
    (lambda d: d["annotations"][0].update(image_id=123456),
     r"annotation \d+ refers to image 123456, which is not in 'images'"),
    (lambda d: d["annotations"][0].update(bbox=[50.0, 50.0, 40.0, 10.0]),
     r"annotation \d+ has bbox \[50.0, 50.0, 40.0, 10.0\] with a part outside its image"),
    (lambda d: d["annotations"][0].update(bbox=[5.0, 5.0, 0.0, 10.0]),
     r"width or height that is not positive"),
    (lambda d: d["annotations"][0].update(bbox=[5.0, 5.0, 10.0, -3.0]),
     r"width or height that is not positive"),
    (lambda d: d["categories"].append(dict(d["categories"][0])), "two categories share an id"),
])
def test_bad_exports_are_named(custom_coco, tmp_path, edit, message):
    root = _copy(custom_coco, tmp_path)
    path = _edit_annotations(root, "train", edit)
    with pytest.raises(BanaError, match=message) as info:
        load_instances(root, "train", coco2017=False)
    assert str(path) in str(info.value)


@pytest.mark.slow
def test_a_missing_image_file_is_named(custom_coco, tmp_path, run_script):
    root = _copy(custom_coco, tmp_path)
    assert run_script("data/coco_bbox_setup.py", "--data-root", root).returncode == 0
    victim = sorted((root / "train").iterdir())[2]
    victim.unlink()
    with pytest.raises(BanaError, match=f"1 of 10 images of split 'train' are missing, e.g. "
                                        f"{victim}"):
        detect_data(root, "train").box_dataset("train")


# --- VOC with its own classes -------------------------------------------------------------------

def test_class_lists_from_yaml_or_labelmap_files(tmp_path):
    labelmap = tmp_path / "labelmap.txt"
    labelmap.write_text("# label:color_rgb:parts:actions\nbackground:0,0,0::\ncrack:255,0,0::\n"
                        "rust:0,255,0::\n\n")
    assert read_class_list([str(labelmap)]) == ("crack", "rust")
    names = tmp_path / "names.txt"
    names.write_text("crack\nrust\ndent\n")
    assert read_class_list([str(names)]) == ("crack", "rust", "dent")
    assert read_class_list(["crack", "rust"]) == ("crack", "rust")
    assert len(read_class_list([])) == 20
    with pytest.raises(BanaError, match="lists crack more than once"):
        read_class_list(["crack", "crack"])
    with pytest.raises(BanaError, match="does not exist"):
        read_class_list([str(tmp_path / "nope.txt")])


def test_unknown_xml_class_names_the_file_the_name_and_the_list(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text("<annotation><object><name>dent</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
                   "<xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")
    with pytest.raises(BanaError, match=r"a.xml has an object of unknown class 'dent'; expected "
                                        r"one of: crack, rust\..*add it to DATA.CLASSES"):
        parse_annotation(xml, ("background", "crack", "rust"))
    boxes, classes = parse_annotation(xml, ("background", "rust", "dent"))
    assert classes.tolist() == [2]


def make_custom_voc(src: Path, dst: Path) -> list[str]:
    """A VOC export with its own classes from the synthetic VOC tree: object names renamed, GT
    masks renumbered to 1..K, and a CVAT-style labelmap.txt. Returns the class names."""
    from utils.palette import VOC_CLASSES

    shutil.copytree(src, dst)
    renames = {"cat": "kitten", "dog": "puppy", "bird": "sparrow", "car": "hatchback",
               "person": "pedestrian"}
    names = list(renames.values())
    for xml in (dst / "Annotations").glob("*.xml"):
        tree = ET.parse(xml)
        for obj in tree.getroot().iter("object"):
            obj.find("name").text = renames[obj.find("name").text]
        tree.write(xml)
    lut = np.arange(256, dtype=np.uint8)
    for old, new in renames.items():
        lut[VOC_CLASSES.index(old)] = names.index(new) + 1
    for png in (dst / "SegmentationClassAug").glob("*.png"):
        atomic_write_png(png, lut[read_index_png(png)])
    (dst / "labelmap.txt").write_text("# label:color_rgb:parts:actions\nbackground:0,0,0::\n"
                                      + "".join(f"{n}:1,2,3::\n" for n in names))
    return names


# --- every entry point, end to end ---------------------------------------------------------------

def _script(*args):
    proc = run_python(args, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


FAST = ["DATA.CROP_SIZE", "48", "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0",
        "SOLVER.MAX_ITER", "6", "SOLVER.CKPT_EVERY", "3", "SOLVER.VAL_EVERY", "6",
        "SOLVER.MILESTONES", "[4]"]


def _pipeline(opts, tmp_path, val_images: Path, names, quality: bool = True):
    """stage 1, 2, 3, evaluate (model and folder mode) and predict with the demo configs;
    quality: the labelled split has masks, so stage 2 scores its labels."""
    out, pred = tmp_path / "O", tmp_path / "P"
    opts = [*opts, "OUTPUT_DIR", str(out)]
    _script("stage1.py", "--config-file", "configs/demo/stage1.yml", "--gpu-id", "cpu",
            "--opts", *opts, *FAST)
    s2 = _script("stage2.py", "--config-file", "configs/demo/stage2.yml", "--gpu-id", "cpu",
                 "--workers", "1", "--opts", *opts, "DATA.NUM_WORKERS", "0")
    assert ("Pseudo-label quality on 'train'" in s2) == quality
    _script("stage3.py", "--config-file", "configs/demo/stage3.yml", "--gpu-id", "cpu",
            "--opts", *opts, *FAST)
    single = ["TEST.SCALES", "[1.0]", "TEST.FLIP", "false", "TEST.CRF", "false"]
    ev = _script("evaluate.py", "--config-file", "configs/demo/stage3.yml", "--gpu-id", "cpu",
                 "--save-pred", "--opts", *opts, "TEST.SPLIT", "val", *single)
    line = next(l for l in ev.splitlines() if l.strip().startswith("single: mIoU"))
    assert 0 <= float(line.split()[2]) <= 100
    report = (out / "stage3" / "eval" / "metrics.md").read_text()
    assert all(name in report for name in names)
    _script("predict.py", "--config-file", "configs/demo/stage3.yml", "--gpu-id", "cpu",
            "--input", val_images, "--output", pred, "--opts", *opts, *single)
    return out, pred


@pytest.mark.slow
def test_custom_coco_export_through_every_entry_point(custom_coco, tmp_path):
    root = _copy(custom_coco, tmp_path)
    _script("data/coco_bbox_setup.py", "--data-root", root)
    opts = ["DATA.DATASET", "coco", "DATA.CLASS_MAP", "all", "DATA.ROOT", str(root),
            "DATA.SPLIT", "train", "DATA.VAL_SPLIT", "val", "DATA.NUM_CLASSES", "5"]
    out, pred = _pipeline(opts, tmp_path, root / "val", CUSTOM_NAMES)
    data = json.loads((root / "annotations/instances_val.json").read_text())
    # predict.py names outputs by file stem; evaluate.py by image id: the same labels.
    for image in data["images"]:
        predicted = read_index_png(pred / f"{Path(image['file_name']).stem}.png")
        scored = read_index_png(out / "stage3" / "eval" / "pred" / f"{image['id']}.png")
        np.testing.assert_array_equal(predicted, scored)
        assert (pred / "overlay" / f"{Path(image['file_name']).stem}.jpg").is_file()
    folder = _script("evaluate.py", "--pred-dir", out / "stage3" / "eval" / "pred",
                     "--data-root", root, "--split", "val")
    assert folder.splitlines()[-1].startswith("mIoU: ") and "sprocket" in folder
    quality = json.loads((out / "stage2" / "quality.json").read_text())
    assert set(quality["per_class_iou"]["Y_crf"]) == {"background", *CUSTOM_NAMES}
    assert "ap" in quality  # the instance masks were scored too


@pytest.mark.slow
def test_custom_voc_export_through_every_entry_point(synthetic_voc, tmp_path):
    root = tmp_path / "VOCX"
    names = make_custom_voc(synthetic_voc, root)
    opts = ["DATA.ROOT", str(root), "DATA.CLASSES", str(root / "labelmap.txt"),
            "DATA.NUM_CLASSES", str(len(names) + 1), "DATA.SPLIT", "train",
            "DATA.VAL_SPLIT", "val"]
    out, pred = _pipeline(opts, tmp_path, root / "JPEGImages", names)
    for i in (root / "ImageSets/Segmentation/val.txt").read_text().split():
        np.testing.assert_array_equal(read_index_png(pred / f"{i}.png"),
                                      read_index_png(out / "stage3" / "eval" / "pred" / f"{i}.png"))
    folder = _script("evaluate.py", "--pred-dir", out / "stage3" / "eval" / "pred", "--data-root",
                     root, "--split", "val", "--classes", root / "labelmap.txt")
    assert "kitten" in folder and folder.splitlines()[-1].startswith("mIoU: ")


# --- predict.py inputs --------------------------------------------------------------------------

def test_predict_reads_any_image_mode_and_exif_orientation(tmp_path):
    rgb = (np.arange(6 * 10 * 3) % 251).astype(np.uint8).reshape(6, 10, 3)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "grey.png")
    deep = (np.arange(60).reshape(6, 10) * 1000).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    rotated.save(tmp_path / "phone.jpg", exif=exif)
    for name in ("cmyk.jpg", "rgba.png", "grey.png", "deep.png"):
        assert read_image(tmp_path / name).shape == (6, 10, 3)
    deep_read = read_image(tmp_path / "deep.png")
    assert deep_read[0, 0, 0] == 0 and deep_read.max() == round(59000 / 257)  # not solid white
    assert read_image(tmp_path / "phone.jpg").shape == (6, 10, 3)
    assert read_image(tmp_path / "phone.jpg", exif=True).shape == (10, 6, 3)


def test_predict_lists_inputs_and_refuses_colliding_stems(tmp_path):
    from engine.predict import list_images

    (tmp_path / "a").mkdir()
    for name in ("x.jpg", "y.png", "notes.md"):
        (tmp_path / "a" / name).write_bytes(b"")
    (tmp_path / "list.txt").write_text("a/x.jpg\n\na/y.png\n")
    assert [p.name for p in list_images([str(tmp_path / "a")])] == ["x.jpg", "y.png"]
    assert [p.name for p in list_images([str(tmp_path / "list.txt")])] == ["x.jpg", "y.png"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.png").write_bytes(b"")
    with pytest.raises(BanaError, match="would both be written as x.png"):
        list_images([str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(BanaError, match="1 path\\(s\\) do not exist"):
        list_images([str(tmp_path / "nope")])
