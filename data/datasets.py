"""Dataset choice by name: the box datasets stages 1 and 2 read (`DATA.DATASET`)."""

from __future__ import annotations


def box_dataset(name: str, root, split: str, class_map: str = "voc20", transform=None):
    """`VOCBoxDataset` or `COCOBoxDataset` (boxes in `class_map`'s class ids); both yield items
    with id, image, boxes (K, 5) and bg_mask, so the stages never ask which one they got."""
    if name == "coco":
        from data.coco import COCOBoxDataset

        return COCOBoxDataset(root, split, class_map=class_map, transform=transform)
    if name == "voc":
        from data.voc import VOCBoxDataset

        return VOCBoxDataset(root, split, transform=transform)
    raise ValueError(f"unknown dataset {name!r}; expected 'voc' or 'coco'")
