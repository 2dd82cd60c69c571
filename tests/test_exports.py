"""Self-checks of the tool-export fixtures in tests/exports.py: every writer's files exist and
parse, and a small independent reader (json / xml.etree / plain text, written here, not shared
with exports.py) gets back the truth the writer returns, under each tool's convention."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import exports as X  # noqa: E402

CLASSES = ("cat", "dog", "bird")
EPS = 1e-6


@pytest.fixture(scope="module")
def images():
    return X.make_images(6, (64, 48), CLASSES, seed=0)


def _splits(images, layout):
    return X.default_splits(images, "valid" if layout.startswith("roboflow") else "val")


# ------------------------------------------------------------------ independent readers

def read_coco(json_path: Path, resolve) -> list:
    """[(image file, [(x1, y1, x2, y2, name)])] in the JSON's image order."""
    doc = json.loads(json_path.read_text())
    names = {c["id"]: c["name"] for c in doc["categories"]}
    per_image = {im["id"]: [] for im in doc["images"]}
    for a in doc["annotations"]:
        x, y, w, h = (float(v) for v in a["bbox"])
        per_image[a["image_id"]].append((x, y, x + w, y + h, names[a["category_id"]]))
    return [(resolve(im["file_name"]), per_image[im["id"]]) for im in doc["images"]]


def read_voc_xml(xml_path: Path, offset: float = 0.0) -> list:
    root = ET.parse(xml_path).getroot()
    out = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        vals = [float(bb.find(t).text) - offset for t in ("xmin", "ymin", "xmax", "ymax")]
        out.append((*vals, obj.find("name").text))
    return out


def read_yolo_txt(txt: Path | None, image: Path, names) -> list:
    if txt is None or not txt.exists():
        return []
    W, H = Image.open(image).size
    out = []
    for line in txt.read_text().splitlines():
        if not line.strip():
            continue
        c, cx, cy, w, h = line.split()
        cx, cy, w, h = float(cx), float(cy), float(w), float(h)
        out.append(((cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H,
                    names[int(c)]))
    return out


def _img_files(folder: Path) -> list:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def read_back(exp: X.Export) -> dict:
    """split -> [(image file, boxes)] read from disk the way each tool's files are meant to be
    read. Order: the annotation/list file's order where the format has one, else file names."""
    root, layout, out = exp.root, exp.layout, {}
    for split in exp.splits:
        if layout in ("supervision_coco", "roboflow_coco", "label_studio_coco"):
            j = exp.annotation_files[split]
            out[split] = read_coco(j, lambda f, d=j.parent: d / f)
        elif layout in ("globox_coco", "datumaro_coco", "cvat_coco"):
            j = exp.annotation_files[split]
            out[split] = read_coco(j, lambda f, s=split: root / "images" / s / f)
        elif layout == "labelme2coco":
            out[split] = read_coco(exp.annotation_files[split], lambda f: Path(f))
        elif layout in ("supervision_voc", "globox_voc"):
            sub = "labels" if layout == "supervision_voc" else "Annotations"
            off = 1.0 if layout == "supervision_voc" else 0.0
            out[split] = [(im, read_voc_xml(root / split / sub / (im.stem + ".xml"), off))
                          for im in _img_files(root / split / "images")]
        elif layout in ("datumaro_voc", "cvat_voc"):
            ids = (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
            rows = []
            for i in ids:
                xml = root / "Annotations" / f"{i}.xml"
                fname = ET.parse(xml).getroot().find("filename").text
                rows.append((root / "JPEGImages" / fname, read_voc_xml(xml)))
            out[split] = rows
        elif layout == "labelimg_voc":
            rows = []
            for im in _img_files(root / split):
                xml = im.with_suffix(".xml")
                rows.append((im, read_voc_xml(xml) if xml.exists() else []))
            out[split] = rows
        elif layout in ("supervision_yolo", "globox_yolo"):
            if layout == "supervision_yolo":
                names = yaml.safe_load((root / "data.yaml").read_text())["names"]
            else:
                names = list(exp.classes)  # globox writes no class file
            out[split] = [(im, read_yolo_txt(root / split / "labels" / (im.stem + ".txt"), im,
                                             names))
                          for im in _img_files(root / split / "images")]
        elif layout in ("datumaro_yolo", "cvat_yolo"):
            names = (root / "obj.names").read_text().splitlines()
            rows = []
            for line in (root / f"{split}.txt").read_text().splitlines():
                im = root / line.removeprefix("data/")
                rows.append((im, read_yolo_txt(im.with_suffix(".txt"), im, names)))
            out[split] = rows
        elif layout == "ultralytics_yolo":
            cfg = yaml.safe_load((root / "data.yaml").read_text())
            base = root / cfg["path"]
            names = cfg["names"]
            rows = []
            for line in (base / cfg[split]).read_text().splitlines():
                im = base / line
                rel = Path(line).relative_to("images")
                rows.append((im, read_yolo_txt(base / "labels" / rel.with_suffix(".txt"), im,
                                               names)))
            out[split] = rows
        elif layout == "roboflow_yolo":
            cfg = yaml.safe_load((root / "data.yaml").read_text())
            key = {"valid": "val"}.get(split, split)
            img_dir = root / cfg[key].removeprefix("../")
            out[split] = [(im, read_yolo_txt(img_dir.parent / "labels" / (im.stem + ".txt"), im,
                                             cfg["names"]))
                          for im in _img_files(img_dir)]
        else:
            raise AssertionError(f"no reader for {layout}")
    return out


# ------------------------------------------------------------------ checks

def _same_boxes(got, want, eps=EPS):
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):
        assert g[4] == w.label, (g, w)
        for a, b in zip(g[:4], (w.x1, w.y1, w.x2, w.y2)):
            assert abs(a - b) <= eps, (g, w)


def _check_export(exp: X.Export, splits):
    root = exp.root
    # every file it claims exists, and nothing else was written
    assert exp.files and all(p.is_file() for p in exp.files)
    assert {p for p in root.rglob("*") if p.is_file()} == set(exp.files)
    for p in exp.files:
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".xml":
            ET.parse(p)
        elif p.suffix == ".yaml":
            yaml.safe_load(p.read_text())
        elif p.suffix.lower() in (".jpg", ".png"):
            with Image.open(p) as im:
                im.verify()
    for im in exp.all_images():
        assert im.path in exp.files
        assert im.annotation is None or im.annotation in exp.files
        with Image.open(im.path) as pil:
            assert pil.size == (im.width, im.height)
        # the truth is the input moved by no more than the tool's rounding
        assert [b.label for b in im.boxes] == [b.label for b in im.source_boxes]
        for t, s in zip(im.boxes, im.source_boxes):
            for a, b in zip((t.x1, t.y1, t.x2, t.y2), (s.x1, s.y1, s.x2, s.y2)):
                assert abs(a - b) <= exp.tolerance + 1e-9, (exp.layout, t, s)
    # reading the files back gives the truth
    got = read_back(exp)
    assert tuple(got) == exp.splits
    for split in exp.splits:
        want = exp.images[split]
        rows = got[split]
        if exp.layout in ("supervision_voc", "globox_voc", "labelimg_voc", "supervision_yolo",
                          "globox_yolo", "roboflow_yolo"):  # no listing order: by file name
            want = sorted(want, key=lambda im: im.path.name)
        assert [r[0].resolve() for r in rows] == [im.path for im in want], exp.layout
        for (path, boxes), im in zip(rows, want):
            _same_boxes(boxes, im.boxes)


@pytest.mark.parametrize("layout", sorted(X.WRITERS))
def test_writer_round_trips(layout, images, tmp_path):
    splits = _splits(images, layout)
    exp = X.WRITERS[layout](tmp_path / layout, splits, CLASSES)
    assert exp.layout == layout
    assert exp.root == (tmp_path / layout).resolve()
    _check_export(exp, splits)
    # every input image is there, except where the tool drops images without boxes
    n_in = sum(len(v) for v in splits.values())
    n_out = len(exp.all_images())
    if layout == "label_studio_coco":
        assert n_out == n_in - sum(1 for v in splits.values() for _, _, b in v if not b)
    elif layout != "labelme2coco":
        assert n_out == n_in


def test_make_images_covers_the_cases(images):
    W, H = 64, 48
    assert all(rgb.shape == (H, W, 3) and rgb.dtype.name == "uint8" for _, rgb, _ in images)
    boxes = [b for _, _, bs in images for b in bs]
    assert any(not bs for _, _, bs in images)
    assert all(len(bs) <= 3 for _, _, bs in images)
    assert any(b[0] == 0 or b[1] == 0 or b[2] == W or b[3] == H for b in boxes)
    assert any(float(v) != int(v) for b in boxes for v in b[:4])
    assert {b[4] for b in boxes} == set(CLASSES)
    assert len({n for n, _, _ in images}) == len(images)


# ------------------------------------------------------------------ tool-specific facts

def test_supervision_voc_is_plus_one_on_both_corners(images, tmp_path):
    exp = X.write_supervision_voc(tmp_path, _splits(images, "x"), CLASSES)
    im = next(i for i in exp.all_images() if i.source_name == "img_002.jpg")  # x2 = W, y2 = H
    raw = read_voc_xml(im.annotation)[0]
    assert raw[2] == 65 and raw[3] == 49  # W + 1, H + 1
    assert (im.boxes[0].x2, im.boxes[0].y2) == (64.0, 48.0)
    assert ET.parse(im.annotation).getroot().find("object/difficult") is None
    old = X.write_supervision_voc(tmp_path / "old", _splits(images, "x"), CLASSES, plus_one=False)
    im_old = next(i for i in old.all_images() if i.source_name == "img_002.jpg")
    assert read_voc_xml(im_old.annotation)[0][2] == 64


def test_supervision_coco_category_ids(images, tmp_path):
    old = X.write_supervision_coco(tmp_path / "a", _splits(images, "x"), CLASSES)
    new = X.write_supervision_coco(tmp_path / "b", _splits(images, "x"), CLASSES, one_based=True)
    for exp, first in ((old, 0), (new, 1)):
        doc = json.loads(exp.annotation_files["train"].read_text())
        assert [c["id"] for c in doc["categories"]] == [first, first + 1, first + 2]
        assert doc["images"][0]["id"] == 1 and doc["annotations"][0]["id"] == 1
        assert all(a["segmentation"] == [] and a["iscrowd"] == 0 for a in doc["annotations"])
    _check_export(new, None)


def test_globox_numbers_categories_per_file(images, tmp_path):
    exp = X.write_globox_coco(tmp_path, _splits(images, "x"), CLASSES)
    for split, path in exp.annotation_files.items():
        doc = json.loads(path.read_text())
        present = sorted({b.label for im in exp.images[split] for b in im.boxes})
        assert [(c["id"], c["name"]) for c in doc["categories"]] == list(enumerate(present))
        assert sorted(im["id"] for im in doc["images"]) == list(range(len(doc["images"])))
        assert all("ignore" in a for a in doc["annotations"])


def test_labelme2coco_paths_and_category_ids(images, tmp_path):
    splits = _splits(images, "x")
    one = X.write_labelme2coco(tmp_path / "one", splits, CLASSES)
    doc = json.loads(one.annotation_files["dataset"].read_text())
    assert all(Path(im["file_name"]).is_absolute() and Path(im["file_name"]).is_file()
               for im in doc["images"])
    assert len(doc["images"]) == len(images)  # images without shapes are kept
    assert [c["name"] for c in doc["categories"]] == list(one.classes) == ["dog", "bird", "cat"]
    assert doc["categories"][0]["id"] == 0

    # one run with a train/val split: both files share the category list
    tv = X.write_labelme2coco(tmp_path / "tv", splits, CLASSES, train_split_rate=0.7)
    cats = [json.loads(tv.annotation_files[s].read_text())["categories"] for s in ("train", "val")]
    assert cats[0] == cats[1]
    assert len(tv.images["train"]) == int(len(images) * 0.7)
    _check_export(tv, None)

    # one run per folder: the same names get different ids
    runs = X.write_labelme2coco(tmp_path / "runs", splits, CLASSES, per_split_runs=True)
    ids = runs.extra["category_ids"]
    assert any(ids["train"][n] != ids["val"][n] for n in set(ids["train"]) & set(ids["val"]))
    for s in ("train", "val"):
        doc = json.loads(runs.annotation_files[s].read_text())
        assert {c["name"]: c["id"] for c in doc["categories"]} == ids[s]
    _check_export(runs, None)

    poly = X.write_labelme2coco(tmp_path / "poly", splits, CLASSES, polygons=True)
    assert poly.tolerance < 1e-6
    a = json.loads(poly.annotation_files["dataset"].read_text())["annotations"][0]
    assert len(a["segmentation"][0]) == 8 and all(isinstance(v, int) for v in a["segmentation"][0])
    _check_export(poly, None)


def test_datumaro_voc_lists_and_labelmap(images, tmp_path):
    exp = X.write_datumaro_voc(tmp_path, _splits(images, "x"), CLASSES)
    root = exp.root
    empty = [im for im in exp.all_images() if not im.source_boxes]
    assert empty and all(im.annotation.is_file() for im in empty)  # an XML even without objects
    for split in exp.splits:
        main = (root / "ImageSets/Main" / f"{split}.txt").read_text().split()
        assert main == [Path(im.source_name).stem for im in exp.images[split]]
        empties = [Path(im.source_name).stem for im in exp.images[split] if not im.source_boxes]
        for task in ("Segmentation", "Layout", "Action"):
            f = root / "ImageSets" / task / f"{split}.txt"
            assert (f.read_text().split() if f.exists() else []) == empties
    lines = (root / "labelmap.txt").read_text().splitlines()
    assert lines[0] == "# label:color_rgb:parts:actions"
    assert lines[1] == "background:0,0,0::"
    assert [ln.split(":")[0] for ln in lines[1:]] == ["background", *CLASSES]
    assert lines[2] == "cat:128,0,0::"
    assert ET.parse(empty[0].annotation).getroot().findtext("size/depth") == "3"
    cvat = X.write_cvat_voc(tmp_path / "cvat", _splits(images, "x"), CLASSES)
    xml = ET.parse(cvat.all_images()[0].annotation).getroot()
    assert xml.findtext("size/depth") == ""
    assert xml.findtext("object/attributes/attribute/name") == "rotation"
    assert xml.findtext("object/occluded") == "0"


def test_datumaro_coco_ids(images, tmp_path):
    exp = X.write_datumaro_coco(tmp_path, _splits(images, "x"), CLASSES)
    train = json.loads(exp.annotation_files["train"].read_text())
    val = json.loads(exp.annotation_files["val"].read_text())
    assert [c["id"] for c in train["categories"]] == [1, 2, 3]
    assert [im["id"] for im in val["images"]][0] == len(train["images"]) + 1  # continues
    assert val["annotations"][0]["id"] == 1  # restarts
    cvat = X.write_cvat_coco(tmp_path / "cvat", _splits(images, "x"), CLASSES)
    ann = json.loads(cvat.annotation_files["train"].read_text())["annotations"][0]
    assert ann["attributes"] == {"occluded": False, "rotation": 0.0}


def test_yolo_empty_image_conventions(images, tmp_path):
    splits = _splits(images, "x")
    empty = next(n for n, _, b in images if not b)
    ul = X.write_ultralytics_yolo(tmp_path / "ul", splits, CLASSES)
    im = next(i for i in ul.all_images() if i.source_name == empty)
    assert im.annotation is None
    assert not (ul.root / "labels" / "train" / (Path(empty).stem + ".txt")).exists()
    assert f"images/train/{empty}" in (ul.root / "train.txt").read_text().splitlines()
    cfg = yaml.safe_load(ul.extra["data_yaml"].read_text())
    assert cfg["names"] == dict(enumerate(CLASSES)) and cfg["path"] == "."
    for writer in (X.write_cvat_yolo, X.write_supervision_yolo, X.write_globox_yolo):
        exp = writer(tmp_path / writer.__name__, splits, CLASSES)
        im = next(i for i in exp.all_images() if i.source_name == empty)
        assert im.annotation.is_file() and im.annotation.read_text() == ""
    rf = X.write_roboflow_yolo(tmp_path / "rf", _splits(images, "roboflow"), CLASSES)
    cfg = yaml.safe_load(rf.extra["data_yaml"].read_text())
    assert cfg["names"] == sorted(CLASSES) and cfg["val"] == "../valid/images"
    assert all(".rf." in im.path.name for im in rf.all_images())


def test_labelimg_clamps_and_skips_empty(images, tmp_path):
    exp = X.write_labelimg_voc(tmp_path, _splits(images, "x"), CLASSES)
    im0 = next(i for i in exp.all_images() if i.source_name == "img_000.jpg")  # x1 = y1 = 0
    assert (im0.boxes[0].x1, im0.boxes[0].y1) == (1.0, 1.0)
    root = ET.parse(im0.annotation).getroot()
    assert Path(root.findtext("path")).is_absolute() and root.findtext("object/truncated") == "1"
    assert all(v.text.isdigit() for v in root.iter() if v.tag in ("xmin", "xmax"))
    empty = [i for i in exp.all_images() if not i.source_boxes]
    assert empty and all(i.annotation is None for i in empty)
    saved = X.write_labelimg_voc(tmp_path / "s", _splits(images, "x"), CLASSES, save_empty=True)
    assert all(i.annotation is not None for i in saved.all_images())


def test_roboflow_coco_root_category(images, tmp_path):
    exp = X.write_roboflow_coco(tmp_path, _splits(images, "roboflow"), CLASSES)
    doc = json.loads(exp.annotation_files["train"].read_text())
    assert doc["categories"][0] == {"id": 0, "name": "objects", "supercategory": "none"}
    assert [c["name"] for c in doc["categories"][1:]] == sorted(CLASSES)
    assert all(a["category_id"] != 0 for a in doc["annotations"])
    assert doc["images"][0]["id"] == 0 and doc["annotations"][0]["id"] == 0


def test_label_studio_drops_empty_images(images, tmp_path):
    exp = X.write_label_studio_coco(tmp_path, _splits(images, "x"), CLASSES)
    doc = json.loads(exp.annotation_files["train"].read_text())
    assert all(not Path(im["file_name"]).is_absolute() for im in doc["images"])
    assert [c["name"] for c in doc["categories"]] == sorted(CLASSES)
    assert all(isinstance(v, int) for a in doc["annotations"] for v in a["bbox"])
    assert not any(not im.source_boxes for im in exp.all_images())
