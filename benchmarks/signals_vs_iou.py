"""Do the no-ground-truth signals of stage 2 follow the true quality of the labels? Per image, the
Spearman rank correlation between each signal of a label set and the image's IoU against the
ground truth, for each variant; and per label set, the signals beside the true mIoU.

    python benchmarks/signals_vs_iou.py --config-file CONFIG --labels DIR [DIR ...] [--opts ...]

CONFIG names the dataset (DATA.*) whose split has ground-truth masks; each DIR is a label folder
stage 2 wrote on that split (e.g. with and without u0). The IoU of an image is the mean over the
classes present in its label or its ground truth, background included (engine/review.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIGNALS = ("fill_min", "fill_mean", "agreement")


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their mean rank."""
    order = np.argsort(values, kind="stable")
    r = np.empty(len(values))
    r[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):
        tied = values == v
        r[tied] = r[tied].mean()
    return r


def spearman(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    keep = ~(np.isnan(a) | np.isnan(b))
    if keep.sum() < 3:
        return float("nan")
    ra, rb = ranks(a[keep]), ranks(b[keep])
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def measure(cfg, folder: Path) -> dict:
    from data.datasets import open_data
    from data.labelset import LabelSet
    from engine.label_quality import image_signals
    from engine.review import image_iou
    from utils.metrics import ConfusionMatrix

    data, labels = open_data(cfg), LabelSet(folder)
    with_gt = set(data.gt_ids(labels.split))
    out = {"folder": str(folder), "variants": {}}
    for variant in ("Y_crf", "Y_ret", "Y_box"):
        if variant not in labels.variants:
            continue
        rows, matrix = [], ConfusionMatrix(len(labels.classes))
        for rec in labels.records():
            if rec["id"] not in with_gt or not rec["boxes"]:
                continue
            gt = data.gt_label(labels.split, rec["id"])
            label = labels.label(rec, variant)
            matrix.update(label, gt)
            sig = image_signals(rec, variant)
            rows.append([image_iou(label, gt)] + [np.nan if sig[k] is None else sig[k]
                                                  for k in SIGNALS])
        rows = np.asarray(rows, dtype=float)
        fills = [f for rec in labels.records() for f in rec["fill"][variant]]
        out["variants"][variant] = {
            "images": len(rows), "miou": float(matrix.compute()["miou"]),
            "fill_mean": float(np.mean(fills)) if fills else float("nan"),
            "rho": {k: spearman(rows[:, j + 1], rows[:, 0]) for j, k in enumerate(SIGNALS)}}
    out["warnings"] = labels.quality.get("warnings", [])
    return out


def main(argv=None) -> list[dict]:
    from engine.config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--labels", nargs="+", required=True, metavar="DIR")
    p.add_argument("--opts", nargs="+", default=[])
    args = p.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    results = [measure(cfg, Path(d)) for d in args.labels]
    print(f"{'label folder':40s} {'variant':8s} {'images':>6s} {'mIoU':>6s} {'fill':>6s} "
          + " ".join(f"{'rho ' + k:>15s}" for k in SIGNALS) + "  warning")
    for res in results:
        for variant, v in res["variants"].items():
            warned = any(w.startswith(variant) for w in res["warnings"])
            print(f"{res['folder'][-40:]:40s} {variant:8s} {v['images']:6d} {v['miou']:6.2f} "
                  f"{100 * v['fill_mean']:5.1f}% "
                  + " ".join(f"{v['rho'][k]:15.2f}" for k in SIGNALS)
                  + f"  {'yes' if warned else 'no'}")
    return results


if __name__ == "__main__":
    main()
