"""MS-COCO 2017 instances as box supervision: classes, class maps, and the box dataset of stages 1–2.

Layout under the root, as the COCO download or `data/synthetic_coco.py` creates it:
    train2017/<file_name>    val2017/<file_name>    annotations/instances_{train2017,val2017}.json
    BgMaskfromBoxes/{train2017,val2017}/<image_id>.png   (written by data/coco_bbox_setup.py)
The background masks are named by the integer image id without zero padding ("397133.png"), the
same string as a dataset item's `id`, so stage 2 can name its outputs `<id>.png` as on VOC.

Classes. Index 0 is background. `class_map="coco80"` numbers the 80 COCO categories 1..80 in
category-id order; `class_map="voc20"` keeps the 20 categories VOC shares, numbered as VOC does
(`utils.palette.VOC_CLASSES`), so a classifier trained on VOC labels COCO images directly.

Which annotations do what (one rule for every image):
- The background mask is 1 outside EVERY annotation box of the image, crowd and unmapped
  categories included, and 0 inside any of them. A crowd box (a crowd of people, a pile of books)
  or a giraffe under voc20 is an object, not background: counting it as background would put
  object features into the background prototypes of stages 1 and 2. This also makes the mask
  independent of the class map, so one set of files serves voc20 and coco80.
- The class targets (`boxes`) are the non-crowd boxes of mapped categories only. Crowd boxes are
  dropped as COCO's own evaluation treats them: regions to ignore, not instances.
- Images without any kept box stay in the dataset: their items have zero boxes.

Shape shorthand: H × W image, K kept boxes. `COCOBoxDataset` items have the format of
`data.voc.VOCBoxDataset` plus two columns for instance results:
    id str (the image id), image uint8 (3, H, W) RGB, boxes float32 (K, 5) = x1, y1, x2, y2, class
    (class in the class map's numbering), bg_mask uint8 (1, H, W) (1 = background, 0 = in a box),
    ann_ids int64 (K,) (COCO annotation id of each box), category_ids int64 (K,) (its COCO
    category id).
COCO's bbox [x, y, w, h] becomes x1 = x, y1 = y, x2 = x + w, y2 = y + h (pixel edges, as on VOC).
A transform that drops boxes must drop the same rows of `ann_ids` and `category_ids`.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data.voc import has_area
from utils.errors import BanaError
from utils.io import read_image, read_index_png
from utils.palette import VOC_CLASSES

# (category id, name) of the 80 COCO 2014/2017 detection categories; the ids have gaps.
COCO_CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
COCO80 = tuple(name for _, name in COCO_CATEGORIES)
COCO80_IDS = tuple(cat_id for cat_id, _ in COCO_CATEGORIES)
COCO_NAME_BY_ID = dict(COCO_CATEGORIES)
COCO_ID_BY_NAME = {name: cat_id for cat_id, name in COCO_CATEGORIES}
# Category id -> contiguous index 1..80 (0 is background) and back.
COCO80_INDEX = {cat_id: index for index, cat_id in enumerate(COCO80_IDS, start=1)}

# COCO names of the 20 categories VOC shares, where VOC spells them differently.
_VOC_NAME_OF_COCO = {
    "airplane": "aeroplane", "dining table": "diningtable", "motorcycle": "motorbike",
    "potted plant": "pottedplant", "couch": "sofa", "tv": "tvmonitor",
}
_SHARED = ("airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
           "dining table", "dog", "horse", "motorcycle", "person", "potted plant", "sheep", "couch",
           "train", "tv")
# COCO category id -> VOC class index 1..20 for the 20 shared categories.
VOC20_FROM_COCO = {COCO_ID_BY_NAME[name]: VOC_CLASSES.index(_VOC_NAME_OF_COCO.get(name, name))
                   for name in _SHARED}

CLASS_MAPS = ("voc20", "coco80", "all")
SPLITS = ("train2017", "val2017")


@dataclass(frozen=True)
class ClassMap:
    """Which COCO categories a model predicts, and as which class index (0 = background).

    names: class names, background first; index: category id -> class index 1..K.
    """

    name: str
    names: tuple[str, ...]
    index: dict

    @property
    def category_ids(self) -> list[int]:
        """The category ids the model can predict, hence the ones to evaluate."""
        return sorted(self.index)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def category_ids_by_index(self) -> list[int]:
        """The category id of class index 1..K (background excluded), in index order."""
        by_index = {k: cat_id for cat_id, k in self.index.items()}
        return [by_index[k] for k in range(1, len(self.names))]


def check_class_map(class_map: str) -> str:
    if class_map not in CLASS_MAPS:
        raise BanaError(f"unknown class map {class_map!r}: DATA.CLASS_MAP must be one of "
                        f"{', '.join(CLASS_MAPS)}.")
    return class_map


def make_class_map(class_map: str, categories=None) -> ClassMap:
    """voc20 (the 20 VOC categories, numbered as VOC), coco80 (the 80 COCO 2017 categories in
    id order), or all: every category of `categories` [(id, name), ...] numbered 1..K in
    ascending id order, whatever the ids and names (a user's own export)."""
    if check_class_map(class_map) == "voc20":
        return ClassMap("voc20", tuple(VOC_CLASSES), dict(VOC20_FROM_COCO))
    if class_map == "coco80":
        return ClassMap("coco80", ("background",) + COCO80, dict(COCO80_INDEX))
    ordered = sorted(categories or ())
    return ClassMap("all", ("background",) + tuple(name for _, name in ordered),
                    {cat_id: k for k, (cat_id, _) in enumerate(ordered, start=1)})


def class_index(class_map: str) -> dict[int, int]:
    """COCO category id -> class index (1..20 in VOC order for voc20, 1..80 for coco80)."""
    return make_class_map(class_map).index


def class_names(class_map: str) -> tuple[str, ...]:
    """Names of the class indices, background first: 21 names for voc20, 81 for coco80."""
    return make_class_map(class_map).names


def evaluated_category_ids(class_map: str) -> list[int]:
    """The COCO category ids a model with this class map can predict, hence the ones to evaluate."""
    return make_class_map(class_map).category_ids


def annotation_path(root, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def make_tree_hint(root) -> str:
    return ("download the COCO 2017 images and annotations from https://cocodataset.org "
            "(train2017.zip, val2017.zip, annotations_trainval2017.zip) and unpack them into "
            f"{root}, or write a small synthetic tree with "
            f"`python data/synthetic.py --format coco --out {root}`")


def bg_mask_hint(root) -> str:
    return f"create the background masks with `python data/coco_bbox_setup.py --data-root {root}`"


@dataclass
class CocoInstances:
    """The boxes of one annotation file, compact: flat arrays grouped by image.

    Shape shorthand: N images, A annotations. Annotations of image n are rows
    offsets[n]:offsets[n + 1] of the A-long arrays, in file order.
    """

    path: Path
    image_ids: np.ndarray  # int64 (N,)
    file_names: list[str]  # (N,)
    heights: np.ndarray  # int64 (N,)
    widths: np.ndarray  # int64 (N,)
    offsets: np.ndarray  # int64 (N + 1,)
    boxes: np.ndarray  # float32 (A, 4) = x1, y1, x2, y2
    category_ids: np.ndarray  # int64 (A,)
    ann_ids: np.ndarray  # int64 (A,)
    iscrowd: np.ndarray  # bool (A,)
    categories: list  # [(category id, name)] in id order
    # The `segmentation` of each annotation (polygons or RLE; None where absent), in the order of
    # the arrays above; only loaded when asked for (it is large on train2017).
    segmentations: list | None = None

    def has_segmentation(self) -> bool:
        """Every non-crowd annotation has a segmentation (and there is at least one)."""
        if self.segmentations is None or not len(self.ann_ids):
            return False
        return all(seg is not None for seg, crowd in zip(self.segmentations, self.iscrowd)
                   if not crowd)

    def rows(self, n: int) -> slice:
        return slice(int(self.offsets[n]), int(self.offsets[n + 1]))


def _bad(path: Path, what: str) -> BanaError:
    return BanaError(f"{path} is not a valid COCO instances file: {what}. Re-export it (or "
                     "re-download annotations_trainval2017.zip for MS-COCO).")


def _check_categories(path: Path, categories, coco2017: bool) -> list:
    """[(id, name)] of the file's categories in id order. With coco2017, each must be the COCO
    2017 category of that id (the voc20 and coco80 maps number COCO's own categories)."""
    try:
        pairs = sorted((int(c["id"]), str(c["name"])) for c in categories)
    except (KeyError, TypeError, ValueError) as err:
        raise _bad(path, f"a category lacks an integer id or a name ({err!r})") from None
    ids = [cat_id for cat_id, _ in pairs]
    if len(set(ids)) != len(ids):
        raise _bad(path, "two categories share an id")
    for cat_id, name in pairs if coco2017 else ():
        if COCO_NAME_BY_ID.get(cat_id) != name:
            expected = COCO_NAME_BY_ID.get(cat_id, "no category (ids are those of COCO 2017)")
            raise BanaError(f"{path} lists category id {cat_id} as {name!r}, but COCO 2017 has "
                            f"{expected!r} there: DATA.CLASS_MAP voc20 and coco80 number the 80 "
                            "COCO 2017 categories; for your own categories set DATA.CLASS_MAP all.")
    return pairs


def load_instances(root, split: str, coco2017: bool = True,
                   segmentations: bool = False) -> CocoInstances:
    """Read annotations/instances_<split>.json into `CocoInstances`.

    Only what box supervision needs is kept (segmentations only with `segmentations`), so the
    full train2017 file (860k annotations) shrinks from gigabytes of Python objects to a few tens
    of megabytes of arrays. coco2017: the categories must be COCO 2017's (the voc20 and coco80
    class maps); otherwise any categories. Missing or malformed file, an annotation whose
    category or image is not listed, a bbox without area or outside its image → BanaError
    naming the file and the annotation.
    """
    root = Path(root)
    if not root.is_dir():
        raise BanaError(f"DATA.ROOT {root} does not exist or is not a folder: "
                        f"{make_tree_hint(root)}.")
    path = annotation_path(root, split)
    if not path.is_file():
        raise BanaError(f"annotation file {path} not found (split '{split}'): "
                        f"{make_tree_hint(root)}.")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _bad(path, f"invalid JSON ({err})") from None
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations")):
        raise _bad(path, "expected a JSON object with 'images' and 'annotations'")
    categories = _check_categories(path, data.get("categories", []), coco2017)
    try:
        images = sorted(data["images"], key=lambda im: im["id"])
        image_ids = np.array([im["id"] for im in images], dtype=np.int64)
        file_names = [str(im["file_name"]) for im in images]
        heights = np.array([im["height"] for im in images], dtype=np.int64)
        widths = np.array([im["width"] for im in images], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as err:
        raise _bad(path, "an image entry lacks a valid id, file_name, height or width "
                         f"({err!r})") from None
    if not len(image_ids):
        raise _bad(path, "'images' is empty")
    if len(np.unique(image_ids)) != len(image_ids):
        raise _bad(path, "two image entries share an id")
    anns = data["annotations"]
    try:
        ann_image = np.array([a["image_id"] for a in anns], dtype=np.int64)
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        category_ids = np.array([a["category_id"] for a in anns], dtype=np.int64)
        ann_ids = np.array([a["id"] for a in anns], dtype=np.int64)
        iscrowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    except (KeyError, TypeError, ValueError) as err:
        raise _bad(path, "an annotation lacks a valid image_id, bbox [x, y, w, h], category_id "
                         f"or id ({err!r})") from None
    # voc20 / coco80 number COCO 2017's own categories; `all` numbers what the file lists.
    listed = set(COCO80_IDS) if coco2017 else {cat_id for cat_id, _ in categories}
    unknown = sorted(set(category_ids.tolist()) - listed)
    if unknown:
        first = int(ann_ids[np.isin(category_ids, unknown)][0])
        raise _bad(path, f"annotation {first} has category id {unknown[0]}, which is not in "
                         f"'categories' (ids {sorted(listed)[:12]}); "
                         f"{len(unknown)} unlisted category id(s) in all")
    if len(np.unique(ann_ids)) != len(ann_ids):
        raise _bad(path, "two annotations share an id")
    image_index = np.searchsorted(image_ids, ann_image)
    known = image_index < len(image_ids)
    known[known] = image_ids[image_index[known]] == ann_image[known]
    if not known.all():
        first = int(np.flatnonzero(~known)[0])
        raise _bad(path, f"annotation {int(ann_ids[first])} refers to image "
                         f"{int(ann_image[first])}, which is not in 'images'")
    _check_boxes(path, xywh, ann_ids, heights[image_index], widths[image_index])
    order = np.argsort(image_index, kind="stable")
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)[order]
    return CocoInstances(
        path=path, image_ids=image_ids, file_names=file_names, heights=heights, widths=widths,
        offsets=np.concatenate([[0], np.cumsum(np.bincount(image_index, minlength=len(image_ids)))]
                               ).astype(np.int64),
        boxes=boxes.astype(np.float32), category_ids=category_ids[order], ann_ids=ann_ids[order],
        iscrowd=iscrowd[order], categories=categories,
        segmentations=[anns[k].get("segmentation") or None for k in order.tolist()]
        if segmentations else None)


# A bbox may overhang its image by this much (rounding in exporters) before it is an error.
_BOX_TOLERANCE = 1.0


def _check_boxes(path: Path, xywh: np.ndarray, ann_ids: np.ndarray, heights: np.ndarray,
                 widths: np.ndarray) -> None:
    """Every bbox [x, y, w, h] has w, h > 0 and lies in its image (within _BOX_TOLERANCE)."""
    x, y, w, h = xywh.T
    empty = ~((w > 0) & (h > 0))
    outside = ((x < -_BOX_TOLERANCE) | (y < -_BOX_TOLERANCE)
               | (x + w > widths + _BOX_TOLERANCE) | (y + h > heights + _BOX_TOLERANCE))
    for bad, what in ((empty, "a width or height that is not positive"),
                      (outside, "a part outside its image")):
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise _bad(path, f"annotation {int(ann_ids[k])} has bbox {xywh[k].tolist()} with "
                             f"{what} (image {int(widths[k])}x{int(heights[k])}); "
                             f"{int(bad.sum())} such annotation(s) in all. Fix or remove them in "
                             "the export")


def kept_boxes(boxes: np.ndarray, category_ids: np.ndarray, iscrowd: np.ndarray, height: int,
               width: int, class_map) -> tuple[np.ndarray, np.ndarray]:
    """The class targets among one image's annotations.

    boxes float32 (A, 4) x1, y1, x2, y2; category_ids int (A,); iscrowd bool (A,). Returns
    (boxes float32 (K, 5) = clipped x1, y1, x2, y2, class index, keep int64 (K,) = the rows of the
    input they come from). Dropped: crowd boxes, categories outside the class map, and boxes
    without area after clipping (quietly: COCO has a few). Thin boxes are kept, as the authors
    keep them.
    """
    mapping = (class_map if isinstance(class_map, ClassMap) else make_class_map(class_map)).index
    clipped = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
    classes = np.array([mapping.get(int(c), 0) for c in category_ids], dtype=np.float32)
    keep = (classes > 0) & ~np.asarray(iscrowd, bool) & has_area(clipped)
    keep = np.flatnonzero(keep)
    return np.concatenate([clipped[keep], classes[keep, None]], axis=1), keep


def _check_files(paths: list[Path], what: str, fix: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise BanaError(f"{len(missing)} of {len(paths)} {what} are missing, e.g. {missing[0]}: "
                        f"{fix}.")


class COCOBoxDataset(Dataset):
    """COCO images with their boxes (in the class map's numbering) and background mask.

    split: "train2017" or "val2017" (any name with annotations/instances_<split>.json works).
    Every image of the annotation file is an item, in image-id order.
    """

    def __init__(self, root, split: str, class_map: str = "voc20", transform=None):
        named = check_class_map(class_map) != "all"
        self.instances = load_instances(root, split, coco2017=named)
        self.class_map = make_class_map(class_map, self.instances.categories)
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.ids = [str(i) for i in self.instances.image_ids.tolist()]
        self._index = {image_id: n for n, image_id in enumerate(self.ids)}
        _check_files([self.image_path(i) for i in self.ids], "images", make_tree_hint(self.root))
        _check_files([self.bg_mask_path(i) for i in self.ids], "background masks",
                     bg_mask_hint(self.root))

    @property
    def annotation_file(self) -> Path:
        return self.instances.path

    @property
    def num_classes(self) -> int:
        return self.class_map.num_classes

    def image_path(self, image_id: str) -> Path:
        return self.root / self.split / self.instances.file_names[self._index[image_id]]

    def bg_mask_path(self, image_id: str) -> Path:
        return self.root / "BgMaskfromBoxes" / self.split / f"{image_id}.png"

    def __len__(self) -> int:
        return len(self.ids)

    def _read_bg_mask(self, image_id: str, height: int, width: int) -> np.ndarray:
        path = self.bg_mask_path(image_id)
        if not path.is_file():
            raise BanaError(f"background mask {path} not found: {bg_mask_hint(self.root)}.")
        bg_mask = read_index_png(path)
        if bg_mask.shape != (height, width) or bg_mask.max(initial=0) > 1:
            found = (f"is {bg_mask.shape[1]}x{bg_mask.shape[0]}, the image {width}x{height}"
                     if bg_mask.shape != (height, width) else "holds values other than 0 and 1")
            raise BanaError(f"background mask {path} {found}: delete it and re-create it with "
                            f"`python data/coco_bbox_setup.py --data-root {self.root}`.")
        return bg_mask

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        inst = self.instances
        image_path = self.image_path(image_id)
        image = read_image(image_path)
        height, width = image.shape[:2]
        if (height, width) != (inst.heights[index], inst.widths[index]):
            raise BanaError(f"image {image_path} is {width}x{height} but {inst.path} says "
                            f"{inst.widths[index]}x{inst.heights[index]}: the image and the "
                            "annotation file do not belong together; re-download them.")
        rows = inst.rows(index)
        boxes, keep = kept_boxes(inst.boxes[rows], inst.category_ids[rows], inst.iscrowd[rows],
                                 height, width, self.class_map)
        sample = {
            "id": image_id,
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "boxes": torch.from_numpy(boxes),
            "bg_mask": torch.from_numpy(self._read_bg_mask(image_id, height, width))[None],
            "ann_ids": torch.from_numpy(inst.ann_ids[rows][keep]),
            "category_ids": torch.from_numpy(inst.category_ids[rows][keep]),
        }
        return self.transform(sample) if self.transform is not None else sample


def rasterise_semantic(height: int, width: int, boxes_area, classes, crowd, segmentations,
                       ignore: int = 255) -> np.ndarray:
    """A semantic label map uint8 (H, W) from one image's instance segmentations.

    classes (A,): each annotation's class index, 0 for a category the class map does not
    predict; crowd (A,) bool; segmentations (A,): polygons or RLE. Rules: instances are painted
    from the largest area down (where two overlap, the smaller, usually in front, wins); an
    instance of an unpredicted category and every crowd region is `ignore` (neither background
    nor a class: the model cannot be right or wrong there), painted last so it overrides.
    """
    from pycocotools import mask as mask_utils

    label = np.zeros((height, width), np.uint8)
    order = np.argsort(-np.asarray(boxes_area, np.float64), kind="stable")
    ignored = np.zeros((height, width), bool)
    for k in order.tolist():
        seg = segmentations[k]
        if seg is None:
            continue
        if isinstance(seg, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        elif isinstance(seg.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = seg
        mask = mask_utils.decode(rle).astype(bool)
        if crowd[k] or classes[k] == 0:
            ignored |= mask
        else:
            label[mask] = classes[k]
    label[ignored] = ignore
    return label


class COCOMaskDataset(Dataset):
    """COCO images with label maps: pseudo labels from `label_dirs` (`<dir>/<image id>.png`), or
    the semantic ground truth rasterised from the instance segmentations (`rasterise_semantic`)
    when `label_dirs` is empty or for the ids in `gt_ids`.

    Items as `data.voc.VOCMaskDataset`'s: id, image uint8 (3, H, W), label int64 (L, H, W).
    """

    def __init__(self, root, split: str, class_map: str = "voc20", label_dirs=(),
                 transform=None, gt_ids=None):
        named = check_class_map(class_map) != "all"
        self.root = Path(root)
        self.split = split
        self.label_dirs = [self.root / d for d in label_dirs]
        self.gt_ids = frozenset(gt_ids or ())
        needs_gt = not self.label_dirs or bool(self.gt_ids)
        self.instances = load_instances(root, split, coco2017=named, segmentations=needs_gt)
        self.class_map = make_class_map(class_map, self.instances.categories)
        if needs_gt and not self.instances.has_segmentation():
            raise BanaError(
                f"split '{split}' has no segmentation masks in {self.instances.path} (every "
                "non-crowd annotation needs a 'segmentation'), so there is no ground truth to "
                "score or to train on. Train on its pseudo labels, and evaluate on a split "
                "whose annotations have masks.")
        self.transform = transform
        self.ids = [str(i) for i in self.instances.image_ids.tolist()]
        self._index = {image_id: n for n, image_id in enumerate(self.ids)}
        _check_files([self.image_path(i) for i in self.ids], "images", make_tree_hint(self.root))
        pseudo = [d / f"{i}.png" for i in self.ids if i not in self.gt_ids for d in self.label_dirs]
        _check_files(pseudo, "label files", "stage 2 writes them (`python stage2.py "
                     "--config-file CONFIG` with the same DATA.ROOT and DATA.PSEUDO_LABEL_DIR)")

    @property
    def num_classes(self) -> int:
        return self.class_map.num_classes

    def image_path(self, image_id: str) -> Path:
        return self.root / self.split / self.instances.file_names[self._index[image_id]]

    def gt_label(self, image_id: str) -> np.ndarray:
        """uint8 (H, W): the semantic ground truth of one image (255 = ignore)."""
        n = self._index[image_id]
        inst, rows = self.instances, self.instances.rows(n)
        boxes = inst.boxes[rows]
        classes = [self.class_map.index.get(int(c), 0) for c in inst.category_ids[rows]]
        return rasterise_semantic(int(inst.heights[n]), int(inst.widths[n]),
                                  (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
                                  classes, inst.iscrowd[rows], inst.segmentations[rows])

    def __len__(self) -> int:
        return len(self.ids)

    def _read_label(self, path: Path, image_path: Path, height: int, width: int) -> np.ndarray:
        label = read_index_png(path)
        if label.shape != (height, width):
            raise BanaError(f"label {path} is {label.shape[1]}x{label.shape[0]} but image "
                            f"{image_path} is {width}x{height}; labels must match their image: "
                            "re-create it with stage 2.")
        bad = np.unique(label[(label >= self.num_classes) & (label != 255)])
        if bad.size:
            raise BanaError(f"label {path} holds values {bad[:10].tolist()}, outside the classes "
                            f"0..{self.num_classes - 1} and the ignore value 255: re-create it "
                            "with stage 2, or check DATA.CLASS_MAP / DATA.NUM_CLASSES.")
        return label

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image_path = self.image_path(image_id)
        image = read_image(image_path)
        height, width = image.shape[:2]
        if not self.label_dirs or image_id in self.gt_ids:
            gt = self.gt_label(image_id)
            if gt.shape != (height, width):
                raise BanaError(f"image {image_path} is {width}x{height} but "
                                f"{self.instances.path} says {gt.shape[1]}x{gt.shape[0]}: the "
                                "image and the annotation file do not belong together.")
            labels = [gt] * max(1, len(self.label_dirs))
        else:
            labels = [self._read_label(d / f"{image_id}.png", image_path, height, width)
                      for d in self.label_dirs]
        sample = {"id": image_id,
                  "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                  "label": torch.from_numpy(np.stack(labels).astype(np.int64))}
        return self.transform(sample) if self.transform is not None else sample


class COCOInstanceDataset(Dataset):
    """Images with instance targets for Mask R-CNN, from a COCO instances file.

    annotation_file: the split's own file (masks "gt": its segmentations; "box": each box
    filled) or stage 2's annotations_<Y_crf|Y_ret>.json (its pseudo masks). Crowd annotations,
    categories outside the class map and empty masks are left out. Items: id, image uint8
    (3, H, W), boxes float32 (N, 4) x1, y1, x2, y2, labels int64 (N,) class indices, masks uint8
    (N, H, W). flip: mirror image and targets with probability 0.5 (training).
    """

    def __init__(self, root, split: str, annotation_file, class_map, masks: str = "gt",
                 flip: bool = False):
        from utils.coco_eval import load_ground_truth

        self.root, self.split, self.masks, self.flip = Path(root), split, masks, flip
        self.class_map = class_map
        self.annotation_file = Path(annotation_file)
        if not self.annotation_file.is_file():
            raise BanaError(f"instance masks {self.annotation_file} not found: stage 2 writes "
                            "annotations_Y_crf.json and annotations_Y_ret.json on a COCO-layout "
                            "split (`python stage2.py --config-file CONFIG` with the same "
                            "DATA.ROOT, DATA.SPLIT and DATA.PSEUDO_LABEL_DIR).")
        self.coco = load_ground_truth(self.annotation_file)
        self.ids = [str(i) for i in sorted(self.coco.getImgIds())]
        if masks == "gt":
            anns = [a for a in self.coco.dataset.get("annotations", []) if not a.get("iscrowd")]
            if not anns or any(not a.get("segmentation") for a in anns):
                raise BanaError(f"{self.annotation_file} has annotations without a segmentation: "
                                "MODEL.INSTANCE_MASKS gt needs the split's own masks; use Y_crf, "
                                "Y_ret or box.")
        _check_files([self.image_path(i) for i in self.ids], "images", make_tree_hint(self.root))

    def image_path(self, image_id: str) -> Path:
        return self.root / self.split / self.coco.imgs[int(image_id)]["file_name"]

    def __len__(self) -> int:
        return len(self.ids)

    def targets(self, image_id: str, height: int, width: int):
        """(boxes (N, 4), labels (N,), masks uint8 (N, H, W)) of one image."""
        from pycocotools import mask as mask_utils

        from utils.instances import box_pixel_masks

        boxes, labels, masks = [], [], []
        for ann in self.coco.imgToAnns.get(int(image_id), []):
            label = self.class_map.index.get(int(ann["category_id"]), 0)
            x, y, w, h = ann["bbox"]
            if ann.get("iscrowd") or label == 0 or w <= 0 or h <= 0:
                continue
            if self.masks == "box":
                mask = box_pixel_masks([[x, y, x + w, y + h]], height, width)[0]
            else:
                seg = ann["segmentation"]
                if isinstance(seg, list):
                    seg = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
                elif isinstance(seg.get("counts"), list):
                    seg = mask_utils.frPyObjects(seg, height, width)
                mask = mask_utils.decode(seg).astype(bool)
            if not mask.any():
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(label)
            masks.append(mask)
        return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
                np.asarray(masks, np.uint8).reshape(-1, height, width))

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = read_image(self.image_path(image_id))
        height, width = image.shape[:2]
        boxes, labels, masks = self.targets(image_id, height, width)
        if self.flip and torch.rand(()).item() < 0.5:
            # Copies: an empty (0, H, W) mask array would keep its negative stride otherwise.
            image, masks = image[:, ::-1].copy(), masks[:, :, ::-1].copy()
            boxes = boxes.copy()
            boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
        return {"id": image_id,
                "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
                "masks": torch.from_numpy(np.ascontiguousarray(masks))}
