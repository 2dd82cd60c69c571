"""What stage 2 says about the labels it wrote.

Without ground truth (every run; the case BANA exists for) it reads the per-box signals of the
records (data/labelset.py) and summarises them per label variant, overall and per class:
- box fill: the share of a box's pixels its label gives the box's class (mean, 10th percentile).
  An object fills part of its box (Penn-Fudan's pedestrian masks 51 % of their boxes; the
  synthetic demo's shapes about 70 %), so a variant whose boxes are mostly background has lost
  its objects;
- boxes lost: boxes whose fill is under LOST_FILL (count, share);
- agreement: the share of a box's pixels where Y_crf and Y_ret agree (the pixels NAL trusts).
`label_warnings` turns implausible values into warnings that name the signal, the variant, the
classes, how far they are from plausible and what to try; stage 2 prints them at its end and
stores them in the manifest, and stage 3 prints them again when it starts on those labels.

Where the split has ground truth it also scores the labels (mIoU, `quality_report`), and where
the dataset has instance ground truth their instance masks (COCO segm AP, `instance_report`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data.labelset import LOST_FILL
from engine.stage2_jobs import BOX_LABEL, LABELS

if TYPE_CHECKING:
    from engine.config import Config

# Plausible ranges. An object's mask fills well over a third of its box in the datasets we could
# measure (Penn-Fudan 51 %, the synthetic demo's shapes ~70 %; thin or diagonal objects less):
# a variant whose mean box fill is under MIN_FILL labels most box pixels background.
MIN_FILL = 0.30
# Boxes whose object vanished (fill < LOST_FILL): a few are normal (occluded or tiny objects).
MAX_LOST_SHARE = 0.10
# Y_crf and Y_ret label the same image from the same features; where they disagree on most box
# pixels, NAL trusts few pixels and one of them is far off.
MIN_AGREEMENT = 0.60
# A class is judged on its own from this many boxes on.
MIN_BOXES = 5


def _stats(fills: np.ndarray) -> dict:
    n = len(fills)
    if not n:
        return {"boxes": 0}
    lost = int((fills < LOST_FILL).sum())
    return {"boxes": n, "fill_mean": round(float(fills.mean()), 4),
            "fill_p10": round(float(np.percentile(fills, 10)), 4), "lost": lost,
            "lost_share": round(lost / n, 4)}


def signals(records, classes) -> dict:
    """The no-ground-truth signals of a label set's `records` (an iterable of record dicts),
    per variant and per class (`classes`: names by index)."""
    fills, agree, cls, agree_cls = {}, [], [], []
    images = 0
    for rec in records:
        images += 1
        cls += rec["classes"]
        for variant, values in rec["fill"].items():
            fills.setdefault(variant, []).extend(values)
        if rec.get("agreement") is not None:
            agree += rec["agreement"]
            agree_cls += rec["classes"]
    cls, agree_cls = np.asarray(cls, dtype=np.int64), np.asarray(agree_cls, dtype=np.int64)
    out = {"images": images, "boxes": int(len(cls)), "lost_fill": LOST_FILL, "variants": {}}
    present = [c for c in range(1, len(classes)) if (cls == c).any()]
    # Classes with too few boxes to be judged alone are judged together.
    rare = [c for c in present if (cls == c).sum() < MIN_BOXES]
    for variant, values in fills.items():
        values = np.asarray(values, dtype=np.float64)
        out["variants"][variant] = {
            "overall": _stats(values),
            "per_class": {classes[c]: _stats(values[cls == c]) for c in present},
            "rare_classes": {"names": [classes[c] for c in rare],
                             **_stats(values[np.isin(cls, rare)])}}
    if agree:
        values = np.asarray(agree, dtype=np.float64)
        out["agreement"] = {
            "overall": {"boxes": len(values), "mean": round(float(values.mean()), 4),
                        "p10": round(float(np.percentile(values, 10)), 4)},
            "per_class": {classes[c]: round(float(values[agree_cls == c].mean()), 4)
                          for c in present if (agree_cls == c).any()}}
    return out


def image_signals(record: dict, variant: str = "Y_crf") -> dict:
    """Per-image numbers (the review page's sort keys): the lowest and mean box fill of
    `variant`, the mean Y_crf / Y_ret agreement, the boxes lost."""
    fill = np.asarray(record["fill"].get(variant, []), dtype=np.float64)
    agree = record.get("agreement")
    return {"fill_min": round(float(fill.min()), 4) if len(fill) else None,
            "fill_mean": round(float(fill.mean()), 4) if len(fill) else None,
            "agreement": round(float(np.mean(agree)), 4) if agree else None,
            "lost": int((fill < LOST_FILL).sum())}


ADVICE = (
    "Things to try, each into a new DATA.PSEUDO_LABEL_DIR so that the labels can be compared: "
    "stage 2 with `--opts MODEL.USE_U0 false` (a weakly trained stage 1's background attention "
    "u0 can claim most of every box); a longer stage 1 (SOLVER.MAX_ITER) or ImageNet weights "
    "(MODEL.BACKBONE vgg16 MODEL.INIT imagenet, on a GPU); look at the worst images on the "
    "review page; and train stage 3 on the filled boxes too (DATA.PSEUDO_LABELS [Y_box, Y_box]) "
    "to see whether these labels beat them.")


def label_warnings(sig: dict) -> list[str]:
    """Warnings for the signals outside their plausible range (an empty list when none is): one
    line each, naming the signal, the variant, the classes and the plausible range. Every
    variant is judged but Y_box (the filled boxes: their fill is 1 but where a smaller box of
    another class covers part of a box). A class is judged alone from MIN_BOXES boxes on; the
    rarer ones are judged together once they reach MIN_BOXES boxes between them."""
    found = []
    for variant in [v for v in sig["variants"] if v != BOX_LABEL]:
        entry = sig["variants"].get(variant)
        if not entry or not entry["overall"]["boxes"]:
            continue
        judged = {name: s for name, s in entry["per_class"].items() if s["boxes"] >= MIN_BOXES}
        rare = entry.get("rare_classes", {"boxes": 0})
        if not judged:  # too few boxes per class: judge the classes together
            judged = {"all classes": entry["overall"]}
        elif rare["boxes"] >= MIN_BOXES:  # the rare classes together, beside the others
            judged[f"the rare classes ({', '.join(rare['names'][:5])}"
                   f"{', ...' if len(rare['names']) > 5 else ''})"] = rare
        low = {n: s["fill_mean"] for n, s in judged.items() if s["fill_mean"] < MIN_FILL}
        if low:
            found.append(f"{variant}: boxes are mostly background — mean box fill "
                         + ", ".join(f"{n} {100 * v:.1f} %" for n, v in low.items())
                         + f" (plausible: at least {100 * MIN_FILL:.0f} %; objects usually fill "
                         "half of their box or more).")
        lost = {n: s["lost_share"] for n, s in judged.items() if s["lost_share"] > MAX_LOST_SHARE}
        if lost:
            found.append(f"{variant}: objects lost — boxes with under {100 * LOST_FILL:.0f} % "
                         "of their pixels labelled: "
                         + ", ".join(f"{n} {100 * v:.1f} % of boxes" for n, v in lost.items())
                         + f" (plausible: at most {100 * MAX_LOST_SHARE:.0f} %).")
    agreement = sig.get("agreement")
    if agreement and agreement["overall"]["mean"] < MIN_AGREEMENT:
        found.append(f"Y_crf and Y_ret agree on {100 * agreement['overall']['mean']:.1f} % of "
                     f"box pixels (plausible: at least {100 * MIN_AGREEMENT:.0f} %): the "
                     "noise-aware loss trusts few pixels.")
    return found


def format_signals(sig: dict) -> str:
    """The closing summary's table of the no-ground-truth signals."""
    lines = [f"Label signals without ground truth ({sig['images']} images, {sig['boxes']} boxes; "
             f"fill = share of a box's pixels given its class, lost = fill under "
             f"{100 * sig['lost_fill']:.0f} %):",
             f"  {'variant':8s} {'class':18s} {'boxes':>6s} {'fill':>7s} {'fill p10':>9s} "
             f"{'lost':>7s}"]
    for variant, entry in sig["variants"].items():
        rows = [("all", entry["overall"])]
        if len(entry["per_class"]) > 1:
            rows += list(entry["per_class"].items())
        for name, s in rows:
            if not s["boxes"]:
                continue
            lines.append(f"  {variant:8s} {name[:18]:18s} {s['boxes']:6d} "
                         f"{100 * s['fill_mean']:6.1f}% {100 * s['fill_p10']:8.1f}% "
                         f"{100 * s['lost_share']:6.1f}%")
    if "agreement" in sig:
        a = sig["agreement"]["overall"]
        lines.append(f"  Y_crf = Y_ret inside boxes: mean {100 * a['mean']:.1f} %, 10th "
                     f"percentile {100 * a['p10']:.1f} %")
    return "\n".join(lines)


def format_warnings(warnings: list[str], where: str) -> str:
    return "\n".join([f"WARNING: the labels in {where} look wrong:"]
                     + [f"  - {w}" for w in warnings] + [f"  {ADVICE}"])


def quality_report(cfg: Config, data, ids: list[str]) -> dict | None:
    """mIoU of the box-filling baseline, Y_crf, Y_ret and their combination against the semantic
    ground truth of `data` (a `data.base.DatasetFormat`), over the images of `ids` that have one;
    None when none has (e.g. VOC's train_aug, or a box-only export).

    "Y_crf & Y_ret" is Y_crf where the two agree; a pixel where they disagree is scored as
    background (stage 3 ignores such pixels; here an object pixel among them counts as missed,
    a background pixel as right). "agreement" scores the agreeing pixels alone (the disagreeing
    ones are not counted), and `agreement_coverage` is the share of labelled pixels where the two
    agree. The box baseline is stage 2's Y_box (each box filled, smaller boxes on top)."""
    from utils.io import read_label_png
    from utils.metrics import ConfusionMatrix

    split, out_root = cfg.DATA.SPLIT, cfg.pseudo_label_dir
    with_gt = set(data.gt_ids(split))
    scored = [i for i in ids if i in with_gt]
    if not scored:
        return None
    n = cfg.DATA.NUM_CLASSES
    mats = {k: ConfusionMatrix(n) for k in REPORT_ROWS}
    agree_px = valid_px = 0
    for i in scored:
        gt = data.gt_label(split, i)
        name = data.label_name(i)
        y_crf, y_ret, filled = (
            read_label_png(out_root / d / name, n, f"{d} label", gt.shape,
                           f"delete it and rerun stage 2 (or check that {out_root} holds this "
                           "dataset's labels)") for d in (*LABELS, BOX_LABEL))
        agree = y_crf == y_ret
        mats["box_baseline"].update(filled, gt)
        mats["Y_crf"].update(y_crf, gt)
        mats["Y_ret"].update(y_ret, gt)
        mats["Y_crf&Y_ret"].update(np.where(agree, y_crf, 0), gt)
        mats["agreement"].update(y_crf, np.where(agree, gt, 255))
        valid = gt != 255
        agree_px += int((agree & valid).sum())
        valid_px += int(valid.sum())
    report = {k: m.compute() for k, m in mats.items()}
    summary = {k: round(float(v["miou"]), 2) for k, v in report.items()}
    summary["agreement_coverage"] = round(100.0 * agree_px / max(valid_px, 1), 2)
    return {"split": split, "images": len(scored), "labelled_images": len(ids), "miou": summary,
            "per_class_iou": {k: dict(zip(data.classes, map(float, v["iou"])))
                              for k, v in report.items()}}


REPORT_ROWS = ("box_baseline", "Y_crf", "Y_ret", "Y_crf&Y_ret", "agreement")


def format_report(report: dict) -> str:
    m = report["miou"]
    scored = (f"{report['images']} images" if report["images"] == report["labelled_images"] else
              f"the {report['images']} of {report['labelled_images']} images that have a "
              "ground-truth mask")
    return "\n".join([
        f"Pseudo-label quality on '{report['split']}' ({scored}), mIoU %:",
        f"  box baseline          {m['box_baseline']:6.2f}",
        f"  Y_crf                 {m['Y_crf']:6.2f}",
        f"  Y_ret                 {m['Y_ret']:6.2f}",
        f"  Y_crf & Y_ret         {m['Y_crf&Y_ret']:6.2f}  (where they disagree: background)",
        f"  Y_crf = Y_ret region  {m['agreement']:6.2f}  (agreeing pixels only; they cover "
        f"{m['agreement_coverage']:.2f}% of labelled pixels)"])


def instance_report(labels, gt, ids: list[str]) -> dict:
    """COCO segm AP (%) of the instance masks of the box baseline, Y_crf and Y_ret over `ids`,
    against `gt` (a pycocotools COCO of the split's instances), on the categories of the label
    set (`labels`: data.labelset.LabelSet)."""
    from exporters.coco import image_ids, results
    from utils.coco_eval import evaluate_instances

    numbers = image_ids(labels.ids)
    return {"split": labels.split, "images": len(ids),
            "ap": {name: evaluate_instances(gt, results(labels, variant, ids, numbers),
                                            image_ids=[numbers[i] for i in ids],
                                            category_ids=labels.category_ids[1:])
                   for name, variant in INSTANCE_ROWS.items()}}


# The rows of the instance report, and the variant each scores.
INSTANCE_ROWS = {"box_baseline": "Y_box", "Y_crf": "Y_crf", "Y_ret": "Y_ret"}


def format_instance_report(report: dict) -> str:
    from utils.coco_eval import format_ap

    names = {"box_baseline": "box baseline", "Y_crf": "Y_crf", "Y_ret": "Y_ret"}
    return "\n".join(
        [f"Instance masks on '{report['split']}' ({report['images']} images), COCO segm AP %:"]
        + [f"  {names[k]:13s} {format_ap(stats)}  ({stats['instances']} instances)"
           for k, stats in report["ap"].items()])


def save_panels(cfg: Config, data, dataset, ids: list[str], out_dir: Path) -> None:
    """image | GT | Y_crf | Y_ret panels, for looking at pseudo labels before trusting them. The
    GT panel is void (the palette's 255 colour) where the split has no semantic GT."""
    from utils.io import atomic_write_png, read_image, read_index_png
    from utils.palette import panel

    out_root = cfg.pseudo_label_dir
    for i in ids:
        image = read_image(dataset.image_path(i), exif=True)
        gt = data.gt_label(cfg.DATA.SPLIT, i)
        maps = [gt if gt is not None else np.full(image.shape[:2], 255, np.uint8)]
        maps += [read_index_png(out_root / d / data.label_name(i)) for d in LABELS]
        atomic_write_png(out_dir / f"{i}.png", panel(image, maps))
