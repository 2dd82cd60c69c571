"""COCO instances JSON: what pycocotools, torchvision's CocoDetection, detectron2's
`register_coco_instances` and mmdetection's CocoDataset read.

    <out>/instances_<split>_<variant>.json
        images       {id, file_name (relative to `image_root`), height, width}
        categories   {id, name}: the dataset's own category ids and names (VOC / YOLO: 1..C-1)
        annotations  {id, image_id, category_id, segmentation, area, bbox [x, y, w, h], iscrowd 0,
                      score}: one per box whose mask is not empty
        info         {description, image_root, variant}

`segmentation` is a compressed RLE (exact, holes kept) by default, or with segmentation="polygon"
a list of outlines (exporters/polygons.py: holes filled). `area` and `bbox` are the mask's. Image
ids are the dataset's where they are all integers (COCO inputs), else 1..N in split order (the
string id stays in file_name). Train with image_root = the manifest's dataset root (in info).
"""

from __future__ import annotations

from pathlib import Path

SEGMENTATIONS = ("rle", "polygon")


def image_ids(ids: list[str]) -> dict[str, int]:
    """{id: integer id}: the ids themselves where each is a plain non-negative integer and they
    stay distinct as numbers, else 1..N in order."""
    if all(i.isdigit() and i.isascii() for i in ids) and len({int(i) for i in ids}) == len(ids):
        return {i: int(i) for i in ids}
    return {i: n for n, i in enumerate(ids, start=1)}


def results(labels, variant: str, ids: list[str], numbers: dict[str, int]) -> list[dict]:
    """COCO results entries (image_id, category_id, segmentation RLE, score) of the non-empty
    instances of `ids`, to score with COCOeval."""
    out = []
    for image_id in ids:
        rec = labels.record(image_id)
        masks = _rles(labels, rec, variant)
        for k, rle in masks:
            out.append({"image_id": numbers[image_id],
                        "category_id": labels.category_ids[rec["classes"][k]],
                        "segmentation": rle, "score": float(labels.scores(rec, variant)[k])})
    return out


def _rles(labels, rec: dict, variant: str) -> list[tuple[int, dict]]:
    """(box index, RLE) of each non-empty instance of a record."""
    from utils.instances import encode_masks

    if variant in rec["instances"]:
        return [(k, rle) for k, rle in enumerate(rec["instances"][variant]) if rle is not None]
    masks = labels.instance_masks(rec, variant)
    keep = [k for k in range(len(masks)) if masks[k].any()]
    return list(zip(keep, encode_masks(masks[keep]))) if keep else []


def export(labels, variant: str, out: Path, segmentation: str = "rle") -> Path:
    from pycocotools import mask as mask_utils

    from exporters.polygons import mask_polygons
    from utils.errors import BanaError
    from utils.io import atomic_write_json

    if segmentation not in SEGMENTATIONS:
        raise BanaError(f"COCO export: segmentation {segmentation!r}: choose "
                        f"{' or '.join(SEGMENTATIONS)}.")
    numbers = image_ids(labels.ids)
    images, annotations = [], []
    for rec in labels.records():
        images.append({"id": numbers[rec["id"]], "file_name": rec["file_name"],
                       "height": rec["height"], "width": rec["width"]})
        scores = labels.scores(rec, variant)
        for k, rle in _rles(labels, rec, variant):
            coded = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
            seg = rle
            if segmentation == "polygon":
                mask = mask_utils.decode(coded).astype(bool)
                # +0.5: pycocotools puts a pixel's centre at x + 0.5, OpenCV's outline at x.
                seg = [[round(float(v), 2) for v in (p + 0.5).ravel()]
                       for p in mask_polygons(mask)]
            annotations.append({
                "id": len(annotations) + 1, "image_id": numbers[rec["id"]],
                "category_id": labels.category_ids[rec["classes"][k]], "segmentation": seg,
                "area": float(mask_utils.area(coded)),
                "bbox": [float(v) for v in mask_utils.toBbox(coded)], "iscrowd": 0,
                "score": round(float(scores[k]), 4)})
    categories = [{"id": cid, "name": name, "supercategory": "object"}
                  for cid, name in labels.category_names.items()]
    path = Path(out) / f"instances_{labels.split}_{variant}.json"
    atomic_write_json(path, {
        "info": {"description": f"BANA pseudo labels ({variant}) of split {labels.split}",
                 "image_root": str(labels.root), "variant": variant},
        "images": images, "annotations": annotations, "categories": categories})
    return path
