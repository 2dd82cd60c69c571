"""One interface to every dataset layout the stages read; `open_data(cfg)` picks the layout by
DATA.DATASET from a dict, and no stage asks which one it got.

A dataset (`VOCData`, `COCOData`) offers, for a split name:
- `classes`: class names, background first (reports, legends and pictures use them);
- `box_dataset(split, transform)`: items id, image uint8 (3, H, W), boxes float32 (K, 5) =
  x1, y1, x2, y2, class, bg_mask uint8 (1, H, W) — stages 1 and 2; COCO items also carry
  ann_ids and category_ids, and `writes_instances` says stage 2 should write instance masks;
- `mask_dataset(split, label_dirs, gt_ids, transform)`: items id, image, label int64 (L, H, W),
  from the label folders (stage 3) or the ground truth when `label_dirs` is empty (validation,
  evaluation);
- `image_dataset(split)`: items id, image (a split without ground truth);
- `has_gt(split)` and `gt_label(split, id)` uint8 (H, W), 255 = ignore: the semantic ground truth;
- `label_name(id)`: the file name of an image's label map, `<id>.png`;
- `test_split`: a split whose predictions go to an evaluation server (VOC's "test"), or None.

Adding a layout is one class here (or in its own module) and one entry in FORMATS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.errors import BanaError


def read_class_list(value: list[str]) -> tuple[str, ...]:
    """DATA.CLASSES: a list of names, or one path to a file with a name per line (a CVAT or
    LabelImg `labelmap.txt`: `name:colour:parts:actions` lines, `#` comments). A `background`
    entry is dropped: class 0 is always background. Empty = the 20 PASCAL VOC classes."""
    from utils.palette import VOC_CLASSES

    if not value:
        return tuple(VOC_CLASSES[1:])
    if len(value) == 1 and (Path(value[0]).is_file() or value[0].endswith(".txt")):
        path = Path(value[0])
        if not path.is_file():
            raise BanaError(f"DATA.CLASSES names the class list {path}, which does not exist: "
                            "give a file with one class name per line (CVAT/LabelImg "
                            "labelmap.txt works), or the names themselves, e.g. [cat, dog].")
        lines = [line.split("#", 1)[0].split(":", 1)[0].strip()
                 for line in path.read_text().splitlines()]
        names = [n for n in lines if n]
        source = str(path)
    else:
        names, source = [str(n).strip() for n in value], "DATA.CLASSES"
    names = [n for n in names if n.lower() != "background"]
    if not names:
        raise BanaError(f"{source} lists no class names (besides background).")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BanaError(f"{source} lists {', '.join(duplicates)} more than once.")
    return tuple(names)


def _check_num_classes(classes, num_classes: int, where: str) -> None:
    if num_classes != len(classes):
        raise BanaError(f"{where} has {len(classes) - 1} classes plus background, so "
                        f"DATA.NUM_CLASSES must be {len(classes)}, not {num_classes} "
                        f"(--opts DATA.NUM_CLASSES {len(classes)}).")


class VOCData:
    """The PASCAL VOC layout (data/voc.py) with the classes of DATA.CLASSES."""

    writes_instances = False
    test_split = "test"

    def __init__(self, data_cfg, root: Path):
        self.root = Path(root)
        self.classes = ("background", *read_class_list(data_cfg.CLASSES))
        _check_num_classes(self.classes, data_cfg.NUM_CLASSES,
                           "DATA.CLASSES" if data_cfg.CLASSES else "PASCAL VOC")

    def split_ids(self, split: str) -> list[str]:
        from data.voc import read_split

        return read_split(self.root, split)

    def box_dataset(self, split: str, transform=None):
        from data.voc import VOCBoxDataset

        return VOCBoxDataset(self.root, split, transform=transform, classes=self.classes)

    def mask_dataset(self, split: str, label_dirs=(), gt_ids=None, transform=None):
        from data.voc import VOCMaskDataset

        return VOCMaskDataset(self.root, split, label_dirs=tuple(label_dirs) or
                              ("SegmentationClassAug",), transform=transform, gt_ids=gt_ids,
                              num_classes=len(self.classes))

    def image_dataset(self, split: str):
        from data.voc import VOCImageDataset

        return VOCImageDataset(self.root, split)

    def _gt_path(self, image_id: str) -> Path:
        return self.root / "SegmentationClassAug" / f"{image_id}.png"

    def has_gt(self, split: str) -> bool:
        from data.voc import read_split

        return all(self._gt_path(i).is_file() for i in read_split(self.root, split))

    def gt_label(self, split: str, image_id: str) -> np.ndarray:
        """The checked ground truth: class values, and the size of its image (so that a
        cropped GT is blamed on the GT, not on the labels compared with it)."""
        from utils.io import read_image_size, read_label_png

        image = self.root / "JPEGImages" / f"{image_id}.jpg"
        return read_label_png(self._gt_path(image_id), len(self.classes), "ground truth",
                              read_image_size(image), "re-create it, or check DATA.NUM_CLASSES",
                              image=f"its image {image}")

    @staticmethod
    def label_name(image_id: str) -> str:
        return f"{image_id}.png"


class COCOData:
    """The COCO layout (data/coco.py): COCO 2017 with DATA.CLASS_MAP voc20 / coco80, or any
    COCO-format export with DATA.CLASS_MAP all (its own categories, numbered by id)."""

    writes_instances = True
    test_split = None

    def __init__(self, data_cfg, root: Path):
        self.root = Path(root)
        self.class_map_name = data_cfg.CLASS_MAP
        self.num_classes = data_cfg.NUM_CLASSES
        self._datasets: dict = {}
        self._instances: dict = {}
        self._classes = None

    def _checked(self, dataset):
        if self._classes is None:
            self._classes = dataset.class_map.names
            if self.num_classes is not None:
                    _check_num_classes(self._classes, self.num_classes,
                                   f"DATA.CLASS_MAP {self.class_map_name} on "
                                   f"{dataset.instances.path}")
        elif dataset.class_map.names != self._classes:
            raise BanaError(f"{dataset.instances.path} lists other categories than the annotation "
                            f"file read before it ({list(self._classes[1:])}): every split of one "
                            "dataset must list the same categories.")
        return dataset

    @property
    def classes(self) -> tuple[str, ...]:
        if self._classes is None:
            from data.coco import make_class_map

            if self.class_map_name != "all":
                return make_class_map(self.class_map_name).names
            raise RuntimeError("open a split first: the classes come from its annotation file")
        return self._classes

    def _split_instances(self, split: str):
        """The split's annotation file with its segmentations, read once per split."""
        from data.coco import load_instances

        if split not in self._instances:
            self._instances[split] = load_instances(
                self.root, split, coco2017=self.class_map_name != "all", segmentations=True)
        return self._instances[split]

    def split_ids(self, split: str) -> list[str]:
        return [str(i) for i in self._split_instances(split).image_ids.tolist()]

    def box_dataset(self, split: str, transform=None):
        from data.coco import COCOBoxDataset

        return self._checked(COCOBoxDataset(self.root, split, self.class_map_name, transform))

    def mask_dataset(self, split: str, label_dirs=(), gt_ids=None, transform=None):
        from data.coco import COCOMaskDataset

        return self._checked(COCOMaskDataset(self.root, split, self.class_map_name,
                                             label_dirs=label_dirs, transform=transform,
                                             gt_ids=gt_ids))

    def image_dataset(self, split: str):
        return self.mask_dataset(split, label_dirs=())

    def _gt(self, split: str):
        if split not in self._datasets:
            self._datasets[split] = self.mask_dataset(split)
        return self._datasets[split]

    def has_gt(self, split: str) -> bool:
        return self._split_instances(split).has_segmentation()

    def gt_label(self, split: str, image_id: str) -> np.ndarray:
        return self._gt(split).gt_label(image_id)

    @staticmethod
    def label_name(image_id: str) -> str:
        return f"{image_id}.png"


FORMATS = {"voc": VOCData, "coco": COCOData}


def open_data(cfg):
    """The dataset of DATA.DATASET at DATA.ROOT."""
    return FORMATS[cfg.DATA.DATASET](cfg.DATA, cfg.data_root)


def detect_data(root, split: str, num_classes: int | None = None, classes=(),
                class_map: str = "all"):
    """The dataset at `root` when no config says which layout it has (evaluate.py's folder
    mode): COCO where annotations/instances_<split>.json exists, VOC otherwise. num_classes None
    = what the dataset says (VOC: DATA.CLASSES or the 20 VOC classes); a VOC num_classes without
    names gets names class_1, class_2, ..."""
    from types import SimpleNamespace

    root = Path(root)
    if (root / "annotations" / f"instances_{split}.json").is_file():
        return COCOData(SimpleNamespace(CLASS_MAP=class_map, NUM_CLASSES=num_classes), root)
    names = list(classes)
    if not names and num_classes not in (None, 21):
        names = [f"class_{k}" for k in range(1, num_classes)]
    if num_classes is None:
        num_classes = len(read_class_list(names)) + 1
    return VOCData(SimpleNamespace(CLASSES=names, NUM_CLASSES=num_classes), root)
