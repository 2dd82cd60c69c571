"""Segmentation metrics from a confusion matrix (SPEC §5): the one implementation that the
pseudo-label report (stage 2), stage-3 validation and evaluate.py all use.
"""

import math

import numpy as np
import torch


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")


def _listed(values: torch.Tensor, limit: int = 10) -> str:
    found = torch.unique(values).tolist()
    more = f" ... ({len(found)} distinct)" if len(found) > limit else ""
    return ", ".join(str(v) for v in found[:limit]) + more


class ConfusionMatrix:
    """Accumulates a (C, C) int64 confusion matrix: rows = ground truth, columns = prediction.

    Pixels whose GT equals `ignore_index` are skipped. `compute()` reports in percent:
    IoU_c = TP / (TP + FP + FN) and acc_c = TP / (TP + FN) per class, their means `miou` and
    `mean_acc`, and `pixel_acc` = Σ TP / number of counted pixels.

    A class absent from both the GT and the prediction has IoU NaN (0/0) and is EXCLUDED from
    the mean (nanmean); a class absent from the GT but predicted somewhere has IoU 0 and counts.
    Per-class accuracy is NaN for every class absent from the GT, and excluded likewise. With
    no counted pixel at all every mean is NaN. On the full VOC val set all 21 classes occur, so
    this only matters for subsets (a few images, the synthetic data).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred, gt) -> None:
        """Adds one prediction / GT pair: numpy arrays or torch tensors of the same (any) shape.

        Tensors are counted on their own device; only the (C, C) counts come back to the CPU.
        """
        pred, gt = _as_tensor(pred, "pred"), _as_tensor(gt, "gt")
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from ground-truth "
                             f"shape {tuple(gt.shape)}")
        pred = pred.to(gt.device).reshape(-1).long()
        gt = gt.reshape(-1).long()
        c = self.num_classes
        valid = gt != self.ignore_index
        pred, gt = pred[valid], gt[valid]
        bad_gt = (gt < 0) | (gt >= c)
        if bad_gt.any():
            raise ValueError(f"ground truth holds values {_listed(gt[bad_gt])}, outside the "
                             f"classes 0..{c - 1} and the ignore index {self.ignore_index}")
        bad_pred = (pred < 0) | (pred >= c)
        if bad_pred.any():
            raise ValueError(f"prediction holds values {_listed(pred[bad_pred])} at valid "
                             f"pixels, outside the classes 0..{c - 1}")
        counts = torch.bincount(gt * c + pred, minlength=c * c)
        self.matrix += counts.reshape(c, c).cpu()

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Adds another matrix's counts (e.g. from another process) into this one; returns self."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"can only merge a ConfusionMatrix, got {type(other).__name__}")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(f"cannot merge a matrix of {other.num_classes} classes (ignore "
                             f"{other.ignore_index}) into one of {self.num_classes} classes "
                             f"(ignore {self.ignore_index})")
        self.matrix += other.matrix
        return self

    def __iadd__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return self.merge(other)

    def reset(self) -> None:
        self.matrix.zero_()

    def compute(self) -> dict:
        """{"miou", "pixel_acc", "mean_acc": float %, "iou", "acc": list of C floats % (NaN for
        classes excluded as described in the class docstring)}."""
        m = self.matrix.numpy().astype(np.float64)
        tp = np.diag(m)
        gt_count = m.sum(axis=1)
        union = gt_count + m.sum(axis=0) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan) * 100
            acc = np.where(gt_count > 0, tp / gt_count, np.nan) * 100
        total = m.sum()
        return {
            "miou": _nanmean(iou),
            "pixel_acc": float(tp.sum() / total * 100) if total > 0 else math.nan,
            "mean_acc": _nanmean(acc),
            "iou": iou.tolist(),
            "acc": acc.tolist(),
        }


def _nanmean(values: np.ndarray) -> float:
    # np.nanmean warns on an all-NaN input; an empty matrix is a legitimate state here.
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else math.nan


def format_table(metrics: dict, class_names) -> str:
    """Markdown table: one row per class with its IoU, then mIoU, pixel acc and mean acc, in %
    with two decimals ("n/a" for NaN). `metrics` is what `ConfusionMatrix.compute` returns."""
    names = list(class_names)
    if len(names) != len(metrics["iou"]):
        raise ValueError(f"{len(names)} class names for {len(metrics['iou'])} per-class IoUs")

    def cell(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.2f}"

    rows = ["| class | IoU (%) |", "|---|---:|"]
    rows += [f"| {name} | {cell(v)} |" for name, v in zip(names, metrics["iou"])]
    rows += [f"| **mIoU** | **{cell(metrics['miou'])}** |",
             f"| pixel acc | {cell(metrics['pixel_acc'])} |",
             f"| mean acc | {cell(metrics['mean_acc'])} |"]
    return "\n".join(rows)
