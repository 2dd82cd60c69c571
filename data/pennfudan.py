"""The Penn-Fudan pedestrian photos (170 images, one class) converted to the VOC layout.

    python data/pennfudan.py --out datasets/PennFudanVOC [--source DIR] [--n-train N --n-val N]

Penn-Fudan ships its own layout, which no stage reads:
    PNGImages/<stem>.png           the photos
    Annotation/<stem>.txt          "PASCAL Annotation Version 1.00" text: a line per pedestrian
                                   `Bounding box for object k ... : (Xmin, Ymin) - (Xmax, Ymax)`,
                                   1-based pixel indices, both corners inclusive
    PedMasks/<stem>_mask.png       instance masks: 0 background, k = pedestrian k
This script writes the VOC layout data/voc.py reads (a converter rather than a fourth dataset
format: the photos are box-annotated data of the kind the VOC-XML exports of annotation tools
are, and going through that reader is what the benchmark wants to measure):
    JPEGImages/<stem>.png          a symbolic link to the photo (--copy copies it)
    Annotations/<stem>.xml         one <object> `person` per pedestrian, corners as pixel edges
    SegmentationClass/<stem>.png   semantic ground truth from PedMasks (0 background, 1 person),
                                   for scoring only: no stage trains on it
    ImageSets/Segmentation/{train,val}.txt    the fixed split below
    labelmap.txt                   `person`, so DATA.CLASSES need not be given
    pennfudan.json                 what was converted, from where (marks the folder as ours)

Boxes: Penn-Fudan's (Xmin, Ymin) - (Xmax, Ymax) cover 0-based columns Xmin-1 .. Xmax-1 and rows
Ymin-1 .. Ymax-1. data/voc.py reads XML corners as pixel edges (a box covers columns
int(xmin) .. int(xmax) - 1, no 1-based shift), so the XML gets xmin = Xmin - 1, ymin = Ymin - 1,
xmax = Xmax, ymax = Ymax: the box covers exactly the pixels Penn-Fudan's box names.

Split: the 170 stems in sorted order; val = positions floor(k * 170 / 50) for k = 0..49 (every
3rd or 4th photo, so both the Fudan and the Penn photos are in both splits), train = the other
120. --n-train / --n-val keep only the first N of each list (quick runs and tests).

Source: --source, else ../shared/data/PennFudanPed beside this repository, else
datasets/PennFudanPed; when none holds the data, the official zip is downloaded into
datasets/ (--url). Offline, that fails with a message saying where to put the folder.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data/pennfudan.py`: make `data` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import re
import shutil
import time
import zipfile

import numpy as np

from data.voc import SPLIT_DIR
from utils.cli import guarded
from utils.errors import BanaError
from utils.io import atomic_write_json, atomic_write_png, atomic_write_text, read_index_png
from utils.palette import voc_palette

REPO = Path(__file__).resolve().parent.parent
URL = "https://www.cis.upenn.edu/~jshi/ped_html/PennFudanPed.zip"
# Where the data is looked for when --source is not given, in this order.
SOURCES = (REPO.parent / "shared" / "data" / "PennFudanPed", REPO / "datasets" / "PennFudanPed")
MARKER = "pennfudan.json"
GENERATED = ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets", "BgMaskfromBoxes",
             "labelmap.txt")
N_VAL = 50

_SIZE = re.compile(r"Image size \(X x Y x C\)\s*:\s*(\d+)\s*x\s*(\d+)")
_COUNT = re.compile(r"Objects with ground truth\s*:\s*(\d+)")
_BOX = re.compile(r"Bounding box for object (\d+) .*:\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*-\s*"
                  r"\(\s*(\d+)\s*,\s*(\d+)\s*\)")


def is_source(folder: Path) -> bool:
    """The folder holds Penn-Fudan as unzipped (PNGImages/, PedMasks/, Annotation/)."""
    return all((Path(folder) / d).is_dir() for d in ("PNGImages", "PedMasks", "Annotation"))


def locate_source(source: Path | None = None, url: str = URL,
                  download_dir: Path = REPO / "datasets") -> Path:
    """The PennFudanPed folder: `source` if given and complete; else the first complete folder of
    SOURCES; else the zip downloaded from `url` and unpacked into `download_dir`. A download
    that fails (offline) -> BanaError saying where to put the data instead."""
    candidates = [Path(source)] if source is not None else list(SOURCES)
    for folder in candidates:
        if is_source(folder):
            return folder
    target = Path(download_dir) / "PennFudanPed"
    if is_source(target):
        return target
    looked = ", ".join(str(c) for c in candidates)
    print(f"Penn-Fudan not found in {looked}: downloading {url} (51 MB) into {download_dir}",
          flush=True)
    zip_path = Path(download_dir) / "PennFudanPed.zip"
    try:
        _download(url, zip_path)
    except OSError as err:  # URLError, timeouts and refused connections are OSErrors
        reason = getattr(err, "reason", None) or err
        raise BanaError(
            f"Penn-Fudan is not in {looked}, and downloading it from {url} failed ({reason}); "
            "this machine may be offline. On a machine with internet access, download that zip, "
            f"unzip it and copy the PennFudanPed/ folder (PNGImages/, PedMasks/, Annotation/) to "
            f"{target}, or pass its location with --source DIR.") from None
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(download_dir)
    zip_path.unlink()
    if not is_source(target):
        raise BanaError(f"{url} unpacked into {download_dir} but {target} lacks PNGImages/, "
                        "PedMasks/ or Annotation/: the archive is not Penn-Fudan's.")
    return target


def _download(url: str, path: Path) -> None:
    import urllib.request

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as f:
        shutil.copyfileobj(response, f)
    partial.replace(path)


def read_annotation(path: Path) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """(height, width), the boxes as Penn-Fudan writes them, int64 (K, 4) Xmin, Ymin, Xmax, Ymax
    (1-based, inclusive), and their object numbers int64 (K,) (k = the value of the pedestrian's
    pixels in PedMasks). A file that does not say so -> BanaError naming it."""
    text = Path(path).read_text(errors="replace")
    size, count = _SIZE.search(text), _COUNT.search(text)
    rows = [tuple(map(int, m.groups())) for m in _BOX.finditer(text)]
    if size is None or count is None or len(rows) != int(count.group(1)):
        raise BanaError(f"{path} is not a Penn-Fudan annotation: expected an 'Image size' line "
                        "and as many 'Bounding box for object' lines as 'Objects with ground "
                        f"truth' says; found {len(rows)} boxes. Restore the file from the zip.")
    numbers = np.array([r[0] for r in rows], np.int64)
    boxes = np.array([r[1:] for r in rows], np.int64).reshape(-1, 4)
    return (int(size.group(2)), int(size.group(1))), boxes, numbers


def to_pixel_edges(boxes: np.ndarray) -> np.ndarray:
    """Penn-Fudan's 1-based inclusive corners (K, 4) -> the pixel edges data/voc.py reads:
    the box (1, 1) - (W, H) around a whole image becomes (0, 0) - (W, H)."""
    return np.asarray(boxes, np.int64) - np.array([1, 1, 0, 0], np.int64)


def annotation_xml(stem: str, size: tuple[int, int], edges: np.ndarray) -> str:
    height, width = size
    objects = "".join(
        f"  <object>\n    <name>person</name>\n    <truncated>0</truncated>\n"
        f"    <difficult>0</difficult>\n    <bndbox>\n      <xmin>{x1}</xmin>\n"
        f"      <ymin>{y1}</ymin>\n      <xmax>{x2}</xmax>\n      <ymax>{y2}</ymax>\n"
        f"    </bndbox>\n  </object>\n" for x1, y1, x2, y2 in edges.tolist())
    return (f"<annotation>\n  <folder>PennFudanVOC</folder>\n  <filename>{stem}.png</filename>\n"
            f"  <size>\n    <width>{width}</width>\n    <height>{height}</height>\n"
            f"    <depth>3</depth>\n  </size>\n  <segmented>1</segmented>\n{objects}"
            "</annotation>\n")


def split_stems(stems: list[str], n_val: int = N_VAL) -> dict[str, list[str]]:
    """The fixed split of the module doc: val = sorted positions floor(k * n / n_val)."""
    stems = sorted(stems)
    val_at = {k * len(stems) // n_val for k in range(n_val)}
    return {"train": [s for i, s in enumerate(stems) if i not in val_at],
            "val": [s for i, s in enumerate(stems) if i in val_at]}


def _prepare_out(out: Path) -> None:
    """Clear an earlier conversion (stale files would survive otherwise); refuse a foreign one."""
    if (out / MARKER).is_file():
        for name in GENERATED:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    elif out.exists() and any(out.iterdir()):
        raise BanaError(f"{out} exists and is not a conversion written by this script (no "
                        f"{MARKER}): choose an empty or new folder for --out.")


def convert(source, out, n_train: int | None = None, n_val: int | None = None,
            copy: bool = False) -> dict:
    """Write the VOC-layout tree of the module doc under `out`; returns what pennfudan.json
    records. Every box is checked against its pedestrian's mask (`check_boxes`)."""
    start = time.perf_counter()
    source, out = Path(source).resolve(), Path(out)
    if not is_source(source):
        raise BanaError(f"{source} is not the Penn-Fudan folder: expected PNGImages/, PedMasks/ "
                        "and Annotation/ in it (the unzipped PennFudanPed/).")
    stems = sorted(p.stem for p in (source / "PNGImages").glob("*.png"))
    if len(stems) < 2:
        raise BanaError(f"{source / 'PNGImages'} holds {len(stems)} PNG photos; Penn-Fudan has "
                        "170. Unzip it again.")
    splits = split_stems(stems, min(N_VAL, len(stems) // 2))
    if n_train is not None:
        splits["train"] = splits["train"][:n_train]
    if n_val is not None:
        splits["val"] = splits["val"][:n_val]
    _prepare_out(out)
    atomic_write_json(out / MARKER, {"source": str(source), "complete": False})
    palette = voc_palette()
    n_boxes = n_exact = 0
    for stem in splits["train"] + splits["val"]:
        size, boxes, numbers = read_annotation(source / "Annotation" / f"{stem}.txt")
        instances = read_index_png(source / "PedMasks" / f"{stem}_mask.png")
        if instances.shape != size:
            raise BanaError(f"{source / 'PedMasks' / f'{stem}_mask.png'} is "
                            f"{instances.shape[1]}x{instances.shape[0]}, but its annotation says "
                            f"{size[1]}x{size[0]}.")
        edges = to_pixel_edges(boxes)
        n_exact += check_boxes(stem, edges, numbers, instances)
        image = out / "JPEGImages" / f"{stem}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        if copy:
            shutil.copyfile(source / "PNGImages" / f"{stem}.png", image)
        else:
            image.symlink_to(source / "PNGImages" / f"{stem}.png")
        atomic_write_text(out / "Annotations" / f"{stem}.xml", annotation_xml(stem, size, edges))
        atomic_write_png(out / "SegmentationClass" / f"{stem}.png",
                         (instances > 0).astype(np.uint8), palette)
        n_boxes += len(edges)
    for split, ids in splits.items():
        atomic_write_text(out / SPLIT_DIR / f"{split}.txt", "\n".join(ids) + "\n")
    atomic_write_text(out / "labelmap.txt", "person\n")
    info = {"source": str(source), "complete": True, "n_train": len(splits["train"]),
            "n_val": len(splits["val"]), "boxes": n_boxes,
            "boxes_equal_to_mask_extent": n_exact,
            "classes": ["person"],
            "images": "copied" if copy else "linked",
            "split": f"val = sorted positions floor(k * {len(stems)} / "
                     f"{min(N_VAL, len(stems) // 2)}), train = the rest"}
    atomic_write_json(out / MARKER, info)
    return {**info, "root": str(out), "seconds": time.perf_counter() - start}


def check_boxes(stem: str, edges: np.ndarray, numbers: np.ndarray,
                instances: np.ndarray) -> int:
    """Every pedestrian of the mask has a box, and its mask pixels lie inside that box (pixel
    edges); returns how many boxes equal their mask's extent exactly. A pixel outside its box
    means the corners were misread (a 1-px shift puts the mask's first or last column outside
    nearly every box). On Penn-Fudan 407 of the 423 boxes equal their mask's extent; in the
    other 16 the mask is 1-6 px narrower than the box."""
    ids = set(np.unique(instances).tolist()) - {0}
    missing = sorted(ids - set(numbers.tolist()))
    if missing:
        raise BanaError(f"{stem}: PedMasks has pedestrian(s) {missing} without a box in its "
                        "annotation.")
    exact = 0
    for (x1, y1, x2, y2), k in zip(edges.tolist(), numbers.tolist()):
        rows, cols = np.nonzero(instances == k)
        if rows.size == 0:
            continue
        extent = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
        if extent[0] < x1 or extent[1] < y1 or extent[2] > x2 or extent[3] > y2:
            raise BanaError(f"{stem}: pedestrian {k}'s mask spans {extent} (pixel edges), "
                            f"beyond its box {x1, y1, x2, y2}: the box corners were misread.")
        exact += extent == (x1, y1, x2, y2)
    return exact


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="VOC-layout root to write, e.g. datasets/PennFudanVOC")
    parser.add_argument("--source", type=Path, default=None, metavar="DIR",
                        help="the unzipped PennFudanPed/ folder (default: ../shared/data/"
                             "PennFudanPed, then datasets/PennFudanPed, then download)")
    parser.add_argument("--url", default=URL, help="where to download the zip from")
    parser.add_argument("--n-train", type=int, default=None, metavar="N",
                        help="keep the first N train photos (default all 120)")
    parser.add_argument("--n-val", type=int, default=None, metavar="N",
                        help="keep the first N val photos (default all 50)")
    parser.add_argument("--copy", action="store_true",
                        help="copy the photos instead of linking to them")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    args = parser.parse_args(argv)

    def go():
        info = convert(locate_source(args.source, args.url), args.out, args.n_train, args.n_val,
                       args.copy)
        print(f"Wrote {info['n_train']} train + {info['n_val']} val Penn-Fudan photos "
              f"({info['boxes']} pedestrian boxes) to {info['root']} in "
              f"{info['seconds']:.1f} s. Use DATA.DATASET voc DATA.ROOT {info['root']} "
              "DATA.NUM_CLASSES 2 (the class, person, comes from its labelmap.txt).")
        return info

    return guarded(go, args.debug)


if __name__ == "__main__":
    main()
