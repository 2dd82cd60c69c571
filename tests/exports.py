"""Test fixtures that write tiny box datasets the way real annotation and dataset tools export them.

Users bring boxes exported by other tools. Each `write_*` function below writes a few images and
their annotation files with the layout, field order, numeric types, rounding, id numbering and
paths that the named tool produces, and returns an `Export` record holding, for every image, the
boxes a correct reader must produce. No tool is installed or run: everything here was written from
reading the tools' exporter sources (listed per tool below). Reading, not copying: the code is ours.

Common input
------------
An image is ``(name, rgb, boxes)``: ``name`` a file name such as ``img_000.jpg`` (its suffix says
JPEG or PNG), ``rgb`` a uint8 array (H, W, 3), ``boxes`` a list of ``(x1, y1, x2, y2, class_name)``
floats in pixel-edge coordinates (x1 = 0 is the left edge of column 0, x2 = W the right edge of the
last column). ``splits`` maps a split name to its list of images; ``classes`` is the ordered list
of class names the user's project defines. `make_images` and `default_splits` make a small set.

Every writer returns an `Export`: the root, the layout name, the split names as the tool names them,
the class names in the order a reader should number them (`Export.class_order` says why), and per
split the written images in the tool's listing order, each with its file, size, annotation file
and ``boxes``: the truth a reader must produce, i.e. pixel-edge floats *after the tool's own
rounding*, read back under the tool's documented convention (`Export.convention`). ``tolerance``
bounds how far that rounding moved a box from the input (tests check it), and ``files`` lists every
file written, so a test can check that nothing else is there.

Coordinate conventions, in one table (what a reader must do to get pixel edges back)
--------------------------------------------------------------------------------------
=========================  ============================================================  ======
layout                     file holds                                                    reader
=========================  ============================================================  ======
supervision COCO           bbox [x, y, w, h], float32 values widened to double           x, x+w
supervision VOC (>= 0.12)  int(v + 1) for all four corners (truncation after +1)         v - 1
supervision YOLO           cls cx cy w h normalised, '%.5f' of float32                   cx±w/2
globox COCO / VOC / YOLO   raw floats (repr), 0-based, no +1, no rounding                as is
labelme2coco               rectangles: round(x1), round(y1), round(x2-x1), round(y2-y1)  x, x+w
datumaro / CVAT COCO       corners rounded to 2 decimals, then bbox rounded to 2         x, x+w
datumaro / CVAT VOC        str(float) of the 2-decimal corners, 0-based, no +1           as is
datumaro / CVAT YOLO(v8)   cls cx cy w h normalised, '%.6f' of the 2-decimal corners     cx±w/2
LabelImg VOC               int() truncation, xmin/ymin below 1 set to 1, no +1           as is
Roboflow YOLO              cls cx cy w h normalised, full-precision repr                 cx±w/2
Roboflow COCO              bbox [x, y, w, h] unrounded, JS number form                   x, x+w
Label Studio COCO          int(x% / 100 * W), int(w% / 100 * W), truncated separately    x, x+w
=========================  ============================================================  ======

Writers: the export each one reproduces; images without boxes; class numbering
------------------------------------------------------------------------------
write_supervision_coco   sv.DetectionDataset.as_coco; listed, no annotation; category ids 0-based
                         in the given order (1-based with one_based=True, newest source)
write_supervision_voc    as_pascal_voc; XML without <object>; no class file
write_supervision_yolo   as_yolo; empty .txt; data.yaml ``nc`` + ``names`` list
write_globox_coco        save_coco(auto_ids=True); listed; ids 0-based over the labels *present in
                         that file*, alphabetical
write_globox_voc         save_pascal_voc; XML without <object>; no class file
write_globox_yolo        save_yolo_darknet(label_to_id=project order); empty .txt; no class file
write_labelme2coco       labelme JSONs + labelme2coco.convert; kept (empty ``shapes``); ids by
                         first appearance; one run per split (per_split_runs) -> ids differ
write_datumaro_coco      datum export -f coco_instances; listed; ids 1 + label index
write_cvat_coco          CVAT "COCO 1.0"; as datumaro plus CVAT box attributes
write_datumaro_voc       datum export -f voc; XML without <object>, listed in Main *and* in
                         Segmentation/Layout/Action; labelmap.txt (background first)
write_cvat_voc           CVAT "PASCAL VOC 1.1"; as datumaro, empty <depth>, <attributes> rotation
write_datumaro_yolo      datum export -f yolo (darknet); empty .txt; obj.names
write_cvat_yolo          CVAT "YOLO 1.1"; same as datumaro_yolo
write_ultralytics_yolo   CVAT "Ultralytics YOLO Detection 1.0"; *no* .txt; data.yaml
                         names {id: name}
write_labelimg_voc       LabelImg PascalVOC save; *no* XML (save_empty=True: XML without object);
                         no class file
write_roboflow_yolo      Roboflow "YOLOv8" download; empty .txt; data.yaml names, alphabetical
write_roboflow_coco      Roboflow "COCO" download; listed; root category 0, classes 1.. sorted
write_label_studio_coco  Label Studio COCO export; image *dropped*; ids 0-based, sorted labels

Sources read (repository: file) and what each showed
----------------------------------------------------
supervision (roboflow/supervision)
  * supervision/dataset/formats/coco.py: `save_coco_annotations` writes ``{"info": {}, "licenses":
    [CC BY 4.0, id 1], "categories", "images", "annotations"}`` with `json.dump(indent=3)` and a
    numpy encoder (supervision/utils/file.py); image entries ``id, license, file_name, height,
    width, date_captured`` (``"%m/%d/%Y,%H:%M:%S"``); ``file_name`` is the bare base name
    (``Path(p).stem + suffix``); image and annotation ids start at 1 (0 in the oldest stored
    version); annotation ``id, image_id, category_id, bbox [x, y, w, h], area w*h, segmentation
    [] (no mask), iscrowd 0``; bbox values are the Detections' float32 numbers widened to double
    (e.g. 10.300000190734863). ``categories`` are ``{"id", "name", "supercategory":
    "common-objects"}``; released versions number them 0-based (``enumerate(classes)``), the newest
    source (PR #2276, "emit 1-indexed category_id") numbers them 1-based -> ``one_based``.
    Images without boxes are listed with no annotation. Images: `save_dataset_images`
    (supervision/dataset/utils.py) writes ``images_directory_path/<base name>`` (cv2.imwrite or a
    copy). Layout used by the docs (`from_coco` example): ``<split>/_annotations.coco.json`` with
    the images in ``<split>/``.
  * supervision/dataset/formats/pascal_voc.py: `detections_to_pascal_voc` builds ``annotation >
    folder "VOC", filename, source > database "roboflow.ai", size > width height depth, segmented
    0, object > name, bndbox`` (no pose/truncated/difficult) and pretty-prints with minidom
    (``<?xml version="1.0" ?>``, two-space indent). Since issue #144 / PR #235 (v0.12)
    `object_to_pascal_voc` does ``xyxy += 1`` then ``str(int(v))`` and the loader subtracts 1 from
    all four: so xmax = int(x2) + 1 and a box touching the right border gets xmax = W + 1.
    An XML is written for every image, boxes or not; docs layout ``<split>/images``,
    ``<split>/labels``.
  * supervision/dataset/formats/yolo.py: `object_to_yolo` writes ``f"{cls} {cx:.5f} {cy:.5f}
    {w:.5f} {h:.5f}"`` from float32 arithmetic, one line per box, each ended by "\\n"
    (`save_text_file`); an image without boxes gets an empty .txt; `save_data_yaml` writes
    ``{"nc": N, "names": [...]}`` with `yaml.dump(sort_keys=False, default_flow_style=None)`
    (``names: [a, b]``), no train/val entries.
globox (laclouis5/globox)
  * src/globox/annotationset.py `to_coco`/`save_coco`: with ``auto_ids`` the label ids are
    ``enumerate(sorted(labels present in the set's boxes))`` (0-based, alphabetical, only labels
    that occur: a split lacking a class numbers the others differently) and image ids
    ``enumerate(sorted(image ids))``; annotation ids 0-based; annotation keys ``iscrowd, ignore,
    image_id, bbox, area, segmentation [], category_id, id``; bbox is the raw float ltwh (no
    rounding); ``file_name`` = the annotation's image id (the bare file name); categories
    ``{"supercategory": "none", "id", "name"}``; `json.dump` default separators. Every annotation
    in the set is listed, boxes or not. No images are written by globox.
  * src/globox/annotation.py / boundingbox.py: `save_xml` (= `save_pascal_voc`) writes one line,
    no declaration: ``annotation > filename, size > width height, object > name, bndbox > xmin
    ymin xmax ymax`` with ``f"{coord}"`` raw floats (0-based, no +1, no depth/segmented/difficult),
    one file per annotation, empty ones included. `_save_yolo` writes ``"\\n".join(label cx cy w
    h)`` with ``f"{v}"`` (full repr, no trailing newline, empty file for no boxes); the label is
    ``label_to_id[label]`` or, without a mapping, the *name itself*; no names/yaml file.
labelme2coco (fcakyon/labelme2coco, using obss/sahi)
  * labelme2coco/labelme2coco.py (0.2.5, PR #29): walks the folder with sahi's
    `list_files_recursively` (sahi/utils/file.py: ``os.path.join(directory, ...)``, so absolute
    when the folder is given absolute), sorts the JSON paths, and sets ``file_name =
    str(Path(json_path).parent / data["imagePath"])``: an absolute path. (Earlier 0.2.x, as in
    the stored pre-#29 file, wrote ``data["imagePath"]`` as is, relative to the JSON.)
    Category ids by first appearance over the sorted JSONs and their shapes, from
    ``category_id_start`` (default 0); ``supercategory`` = name. Rectangles become
    ``CocoAnnotation(bbox=[x1, y1, x2-x1, y2-y1])`` and sahi/utils/coco.py rounds every bbox
    number with Python ``round`` (banker's), so x2 comes back as round(x1) + round(x2 - x1);
    shapely bounds make them floats; segmentation [] ; area = int(area). Polygons: bbox = float
    bounds of the points, segmentation = int()-truncated points with the closing point dropped
    (sahi/utils/shapely.py `to_coco_segmentation`).
  * labelme2coco/__init__.py `convert`: ``dataset.json``, or with ``train_split_rate < 1``
    ``train.json`` and ``val.json`` from `Coco.split_coco_as_train_val` (``np.random.seed(0)``,
    shuffle, ``int(n * rate)`` train), which gives both files the *same* category list: ids do
    not differ between train and val of one run. They differ when labelme2coco is run once per
    folder (a common workflow), since each run numbers by first appearance in its own folder:
    `write_labelme2coco(per_split_runs=True)` writes that case.
  * sahi `create_coco_dict`: keys ``images, annotations, categories``; image ``height, width, id,
    file_name`` (ids from 1); annotation ``iscrowd, image_id, bbox, segmentation, category_id, id,
    area`` (ids from 1); images with no shapes are kept; `save_json` uses separators (",", ":").
datumaro (openvinotoolkit/datumaro) and CVAT's fork (cvat-ai/datumaro)
  * datumaro/components/annotation.py: every shape's points are ``np.around(points, 2)`` at
    construction (COORDINATE_ROUNDING_DIGITS = 2); `Bbox(x, y, w, h)` stores ``[x, y, x+w, y+h]``.
  * datumaro/plugins/data_formats/coco/exporter.py: ``annotations/instances_<subset>.json``,
    images in ``images/<subset>/<id><ext>`` (merge_images False, CVAT passes it explicitly);
    top-level ``licenses [{"name": "", "id": 0, "url": ""}], info {...""}, categories, images,
    annotations``; categories ``id = 1 + index`` over *all* labels, ``supercategory`` = parent
    (""); images ``id, width, height, file_name (<id><ext>, relative to images/<subset>/),
    license 0, flickr_url "", coco_url "", date_captured 0``, every item listed; image ids come
    from the item's "id" attribute or ``len(seen) + 1`` in a dict shared by all subsets, so a
    second subset continues the numbering; annotation ids restart at 1 per file; annotation
    ``id, image_id, category_id, segmentation [], area w*h (unrounded), bbox [round(v, 2)],
    iscrowd 0`` plus ``attributes`` when the box has any. cvat/apps/dataset_manager/bindings.py
    gives every CVAT shape ``occluded`` and every rectangle ``rotation``, so CVAT's boxes carry
    ``"attributes": {"occluded": false, "rotation": 0.0}``. cvat/apps/dataset_manager/formats/
    coco.py: CVAT "COCO 1.0" is this exporter ("coco_instances", merge_images=False).
  * datumaro/plugins/data_formats/voc/exporter.py (and cvat-ai/datumaro
    datumaro/plugins/voc_format/converter.py): an XML ``Annotations/<id>.xml`` is written for
    *every* item, objects or not (all versions read, so no "listed but no XML" case comes from
    datumaro); lxml pretty print; ``folder`` = the id's text before its first "_" (""
    otherwise), ``source`` "Unknown" x3, ``size`` with ``depth`` = channels (datumaro) or ""
    (CVAT fork), ``segmented``, objects ``name, truncated, occluded, difficult, bndbox``;
    coordinates ``str(x)``, ``str(x + w)`` of the 2-decimal points: 0-based floats, no +1
    (datumaro's own VOC reader, voc/base.py `_parse_bbox`, reads them as floats and subtracts
    nothing). ``ImageSets/Main/<subset>.txt`` lists every item; ``ImageSets/Segmentation``,
    ``Layout`` and ``Action/<subset>.txt`` list only the items *without* annotations (they are
    set to None there) and are written only when non-empty; per-class Main lists only for Label
    annotations (none here); empty SegmentationClass/ and SegmentationObject/ directories;
    ``labelmap.txt`` (voc/format.py `write_label_map`): header ``# label:color_rgb:parts:actions``,
    ``background:0,0,0::`` first, then the labels in project order with VOC-palette colours.
    Non-VOC attributes go to ``<attributes><attribute><name>..<value>..`` (CVAT: ``rotation``).
    cvat/apps/dataset_manager/formats/pascal_voc.py: CVAT "PASCAL VOC 1.1" is this exporter with
    ``label_map="source"``.
  * datumaro/plugins/data_formats/yolo/exporter.py and cvat-ai/datumaro
    datumaro/plugins/yolo_format/converter.py: darknet YOLO (CVAT "YOLO 1.1"): ``obj.names``,
    ``obj.data`` (``classes = N``, ``<subset> = data/<subset>.txt``, ``names = data/obj.names``,
    ``backup = backup/``), ``obj_<subset>_data/<id>.jpg`` and ``<id>.txt`` ("%.6f", empty file
    for no boxes), ``<subset>.txt`` listing ``data/obj_<subset>_data/<id>.jpg``. The YOLOv8
    converter (CVAT "Ultralytics YOLO Detection 1.0"): ``images/<subset>/``, ``labels/<subset>/``
    with a label file *only for images that have boxes*, ``<subset>.txt`` listing
    ``images/<subset>/<file>`` (CVAT docs, docs.cvat.ai format-yolo-ultralytics), ``data.yaml``
    by `yaml.dump` (sorted keys): ``names: {0: a, 1: b}``, ``path: .``, ``<subset>: <subset>.txt``.
LabelImg (HumanSignal/labelImg)
  * libs/labelFile.py `convert_points_to_bnd_box`: min/max of the points, ``xmin``/``ymin`` < 1
    set to 1, then ``int()`` of all four (truncation, no +1). libs/pascal_voc_io.py
    `PascalVocWriter`: ``annotation > folder (image folder name), filename, path (absolute image
    path), source > database "Unknown", size > width height depth (3, or 1 for grey),
    segmented 0, object > name, pose "Unspecified", truncated (1 when ymax == H or ymin == 1, or
    xmax == W or xmin == 1), difficult, bndbox``; lxml pretty print with two spaces replaced by a
    tab; the XML goes next to the image by default. LabelImg writes nothing for an image the user
    never saved, so by default images without boxes get no XML; no split lists, no class list.
Ultralytics / Roboflow YOLO
  * docs.ultralytics.com/datasets/detect: ``data.yaml`` with ``path``, ``train``/``val``/``test``
    (dirs, list files or lists, relative to ``path``) and ``names`` as ``{id: name}``; labels
    ``class cx cy w h`` normalised, ``labels/<split>/<stem>.txt`` beside ``images/<split>``.
  * roboflow.com/formats/yolo and Roboflow ``data.yaml`` files stored in public repositories:
    ``train: ../train/images``, ``val: ../valid/images``, ``test: ../test/images``, ``nc``,
    ``names: ['a', 'b']`` (a Python-style list) and a ``roboflow:`` block (workspace, project,
    version, license, url); folders ``train/images``, ``train/labels``, ``valid/...``; image files
    renamed ``<stem>_<ext>.rf.<32 hex>.jpg``; label values printed in full precision. Roboflow's
    exporter is closed: the empty .txt for an image without boxes and the alphabetical class order
    are what its exports show, not read from source.
Roboflow COCO (closed source; from exported ``_annotations.coco.json`` files in public repositories
  and roboflow/rf-detr PR #1303): ``<split>/_annotations.coco.json`` beside the renamed images;
  ``categories`` start with a synthetic root ``{"id": 0, "name": <project>, "supercategory":
  "none"}`` that owns no annotation, then the classes from 1 with ``supercategory`` = the root
  name (the root may share a class's name); image and annotation ids from 0; images carry
  ``extra: {"name": <original name>}``; numbers printed JavaScript-style (260, not 260.0).
Label Studio (HumanSignal/label-studio-converter: label_studio_converter/converter.py)
  * `convert_to_coco`: ``result.json`` (indent 2) with keys ``images, categories, annotations,
    info``; categories ``{"id", "name"}`` 0-based over the *sorted* labels of the labelling config
    (`_get_labels`); tasks without boxes are skipped (no image entry, no image file); image
    ``width, height, id (0-based), file_name`` = the path relative to the output dir
    (``images/<8 hex>-<name>``, Label Studio's upload prefix); annotation ``id, image_id,
    category_id, segmentation [], bbox, ignore 0, iscrowd 0, area`` with ``x = int(x% / 100 *
    W)``, ``w = int(w% / 100 * W)`` truncated separately from the stored percentages.

Surprises worth a reader's attention: supervision's VOC is +1 on *both* corners (xmax = W + 1 at
the border); datumaro/CVAT VOC is 0-based floats, not devkit 1-based integers; datumaro's
Segmentation/Layout/Action lists name only the *empty* images; datumaro COCO image ids continue
across subsets while annotation ids restart; CVAT's YOLOv8 export has no label file for an image
without boxes while its YOLO 1.1 export has an empty one; globox numbers categories per file from
the labels present; labelme2coco writes absolute ``file_name``s; Roboflow COCO has an extra root
category 0; Label Studio drops images without boxes altogether.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Mapping, Sequence
from xml.dom import minidom
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape

import numpy as np
import yaml
from PIL import Image as PILImage

__all__ = [
    "Box", "ExportImage", "Export", "make_images", "default_splits",
    "write_supervision_coco", "write_supervision_voc", "write_supervision_yolo",
    "write_globox_coco", "write_globox_voc", "write_globox_yolo",
    "write_labelme2coco",
    "write_datumaro_coco", "write_datumaro_voc", "write_datumaro_yolo",
    "write_cvat_coco", "write_cvat_voc", "write_cvat_yolo", "write_ultralytics_yolo",
    "write_labelimg_voc", "write_roboflow_yolo", "write_roboflow_coco",
    "write_label_studio_coco", "WRITERS",
]

InputBox = tuple  # (x1, y1, x2, y2, class_name)
InputImage = tuple  # (name, rgb uint8 (H, W, 3), [InputBox, ...])
Splits = Mapping[str, Sequence[InputImage]]


@dataclass(frozen=True)
class Box:
    """A box as a correct reader must produce it: pixel-edge floats and the class name."""
    x1: float
    y1: float
    x2: float
    y2: float
    label: str


@dataclass
class ExportImage:
    split: str                 # the split as the tool names it
    source_name: str           # the input name
    path: Path                 # the image file written (absolute)
    width: int
    height: int
    boxes: list[Box]           # truth, after the tool's rounding, in the file's order
    source_boxes: list[Box]    # the input boxes, same order
    annotation: Path | None = None  # the per-image annotation file (XML, txt), if any


@dataclass
class Export:
    root: Path
    layout: str
    splits: tuple[str, ...]
    classes: tuple[str, ...]   # the order a reader should number the classes in
    class_order: str           # why that order
    convention: str            # how the file's numbers map to pixel edges
    tolerance: float           # max |truth - input| in pixels that the tool's rounding allows
    images: dict[str, list[ExportImage]]        # split -> images in the tool's listing order
    annotation_files: dict[str, Path] = field(default_factory=dict)  # split -> JSON/list/yaml
    files: list[Path] = field(default_factory=list)  # every file written
    extra: dict = field(default_factory=dict)   # tool-specific facts (per-split category ids...)

    def all_images(self) -> list[ExportImage]:
        return [im for split in self.splits for im in self.images.get(split, [])]


# --------------------------------------------------------------------------------------------
# Input images
# --------------------------------------------------------------------------------------------

def make_images(n: int = 6, size: tuple[int, int] = (64, 48),
                classes: Sequence[str] = ("cat", "dog", "bird"), seed: int = 0) -> list:
    """``n`` small images (size = (W, H)) of coloured rectangles/ellipses on noise, 0-3 boxes each.

    Image 1 has no box; image 0's first box touches the left and top border (x1 = y1 = 0); image
    2's first box touches the right and bottom border (x2 = W, y2 = H); image 3's first box has
    .5 coordinates (banker's rounding); all other coordinates are random 2-decimal fractions.
    Class names cycle so that the first box of image 0 is ``classes[1]`` (first appearance order
    differs from the given order) and the first box of image 4 is ``classes[2]``. Image 3 is a
    PNG, the others JPEG. Needs n >= 4."""
    if n < 4:
        raise ValueError("make_images needs n >= 4")
    W, H = size
    rng = np.random.default_rng(seed)
    palette = [(220, 60, 40), (40, 170, 70), (50, 80, 220), (230, 200, 40), (180, 60, 200)]
    out = []
    for i in range(n):
        img = (rng.integers(0, 256, (H, W, 3)) * 0.35 + 40).astype(np.uint8)
        k = 0 if i == 1 else int(rng.integers(1, 4))
        boxes = []
        for j in range(k):
            x1 = round(float(rng.uniform(0, W * 0.55)), 2)
            y1 = round(float(rng.uniform(0, H * 0.55)), 2)
            x2 = min(float(W), round(x1 + float(rng.uniform(8, W * 0.45)), 2))
            y2 = min(float(H), round(y1 + float(rng.uniform(6, H * 0.45)), 2))
            if j == 0 and i == 0:
                x1, y1 = 0.0, 0.0
            if j == 0 and i == 2:
                x2, y2 = float(W), float(H)
            if j == 0 and i == 3:
                x1, y1, x2, y2 = 12.5, 6.5, 30.25, 20.75
            label = classes[(i + j + 1) % len(classes)]
            boxes.append((x1, y1, x2, y2, label))
            colour = np.array(palette[classes.index(label) % len(palette)], np.uint8)
            c0, c1 = int(math.floor(x1)), int(math.ceil(x2))
            r0, r1 = int(math.floor(y1)), int(math.ceil(y2))
            if j % 2 == 0:
                img[r0:r1, c0:c1] = colour
            else:
                yy, xx = np.mgrid[0:H, 0:W] + 0.5
                cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
                img[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1] = colour
        name = f"img_{i:03d}.png" if i == 3 else f"img_{i:03d}.jpg"
        out.append((name, img, boxes))
    return out


def default_splits(images: Sequence, val_name: str = "val") -> dict:
    """The first two thirds as "train", the rest as ``val_name`` (Roboflow says "valid")."""
    cut = max(1, (2 * len(images)) // 3)
    return {"train": list(images[:cut]), val_name: list(images[cut:])}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

class _Files:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.paths: list[Path] = []

    def path(self, rel) -> Path:
        parts = rel if isinstance(rel, (tuple, list)) else (rel,)
        p = self.root.joinpath(*map(str, parts))
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def text(self, rel, content: str) -> Path:
        p = self.path(rel)
        with open(p, "w", encoding="utf-8", newline="\n") as f:
            f.write(content)
        self._add(p)
        return p

    def json(self, rel, obj, **kw) -> Path:
        return self.text(rel, json.dumps(obj, **kw))

    def image(self, rel, rgb: np.ndarray, fmt: str | None = None) -> Path:
        p = self.path(rel)
        fmt = fmt or ("PNG" if p.suffix.lower() == ".png" else "JPEG")
        im = PILImage.fromarray(np.ascontiguousarray(rgb), "RGB")
        im.save(p, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        self._add(p)
        return p

    def _add(self, p: Path):
        if p not in self.paths:
            self.paths.append(p)


def _src(boxes) -> list[Box]:
    return [Box(float(b[0]), float(b[1]), float(b[2]), float(b[3]), str(b[4])) for b in boxes]


def _size(rgb) -> tuple[int, int]:
    return int(rgb.shape[1]), int(rgb.shape[0])


def _check_classes(splits: Splits, classes: Sequence[str] | None) -> tuple[str, ...]:
    seen = [b[4] for imgs in splits.values() for _, _, bs in imgs for b in bs]
    if classes is None:
        return tuple(dict.fromkeys(seen))
    missing = set(seen) - set(classes)
    if missing:
        raise ValueError(f"boxes use classes not in `classes`: {sorted(missing)}")
    return tuple(classes)


def _xml(tag: str, content=None, level: int = 0, indent: str = "  ", attrib: dict | None = None
         ) -> str:
    """lxml-style pretty print: ``content`` None -> <t/>, str -> <t>text</t> (also for ""),
    list of (tag, content[, attrib]) -> nested. Ends every line with a newline."""
    pad = indent * level
    attrs = "".join(f' {k}="{escape(str(v), {chr(34): "&quot;"})}"'
                    for k, v in (attrib or {}).items())
    if content is None:
        return f"{pad}<{tag}{attrs}/>\n"
    if isinstance(content, str):
        return f"{pad}<{tag}{attrs}>{escape(content)}</{tag}>\n"
    inner = "".join(_xml(c[0], c[1], level + 1, indent, c[2] if len(c) > 2 else None)
                    for c in content)
    return f"{pad}<{tag}{attrs}>\n{inner}{pad}</{tag}>\n"


def _maxdim(splits: Splits) -> int:
    return max((max(rgb.shape[:2]) for imgs in splits.values() for _, rgb, _ in imgs), default=1)


def _yolo_truth(line_values, W, H, label) -> Box:
    cx, cy, w, h = (float(v) for v in line_values)
    return Box((cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H, label)


def _yolo_split_folders(fs: "_Files", splits: Splits, class_ids: Sequence[str], values, ends: str,
                        rename=lambda name, rgb: name, fmt: str | None = None) -> dict:
    """``<split>/images/<name>`` and ``<split>/labels/<stem>.txt``, one ``id cx cy w h`` line
    per box: `values(x1, y1, x2, y2, W, H)` gives the four numbers as the tool prints them;
    `ends` "\\n" ends every line, "" joins them without a trailing newline."""
    images = {}
    for split, imgs in splits.items():
        recs = []
        for name, rgb, boxes in imgs:
            W, H = _size(rgb)
            stored = rename(name, rgb)
            path = fs.image((split, "images", stored), rgb, fmt)
            lines, truth = [], []
            for x1, y1, x2, y2, label in boxes:
                strs = values(x1, y1, x2, y2, W, H)
                lines.append(f"{class_ids.index(label)} " + " ".join(strs))
                truth.append(_yolo_truth(strs, W, H, label))
            text = "".join(line + "\n" for line in lines) if ends else "\n".join(lines)
            txt = fs.text((split, "labels", Path(stored).stem + ".txt"), text)
            recs.append(ExportImage(split, name, path, W, H, truth, _src(boxes), txt))
        images[split] = recs
    return images


def _float_cxcywh(x1, y1, x2, y2, W, H) -> list[str]:
    """Centre and size over W, H from float corners, printed at full precision (repr)."""
    x1, y1, x2, y2 = float(x1), float(y1), float(x2), float(y2)
    return [repr(v) for v in ((x1 + x2) / 2 / W, (y1 + y2) / 2 / H, (x2 - x1) / W, (y2 - y1) / H)]


def _js_number(v: float):
    """A number as JavaScript's JSON.stringify prints it: integral values without '.0'."""
    v = float(v)
    return int(v) if v.is_integer() else v


def _voc_colormap(n: int) -> list[tuple[int, int, int]]:
    """The PASCAL VOC palette (the colour of index i is built from i's bits, 3 at a time)."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(7, -1, -1):
            r |= ((c >> 0) & 1) << j
            g |= ((c >> 1) & 1) << j
            b |= ((c >> 2) & 1) << j
            c >>= 3
        out.append((r, g, b))
    return out


# --------------------------------------------------------------------------------------------
# supervision
# --------------------------------------------------------------------------------------------

def write_supervision_coco(root, splits: Splits, classes: Sequence[str] | None = None, *,
                           one_based: bool = False) -> Export:
    """`sv.DetectionDataset.as_coco` once per split, in the Roboflow/docs layout
    ``<split>/_annotations.coco.json`` with the images in ``<split>/``. ``one_based`` selects the
    newest source (category ids from 1) instead of released versions (from 0)."""
    fs = _Files(root)
    classes = _check_classes(splits, classes)
    off = 1 if one_based else 0
    images, ann_files = {}, {}
    for split, imgs in splits.items():
        coco_images, coco_anns, recs = [], [], []
        image_id = ann_id = 1
        for name, rgb, boxes in imgs:
            W, H = _size(rgb)
            path = fs.image((split, name), rgb)
            coco_images.append({"id": image_id, "license": 1, "file_name": Path(name).name,
                                "height": H, "width": W,
                                "date_captured": datetime.now().strftime("%m/%d/%Y,%H:%M:%S")})
            truth = []
            for x1, y1, x2, y2, label in boxes:
                xyxy = np.array([x1, y1, x2, y2], dtype=np.float32)
                bw, bh = xyxy[2] - xyxy[0], xyxy[3] - xyxy[1]
                bbox = [float(xyxy[0]), float(xyxy[1]), float(bw), float(bh)]
                coco_anns.append({"id": ann_id, "image_id": image_id,
                                  "category_id": classes.index(label) + off, "bbox": bbox,
                                  "area": float(bw * bh), "segmentation": [], "iscrowd": 0})
                truth.append(Box(bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3], label))
                ann_id += 1
            recs.append(ExportImage(split, name, path, W, H, truth, _src(boxes)))
            image_id += 1
        doc = {"info": {},
               "licenses": [{"id": 1, "url": "https://creativecommons.org/licenses/by/4.0/",
                             "name": "CC BY 4.0"}],
               "categories": [{"id": i + off, "name": c, "supercategory": "common-objects"}
                              for i, c in enumerate(classes)],
               "images": coco_images, "annotations": coco_anns}
        ann_files[split] = fs.json((split, "_annotations.coco.json"), doc, indent=3)
        images[split] = recs
    return Export(fs.root, "supervision_coco", tuple(splits), classes,
                  f"category id order ({off}-based): the project's class list",
                  "bbox [x, y, w, h] in pixels, float32 values widened to double; x2 = x + w",
                  1e-4, images, ann_files, fs.paths, {"category_id_offset": off})


def write_supervision_voc(root, splits: Splits, classes: Sequence[str] | None = None, *,
                          plus_one: bool = True) -> Export:
    """`sv.DetectionDataset.as_pascal_voc` per split: ``<split>/images/<name>`` and
    ``<split>/labels/<stem>.xml`` (docs layout). ``plus_one=False`` is supervision < 0.12
    (``int(v)``, no offset)."""
    fs = _Files(root)
    classes = _check_classes(splits, classes)
    off = 1 if plus_one else 0
    images = {}
    for split, imgs in splits.items():
        recs = []
        for name, rgb, boxes in imgs:
            W, H = _size(rgb)
            path = fs.image((split, "images", name), rgb)
            doc = minidom.Document()
            ann = doc.createElement("annotation")

            def sub(parent, tag, text=None):
                el = doc.createElement(tag)
                if text is not None:
                    el.appendChild(doc.createTextNode(text))
                parent.appendChild(el)
                return el

            sub(ann, "folder", "VOC")
            sub(ann, "filename", Path(name).name)
            sub(sub(ann, "source"), "database", "roboflow.ai")
            size = sub(ann, "size")
            sub(size, "width", str(W))
            sub(size, "height", str(H))
            sub(size, "depth", str(rgb.shape[2]))
            sub(ann, "segmented", "0")
            truth = []
            for x1, y1, x2, y2, label in boxes:
                xyxy = np.array([x1, y1, x2, y2], dtype=np.float32) + off
                vals = [int(v) for v in xyxy]
                obj = sub(ann, "object")
                sub(obj, "name", label)
                bnd = sub(obj, "bndbox")
                for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), vals):
                    sub(bnd, tag, str(v))
                truth.append(Box(*(float(v - off) for v in vals), label))
            doc.appendChild(ann)
            xml_path = fs.text((split, "labels", Path(name).stem + ".xml"),
                               doc.toprettyxml(indent="  "))
            recs.append(ExportImage(split, name, path, W, H, truth, _src(boxes), xml_path))
        images[split] = recs
    return Export(fs.root, "supervision_voc", tuple(splits), classes,
                  "no class file: supervision's reader numbers names by first appearance; "
                  "use the project's class list",
                  f"integers int(v + {off}) for all four corners; reader subtracts {off} from all "
                  "four (a devkit reader, x1 = xmin - 1, x2 = xmax, is 1 px wide on the right and "
                  "gives xmax = W + 1 at the border)",
                  1.0, images, {}, fs.paths, {"offset": off})


def write_supervision_yolo(root, splits: Splits, classes: Sequence[str] | None = None) -> Export:
    """`sv.DetectionDataset.as_yolo` per split: ``<split>/images``, ``<split>/labels`` and one
    ``data.yaml`` (``nc`` and ``names`` only)."""
    fs = _Files(root)
    classes = _check_classes(splits, classes)

    def values(x1, y1, x2, y2, W, H):
        rel = np.array([x1, y1, x2, y2], np.float32) / np.array([W, H, W, H], np.float32)
        cxcywh = ((rel[0] + rel[2]) / 2, (rel[1] + rel[3]) / 2, rel[2] - rel[0], rel[3] - rel[1])
        return [f"{v:.5f}" for v in cxcywh]

    images = _yolo_split_folders(fs, splits, classes, values, "\n")
    data_yaml = fs.text("data.yaml", yaml.dump({"nc": len(classes), "names": list(classes)},
                                               sort_keys=False, default_flow_style=None))
    return Export(fs.root, "supervision_yolo", tuple(splits), classes,
                  "data.yaml names list: line index = class id",
                  "class cx cy w h normalised by W, H, '%.5f' of float32 values",
                  1e-5 * _maxdim(splits) + 1e-3, images, {s: data_yaml for s in splits}, fs.paths,
                  {"data_yaml": data_yaml})


# --------------------------------------------------------------------------------------------
# globox
# --------------------------------------------------------------------------------------------

def write_globox_coco(root, splits: Splits, classes: Sequence[str] | None = None) -> Export:
    """`AnnotationSet.save_coco(path, auto_ids=True)` per split: ``<split>.json``; globox writes
    no images, so they are placed in ``images/<split>/`` (``file_name`` is the bare name)."""
    fs = _Files(root)
    _check_classes(splits, classes)
    images, ann_files, cat_ids = {}, {}, {}
    for split, imgs in splits.items():
        labels = sorted({b[4] for _, _, bs in imgs for b in bs})
        label_to_id = {lab: i for i, lab in enumerate(labels)}
        imageid_to_id = {im: i for i, im in enumerate(sorted(n for n, _, _ in imgs))}
        anns, coco_images, recs, ann_id = [], [], [], 0
        for name, rgb, boxes in imgs:
            W, H = _size(rgb)
            path = fs.image(("images", split, name), rgb)
            truth = []
            for x1, y1, x2, y2, label in boxes:
                x1, y1, x2, y2 = float(x1), float(y1), float(x2), float(y2)
                w, h = x2 - x1, y2 - y1
                anns.append({"iscrowd": 0, "ignore": 0, "image_id": imageid_to_id[name],
                             "bbox": [x1, y1, w, h], "area": w * h, "segmentation": [],
                             "category_id": label_to_id[label], "id": ann_id})
                truth.append(Box(x1, y1, x1 + w, y1 + h, label))
                ann_id += 1
            coco_images.append({"id": imageid_to_id[name], "file_name": name, "width": W,
                                "height": H})
            recs.append(ExportImage(split, name, path, W, H, truth, _src(boxes)))
        doc = {"images": coco_images, "annotations": anns,
               "categories": [{"supercategory": "none", "id": i, "name": lab}
                              for lab, i in label_to_id.items()]}
        ann_files[split] = fs.json(f"{split}.json", doc, allow_nan=False)
        images[split] = recs
        cat_ids[split] = label_to_id
    union = tuple(sorted({lab for m in cat_ids.values() for lab in m}))
    return Export(fs.root, "globox_coco", tuple(splits), union,
                  "alphabetical: auto_ids numbers the labels present in each file, sorted; map "
                  "ids to names per file (a split lacking a class shifts the ids)",
                  "bbox [x, y, w, h] raw floats; x2 = x + w", 1e-9, images, ann_files, fs.paths,
                  {"category_ids": cat_ids})


def write_globox_voc(root, splits: Splits, classes: Sequence[str] | None = None) -> Export:
    """`AnnotationSet.save_pascal_voc(dir)` per split: ``<split>/Annotations/<stem>.xml`` (one
    line, raw floats), images placed in ``<split>/images/`` (globox writes none)."""
    fs = _Files(root)
    classes = _check_classes(splits, classes)
    images = {}
    for split, imgs in splits.items():
        recs = []
        for name, rgb, boxes in imgs:
            W, H = _size(rgb)
            path = fs.image((split, "images", name), rgb)
            ann = ET.Element("annotation")
            ET.SubElement(ann, "filename").text = name
            size = ET.SubElement(ann, "size")
            ET.SubElement(size, "width").text = f"{W}"
            ET.SubElement(size, "height").text = f"{H}"
            truth = []
            for x1, y1, x2, y2, label in boxes:
                obj = ET.SubElement(ann, "object")
                ET.SubElement(obj, "name").text = label
                bnd = ET.SubElement(obj, "bndbox")
                coords = (float(x1), float(y1), float(x2), float(y2))
                for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), coords):
                    ET.SubElement(bnd, tag).text = f"{v}"
                truth.append(Box(*coords, label))
            xml_path = fs.text((split, "Annotations", Path(name).stem + ".xml"),
                               ET.tostring(ann, encoding="unicode"))
            recs.append(ExportImage(split, name, path, W, H, truth, _src(boxes), xml_path))
        images[split] = recs
    return Export(fs.root, "globox_voc", tuple(splits), classes,
                  "no class file: use the project's class list",
                  "xmin ymin xmax ymax raw floats, 0-based pixel edges (no +1)", 1e-9, images,
                  {}, fs.paths)


def write_globox_yolo(root, splits: Splits, classes: Sequence[str] | None = None) -> Export:
    """`AnnotationSet.save_yolo_darknet(dir, label_to_id=...)` per split: ``<split>/labels/``
    (full-precision values, no trailing newline); images placed in ``<split>/images/``; no class
    file is written (the ids are the project's class order passed as ``label_to_id``)."""
    fs = _Files(root)
    classes = _check_classes(splits, classes)
    images = _yolo_split_folders(fs, splits, classes, _float_cxcywh, "")
    return Export(fs.root, "globox_yolo", tuple(splits), classes,
                  "no class file: ids are whatever label_to_id the user passed (here the "
                  "project's class list)",
                  "class cx cy w h normalised, full repr, no trailing newline", 1e-9, images, {},
                  fs.paths)


# --------------------------------------------------------------------------------------------
# labelme2coco
# --------------------------------------------------------------------------------------------

def _labelme_json(name, rgb, boxes, polygons: bool) -> dict:
    W, H = _size(rgb)
    shapes = []
    for x1, y1, x2, y2, label in boxes:
        if polygons:
            pts, kind = [[x1, y1], [x2, y1], [x2, y2], [x1, y2]], "polygon"
        else:
            pts, kind = [[x1, y1], [x2, y2]], "rectangle"
        shapes.append({"label": label, "points": [[float(a), float(b)] for a, b in pts],
                       "group_id": None, "description": "", "shape_type": kind, "flags": {}})
    return {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": name,
            "imageData": None, "imageHeight": H, "imageWidth": W}


def _labelme_coco(entries, category_id_start: int):
    """entries: [(json_path_str, labelme dict, rgb, source boxes)] already sorted. Returns the
    COCO dict (before split) as sahi builds it and the truth per entry."""
    categories, name_to_id = [], {}
    coco_imgs = []
    for json_path, data, _, _ in entries:
        file_name = str(Path(json_path).parent / data["imagePath"])
        anns = []
        for shape in data["shapes"]:
            label = shape["label"]
            if label not in name_to_id:
                name_to_id[label] = category_id_start + len(name_to_id)
                categories.append({"id": name_to_id[label], "name": label, "supercategory": label})
            pts = shape["points"]
            if shape["shape_type"] == "rectangle":
                (px1, py1), (px2, py2) = pts
                bx = [round(v) for v in (px1, py1, px2 - px1, py2 - py1)]
                minx, maxx = sorted((bx[0], bx[0] + bx[2]))
                miny, maxy = sorted((bx[1], bx[1] + bx[3]))
                bbox = [float(minx), float(miny), float(maxx - minx), float(maxy - miny)]
                seg, area = [], int((maxx - minx) * (maxy - miny))
            else:
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                minx, maxx, miny, maxy = min(xs), max(xs), min(ys), max(ys)
                bbox = [float(minx), float(miny), float(maxx - minx), float(maxy - miny)]
                flat = [int(c) for p in pts for c in p]
                seg = [flat]
                area2 = sum(xs[i] * ys[(i + 1) % len(xs)] - xs[(i + 1) % len(xs)] * ys[i]
                            for i in range(len(xs)))
                area = int(abs(area2) / 2)
            anns.append((bbox, seg, name_to_id[label], area, label))
        coco_imgs.append((file_name, data["imageHeight"], data["imageWidth"], anns))
    return categories, coco_imgs


def _sahi_dict(coco_imgs, categories) -> tuple[dict, list]:
    images, annotations, truths = [], [], []
    ann_id = 1
    for image_id, (file_name, H, W, anns) in enumerate(coco_imgs, start=1):
        images.append({"height": H, "width": W, "id": image_id, "file_name": file_name})
        truth = []
        for bbox, seg, cat, area, label in anns:
            annotations.append({"iscrowd": 0, "image_id": image_id, "bbox": bbox,
                                "segmentation": seg, "category_id": cat, "id": ann_id,
                                "area": area})
            truth.append(Box(bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3], label))
            ann_id += 1
        truths.append(truth)
    return {"images": images, "annotations": annotations, "categories": categories}, truths


def write_labelme2coco(root, splits: Splits, classes: Sequence[str] | None = None, *,
                       train_split_rate: float = 1.0, per_split_runs: bool = False,
                       polygons: bool = False, category_id_start: int = 0) -> Export:
    """labelme JSONs (labelme 5 form, ``imageData`` null) beside the images, then
    ``labelme2coco.convert(<absolute folder>, <root>/runs/labelme2coco, train_split_rate)``.

    Default: all images in one folder ``labelme/`` -> ``dataset.json`` (rate 1) or ``train.json``
    + ``val.json`` (rate < 1, split by labelme2coco itself: numpy seed 0 shuffle, int(n*rate)
    train; shared category ids). ``per_split_runs``: one folder ``labelme/<split>/`` and one run
    per split -> ``runs/labelme2coco/<split>/dataset.json``, each numbering categories by first
    appearance in its own folder. ``polygons`` draws the boxes as 4-point polygons (exact float
    bbox, truncated segmentation) instead of rectangles (rounded bbox)."""
    fs = _Files(root)
    _check_classes(splits, classes)

    def write_folder(folder_parts, imgs):
        entries = []
        for name, rgb, boxes in imgs:
            img_path = fs.image((*folder_parts, name), rgb)
            data = _labelme_json(name, rgb, boxes, polygons)
            jpath = fs.json((*folder_parts, Path(name).stem + ".json"), data, indent=2)
            entries.append((os.path.join(str(fs.root.joinpath(*folder_parts)), jpath.name),
                            data, rgb, boxes, img_path, name))
        entries.sort(key=lambda e: e[0])
        return entries

    def build(entries):
        return _labelme_coco([e[:4] for e in entries], category_id_start)

    images, ann_files, cat_ids = {}, {}, {}
    if per_split_runs:
        for split, imgs in splits.items():
            entries = write_folder(("labelme", split), imgs)
            categories, coco_imgs = build(entries)
            doc, truths = _sahi_dict(coco_imgs, categories)
            ann_files[split] = fs.json(("runs", "labelme2coco", split, "dataset.json"), doc,
                                       separators=(",", ":"))
            images[split] = [ExportImage(split, e[5], e[4], *_size(e[2]), t, _src(e[3]))
                             for e, t in zip(entries, truths)]
            cat_ids[split] = {c["name"]: c["id"] for c in categories}
        names: list[str] = []
        for m in cat_ids.values():
            names += [n for n in m if n not in names]
        out_splits = tuple(splits)
        order = ("by name: each run numbers categories by first appearance in its own folder, so "
                 "the same name has different ids per file; listed here by first appearance over "
                 "the splits in order")
    else:
        all_imgs = [im for imgs in splits.values() for im in imgs]
        entries = write_folder(("labelme",), all_imgs)
        categories, coco_imgs = build(entries)
        names = [c["name"] for c in categories]
        if train_split_rate < 1:
            np.random.seed(0)
            order_idx = list(range(len(coco_imgs)))
            np.random.shuffle(order_idx)
            n_train = int(len(coco_imgs) * train_split_rate)
            parts = {"train": order_idx[:n_train], "val": order_idx[n_train:]}
            files = {"train": "train.json", "val": "val.json"}
        else:
            parts = {"dataset": list(range(len(coco_imgs)))}
            files = {"dataset": "dataset.json"}
        for split, idx in parts.items():
            doc, truths = _sahi_dict([coco_imgs[i] for i in idx], categories)
            ann_files[split] = fs.json(("runs", "labelme2coco", files[split]), doc,
                                       separators=(",", ":"))
            images[split] = [ExportImage(split, entries[i][5], entries[i][4],
                                         *_size(entries[i][2]), t, _src(entries[i][3]))
                             for i, t in zip(idx, truths)]
            cat_ids[split] = {c["name"]: c["id"] for c in categories}
        out_splits = tuple(parts)
        order = (f"category ids (from {category_id_start}) by first appearance over the sorted "
                 "labelme JSON paths and their shapes; one list shared by train and val")
    tol = 1e-9 if polygons else 1.0
    conv = ("bbox [x, y, w, h]: rectangles round(x1), round(y1), round(x2-x1), round(y2-y1) "
            "(banker's) as floats, polygons exact float bounds; x2 = x + w; file_name absolute")
    return Export(fs.root, "labelme2coco", out_splits, tuple(names), order, conv, tol, images,
                  ann_files, fs.paths, {"category_ids": cat_ids, "polygons": polygons})


# --------------------------------------------------------------------------------------------
# datumaro and CVAT (which exports through its datumaro fork)
# --------------------------------------------------------------------------------------------

def _dm_points(x1, y1, x2, y2) -> list[float]:
    return np.around([x1, y1, x2, y2], 2).tolist()


def _dm_item(name: str) -> tuple[str, str]:
    p = Path(name)
    return p.stem, p.suffix or ".jpg"


def _write_dm_coco(root, splits, classes, layout, cvat: bool) -> Export:
    fs = _Files(root)
    classes = _check_classes(splits, classes)
    image_ids: dict[str, int] = {}
    images, ann_files = {}, {}
    for split, imgs in splits.items():
        coco_images, anns, recs = [], [], []
        ann_id = 1
        for name, rgb, boxes in imgs:
            W, H = _size(rgb)
            item_id, ext = _dm_item(name)
            path = fs.image(("images", split, item_id + ext), rgb)
            image_id = image_ids.setdefault(item_id, len(image_ids) + 1)
            coco_images.append({"id": image_id, "width": W, "height": H,
                                "file_name": item_id + ext, "license": 0, "flickr_url": "",
                                "coco_url": "", "date_captured": 0})
            truth = []
            for x1, y1, x2, y2, label in boxes:
                p = _dm_points(x1, y1, x2, y2)
                # Bbox.get_bbox, then anno_tools.max_bbox over the instance's one box
                gx, gy, gw, gh = p[0], p[1], p[2] - p[0], p[3] - p[1]
                w, h = (gx + gw) - gx, (gy + gh) - gy
                bbox = [round(float(v), 2) for v in (gx, gy, w, h)]
                ann = {"id": ann_id, "image_id": image_id,
                       "category_id": classes.index(label) + 1, "segmentation": [],
                       "area": float(w * h), "bbox": bbox, "iscrowd": 0}
                if cvat:
                    ann["attributes"] = {"occluded": False, "rotation": 0.0}
                anns.append(ann)
                truth.append(Box(bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3], label))
                ann_id += 1
            recs.append(ExportImage(split, name, path, W, H, truth, _src(boxes)))
        doc = {"licenses": [{"name": "", "id": 0, "url": ""}],
               "info": {"contributor": "", "date_created": "", "description": "", "url": "",
                        "version": "", "year": ""},
               "categories": [{"id": i + 1, "name": c, "supercategory": ""}
                              for i, c in enumerate(classes)],
               "images": coco_images, "annotations": anns}
        ann_files[split] = fs.json(("annotations", f"instances_{split}.json"), doc,
                                   separators=(",", ":"))
        images[split] = recs
    return Export(fs.root, layout, tuple(splits), classes,
                  "category id = 1 + index in the project's label list (all labels, used or not)",
                  "bbox [x, y, w, h]: corners rounded to 2 decimals, then each bbox number "
                  "rounded to 2; x2 = x + w; file_name relative to images/<split>/", 0.011,
                  images, ann_files, fs.paths)


def write_datumaro_coco(root, splits: Splits, classes: Sequence[str] | None = None) -> Export:
    """``datum export -f coco_instances`` (save_media): ``annotations/instances_<split>.json``,
    ``images/<split>/<id><ext>``. Image ids continue across splits."""
    return _write_dm_coco(root, splits, classes, "datumaro_coco", cvat=False)


def write_cvat_coco(root, splits: Splits, classes: Sequence[str] | None = None) -> Export:
    """CVAT "COCO 1.0" export with images: datumaro's coco_instances plus each box's CVAT
    attributes (``occluded``, ``rotation``). A task without subsets exports as split "default"."""
    return _write_dm_coco(root, splits, classes, "cvat_coco", cvat=True)


def _write_dm_voc(root, splits, classes, layout, cvat: bool) -> Export:
    fs = _Files(root)
    classes = _check_classes(splits, classes)
    for d in ("Annotations", "JPEGImages", "SegmentationClass", "SegmentationObject",
              "ImageSets/Main", "ImageSets/Segmentation", "ImageSets/Layout", "ImageSets/Action"):
        (fs.root / d).mkdir(parents=True, exist_ok=True)
    images, ann_files, empty_lists = {}, {}, {}
    for split, imgs in splits.items():
        recs, listed, empties = [], [], []
        for name, rgb, boxes in imgs:
            W, H = _size(rgb)
            item_id, ext = _dm_item(name)
            path = fs.image(("JPEGImages", item_id + ext), rgb)
            folder = item_id[:item_id.find("_")] if "_" in item_id else ""
            objects, truth = [], []
            for x1, y1, x2, y2, label in boxes:
                p = _dm_points(x1, y1, x2, y2)
                x, y, w, h = p[0], p[1], p[2] - p[0], p[3] - p[1]
                vals = [str(x), str(y), str(x + w), str(y + h)]
                obj = [("name", label), ("truncated", "0"), ("occluded", "0"),
                       ("difficult", "0"),
                       ("bndbox", list(zip(("xmin", "ymin", "xmax", "ymax"), vals)))]
                if cvat:  # CVAT's "rotation" box attribute is not a VOC one: <attributes>
                    obj.append(("attributes", [("attribute", [("name", "rotation"),
                                                              ("value", "0.0")])]))
                objects.append(("object", obj))
                truth.append(Box(*(float(v) for v in vals), label))
            depth = "" if cvat else str(rgb.shape[-1])
            body = [("folder", folder), ("filename", item_id + ext),
                    ("source", [("database", "Unknown"), ("annotation", "Unknown"),
                                ("image", "Unknown")]),
                    ("size", [("width", str(W)), ("height", str(H)), ("depth", depth)]),
                    ("segmented", "0"), *objects]
            xml_path = fs.text(("Annotations", item_id + ".xml"), _xml("annotation", body))
            listed.append(item_id)
            if not boxes:
                empties.append(item_id)
            recs.append(ExportImage(split, name, path, W, H, truth, _src(boxes), xml_path))
        ann_files[split] = fs.text(("ImageSets", "Main", f"{split}.txt"),
                                   "".join(f"{i}\n" for i in listed))
        if empties:
            for task in ("Action", "Layout", "Segmentation"):
                fs.text(("ImageSets", task, f"{split}.txt"), "".join(f"{i}\n" for i in empties))
        empty_lists[split] = empties
        images[split] = recs
    labelmap = ["background", *classes]
    colours = _voc_colormap(len(labelmap))
    fs.text("labelmap.txt", "# label:color_rgb:parts:actions\n" + "".join(
        f"{n}:{','.join(map(str, c))}::\n" for n, c in zip(labelmap, colours)))
    return Export(fs.root, layout, tuple(splits), classes,
                  "labelmap.txt order without its leading 'background' (= project label order)",
                  "xmin ymin xmax ymax = str(float) of corners rounded to 2 decimals, 0-based "
                  "pixel edges, no +1 (not devkit 1-based)", 0.011, images, ann_files, fs.paths,
                  {"empty_items_lists": empty_lists, "labelmap_colours": dict(zip(labelmap,
                                                                                  colours))})


def write_datumaro_voc(root, splits: Splits, classes: Sequence[str] | None = None) -> Export:
    """``datum export -f voc`` (all tasks, label_map "source", save_media). Every image gets an
    XML; ``ImageSets/Main/<split>.txt`` lists all; Segmentation/Layout/Action lists name only the
    images without objects."""
    return _write_dm_voc(root, splits, classes, "datumaro_voc", cvat=False)


def write_cvat_voc(root, splits: Splits, classes: Sequence[str] | None = None) -> Export:
    """CVAT "PASCAL VOC 1.1" export with images (CVAT's datumaro fork: ``<depth>`` empty; each
    box's CVAT ``rotation`` attribute lands in ``<attributes>``; ``occluded`` is a VOC field).
    A task without subsets exports as split "default"."""
    return _write_dm_voc(root, splits, classes, "cvat_voc", cvat=True)


def _dm_yolo_line(cls_id, p, W, H):
    vals = ((p[0] + p[2]) / 2 / W, (p[1] + p[3]) / 2 / H, (p[2] - p[0]) / W, (p[3] - p[1]) / H)
    strs = ["%.6f" % v for v in vals]
    return f"{cls_id} {' '.join(strs)}\n", strs


def _write_dm_yolo(root, splits, classes, layout) -> Export:
    fs = _Files(root)
    classes = _check_classes(splits, classes)
    images, ann_files = {}, {}
    for split, imgs in splits.items():
        recs, listed = [], []
        for name, rgb, boxes in imgs:
            W, H = _size(rgb)
            item_id, ext = _dm_item(name)
            path = fs.image((f"obj_{split}_data", item_id + ext), rgb)
            text, truth = "", []
            for x1, y1, x2, y2, label in boxes:
                line, strs = _dm_yolo_line(classes.index(label), _dm_points(x1, y1, x2, y2), W, H)
                text += line
                truth.append(_yolo_truth(strs, W, H, label))
            txt = fs.text((f"obj_{split}_data", item_id + ".txt"), text)
            listed.append(f"data/obj_{split}_data/{item_id}{ext}")
            recs.append(ExportImage(split, name, path, W, H, truth, _src(boxes), txt))
        ann_files[split] = fs.text(f"{split}.txt", "".join(f"{s}\n" for s in listed))
        images[split] = recs
    names_file = fs.text("obj.names", "".join(f"{c}\n" for c in classes))
    data_file = fs.text("obj.data", f"classes = {len(classes)}\n"
            + "".join(f"{s} = data/{s}.txt\n" for s in splits)
            + "names = data/obj.names\nbackup = backup/\n")
    return Export(fs.root, layout, tuple(splits), classes, "obj.names line order = class id",
                  "class cx cy w h normalised, '%.6f' of 2-decimal corners; list paths carry a "
                  "'data/' prefix (darknet's convention: strip it, relative to the export root)",
                  0.011, images, ann_files, fs.paths,
                  {"names_file": names_file, "data_file": data_file})


def write_datumaro_yolo(root, splits: Splits, classes: Sequence[str] | None = None) -> Export:
    """``datum export -f yolo`` (darknet layout). Split names "backup", "classes", "names" are
    refused by datumaro."""
    return _write_dm_yolo(root, splits, classes, "datumaro_yolo")


def write_cvat_yolo(root, splits: Splits, classes: Sequence[str] | None = None) -> Export:
    """CVAT "YOLO 1.1" export with images (datumaro's darknet YOLO; CVAT's valid subsets are
    train and valid)."""
    return _write_dm_yolo(root, splits, classes, "cvat_yolo")


def write_ultralytics_yolo(root, splits: Splits, classes: Sequence[str] | None = None) -> Export:
    """CVAT "Ultralytics YOLO Detection 1.0" export with images (datumaro fork's YOLOv8
    converter): ``images/<split>/``, ``labels/<split>/`` (no file for an image without boxes),
    ``<split>.txt`` listing ``images/<split>/<file>``, ``data.yaml`` with ``names: {id: name}``,
    ``path: .`` and ``<split>: <split>.txt``, keys sorted."""
    fs = _Files(root)
    classes = _check_classes(splits, classes)
    images, lists = {}, {}
    for split, imgs in splits.items():
        recs, listed = [], []
        for name, rgb, boxes in imgs:
            W, H = _size(rgb)
            item_id, ext = _dm_item(name)
            path = fs.image(("images", split, item_id + ext), rgb)
            text, truth = "", []
            for x1, y1, x2, y2, label in boxes:
                line, strs = _dm_yolo_line(classes.index(label), _dm_points(x1, y1, x2, y2), W, H)
                text += line
                truth.append(_yolo_truth(strs, W, H, label))
            txt = fs.text(("labels", split, item_id + ".txt"), text) if text else None
            listed.append(f"images/{split}/{item_id}{ext}")
            recs.append(ExportImage(split, name, path, W, H, truth, _src(boxes), txt))
        lists[split] = fs.text(f"{split}.txt", "".join(f"{s}\n" for s in listed))
        images[split] = recs
    data = {"path": ".", "names": dict(enumerate(classes)), **{s: f"{s}.txt" for s in splits}}
    data_yaml = fs.text("data.yaml", yaml.dump(data))
    return Export(fs.root, "ultralytics_yolo", tuple(splits), classes,
                  "data.yaml names mapping {id: name}",
                  "class cx cy w h normalised, '%.6f' of 2-decimal corners; an image without "
                  "boxes has no label file", 0.011, images, lists, fs.paths,
                  {"data_yaml": data_yaml})


# --------------------------------------------------------------------------------------------
# LabelImg
# --------------------------------------------------------------------------------------------

def write_labelimg_voc(root, splits: Splits, classes: Sequence[str] | None = None, *,
                       save_empty: bool = False) -> Export:
    """LabelImg's PascalVOC save, one folder per split, XML beside its image (LabelImg's default
    save dir). ``save_empty``: the user also pressed save on the images without boxes (an XML
    with no object); by default those images have no XML."""
    fs = _Files(root)
    _check_classes(splits, classes)
    images = {}
    for split, imgs in splits.items():
        recs = []
        for name, rgb, boxes in imgs:
            W, H = _size(rgb)
            path = fs.image((split, name), rgb)
            objects, truth = [], []
            for x1, y1, x2, y2, label in boxes:
                xmin, ymin = max(float(x1), 1.0), max(float(y1), 1.0)
                bb = (int(xmin), int(ymin), int(float(x2)), int(float(y2)))
                if bb[3] == H or bb[1] == 1:
                    truncated = "1"
                elif bb[2] == W or bb[0] == 1:
                    truncated = "1"
                else:
                    truncated = "0"
                objects.append(("object", [("name", label), ("pose", "Unspecified"),
                                           ("truncated", truncated), ("difficult", "0"),
                                           ("bndbox", list(zip(("xmin", "ymin", "xmax", "ymax"),
                                                               map(str, bb))))]))
                truth.append(Box(*(float(v) for v in bb), label))
            xml_path = None
            if boxes or save_empty:
                body = [("folder", split), ("filename", name), ("path", str(path)),
                        ("source", [("database", "Unknown")]),
                        ("size", [("width", str(W)), ("height", str(H)),
                                  ("depth", str(rgb.shape[2]))]),
                        ("segmented", "0"), *objects]
                xml_path = fs.text((split, Path(name).stem + ".xml"),
                                   _xml("annotation", body, indent="\t"))
            recs.append(ExportImage(split, name, path, W, H, truth, _src(boxes), xml_path))
        images[split] = recs
    seen = tuple(sorted({b[4] for imgs in splits.values() for _, _, bs in imgs for b in bs}))
    return Export(fs.root, "labelimg_voc", tuple(splits), seen,
                  "no class file (predefined_classes.txt stays with LabelImg): sorted names",
                  "integers: int() truncation, xmin/ymin below 1 set to 1, no +1: read as pixel "
                  "edges as written; <path> is the absolute image path", 1.0, images, {},
                  fs.paths)


# --------------------------------------------------------------------------------------------
# Roboflow
# --------------------------------------------------------------------------------------------

def _rf_name(name: str, rgb: np.ndarray) -> str:
    p = Path(name)
    digest = hashlib.md5(p.name.encode() + rgb.tobytes()).hexdigest()
    return f"{p.stem}_{p.suffix.lstrip('.').lower()}.rf.{digest}.jpg"


def write_roboflow_yolo(root, splits: Splits, classes: Sequence[str] | None = None, *,
                        workspace: str = "fixtures", project: str = "bana-fixture",
                        version: int = 1) -> Export:
    """A Roboflow "YOLOv8" download: ``<split>/images/<renamed>.jpg``, ``<split>/labels/`` (empty
    .txt for an image without boxes), ``data.yaml`` with ``../<split>/images`` paths, ``nc``,
    ``names`` (alphabetical, Python list) and a ``roboflow:`` block. Roboflow calls the
    validation split "valid" (use ``default_splits(..., "valid")``)."""
    fs = _Files(root)
    _check_classes(splits, classes)
    names = sorted({b[4] for imgs in splits.values() for _, _, bs in imgs for b in bs}
                   | set(classes or ()))
    images = _yolo_split_folders(fs, splits, names, _float_cxcywh, "\n", rename=_rf_name,
                                 fmt="JPEG")
    key = {"train": "train", "valid": "val", "val": "val", "test": "test"}
    text = "".join(f"{key.get(s, s)}: ../{s}/images\n" for s in splits)
    text += f"\nnc: {len(names)}\nnames: {names!r}\n\nroboflow:\n  workspace: {workspace}\n" \
            f"  project: {project}\n  version: {version}\n  license: CC BY 4.0\n" \
            f"  url: https://universe.roboflow.com/{workspace}/{project}/dataset/{version}\n"
    data_yaml = fs.text("data.yaml", text)
    return Export(fs.root, "roboflow_yolo", tuple(splits), tuple(names),
                  "data.yaml names list (Roboflow sorts class names alphabetically)",
                  "class cx cy w h normalised, full precision; data.yaml paths are '../<split>/"
                  "images' (resolve against the data.yaml folder, then its parent)", 1e-9,
                  images, {s: data_yaml for s in splits}, fs.paths, {"data_yaml": data_yaml})


def write_roboflow_coco(root, splits: Splits, classes: Sequence[str] | None = None, *,
                        project: str = "objects") -> Export:
    """A Roboflow "COCO" download: ``<split>/_annotations.coco.json`` beside the renamed images;
    category 0 is a synthetic root (``supercategory: "none"``, no annotations), classes follow
    from 1 in alphabetical order with the root as supercategory."""
    fs = _Files(root)
    _check_classes(splits, classes)
    names = sorted({b[4] for imgs in splits.values() for _, _, bs in imgs for b in bs}
                   | set(classes or ()))
    stamp = "2024-04-03T14:35:24+00:00"
    images, ann_files = {}, {}
    for split, imgs in splits.items():
        coco_images, anns, recs = [], [], []
        for image_id, (name, rgb, boxes) in enumerate(imgs):
            W, H = _size(rgb)
            rf = _rf_name(name, rgb)
            path = fs.image((split, rf), rgb, "JPEG")
            coco_images.append({"id": image_id, "license": 1, "file_name": rf, "height": H,
                                "width": W, "date_captured": stamp, "extra": {"name": name}})
            truth = []
            for x1, y1, x2, y2, label in boxes:
                x1, y1, x2, y2 = float(x1), float(y1), float(x2), float(y2)
                bbox = [_js_number(v) for v in (x1, y1, x2 - x1, y2 - y1)]
                anns.append({"id": len(anns), "image_id": image_id,
                             "category_id": names.index(label) + 1, "bbox": bbox,
                             "area": _js_number(round((x2 - x1) * (y2 - y1), 3)),
                             "segmentation": [], "iscrowd": 0})
                truth.append(Box(bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3], label))
            recs.append(ExportImage(split, name, path, W, H, truth, _src(boxes)))
        doc = {"info": {"year": "2024", "version": "1", "description": "Exported from roboflow.com",
                        "contributor": "",
                        "url": "https://public.roboflow.com/object-detection/undefined",
                        "date_created": stamp},
               "licenses": [{"id": 1, "url": "https://creativecommons.org/licenses/by/4.0/",
                             "name": "CC BY 4.0"}],
               "categories": [{"id": 0, "name": project, "supercategory": "none"}]
               + [{"id": i + 1, "name": n, "supercategory": project} for i, n in enumerate(names)],
               "images": coco_images, "annotations": anns}
        ann_files[split] = fs.json((split, "_annotations.coco.json"), doc, separators=(",", ":"))
        images[split] = recs
    return Export(fs.root, "roboflow_coco", tuple(splits), tuple(names),
                  "category ids 1..N (alphabetical); id 0 is the project root, not a class",
                  "bbox [x, y, w, h] pixels, JS number form; x2 = x + w", 1e-9, images, ann_files,
                  fs.paths, {"root_category": project})


# --------------------------------------------------------------------------------------------
# Label Studio
# --------------------------------------------------------------------------------------------

def write_label_studio_coco(root, splits: Splits, classes: Sequence[str] | None = None) -> Export:
    """Label Studio's COCO export (label-studio-converter `convert_to_coco`) of one project per
    split: ``<split>/result.json`` and ``<split>/images/<8 hex>-<name>``. Images without boxes
    are left out entirely."""
    fs = _Files(root)
    labels = sorted(_check_classes(splits, classes))
    images, ann_files = {}, {}
    for split, imgs in splits.items():
        coco_images, anns, recs = [], [], []
        for name, rgb, boxes in imgs:
            if not boxes:
                continue
            W, H = _size(rgb)
            upload = hashlib.md5(name.encode()).hexdigest()[:8] + "-" + name
            path = fs.image((split, "images", upload), rgb)
            image_id = len(coco_images)
            coco_images.append({"width": W, "height": H, "id": image_id,
                                "file_name": f"images/{upload}"})
            truth = []
            for x1, y1, x2, y2, label in boxes:
                # Label Studio stores percentages of the image size
                xp, yp = float(x1) / W * 100, float(y1) / H * 100
                wp, hp = (float(x2) - float(x1)) / W * 100, (float(y2) - float(y1)) / H * 100
                x, y = int(xp / 100 * W), int(yp / 100 * H)
                w, h = int(wp / 100 * W), int(hp / 100 * H)
                anns.append({"id": len(anns), "image_id": image_id,
                             "category_id": labels.index(label), "segmentation": [],
                             "bbox": [x, y, w, h], "ignore": 0, "iscrowd": 0, "area": w * h})
                truth.append(Box(float(x), float(y), float(x + w), float(y + h), label))
            recs.append(ExportImage(split, name, path, W, H, truth, _src(boxes)))
        doc = {"images": coco_images, "categories": [{"id": i, "name": n}
                                                     for i, n in enumerate(labels)],
               "annotations": anns,
               "info": {"year": 2024, "version": "1.0", "description": "",
                        "contributor": "Label Studio", "url": "",
                        "date_created": "2024-04-03 14:35:24.000000"}}
        ann_files[split] = fs.json((split, "result.json"), doc, indent=2)
        images[split] = recs
    return Export(fs.root, "label_studio_coco", tuple(splits), tuple(labels),
                  "category ids 0..N-1 over the labelling config's labels, sorted",
                  "bbox [x, y, w, h] integers, x and w truncated separately from percentages; "
                  "x2 = x + w; file_name relative to the JSON's folder", 2.0, images, ann_files,
                  fs.paths)


WRITERS = {
    "supervision_coco": write_supervision_coco,
    "supervision_voc": write_supervision_voc,
    "supervision_yolo": write_supervision_yolo,
    "globox_coco": write_globox_coco,
    "globox_voc": write_globox_voc,
    "globox_yolo": write_globox_yolo,
    "labelme2coco": write_labelme2coco,
    "datumaro_coco": write_datumaro_coco,
    "datumaro_voc": write_datumaro_voc,
    "datumaro_yolo": write_datumaro_yolo,
    "cvat_coco": write_cvat_coco,
    "cvat_voc": write_cvat_voc,
    "cvat_yolo": write_cvat_yolo,
    "ultralytics_yolo": write_ultralytics_yolo,
    "labelimg_voc": write_labelimg_voc,
    "roboflow_yolo": write_roboflow_yolo,
    "roboflow_coco": write_roboflow_coco,
    "label_studio_coco": write_label_studio_coco,
}
