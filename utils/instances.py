"""Instance masks from a semantic pseudo label and its boxes, and their COCO results entries.

Shape shorthand: K boxes, image H × W. A box is (x1, y1, x2, y2, class) in pixels and covers rows
y1:y2, columns x1:x2 (clipped to the image), the convention of stage 2 and utils/boxes.py.

Each box becomes one instance: the pixels of the box that the label map gives the box's class.
Where boxes of one class overlap, a pixel goes to the box whose per-box normalised CAM is highest
there, ties to the smaller box (a small box inside a large one is usually a nearer object, which
is also why fill_boxes paints small boxes on top). Boxes of different classes never compete: a
pixel has one label, and only boxes of that class can claim it.
"""

import numpy as np
from pycocotools import mask as mask_utils

from utils.boxes import pixel_ranges


def box_pixel_masks(boxes, height: int, width: int) -> np.ndarray:
    """bool (K, H, W): pixel (y, x) is True in row k iff y1 <= y < y2 and x1 <= x < x2 of box k.

    boxes: (K, 4) or (K, 5) array-like; coordinates are truncated to integers, then clipped.
    """
    x1, y1, x2, y2 = pixel_ranges(boxes, height, width).T
    rows, cols = np.arange(height), np.arange(width)
    in_rows = (rows >= y1[:, None]) & (rows < y2[:, None])
    in_cols = (cols >= x1[:, None]) & (cols < x2[:, None])
    return in_rows[:, :, None] & in_cols[:, None, :]


def instance_masks(label_map, boxes, box_scores) -> np.ndarray:
    """One mask per box: bool (K, H, W).

    label_map: integer (H, W) class ids (e.g. Y_crf or Y_ret). boxes: int (K, 5) = x1, y1, x2, y2,
    class. box_scores: float (K, H, W), the per-box normalised CAM (in [0, 1] inside box k, 0
    outside). Pixel p belongs to box k iff p is inside box k, label_map[p] == class_k, and among
    the boxes that satisfy both at p, box k has the highest box_scores[k, p]; ties go to the box
    with the smaller area, then to the earlier box. Every pixel thus belongs to at most one box.
    """
    label_map = np.asarray(label_map)
    boxes = np.asarray(boxes).reshape(-1, 5)
    # float32: K x H x W over a whole COCO image is large enough already.
    box_scores = np.asarray(box_scores, dtype=np.float32)
    height, width = label_map.shape
    if box_scores.shape != (len(boxes), height, width):
        raise ValueError(f"box_scores must be (K, H, W) = {(len(boxes), height, width)}, "
                         f"got {box_scores.shape}")
    inside = box_pixel_masks(boxes, height, width)
    candidate = inside & (label_map[None] == boxes[:, 4, None, None])
    # Candidates of one pixel share its class, so one argmax over all boxes suffices. Boxes are
    # put in order of area (stable) so that argmax, which returns the first maximum, breaks ties
    # towards the smaller box.
    areas = inside.sum((1, 2))
    order = np.argsort(areas, kind="stable")
    ranked = np.where(candidate[order], box_scores[order], -np.inf)
    winner = np.empty(len(boxes), dtype=np.int64)
    winner[order] = np.arange(len(boxes))
    best = ranked.argmax(0) if len(boxes) else np.zeros((height, width), np.int64)
    return candidate & (best[None] == winner[:, None, None])


def mask_scores(masks, box_scores) -> np.ndarray:
    """Confidence of each instance: float64 (K,), the mean box score over its mask (0 if empty).

    masks: bool (K, H, W); box_scores: float (K, H, W). The per-box normalised CAM is 1 at the
    box's most class-like pixel, so a mask made of strongly activated pixels scores near 1 and one
    that spreads over weak activations scores low; AP ranks the instances by this number. A
    constant score would leave that ranking to the order of the images.
    """
    masks = np.asarray(masks, dtype=bool)
    area = masks.sum((1, 2))
    total = (np.asarray(box_scores, np.float64) * masks).sum((1, 2))
    return np.divide(total, area, out=np.zeros(len(masks)), where=area > 0)


def encode_masks(masks) -> list[dict]:
    """COCO compressed RLEs of bool (K, H, W) masks, counts as str (JSON-ready)."""
    masks = np.asarray(masks, dtype=bool)
    if not len(masks):
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def instance_results(masks, image_id: int, category_ids, scores) -> list[dict]:
    """COCO results entries {image_id, category_id, segmentation (RLE), score}, one per non-empty mask.

    masks: bool (K, H, W); category_ids: (K,) COCO category ids; scores: (K,) floats. An empty mask
    (its box got no pixel of its class) is left out: it can only be a false positive. No `bbox`
    key, on purpose: `COCO.loadRes` would then take the box area for the mask area and put the
    instance in the wrong size range (small / medium / large).
    """
    masks = np.asarray(masks, dtype=bool)
    category_ids, scores = np.asarray(category_ids).reshape(-1), np.asarray(scores).reshape(-1)
    if not len(masks) == len(category_ids) == len(scores):
        raise ValueError(f"need one category id and score per mask: {len(masks)} masks, "
                         f"{len(category_ids)} category ids, {len(scores)} scores")
    keep = np.flatnonzero(masks.any((1, 2)))
    return [{"image_id": int(image_id), "category_id": int(category_ids[k]),
             "segmentation": rle, "score": float(scores[k])}
            for k, rle in zip(keep, encode_masks(masks[keep]))]


def results_as_dataset(results: list[dict], images: list[dict], categories: list[dict]) -> dict:
    """A COCO instances dataset (the annotation-file format) made of results entries.

    `results` from `instance_results`; `images` and `categories` as in the GT annotation file
    (dicts with id, file_name, height, width / id, name). The pseudo labels thus train an
    instance-segmentation model like any COCO annotation file: each entry gets an id, its mask
    area, the bounding box of its mask and iscrowd 0; the score is kept as an extra field.
    """
    annotations = []
    for n, res in enumerate(results, start=1):
        rle = res["segmentation"]
        annotations.append({
            "id": n, "image_id": res["image_id"], "category_id": res["category_id"],
            "segmentation": rle, "area": float(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
            "score": res["score"],
        })
    return {"images": list(images), "annotations": annotations, "categories": list(categories)}
