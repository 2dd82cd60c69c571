"""COCO instance-segmentation AP of instance masks (pycocotools' COCOeval, iouType "segm").

The six numbers are COCO's standard summary, in %: AP (IoU 0.50:0.95), AP50, AP75, and AP over
small (< 32² px), medium and large (> 96² px) objects. A size range without any GT instance has no
AP; COCOeval says -1 there and this module says None (printed "n/a"), never a number.
"""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.errors import BanaError

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _quiet(fn, *args):
    """pycocotools prints progress for every call; keep the caller's output readable."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def load_ground_truth(annotation_json) -> COCO:
    """A pycocotools COCO of an instances file (a path), or the given COCO object unchanged."""
    if isinstance(annotation_json, COCO):
        return annotation_json
    path = Path(annotation_json)
    if not path.is_file():
        raise BanaError(f"annotation file {path} not found: evaluation needs the COCO instances "
                        "file of the split the results come from.")
    try:
        return _quiet(COCO, str(path))
    except (json.JSONDecodeError, AssertionError, KeyError, TypeError) as err:
        raise BanaError(f"{path} is not a COCO instances file ({err!r}).") from None


def _load_results(results, gt: COCO) -> COCO:
    if isinstance(results, (str, Path)):
        path = Path(results)
        if not path.is_file():
            raise BanaError(f"results file {path} not found.")
        with open(path) as f:
            results = json.load(f)
    # loadRes writes id, area, iscrowd and a NumPy bbox into each entry: work on copies so the
    # caller's list stays JSON-serialisable.
    results = [dict(r) for r in results]
    if not results:
        # loadRes cannot take an empty list; an empty detection set scores 0 where GT exists.
        dt = COCO()
        dt.dataset = {"images": list(gt.dataset["images"]), "annotations": [],
                      "categories": list(gt.dataset.get("categories", []))}
        _quiet(dt.createIndex)
        return dt
    unknown = sorted({r["image_id"] for r in results} - set(gt.getImgIds()))
    if unknown:
        raise BanaError(f"results hold image ids {unknown[:5]} that the annotation file does not "
                        "list: evaluate against the annotations of the split the results come from.")
    return _quiet(gt.loadRes, results)


def evaluate_instances(annotation_json, results, image_ids=None, category_ids=None,
                       iou_type: str = "segm") -> dict:
    """Instance-segmentation AP of `results` against the GT of `annotation_json`.

    annotation_json: path of an instances file, or a loaded pycocotools COCO (loading train2017
    takes a while; pass it once). results: list of COCO results entries (image_id, category_id,
    segmentation as RLE, score), or the path of a results JSON; may be empty.
    image_ids: images to evaluate (default: those present in the results, or every image of the
    annotation file when there are no results). Pass the images a run labelled: an image that
    yielded no instance must still count its GT as missed.
    category_ids: COCO categories to evaluate (default: all); with the voc20 class map only the
    20 shared categories can be predicted, so pass `data.coco.evaluated_category_ids("voc20")`.
    iou_type: "segm" (masks) or "bbox" (boxes; results then need a "bbox" [x, y, w, h]).
    Returns {"AP", "AP50", "AP75", "APs", "APm", "APl"} in %, None where no GT falls in the range,
    plus "images" and "instances" (the number of results evaluated).
    """
    gt = load_ground_truth(annotation_json)
    dt = _load_results(results, gt)
    if image_ids is None:
        image_ids = sorted({a["image_id"] for a in dt.dataset["annotations"]}) or gt.getImgIds()
    image_ids = sorted({int(i) for i in image_ids})
    evaluator = COCOeval(gt, dt, iouType=iou_type)
    evaluator.params.imgIds = image_ids
    if category_ids is not None:
        evaluator.params.catIds = sorted({int(c) for c in category_ids})
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _quiet(evaluator.summarize)
    stats = {key: (None if value < 0 else float(100 * value))
             for key, value in zip(AP_KEYS, np.asarray(evaluator.stats)[:6])}
    kept = set(image_ids)
    cats = set(evaluator.params.catIds)
    stats["images"] = len(image_ids)
    stats["instances"] = sum(1 for a in dt.dataset["annotations"]
                             if a["image_id"] in kept and a["category_id"] in cats)
    return stats


def format_ap(stats: dict) -> str:
    """One line: "AP 11.7 | AP50 28.7 | AP75 ... | APs ... | APm ... | APl n/a"."""
    return " | ".join(f"{key} {'n/a' if stats.get(key) is None else format(stats[key], '.1f')}"
                      for key in AP_KEYS)
