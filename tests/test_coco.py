"""MS-COCO building blocks on a tiny synthetic COCO tree: classes, background masks, the box
dataset, instance masks from a label map, results JSON and COCOeval AP (hand-computed cases)."""

import json
import shutil

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from data.coco import (COCO80, COCO80_IDS, COCO80_INDEX, VOC20_FROM_COCO, class_names,
                       evaluated_category_ids, load_instances)
from data.coco_bbox_setup import main as setup_main
from data.coco_bbox_setup import write_bg_masks
from data.synthetic_coco import make_synthetic_coco, uncompressed_rle
from utils.coco_eval import evaluate_instances, format_ap
from utils.errors import BanaError
from utils.instances import (box_pixel_masks, instance_masks, instance_results, mask_scores,
                             results_as_dataset)
from utils.io import read_index_png
from utils.palette import VOC_CLASSES

from tests.conftest import open_layout


def COCOBoxDataset(root, split, class_map="voc20"):
    return open_layout("coco", root, CLASS_MAP=class_map, SPLIT=split).box_dataset(split)

SPLITS = ("train2017", "val2017")
# pycocotools 2.0.x decodes masks through an __array__ that NumPy 2 flags; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def coco_tree(tmp_path_factory):
    """8 train / 4 val images of 64 px; read-only (tests that damage it copy it first)."""
    root = tmp_path_factory.mktemp("synthetic_coco") / "coco"
    make_synthetic_coco(root, n_train=8, n_val=4, size=64, seed=0)
    return root


@pytest.fixture
def coco_copy(coco_tree, tmp_path):
    return shutil.copytree(coco_tree, tmp_path / "coco")


def _json(root, split):
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def _gt_mask(ann, height, width):
    segm = ann["segmentation"]
    if isinstance(segm["counts"], list):
        segm = mask_utils.frPyObjects(segm, height, width)
    return mask_utils.decode(segm).astype(bool)


def test_class_tables():
    assert len(COCO80) == len(set(COCO80)) == 80
    assert list(COCO80_IDS) == sorted(COCO80_IDS) and COCO80_IDS[-1] == 90
    assert sorted(COCO80_INDEX.values()) == list(range(1, 81))
    assert COCO80_INDEX[25] == 24 and COCO80[23] == "giraffe"
    assert sorted(VOC20_FROM_COCO.values()) == list(range(1, 21))
    names = {COCO80[COCO80_IDS.index(cat)]: VOC_CLASSES[voc] for cat, voc in VOC20_FROM_COCO.items()}
    renamed = {"airplane": "aeroplane", "dining table": "diningtable", "motorcycle": "motorbike",
               "potted plant": "pottedplant", "couch": "sofa", "tv": "tvmonitor"}
    for coco_name, voc_name in names.items():
        assert renamed.get(coco_name, coco_name) == voc_name
    assert len(names) == 20 and "giraffe" not in names and "truck" not in names
    assert class_names("voc20") == VOC_CLASSES and len(class_names("coco80")) == 81
    assert evaluated_category_ids("coco80") == list(COCO80_IDS)
    assert len(evaluated_category_ids("voc20")) == 20
    with pytest.raises(BanaError, match="DATA.CLASS_MAP must be one of voc20, coco80"):
        class_names("voc21")


def test_synthetic_tree_is_valid_coco(coco_tree):
    seen = set()
    for split in SPLITS:
        data = _json(coco_tree, split)
        gt = COCO(str(coco_tree / "annotations" / f"instances_{split}.json"))
        assert len(gt.getImgIds()) == (8 if split == "train2017" else 4)
        crowds = [a for a in data["annotations"] if a["iscrowd"]]
        assert len(crowds) == 1 and isinstance(crowds[0]["segmentation"]["counts"], list)
        for ann in data["annotations"]:
            mask = _gt_mask(ann, 64, 64)
            rows, cols = np.nonzero(mask)
            assert ann["area"] == mask.sum() > 0
            assert ann["bbox"] == [cols.min(), rows.min(), cols.max() + 1 - cols.min(),
                                   rows.max() + 1 - rows.min()]
            assert np.array_equal(gt.annToMask(ann).astype(bool), mask)
            seen.add(ann["category_id"])
        # Visible parts of different objects never overlap.
        for image in data["images"]:
            masks = [_gt_mask(a, 64, 64) for a in data["annotations"] if a["image_id"] == image["id"]]
            assert np.sum(masks, axis=0).max() == 1
    assert seen == {1, 3, 16, 17, 18, 25}  # person car bird cat dog giraffe
    ids = [a["id"] for s in SPLITS for a in _json(coco_tree, s)["annotations"]]
    assert len(ids) == len(set(ids))


def test_uncompressed_rle_matches_pycocotools():
    rng = np.random.default_rng(3)
    for shape in [(5, 7), (1, 1), (6, 4)]:
        for mask in (rng.random(shape) < 0.4, np.ones(shape, bool), np.zeros(shape, bool)):
            rle = mask_utils.frPyObjects(uncompressed_rle(mask), *shape)
            assert np.array_equal(mask_utils.decode(rle).astype(bool), mask)
    assert uncompressed_rle(np.array([[1], [1], [0]], bool))["counts"] == [0, 2, 1]


def _reference_bg_mask(anns, height, width):
    """1 everywhere except pixel (y, x) with int(y0) <= y < int(y0 + h), int(x0) <= x < int(x0 + w)
    for some annotation (crowd or not, any category)."""
    mask = np.ones((height, width), np.uint8)
    for ann in anns:
        x0, y0, w, h = ann["bbox"]
        for y in range(height):
            for x in range(width):
                if int(y0) <= y < int(y0 + h) and int(x0) <= x < int(x0 + w):
                    mask[y, x] = 0
    return mask


def test_bg_masks_match_boxes(coco_tree):
    for split in SPLITS:
        data = _json(coco_tree, split)
        for image in data["images"]:
            anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
            bg = read_index_png(coco_tree / "BgMaskfromBoxes" / split / f"{image['id']}.png")
            assert np.array_equal(bg, _reference_bg_mask(anns, 64, 64))
            for ann in anns:  # no object pixel is background
                assert not bg[_gt_mask(ann, 64, 64)].any()


def _bytes(folder):
    """The masks of a folder (the ledger of their boxes beside them is not a mask)."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_writer_in_parallel_skips_existing(coco_copy, capsys):
    folder = coco_copy / "BgMaskfromBoxes" / "train2017"
    original = _bytes(folder)
    for path in sorted(folder.glob("*.png"))[:3]:
        path.unlink()
    assert write_bg_masks(coco_copy, workers=2, progress=False) == {"written": 3, "skipped": 9,
                                                                   "total": 12}
    assert _bytes(folder) == original
    shutil.rmtree(coco_copy / "BgMaskfromBoxes")
    counts = setup_main(["--data-root", str(coco_copy), "--splits", "val2017", "--workers", "1"])
    assert counts["written"] == 4 and not (coco_copy / "BgMaskfromBoxes" / "train2017").exists()
    assert "wrote 4" in capsys.readouterr().out


@pytest.mark.slow
def test_setup_cli_missing_annotations_exits_2(tmp_path, run_script):
    (tmp_path / "annotations").mkdir()
    result = run_script("data/coco_bbox_setup.py", "--data-root", tmp_path, "--workers", "2")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "holds no instances_<split>.json file" in result.stderr.replace("\n", " ")
    named = run_script("data/coco_bbox_setup.py", "--data-root", tmp_path, "--splits", "val2017")
    message = " ".join(named.stderr.split())
    assert named.returncode == 2 and "no annotation file for split 'val2017'" in message
    assert "annotations/instances_val2017.json" in message  # the places looked at are named
    assert "val2017/_annotations.coco.json" in message


@pytest.mark.parametrize("class_map", ["voc20", "coco80"])
def test_dataset_items_follow_the_annotation_file(coco_tree, class_map):
    mapping = VOC20_FROM_COCO if class_map == "voc20" else COCO80_INDEX
    for split in SPLITS:
        data = _json(coco_tree, split)
        dataset = COCOBoxDataset(coco_tree, split, class_map=class_map)
        assert dataset.ids == [str(im["id"]) for im in data["images"]]
        assert len(dataset.classes) == (21 if class_map == "voc20" else 81)
        for item in dataset:
            assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.uint8
            assert item["bg_mask"].shape == (1, 64, 64) and item["bg_mask"].dtype == torch.uint8
            anns = [a for a in data["annotations"] if a["image_id"] == int(item["id"])
                    and not a["iscrowd"] and a["category_id"] in mapping]
            expected = np.array([[x, y, x + w, y + h, mapping[a["category_id"]]]
                                 for a in anns for x, y, w, h in [a["bbox"]]], np.float32)
            assert item["boxes"].dtype == torch.float32
            assert np.array_equal(item["boxes"].numpy(), expected.reshape(-1, 5))
            assert item["ann_ids"].tolist() == [a["id"] for a in anns]
            assert item["ann_ids"].dtype == item["category_ids"].dtype == torch.int64
            assert item["category_ids"].tolist() == [a["category_id"] for a in anns]
            all_anns = [a for a in data["annotations"] if a["image_id"] == int(item["id"])]
            assert np.array_equal(item["bg_mask"][0].numpy(), _reference_bg_mask(all_anns, 64, 64))


def test_voc20_drops_giraffes_from_targets_but_not_from_the_bg_mask(coco_tree):
    voc = COCOBoxDataset(coco_tree, "train2017", "voc20")
    coco = COCOBoxDataset(coco_tree, "train2017", "coco80")
    giraffes = 0
    for a, b in zip(voc, coco):
        giraffe_rows = (b["category_ids"] == 25).nonzero().flatten()
        giraffes += len(giraffe_rows)
        assert 25 not in a["category_ids"].tolist()
        assert len(a["boxes"]) == len(b["boxes"]) - len(giraffe_rows)
        assert (b["boxes"][giraffe_rows, 4] == 24).all()
        for x1, y1, x2, y2, _ in b["boxes"][giraffe_rows].long().tolist():
            assert not a["bg_mask"][0, y1:y2, x1:x2].any()
        # VOC numbering: cat is VOC class 8, COCO80 class 16.
        cats = (b["category_ids"] == 17).nonzero().flatten()
        assert (b["boxes"][cats, 4] == 16).all()
        assert (a["boxes"][(a["category_ids"] == 17), 4] == VOC_CLASSES.index("cat")).all()
    assert giraffes >= 1


def test_crowd_box_is_no_target_but_is_not_background(coco_tree):
    data = _json(coco_tree, "val2017")
    crowd = next(a for a in data["annotations"] if a["iscrowd"])
    dataset = COCOBoxDataset(coco_tree, "val2017", "coco80")
    item = dataset[dataset.ids.index(str(crowd["image_id"]))]
    assert crowd["id"] not in item["ann_ids"].tolist()
    x, y, w, h = map(int, crowd["bbox"])
    assert not item["bg_mask"][0, y:y + h, x:x + w].any()


def _write_hand_tree(root):
    """Two 10 x 12 images. Image 7: a giraffe, a crowd person, a dog with a float box ending on
    the image's right edge, and a 0.5 px wide cat. Image 9: no annotation at all."""
    (root / "train2017").mkdir(parents=True)
    from utils.io import atomic_write_jpeg, atomic_write_json
    for image_id in (7, 9):
        atomic_write_jpeg(root / "train2017" / f"{image_id}.jpg", np.zeros((10, 12, 3), np.uint8))
    anns = [
        {"id": 1, "image_id": 7, "category_id": 25, "bbox": [0, 0, 3, 2], "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [5, 5, 2, 2], "iscrowd": 1},
        {"id": 3, "image_id": 7, "category_id": 18, "bbox": [8.5, 1.2, 3.5, 3.5], "iscrowd": 0},
        {"id": 4, "image_id": 7, "category_id": 17, "bbox": [2, 6, 0.5, 3], "iscrowd": 0},
    ]
    atomic_write_json(root / "annotations" / "instances_train2017.json", {
        "images": [{"id": 9, "file_name": "9.jpg", "height": 10, "width": 12},
                   {"id": 7, "file_name": "7.jpg", "height": 10, "width": 12}],
        "annotations": anns, "categories": [{"id": 25, "name": "giraffe"}, {"id": 1, "name": "person"},
                                            {"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}]})


def test_hand_built_tree(tmp_path):
    root = tmp_path / "hand"
    _write_hand_tree(root)
    assert write_bg_masks(root, ["train2017"], progress=False)["written"] == 2
    dataset = COCOBoxDataset(root, "train2017", "voc20")
    assert dataset.ids == ["7", "9"]
    item = dataset[0]
    # The dog [8.5, 1.2, 3.5, 3.5] -> x2 = 12, y2 = 4.7; the 0.5 px cat is thin
    # but has area, and is kept as the authors keep thin boxes. The giraffe is not in voc20.
    assert item["boxes"].tolist() == [[8.5, pytest.approx(1.2), 12.0, pytest.approx(4.7),
                                       VOC_CLASSES.index("dog")],
                                      [2.0, 6.0, 2.5, 9.0, VOC_CLASSES.index("cat")]]
    assert item["ann_ids"].tolist() == [3, 4] and item["category_ids"].tolist() == [18, 17]
    expected = np.ones((10, 12), np.uint8)
    expected[0:2, 0:3] = 0  # giraffe
    expected[5:7, 5:7] = 0  # crowd
    expected[1:4, 8:12] = 0  # dog: rows int(1.2)=1 .. int(4.7)=4, cols 8 .. 12
    # The cat [2, 6, 0.5, 3] covers columns int(2)..int(2.5) = none.
    assert np.array_equal(item["bg_mask"][0].numpy(), expected)
    empty = dataset[1]
    assert empty["boxes"].shape == (0, 5) and empty["ann_ids"].shape == (0,)
    assert empty["bg_mask"].all()


def test_dataset_errors(coco_copy, tmp_path):
    with pytest.raises(BanaError, match=r"no annotation file for split 'val2017'.*cocodataset"):
        COCOBoxDataset(tmp_path, "val2017")
    (coco_copy / "BgMaskfromBoxes" / "val2017" / "10.png").unlink()
    with pytest.raises(BanaError, match=r"background mask .*10.png not found.*stages 1 and 2 "
                                        r"write the missing ones"):
        dataset = COCOBoxDataset(coco_copy, "val2017")
        dataset[dataset.ids.index("10")]
    (coco_copy / "train2017" / "000000000003.jpg").unlink()
    with pytest.raises(BanaError, match=r"1 of 8 images of split 'train2017' are missing, e.g. "
                                        r".*000000000003.jpg"):
        COCOBoxDataset(coco_copy, "train2017")
    path = coco_copy / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["categories"][0]["name"] = "human"
    path.write_text(json.dumps(data))
    with pytest.raises(BanaError, match="category id 1 as 'human'"):
        load_instances(coco_copy, "val2017")
    data["categories"][0]["name"] = "person"
    data["annotations"][0]["image_id"] = 12345
    path.write_text(json.dumps(data))
    with pytest.raises(BanaError, match="refers to image 12345"):
        load_instances(coco_copy, "val2017")
    path.write_text("{")
    with pytest.raises(BanaError, match="invalid JSON"):
        load_instances(coco_copy, "val2017")


def _reference_instance_masks(label_map, boxes, scores):
    """Pixel by pixel: candidates are boxes containing p whose class is label_map[p]; the best has
    the highest score, then the smallest area, then the lowest index."""
    height, width = label_map.shape
    out = np.zeros((len(boxes), height, width), bool)
    areas = [(max(0, min(x2, width) - max(x1, 0))) * (max(0, min(y2, height) - max(y1, 0)))
             for x1, y1, x2, y2, _ in boxes]
    for y in range(height):
        for x in range(width):
            cands = [k for k, (x1, y1, x2, y2, c) in enumerate(boxes)
                     if x1 <= x < x2 and y1 <= y < y2 and label_map[y, x] == c]
            if cands:
                best = min(cands, key=lambda k: (-scores[k, y, x], areas[k], k))
                out[best, y, x] = True
    return out


def test_instance_masks_hand_built_overlap():
    """Two class-3 boxes overlap on columns 3..4; a class-5 box covers all of it.

    label:  columns 0..7 of rows 1..4 are 3 3 3 3 3 3 3 0 except (row 4, col 2) = 5.
    Box A = cols 0..4 (score 0.9 on col 3, 0.2 on col 4), box B = cols 3..6 (score 0.5 on cols 3..4).
    Col 3: A wins (0.9 > 0.5); col 4: B wins (0.5 > 0.2). Box C (class 5) gets only (4, 2).
    Rows 1..4 of box D (class 3, cols 5..6, score 0.5 = B's) tie with B there and win: D is smaller.
    """
    label = np.zeros((6, 8), np.uint8)
    label[1:5, 0:7] = 3
    label[4, 2] = 5
    boxes = np.array([[0, 1, 5, 5, 3], [3, 1, 7, 5, 3], [0, 0, 8, 6, 5], [5, 1, 7, 5, 3]])
    scores = np.zeros((4, 6, 8))
    scores[0, 1:5, 0:5] = 0.9
    scores[0, 1:5, 4] = 0.2
    scores[1, 1:5, 3:7] = 0.5
    scores[2] = 1.0
    scores[3, 1:5, 5:7] = 0.5
    masks = instance_masks(label, boxes, scores)
    expected = np.zeros((4, 6, 8), bool)
    expected[0, 1:5, 0:4] = True
    expected[0, 4, 2] = False
    expected[1, 1:5, 4] = True
    expected[2, 4, 2] = True
    expected[3, 1:5, 5:7] = True
    assert np.array_equal(masks, expected)
    assert np.array_equal(masks, _reference_instance_masks(label, boxes, scores))


def test_instance_masks_match_reference_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(30):
        height, width, k = rng.integers(3, 12), rng.integers(3, 12), rng.integers(0, 6)
        label = rng.integers(0, 3, (height, width)).astype(np.uint8)
        x = np.sort(rng.integers(-2, width + 3, (k, 2)), 1)
        y = np.sort(rng.integers(-2, height + 3, (k, 2)), 1)
        boxes = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1], rng.integers(1, 3, k)], 1)
        # Coarse scores so that ties happen.
        scores = rng.integers(0, 3, (k, height, width)) / 2 * box_pixel_masks(boxes, height, width)
        masks = instance_masks(label, boxes, scores)
        assert np.array_equal(masks, _reference_instance_masks(label, boxes, scores))
        assert masks.sum(0).max(initial=0) <= 1


def test_mask_scores_and_results_load_with_pycocotools(tmp_path):
    masks = np.zeros((3, 5, 6), bool)
    masks[0, 1:3, 1:4] = True
    masks[2, 4, :] = True
    scores = np.zeros((3, 5, 6))
    scores[0, 1, 1:4], scores[0, 2, 1:4] = 1.0, 0.5
    scores[2] = 0.25
    conf = mask_scores(masks, scores)
    assert conf.tolist() == [0.75, 0.0, 0.25]
    results = instance_results(masks, 42, [17, 18, 25], conf)
    assert [r["category_id"] for r in results] == [17, 25]  # the empty mask is left out
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    gt = COCO()
    gt.dataset = {"images": [{"id": 42, "height": 5, "width": 6, "file_name": "42.jpg"}],
                  "annotations": [],
                  "categories": [{"id": 17, "name": "cat"}, {"id": 25, "name": "giraffe"}]}
    gt.createIndex()
    dt = gt.loadRes(str(path))
    anns = dt.loadAnns(dt.getAnnIds())
    assert [a["area"] for a in anns] == [6, 6]
    assert np.array_equal(dt.annToMask(anns[0]).astype(bool), masks[0])
    assert np.array_equal(dt.annToMask(anns[1]).astype(bool), masks[2])
    dataset = results_as_dataset(results, gt.dataset["images"], gt.dataset["categories"])
    (tmp_path / "train.json").write_text(json.dumps(dataset))
    reloaded = COCO(str(tmp_path / "train.json"))
    ann = reloaded.loadAnns(reloaded.getAnnIds(catIds=[17]))[0]
    assert ann["bbox"] == [1.0, 1.0, 3.0, 2.0] and ann["area"] == 6 and ann["iscrowd"] == 0
    assert np.array_equal(reloaded.annToMask(ann).astype(bool), masks[0])


def _gt_results(root, split, fill_boxes=False):
    data = _json(root, split)
    results = []
    for ann in data["annotations"]:
        if ann["iscrowd"]:
            continue
        if fill_boxes:
            x, y, w, h = ann["bbox"]
            mask = box_pixel_masks([[x, y, x + w, y + h]], 64, 64)[0]
        else:
            mask = _gt_mask(ann, 64, 64)
        results += instance_results(mask[None], ann["image_id"], [ann["category_id"]], [1.0])
    return results


@pytest.mark.parametrize("class_map", ["voc20", "coco80"])
def test_gt_masks_score_100_and_box_filled_masks_lower(coco_tree, class_map):
    path = coco_tree / "annotations" / "instances_train2017.json"
    cats = evaluated_category_ids(class_map)
    perfect = evaluate_instances(path, _gt_results(coco_tree, "train2017"), category_ids=cats)
    assert perfect["AP"] == perfect["AP50"] == perfect["AP75"] == pytest.approx(100.0)
    assert perfect["images"] == 8
    boxes = evaluate_instances(path, _gt_results(coco_tree, "train2017", fill_boxes=True),
                               category_ids=cats)
    assert boxes["AP"] < 60.0 and boxes["AP50"] == pytest.approx(100.0)
    assert perfect["instances"] == boxes["instances"]


def _one_image_gt(tmp_path):
    gt = {"images": [{"id": 1, "height": 20, "width": 20, "file_name": "1.jpg"}],
          "categories": [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 17, "iscrowd": 0,
                           "bbox": [0, 0, 10, 10], "area": 100,
                           "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path


def _square(rows, cols):
    mask = np.zeros((1, 20, 20), bool)
    mask[0, rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask


def test_ap_hand_computed(tmp_path):
    """One GT: the 10 x 10 square at the origin (area 100, 'small').

    - A prediction covering its first 72 pixels... rows 0..7 and cols 0..8 (72 px) has IoU 0.72:
      a match at thresholds 0.50..0.70 (5 of 10), precision 1 there: AP 50, AP50 100, AP75 0.
    - A perfect mask scored 0.8 below a wrong one scored 0.9: at recall 1 precision is 1/2, and
      COCO's interpolated precision is 1/2 at every recall: AP = AP50 = 50. Swapping the scores
      gives 100: the score ranks the instances.
    - A dog prediction does not count against the cat when evaluation keeps only category 17.
    """
    path = _one_image_gt(tmp_path)
    partial = instance_results(_square((0, 8), (0, 9)), 1, [17], [1.0])
    stats = evaluate_instances(path, partial)
    assert stats["AP"] == pytest.approx(50.0) and stats["AP50"] == pytest.approx(100.0)
    assert stats["AP75"] == pytest.approx(0.0) and stats["APs"] == pytest.approx(50.0)
    assert stats["APm"] is None and stats["APl"] is None
    assert format_ap(stats) == "AP 50.0 | AP50 100.0 | AP75 0.0 | APs 50.0 | APm n/a | APl n/a"

    good = instance_results(_square((0, 10), (0, 10)), 1, [17], [0.8])
    wrong = instance_results(_square((12, 20), (12, 20)), 1, [17], [0.9])
    assert evaluate_instances(path, good + wrong)["AP"] == pytest.approx(50.0)
    swapped = instance_results(_square((12, 20), (12, 20)), 1, [17], [0.7])
    assert evaluate_instances(path, good + swapped)["AP"] == pytest.approx(100.0)

    dog = instance_results(_square((12, 20), (12, 20)), 1, [18], [0.99])
    assert evaluate_instances(path, good + dog)["AP"] == pytest.approx(100.0)
    assert evaluate_instances(path, good + dog, category_ids=[17])["AP"] == pytest.approx(100.0)
    assert evaluate_instances(path, good + dog, category_ids=[17])["instances"] == 1


def test_empty_results_score_zero_and_inputs_stay_untouched(tmp_path, coco_tree):
    path = _one_image_gt(tmp_path)
    stats = evaluate_instances(path, [])
    assert stats["AP"] == stats["AP50"] == stats["APs"] == 0.0 and stats["APm"] is None
    assert stats["images"] == 1 and stats["instances"] == 0
    results = instance_results(_square((0, 10), (0, 10)), 1, [17], [1.0])
    before = json.dumps(results)
    evaluate_instances(path, results)
    assert json.dumps(results) == before  # loadRes adds keys to copies, not to our entries
    # An image that yielded nothing still counts its GT as missed when named in image_ids.
    train = coco_tree / "annotations" / "instances_train2017.json"
    one = [r for r in _gt_results(coco_tree, "train2017") if r["image_id"] == 2]
    assert evaluate_instances(train, one)["AP"] == pytest.approx(100.0)
    assert evaluate_instances(train, one, image_ids=[2, 3])["AP"] < 100.0
    with pytest.raises(BanaError, match=r"image ids \[999\]"):
        evaluate_instances(path, instance_results(_square((0, 2), (0, 2)), 999, [17], [1.0]))


# --- issue 29, class 2: every number of a COCO file is checked where the file is read -----------

def _write(root, split, data, *replace):
    text = json.dumps(data)
    for old, new in zip(replace[::2], replace[1::2]):
        text = text.replace(old, new, 1)
    (root / "annotations" / f"instances_{split}.json").write_text(text)


def test_a_nan_bbox_is_named_not_read_as_background(coco_copy):
    """Before: the NaN box was dropped after clipping (warn_dropped is off for COCO) and the
    whole image became background."""
    data = _json(coco_copy, "val2017")
    ann = data["annotations"][0]
    ann["bbox"][0] = float("nan")
    _write(coco_copy, "val2017", data)
    with pytest.raises(BanaError, match=rf"instances_val2017.json: annotation {ann['id']} \(image "
                                        rf"{ann['image_id']}\) has bbox \[x, y, w, h\] \[nan, .*"
                                        r"not a finite number"):
        load_instances(coco_copy, "val2017")


def test_a_polygon_far_outside_any_image_is_refused_before_pycocotools(coco_copy):
    """Before: the file loaded, and rasterising the polygon in pycocotools (stage 2's report,
    evaluate.py) died with a segmentation fault, exit 139."""
    data = _json(coco_copy, "val2017")
    ann = data["annotations"][0]
    ann["segmentation"] = [[1, 1, 1e10, 1, 5, 5]]
    _write(coco_copy, "val2017", data)
    with pytest.raises(BanaError, match=rf"annotation {ann['id']} \(image {ann['image_id']}\), "
                                        r"value 3 of a polygon, has a polygon coordinate "
                                        r"10000000000.0, outside \[-262,144, 262,144\]"):
        load_instances(coco_copy, "val2017")


@pytest.mark.parametrize("old, new, message", [
    ('"height": 64', '"height": 1e400', r"image \d+ \(.*\) has height, width \[inf, 64\], "
                                        r"which is not a finite number"),
    ('"height": 64', '"height": ' + "9" * 30, r"has height, width \[9{30}, 64\], outside \[1, 131,072\]"),
    ('"category_id": 1', '"category_id": 1.7', r"has category_id 1.7, where an integer was "
                                                r"expected"),
    ('"id": 1', '"id": ' + "1" * 30, r"has id 1{30}\d*, outside \[-9,007,199,254,740,992, "),
])
def test_sizes_and_ids_must_be_integers_in_range(coco_copy, old, new, message):
    """Before: 1e400 and a 30-digit integer ended in an OverflowError traceback; category 1.7
    was read as 1 (a person) without a word."""
    data = _json(coco_copy, "val2017")
    _write(coco_copy, "val2017", data, old, new)
    assert new in (coco_copy / "annotations" / "instances_val2017.json").read_text()
    with pytest.raises(BanaError, match=message):
        load_instances(coco_copy, "val2017")


def test_json_nested_too_deep_is_named(coco_copy):
    """Before: RecursionError from the json module, a traceback."""
    path = coco_copy / "annotations" / "instances_val2017.json"
    path.write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(BanaError, match=rf"{path} nests its arrays or objects too deep"):
        load_instances(coco_copy, "val2017")
