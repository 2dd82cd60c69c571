"""The PASCAL VOC layout: VOC 2012 (+ SBD) itself, and VOC-XML exports of annotation tools
(LabelImg, CVAT "Pascal VOC 1.1", datumaro, supervision, globox) with their own classes.

Under DATA.ROOT (SPEC §0):
    JPEGImages/<id>.<ext>           any common image extension (.jpg, .png, ...); images/ where
                                    JPEGImages/ holds none (Label Studio's VOC export)
    Annotations/<id>.xml            <object><name>, <bndbox> xmin ymin xmax ymax; an image whose
                                    XML is absent has no objects (LabelImg writes none for them)
    ImageSets/Segmentation/<split>.txt, or ImageSets/Main/<split>.txt: the image ids of a split
    SegmentationClassAug/<id>.png   optional ground truth (or SegmentationClass/), for scoring
    BgMaskfromBoxes/<id>.png        written from the boxes on first use
    labelmap.txt                    optional class list (a plain list, or datumaro's / CVAT's
                                    `name:color:parts:actions` lines); DATA.CLASSES takes
                                    precedence; neither = the 20 PASCAL VOC classes

Or, for a split without a list (supervision, globox, LabelImg, Roboflow's VOC export), a folder
of its own, ROOT/<split>/:
    images/, JPEGImages/ or <split>/ itself    the split's images (every image there, by stem)
    Annotations/, annotations/, labels/ or <split>/ itself    <id>.xml, absent = no objects
    SegmentationClassAug/ or SegmentationClass/    optional ground truth
    and the masks written in ROOT/BgMaskfromBoxes/<split>/<id>.png.

Coordinates: the XML numbers are read as floats and used as they are, as the authors read PASCAL
VOC: xmin..xmax are pixel edges (a box covers columns int(xmin) .. int(xmax) - 1 of the
background mask), with no 1-based shift. Every object is kept, difficult ones too.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from data.base import MAX_SIDE, Annotation, DatasetFormat, check_numbers, no_boxes
from utils.boxes import write_new_bg_masks
from utils.errors import BanaError
from utils.io import image_files, read_image_size, read_label_png
from utils.palette import VOC_CLASSES
from utils.parsing import short
from utils.records import fingerprint

SPLIT_DIR = Path("ImageSets") / "Segmentation"
MAIN_SPLIT_DIR = Path("ImageSets") / "Main"
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
    for number, obj in enumerate(tree.getroot().iter("object"), start=1):
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
        check_numbers([box], f"annotation {xml_path}", "<bndbox> xmin, ymin, xmax, ymax",
                      lambda k: f"object {number} ({short(name)})")
        if box[2] < box[0] or box[3] < box[1]:
            raise BanaError(f"annotation {xml_path}: object '{name}' has xmin, ymin, xmax, ymax "
                            f"= {box}, a box whose max is below its min (swapped corners?). Fix "
                            "the export; such a box would silently become background.")
        boxes.append(box)
        labels.append(classes.index(name) if name in classes[1:] else 0)
    size = None
    try:
        width, height = (float(tree.getroot().find("size").findtext(k))
                         for k in ("width", "height"))
    except (AttributeError, TypeError, ValueError):
        pass  # no (numeric) <size>: nothing to check the image against
    else:
        if (width > 0 and height > 0) or not (width >= 0 and height >= 0):  # 0: not known
            width, height = check_numbers([[width, height]], f"annotation {xml_path}",
                                          "width, height", lambda k: "<size>",
                                          integral=True, low=1, high=MAX_SIDE)[0].tolist()
            size = (height, width)
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
        self._folders: dict[str, SplitFolder | None] = {}

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
        layout = {"images": "JPEGImages/<id>.<jpg|png|...> (or images/<id>.<...>)",
                  "split": "a split list ImageSets/Main/<split>.txt (one image id per line; "
                           "write one for an export that has none) or the split's own folder "
                           "<split>/ of images and XML files",
                  "root": "Annotations/, JPEGImages/ and ImageSets/",
                  "ground truth": "SegmentationClassAug/<id>.png (or SegmentationClass/), "
                                  "optional: without it, train without validation and score "
                                  "with evaluate.py on a split that has it"}
        return (f"a VOC-layout dataset keeps {layout.get(what, what)} under DATA.ROOT "
                f"({self.root}) for every id of the split list")

    # Where a split is: a split list (the VOC tree), or a folder of its own (exports).
    def _folder(self, split: str) -> "SplitFolder | None":
        """The split's own folder when there is no split list for it (None otherwise)."""
        if split not in self._folders:
            self._folders[split] = None if self._list_file(split) is not None \
                else SplitFolder.find(self.root, split)
        return self._folders[split]

    def in_own_folder(self, split: str) -> bool:
        """The split is a folder ROOT/<split>/ of its own (no split list)."""
        return self._folder(split) is not None

    def _list_file(self, split: str) -> Path | None:
        """ImageSets/Segmentation/<split>.txt, or ImageSets/Main/<split>.txt where there is no
        Segmentation list, or where the Segmentation list is datumaro's list of the images
        without any annotation (none of its images has objects or a mask); None: neither."""
        seg, main = self.root / SPLIT_DIR / f"{split}.txt", self.root / MAIN_SPLIT_DIR / f"{split}.txt"
        if seg.is_file() and (not main.is_file() or self._a_segmentation_list(seg)):
            return seg
        return main if main.is_file() else None

    def _list_path(self, split: str) -> Path:
        path = self._list_file(split)
        if path is not None:
            return path
        if not self.root.is_dir():
            raise BanaError(f"DATA.ROOT {self.root} does not exist or is not a folder: "
                            f"{self.missing_files_hint('root')}.")
        found = sorted(p.stem for d in (SPLIT_DIR, MAIN_SPLIT_DIR)
                       for p in (self.root / d).glob("*.txt"))
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir()
                         and SplitFolder.find(self.root, p.name) is not None)
        seg = self.root / SPLIT_DIR / f"{split}.txt"
        raise BanaError(
            f"split '{split}' not found under {self.root}: no split list {SPLIT_DIR / split}.txt "
            f"or {MAIN_SPLIT_DIR / split}.txt, and no folder {split}/ with images and XML files"
            + (f"; the split lists there are: {', '.join(found)}" if found else "")
            + (f"; the split folders there are: {', '.join(folders)}" if folders else "")
            + (f". Set DATA.SPLIT / the split keys to one of them, or write {seg} with one image "
               f"id per line." if found or folders else f". {self.missing_files_hint('split')}."))

    def _a_segmentation_list(self, path: Path) -> bool:
        ids = _read_list(path)
        return any(self._gt_path("", i) is not None or self._has_objects(i) for i in ids)

    def _has_objects(self, image_id: str) -> bool:
        xml = self.root / "Annotations" / f"{image_id}.xml"
        return xml.is_file() and "<object" in xml.read_text(errors="replace")

    def split_ids(self, split: str) -> list[str]:
        """Image ids of the split, in list (or file name) order. A list line may also be a
        DeepLab-style pair "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png": the id is taken
        from the first path. A missing or empty list, or an id listed twice -> BanaError naming
        the file."""
        if split not in self._splits:
            folder = self._folder(split)
            if folder is not None:
                ids, where = folder.ids(), f"{folder.xml_dir.relative_to(self.root)}/<id>.xml"
            else:
                ids, where = self._listed_ids(split), "Annotations/<id>.xml"
            without = [i for i in ids if not self.xml_path(split, i).is_file()]
            if without:
                print(f"note: {len(without)} of {len(ids)} images of split '{split}' have no "
                      f"{where} (e.g. {without[0]}): taken as images without objects, all "
                      "background.", flush=True)
            self._splits[split] = ids
            self._without_xml[split] = len(without)
        return self._splits[split]

    def _listed_ids(self, split: str) -> list[str]:
        path = self._list_path(split)
        ids = _read_list(path)
        if not ids:
            raise BanaError(f"split list {path} is empty: expected one image id per line.")
        twice = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
        if twice:
            raise BanaError(f"split list {path} lists {len(twice)} image id(s) more than once "
                            f"({', '.join(twice[:5])}): each would count twice. Remove the "
                            "repeats.")
        return ids

    # Files.
    @cached_property
    def _image_dir(self) -> Path:
        """JPEGImages/, or images/ where an export keeps its images there (Label Studio's VOC
        export) and JPEGImages/ holds none."""
        for name in ("JPEGImages", "images"):
            if _images_by_stem(self.root / name):
                return self.root / name
        return self.root / "JPEGImages"

    @cached_property
    def _images(self) -> dict[str, Path]:
        """The image folder by stem: an export may hold .jpg, .png or another image format."""
        return _images_by_stem(self._image_dir)

    def image_path(self, split: str, image_id: str) -> Path:
        folder = self._folder(split) if split else None
        if folder is not None:
            return folder.images.get(image_id, folder.image_dir / f"{image_id}.jpg")
        return self._images.get(image_id, self._image_dir / f"{image_id}.jpg")

    def xml_path(self, split: str, image_id: str) -> Path:
        folder = self._folder(split) if split else None
        return (folder.xml_dir if folder is not None else self.root / "Annotations") \
            / f"{image_id}.xml"

    def annotation_source(self, split: str, image_id: str) -> Path:
        return self.xml_path(split, image_id)

    def bg_mask_path(self, split: str, image_id: str) -> Path:
        """BgMaskfromBoxes/<id>.png (the authors' place); BgMaskfromBoxes/<split>/<id>.png for a
        split folder, whose ids may repeat in another split. (DATA.BG_MASK_DIR moves the
        folder: `bg_mask_root`.)"""
        folder = self._folder(split) if split else None
        sub = (split,) if folder is not None else ()
        return self.bg_mask_root.joinpath(*sub, f"{image_id}.png")

    def annotation(self, split: str, image_id: str) -> Annotation:
        xml = self.xml_path(split, image_id)
        if not xml.is_file():
            return no_boxes()
        boxes, classes, size = read_xml(xml, self._classes)
        return Annotation(boxes, classes, size=size)

    def annotated_size_hint(self) -> str:
        return ("the <size> of its XML does not match the image: re-export the annotation, or "
                "check that the images and the XML files belong together")

    # Ground truth.
    def _gt_path(self, split: str, image_id: str) -> Path | None:
        folder = self._folder(split) if split else None
        base = folder.path if folder is not None else self.root
        for d in GT_DIRS:
            path = base / d / f"{image_id}.png"
            if path.is_file():
                return path
        return None

    def gt_ids(self, split: str) -> list[str]:
        return [i for i in self.split_ids(split) if self._gt_path(split, i) is not None]

    def gt_label(self, split: str, image_id: str) -> np.ndarray | None:
        """The checked ground truth: class values, and the size of its image as shown (so that a
        cropped GT is blamed on the GT, not on the labels compared with it)."""
        path = self._gt_path(split, image_id)
        if path is None:
            return None
        image = self.image_path(split, image_id)
        return read_label_png(path, len(self._classes), "ground truth",
                              read_image_size(image, exif=True),
                              "re-create it, or check DATA.NUM_CLASSES", image=f"its image {image}")


def _images_by_stem(folder: Path) -> dict[str, Path]:
    found = {}
    if folder.is_dir():
        for p in image_files(folder):
            found.setdefault(p.stem, p)
    return found


# A split folder's image and XML sub-folders, in the order they are tried: supervision writes
# <split>/images + <split>/labels, globox <split>/images + <split>/Annotations, LabelImg and
# Roboflow's VOC export put each XML beside its image in <split>/.
IMAGE_DIRS = ("images", "JPEGImages", ".")
XML_DIRS = ("Annotations", "annotations", "labels", ".")


@dataclass
class SplitFolder:
    """A split kept in a folder of its own, ROOT/<split>/, without a split list: its images are
    every image of the image folder, named by file stem; an image without an XML file has no
    objects."""

    path: Path
    image_dir: Path
    xml_dir: Path
    images: dict[str, Path]

    @classmethod
    def find(cls, root: Path, split: str) -> "SplitFolder | None":
        path = root / split
        if not split or not path.is_dir():
            return None
        image_dir = next((path / d for d in IMAGE_DIRS if _images_by_stem(path / d)), None)
        xml_dir = next((path / d for d in XML_DIRS if any((path / d).glob("*.xml"))), None)
        if image_dir is None or xml_dir is None:
            return None
        return cls(path, image_dir, xml_dir, _images_by_stem(image_dir))

    def ids(self) -> list[str]:
        """The image stems. An XML file without its image -> BanaError: its boxes would be lost."""
        ids = list(self.images)
        orphans = sorted(p.stem for p in self.xml_dir.glob("*.xml") if p.stem not in self.images)
        if orphans:
            raise BanaError(f"{len(orphans)} XML file(s) in {self.xml_dir} have no image in "
                            f"{self.image_dir} (e.g. {orphans[0]}.xml): restore the images, or "
                            "remove the annotations of images you left out.")
        repeats = [p.name for p in image_files(self.image_dir) if self.images[p.stem] != p]
        if repeats:
            raise BanaError(f"{self.image_dir} holds {repeats[0]} and "
                            f"{self.images[Path(repeats[0]).stem].name}, which share the name "
                            "that labels them: rename one.")
        return ids


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


def write_bg_masks(root, ids=None, workers: int = 1, progress: bool = True,
                   split: str = "") -> dict:
    """Write the masks of `ids` (default: every Annotations/*.xml); returns counts. `split`
    names the split folder the ids are in, for an export without split lists (data/voc.py);
    "" is the VOC tree (JPEGImages/, Annotations/).

    Returns {"written": n, "skipped": n (already there), "total": n}."""
    root = Path(root)
    if not root.is_dir():
        raise BanaError(f"--data-root {root} does not exist or is not a folder: give the folder "
                        "holding the dataset's Annotations/ and JPEGImages/ (or its split "
                        "folders, with --splits).")
    voc = VOCData(AnyClasses(), root)
    if ids is None:
        ann_dir = root / "Annotations"
        if not ann_dir.is_dir():
            raise BanaError(f"{ann_dir} does not exist: a VOC-layout dataset keeps one XML per "
                            "image there; for an export with a folder per split (train/, val/), "
                            "name the splits with --splits.")
        ids = sorted(p.stem for p in ann_dir.glob("*.xml"))
        if not ids:
            raise BanaError(f"{ann_dir} holds no .xml annotation.")
    missing = [i for i in ids if not voc.image_path(split, i).is_file()]
    if missing:
        raise BanaError(f"{len(missing)} of {len(ids)} images are missing, e.g. "
                        f"{voc.image_path(split, missing[0])}: the mask takes the image's size; "
                        "restore the images.")
    annotations = {i: xml_boxes(voc.xml_path(split, i)) for i in ids}
    jobs = [(voc.bg_mask_path(split, i), annotations[i][0], None, voc.image_path(split, i))
            for i in ids]
    written = write_new_bg_masks(jobs, [(i, fingerprint(*annotations[i])) for i in ids], workers,
                                 progress)
    return {"written": written, "skipped": len(jobs) - written, "total": len(jobs)}


class AnyClasses:
    """A data config for the masks: they do not depend on class names or counts."""

    CLASSES = ["object"]
    NUM_CLASSES = None
