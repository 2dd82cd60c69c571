"""PASCAL VOC segmentation PNGs, what VOC readers (torchvision's VOCSegmentation, mmseg,
DeepLab codebases) read.

    <out>/SegmentationClass/<id>.png    palette PNG, class ids (0 background)
    <out>/SegmentationObject/<id>.png   palette PNG, instance k of the image = k (1..K in box
                                        order, boxes without pixels skipped), 0 background
    <out>/ImageSets/Segmentation/<split>.txt   the ids
    <out>/JPEGImages -> nothing: the images stay where they are (the manifest's root)

With border=True, as VOC's own files, a 255 (void) band `border_width` pixels wide runs along
the inside of each object's outline in both PNGs. The `agreement` variant's undecided pixels are
255 in SegmentationClass (VOC's void) and 0 in SegmentationObject.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _border(ids: np.ndarray, width: int) -> np.ndarray:
    """bool (H, W): pixels of a region within `width` pixels of another region's pixel (square
    erosion of each id's mask; background 0 gets no band of its own)."""
    import cv2

    band = np.zeros(ids.shape, dtype=bool)
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    for value in np.unique(ids):
        if value in (0, 255):
            continue
        region = (ids == value).astype(np.uint8)
        band |= region.astype(bool) & ~cv2.erode(region, kernel, borderType=cv2.BORDER_REPLICATE
                                                 ).astype(bool)
    return band


def export(labels, variant: str, out: Path, border: bool = False, border_width: int = 2) -> Path:
    from utils.io import atomic_write_png, atomic_write_text
    from utils.palette import voc_palette

    out = Path(out)
    palette = voc_palette()
    for rec in labels.records():
        semantic = labels.label(rec, variant).copy()
        objects = np.zeros_like(semantic)
        n = 0
        for mask, c in zip(labels.instance_masks(rec, variant), rec["classes"]):
            # Only the pixels SegmentationClass gives the instance's class: where filled boxes
            # (Y_box) overlap, the smaller box's class wins there, and so does its object.
            mask = mask & (semantic == c)
            if mask.any():
                n += 1
                if n > 254:
                    from utils.errors import BanaError

                    raise BanaError(f"VOC export: image {rec['id']} has more than 254 instances; "
                                    "SegmentationObject PNGs hold 1..254 (255 is void). Export "
                                    "it as coco or yolo_seg.")
                objects[mask] = n
        if border:
            band = _border(objects, border_width) | _border(semantic, border_width)
            semantic[band], objects[band] = 255, 255
        name = f"{rec['id']}.png"
        atomic_write_png(out / "SegmentationClass" / name, semantic, palette=palette)
        atomic_write_png(out / "SegmentationObject" / name, objects, palette=palette)
    atomic_write_text(out / "ImageSets" / "Segmentation" / f"{labels.split}.txt",
                      "".join(f"{i}\n" for i in labels.ids))
    return out
