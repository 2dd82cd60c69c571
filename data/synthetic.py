"""A small synthetic dataset in the PASCAL VOC layout, so the whole pipeline runs without VOC.

    python data/synthetic.py --out datasets/synthetic [--n-train 200 --n-val 100 --size 128 --seed 0]

What makes it a fair stand-in for box supervision:
- objects are non-rectangular (ellipses, lobed blobs, star polygons, rings with a hole), so their
  boxes over-cover them and box filling is a clearly imperfect baseline, as on VOC;
- each class has its own colour distribution and texture (stripes, blotches, fine grain,
  checks, concentric rings), and the colour distributions overlap between classes and with the
  background: telling classes apart needs colour and texture together, which a small CNN learns;
- backgrounds are cluttered: a smooth colour field, a faint texture and distractor shapes that
  borrow either a class colour or a class texture (never both);
- 1–3 objects per image, later ones occluding earlier ones; the box of an object is the box of its
  visible part, and every object keeps at least 40 % of itself visible;
- the GT masks carry a 255 band 2 pixels wide (1 each side) along every instance border, like VOC's
  void outline.
Writes JPEGImages, Annotations, SegmentationClassAug and SegmentationClass (the same index PNGs with
the VOC palette), ImageSets/Segmentation/{train,train_aug,val}.txt (train_aug = train),
BgMaskfromBoxes (by the code of data/voc_bbox_setup.py) and synthetic.json (the parameters and the
box-filling baseline). The output depends only on the arguments: two runs are byte-identical.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data/synthetic.py`: make `data` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import shutil
import time
from dataclasses import dataclass

import cv2
import numpy as np

from data.voc import SPLIT_DIR, clip_boxes, parse_annotation, read_split
from data.voc_bbox_setup import write_bg_masks
from utils.boxes import fill_boxes
from utils.cli import guarded
from utils.errors import BanaError
from utils.io import (atomic_write_jpeg, atomic_write_json, atomic_write_png, atomic_write_text,
                      read_index_png)
from utils.metrics import ConfusionMatrix
from utils.palette import VOC_CLASSES, voc_palette

DEFAULT_CLASSES = ("cat", "dog", "bird", "car", "person")
MARKER = "synthetic.json"
GENERATED_DIRS = ("JPEGImages", "Annotations", "SegmentationClassAug", "SegmentationClass",
                  "BgMaskfromBoxes", "ImageSets")
MIN_VISIBLE_FRACTION = 0.4
SHAPES = ("ellipse", "blob", "polygon", "ring")
TEXTURES = ("stripes", "blotches", "grain", "checks", "rings")


@dataclass(frozen=True)
class ClassStyle:
    """How instances of one class look. Colours are RGB means in 0..255; periods are fractions of
    the image size, so the look does not depend on --size."""

    colour: tuple[float, float, float]
    texture: str
    period: float
    amplitude: float
    shape_weights: tuple[float, float, float, float]  # over SHAPES


# Warm colours are shared by cat, dog and person, and car's red sits between them: colour alone
# leaves classes ambiguous, texture alone too (the background borrows textures).
STYLES = {
    "cat": ClassStyle((200, 130, 70), "stripes", 0.07, 0.35, (0.4, 0.6, 0.0, 0.0)),
    "dog": ClassStyle((150, 100, 60), "blotches", 0.14, 0.40, (0.2, 0.5, 0.3, 0.0)),
    "bird": ClassStyle((90, 125, 180), "grain", 0.05, 0.35, (0.4, 0.0, 0.6, 0.0)),
    "car": ClassStyle((175, 75, 70), "checks", 0.09, 0.30, (0.0, 0.2, 0.5, 0.3)),
    "person": ClassStyle((190, 150, 130), "rings", 0.09, 0.30, (0.4, 0.1, 0.0, 0.5)),
}


def style_for(name: str) -> ClassStyle:
    """The style of a class: from STYLES, else drawn from a generator seeded by the class index."""
    if name in STYLES:
        return STYLES[name]
    rng = np.random.default_rng(VOC_CLASSES.index(name))
    return ClassStyle(tuple(rng.uniform(50, 210, 3).round()), TEXTURES[VOC_CLASSES.index(name) % 5],
                      float(rng.uniform(0.05, 0.14)), float(rng.uniform(0.3, 0.4)),
                      tuple(rng.dirichlet(np.ones(4))))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return xs, ys


def _shape_mask(kind: str, cx: float, cy: float, radius: float, size: int,
                rng: np.random.Generator) -> np.ndarray:
    """bool (S, S): one filled shape of roughly `radius` around (cx, cy)."""
    xs, ys = _grid(size)
    angle = rng.uniform(0, np.pi)
    u = (xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)
    v = -(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle)
    aspect = rng.uniform(0.35, 1.0)
    if kind == "ellipse":
        return (u / radius) ** 2 + (v / (radius * aspect)) ** 2 <= 1
    if kind == "blob":  # radius modulated by a few low harmonics: lobes and dents
        theta = np.arctan2(v, u)
        r = np.ones_like(theta)
        for k in (2, 3, 4, 5):
            r += rng.uniform(0, 0.18) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        return np.hypot(u, v / (0.6 + 0.4 * aspect)) <= radius * r
    if kind == "polygon":  # star-like: vertices at random angles and radii
        n = int(rng.integers(5, 10))
        thetas = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = radius * rng.uniform(0.45, 1.1, n)
        points = np.stack([cx + radii * np.cos(thetas), cy + radii * np.sin(thetas)], 1)
        mask = np.zeros((size, size), np.uint8)
        cv2.fillPoly(mask, [np.round(points * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
        return mask.astype(bool)
    if kind == "ring":
        d = np.hypot(u, v / (0.7 + 0.3 * aspect))
        return (d <= radius) & (d >= radius * rng.uniform(0.35, 0.6))
    if kind == "rectangle":
        return (np.abs(u) <= radius) & (np.abs(v) <= radius * aspect)
    if kind == "bar":
        return (np.abs(u) <= radius * 1.5) & (np.abs(v) <= max(1.0, radius * 0.12))
    raise ValueError(kind)


def _smooth_noise(size: int, cells: int, rng: np.random.Generator, channels: int = 1) -> np.ndarray:
    """float32 (S, S, channels) in about [-1, 1]: a random cells × cells grid, bicubic upsampled."""
    cells = max(2, cells)
    grid = rng.uniform(-1, 1, (cells, cells, channels)).astype(np.float32)
    out = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    return out.reshape(size, size, channels)


def _texture(kind: str, period: float, size: int, centre: tuple[float, float],
             rng: np.random.Generator) -> np.ndarray:
    """float32 (S, S) in about [-1, 1]; period is a fraction of the image size (at least 3 px)."""
    xs, ys = _grid(size)
    p = max(3.0, period * size)
    angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    u = xs * np.cos(angle) + ys * np.sin(angle)
    v = -xs * np.sin(angle) + ys * np.cos(angle)
    if kind == "stripes":
        return np.sin(2 * np.pi * u / p + phase)
    if kind == "checks":
        return np.sign(np.sin(2 * np.pi * u / p + phase) * np.sin(2 * np.pi * v / p))
    if kind == "rings":
        return np.sin(2 * np.pi * np.hypot(xs - centre[0], ys - centre[1]) / p + phase)
    if kind == "blotches":
        return np.tanh(2.5 * _smooth_noise(size, round(size / p), rng)[..., 0])
    if kind == "grain":
        return rng.uniform(-1, 1, (size, size)).astype(np.float32)
    raise ValueError(kind)


def _paint(image: np.ndarray, mask: np.ndarray, colour, texture: np.ndarray, amplitude: float) -> None:
    shaded = np.asarray(colour, np.float32) * (1 + amplitude * texture[..., None])
    image[mask] = shaded[mask]


def _background(size: int, styles: list[ClassStyle], rng: np.random.Generator) -> np.ndarray:
    """float32 (S, S, 3): smooth colour field, faint texture, 2–5 distractor shapes."""
    base = rng.uniform(60, 200) + rng.normal(0, 35, 3)
    image = (base + 40 * _smooth_noise(size, 3, rng, channels=3)).astype(np.float32)
    faint = _texture(TEXTURES[rng.integers(len(TEXTURES))], rng.uniform(0.05, 0.15), size,
                     (size / 2, size / 2), rng)
    image *= 1 + 0.08 * faint[..., None]
    for _ in range(int(rng.integers(2, 6))):
        kind = ("rectangle", "bar", "ellipse", "polygon")[rng.integers(4)]
        radius = size * rng.uniform(0.08, 0.25)
        mask = _shape_mask(kind, *rng.uniform(0, size, 2), radius, size, rng)
        style = styles[rng.integers(len(styles))]
        if rng.random() < 0.5:  # a class colour with a texture no class uses here
            colour = np.asarray(style.colour) + rng.normal(0, 30, 3)
            texture = _smooth_noise(size, 4, rng)[..., 0]
            amplitude = 0.2
        else:  # a class texture in a random colour, fainter than on objects
            colour = rng.uniform(50, 210, 3)
            texture = _texture(style.texture, style.period, size, (size / 2, size / 2), rng)
            amplitude = style.amplitude * 0.6
        _paint(image, mask, colour, texture, amplitude)
    return image


def render_sample(size: int, class_ids: list[int], rng: np.random.Generator):
    """One synthetic image.

    Returns (rgb uint8 (S, S, 3), label uint8 (S, S) with 255 borders, boxes int64 (K, 5) =
    x1, y1, x2, y2, class with x2, y2 exclusive, i.e. the box covers rows y1:y2, cols x1:x2).
    """
    styles = [style_for(VOC_CLASSES[c]) for c in class_ids]
    image = _background(size, styles, rng)
    n_objects = int(rng.integers(1, 4))
    objects = []  # (full mask, class id, style, centre)
    for _ in range(n_objects):
        for _attempt in range(20):
            k = int(rng.integers(len(class_ids)))
            style = styles[k]
            radius = size * rng.uniform(0.15, 0.32)
            centre = rng.uniform(0.15 * size, 0.85 * size, 2)
            shape = SHAPES[rng.choice(4, p=np.asarray(style.shape_weights) / sum(style.shape_weights))]
            mask = _shape_mask(shape, *centre, radius, size, rng)
            candidate = objects + [(mask, class_ids[k], style, centre)]
            if _all_visible(candidate, size):
                objects = candidate
                break

    instance = np.zeros((size, size), np.uint8)
    label = np.zeros((size, size), np.uint8)
    for n, (mask, class_id, style, centre) in enumerate(objects, start=1):
        colour = np.asarray(style.colour) + rng.normal(0, 28, 3)
        texture = _texture(style.texture, style.period * rng.uniform(0.85, 1.15), size, centre, rng)
        _paint(image, mask, colour, texture, style.amplitude)
        instance[mask] = n
        label[mask] = class_id

    boxes = []
    for n, (_, class_id, _, _) in enumerate(objects, start=1):
        rows, cols = np.nonzero(instance == n)
        boxes.append((cols.min(), rows.min(), cols.max() + 1, rows.max() + 1, class_id))

    # VOC marks instance borders as void; a 3x3 max/min filter flags both sides of every border.
    kernel = np.ones((3, 3), np.uint8)
    border = cv2.dilate(instance, kernel) != cv2.erode(instance, kernel)
    label[border] = 255

    image += rng.normal(0, 6, image.shape).astype(np.float32)
    image = cv2.GaussianBlur(image, (3, 3), 0.6)  # soft edges, as a camera gives
    rgb = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return rgb, label, np.asarray(boxes, np.int64).reshape(-1, 5)


def _all_visible(objects: list, size: int) -> bool:
    """Every object keeps MIN_VISIBLE_FRACTION of its area visible under the later ones."""
    covered = np.zeros((size, size), bool)
    for mask, *_ in reversed(objects):
        area = mask.sum()
        if area < max(12, 0.003 * size * size):
            return False
        if (mask & ~covered).sum() < MIN_VISIBLE_FRACTION * area:
            return False
        covered |= mask
    return True


def annotation_xml(image_id: str, size: int, boxes: np.ndarray) -> str:
    """A VOC-style annotation with one <object> per box (class ids as VOC names)."""
    objects = "".join(
        f"  <object>\n    <name>{VOC_CLASSES[c]}</name>\n    <pose>Unspecified</pose>\n"
        f"    <truncated>0</truncated>\n    <difficult>0</difficult>\n    <bndbox>\n"
        f"      <xmin>{x1}</xmin>\n      <ymin>{y1}</ymin>\n      <xmax>{x2}</xmax>\n"
        f"      <ymax>{y2}</ymax>\n    </bndbox>\n  </object>\n"
        for x1, y1, x2, y2, c in boxes.tolist())
    return (f"<annotation>\n  <folder>synthetic</folder>\n  <filename>{image_id}.jpg</filename>\n"
            f"  <size>\n    <width>{size}</width>\n    <height>{size}</height>\n"
            f"    <depth>3</depth>\n  </size>\n  <segmented>1</segmented>\n{objects}</annotation>\n")


def box_baseline_miou(root: Path, split: str, num_classes: int = 21) -> float:
    """mIoU (%) of filling every box of the split with its class, against the GT masks."""
    matrix = ConfusionMatrix(num_classes)
    for image_id in read_split(root, split):
        gt = read_index_png(root / "SegmentationClassAug" / f"{image_id}.png")
        boxes, classes = parse_annotation(root / "Annotations" / f"{image_id}.xml")
        boxes = clip_boxes(boxes, classes, *gt.shape)
        matrix.update(fill_boxes(boxes, *gt.shape), gt)
    return float(matrix.compute()["miou"])


def _prepare_out(out: Path) -> None:
    """Refuse to write into a foreign dataset; clear an earlier synthetic one (stale files, e.g.
    background masks of another seed, would otherwise survive because the mask writer skips
    existing files)."""
    if (out / MARKER).is_file():
        for name in GENERATED_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
    elif out.exists() and any(out.iterdir()):
        raise BanaError(f"{out} exists and is not a synthetic dataset written by this script (no "
                        f"{MARKER}): choose an empty or new folder for --out.")


def make_synthetic_voc(out, n_train: int = 200, n_val: int = 100, size: int = 128, seed: int = 0,
                       classes=DEFAULT_CLASSES) -> dict:
    """Write the dataset under `out`; returns what synthetic.json records plus the time taken."""
    start = time.perf_counter()
    out = Path(out)
    unknown = [c for c in classes if c not in VOC_CLASSES[1:]]
    if unknown or not classes:
        raise BanaError(f"--classes {' '.join(unknown) or '(none)'}: expected VOC class names "
                        f"among {', '.join(VOC_CLASSES[1:])}.")
    if n_train < 1 or n_val < 1 or size < 32:
        raise BanaError(f"need --n-train >= 1, --n-val >= 1 and --size >= 32, got "
                        f"{n_train}, {n_val}, {size}.")
    _prepare_out(out)
    class_ids = [VOC_CLASSES.index(c) for c in classes]
    palette = voc_palette()
    splits = {"train": [f"train_{i:05d}" for i in range(n_train)],
              "val": [f"val_{i:05d}" for i in range(n_val)]}
    for split_index, (split, ids) in enumerate(splits.items()):
        for i, image_id in enumerate(ids):
            rng = np.random.default_rng([seed, split_index, i])
            rgb, label, boxes = render_sample(size, class_ids, rng)
            atomic_write_jpeg(out / "JPEGImages" / f"{image_id}.jpg", rgb)
            atomic_write_text(out / "Annotations" / f"{image_id}.xml", annotation_xml(image_id, size, boxes))
            for folder in ("SegmentationClassAug", "SegmentationClass"):
                atomic_write_png(out / folder / f"{image_id}.png", label, palette)
    lists = {"train": splits["train"], "train_aug": splits["train"], "val": splits["val"]}
    for split, ids in lists.items():
        atomic_write_text(out / SPLIT_DIR / f"{split}.txt", "\n".join(ids) + "\n")
    write_bg_masks(out, splits["train"] + splits["val"], workers=1, progress=False)
    info = {"n_train": n_train, "n_val": n_val, "size": size, "seed": seed, "classes": list(classes),
            "box_baseline_miou_train": round(box_baseline_miou(out, "train"), 2)}
    atomic_write_json(out / MARKER, info)
    return {**info, "root": str(out), "seconds": time.perf_counter() - start}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, metavar="DIR", help="dataset root to write")
    parser.add_argument("--n-train", type=int, default=200, metavar="N", help="train images (200)")
    parser.add_argument("--n-val", type=int, default=100, metavar="N", help="val images (100)")
    parser.add_argument("--size", type=int, default=128, metavar="S", help="image side in px (128)")
    parser.add_argument("--seed", type=int, default=0, metavar="K", help="random seed (0)")
    parser.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES), metavar="NAME",
                        help=f"VOC class names to draw (default: {' '.join(DEFAULT_CLASSES)})")
    parser.add_argument("--format", choices=("voc", "coco"), default="voc",
                        help="VOC layout (default) or an MS-COCO layout with instance annotations")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    args = parser.parse_args(argv)

    def go():
        if args.format == "coco":
            from data.synthetic_coco import make_synthetic_coco

            info = make_synthetic_coco(args.out, args.n_train, args.n_val, args.size, args.seed)
            print(f"Wrote a COCO-layout tree of {args.n_train} train + {args.n_val} val images "
                  f"of {args.size} px to {args.out}.")
            return info
        info = make_synthetic_voc(args.out, args.n_train, args.n_val, args.size, args.seed,
                                  tuple(args.classes))
        print(f"Wrote {info['n_train']} train + {info['n_val']} val images of {info['size']} px "
              f"to {info['root']} in {info['seconds']:.1f} s.")
        print(f"Box-filling baseline on train (each box filled with its class): mIoU "
              f"{info['box_baseline_miou_train']:.1f} %. Pseudo labels should beat this.")
        return info

    return guarded(go, args.debug)


if __name__ == "__main__":
    main()
