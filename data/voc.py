"""PASCAL VOC 2012 (+ SBD) datasets: images with boxes for stage 1, images with masks for stage 3.

Layout under the root (SPEC §0), as `data/setup_voc.bash` or `data/synthetic.py` creates it:
    JPEGImages/<id>.jpg            Annotations/<id>.xml        BgMaskfromBoxes/<id>.png
    SegmentationClassAug/<id>.png  ImageSets/Segmentation/{train_aug,train,val}.txt

Shape shorthand: H × W image, K boxes, L label channels. Items are dicts of tensors:
- `VOCBoxDataset`:  id, image uint8 (3, H, W) RGB, boxes float32 (K, 5) = x1, y1, x2, y2, class,
  bg_mask uint8 (1, H, W) (1 = background, 0 = inside a box, 255 = padding after transforms).
- `VOCMaskDataset`: id, image uint8 (3, H, W) RGB, label int64 (L, H, W) (255 = ignore).
Box coordinates are pixel edges: x1 = 0 is the left edge of column 0, x2 = W the right edge of
the last column, so clipping to the image clips to [0, W] × [0, H].
"""

import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.errors import BanaError
from utils.io import read_image, read_index_png, read_label_png
from utils.palette import VOC_CLASSES

SPLIT_DIR = Path("ImageSets") / "Segmentation"
IGNORE_INDEX = 255

_MAKE_TREE = ("create it with `bash data/setup_voc.bash DATA_DIR` (PASCAL VOC) or "
              "`python data/synthetic.py --out {root}` (small synthetic dataset)")


def _make_tree_hint(root) -> str:
    return _MAKE_TREE.format(root=root)


def _bg_mask_hint(root) -> str:
    return f"create the background masks with `python data/voc_bbox_setup.py --data-root {root}`"


def check_root(root) -> Path:
    """The dataset root as a Path; a missing folder → BanaError with the commands that create it."""
    root = Path(root)
    if not root.is_dir():
        raise BanaError(f"DATA.ROOT {root} does not exist or is not a folder: {_make_tree_hint(root)}.")
    return root


def read_split(root, split: str) -> list[str]:
    """Image ids of `ImageSets/Segmentation/<split>.txt`, in file order.

    A line may also be a DeepLab-style pair "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png":
    the id is taken from the first path. Missing or empty list → BanaError naming the file.
    """
    root = check_root(root)
    path = root / SPLIT_DIR / f"{split}.txt"
    if not path.is_file():
        raise BanaError(f"split list {path} not found (split '{split}'): {_make_tree_hint(root)}.")
    ids = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if fields:
            ids.append(Path(fields[0]).stem if "/" in fields[0] else fields[0])
    if len(set(ids)) != len(ids):
        seen, twice = set(), []
        for i in ids:
            if i in seen and i not in twice:
                twice.append(i)
            seen.add(i)
        raise BanaError(f"split list {path} lists {len(twice)} image id(s) more than once "
                        f"({', '.join(twice[:5])}): each would count twice. Remove the repeats.")
    if not ids:
        raise BanaError(f"split list {path} is empty: expected one image id per line; "
                        f"{_make_tree_hint(root)}.")
    return ids


def parse_annotation(xml_path, classes=VOC_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Boxes and classes of a VOC annotation: float32 (K, 4) x1, y1, x2, y2 and int64 (K,).

    classes: the class names, background first (class k is `classes[k]`; default PASCAL VOC's,
    DATA.CLASSES for your own). The numbers are kept as the XML's floats and every object is
    kept, difficult ones too, as the reference does (SPEC §0). Unknown class name, missing or
    non-numeric coordinates, or malformed XML → BanaError naming the file.
    """
    xml_path = Path(xml_path)
    if not xml_path.is_file():
        root = xml_path.parent.parent
        raise BanaError(f"annotation {xml_path} not found: {_make_tree_hint(root)}.")
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as err:
        raise BanaError(f"annotation {xml_path} is not valid XML ({err}); re-create or "
                        "re-download it.") from None
    boxes, labels = [], []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in classes[1:]:
            fix = ("list your classes in DATA.CLASSES (names, or a labelmap.txt file)"
                   if tuple(classes) == VOC_CLASSES else "add it to DATA.CLASSES")
            raise BanaError(f"annotation {xml_path} has an object of unknown class '{name}'; "
                            f"expected one of: {', '.join(classes[1:])}. If it is a class of "
                            f"your data, {fix}.")
        try:
            box = [float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError):
            raise BanaError(f"annotation {xml_path}: object '{name}' lacks a numeric <bndbox> "
                            "with xmin, ymin, xmax, ymax.") from None
        if box[2] < box[0] or box[3] < box[1]:
            raise BanaError(f"annotation {xml_path}: object '{name}' has xmin, ymin, xmax, ymax "
                            f"= {box}, a box whose max is below its min (swapped corners?). Fix "
                            "the export; such a box would silently become background.")
        boxes.append(box)
        labels.append(classes.index(name))
    return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            np.asarray(labels, dtype=np.int64))


def has_area(boxes: np.ndarray) -> np.ndarray:
    """(K,) bool: x2 > x1 and y2 > y1, however thin the box (boxes (K, >=4) x1, y1, x2, y2)."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def clip_boxes(boxes: np.ndarray, classes: np.ndarray, height: int, width: int,
               source="") -> np.ndarray:
    """Clip boxes to the image and drop empty ones; returns float32 (K', 5) with the class.

    boxes: (K, 4), classes: (K,). Thin boxes are kept, as the authors keep them; a box without
    area after clipping (e.g.
    xmax <= xmin, or entirely outside the image) is dropped with a warning naming `source`.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    keep = has_area(boxes)
    if not keep.all():
        warnings.warn(f"{source}: dropped {int((~keep).sum())} empty or degenerate box(es) "
                      f"(after clipping to the {width}x{height} image)")
    return np.concatenate([boxes[keep], np.asarray(classes, np.float32).reshape(-1, 1)[keep]], axis=1)


def _check_files(paths: list[Path], what: str, hint) -> None:
    """Fail before training starts, not mid-epoch in a worker, when files are missing.

    hint: the fix, or a function of the first missing path that returns it.
    """
    missing = [p for p in paths if not p.is_file()]
    if missing:
        fix = hint(missing[0]) if callable(hint) else hint
        raise BanaError(f"{len(missing)} of {len(paths)} {what} are missing, e.g. {missing[0]}: {fix}.")


def _to_image_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


class VOCBoxDataset(Dataset):
    """Images with their boxes and background mask (stage 1, and stage 2 at full size)."""

    def __init__(self, root, split: str, transform=None, classes=VOC_CLASSES):
        self.root = check_root(root)
        self.split = split
        self.ids = read_split(self.root, split)
        self.transform = transform
        self.classes = tuple(classes)
        _check_files([self.image_path(i) for i in self.ids], "images", _make_tree_hint(self.root))
        _check_files([self.xml_path(i) for i in self.ids], "annotations", _make_tree_hint(self.root))
        _check_files([self.bg_mask_path(i) for i in self.ids], "background masks",
                     _bg_mask_hint(self.root))

    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def xml_path(self, image_id: str) -> Path:
        return self.root / "Annotations" / f"{image_id}.xml"

    def bg_mask_path(self, image_id: str) -> Path:
        return self.root / "BgMaskfromBoxes" / f"{image_id}.png"

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = read_image(self.image_path(image_id))
        height, width = image.shape[:2]
        boxes, classes = parse_annotation(self.xml_path(image_id), self.classes)
        boxes = clip_boxes(boxes, classes, height, width, source=self.xml_path(image_id))
        bg_path = self.bg_mask_path(image_id)
        if not bg_path.is_file():
            raise BanaError(f"background mask {bg_path} not found: {_bg_mask_hint(self.root)}.")
        bg_mask = read_index_png(bg_path)
        if bg_mask.shape != (height, width):
            raise BanaError(
                f"background mask {bg_path} is {bg_mask.shape[1]}x{bg_mask.shape[0]} but image "
                f"{self.image_path(image_id)} is {width}x{height}: delete BgMaskfromBoxes/ and "
                f"re-create it with `python data/voc_bbox_setup.py --data-root {self.root}`.")
        if bg_mask.max(initial=0) > 1:
            raise BanaError(f"background mask {bg_path} holds values other than 0 and 1: "
                            f"re-create it with `python data/voc_bbox_setup.py --data-root {self.root}`.")
        sample = {
            "id": image_id,
            "image": _to_image_tensor(image),
            "boxes": torch.from_numpy(boxes),
            "bg_mask": torch.from_numpy(bg_mask)[None],
        }
        return self.transform(sample) if self.transform is not None else sample


class VOCMaskDataset(Dataset):
    """Images with one or more label maps (stage 3 training on pseudo labels, evaluation on GT).

    label_dirs: one folder per output channel, absolute (e.g. `<ROOT>/Generation/Y_crf`) or
    relative to root; each holds `<id>.png` index PNGs. Ids in `gt_ids` read every channel from
    `gt_dir` instead (semi-supervised training: the GT mask stands in for every pseudo label).
    """

    def __init__(self, root, split: str, label_dirs=("SegmentationClassAug",), transform=None,
                 gt_ids=None, gt_dir="SegmentationClassAug", num_classes: int = 21):
        self.root = check_root(root)
        self.split = split
        self.ids = read_split(self.root, split)
        self.label_dirs = [self.root / d for d in label_dirs]  # an absolute d replaces the root
        if not self.label_dirs:
            raise ValueError("label_dirs must name at least one folder")
        self.gt_dir = self.root / gt_dir
        self.gt_ids = frozenset(gt_ids or ())
        self.num_classes = num_classes
        self.transform = transform
        _check_files([self.image_path(i) for i in self.ids], "images", _make_tree_hint(self.root))
        _check_files([p for i in self.ids for p in self.label_paths(i)], "label files",
                     lambda path: self._label_hint(path.parent))

    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def label_paths(self, image_id: str) -> list[Path]:
        dirs = [self.gt_dir] * len(self.label_dirs) if image_id in self.gt_ids else self.label_dirs
        return [d / f"{image_id}.png" for d in dirs]

    def _label_hint(self, folder: Path) -> str:
        if folder.name in ("SegmentationClassAug", "SegmentationClass") and folder.parent == self.root:
            return _make_tree_hint(self.root)
        return (f"{folder} should hold pseudo labels; stage 2 writes them "
                "(`python stage2.py --config-file CONFIG`)")

    def __len__(self) -> int:
        return len(self.ids)

    def _read_label(self, path: Path, image_path: Path, height: int, width: int) -> np.ndarray:
        is_gt = path.parent == self.gt_dir
        return read_label_png(path, self.num_classes, "ground truth" if is_gt else "label",
                              (height, width), f"re-create the label ({self._label_hint(path.parent)}), "
                              "or check DATA.NUM_CLASSES", image=f"its image {image_path}")

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image_path = self.image_path(image_id)
        image = read_image(image_path)
        height, width = image.shape[:2]
        labels = [self._read_label(p, image_path, height, width) for p in self.label_paths(image_id)]
        sample = {
            "id": image_id,
            "image": _to_image_tensor(image),
            "label": torch.from_numpy(np.stack(labels).astype(np.int64)),
        }
        return self.transform(sample) if self.transform is not None else sample


class VOCImageDataset(Dataset):
    """Images of a split without labels (VOC test): items {"id", "image" uint8 (3, H, W)}."""

    def __init__(self, root, split: str):
        self.root = check_root(root)
        self.ids = read_split(self.root, split)
        _check_files([self.image_path(i) for i in self.ids], "images", _make_tree_hint(self.root))

    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        return {"id": image_id, "image": _to_image_tensor(read_image(self.image_path(image_id)))}


def _stack(tensors: list[torch.Tensor], key: str, ids: list[str]) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise BanaError(f"cannot batch '{key}' of different sizes {sorted(shapes)} (images "
                        f"{', '.join(ids[:4])}...): use batch size 1 or a transform that crops "
                        "to a fixed size.")
    return torch.stack(tensors)


def collate_boxes(batch: list[dict]) -> dict:
    """Batch `VOCBoxDataset` items: image uint8 (B, 3, H, W), bg_mask uint8 (B, 1, H, W),
    boxes a list of B float32 (K_b, 5) tensors, id a list of B strings."""
    ids = [s["id"] for s in batch]
    return {
        "id": ids,
        "image": _stack([s["image"] for s in batch], "image", ids),
        "boxes": [s["boxes"] for s in batch],
        "bg_mask": _stack([s["bg_mask"] for s in batch], "bg_mask", ids),
    }


def collate_masks(batch: list[dict]) -> dict:
    """Batch `VOCMaskDataset` items: image uint8 (B, 3, H, W), label int64 (B, L, H, W), id list."""
    ids = [s["id"] for s in batch]
    return {
        "id": ids,
        "image": _stack([s["image"] for s in batch], "image", ids),
        "label": _stack([s["label"] for s in batch], "label", ids),
    }
