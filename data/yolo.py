"""The YOLO layout: boxes as Ultralytics, Roboflow, supervision, globox and darknet exporters
(CVAT "YOLO 1.1", datumaro) write them for detection.

Under DATA.ROOT:
    class names                      the first of: data.yaml (or data.yml) `names:`, a list or an
                                     id -> name mapping; obj.names or classes.txt, one name per
                                     line; DATA.CLASSES (exports without a class file: globox).
                                     Class k of YOLO is class id k + 1 here (0 is background), so
                                     DATA.NUM_CLASSES = len(names) + 1. A data.yaml `<split>:`
                                     entry that names an existing folder (relative to `path:` or
                                     to the file) says where the split's images are; `path`,
                                     `train`, `val`, `nc` are otherwise not needed.
    images/<split>/*.<jpg|png|...>   the images of a split (Ultralytics); or <split>/images/
                                     (Roboflow, supervision, globox); or obj_<split>_data/
                                     (darknet, the label files beside the images)
    labels/<split>/<stem>.txt        one `class cx cy w h` line per box, normalised to [0, 1] by
                                     the image's width and height; an empty or missing file is an
                                     image without boxes (next to the images: <split>/labels/)
    masks/<split>/<stem>.png         optional ground truth (class ids as here, 255 = ignore)
    BgMaskfromBoxes/<split>/<stem>.png   written from the boxes on first use
Images are named by their file stem, which names stage 2's labels too.

Coordinates: x1 = (cx - w/2)·W, x2 = (cx + w/2)·W (same for y with H), pixel edges.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from data.base import Annotation, DatasetFormat, check_numbers, no_boxes
from data.voc import check_num_classes, read_class_list
from utils.errors import BanaError
from utils.io import IMAGE_SUFFIXES_SHOWN, image_files, read_image_size, read_label_png
from utils.parsing import load_yaml, short

# A coordinate may leave [0, 1] by this much (float rounding in exporters) before it is an error.
_TOLERANCE = 1e-4


# Class-name files of exports without data.yaml: darknet's (CVAT, datumaro), LabelImg's.
NAMES_FILES = ("obj.names", "classes.txt")


def _yaml_path(root: Path) -> Path | None:
    return next((root / n for n in ("data.yaml", "data.yml") if (root / n).is_file()), None)


class YOLOData(DatasetFormat):
    """The YOLO layout (see the module doc)."""

    name = "yolo"

    def __init__(self, data_cfg, root: Path):
        super().__init__(data_cfg, root)
        names, self.class_source = self._names(list(getattr(data_cfg, "CLASSES", None) or ()))
        self._classes = ("background", *names)
        check_num_classes(self._classes, getattr(data_cfg, "NUM_CLASSES", None),
                          f"{self.class_source} (YOLO's names)")
        self._images: dict[str, dict[str, Path]] = {}

    @staticmethod
    def detect(root: Path, split: str) -> bool:
        return _yaml_path(Path(root)) is not None or (Path(root) / "obj.names").is_file()

    @cached_property
    def _yaml(self) -> dict:
        """data.yaml's mapping; {} where there is none (darknet exports, globox)."""
        path = _yaml_path(self.root)
        if path is None:
            if not self.root.is_dir():
                raise BanaError(f"DATA.ROOT {self.root} does not exist or is not a folder: "
                                f"{self.missing_files_hint('root')}.")
            return {}
        data = load_yaml(path, "YOLO data.yaml")
        if not isinstance(data, dict):
            raise BanaError(f"{path}: expected a mapping with `names:`, found "
                            f"{type(data).__name__}.")
        return data

    def _names(self, given: list) -> tuple[tuple[str, ...], str]:
        """(class names in YOLO id order, the file or key they came from): data.yaml's
        `names:`, else a names file (darknet's obj.names, classes.txt), else DATA.CLASSES. Where
        DATA.CLASSES is set as well, it must agree."""
        path = _yaml_path(self.root)
        if path is not None:
            found, source = self._yaml_names(path), str(path)
        else:
            names_file = next((self.root / n for n in NAMES_FILES
                               if (self.root / n).is_file()), None)
            found, source = (read_class_list([str(names_file)])[0], str(names_file)) \
                if names_file is not None else (None, "")
        if given:
            names, key = read_class_list(given)
            if found is not None and tuple(found) != names:
                raise BanaError(f"DATA.CLASSES ({', '.join(names)}) contradicts {source} "
                                f"({', '.join(found)}), which numbers the classes of the label "
                                "files: leave DATA.CLASSES empty, or make the two agree.")
            return names, source if found is not None else key
        if found is None:
            raise BanaError(
                f"{self.root} names no classes: no data.yaml (`names:`), "
                f"{' or '.join(NAMES_FILES)}, and DATA.CLASSES is empty. Some exporters (globox) "
                "write no class file; set DATA.CLASSES to the class names in the order of the "
                "ids of the label files (id 0 first), e.g. --opts DATA.CLASSES '[cat, dog]', or "
                "to a file of one name per line (a makesense.ai labels.txt).")
        return tuple(found), source

    def _yaml_names(self, path: Path) -> tuple[str, ...]:
        names = self._yaml.get("names")
        if isinstance(names, dict):
            try:
                ids = sorted(int(k) for k in names)
            except (TypeError, ValueError):
                raise BanaError(f"{path}: the keys of `names:` must be class numbers 0, 1, ...; "
                                f"found {short(list(names)[:5])}.") from None
            if ids != list(range(len(ids))):
                raise BanaError(f"{path}: `names:` numbers the classes {ids[:10]}; YOLO classes "
                                "are numbered 0, 1, 2, ... without gaps.")
            names = [names[k] if k in names else names[str(k)] for k in ids]
        if not isinstance(names, list) or not names:
            raise BanaError(f"{path}: expected `names:` as a list of class names or a mapping "
                            f"0: name, 1: name, ...; found {short(names)}.")
        odd = [n for n in names if not isinstance(n, (str, int, float))]
        if odd:
            raise BanaError(f"{path}: `names:` holds {short(odd[0])}, which is no class name: "
                            "give each class as one name.")
        names = [str(n).strip() for n in names]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise BanaError(f"{path} lists {', '.join(twice)} more than once: two classes of one "
                            "name could not be told apart.")
        return tuple(names)

    @property
    def classes(self) -> tuple[str, ...]:
        return self._classes

    def missing_files_hint(self, what: str) -> str:
        return (f"a YOLO dataset keeps images/<split>/ and labels/<split>/ (or <split>/images/ "
                f"and <split>/labels/, or darknet's obj_<split>_data/ with the .txt beside each "
                f"image) and its class names (data.yaml, obj.names or DATA.CLASSES) under "
                f"DATA.ROOT ({self.root}); ground truth, optional, in masks/<split>/<stem>.png")

    def _image_dir(self, split: str) -> Path:
        entry = self._yaml.get(split)
        base = self.root / str(self._yaml.get("path") or ".")
        candidates = []
        if isinstance(entry, str):
            candidates += [base / entry, _yaml_path(self.root).parent / entry]
        candidates += [self.root / "images" / split, self.root / split / "images",
                       self.root / f"obj_{split}_data"]
        found = next((c for c in candidates if c.is_dir()), None)
        if found is None:
            tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
            listed = sorted(p.name for p in (self.root / "images").iterdir() if p.is_dir()) \
                if (self.root / "images").is_dir() else []
            raise BanaError(f"no image folder for split '{split}' (tried {tried})"
                            + (f"; images/ holds the splits {', '.join(listed)}" if listed
                               else "") + f": {self.missing_files_hint('images')}.")
        return found

    def _split_images(self, split: str) -> dict[str, Path]:
        if split not in self._images:
            folder = self._image_dir(split)
            images = {}
            for p in image_files(folder):
                if p.stem in images:
                    raise BanaError(f"{images[p.stem].name} and {p.name} in {folder} share the "
                                    "name that labels them: rename one.")
                images[p.stem] = p
            if not images:
                raise BanaError(f"{folder} holds no images (looked for "
                                f"{IMAGE_SUFFIXES_SHOWN}).")
            self._images[split] = images
        return self._images[split]

    def split_ids(self, split: str) -> list[str]:
        return list(self._split_images(split))

    def image_path(self, split: str, image_id: str) -> Path:
        return self._split_images(split)[image_id]

    def label_path(self, split: str, image_id: str) -> Path:
        """labels/ beside images/: the last `images` part of the image folder becomes `labels`."""
        folder = self.image_path(split, image_id).parent
        parts = list(folder.parts)
        k = len(parts) - 1 - parts[::-1].index("images") if "images" in parts else None
        labels = Path(*parts[:k], "labels", *parts[k + 1:]) if k is not None else folder
        return labels / f"{image_id}.txt"

    def annotation_source(self, split: str, image_id: str) -> Path:
        return self.label_path(split, image_id)

    def bg_mask_path(self, split: str, image_id: str) -> Path:
        return self.bg_mask_root / split / f"{image_id}.png"

    def annotation(self, split: str, image_id: str) -> Annotation:
        path = self.label_path(split, image_id)
        if not path.is_file():
            return no_boxes()
        height, width = read_image_size(self.image_path(split, image_id), exif=True)
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            rows.append(self._parse(path, number, line, fields))
        if not rows:
            return no_boxes()
        values = np.asarray(rows, dtype=np.float64)
        cx, cy, w, h = values[:, 1:].T
        boxes = np.stack([(cx - w / 2) * width, (cy - h / 2) * height,
                          (cx + w / 2) * width, (cy + h / 2) * height], 1)
        return Annotation(boxes.astype(np.float32), values[:, 0].astype(np.int64) + 1)

    def _parse(self, path: Path, number: int, line: str, fields: list[str]) -> list[float]:
        where = f"{path}, line {number} ({line.strip()!r})"
        if len(fields) != 5:
            what = ("a polygon (segmentation export)" if len(fields) > 5 and len(fields) % 2
                    else f"{len(fields)} numbers")
            raise BanaError(f"{where}: expected `class cx cy w h` (five numbers), found {what}. "
                            "Export the dataset for detection (boxes).")
        try:
            cls = int(fields[0])
            cx, cy, w, h = (float(v) for v in fields[1:])
        except ValueError:
            raise BanaError(f"{where}: expected an integer class and four numbers.") from None
        check_numbers([[cx, cy, w, h]], path, "cx, cy, w, h",
                      lambda k: f"line {number} ({short(line.strip())})")
        if not 0 <= cls < len(self._classes) - 1:
            raise BanaError(f"{where}: class {cls} is not in the names of {self.class_source} "
                            f"(0..{len(self._classes) - 2}).")
        low, high = -_TOLERANCE, 1 + _TOLERANCE
        if not (w > 0 and h > 0 and low <= cx - w / 2 and cx + w / 2 <= high
                and low <= cy - h / 2 and cy + h / 2 <= high):
            raise BanaError(f"{where}: the box (cx, cy, w, h) = ({cx}, {cy}, {w}, {h}) is empty "
                            "or leaves the image; YOLO boxes are normalised to [0, 1] by the "
                            "image's width and height.")
        return [cls, cx, cy, w, h]

    def _gt_path(self, split: str, image_id: str) -> Path:
        return self.root / "masks" / split / f"{image_id}.png"

    def gt_ids(self, split: str) -> list[str]:
        return [i for i in self.split_ids(split) if self._gt_path(split, i).is_file()]

    def gt_label(self, split: str, image_id: str) -> np.ndarray | None:
        path = self._gt_path(split, image_id)
        if not path.is_file():
            return None
        image = self.image_path(split, image_id)
        return read_label_png(path, len(self._classes), "ground truth",
                              read_image_size(image, exif=True),
                              "re-create it (class k of data.yaml is k + 1, 0 is background)",
                              image=f"its image {image}")
