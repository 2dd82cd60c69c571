"""What every dataset layout shares: the `DatasetFormat` interface a layout implements, and on
top of it the torch datasets, the background masks and the checks every stage uses
(`data/datasets.py` picks the layout; no stage asks which one it got).

A layout (`DatasetFormat`: `data.voc.VOCData`, `data.coco.COCOData`, `data.yolo.YOLOData`) says,
per split and image, where things are and what the annotation holds:
- `classes`: class names, background first (reports, legends, pictures, checkpoints);
- `split_ids(split)`, `image_path(split, id)`: the images, in a fixed order;
- `annotation(split, id)`: the boxes of the class targets in pixel-edge coordinates (x1 = 0 is
  the left edge of column 0, x2 = W the right edge of the last column), their classes, the
  boxes the background mask excludes, and the image size the file records, if any;
- `gt_label(split, id)`: the semantic ground truth uint8 (H, W) (255 = ignore), or None when that
  image has none; `gt_ids(split)`: the images that have one;
- `bg_mask_path(split, id)`: where the background mask of stage 1 and 2 is kept.
Everything else is shared: the torch datasets stages 1-3 and evaluate.py read (`BoxDataset`,
`MaskDataset`, `ImageDataset`), the background masks (`ensure_bg_masks`: created on first use,
atomically, in parallel) and the checks that every file is there before work starts.

Adding a layout is one module with one `DatasetFormat` subclass and one line in
`data.datasets.FORMATS`.

Items (shape shorthand: H x W image, K boxes, L label channels):
- `BoxDataset`: id, image uint8 (3, H, W) RGB, boxes float32 (K, 5) = x1, y1, x2, y2, class,
  bg_mask uint8 (1, H, W) (1 = background, 0 = inside a box, 255 = padding after transforms),
  plus the layout's per-box columns (COCO: ann_ids, category_ids).
- `MaskDataset`: id, image, label int64 (L, H, W) (255 = ignore).
- `ImageDataset`: id, image.
"""

from __future__ import annotations

import os
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.boxes import BG_LEDGER, bg_mask_job
from utils.errors import BanaError
from utils.io import read_image, read_image_size, read_index_png, read_label_png

IGNORE_INDEX = 255
BG_MASK_DIR = "BgMaskfromBoxes"
# The smallest side an image may have: the backbones' features are 8 times smaller, and a
# 1x1 feature map holds no box beside its background (the tiny backbone's instance-normalised
# features cannot even be computed from one value).
MIN_SIDE = 9


@dataclass
class Annotation:
    """One image's annotation as a layout reads it.

    boxes float32 (K, 4) x1, y1, x2, y2 in pixel edges, as the file gives them (not clipped);
    classes int64 (K,) in 1..C-1; extras: per-box arrays (K,) carried into the items (COCO's
    ann_ids, category_ids); mask_boxes float32 (A, 4): the boxes the background mask excludes
    (default: `boxes`; COCO adds crowd regions and unmapped categories); size (H, W) the file
    records, checked against the image, or None.
    """

    boxes: np.ndarray
    classes: np.ndarray
    extras: dict = field(default_factory=dict)
    mask_boxes: np.ndarray | None = None
    size: tuple[int, int] | None = None

    @property
    def all_boxes(self) -> np.ndarray:
        return self.boxes if self.mask_boxes is None else self.mask_boxes


# What an annotation's numbers may be. Beyond these bounds a number is a typo, an overflow or
# garbage, not a measurement; each layout checks every number with `check_numbers` where it
# reads the file, so that no NaN silently turns an object into background and no 30-digit height
# reaches an OverflowError (or pycocotools' C code) in the middle of a stage.
MAX_SIDE = 2**17  # 131,072 px: the largest image side an annotation may record
MAX_COORD = 2 * MAX_SIDE  # a coordinate's largest magnitude (a box may overhang its image)
MAX_ID = 2**53  # ids and classes: integers that float64 and every JSON reader hold exactly


def check_numbers(values, source, what: str, where=None, *, integral: bool = False,
                  low: float = -MAX_COORD, high: float = MAX_COORD) -> np.ndarray:
    """`values`, N numbers or N rows of numbers as a file gives them, checked: each a finite
    number in [low, high], and an integer where `integral` (3 and 3.0 are, 3.7 is not). Returns
    them as float64 (int64 where integral), in their shape. Else a BanaError naming the file
    (`source`), the row (`where(k)`, e.g. "annotation 17"; default "entry k + 1"), `what` the
    numbers are (e.g. "bbox [x, y, w, h]") and the value, and how many rows are bad."""
    from utils.parsing import short

    where = where or (lambda k: f"entry {k + 1}")

    def fail(k: int, row, why: str, count: int = 1) -> BanaError:
        more = f" ({count} such entries in all)" if count > 1 else ""
        return BanaError(f"{source}: {where(k)} has {what} {short(row)}, {why}{more}. Fix it "
                         "(or remove it) in the file, or re-export it.")

    try:
        array = np.array(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        array = None
    if array is None or array.dtype == object:
        for k, row in enumerate(values):  # find the value that is no number, to name it
            try:
                np.array(row, dtype=np.float64)
            except (TypeError, ValueError, OverflowError):
                raise fail(k, row, "which is not a number (or too large to be one)") from None
        raise fail(0, values, "which are not numbers of one shape")
    if array.size == 0:
        return array.astype(np.int64) if integral else array
    flat = array.reshape(len(array), -1) if array.ndim else array.reshape(1, 1)
    finite = np.isfinite(flat)
    checks = [(~finite, "which is not a finite number (NaN or infinite)"),
              (finite & ((flat < low) | (flat > high)),
               f"outside [{_number(low)}, {_number(high)}], the range such a number can "
               "have")]
    if integral:
        checks.append((finite & (flat != np.round(flat)), "where an integer was expected"))
    for bad, why in checks:
        rows = bad.any(axis=1)
        if rows.any():
            k = int(np.flatnonzero(rows)[0])
            row = values[k] if isinstance(values, (list, tuple)) and array.ndim else \
                flat[k].tolist()
            raise fail(k, row, why, int(rows.sum()))
    return array.astype(np.int64) if integral else array


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


def no_boxes() -> Annotation:
    return Annotation(np.zeros((0, 4), np.float32), np.zeros(0, np.int64))


class DatasetFormat(ABC):
    """A dataset on disk in one layout (see the module doc for what a subclass implements; a
    subclass that lacks one of the abstract methods cannot be created)."""

    name = "?"
    test_split = None  # a split without ground truth whose predictions go to a server
    warn_dropped = True  # warn when boxes without area after clipping are dropped

    def __init__(self, data_cfg, root: Path):
        self.data_cfg = data_cfg
        self.root = Path(root)

    @property
    def bg_mask_root(self) -> Path:
        """The folder of the background masks: DATA.BG_MASK_DIR (relative to DATA.ROOT, or
        absolute; e.g. outside a read-only dataset), by default BgMaskfromBoxes/ under DATA.ROOT.
        Each layout keeps its own tree below it (`bg_mask_path`)."""
        where = getattr(self.data_cfg, "BG_MASK_DIR", "") or BG_MASK_DIR
        path = Path(os.path.normpath(os.path.expanduser(where)))
        return path if path.is_absolute() else self.root / path

    # What a layout implements.
    @property
    @abstractmethod
    def classes(self) -> tuple[str, ...]:
        """Class names by index, background first."""

    @abstractmethod
    def split_ids(self, split: str) -> list[str]:
        """The image ids of a split, in its order."""

    @abstractmethod
    def image_path(self, split: str, image_id: str) -> Path:
        """Where an image of the split is."""

    @abstractmethod
    def annotation(self, split: str, image_id: str) -> Annotation:
        """The image's boxes and classes, as read from its annotation."""

    @abstractmethod
    def bg_mask_path(self, split: str, image_id: str) -> Path:
        """Where the image's background mask is (written on first use)."""

    @abstractmethod
    def gt_label(self, split: str, image_id: str) -> np.ndarray | None:
        """The image's ground-truth label map, None where it has none."""

    @abstractmethod
    def gt_ids(self, split: str) -> list[str]:
        """The ids of the split's images that have a ground truth."""

    def missing_files_hint(self, what: str) -> str:
        """The fix for missing images / annotations / ground truth, in this layout's terms."""
        return f"check DATA.ROOT ({self.root}) and the layout described in the README"

    def other_numberings(self, split: str) -> dict[Path, tuple[str, ...]]:
        """Files of this dataset that number the classes in another order than `split`'s
        (file -> its class names by index). Empty where one class list serves every split; a
        format whose split files each number their own classes (COCO exports) says which differ,
        so that label maps without a record of their classes are not scored under the wrong
        numbering."""
        return {}

    def category_ids(self, split: str) -> list[int]:
        """The id each class index has in the dataset's own files (index 0, background: 0),
        which exports write: the class index itself where the files number classes that way
        (VOC, YOLO); a COCO file's category ids."""
        return list(range(len(self.classes)))

    def instance_ground_truth(self, split: str):
        """The split's instance masks as a pycocotools COCO (image ids: the integer ids), to
        score stage 2's instance masks; None where the layout has no instance masks."""
        return None

    # Shared.
    @staticmethod
    def label_name(image_id: str) -> str:
        """The file name of an image's label map (stage 2's outputs, predictions)."""
        return f"{image_id}.png"

    def has_gt(self, split: str) -> bool:
        """Every image of the split has a ground truth."""
        return len(self.gt_ids(split)) == len(self.split_ids(split))

    def box_dataset(self, split: str, transform=None) -> "BoxDataset":
        return BoxDataset(self, split, transform)

    def mask_dataset(self, split: str, label_dirs=(), gt_ids=None, transform=None,
                     only_gt: bool = False, exclude=()) -> "MaskDataset":
        return MaskDataset(self, split, label_dirs, gt_ids, transform, only_gt, exclude)

    def image_dataset(self, split: str) -> "ImageDataset":
        return ImageDataset(self, split)

    def check_images(self, split: str, ids) -> None:
        """Every image of `ids` exists, before any work starts."""
        check_files([self.image_path(split, i) for i in ids], "images",
                    self.missing_files_hint("images"))

    def annotated_size_hint(self) -> str:
        return "the image and its annotation do not belong together"


def check_files(paths: list[Path], what: str, fix: str) -> None:
    """Fail before work starts, not mid-epoch in a loader worker, when files are missing."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise BanaError(f"{len(missing)} of {len(paths)} {what} are missing, e.g. {missing[0]}: "
                        f"{fix}.")


def has_area(boxes: np.ndarray) -> np.ndarray:
    """(K,) bool: x2 > x1 and y2 > y1, however thin the box (boxes (K, >=4) x1, y1, x2, y2)."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def clip_boxes(boxes: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes float32 (K, 4) clipped to the image [0, W] x [0, H], and which keep an area (thin
    boxes are kept, as the authors keep them): (clipped (K, 4), keep (K,) bool)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    return boxes, has_area(boxes)


# The PNG modes a background mask may have: its values as PIL decodes them must be 0 or 1.
# The authors read theirs with np.array(Image.open(path)), which gives those values for a
# greyscale (L), palette (P) or 1-bit (1) PNG alike; their release does not say which it is.
BG_MASK_MODES = ("L", "P", "1")


def read_bg_mask_png(path: Path) -> np.ndarray:
    """A background mask's values as stored, uint8 (H, W) (the caller checks they are 0/1). A
    PNG of another mode (RGB, 16-bit) is refused: its values are not the mask's."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode == "1":
                return np.array(image, dtype=np.uint8)
    except (OSError, ValueError):  # a damaged file: read_index_png names it
        return read_index_png(path)
    if mode not in BG_MASK_MODES:
        raise BanaError(f"background mask {path} is a {mode} image; a background mask is a "
                        f"single-channel PNG ({', '.join(BG_MASK_MODES)} mode) holding 1 outside "
                        "every box and 0 inside: delete it, and it is made again from the boxes.")
    return read_index_png(path)


def _to_image_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def check_side(height: int, width: int, what, scales=(1.0,)) -> None:
    """An image the networks can take at every scale it is shown at (multi-scale inference
    shrinks it): its smallest side, so scaled, at least MIN_SIDE; else a BanaError naming
    `what` (the file, or "the image")."""
    import math

    smallest = min(scales)
    side = min(math.floor(height * smallest), math.floor(width * smallest))
    if side < MIN_SIDE:
        at = f"; at scale {smallest} of TEST.SCALES it is {side} pixels" if smallest != 1 else ""
        raise BanaError(f"{what} is {width}x{height}{at}: the networks need at least {MIN_SIDE} "
                        "pixels on each side (their features are 8 times smaller). Remove it, "
                        "upscale it" + (", or drop the small scales from TEST.SCALES"
                                        if smallest != 1 else "") + ".")


def read_dataset_image(fmt: DatasetFormat, split: str, image_id: str,
                       recorded: tuple[int, int] | None = None,
                       full_size: bool = True) -> np.ndarray:
    """An image of the dataset as every stage reads it (EXIF orientation applied, as viewers
    and predict.py show it), checked against the size its annotation records and against the
    smallest size the networks take. full_size: the image is used whole (stage 2, evaluation,
    validation: not cropped by a training transform), so one of more than DATA.MAX_PIXELS
    pixels is refused before it is decoded, naming the key."""
    path = fmt.image_path(split, image_id)
    limit = getattr(fmt.data_cfg, "MAX_PIXELS", 0) if full_size else 0
    if limit:
        height, width = read_image_size(path, exif=True)
        if height * width > limit:
            raise BanaError(
                f"image {path} is {width}x{height} ({height * width / 1e6:.1f} megapixels), more "
                f"than DATA.MAX_PIXELS ({limit:,}): stage 2 and evaluate.py label an image at "
                "its full size, and their memory grows with it (the README's 'Memory against "
                "image size'). Downscale the image and its boxes, or raise the limit "
                "(--opts DATA.MAX_PIXELS N; 0 = none) if the machine has the memory.")
    image = read_image(path, exif=True)
    height, width = image.shape[:2]
    if recorded is not None and tuple(recorded) != (height, width):
        raw = read_image_size(path)
        if tuple(recorded) == raw and raw == (width, height) and raw != (height, width):
            why = (f"the file's EXIF orientation turns it by 90° (stored {raw[1]}x{raw[0]}, "
                   f"shown {width}x{height}), and the annotation was made on the stored pixels. "
                   "Every stage reads images as they are shown (as predict.py does): remove the "
                   "orientation tag (e.g. `exiftool -Orientation= -n FILE`, or re-save the image "
                   "rotated) and annotate the image as shown")
        else:
            why = fmt.annotated_size_hint()
        raise BanaError(f"image {path} is {width}x{height} but its annotation says "
                        f"{recorded[1]}x{recorded[0]}: {why}.")
    check_side(height, width, f"image {path}")
    return image


def check_ids(ids, split: str) -> list[str]:
    """Image ids name output files (labels, records, masks): one that is an absolute path or
    climbs out with '..' would write outside the output folder, and is refused."""
    bad = [i for i in ids if Path(i).is_absolute() or ".." in Path(i).parts]
    if bad:
        raise BanaError(f"split '{split}' names {len(bad)} image(s) by a path that leaves its "
                        f"folder (e.g. {bad[0]!r}): an image id names the files written for it, "
                        "so it may hold sub-folders but no '..' and no leading '/'. Fix the "
                        "split's list or annotation file.")
    return list(ids)


class BoxDataset(Dataset):
    """Images with their boxes and background mask (stage 1, and stage 2 at full size)."""

    def __init__(self, fmt: DatasetFormat, split: str, transform=None):
        self.fmt, self.split, self.transform = fmt, split, transform
        self.ids = check_ids(fmt.split_ids(split), split)
        self.classes = fmt.classes
        fmt.check_images(split, self.ids)

    def image_path(self, image_id: str) -> Path:
        return self.fmt.image_path(self.split, image_id)

    def file_name(self, image_id: str) -> str:
        """The image's path relative to DATA.ROOT (absolute where it lies outside), as label
        records keep it."""
        from data.labelset import relative_name

        return relative_name(self.image_path(image_id), self.fmt.root)

    def bg_mask_path(self, image_id: str) -> Path:
        return self.fmt.bg_mask_path(self.split, image_id)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        ann = self.fmt.annotation(self.split, image_id)
        image = read_dataset_image(self.fmt, self.split, image_id, ann.size,
                                   full_size=self.transform is None)
        height, width = image.shape[:2]
        clipped, keep = clip_boxes(ann.boxes, height, width)
        if self.fmt.warn_dropped and not keep.all():
            warnings.warn(f"{self.fmt.annotation_source(self.split, image_id)}: dropped "
                          f"{int((~keep).sum())} empty or degenerate box(es) (after clipping to "
                          f"the {width}x{height} image)")
        boxes = np.concatenate([clipped[keep], ann.classes.astype(np.float32)[keep, None]], 1)
        sample = {"id": image_id, "image": _to_image_tensor(image),
                  "boxes": torch.from_numpy(boxes),
                  "bg_mask": torch.from_numpy(self._bg_mask(image_id, height, width))[None],
                  **{k: torch.from_numpy(np.asarray(v)[keep]) for k, v in ann.extras.items()}}
        return self.transform(sample) if self.transform is not None else sample

    def _bg_mask(self, image_id: str, height: int, width: int) -> np.ndarray:
        path = self.bg_mask_path(image_id)
        if not path.is_file():
            raise BanaError(f"background mask {path} not found: {bg_mask_hint(self.fmt)}.")
        mask = read_bg_mask_png(path)
        if mask.shape != (height, width) or mask.max(initial=0) > 1:
            found = (f"is {mask.shape[1]}x{mask.shape[0]} but image "
                     f"{self.image_path(image_id)} is {width}x{height}"
                     if mask.shape != (height, width) else
                     f"holds values other than 0 and 1 (e.g. {int(mask.max())}), which are the "
                     "encoding of background masks (the authors' BgMaskfromBoxes too: 1 = "
                     "background, 0 = inside a box)")
            raise BanaError(f"background mask {path} {found}: delete it, and it is made again "
                            f"from the boxes ({bg_mask_hint(self.fmt)}).")
        return mask


class MaskDataset(Dataset):
    """Images with one or more label maps: stage 3 training on pseudo labels, validation and
    evaluation on the ground truth.

    label_dirs: one folder per output channel, each holding `<label_name>` index PNGs (absolute,
    or relative to the dataset root); empty = the ground truth (every channel). Ids in `gt_ids`
    read every channel from the ground truth instead (semi-supervised training). only_gt: keep
    the images that have a ground truth (validation on a split where only some have one).
    """

    def __init__(self, fmt: DatasetFormat, split: str, label_dirs=(), gt_ids=None,
                 transform=None, only_gt: bool = False, exclude=()):
        self.fmt, self.split, self.transform = fmt, split, transform
        self.label_dirs = [fmt.root / d for d in label_dirs]  # an absolute d replaces the root
        self.gt_ids = frozenset(gt_ids or ())
        self.num_classes = len(fmt.classes)
        exclude = set(exclude)
        ids = [i for i in fmt.split_ids(split) if i not in exclude]
        if not self.label_dirs or self.gt_ids or only_gt:
            with_gt = set(fmt.gt_ids(split))
            if only_gt:
                ids = [i for i in ids if i in with_gt]
            needed = ids if not self.label_dirs else [i for i in ids if i in self.gt_ids]
            lacking = [i for i in needed if i not in with_gt]
            if lacking:
                raise BanaError(f"{len(lacking)} of {len(needed)} images of split '{split}' have "
                                f"no ground-truth mask (e.g. {', '.join(lacking[:3])}): "
                                f"{fmt.missing_files_hint('ground truth')}.")
        self.ids = ids
        fmt.check_images(split, ids)
        pseudo = [d / fmt.label_name(i) for i in ids if i not in self.gt_ids
                  for d in self.label_dirs]
        check_files(pseudo, "label files", "stage 2 writes them (`python stage2.py "
                    "--config-file CONFIG` with the same DATA.ROOT and DATA.PSEUDO_LABEL_DIR)")

    def image_path(self, image_id: str) -> Path:
        return self.fmt.image_path(self.split, image_id)

    def gt_label(self, image_id: str) -> np.ndarray:
        return self.fmt.gt_label(self.split, image_id)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = read_dataset_image(self.fmt, self.split, image_id,
                                   full_size=self.transform is None)
        height, width = image.shape[:2]
        if not self.label_dirs or image_id in self.gt_ids:
            gt = self.fmt.gt_label(self.split, image_id)
            if gt.shape != (height, width):
                raise BanaError(f"the ground truth of image {self.image_path(image_id)} is "
                                f"{gt.shape[1]}x{gt.shape[0]} but the image is {width}x{height}: "
                                f"{self.fmt.annotated_size_hint()}.")
            labels = [gt] * max(1, len(self.label_dirs))
        else:
            labels = [read_label_png(d / self.fmt.label_name(image_id), self.num_classes,
                                     "label", (height, width),
                                     "re-create it with stage 2, or check DATA.NUM_CLASSES",
                                     image=f"its image {self.image_path(image_id)}")
                      for d in self.label_dirs]
        sample = {"id": image_id, "image": _to_image_tensor(image),
                  "label": torch.from_numpy(np.stack(labels).astype(np.int64))}
        return self.transform(sample) if self.transform is not None else sample


class ImageDataset(Dataset):
    """Images of a split without labels (a test split): items {"id", "image" uint8 (3, H, W)}."""

    def __init__(self, fmt: DatasetFormat, split: str):
        self.fmt, self.split = fmt, split
        self.ids = list(fmt.split_ids(split))
        fmt.check_images(split, self.ids)

    def image_path(self, image_id: str) -> Path:
        return self.fmt.image_path(self.split, image_id)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        return {"id": image_id,
                "image": _to_image_tensor(read_dataset_image(self.fmt, self.split, image_id))}


class SkipUnreadable(Dataset):
    """`dataset`'s items, except that an image whose item cannot be made (a BanaError: a
    truncated or unreadable file, one over DATA.MAX_PIXELS, a damaged annotation) gives
    {"id": its id, "skipped": the reason} instead of stopping the run: a loop over all images
    (stage 2) records it (`utils.skips.Skips`) and goes on with the others."""

    def __init__(self, dataset):
        self.dataset, self.ids = dataset, dataset.ids

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.dataset[index]
        except BanaError as e:
            return {"id": self.ids[index], "skipped": str(e)}


def _stack(tensors: list[torch.Tensor], key: str, ids: list[str]) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise BanaError(f"cannot batch '{key}' of different sizes {sorted(shapes)} (images "
                        f"{', '.join(ids[:4])}...): use batch size 1 or a transform that crops "
                        "to a fixed size.")
    return torch.stack(tensors)


def collate_boxes(batch: list[dict]) -> dict:
    """Batch `BoxDataset` items: image uint8 (B, 3, H, W), bg_mask uint8 (B, 1, H, W), boxes a
    list of B float32 (K_b, 5) tensors, id a list of B strings."""
    ids = [s["id"] for s in batch]
    return {"id": ids, "image": _stack([s["image"] for s in batch], "image", ids),
            "boxes": [s["boxes"] for s in batch],
            "bg_mask": _stack([s["bg_mask"] for s in batch], "bg_mask", ids)}


def collate_masks(batch: list[dict]) -> dict:
    """Batch `MaskDataset` items: image uint8 (B, 3, H, W), label int64 (B, L, H, W), id list."""
    ids = [s["id"] for s in batch]
    return {"id": ids, "image": _stack([s["image"] for s in batch], "image", ids),
            "label": _stack([s["label"] for s in batch], "label", ids)}


def bg_mask_hint(fmt: DatasetFormat) -> str:
    return ("stages 1 and 2 write the missing ones themselves from the boxes; `python "
            "data/bbox_setup.py --config-file CONFIG` writes them ahead")


def _require_writable_masks(fmt: DatasetFormat, folder: Path, todo: int, split: str) -> None:
    """The masks about to be written can be: their folder, or its nearest existing parent, is
    a writable folder. A read-only dataset is told where else its masks can live."""
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.is_dir() and os.access(probe, os.W_OK | os.X_OK):
        return
    why = "is not a folder" if not probe.is_dir() else "is not writable (a read-only dataset?)"
    key = getattr(fmt.data_cfg, "BG_MASK_DIR", "")
    now = f"DATA.BG_MASK_DIR is {key!r}" if key else "DATA.BG_MASK_DIR is not set"
    raise BanaError(f"{todo} background mask(s) of split '{split}' are missing or out of date "
                    f"and cannot be written to {folder}: {probe} {why}. {now}; set it to a "
                    "writable folder to keep the masks there instead (e.g. --opts "
                    "DATA.BG_MASK_DIR /scratch/bg_masks; relative paths are under DATA.ROOT), or "
                    "write them ahead where the dataset is writable (python data/bbox_setup.py "
                    "--config-file CONFIG).")


def ensure_bg_masks(fmt: DatasetFormat, split: str, workers: int = 1, launch=None,
                    progress: bool = True) -> dict:
    """Make the background masks of `split` match the boxes (SPEC §0: 1 outside every box, 0
    inside, the image's size): masks that are missing, or that this project made from other
    boxes than today's, are written (each atomically, in `workers` processes), so an interrupted
    run resumes where it stopped and an edited annotation never leaves a stale mask behind. A
    ledger beside the masks (BG_LEDGER) records the boxes each was made from. Masks found
    without a line (e.g. the authors' released ones) are read as they are: compared with the
    boxes once, and those that differ are counted in a note, not replaced. Under torchrun / srun
    every process takes its share of the work and waits for the others' (no process group
    needed). Returns counts {"written", "kept", "total"}."""
    from utils.pool import run_all
    from utils.records import Ledger, fingerprint

    ids = fmt.split_ids(split)
    folder = fmt.bg_mask_path(split, ids[0]).parent
    ledger = Ledger(folder / BG_LEDGER)
    recorded = ledger.read()
    anns = {i: fmt.annotation(split, i) for i in ids}
    prints = {i: fingerprint(a.all_boxes, a.size) for i, a in anns.items()}
    todo = [i for i in ids if recorded.get(i, {}).get("boxes") != prints[i]
            or not fmt.bg_mask_path(split, i).is_file()]
    if not todo:
        return {"written": 0, "kept": len(ids), "total": len(ids)}
    _require_writable_masks(fmt, folder, len(todo), split)
    distributed = launch is not None and launch.distributed
    mine = todo[launch.rank::launch.world_size] if distributed else todo
    if not distributed or launch.is_main:
        print(f"Background masks of split '{split}': checking or writing {len(todo)} of "
              f"{len(ids)} under {folder}.", flush=True)
    jobs = [(fmt.bg_mask_path(split, i), anns[i].all_boxes, anns[i].size,
             fmt.image_path(split, i), i not in recorded) for i in mine]
    done = run_all(bg_mask_job, jobs, workers, "BgMaskfromBoxes", progress, chunksize=32)
    ledger.add_many({i: {"boxes": prints[i]} for i in mine})
    deadline = time.monotonic() + 3600
    while distributed and any(ledger.read().get(i, {}).get("boxes") != prints[i] for i in todo):
        if time.monotonic() > deadline:
            raise BanaError("the other processes of this run did not write their background "
                            "masks within an hour; rerun the same command.")
        time.sleep(0.5)
    written = sum(r == "written" for r in done)
    if written and (not distributed or launch.is_main):
        print(f"Background masks: {written} written from the boxes.", flush=True)
    differ = [i for i, r in zip(mine, done) if r == "differs"]
    if differ:
        print(f"note: {len(differ)} background mask(s) found in {folder} without a record differ "
              f"from what the boxes give (e.g. {differ[0]}): they are used as they are; delete "
              "them to have them made from the boxes.", flush=True)
    return {"written": written, "kept": len(ids) - written, "total": len(ids)}
