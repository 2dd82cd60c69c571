"""Stage 2 on the COCO layout (voc20): label maps, one instance mask per box in the records, the
COCO export and their COCO segm AP against the split's own masks, resume, and the class-map
checks."""

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from data.coco import VOC20_FROM_COCO, evaluated_category_ids
from engine.stage2 import load_labeler, run
from data.labelset import LabelSet, image_record
from engine.label_quality import INSTANCE_ROWS
from engine.stage2_jobs import LABELS, pending_ids
from exporters.coco import image_ids, results as coco_results
from utils.coco_eval import AP_KEYS, evaluate_instances
from engine.config import load_config
from utils.errors import BanaError
from utils.instances import box_pixel_masks
from utils.io import read_index_png

ROOT = Path(__file__).resolve().parents[1]
GIRAFFE = 25


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    from data.synthetic_coco import make_synthetic_coco

    root = tmp_path_factory.mktemp("synthetic_coco") / "COCO"
    make_synthetic_coco(root, n_train=6, n_val=2, size=64, seed=0)
    return root


def coco_cfg(root, out, label_dir, *opts):
    return load_config(ROOT / "configs/demo/stage2.yml", [
        "DATA.ROOT", str(root), "OUTPUT_DIR", str(out), "NAME", "stage2_coco",
        "DATA.DATASET", "coco", "DATA.CLASS_MAP", "voc20", "DATA.SPLIT", "train2017",
        "DATA.NUM_WORKERS", "0", "DATA.PSEUDO_LABEL_DIR", str(label_dir),
        "DATA.EXPORTS", "[coco]", *opts])


def instance_results(label_dir, variant="Y_crf"):
    labels = LabelSet(label_dir)
    return coco_results(labels, variant, labels.ids, image_ids(labels.ids))


@pytest.fixture(scope="module")
def coco_run(coco_root, stage1_dir, tmp_path_factory):
    """One run on the 6 train2017 images: (cfg, result, printed)."""
    cfg = coco_cfg(coco_root, stage1_dir, tmp_path_factory.mktemp("coco_labels") / "Generation")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = run(cfg, devices="cpu", workers=1, save_vis=2)
    return cfg, result, printed.getvalue()


def gt_boxes(coco_root):
    """image id -> [(x1, y1, x2, y2, category id)] of the non-crowd voc20 boxes."""
    gt = json.loads((coco_root / "annotations/instances_train2017.json").read_text())
    boxes = {im["id"]: [] for im in gt["images"]}
    for a in gt["annotations"]:
        if not a["iscrowd"] and a["category_id"] in VOC20_FROM_COCO:
            x, y, w, h = a["bbox"]
            boxes[a["image_id"]].append((x, y, x + w, y + h, a["category_id"]))
    return boxes


def test_coco_run_writes_label_maps_and_instances_inside_their_boxes(coco_root, coco_run):
    cfg, result, _ = coco_run
    out = cfg.pseudo_label_dir
    boxes = gt_boxes(coco_root)
    assert result["images"] == result["labelled_now"] == len(boxes) == 6
    assert pending_ids([str(i) for i in boxes], out) == []
    results = instance_results(out)
    assert results and {r["image_id"] for r in results} <= set(boxes)
    assert GIRAFFE not in {r["category_id"] for r in results}
    for image_id, image_boxes in boxes.items():
        label = read_index_png(out / "Y_crf" / f"{image_id}.png")
        allowed = {0} | {VOC20_FROM_COCO[b[4]] for b in image_boxes}
        assert set(np.unique(label)) <= allowed
        mine = [r for r in results if r["image_id"] == image_id]
        masks = mask_utils.decode([r["segmentation"] for r in mine]).transpose(2, 0, 1) > 0 \
            if mine else np.zeros((0, *label.shape), bool)
        assert masks.sum(0).max(initial=0) <= 1  # one instance per pixel
        for r, mask in zip(mine, masks):
            assert mask.any() and 0 <= r["score"] <= 1
            assert (label[mask] == VOC20_FROM_COCO[r["category_id"]]).all()
            in_a_box = box_pixel_masks([b for b in image_boxes if b[4] == r["category_id"]],
                                       *label.shape).any(0)
            assert in_a_box[mask].all()


def test_coco_results_load_in_pycocotools_and_the_ap_report_matches_them(coco_root, coco_run):
    cfg, result, printed = coco_run
    out = cfg.pseudo_label_dir
    gt = COCO(str(coco_root / "annotations/instances_train2017.json"))
    report = json.loads((cfg.run_dir / "quality.json").read_text())
    assert report["images"] == 6
    assert set(report["ap"]) == set(INSTANCE_ROWS)
    for name in LABELS:
        results = instance_results(out, name)
        loaded = gt.loadRes(copy.deepcopy(results))  # loadRes adds keys to the entries
        assert len(loaded.getAnnIds()) == len(results)
        if name == "Y_crf":  # DATA.EXPORT_VARIANT
            trainable = COCO(str(out / "exports/coco/instances_train2017_Y_crf.json"))
            assert len(trainable.getAnnIds()) == len(loaded.getAnnIds())
            assert set(trainable.getCatIds()) == set(evaluated_category_ids("voc20"))
        stats = evaluate_instances(gt, results, image_ids=gt.getImgIds(),
                                   category_ids=evaluated_category_ids("voc20"))
        assert report["ap"][name] == pytest.approx(stats)
        assert result["instance_quality"][name] == pytest.approx(stats["AP"])
    for stats in report["ap"].values():
        values = [stats[k] for k in AP_KEYS]
        assert values[0] is not None and all(v is None or 0 <= v <= 100 for v in values)
    assert "COCO segm AP" in printed and printed.count("AP50") == 3
    assert len(list((cfg.run_dir / "vis").glob("*.png"))) == 2


def test_coco_run_resumes_from_its_per_image_files(coco_root, stage1_dir, coco_run):
    cfg, *_ = coco_run
    out = cfg.pseudo_label_dir
    merged = {p.name: p.read_bytes() for p in out.rglob("*.json")}
    ids = sorted(p.stem for p in (out / "records").glob("*.json"))
    (out / "records" / f"{ids[1]}.json").unlink()
    (out / "Y_ret" / f"{ids[4]}.png").unlink()
    result = run(cfg, devices="cpu", workers=1)
    assert result["labelled_now"] == 2
    assert {p.name: p.read_bytes() for p in out.rglob("*.json")} == merged


def test_instances_of_one_image_from_a_hand_made_label_map():
    """Two overlapping cat boxes A = [0,6)², B = [3,10)² and a dog box C = [6,10) × [0,4) on a
    10×10 image. The label map says cat on rows/cols 0..7, dog elsewhere in C. In the overlap
    [3,6)², A's score (0.9) beats B's (0.5) except at (5, 5) where B scores 1. So A gets the cat
    pixels of A, minus (5, 5); B the cat pixels of B outside A's win; C the dog pixels of C."""
    cat, dog = 17, 18  # COCO ids; VOC ids 8 and 12
    boxes = np.array([[0, 0, 6, 6, 8], [3, 3, 10, 10, 8], [6, 0, 10, 4, 12]])
    label = np.zeros((10, 10), np.uint8)
    label[:8, :8] = 8
    label[0:4, 8:10] = 12
    inside = box_pixel_masks(boxes, 10, 10)
    scores = np.stack([0.9 * inside[0], 0.5 * inside[1], 0.7 * inside[2]]).astype(np.float32)
    scores[1, 5, 5] = 1.0
    record = image_record("42", "42.jpg", boxes[:, :4], boxes[:, 4],
                          {"Y_crf": label, "Y_ret": label, "Y_box": label},
                          {v: f"{v}/42.png" for v in ("Y_crf", "Y_ret", "Y_box")}, scores)
    expected_a = inside[0] & (label == 8)
    expected_a[5, 5] = False
    expected_b = inside[1] & (label == 8) & ~expected_a
    expected_c = inside[2] & (label == 12)

    def decode(entries):
        return np.stack([mask_utils.decode({"size": e["size"], "counts": e["counts"].encode()})
                         for e in entries]) > 0

    for name in LABELS:
        masks = decode(record["instances"][name])
        np.testing.assert_array_equal(masks[0], expected_a)
        np.testing.assert_array_equal(masks[1], expected_b)
        np.testing.assert_array_equal(masks[2], expected_c)
        n = expected_b.sum()  # B's pixels score 0.5, except (5, 5) which scores 1
        assert record["scores"][name] == pytest.approx([0.9, (0.5 * (n - 1) + 1) / n, 0.7],
                                                       abs=1e-4)
    np.testing.assert_array_equal(decode(record["instances"]["Y_box"]), inside)
    assert record["scores"]["Y_box"] == [1.0, 1.0, 1.0]
    # fill: A's 36 pixels are all cat; B's 49 hold 25 cat ones; C's 16 hold 8 dog ones.
    assert record["fill"]["Y_crf"] == pytest.approx([1.0, 25 / 49, 8 / 16], abs=1e-4)
    assert record["agreement"] == [1.0, 1.0, 1.0]


def test_coco80_labels_carry_the_80_class_numbering(coco_root, tmp_path):
    """An untrained 81-class stage-1 model (a checkpoint as stage 1 writes it, without the
    training): label maps hold COCO80 indices of the image's boxes, giraffe (not in VOC)
    included, and the instances keep the COCO category ids."""
    import torch

    from data.coco import COCO80_INDEX
    from engine.runs import model_spec
    from models.zoo import build, checkpoint_entry

    cfg = coco_cfg(coco_root, tmp_path, tmp_path / "Generation", "DATA.CLASS_MAP", "coco80",
                   "DATA.NUM_CLASSES", "81", "MODEL.WEIGHTS", str(tmp_path / "stage1.ckpt"))
    torch.manual_seed(0)
    net = build(model_spec(cfg, "labeler"))
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "bana": checkpoint_entry(1, net.spec, cfg.to_dict())}, tmp_path / "stage1.ckpt")
    run(cfg, devices="cpu", workers=1)
    gt = json.loads((coco_root / "annotations/instances_train2017.json").read_text())
    categories = {im["id"]: set() for im in gt["images"]}
    for a in gt["annotations"]:
        if not a["iscrowd"]:
            categories[a["image_id"]].add(a["category_id"])
    assert GIRAFFE in set().union(*categories.values())
    out = cfg.pseudo_label_dir
    for image_id, cats in categories.items():
        label = read_index_png(out / "Y_crf" / f"{image_id}.png")
        assert set(np.unique(label)) <= {0} | {COCO80_INDEX[c] for c in cats}
    baseline = instance_results(out, "Y_box")
    assert {r["category_id"] for r in baseline if r["image_id"] == 1} == categories[1]
    results = instance_results(out)
    assert all(r["category_id"] in categories[r["image_id"]] for r in results)
    assert LabelSet(out).category_ids == [0, *sorted(COCO80_INDEX)]


def test_class_map_and_classifier_size_must_agree(coco_root, stage1_dir, tmp_path):
    with pytest.raises(BanaError, match="DATA.NUM_CLASSES must be 81, not 21"):
        coco_cfg(coco_root, stage1_dir, tmp_path, "DATA.CLASS_MAP", "coco80")
    cfg = coco_cfg(coco_root, stage1_dir, tmp_path, "DATA.CLASS_MAP", "coco80",
                   "DATA.NUM_CLASSES", "81")
    with pytest.raises(BanaError, match="trained with 21 classes.*DATA.CLASS_MAP voc20"):
        load_labeler(cfg)


def test_shipped_coco_config_labels_train2017_with_voc20():
    cfg = load_config(ROOT / "configs/stage2_coco.yml")
    assert (cfg.DATA.DATASET, cfg.DATA.CLASS_MAP, cfg.DATA.NUM_CLASSES, cfg.DATA.SPLIT) == \
        ("coco", "voc20", 21, "train2017")
    assert (cfg.MODEL.GRID_SIZE, cfg.MODEL.BG_THRESHOLD, cfg.MODEL.DCRF) == \
        (1, 0.99, [4, 55, 3, 3, 3])


def test_stage1_trains_on_coco_with_the_coco80_classes(coco_root, tmp_path):
    """The COCO-trained variant of the paper (Y_crf AP 17.2): stage 1 reads the COCO layout
    through DATA.DATASET and learns an 81-way classifier."""
    import torch

    from engine.stage1 import run as run_stage1

    cfg = load_config(ROOT / "configs/demo/stage1.yml", [
        "DATA.ROOT", str(coco_root), "OUTPUT_DIR", str(tmp_path), "DATA.DATASET", "coco",
        "DATA.CLASS_MAP", "coco80", "DATA.NUM_CLASSES", "81", "DATA.SPLIT", "train2017",
        "DATA.CROP_SIZE", "48", "DATA.BATCH_SIZE", "2", "DATA.NUM_WORKERS", "0",
        "SOLVER.MAX_ITER", "3", "SOLVER.MILESTONES", "[2]"])
    result = run_stage1(cfg, devices="cpu")
    assert result["iterations"] == 3
    ckpt = torch.load(tmp_path / "stage1/checkpoints/final.ckpt", map_location="cpu",
                      weights_only=False)
    assert ckpt["bana"]["model"]["num_classes"] == 81
    assert ckpt["state_dict"]["net.classifier.weight"].shape[0] == 81


def test_the_device_path_writes_the_instances_of_the_worker_path(coco_root, stage1_dir, coco_run,
                                                                 tmp_path):
    """--pixel-work device on COCO: the same label maps, per-image instance files and merged
    results as the worker path (the box CAMs that split instances come from the device)."""
    cfg, first, _ = coco_run
    device_cfg = coco_cfg(coco_root, stage1_dir, tmp_path / "Generation")
    result = run(device_cfg, devices="cpu", workers=1, pixel_work="device")
    assert result["labelled_now"] == first["images"]

    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.name not in ("labels.json", "inputs.jsonl")
                and "review" not in p.relative_to(root).parts}  # the page names its folder

    def ledger(root):  # appended as images finish; the last line of an image counts
        lines = (root / "inputs.jsonl").read_text().splitlines()
        return {entry["key"]: entry["inputs"] for entry in map(json.loads, lines)}

    assert files(device_cfg.pseudo_label_dir) == files(cfg.pseudo_label_dir)
    assert ledger(device_cfg.pseudo_label_dir) == ledger(cfg.pseudo_label_dir)
    assert result["instance_quality"] == first["instance_quality"]
