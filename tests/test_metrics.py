import math

import numpy as np
import pytest
import torch

from utils.metrics import ConfusionMatrix, format_table

IGNORE = 255


def random_maps(seed, c=5, shape=(3, 17, 13)):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, c, size=shape).astype(np.uint8)
    gt[rng.random(shape) < 0.2] = IGNORE
    pred = np.where(rng.random(shape) < 0.6, gt, rng.integers(0, c, size=shape)).astype(np.uint8)
    pred[gt == IGNORE] = rng.integers(0, 256, size=int((gt == IGNORE).sum()))
    return pred, gt


def brute_force(pred, gt, c):
    """Per-class TP / FP / FN by walking over every pixel; IoU and accuracy in % (NaN when
    undefined), means over the defined classes."""
    tp, fp, fn = [0] * c, [0] * c, [0] * c
    counted = 0
    for p, g in zip(pred.reshape(-1).tolist(), gt.reshape(-1).tolist()):
        if g == IGNORE:
            continue
        counted += 1
        if p == g:
            tp[g] += 1
        else:
            fp[p] += 1
            fn[g] += 1
    iou = [100 * tp[k] / (tp[k] + fp[k] + fn[k]) if tp[k] + fp[k] + fn[k] else math.nan
           for k in range(c)]
    acc = [100 * tp[k] / (tp[k] + fn[k]) if tp[k] + fn[k] else math.nan for k in range(c)]

    def mean(values):
        kept = [v for v in values if not math.isnan(v)]
        return sum(kept) / len(kept) if kept else math.nan

    return {"miou": mean(iou), "pixel_acc": 100 * sum(tp) / counted, "mean_acc": mean(acc),
            "iou": iou, "acc": acc}


def assert_metrics_equal(got, expected):
    assert got.keys() == expected.keys()
    for key in ("miou", "pixel_acc", "mean_acc"):
        assert got[key] == pytest.approx(expected[key], rel=1e-12, nan_ok=True), key
    for key in ("iou", "acc"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-12, err_msg=key)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_per_pixel_counts(seed):
    pred, gt = random_maps(seed)
    cm = ConfusionMatrix(5)
    cm.update(pred, gt)
    assert cm.matrix.dtype == torch.int64
    assert int(cm.matrix.sum()) == int((gt != IGNORE).sum())
    assert_metrics_equal(cm.compute(), brute_force(pred, gt, 5))


def test_absent_classes_excluded_and_false_positive_class_counts():
    """Classes 0..4. GT uses 0 and 1 only; the prediction also says 2 once; 3 and 4 appear
    nowhere. gt = [0, 0, 1, 1], pred = [0, 2, 1, 1]:
    IoU_0 = 1/(1+0+1) = 50, IoU_1 = 2/2 = 100, IoU_2 = 0/(0+1+0) = 0, IoU_3 = IoU_4 = NaN, so
    mIoU = (50 + 100 + 0)/3 = 50. acc_0 = 1/2, acc_1 = 1, acc_2 = NaN (no GT), mean acc = 75."""
    cm = ConfusionMatrix(5)
    cm.update(np.array([0, 2, 1, 1]), np.array([0, 0, 1, 1]))
    m = cm.compute()
    np.testing.assert_allclose(m["iou"], [50, 100, 0, math.nan, math.nan])
    np.testing.assert_allclose(m["acc"], [50, 100, math.nan, math.nan, math.nan])
    assert m["miou"] == pytest.approx(50)
    assert m["mean_acc"] == pytest.approx(75)
    assert m["pixel_acc"] == pytest.approx(75)


def test_two_classes_by_hand():
    """gt   = [[0, 0, 0], [1, 1, 255]], pred = [[0, 1, 0], [1, 0, 1]] (the 255 pixel is skipped).
    Matrix rows GT, cols pred: [[2, 1], [1, 1]].
    IoU_0 = 2/(2+1+1) = 50, IoU_1 = 1/(1+1+1) = 33.33..., mIoU = 41.66...
    pixel acc = 3/5 = 60, acc_0 = 2/3, acc_1 = 1/2, mean acc = 58.33...
    """
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[0, 1, 0], [1, 0, 1]]), torch.tensor([[0, 0, 0], [1, 1, 255]]))
    assert cm.matrix.tolist() == [[2, 1], [1, 1]]
    m = cm.compute()
    assert m["iou"] == pytest.approx([50, 100 / 3])
    assert m["miou"] == pytest.approx(125 / 3)
    assert m["pixel_acc"] == pytest.approx(60)
    assert m["acc"] == pytest.approx([200 / 3, 50])
    assert m["mean_acc"] == pytest.approx(175 / 3)


def test_perfect_prediction_scores_100():
    _, gt = random_maps(3)
    pred = np.where(gt == IGNORE, 0, gt)
    cm = ConfusionMatrix(5)
    cm.update(pred, gt)
    m = cm.compute()
    assert m["miou"] == m["pixel_acc"] == m["mean_acc"] == 100.0


def test_empty_matrix_gives_nan_means():
    cm = ConfusionMatrix(3)
    cm.update(np.array([1, 2]), np.array([IGNORE, IGNORE]))
    m = cm.compute()
    assert math.isnan(m["miou"]) and math.isnan(m["pixel_acc"]) and math.isnan(m["mean_acc"])
    assert all(math.isnan(v) for v in m["iou"])


def test_merging_halves_equals_the_whole():
    pred, gt = random_maps(4)
    whole = ConfusionMatrix(5)
    whole.update(pred, gt)
    first, second = ConfusionMatrix(5), ConfusionMatrix(5)
    first.update(pred[:2], gt[:2])
    second.update(pred[2:], gt[2:])
    first += second
    assert torch.equal(first.matrix, whole.matrix)
    assert_metrics_equal(first.compute(), whole.compute())
    with pytest.raises(ValueError, match="4 classes"):
        whole.merge(ConfusionMatrix(4))


def test_reset_clears_counts():
    pred, gt = random_maps(5)
    cm = ConfusionMatrix(5)
    cm.update(pred, gt)
    cm.reset()
    assert int(cm.matrix.sum()) == 0


def test_torch_and_numpy_inputs_agree():
    pred, gt = random_maps(6)
    from_numpy, from_torch, mixed = ConfusionMatrix(5), ConfusionMatrix(5), ConfusionMatrix(5)
    from_numpy.update(pred, gt)
    from_torch.update(torch.from_numpy(pred).long(), torch.from_numpy(gt))
    mixed.update(torch.from_numpy(pred), gt.astype(np.int64))
    assert torch.equal(from_numpy.matrix, from_torch.matrix)
    assert torch.equal(from_numpy.matrix, mixed.matrix)


def test_bad_inputs_are_reported():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        cm.update(np.zeros((2, 3), np.int64), np.zeros((3, 2), np.int64))
    with pytest.raises(ValueError, match="values 3, 7"):
        cm.update(np.array([0, 3, 7, 9]), np.array([0, 1, 2, IGNORE]))
    with pytest.raises(ValueError, match="ground truth holds values 5"):
        cm.update(np.array([0, 1]), np.array([0, 5]))
    assert int(cm.matrix.sum()) == 0


def test_format_table():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 1, 1, 0]), np.array([0, 1, 1, 1]))
    table = format_table(cm.compute(), ["background", "cat", "dog"])
    lines = table.splitlines()
    assert lines[0] == "| class | IoU (%) |"
    assert lines[2] == "| background | 50.00 |"
    assert lines[3] == "| cat | 66.67 |"
    assert lines[4] == "| dog | n/a |"
    assert lines[5] == "| **mIoU** | **58.33** |"
    assert lines[6] == "| pixel acc | 75.00 |"
    assert lines[7] == "| mean acc | 83.33 |"
    with pytest.raises(ValueError, match="2 class names for 3"):
        format_table(cm.compute(), ["background", "cat"])
