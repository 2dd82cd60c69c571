"""The format-neutral label set (data/labelset.py) and the exporters that read it (exporters/).

Box exports of annotation tools in each input layout (tests/exports.py: VOC XML with string ids,
COCO JSON, YOLO txt) get label maps that differ from their boxes (an ellipse of the box's class
in each box, boxes of one class overlapping), are indexed into a label set by `labels.py index`
(as a folder of predictions is), and are exported to COCO, YOLO-seg and VOC. Each export is read
back by the library that owns the format (pycocotools and torchvision, Ultralytics' own dataset
code, PIL) and compared with the masks of the label set, which are checked against a slow
reference made here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tests.exports as X
from data.datasets import open_data
from data.labelset import LabelSet, box_fill, image_record
from engine.config import load_config
from engine.labels import index_folder
from exporters import EXPORTERS, run_exports
from utils.errors import BanaError
from utils.io import atomic_write_png, read_index_png
from utils.palette import voc_palette

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "bird")
# layout -> (DATA.DATASET, train split, needs DATA.CLASSES): one tool of each input format.
LAYOUTS = {"cvat_voc": ("voc", "train", False), "roboflow_coco": ("coco", "train", False),
           "ultralytics_yolo": ("yolo", "train", False), "labelimg_voc": ("voc", "train", True)}
# Polygons cannot be exact: an outline through the border pixels' centres, rasterised again.
# Measured on these masks (ellipses 4-40 px across): COCO's polygon option >= 0.85 per mask,
# Ultralytics' rasterisation of YOLO-seg >= 0.80; the bounds below are what the tests hold to.
COCO_POLYGON_IOU = 0.75
YOLO_POLYGON_IOU = 0.70


def paint(label: np.ndarray, box, value: int) -> None:
    """An ellipse inscribed in the box's pixel range, of class `value` (the slow way)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    cy, cx = (y1 + y2 - 1) / 2, (x1 + x2 - 1) / 2
    ry, rx = max((y2 - y1) / 2, 0.5), max((x2 - x1) / 2, 0.5)
    for y in range(y1, y2):
        for x in range(x1, x2):
            if ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1:
                label[y, x] = value


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def indexed(request, tmp_path_factory):
    """(label set, cfg, data): an export of `layout` whose train images got ellipse label maps,
    indexed as a folder of predictions."""
    layout = request.param
    dataset, split, needs_classes = LAYOUTS[layout]
    root = tmp_path_factory.mktemp(layout)
    images = X.make_images(12, (64, 48), CLASSES, seed=3)
    exp = X.WRITERS[layout](root / "export", X.default_splits(images), CLASSES)
    opts = ["DATA.DATASET", dataset, "DATA.ROOT", str(exp.root), "DATA.SPLIT", split,
            "DATA.NUM_CLASSES", str(len(CLASSES) + 1)]
    if needs_classes:
        opts += ["DATA.CLASSES", "[" + ", ".join(exp.classes) + "]"]
    if dataset == "coco":
        opts += ["DATA.CLASS_MAP", "all"]
    cfg = load_config(REPO / "configs/demo/stage2.yml", opts)
    data = open_data(cfg)
    predictions = root / "predictions"
    for image_id in data.split_ids(split):
        ann = data.annotation(split, image_id)
        height, width = np.asarray(Image.open(data.image_path(split, image_id))).shape[:2]
        label = np.zeros((height, width), np.uint8)
        order = np.argsort(-(ann.boxes[:, 2] - ann.boxes[:, 0]) * (ann.boxes[:, 3] - ann.boxes[:, 1]))
        for k in order:
            paint(label, np.clip(ann.boxes[k], 0, [width, height, width, height]),
                  int(ann.classes[k]))
        atomic_write_png(predictions / f"{data.image_path(split, image_id).stem}.png", label,
                         palette=voc_palette())
    index_folder(cfg, predictions, progress=False)
    return LabelSet(predictions), cfg, data


def test_records_hold_one_instance_per_box_inside_it_of_its_class(indexed):
    labels, cfg, data = indexed
    assert labels.ids == list(data.split_ids(cfg.DATA.SPLIT))
    assert labels.classes == data.classes
    boxes_seen = 0
    for rec in labels.records():
        label = labels.label(rec, "prediction")
        masks = labels.instance_masks(rec, "prediction")
        assert masks.shape == (len(rec["boxes"]), rec["height"], rec["width"])
        assert masks.sum(0).max(initial=0) <= 1  # one instance per pixel
        assert labels.image_path(rec) == data.image_path(cfg.DATA.SPLIT, rec["id"])
        for k, ((x1, y1, x2, y2), c) in enumerate(zip(rec["boxes"], rec["classes"])):
            inside = np.zeros_like(masks[k])
            inside[y1:y2, x1:x2] = True
            assert not (masks[k] & ~inside).any() and (label[masks[k]] == c).all()
            # fill, the slow way
            region = [label[y, x] == c for y in range(y1, y2) for x in range(x1, x2)]
            assert rec["fill"]["prediction"][k] == pytest.approx(np.mean(region), abs=1e-4)
            boxes_seen += 1
        # every pixel of a box's class inside a box of that class belongs to one of them
        for c in set(rec["classes"]):
            covered = np.zeros(label.shape, bool)
            for (x1, y1, x2, y2), ck in zip(rec["boxes"], rec["classes"]):
                if ck == c:
                    covered[y1:y2, x1:x2] = True
            owned = masks[[ck == c for ck in rec["classes"]]].any(0)
            np.testing.assert_array_equal(owned, covered & (label == c))
    assert boxes_seen > 5


def test_coco_export_is_read_by_pycocotools_and_torchvision_mask_for_mask(indexed, tmp_path):
    from pycocotools.coco import COCO
    from torchvision.datasets import CocoDetection

    labels, cfg, data = indexed
    (path,) = run_exports(labels, ["coco"], "prediction", tmp_path).values()
    coco = COCO(str(path))
    by_image = {im["file_name"]: im["id"] for im in coco.dataset["images"]}
    assert len(by_image) == len(labels.ids)
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    assert sorted(names.values()) == sorted(data.classes[1:])
    assert list(names) == data.category_ids(cfg.DATA.SPLIT)[1:]
    for rec in labels.records():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=by_image[rec["file_name"]]))
        masks = [m for m in labels.instance_masks(rec, "prediction") if m.any()]
        assert len(anns) == len(masks)
        for ann, mask in zip(anns, masks):
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), mask)  # RLE: exact
            assert ann["area"] == mask.sum() and ann["iscrowd"] == 0
            x, y, w, h = ann["bbox"]
            ys, xs = np.nonzero(mask)
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    tv = CocoDetection(str(labels.root), str(path))
    image, target = tv[0]
    assert image.size[0] > 0 and all("segmentation" in t for t in target)
    # polygons: within the stated IoU of each mask
    (poly_path,) = run_exports(labels, ["coco"], "prediction", tmp_path / "p",
                               {"coco": {"segmentation": "polygon"}}).values()
    poly = COCO(str(poly_path))
    for ann_rle, ann_poly in zip(coco.dataset["annotations"], poly.dataset["annotations"]):
        a, b = coco.annToMask(ann_rle).astype(bool), poly.annToMask(ann_poly).astype(bool)
        assert isinstance(ann_poly["segmentation"], list)
        assert all(len(p) >= 6 for p in ann_poly["segmentation"])
        assert (a & b).sum() / (a | b).sum() >= COCO_POLYGON_IOU


def test_yolo_seg_export_is_read_by_ultralytics_without_warnings(indexed, tmp_path, caplog):
    pytest.importorskip("ultralytics", reason="Ultralytics (a test-only dependency) is absent")
    import cv2
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    labels, cfg, data = indexed
    (yaml_path,) = run_exports(labels, ["yolo_seg"], "prediction", tmp_path).values()
    info = check_det_dataset(str(yaml_path), autodownload=False)
    assert [info["names"][k] for k in sorted(info["names"])] == list(data.classes[1:])
    with caplog.at_level(logging.WARNING):
        ds = YOLODataset(img_path=info["train"], data=info, task="segment", augment=False,
                         cache=False)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warned, warned
    assert len(ds.labels) == len(labels.ids)
    for item in ds.labels:
        stem = Path(item["im_file"]).stem
        rec = next(r for r in labels.records() if r["id"].replace("/", "__") == stem)
        h, w = rec["height"], rec["width"]
        masks = [m for m in labels.instance_masks(rec, "prediction") if m.any()]
        classes = [c for c, m in zip(rec["classes"], labels.instance_masks(rec, "prediction"))
                   if m.any()]
        assert item["cls"].reshape(-1).astype(int).tolist() == [c - 1 for c in classes]
        assert len(item["segments"]) == len(masks)
        for segment, mask in zip(item["segments"], masks):
            drawn = np.zeros((h, w), np.uint8)
            cv2.fillPoly(drawn, [np.round(segment * [w, h]).astype(np.int32)], 1)
            iou = (drawn.astype(bool) & mask).sum() / (drawn.astype(bool) | mask).sum()
            assert iou >= YOLO_POLYGON_IOU, (stem, iou)
        assert Path(item["im_file"]).resolve() == labels.image_path(rec).resolve()  # linked


def test_voc_export_reads_back_to_the_same_ids(indexed, tmp_path):
    labels, cfg, data = indexed
    (out,) = run_exports(labels, ["voc"], "prediction", tmp_path).values()
    listed = (out / "ImageSets/Segmentation" / f"{labels.split}.txt").read_text().split()
    assert listed == labels.ids
    for rec in labels.records():
        semantic = read_index_png(out / "SegmentationClass" / f"{rec['id']}.png")
        objects = read_index_png(out / "SegmentationObject" / f"{rec['id']}.png")
        np.testing.assert_array_equal(semantic, labels.label(rec, "prediction"))
        masks = [m for m in labels.instance_masks(rec, "prediction") if m.any()]
        expected = np.zeros_like(objects)
        for n, m in enumerate(masks, start=1):
            expected[m] = n
        np.testing.assert_array_equal(objects, expected)
        assert Image.open(out / "SegmentationClass" / f"{rec['id']}.png").mode == "P"
    bordered = EXPORTERS["voc"](labels, "prediction", tmp_path / "b", border=True)
    semantic = read_index_png(bordered / "SegmentationClass" / f"{labels.ids[0]}.png")
    plain = read_index_png(out / "SegmentationClass" / f"{labels.ids[0]}.png")
    changed = semantic != plain
    assert (semantic[changed] == 255).all()
    assert changed.any() == bool((plain > 0).any())


def test_agreement_variant_is_the_overlap_of_y_crf_and_y_ret():
    """A 6x6 image, one cat box [0,6)²: Y_crf cat on the left four columns, Y_ret on the right
    four; they agree on columns 2-3 (cat) and nowhere else inside the box."""
    boxes, classes = np.array([[0, 0, 6, 6]]), np.array([1])
    crf, ret = np.zeros((6, 6), np.uint8), np.zeros((6, 6), np.uint8)
    crf[:, :4], ret[:, 2:] = 1, 1
    rec = image_record("a/b c", "x.jpg", boxes, classes, {"Y_crf": crf, "Y_ret": ret},
                       {"Y_crf": "Y_crf/a.png", "Y_ret": "Y_ret/a.png"})
    assert rec["fill"]["Y_crf"] == pytest.approx([4 / 6], abs=1e-4)
    assert rec["fill"]["Y_ret"] == pytest.approx([4 / 6], abs=1e-4)
    assert rec["agreement"] == pytest.approx([2 / 6], abs=1e-4)

    class Stub(LabelSet):
        def __init__(self):
            self.classes = ("background", "cat")

        def label(self, record, variant):
            return {"Y_crf": crf, "Y_ret": ret}.get(variant) if variant != "agreement" \
                else super().label(record, variant)

    stub = Stub()
    agree = stub.instance_masks(rec, "agreement")[0]
    expected = np.zeros((6, 6), bool)
    expected[:, 2:4] = True
    np.testing.assert_array_equal(agree, expected)
    label = stub.label(rec, "agreement")
    assert (label[:, 2:4] == 1).all() and (label[:, [0, 1, 4, 5]] == 255).all()


def test_box_fill_against_a_slow_reference():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, (20, 30)).astype(np.uint8)
    boxes = np.array([[0, 0, 30, 20], [5, 3, 9, 17], [10, 10, 10, 15], [29, 19, 30, 20]])
    classes = np.array([1, 2, 1, 2])
    for k, f in enumerate(box_fill(label, boxes, classes)):
        x1, y1, x2, y2 = boxes[k]
        pixels = [label[y, x] == classes[k] for y in range(y1, y2) for x in range(x1, x2)]
        assert f == (np.mean(pixels) if pixels else 0.0)


def test_index_refuses_a_folder_that_misses_predictions(indexed, tmp_path):
    labels, cfg, data = indexed
    with pytest.raises(BanaError, match=r"have no label map in .*predict them first"):
        index_folder(cfg, tmp_path, progress=False)
    with pytest.raises(BanaError, match="is not a label folder"):
        LabelSet(tmp_path)
    with pytest.raises(BanaError, match="variant 'Y_ret' is not in"):
        run_exports(labels, ["coco"], "Y_ret", tmp_path)
    with pytest.raises(BanaError, match="unknown export format"):
        run_exports(labels, ["tfrecord"], "prediction", tmp_path)


def test_labels_cli_exports_an_indexed_folder(indexed, tmp_path, run_script):
    labels, cfg, data = indexed
    proc = run_script("labels.py", "export", "--labels", str(labels.folder), "--format", "coco",
                      "voc", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    coco = json.loads((tmp_path / "coco" / f"instances_{labels.split}_prediction.json")
                      .read_text())
    assert len(coco["images"]) == len(labels.ids)
    assert (tmp_path / "voc/SegmentationClass").is_dir()
    proc = run_script("labels.py", "export", "--labels", str(tmp_path), "--format", "coco")
    assert proc.returncode == 2 and "has no labelset.json" in proc.stderr


def test_an_image_id_that_leaves_the_folder_is_refused(tmp_path):
    """Ids name the files stage 2 writes (labels, records): '../x' or '/x' would write outside
    DATA.PSEUDO_LABEL_DIR, so the split is refused before anything is written."""
    from data.base import check_ids

    assert check_ids(["a", "sub/b", "c d"], "train") == ["a", "sub/b", "c d"]
    for bad in ("../escape", "/etc/x", "sub/../../x"):
        with pytest.raises(BanaError, match=r"split 'train' names 1 image\(s\) by a path"):
            check_ids(["a", bad], "train")
