"""Masks out, in the format the next tool reads: one module per format, one function each.

    export(labels, variant, out, **options) -> Path

labels: a `data.labelset.LabelSet` (a label folder stage 2 wrote, or a folder of predictions
indexed by `python labels.py index`); variant: which masks (Y_crf, Y_ret, Y_box, agreement, or
a predictions folder's own); out: the folder to write into (created). Exporters read the label
set alone, so every input layout reaches every output format.

Adding a format is one module with an `export` function and one line in EXPORTERS.
"""

from __future__ import annotations

from pathlib import Path

from exporters import coco, voc, yolo_seg
from utils.errors import BanaError

EXPORTERS = {
    "coco": coco.export,  # COCO instances JSON: pycocotools, detectron2, mmdetection, torchvision
    "yolo_seg": yolo_seg.export,  # Ultralytics YOLO segment: labels/<split>/*.txt + data.yaml
    "voc": voc.export,  # VOC SegmentationClass / SegmentationObject palette PNGs + split list
}


def check_formats(formats) -> list[str]:
    unknown = [f for f in formats if f not in EXPORTERS]
    if unknown:
        raise BanaError(f"unknown export format(s) {', '.join(map(repr, unknown))}: choose from "
                        f"{', '.join(EXPORTERS)}.")
    return list(formats)


def run_exports(labels, formats, variant: str, out_root, options: dict | None = None) -> dict:
    """Each format of `formats` into out_root/<format>/; returns {format: what it wrote}.
    options: {format: {option: value}}."""
    labels.check_variant(variant)
    written = {}
    for name in check_formats(formats):
        path = EXPORTERS[name](labels, variant, Path(out_root) / name,
                               **(options or {}).get(name, {}))
        print(f"Export {name} ({variant}): {path}", flush=True)
        written[name] = path
    return written
