"""The COCO layout: MS-COCO 2017, and COCO-format exports of annotation tools (CVAT, datumaro,
Roboflow, supervision, globox, labelme2coco, Label Studio) with their own categories.

Under DATA.ROOT, per split (the first of each list that exists):
    annotation file   annotations/instances_<split>.json (COCO, CVAT, datumaro),
                      annotations/<split>.json, <split>/_annotations.coco.json (Roboflow,
                      supervision), <split>.json (labelme2coco's train.json / val.json,
                      globox), <split>/result.json (Label Studio's export, unpacked)
    images            <file_name> relative to <split>/ (COCO), images/<split>/ (datumaro),
                      images/, the root, or the annotation file's folder; an absolute
                      `file_name` (labelme2coco) is used as it is, or by its name under those
    BgMaskfromBoxes/<split>/<image_id>.png    written from the boxes on first use
The background masks and stage 2's labels are named by the integer image id without zero padding
("397133.png"), the same string as a dataset item's `id`.

Classes. Index 0 is background. `class_map="coco80"` numbers the 80 COCO categories 1..80 in
category-id order; `class_map="voc20"` keeps the 20 categories VOC shares, numbered as VOC does
(`utils.palette.VOC_CLASSES`), so a classifier trained on VOC labels COCO images directly;
`class_map="all"` numbers every category of the training split's file (DATA.SPLIT) 1..K by
ascending category id, and the other splits' categories are matched to those by name (tools
number each file on its own: labelme2coco by first appearance, globox alphabetically over the
labels present). Roboflow's dataset-level category (the `supercategory` of every other one,
without annotations) is no class and is left out.

Which annotations do what (one rule for every image):
- The background mask is 1 outside EVERY annotation box of the image, crowd and unmapped
  categories included, and 0 inside any of them. A crowd box (a crowd of people, a pile of books)
  or a giraffe under voc20 is an object, not background: counting it as background would put
  object features into the background prototypes of stages 1 and 2. This also makes the mask
  independent of the class map, so one set of files serves voc20 and coco80.
- The class targets (`boxes`) are the non-crowd boxes of mapped categories only. Crowd boxes are
  dropped as COCO's own evaluation treats them: regions to ignore, not instances.
- Images without any kept box stay in the dataset: their items have zero boxes.

Shape shorthand: H × W image, K kept boxes. Box items have the format of
`data.base.BoxDataset` plus two columns for instance results:
    id str (the image id), image uint8 (3, H, W) RGB, boxes float32 (K, 5) = x1, y1, x2, y2, class
    (class in the class map's numbering), bg_mask uint8 (1, H, W) (1 = background, 0 = in a box),
    ann_ids int64 (K,) (COCO annotation id of each box), category_ids int64 (K,) (its COCO
    category id).
COCO's bbox [x, y, w, h] (floats) becomes x1 = x, y1 = y, x2 = x + w, y2 = y + h: pixel edges,
as on VOC. A transform that drops boxes must drop the same rows of `ann_ids` and `category_ids`.
"""

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data.base import (MAX_COORD, MAX_ID, MAX_SIDE, Annotation, DatasetFormat, check_numbers,
                       read_dataset_image)
from data.voc import check_num_classes
from utils.boxes import write_new_bg_masks
from utils.errors import BanaError
from utils.palette import VOC_CLASSES
from utils.parsing import load_json, short
from utils.records import fingerprint

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

    names: class names, background first; index: category id -> class index 1..K; source: the
    annotation file the numbering comes from (class map "all").
    """

    name: str
    names: tuple[str, ...]
    index: dict
    source: Path | None = None

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


def class_names(class_map: str) -> tuple[str, ...]:
    """Names of the class indices, background first: 21 names for voc20, 81 for coco80."""
    return make_class_map(class_map).names


def evaluated_category_ids(class_map: str) -> list[int]:
    """The COCO category ids a model with this class map can predict, hence the ones to evaluate."""
    return make_class_map(class_map).category_ids


def make_tree_hint(root, coco2017: bool = True) -> str:
    if coco2017:
        return ("for MS-COCO 2017, download the images and annotations from "
                "https://cocodataset.org (train2017.zip, val2017.zip, annotations_trainval2017.zip) "
                f"and unpack them into {root}; for your own COCO-format export, set "
                "DATA.CLASS_MAP all")
    return (f"a COCO-format dataset keeps each split's annotation file and images under {root} "
            "as the README's 'Your own data' shows (annotations/instances_<split>.json and "
            "<split>/<file_name>, or the layouts of Roboflow, datumaro and labelme2coco)")


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
    has_mask: np.ndarray  # bool (A,): the annotation has a (non-empty) segmentation
    # The `segmentation` of each annotation (polygons or RLE; None where absent), in the order of
    # the arrays above; only loaded when asked for (it is large on train2017).
    segmentations: list | None = None

    @cached_property
    def images_with_masks(self) -> np.ndarray:
        """bool (N,): the image has a ground truth: the file has masks (some non-crowd
        annotation has a segmentation) and every non-crowd annotation of this image has one (an
        image without annotations is then all background)."""
        if not self.has_mask[~self.iscrowd].any():
            return np.zeros(len(self.image_ids), bool)
        image_of_row = np.repeat(np.arange(len(self.image_ids)), np.diff(self.offsets))
        lacking = np.bincount(image_of_row, weights=~self.has_mask & ~self.iscrowd,
                              minlength=len(self.image_ids))
        return lacking == 0

    def rows(self, n: int) -> slice:
        return slice(int(self.offsets[n]), int(self.offsets[n + 1]))


def find_splits(root) -> list[str]:
    """The splits of every annotations/instances_<split>.json under `root`, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise BanaError(f"--data-root {root} does not exist or is not a folder.")
    splits = sorted(p.name[len("instances_"):-len(".json")]
                    for p in (root / "annotations").glob("instances_*.json"))
    if not splits:
        raise BanaError(f"{root / 'annotations'} holds no instances_<split>.json file: a COCO-"
                        "format dataset keeps its annotations there (e.g. instances_train.json "
                        "next to the images folder train/).")
    return splits


def write_bg_masks(root, splits=None, workers: int = 1, progress: bool = True) -> dict:
    """Write the masks of every image of `splits` (default: `find_splits`); returns counts.

    Returns {"written": n, "skipped": n (already there), "total": n}. Every split's annotation
    file is read before anything is written, so a missing or broken one fails at once. The masks
    do not depend on the categories (every box counts), so any export's categories are accepted.
    """
    root = Path(root)
    splits = list(splits) if splits else find_splits(root)
    all_instances = [load_instances(root, split, coco2017=False) for split in splits]
    jobs = []
    for split, inst in zip(splits, all_instances):
        folder = root / "BgMaskfromBoxes" / split
        jobs += [(folder / f"{image_id}.png", inst.boxes[inst.rows(n)],
                  (int(inst.heights[n]), int(inst.widths[n])), None)
                 for n, image_id in enumerate(inst.image_ids.tolist())]
    del all_instances
    records = [(job[0].stem, fingerprint(job[1], job[2])) for job in jobs]
    written = write_new_bg_masks(jobs, records, workers, progress, chunksize=64)
    return {"written": written, "skipped": len(jobs) - written, "total": len(jobs)}


def _bad(path: Path, what: str) -> BanaError:
    return BanaError(f"{path} is not a valid COCO instances file: {what}. Fix or re-export "
                     "it.")


def _check_categories(path: Path, categories, coco2017: bool, used=()) -> list:
    """[(id, name)] of the file's categories in id order. With coco2017, each must be the COCO
    2017 category of that id (the voc20 and coco80 maps number COCO's own categories). Two
    categories of one name are refused; Roboflow's dataset-level category (the supercategory of
    every other one, with no annotation: `used` are the ids annotations use) is left out."""
    try:
        names = [str(c["name"]) for c in categories]
        raw = [c["id"] for c in categories]
        supers = [str(c.get("supercategory", "")) for c in categories]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise _bad(path, f"a category lacks an integer id or a name ({short(err)})") from None
    ids = check_numbers(raw, path, "id", lambda k: f"category {short(names[k])}",
                        integral=True, low=-MAX_ID, high=MAX_ID).tolist()
    pairs = sorted(zip(ids, names))
    parent = dict(zip(ids, supers))
    ids = [cat_id for cat_id, _ in pairs]
    if len(set(ids)) != len(ids):
        raise _bad(path, "two categories share an id")
    if len(pairs) > 1 and not coco2017:
        roots = [(i, n) for i, n in pairs
                 if i not in set(used) and all(parent[j] == n for j, _ in pairs if j != i)]
        pairs = [p for p in pairs if p not in roots[:1] or len(roots) > 1]
    names = [n for _, n in pairs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise _bad(path, f"the category name(s) {', '.join(map(repr, twice))} belong to more than "
                         "one id: classes are told apart by name, so merge them or rename one")
    for cat_id, name in pairs if coco2017 else ():
        if COCO_NAME_BY_ID.get(cat_id) != name:
            expected = COCO_NAME_BY_ID.get(cat_id, "no category (ids are those of COCO 2017)")
            raise BanaError(f"{path} lists category id {cat_id} as {name!r}, but COCO 2017 has "
                            f"{expected!r} there: DATA.CLASS_MAP voc20 and coco80 number the 80 "
                            "COCO 2017 categories; for your own categories set DATA.CLASS_MAP all.")
    return pairs


def annotation_candidates(root, split: str) -> list[Path]:
    """Where a split's annotation file may be, in the order they are tried (the module doc)."""
    root = Path(root)
    return [root / "annotations" / f"instances_{split}.json", root / "annotations" / f"{split}.json",
            root / split / "_annotations.coco.json", root / f"{split}.json",
            root / split / "result.json"]


NUMBERING_MAX_BYTES = 50 * 2**20


def _annotation_files(root) -> list[Path]:
    """Every file at a place where `annotation_candidates` looks, whatever the split."""
    root = Path(root)
    patterns = ("annotations/*.json", "*/_annotations.coco.json", "*.json", "*/result.json")
    return [p for pattern in patterns for p in root.glob(pattern) if p.is_file()]


def annotation_path(root, split: str) -> Path:
    """The split's annotation file: the first of `annotation_candidates` that exists (the first
    one when none does)."""
    candidates = annotation_candidates(root, split)
    return next((p for p in candidates if p.is_file()), candidates[0])


def load_instances(root, split: str, coco2017: bool = True,
                   segmentations: bool = False) -> CocoInstances:
    """Read the split's annotation file (`annotation_path`) into `CocoInstances`.

    Only what box supervision needs is kept (segmentations only with `segmentations`), so the
    full train2017 file (860k annotations) shrinks from gigabytes of Python objects to a few tens
    of megabytes of arrays. coco2017: the categories must be COCO 2017's (the voc20 and coco80
    class maps); otherwise any categories. Missing or malformed file, an annotation whose
    category or image is not listed, a bbox without area or outside its image, a polygon of
    fewer than three points or an RLE of another size than its image → BanaError naming the file
    and the annotation.
    """
    root = Path(root)
    if not root.is_dir():
        raise BanaError(f"DATA.ROOT {root} does not exist or is not a folder: "
                        f"{make_tree_hint(root, coco2017)}.")
    path = annotation_path(root, split)
    if not path.is_file():
        tried = ", ".join(str(p.relative_to(root)) for p in annotation_candidates(root, split))
        raise BanaError(f"no annotation file for split '{split}' under {root} (tried {tried}): "
                        f"{make_tree_hint(root, coco2017)}.")
    data = load_json(path, "COCO annotation file")
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations")):
        raise _bad(path, "expected a JSON object with 'images' and 'annotations'")
    try:
        images = list(data["images"])
        raw_ids = [im["id"] for im in images]
        file_names = [str(im["file_name"]) for im in images]
        raw_sizes = [[im["height"], im["width"]] for im in images]
    except (KeyError, TypeError, ValueError) as err:
        raise _bad(path, "an image entry lacks a valid id, file_name, height or width "
                         f"({short(err)})") from None
    image_ids = check_numbers(raw_ids, path, "id", lambda k: f"image {short(file_names[k])}",
                              integral=True, low=-MAX_ID, high=MAX_ID)
    sizes = check_numbers(raw_sizes, path, "height, width",
                          lambda k: f"image {raw_ids[k]} ({short(file_names[k])})",
                          integral=True, low=1, high=MAX_SIDE).reshape(-1, 2)
    by_id = np.argsort(image_ids, kind="stable")
    image_ids, heights, widths = image_ids[by_id], sizes[by_id, 0], sizes[by_id, 1]
    file_names = [file_names[k] for k in by_id.tolist()]
    if not len(image_ids):
        raise _bad(path, "'images' is empty")
    if len(np.unique(image_ids)) != len(image_ids):
        raise _bad(path, "two image entries share an id")
    anns = data["annotations"]
    try:
        raw = {key: [a[key] for a in anns] for key in ("image_id", "bbox", "category_id", "id")}
        iscrowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise _bad(path, "an annotation lacks a valid image_id, bbox [x, y, w, h], category_id "
                         f"or id ({short(err)})") from None

    def annotation(k: int) -> str:
        return f"annotation {short(raw['id'][k])} (image {short(raw['image_id'][k])})"

    odd = next((k for k, b in enumerate(raw["bbox"])
                if not isinstance(b, (list, tuple)) or len(b) != 4), None)
    if odd is not None:
        raise _bad(path, f"{annotation(odd)} has bbox {short(raw['bbox'][odd])}; a bbox is "
                         "[x, y, w, h], four numbers")
    xywh = check_numbers(raw["bbox"], path, "bbox [x, y, w, h]", annotation).reshape(-1, 4)
    integer = {"integral": True, "low": -MAX_ID, "high": MAX_ID}
    ann_ids = check_numbers(raw["id"], path, "id", annotation, **integer)
    ann_image = check_numbers(raw["image_id"], path, "image_id", annotation, **integer)
    category_ids = check_numbers(raw["category_id"], path, "category_id", annotation, **integer)
    categories = _check_categories(path, data.get("categories", []), coco2017,
                                   used=set(category_ids.tolist()))
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
    has_mask = np.array([_check_segmentation(path, a, heights[n], widths[n])
                         for a, n in zip(anns, image_index.tolist())], dtype=bool)
    order = np.argsort(image_index, kind="stable")
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)[order]
    return CocoInstances(
        path=path, image_ids=image_ids, file_names=file_names, heights=heights, widths=widths,
        offsets=np.concatenate([[0], np.cumsum(np.bincount(image_index, minlength=len(image_ids)))]
                               ).astype(np.int64),
        boxes=boxes.astype(np.float32), category_ids=category_ids[order], ann_ids=ann_ids[order],
        iscrowd=iscrowd[order], categories=categories, has_mask=has_mask[order],
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


def _check_segmentation(path: Path, ann: dict, height: int, width: int) -> bool:
    """Whether the annotation has a segmentation; a malformed one (a polygon of fewer than three
    points or an odd count, an RLE of another size than its image) is a BanaError naming the
    annotation: pycocotools would fail on it with a traceback, or silently paint garbage."""
    seg = ann.get("segmentation")
    if not seg:  # absent, None or [] (box-only tools write an empty list)
        return False
    where = f"annotation {ann.get('id')} (image {ann.get('image_id')})"
    if isinstance(seg, list):
        for polygon in seg:
            if (not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2
                    or not all(isinstance(v, (int, float)) for v in polygon)):
                raise _bad(path, f"{where} has a polygon {short(polygon)} that is not a list of "
                                 "at least three x, y points")
            # NaN fails both comparisons. A huge coordinate would crash pycocotools (its C code
            # casts them to int and walks every pixel of the outline) long after this file.
            if not all(-MAX_COORD <= v <= MAX_COORD for v in polygon):
                check_numbers(polygon, path, "a polygon coordinate",
                              lambda k: f"{where}, value {k + 1} of a polygon,")
        return True
    if isinstance(seg, dict):
        size = seg.get("size")
        if "counts" not in seg or not isinstance(size, list) or len(size) != 2:
            raise _bad(path, f"{where} has an RLE segmentation without 'counts' and 'size'")
        size = check_numbers([size], path, "an RLE size", lambda k: where, integral=True,
                             low=1, high=MAX_SIDE)[0].tolist()
        if size != [int(height), int(width)]:
            raise _bad(path, f"{where} has an RLE of size {size} (height, width) but its image "
                             f"is {width}x{height}")
        return True
    raise _bad(path, f"{where} has a segmentation that is neither polygons nor an RLE")


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


class COCOData(DatasetFormat):
    """The COCO layout (see the module doc): COCO 2017 with DATA.CLASS_MAP voc20 / coco80, or any
    COCO-format export with DATA.CLASS_MAP all (its own categories, matched by name across the
    split files)."""

    name = "coco"
    warn_dropped = False  # COCO has a few empty boxes; dropping them is not news

    def __init__(self, data_cfg, root: Path):
        super().__init__(data_cfg, root)
        self.class_map_name = check_class_map(data_cfg.CLASS_MAP)
        self.num_classes = getattr(data_cfg, "NUM_CLASSES", None)
        self.coco2017 = self.class_map_name != "all"
        self._instances: dict[str, CocoInstances] = {}
        self._maps: dict[str, ClassMap] = {}
        self._bases: dict[str, Path] = {}
        self._index: dict[str, dict[str, int]] = {}

    @staticmethod
    def detect(root: Path, split: str) -> bool:
        return any(p.is_file() for p in annotation_candidates(root, split))

    def missing_files_hint(self, what: str) -> str:
        return make_tree_hint(self.root, self.coco2017)

    def instances(self, split: str) -> CocoInstances:
        """The split's annotation file, read once (segmentations included: they say which
        images have a ground truth, and make it)."""
        if split not in self._instances:
            self._instances[split] = load_instances(self.root, split, coco2017=self.coco2017,
                                                    segmentations=True)
        return self._instances[split]

    def annotation_file(self, split: str) -> Path:
        return self.instances(split).path

    @cached_property
    def canonical(self) -> ClassMap:
        """The class map of the training split (DATA.SPLIT), whose numbering every split keeps."""
        if self.coco2017:
            names = make_class_map(self.class_map_name)
        else:
            split = getattr(self.data_cfg, "SPLIT", None)
            if not split or not annotation_path(self.root, split).is_file():
                split = next(iter(self._instances), split)
            names = make_class_map("all", self.instances(split).categories)
            names = ClassMap("all", names.names, names.index, source=self.annotation_file(split))
        check_num_classes(names.names, self.num_classes,
                          f"DATA.CLASS_MAP {self.class_map_name}"
                          + (f" on {names.source}" if names.source else ""))
        return names

    @property
    def classes(self) -> tuple[str, ...]:
        return self.canonical.names

    def class_map(self, split: str) -> ClassMap:
        """Category id of this split's file -> class index, matched by name to the training
        split's numbering; a category name the training split lacks is refused, naming it."""
        if split not in self._maps:
            inst = self.instances(split)
            canonical = self.canonical
            if self.coco2017:
                self._maps[split] = canonical
            else:
                by_name = {name: k for k, name in enumerate(canonical.names) if k}
                extra = sorted(name for _, name in inst.categories if name not in by_name)
                if extra:
                    raise BanaError(
                        f"{inst.path} lists the categories {', '.join(map(repr, extra))}, which "
                        f"{canonical.source} (DATA.SPLIT, whose classes the model learns; "
                        f"evaluate.py --train-split) does "
                        f"not; its classes are {', '.join(canonical.names[1:])}. Categories are "
                        "matched by name across the split files (their ids may differ): add "
                        "the missing ones to the training split's file, or remove those "
                        "annotations.")
                index = {cat_id: by_name[name] for cat_id, name in inst.categories}
                self._maps[split] = ClassMap("all", canonical.names, index, source=inst.path)
        return self._maps[split]

    def category_ids(self, split: str) -> list[int]:
        """Each class index's category id in `split`'s file (a class that file lacks: its id in
        the training split's file)."""
        own = {k: c for c, k in self.class_map(split).index.items()}
        canonical = {k: c for c, k in self.canonical.index.items()}
        return [0] + [own.get(k, canonical.get(k, k)) for k in range(1, len(self.classes))]

    def instance_ground_truth(self, split: str):
        from utils.coco_eval import load_ground_truth

        return load_ground_truth(self.annotation_file(split))

    def other_numberings(self, split: str) -> dict[Path, tuple[str, ...]]:
        """Files beside `split`'s that give a category name it shares another class index
        (labelme2coco and globox number each file on its own). A file of fewer categories that
        keeps the shared names where they are (a keypoints file) is no other numbering; files
        over NUMBERING_MAX_BYTES (MS-COCO's train files, numbered as val) are not read."""
        if self.coco2017:
            return {}  # voc20 / coco80 number by name, whatever the file
        own = make_class_map("all", self.instances(split).categories).names
        found = {}
        for path in sorted(set(_annotation_files(self.root)) - {self.annotation_file(split)}):
            if path.stat().st_size > NUMBERING_MAX_BYTES:
                continue
            try:
                doc = load_json(path)
                used = {a["category_id"] for a in doc.get("annotations", ())}
                categories = _check_categories(path, doc["categories"], False, used)
            except (OSError, ValueError, KeyError, TypeError, AttributeError, BanaError):
                continue  # not a COCO file of this dataset
            names = make_class_map("all", categories).names
            if any(name in own and own.index(name) != k for k, name in enumerate(names) if k):
                found[path] = names
        return found

    def split_ids(self, split: str) -> list[str]:
        return [str(i) for i in self.instances(split).image_ids.tolist()]

    def _row(self, split: str, image_id: str) -> int:
        if split not in self._index:
            self._index[split] = {str(i): n for n, i in
                                  enumerate(self.instances(split).image_ids.tolist())}
        return self._index[split][image_id]

    def _base(self, split: str) -> Path:
        """The folder the split's relative file names are relative to (module doc): the first
        candidate holding most of a sample of them."""
        if split not in self._bases:
            inst = self.instances(split)
            names = [n for n in inst.file_names if not Path(n).is_absolute()][:20]
            candidates = [self.root / split, self.root / "images" / split, self.root / "images",
                          self.root, inst.path.parent]
            found = [sum((c / n).is_file() for n in names) for c in candidates]
            self._bases[split] = candidates[int(np.argmax(found))] if max(found, default=0) \
                else candidates[0]
        return self._bases[split]

    def image_path(self, split: str, image_id: str) -> Path:
        name = Path(self.instances(split).file_names[self._row(split, image_id)])
        if name.is_absolute():
            if name.is_file():
                return name
            name = Path(name.name)  # an absolute path of another machine: look for the file here
        return self._base(split) / name

    def check_images(self, split: str, ids) -> None:
        from data.base import MIN_SIDE

        inst = self.instances(split)
        rows = [self._row(split, i) for i in ids]
        small = [n for n in rows if min(inst.heights[n], inst.widths[n]) < MIN_SIDE]
        if small:
            n = small[0]
            raise BanaError(f"{len(small)} image(s) of split '{split}' are smaller than "
                            f"{MIN_SIDE} pixels on a side (e.g. {inst.file_names[n]}, "
                            f"{inst.widths[n]}x{inst.heights[n]}, in {inst.path}): the networks' "
                            "features are 8 times smaller. Remove them from the annotation file.")
        paths = [self.image_path(split, i) for i in ids]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise BanaError(
                f"{len(missing)} of {len(paths)} images of split '{split}' are missing, e.g. "
                f"{missing[0]} (its file_name in {self.annotation_file(split)} is "
                f"{self.instances(split).file_names[self._row(split, ids[paths.index(missing[0])])]!r}"
                f"): the images of a COCO split go to {self.root / split}/, "
                f"{self.root / 'images' / split}/ or {self.root / 'images'}/, at their file_name "
                "(an absolute file_name that does not exist is looked for there by its name).")

    def annotation_source(self, split: str, image_id: str) -> Path:
        return self.annotation_file(split)

    def bg_mask_path(self, split: str, image_id: str) -> Path:
        return self.bg_mask_root / split / f"{image_id}.png"

    def annotation(self, split: str, image_id: str) -> Annotation:
        """The non-crowd boxes of mapped categories as targets (with their annotation and
        category ids); every box, crowd and unmapped ones included, for the background mask."""
        inst, n = self.instances(split), self._row(split, image_id)
        rows = inst.rows(n)
        mapping = self.class_map(split).index
        category_ids = inst.category_ids[rows]
        classes = np.array([mapping.get(int(c), 0) for c in category_ids], dtype=np.int64)
        keep = np.flatnonzero((classes > 0) & ~inst.iscrowd[rows])
        return Annotation(inst.boxes[rows][keep], classes[keep],
                          extras={"ann_ids": inst.ann_ids[rows][keep],
                                  "category_ids": category_ids[keep]},
                          mask_boxes=inst.boxes[rows],
                          size=(int(inst.heights[n]), int(inst.widths[n])))

    def annotated_size_hint(self) -> str:
        return "the image and the annotation file do not belong together; re-export them"

    def gt_ids(self, split: str) -> list[str]:
        inst = self.instances(split)
        return [str(i) for i, ok in zip(inst.image_ids.tolist(), inst.images_with_masks) if ok]

    def gt_label(self, split: str, image_id: str) -> np.ndarray | None:
        """uint8 (H, W): the semantic ground truth of one image rasterised from its instance
        masks (`rasterise_semantic`), or None where the image has none."""
        inst, n = self.instances(split), self._row(split, image_id)
        if not inst.images_with_masks[n]:
            return None
        rows = inst.rows(n)
        boxes = inst.boxes[rows]
        mapping = self.class_map(split).index
        classes = [mapping.get(int(c), 0) for c in inst.category_ids[rows]]
        return rasterise_semantic(int(inst.heights[n]), int(inst.widths[n]),
                                  (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
                                  classes, inst.iscrowd[rows], inst.segmentations[rows])


class COCOInstanceDataset(Dataset):
    """Images with instance targets for Mask R-CNN, from a COCO instances file.

    annotation_file: the split's own file (masks "gt": its segmentations; "box": each box
    filled) or the COCO export of stage 2's labels (exporters/coco.py: its pseudo masks). Crowd annotations,
    categories outside the class map and empty masks are left out. Items: id, image uint8
    (3, H, W), boxes float32 (N, 4) x1, y1, x2, y2, labels int64 (N,) class indices, masks uint8
    (N, H, W). flip: mirror image and targets with probability 0.5 (training). exclude: image ids
    left out (DATA.EXCLUDE).
    """

    def __init__(self, data: COCOData, split: str, annotation_file, masks: str = "gt",
                 flip: bool = False, exclude=()):
        from utils.coco_eval import load_ground_truth

        self.data, self.split, self.masks, self.flip = data, split, masks, flip
        self.class_map = data.class_map(split)
        self.annotation_file = Path(annotation_file)
        if not self.annotation_file.is_file():
            raise BanaError(f"instance masks {self.annotation_file} not found: they are the "
                            "COCO export of stage 2's labels (`python stage2.py --config-file "
                            "CONFIG` with the same DATA.ROOT, DATA.SPLIT and "
                            "DATA.PSEUDO_LABEL_DIR writes the label set they are made from).")
        self.coco = load_ground_truth(self.annotation_file)
        exclude = set(exclude)
        self.ids = [str(i) for i in sorted(self.coco.getImgIds()) if str(i) not in exclude]
        if masks == "gt":
            anns = [a for a in self.coco.dataset.get("annotations", []) if not a.get("iscrowd")]
            if not anns or any(not a.get("segmentation") for a in anns):
                raise BanaError(f"{self.annotation_file} has annotations without a segmentation: "
                                "MODEL.INSTANCE_MASKS gt needs the split's own masks; use Y_crf, "
                                "Y_ret or box.")
        data.check_images(split, self.ids)

    def image_path(self, image_id: str) -> Path:
        return self.data.image_path(self.split, image_id)

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
        image = read_dataset_image(self.data, self.split, image_id)
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
