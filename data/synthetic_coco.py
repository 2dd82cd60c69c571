"""A small synthetic dataset in the MS-COCO 2017 layout, for tests and the demo.

`make_synthetic_coco(out, ...)` writes (see data/coco.py for the layout):
    train2017/<12-digit id>.jpg, val2017/<12-digit id>.jpg,
    annotations/instances_{train2017,val2017}.json, BgMaskfromBoxes/{train2017,val2017}/<id>.png,
    synthetic.json (the parameters and the box-filling baseline's AP).
Images are drawn with the object and background painters of data/synthetic.py (same look as the
synthetic VOC tree), but without VOC's void borders: COCO masks have none. Every object is one
annotation: a compressed-RLE `segmentation` of its visible pixels (exact, holes included, which
polygons could not give), its `area` and `bbox` (the mask's pixel extent, [x, y, w, h]), and a
category among SYNTHETIC_CATEGORIES: five that VOC shares and 'giraffe', which it does not. Image
n's first object cycles through the categories so every one appears in a tree of six images. The
top-most object of each split's first image is marked `iscrowd` 1, with an uncompressed RLE as
COCO stores crowds, to exercise the crowd rule. Image and annotation ids are unique over both
splits. The output depends only on the arguments.
"""

import json
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from data.coco import (COCO_CATEGORIES, COCO_ID_BY_NAME, SPLITS, evaluated_category_ids,
                       write_bg_masks)
from data.painting import (MARKER, SHAPES, STYLES, ClassStyle, all_visible, background,
                           paint, shape_mask, texture_field)
from utils.coco_eval import evaluate_instances
from utils.errors import BanaError
from utils.instances import box_pixel_masks, encode_masks, instance_results
from utils.io import atomic_write_jpeg, atomic_write_json

SYNTHETIC_CATEGORIES = ("person", "car", "bird", "cat", "dog", "giraffe")
GENERATED = ("train2017", "val2017", "train", "val", "annotations", "BgMaskfromBoxes")
# Giraffe is not a VOC class, so data/synthetic.py has no style for it.
_STYLES = {**STYLES,
           "giraffe": ClassStyle((215, 170, 85), "blotches", 0.18, 0.45, (0.3, 0.5, 0.2, 0.0))}


def render_instances(size: int, styles: list[ClassStyle], rng: np.random.Generator,
                     first: int | None = None):
    """One image with 1–3 objects, later ones occluding earlier ones.

    first: index into `styles` of the first object (default random). Returns (rgb uint8 (S, S, 3),
    instance uint8 (S, S) = 0 for background or n for the n-th object's visible pixels, kinds list
    of the objects' style indices).
    """
    image = background(size, styles, rng)
    objects = []  # (full mask, style index, centre)
    for n in range(int(rng.integers(1, 4))):
        for _attempt in range(20):
            k = first if n == 0 and first is not None else int(rng.integers(len(styles)))
            weights = np.asarray(styles[k].shape_weights)
            radius = size * rng.uniform(0.15, 0.32)
            centre = rng.uniform(0.15 * size, 0.85 * size, 2)
            mask = shape_mask(SHAPES[rng.choice(4, p=weights / weights.sum())], *centre, radius,
                               size, rng)
            candidate = objects + [(mask, k, centre)]
            if all_visible(candidate, size):
                objects = candidate
                break
    instance = np.zeros((size, size), np.uint8)
    for n, (mask, k, centre) in enumerate(objects, start=1):
        style = styles[k]
        colour = np.asarray(style.colour) + rng.normal(0, 28, 3)
        texture = texture_field(style.texture, style.period * rng.uniform(0.85, 1.15), size, centre, rng)
        paint(image, mask, colour, texture, style.amplitude)
        instance[mask] = n
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    image = cv2.GaussianBlur(image, (3, 3), 0.6)
    rgb = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return rgb, instance, [k for _, k, _ in objects]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a bool (H, W) mask: run lengths of the column-major pixels,
    starting with a run of zeros (possibly empty), as crowd annotations store them."""
    flat = np.asarray(mask, dtype=bool).reshape(-1, order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def _annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray, crowd: bool) -> dict:
    rle = encode_masks(mask[None])[0]
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "segmentation": uncompressed_rle(mask) if crowd else rle,
            "area": float(mask.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": int(crowd)}


def box_baseline_ap(annotation_json, class_map: str) -> dict:
    """AP (%) of predicting every non-crowd GT box filled as its instance mask, score 1."""
    with open(annotation_json) as f:
        data = json.load(f)
    results = []
    for image in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"] and not a["iscrowd"]]
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        masks = box_pixel_masks(xyxy, image["height"], image["width"])
        results += instance_results(masks, image["id"], [a["category_id"] for a in anns],
                                    np.ones(len(anns)))
    return evaluate_instances(annotation_json, results,
                              category_ids=evaluated_category_ids(class_map))


def _prepare_out(out: Path) -> None:
    """Refuse to write into a foreign dataset; clear an earlier synthetic COCO one (stale masks
    would survive otherwise, because the mask writer skips existing files)."""
    marker = out / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()).get("format") != "coco":
            raise BanaError(f"{out} holds a synthetic VOC dataset: choose another folder for the "
                            "COCO one.")
        for name in GENERATED:
            shutil.rmtree(out / name, ignore_errors=True)
    elif out.exists() and any(out.iterdir()):
        raise BanaError(f"{out} exists and is not a synthetic dataset written by this project (no "
                        f"{MARKER}): choose an empty or new folder.")


def make_synthetic_coco(out, n_train: int = 200, n_val: int = 100, size: int = 128,
                        seed: int = 0) -> dict:
    """Write the tree under `out`; returns what synthetic.json records plus the root and time."""
    start = time.perf_counter()
    out = Path(out)
    if n_train < 1 or n_val < 1 or size < 32:
        raise BanaError(f"need n_train >= 1, n_val >= 1 and size >= 32, got {n_train}, {n_val}, "
                        f"{size}.")
    _prepare_out(out)
    styles = [_STYLES[name] for name in SYNTHETIC_CATEGORIES]
    category_ids = [COCO_ID_BY_NAME[name] for name in SYNTHETIC_CATEGORIES]
    # Real COCO files list all 80 categories, present or not; evaluation relies on that list.
    categories = [{"id": cat_id, "name": name} for cat_id, name in COCO_CATEGORIES]
    image_id, ann_id = 0, 0
    for split_index, (split, count) in enumerate(zip(SPLITS, (n_train, n_val))):
        images, annotations = [], []
        for i in range(count):
            image_id += 1
            rng = np.random.default_rng([seed, split_index, i])
            rgb, instance, kinds = render_instances(size, styles, rng, first=i % len(styles))
            file_name = f"{image_id:012d}.jpg"
            atomic_write_jpeg(out / split / file_name, rgb)
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            for n, k in enumerate(kinds, start=1):
                ann_id += 1
                crowd = i == 0 and n == len(kinds)
                annotations.append(_annotation(ann_id, image_id, category_ids[k], instance == n,
                                               crowd))
        atomic_write_json(out / "annotations" / f"instances_{split}.json", {
            "info": {"description": f"synthetic COCO-format data, seed {seed}"},
            "images": images, "annotations": annotations, "categories": categories})
    write_bg_masks(out, SPLITS, workers=1, progress=False)
    train_json = out / "annotations" / f"instances_{SPLITS[0]}.json"
    info = {"format": "coco", "n_train": n_train, "n_val": n_val, "size": size, "seed": seed,
            "categories": list(SYNTHETIC_CATEGORIES),
            "box_baseline_ap_train": {cm: {k: None if v is None else round(v, 2)
                                           for k, v in box_baseline_ap(train_json, cm).items()}
                                      for cm in ("voc20", "coco80")}}
    atomic_write_json(out / MARKER, info)
    return {**info, "root": str(out), "seconds": time.perf_counter() - start}


# A user's own export: made-up names, gappy ids, listed out of order (as exporters do).
CUSTOM_CATEGORIES = ((42, "sprocket"), (7, "widget"), (13, "gizmo"), (3, "doohickey"))
CUSTOM_SPLITS = ("train", "val")


def polygons(mask: np.ndarray) -> list[list[float]]:
    """The outer contours of a bool (H, W) mask as COCO polygons [x1, y1, x2, y2, ...] (pixel
    corners, so a polygon rasterises back onto about the same pixels; holes are lost, as in
    any polygon export)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    return [(c.reshape(-1, 2) + 0.5).reshape(-1).astype(float).tolist()
            for c in contours if len(c) >= 3]


def make_custom_coco(out, n_train: int = 200, n_val: int = 60, size: int = 96,
                     seed: int = 0) -> dict:
    """Write a COCO-format export with its own classes under `out`, as CVAT, Label Studio or
    Roboflow write one: `train/` and `val/` images, annotations/instances_{train,val}.json with
    the CUSTOM_CATEGORIES (gappy ids, listed out of order), gappy image ids, segmentations as
    polygons (even annotation ids) or compressed RLE (odd), the first image of each split with a
    crowd region, and its second image without any annotation. No background masks: write them
    with `python data/coco_bbox_setup.py --data-root OUT`. Returns what synthetic.json records."""
    start = time.perf_counter()
    out = Path(out)
    if n_train < 2 or n_val < 2 or size < 32:
        raise BanaError(f"need n_train >= 2, n_val >= 2 and size >= 32, got {n_train}, {n_val}, "
                        f"{size}.")
    _prepare_out(out)
    from data.painting import style_for

    order = sorted(CUSTOM_CATEGORIES)  # class k + 1 = the k-th id in ascending order
    styles = [style_for(name) for _, name in order]
    image_id, ann_id = 1000, 0
    for split_index, (split, count) in enumerate(zip(CUSTOM_SPLITS, (n_train, n_val))):
        images, annotations = [], []
        for i in range(count):
            image_id += 3 + i % 4  # gappy ids
            rng = np.random.default_rng([seed, 7, split_index, i])
            if i == 1:
                rgb, instance, kinds = np.clip(background(size, styles, rng), 0, 255), None, []
                rgb = np.round(rgb).astype(np.uint8)
            else:
                rgb, instance, kinds = render_instances(size, styles, rng, first=i % len(styles))
            file_name = f"img_{split}_{i:05d}.jpg"
            atomic_write_jpeg(out / split / file_name, rgb)
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            for n, k in enumerate(kinds, start=1):
                ann_id += 1
                crowd = i == 0 and n == len(kinds)
                ann = _annotation(ann_id, image_id, order[k][0], instance == n, crowd)
                if not crowd and ann_id % 2 == 0:
                    ann["segmentation"] = polygons(instance == n)
                annotations.append(ann)
        atomic_write_json(out / "annotations" / f"instances_{split}.json", {
            "info": {"description": f"synthetic custom COCO-format export, seed {seed}"},
            "images": images, "annotations": annotations,
            "categories": [{"id": cat_id, "name": name, "supercategory": "thing"}
                           for cat_id, name in CUSTOM_CATEGORIES]})
    info = {"format": "coco", "custom": True, "n_train": n_train, "n_val": n_val, "size": size,
            "seed": seed, "categories": [name for _, name in order],
            "num_classes": len(order) + 1}
    atomic_write_json(out / MARKER, info)
    return {**info, "root": str(out), "seconds": time.perf_counter() - start}
