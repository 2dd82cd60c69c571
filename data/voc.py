"""The PASCAL VOC layout: VOC 2012 (+ SBD) itself, and VOC-XML exports of annotation tools
(LabelImg, CVAT "Pascal VOC 1.1", datumaro, supervision, globox) with their own classes.

Under DATA.ROOT (SPEC §0):
    JPEGImages/<id>.<ext>           any common image extension (.jpg, .png, ...)
    Annotations/<id>.xml            <object><name>, <bndbox> xmin ymin xmax ymax; an image whose
                                    XML is absent has no objects (LabelImg writes none for them)
    ImageSets/Segmentation/<split>.txt, or ImageSets/Main/<split>.txt: the image ids of a split
    SegmentationClassAug/<id>.png   optional ground truth (or SegmentationClass/), for scoring
    BgMaskfromBoxes/<id>.png        written from the boxes on first use
    labelmap.txt                    optional class list (a plain list, or datumaro's / CVAT's
                                    `name:color:parts:actions` lines); DATA.CLASSES takes
                                    precedence; neither = the 20 PASCAL VOC classes

Coordinates: the XML numbers are read as floats and used as they are, as the authors read PASCAL
VOC: xmin..xmax are pixel edges (a box covers columns int(xmin) .. int(xmax) - 1 of the
background mask), with no 1-based shift. Every object is kept, difficult ones too.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from functools import cached_property
from pathlib import Path

import numpy as np

from data.base import Annotation, DatasetFormat, no_boxes
from utils.errors import BanaError
from utils.io import read_image_size, read_label_png
from utils.palette import VOC_CLASSES

SPLIT_DIR = Path("ImageSets") / "Segmentation"
MAIN_SPLIT_DIR = Path("ImageSets") / "Main"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
GT_DIRS = ("SegmentationClassAug", "SegmentationClass")
LABELMAP = "labelmap.txt"


def read_class_list(value, root: Path | None = None) -> tuple[tuple[str, ...], str]:
    """(class names without background, where they came from) for DATA.CLASSES: a list of names,
    or one path to a file with a name per line (a plain list, or CVAT's / datumaro's labelmap.txt
    with `name:colour:parts:actions` lines and `#` comments). Empty: ROOT/labelmap.txt if it
    exists, else the 20 PASCAL VOC classes. A `background` entry is dropped: class 0 is always
    background."""
    value = list(value or ())
    if not value and root is not None and (Path(root) / LABELMAP).is_file():
        value = [str(Path(root) / LABELMAP)]
    if not value:
        return tuple(VOC_CLASSES[1:]), "PASCAL VOC"
    if len(value) == 1 and (Path(value[0]).is_file() or value[0].endswith(".txt")):
        path = Path(value[0])
        if not path.is_file():
            raise BanaError(f"DATA.CLASSES names the class list {path}, which does not exist: "
                            "give a file with one class name per line (CVAT/LabelImg/datumaro "
                            "labelmap.txt works), or the names themselves, e.g. [cat, dog].")
        lines = [line.split("#", 1)[0].split(":", 1)[0].strip()
                 for line in path.read_text().splitlines()]
        names, source = [n for n in lines if n], str(path)
    else:
        names, source = [str(n).strip() for n in value], "DATA.CLASSES"
    names = [n for n in names if n.lower() != "background"]
    if not names:
        raise BanaError(f"{source} lists no class names (besides background).")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BanaError(f"{source} lists {', '.join(duplicates)} more than once: two classes of "
                        "one name could not be told apart.")
    return tuple(names), source


def check_num_classes(classes, num_classes, where: str) -> None:
    if num_classes is not None and num_classes != len(classes):
        raise BanaError(f"{where} has {len(classes) - 1} classes plus background, so "
                        f"DATA.NUM_CLASSES must be {len(classes)}, not {num_classes} "
                        f"(--opts DATA.NUM_CLASSES {len(classes)}).")


def parse_annotation(xml_path, classes=VOC_CLASSES, strict: bool = True):
    """Boxes and classes of a VOC annotation: float32 (K, 4) x1, y1, x2, y2 and int64 (K,);
    see `read_xml`."""
    return read_xml(xml_path, classes, strict)[:2]


def read_xml(xml_path, classes=VOC_CLASSES, strict: bool = True):
    """Boxes, classes and recorded size of a VOC annotation: (float32 (K, 4) x1, y1, x2, y2,
    int64 (K,), (H, W) or None).

    classes: the class names, background first (class k is `classes[k]`). With `strict`, an
    object of another class is an error; without, every object's box is read (the background
    mask does not depend on names) and its class is 0. The numbers are the XML's floats, every
    object kept, difficult ones too (SPEC §0). Missing or non-numeric coordinates, a max below
    its min, or malformed XML -> BanaError naming the file."""
    xml_path = Path(xml_path)
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as err:
        raise BanaError(f"annotation {xml_path} is not valid XML ({err}); re-create or "
                        "re-export it.") from None
    boxes, labels = [], []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if strict and name not in classes[1:]:
            fix = ("list your classes in DATA.CLASSES (names, or a labelmap.txt file) or in "
                   "ROOT/labelmap.txt" if tuple(classes) == VOC_CLASSES else "add it to "
                   "DATA.CLASSES (or labelmap.txt)")
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
        labels.append(classes.index(name) if name in classes[1:] else 0)
    size = None
    try:
        width, height = (int(float(tree.getroot().find("size").findtext(k)))
                         for k in ("width", "height"))
        size = (height, width) if width > 0 and height > 0 else None
    except (AttributeError, TypeError, ValueError):
        pass  # no (numeric) <size>: nothing to check the image against
    return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            np.asarray(labels, dtype=np.int64), size)


class VOCData(DatasetFormat):
    """The PASCAL VOC layout (see the module doc) with the classes of DATA.CLASSES."""

    name = "voc"
    test_split = "test"

    def __init__(self, data_cfg, root: Path):
        super().__init__(data_cfg, root)
        names, self.class_source = read_class_list(getattr(data_cfg, "CLASSES", ()), self.root)
        self._classes = ("background", *names)
        check_num_classes(self._classes, getattr(data_cfg, "NUM_CLASSES", None),
                          self.class_source)
        self._splits: dict[str, list[str]] = {}
        self._without_xml: dict[str, int] = {}

    @property
    def classes(self) -> tuple[str, ...]:
        return self._classes

    @property
    def benchmark(self) -> bool:
        """PASCAL VOC 2012 itself (its classes), rather than a user's own export."""
        return self.class_source == "PASCAL VOC"

    def missing_files_hint(self, what: str) -> str:
        if self.benchmark:
            return ("create the PASCAL VOC tree with `bash data/setup_voc.bash DATA_DIR`, or, "
                    "for your own data, set DATA.CLASSES (or ROOT/labelmap.txt)")
        layout = {"images": "JPEGImages/<id>.<jpg|png|...>",
                  "ground truth": "SegmentationClassAug/<id>.png (or SegmentationClass/), "
                                  "optional: without it, train without validation and score "
                                  "with evaluate.py on a split that has it"}
        return (f"a VOC-layout dataset keeps {layout.get(what, what)} under DATA.ROOT "
                f"({self.root}) for every id of the split list")

    # Split lists.
    def _list_path(self, split: str) -> Path:
        """ImageSets/Segmentation/<split>.txt, or ImageSets/Main/<split>.txt where there is no
        Segmentation list, or where the Segmentation list is datumaro's list of the images
        without any annotation (none of its images has objects or a mask)."""
        seg, main = self.root / SPLIT_DIR / f"{split}.txt", self.root / MAIN_SPLIT_DIR / f"{split}.txt"
        if seg.is_file() and (not main.is_file() or self._a_segmentation_list(seg)):
            return seg
        if main.is_file():
            return main
        if not self.root.is_dir():
            raise BanaError(f"DATA.ROOT {self.root} does not exist or is not a folder: "
                            f"{self.missing_files_hint('root')}.")
        found = sorted(p.stem for d in (SPLIT_DIR, MAIN_SPLIT_DIR)
                       for p in (self.root / d).glob("*.txt"))
        raise BanaError(f"split list {seg} not found (split '{split}'; ImageSets/Main/{split}.txt "
                        f"neither)" + (f"; the splits there are: {', '.join(found)}" if found
                                       else "") + f". {self.missing_files_hint('split')}.")

    def _a_segmentation_list(self, path: Path) -> bool:
        ids = _read_list(path)
        return any(self._gt_path(i) is not None or self._has_objects(i) for i in ids)

    def _has_objects(self, image_id: str) -> bool:
        xml = self.xml_path(image_id)
        return xml.is_file() and "<object" in xml.read_text(errors="replace")

    def split_ids(self, split: str) -> list[str]:
        """Image ids of the split's list, in file order. A line may also be a DeepLab-style pair
        "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png": the id is taken from the first
        path. A missing or empty list, or an id listed twice -> BanaError naming the file."""
        if split not in self._splits:
            path = self._list_path(split)
            ids = _read_list(path)
            if not ids:
                raise BanaError(f"split list {path} is empty: expected one image id per line.")
            twice = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) \
                else []
            if twice:
                raise BanaError(f"split list {path} lists {len(twice)} image id(s) more than once "
                                f"({', '.join(twice[:5])}): each would count twice. Remove the "
                                "repeats.")
            without = [i for i in ids if not self.xml_path(i).is_file()]
            if without:
                print(f"note: {len(without)} of {len(ids)} images of split '{split}' have no "
                      f"Annotations/<id>.xml (e.g. {without[0]}): taken as images without "
                      "objects, all background.", flush=True)
            self._splits[split] = ids
            self._without_xml[split] = len(without)
        return self._splits[split]

    # Files.
    @cached_property
    def _images(self) -> dict[str, Path]:
        """JPEGImages/ by stem: an export may hold .jpg, .png or another image format."""
        folder = self.root / "JPEGImages"
        found = {}
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    found.setdefault(p.stem, p)
        return found

    def image_path(self, split: str, image_id: str) -> Path:
        return self._images.get(image_id, self.root / "JPEGImages" / f"{image_id}.jpg")

    def xml_path(self, image_id: str) -> Path:
        return self.root / "Annotations" / f"{image_id}.xml"

    def annotation_source(self, split: str, image_id: str) -> Path:
        return self.xml_path(image_id)

    def bg_mask_path(self, split: str, image_id: str) -> Path:
        return self.root / "BgMaskfromBoxes" / f"{image_id}.png"

    def annotation(self, split: str, image_id: str) -> Annotation:
        xml = self.xml_path(image_id)
        if not xml.is_file():
            return no_boxes()
        boxes, classes, size = read_xml(xml, self._classes)
        return Annotation(boxes, classes, size=size)

    def annotated_size_hint(self) -> str:
        return ("the <size> of its XML does not match the image: re-export the annotation, or "
                "check that JPEGImages/ and Annotations/ belong together")

    # Ground truth.
    def _gt_path(self, image_id: str) -> Path | None:
        for d in GT_DIRS:
            path = self.root / d / f"{image_id}.png"
            if path.is_file():
                return path
        return None

    def gt_ids(self, split: str) -> list[str]:
        return [i for i in self.split_ids(split) if self._gt_path(i) is not None]

    def gt_label(self, split: str, image_id: str) -> np.ndarray | None:
        """The checked ground truth: class values, and the size of its image as shown (so that a
        cropped GT is blamed on the GT, not on the labels compared with it)."""
        path = self._gt_path(image_id)
        if path is None:
            return None
        image = self.image_path(split, image_id)
        return read_label_png(path, len(self._classes), "ground truth",
                              read_image_size(image, exif=True),
                              "re-create it, or check DATA.NUM_CLASSES", image=f"its image {image}")


def _read_list(path: Path) -> list[str]:
    ids = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if fields:
            ids.append(Path(fields[0]).stem if "/" in fields[0] else fields[0])
    return ids


def xml_boxes(xml_path) -> tuple[np.ndarray, tuple[int, int] | None]:
    """Every object box of a VOC XML, whatever its class name (the background mask): float32
    (K, 4), and the size the XML records (or None); an absent file has no box."""
    if not Path(xml_path).is_file():
        return np.zeros((0, 4), np.float32), None
    boxes, _, size = read_xml(xml_path, strict=False)
    return boxes, size
