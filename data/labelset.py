"""The format-neutral record of a labelled split: what stage 2 (or `python labels.py index` on a
folder of predictions) writes beside the label maps, and what exporters, reports and the review
page read. Nothing that reads it asks which dataset layout the labels came from.

A label folder (DATA.PSEUDO_LABEL_DIR, or a predict.py output folder once indexed) holds
    labelset.json          the manifest: classes, each class's category id in the dataset's own
                           numbering, the split, the dataset root, the label variants, the ids
                           in order, and the quality summary (signals and warnings)
    records/<id>.json      one image: its file, size, boxes and classes, where each variant's
                           label map is, one instance mask per box and variant (COCO RLE, null
                           when the box got no pixel), and per-box signals
    <variant>/<id>.png     the label maps (Y_crf, Y_ret, Y_box from stage 2)

Record of one image (shape shorthand: K boxes, H x W image):
    id            str, the dataset's image id (any string: "2007_000032", "397133", "a b/c")
    file_name     the image, relative to the manifest's `root` (absolute when outside it)
    height, width the image's size as every stage reads it (EXIF orientation applied)
    boxes         (K, 4) int pixel ranges x1, y1, x2, y2 that were labelled: box k covers rows
                  y1:y2 and columns x1:x2 (utils/boxes.py's convention)
    classes       (K,) class indices 1..C-1
    labels        {variant: label map path relative to the folder}
    instances     {variant: K entries, a COCO RLE {"size": [H, W], "counts": str} or null}
    scores        {variant: (K,) confidence of each instance in [0, 1]}
    fill          {variant: (K,) share of box k's pixels that the variant gives box k's class}
    agreement     (K,) share of box k's pixels where Y_crf and Y_ret agree (null when the folder
                  has one variant)

Derived variant `agreement`: the label is Y_crf where Y_crf = Y_ret and 255 (ignore) elsewhere;
an instance is the pixels its box's Y_crf and Y_ret instances share.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np

from utils.errors import BanaError

MANIFEST = "labelset.json"
RECORDS = "records"
FORMAT = "bana-labelset"
VERSION = 1
AGREEMENT = "agreement"  # derived from Y_crf and Y_ret, not a folder of its own
# A box whose fill is below this share of its pixels has lost its object.
LOST_FILL = 0.05


def record_path(folder: Path, image_id: str) -> Path:
    return Path(folder) / RECORDS / f"{image_id}.json"


def relative_name(path: Path, root: Path) -> str:
    """`path` relative to `root` (POSIX separators), or absolute when it lies outside."""
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def box_fill(label: np.ndarray, boxes: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """float64 (K,): the share of box k's pixels that `label` (H, W) gives class k; 0 for a box
    without pixels. boxes int (K, 4) pixel ranges x1, y1, x2, y2."""
    fill = np.zeros(len(boxes))
    for k, ((x1, y1, x2, y2), c) in enumerate(zip(boxes, classes)):
        region = label[y1:y2, x1:x2]
        if region.size:
            fill[k] = float(np.mean(region == c))
    return fill


def box_agreement(a: np.ndarray, b: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """float64 (K,): the share of box k's pixels where label maps `a` and `b` are equal."""
    agree = np.zeros(len(boxes))
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        region = a[y1:y2, x1:x2] == b[y1:y2, x1:x2]
        if region.size:
            agree[k] = float(region.mean())
    return agree


def image_record(image_id: str, file_name: str, boxes, classes, labels: dict[str, np.ndarray],
                 label_paths: dict[str, str], box_scores: np.ndarray | None = None,
                 full_box_variants=("Y_box",)) -> dict:
    """The record of one labelled image (see the module doc).

    boxes (K, 4) pixel ranges; classes (K,); labels {variant: uint8 (H, W)}; box_scores float
    (K, H, W), the per-box normalised CAM that breaks ties where boxes of one class overlap
    (None: ties go to the smaller box, as for predictions). Variants in `full_box_variants` take
    each whole box as its instance (the box baseline: overlapping boxes keep their pixels)."""
    from utils.boxes import pixel_ranges
    from utils.instances import box_pixel_masks, encode_masks, instance_masks, mask_scores

    (height, width), = {label.shape for label in labels.values()}
    boxes = pixel_ranges(boxes, height, width)
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    inside = box_pixel_masks(boxes, height, width)
    scores_map = inside.astype(np.float32) if box_scores is None else box_scores
    with_class = np.concatenate([boxes, classes[:, None]], 1)
    record = {"id": image_id, "file_name": file_name, "height": height, "width": width,
              "boxes": boxes.tolist(), "classes": classes.tolist(), "labels": dict(label_paths),
              "instances": {}, "scores": {}, "fill": {}, "agreement": None}
    for variant, label in labels.items():
        if variant in full_box_variants:
            masks, scores = inside, np.ones(len(boxes))
        else:
            masks = instance_masks(label, with_class, scores_map)
            scores = mask_scores(masks, scores_map)
        rles = iter(encode_masks(masks[masks.any((1, 2))]))
        record["instances"][variant] = [next(rles) if m.any() else None for m in masks]
        record["scores"][variant] = [round(float(s), 4) for s in scores]
        record["fill"][variant] = [round(float(f), 4) for f in box_fill(label, boxes, classes)]
    if "Y_crf" in labels and "Y_ret" in labels:
        record["agreement"] = [round(float(a), 4)
                               for a in box_agreement(labels["Y_crf"], labels["Y_ret"], boxes)]
    return record


class LabelSet:
    """A label folder read through its manifest and records (see the module doc).

        labels = LabelSet("datasets/VOC2012/Generation")
        for rec in labels.records():
            image = labels.image_path(rec); y = labels.label(rec, "Y_crf")
            masks = labels.instance_masks(rec, "Y_crf")   # bool (K, H, W)
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise BanaError(
                f"{self.folder} has no {MANIFEST}: it is not a label folder that stage 2 (or "
                "`python labels.py index`) has finished. Run stage 2 on it again (it resumes), "
                "or, for a folder of predict.py outputs, index it first: `python labels.py "
                f"index --labels {self.folder} --config-file CONFIG`.")
        try:
            manifest = json.loads(path.read_text())
        except (ValueError, OSError) as err:
            raise BanaError(f"{path} cannot be read ({err}): run stage 2 (or labels.py index) "
                            "again to rewrite it.") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BanaError(f"{path} is not a label-set manifest (no \"format\": \"{FORMAT}\").")
        if manifest.get("version") != VERSION:
            raise BanaError(f"{path} is version {manifest.get('version')!r}; this code reads "
                            f"version {VERSION}: run stage 2 (or labels.py index) again.")
        self.manifest = manifest
        try:
            self.classes = tuple(manifest["classes"])
            self.category_ids = list(manifest["category_ids"])
            self.split = manifest["split"]
            self.ids = list(manifest["ids"])
            self.variants = tuple(manifest["variants"])
            self.root = Path(manifest["root"])
        except (KeyError, TypeError) as err:
            raise BanaError(f"{path} lacks {err} or holds it in another form: run stage 2 (or "
                            "labels.py index) again to rewrite it.") from None

    @property
    def quality(self) -> dict:
        return self.manifest.get("quality") or {}

    def available(self) -> tuple[str, ...]:
        """The variants an exporter can take: the folders', and `agreement` where Y_crf and Y_ret
        both exist."""
        derived = (AGREEMENT,) if {"Y_crf", "Y_ret"} <= set(self.variants) else ()
        return self.variants + derived

    def check_variant(self, variant: str) -> None:
        if variant not in self.available():
            raise BanaError(f"variant {variant!r} is not in {self.folder}: choose one of "
                            f"{', '.join(self.available())}.")

    def record(self, image_id: str) -> dict:
        path = record_path(self.folder, image_id)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise BanaError(f"{path} is missing: {self.folder} is incomplete; rerun stage 2 "
                            "(it resumes) or labels.py index.") from None
        except ValueError as err:
            raise BanaError(f"{path} is not a readable record ({err}): delete it and rerun stage "
                            "2 (it labels that image again) or labels.py index.") from None

    def records(self):
        for image_id in self.ids:
            yield self.record(image_id)

    def image_path(self, record: dict) -> Path:
        path = Path(record["file_name"])
        return path if path.is_absolute() else self.root / path

    def label(self, record: dict, variant: str) -> np.ndarray:
        """uint8 (H, W) class ids (255 = ignore, for `agreement`)."""
        from utils.io import read_label_png

        if variant == AGREEMENT:
            a, b = self.label(record, "Y_crf"), self.label(record, "Y_ret")
            return np.where(a == b, a, 255).astype(np.uint8)
        path = self.folder / record["labels"][variant]
        return read_label_png(path, len(self.classes), f"{variant} label",
                              (record["height"], record["width"]),
                              f"rerun stage 2 on {self.folder} (or labels.py index)")

    def instance_masks(self, record: dict, variant: str) -> np.ndarray:
        """bool (K, H, W): box k's instance (all False where it got no pixel)."""
        from pycocotools import mask as mask_utils

        height, width = record["height"], record["width"]
        if variant == AGREEMENT:
            return self.instance_masks(record, "Y_crf") & self.instance_masks(record, "Y_ret")
        masks = np.zeros((len(record["boxes"]), height, width), dtype=bool)
        for k, rle in enumerate(record["instances"][variant]):
            if rle is not None:
                masks[k] = mask_utils.decode({"size": rle["size"],
                                              "counts": rle["counts"].encode("ascii")}) > 0
        return masks

    def scores(self, record: dict, variant: str) -> list[float]:
        if variant == AGREEMENT:
            return record["scores"]["Y_crf"]
        return record["scores"][variant]

    @cached_property
    def category_names(self) -> dict[int, str]:
        """{category id: class name} of the object classes (background left out)."""
        return {cid: name for cid, name in zip(self.category_ids[1:], self.classes[1:])}


def write_manifest(folder: Path, *, classes, category_ids, split: str, root: Path,
                   variants, ids, made_by: str, quality: dict | None = None) -> Path:
    """Write labelset.json (atomically) for a folder whose records are all written."""
    from utils.io import atomic_write_json

    if len(category_ids) != len(classes):
        raise ValueError(f"{len(category_ids)} category ids for {len(classes)} classes")
    path = Path(folder) / MANIFEST
    atomic_write_json(path, {
        "format": FORMAT, "version": VERSION, "made_by": made_by, "split": split,
        "root": str(Path(os.path.abspath(root))), "classes": list(classes),
        "category_ids": [int(c) for c in category_ids], "variants": list(variants),
        "ids": list(ids), "quality": quality or {}})
    return path
