"""The synthetic VOC generator: layout, object statistics, determinism, baseline, CLI, speed."""


import numpy as np
import pytest
from PIL import Image

from data.synthetic import DEFAULT_CLASSES, main, make_synthetic_voc
from data.voc import parse_annotation
from tests.conftest import open_layout


def read_split(root, split):
    return open_layout("voc", root).split_ids(split)
from utils.boxes import bg_mask_from_boxes, fill_boxes
from utils.errors import BanaError
from utils.io import read_image, read_index_png
from utils.palette import VOC_CLASSES, voc_palette

CLASS_IDS = {VOC_CLASSES.index(c) for c in DEFAULT_CLASSES}


def _tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def larger_voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("larger") / "VOC"
    make_synthetic_voc(root, n_train=40, n_val=30, size=64, seed=5)
    return root


def _objects(root, split):
    """(image id, rgb, label, boxes float (K, 4), classes (K,)) for every image of the split."""
    for image_id in read_split(root, split):
        boxes, classes = parse_annotation(root / "Annotations" / f"{image_id}.xml")
        yield (image_id, read_image(root / "JPEGImages" / f"{image_id}.jpg"),
               read_index_png(root / "SegmentationClassAug" / f"{image_id}.png"), boxes, classes)


def test_layout(synthetic_voc):
    root = synthetic_voc
    train, val = read_split(root, "train"), read_split(root, "val")
    assert len(train) == 12 and len(val) == 6 and read_split(root, "train_aug") == train
    assert not set(train) & set(val)
    for image_id in train + val:
        assert read_image(root / "JPEGImages" / f"{image_id}.jpg").shape == (64, 64, 3)
        aug = root / "SegmentationClassAug" / f"{image_id}.png"
        assert aug.read_bytes() == (root / "SegmentationClass" / f"{image_id}.png").read_bytes()
        with Image.open(aug) as image:
            assert image.mode == "P"
            assert np.array_equal(np.asarray(image.getpalette(), np.uint8).reshape(-1, 3), voc_palette())
        boxes, _ = parse_annotation(root / "Annotations" / f"{image_id}.xml")
        assert np.array_equal(read_index_png(root / "BgMaskfromBoxes" / f"{image_id}.png"),
                              bg_mask_from_boxes(boxes, 64, 64))
    assert (root / "synthetic.json").is_file()


def test_objects_boxes_and_void_band(larger_voc):
    counts, fills, overlaps, classes_seen, band = [], [], 0, set(), 0
    for _, _, label, boxes, classes in _objects(larger_voc, "train"):
        counts.append(len(boxes))
        classes_seen |= set(classes.tolist())
        assert set(np.unique(label)) <= CLASS_IDS | {0, 255}
        band += (label == 255).sum()
        for c in set(classes.tolist()):
            inside = np.zeros(label.shape, bool)
            for x1, y1, x2, y2 in boxes[classes == c].astype(int):
                inside[y1:y2, x1:x2] = True
            assert not ((label == c) & ~inside).any()  # every object pixel lies in a box of its class
        for (x1, y1, x2, y2), c in zip(boxes.astype(int), classes):
            region = label[y1:y2, x1:x2]
            # tight: every edge row / column of the box touches the object or its void border
            for edge in (region[0], region[-1], region[:, 0], region[:, -1]):
                assert (edge != 0).any()
            fills.append((region == c).mean())
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                overlaps += min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])
    assert set(counts) == {1, 2, 3}
    assert classes_seen == CLASS_IDS
    assert overlaps >= 3
    assert band > 0
    # Non-rectangular objects: boxes over-cover them clearly, as on VOC.
    assert 0.35 < np.mean(fills) < 0.85 and max(fills) < 0.97


def _region_features(root, split):
    """Per (image, class) region: mean RGB, std RGB, mean |dx|, mean |dy| inside the GT region."""
    features, targets = [], []
    for _, rgb, label, _, _ in _objects(root, split):
        rgb = rgb.astype(np.float64)
        dx, dy = np.abs(np.diff(rgb, axis=1)).mean(2), np.abs(np.diff(rgb, axis=0)).mean(2)
        for c in set(np.unique(label).tolist()) - {0, 255}:
            m = label == c
            mx, my = m[:, 1:] & m[:, :-1], m[1:] & m[:-1]
            if mx.sum() < 10 or my.sum() < 10:
                continue
            features.append(np.concatenate([rgb[m].mean(0), rgb[m].std(0), [dx[mx].mean(), dy[my].mean()]]))
            targets.append(c)
    return np.array(features), np.array(targets)


def test_classes_are_learnable_from_colour_and_texture_but_not_colour_alone(larger_voc):
    train_x, train_y = _region_features(larger_voc, "train")
    val_x, val_y = _region_features(larger_voc, "val")
    mean, std = train_x.mean(0), train_x.std(0)

    def nearest_centroid_accuracy(columns):
        a = (train_x[:, columns] - mean[columns]) / std[columns]
        b = (val_x[:, columns] - mean[columns]) / std[columns]
        classes = np.unique(train_y)
        centroids = np.stack([a[train_y == k].mean(0) for k in classes])
        predicted = classes[((b[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
        return (predicted == val_y).mean()

    colour_only = nearest_centroid_accuracy([0, 1, 2])
    colour_and_texture = nearest_centroid_accuracy(list(range(8)))
    assert colour_and_texture >= 0.75  # chance is 0.2
    assert colour_and_texture > colour_only + 0.05


def test_box_baseline_matches_a_reference_computation(larger_voc):
    import json

    tp, fp, fn = np.zeros(21), np.zeros(21), np.zeros(21)
    for _, _, label, boxes, classes in _objects(larger_voc, "train"):
        pred = fill_boxes(np.concatenate([boxes, classes[:, None]], 1), *label.shape)
        valid = label != 255
        for c in range(21):
            tp[c] += ((pred == c) & (label == c) & valid).sum()
            fp[c] += ((pred == c) & (label != c) & valid).sum()
            fn[c] += ((pred != c) & (label == c) & valid).sum()
    present = (tp + fp + fn) > 0
    expected = 100 * np.mean(tp[present] / (tp + fp + fn)[present])
    recorded = json.loads((larger_voc / "synthetic.json").read_text())["box_baseline_miou_train"]
    assert recorded == pytest.approx(expected, abs=0.006)
    assert 40 < recorded < 90  # imperfect, with room for pseudo labels to improve


def test_same_seed_is_byte_identical_other_seed_differs(tmp_path):
    kwargs = {"n_train": 4, "n_val": 2, "size": 48}
    make_synthetic_voc(tmp_path / "a", seed=7, **kwargs)
    make_synthetic_voc(tmp_path / "b", seed=7, **kwargs)
    make_synthetic_voc(tmp_path / "c", seed=8, **kwargs)
    a, b, c = (_tree_bytes(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a["JPEGImages/train_00000.jpg"] != c["JPEGImages/train_00000.jpg"]


def test_rerun_in_place_replaces_everything(tmp_path):
    root = tmp_path / "voc"
    make_synthetic_voc(root, n_train=5, n_val=2, size=48, seed=1)
    make_synthetic_voc(root, n_train=3, n_val=2, size=48, seed=2)
    make_synthetic_voc(tmp_path / "fresh", n_train=3, n_val=2, size=48, seed=2)
    assert _tree_bytes(root) == _tree_bytes(tmp_path / "fresh")  # no stale masks or images


def test_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(BanaError, match="not a synthetic dataset"):
        make_synthetic_voc(tmp_path, n_train=2, n_val=1, size=48)


def test_cli_prints_the_baseline(tmp_path, capsys):
    info = main(["--out", str(tmp_path / "v"), "--n-train", "3", "--n-val", "1", "--size", "40",
                 "--classes", "sheep", "cow"])
    out = capsys.readouterr().out
    assert f"mIoU {info['box_baseline_miou_train']:.1f} %" in out
    label = read_index_png(tmp_path / "v" / "SegmentationClassAug" / "train_00000.png")
    assert set(np.unique(label)) <= {0, 10, 17, 255}  # cow, sheep, background, void


@pytest.mark.parametrize("args, message", [
    (["--classes", "unicorn"], "--classes unicorn: expected VOC class names"),
    (["--size", "8"], "--size >= 32"),
])
def test_cli_bad_input_exits_2_without_traceback(tmp_path, run_script, args, message):
    result = run_script("data/synthetic.py", "--out", tmp_path / "v", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr.replace("\n", " ")
