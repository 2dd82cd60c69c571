"""The dataset layouts, by DATA.DATASET: `open_data(cfg)` picks one from FORMATS, and no stage
asks which one it got (the interface: data/base.py).

Adding a layout is one module with one `data.base.DatasetFormat` subclass and one line here.
"""

from __future__ import annotations

from pathlib import Path

from data.base import (Annotation, BoxDataset, DatasetFormat, ImageDataset,  # noqa: F401
                       MaskDataset, collate_boxes, collate_masks, ensure_bg_masks)
from data.coco import COCOData
from data.voc import VOCData
from data.yolo import YOLOData

FORMATS = {
    "voc": VOCData,  # PASCAL VOC XML (VOC 2012, LabelImg, CVAT, datumaro exports)
    "coco": COCOData,  # COCO instances JSON (MS-COCO 2017, CVAT, Roboflow, labelme2coco, ...)
    "yolo": YOLOData,  # Ultralytics / Roboflow YOLO txt files with data.yaml
}


def open_data(cfg) -> DatasetFormat:
    """The dataset of DATA.DATASET at DATA.ROOT."""
    return FORMATS[cfg.DATA.DATASET](cfg.DATA, cfg.data_root)


def detect_data(root, split: str, num_classes: int | None = None, classes=(),
                class_map: str = "all", train_split: str | None = None) -> DatasetFormat:
    """The dataset at `root` when no config says which layout it has (evaluate.py's folder
    mode): the first layout whose `detect(root, split)` recognises it, VOC otherwise.
    train_split: the split whose numbering of the classes counts (DATA.SPLIT; default split)."""
    from types import SimpleNamespace

    root = Path(root)
    data_cfg = SimpleNamespace(CLASS_MAP=class_map, NUM_CLASSES=num_classes,
                               CLASSES=list(classes), SPLIT=train_split or split)
    for fmt in FORMATS.values():
        if fmt is not VOCData and fmt.detect(root, split):
            return fmt(data_cfg, root)
    return VOCData(data_cfg, root)
