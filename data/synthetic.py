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
BgMaskfromBoxes (by data/voc.py's write_bg_masks, as data/voc_bbox_setup.py) and synthetic.json (the parameters and the
box-filling baseline). The output depends only on the arguments: two runs are byte-identical.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data/synthetic.py`: make `data` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import shutil
import time

import cv2
import numpy as np

from data.painting import (MARKER, SHAPES, all_visible, background, paint, shape_mask,
                           style_for, texture_field)
from data.base import clip_boxes
from data.voc import SPLIT_DIR, parse_annotation, write_bg_masks
from utils.boxes import fill_boxes
from utils.cli import guarded
from utils.errors import BanaError
from utils.io import (atomic_write_jpeg, atomic_write_json, atomic_write_png, atomic_write_text,
                      read_index_png)
from utils.metrics import ConfusionMatrix
from utils.palette import VOC_CLASSES, voc_palette

DEFAULT_CLASSES = ("cat", "dog", "bird", "car", "person")
GENERATED_DIRS = ("JPEGImages", "Annotations", "SegmentationClassAug", "SegmentationClass",
                  "BgMaskfromBoxes", "ImageSets")
def render_sample(size: int, class_ids: list[int], rng: np.random.Generator):
    """One synthetic image.

    Returns (rgb uint8 (S, S, 3), label uint8 (S, S) with 255 borders, boxes int64 (K, 5) =
    x1, y1, x2, y2, class with x2, y2 exclusive, i.e. the box covers rows y1:y2, cols x1:x2).
    """
    styles = [style_for(VOC_CLASSES[c]) for c in class_ids]
    image = background(size, styles, rng)
    n_objects = int(rng.integers(1, 4))
    objects = []  # (full mask, class id, style, centre)
    for _ in range(n_objects):
        for _attempt in range(20):
            k = int(rng.integers(len(class_ids)))
            style = styles[k]
            radius = size * rng.uniform(0.15, 0.32)
            centre = rng.uniform(0.15 * size, 0.85 * size, 2)
            shape = SHAPES[rng.choice(4, p=np.asarray(style.shape_weights) / sum(style.shape_weights))]
            mask = shape_mask(shape, *centre, radius, size, rng)
            candidate = objects + [(mask, class_ids[k], style, centre)]
            if all_visible(candidate, size):
                objects = candidate
                break

    instance = np.zeros((size, size), np.uint8)
    label = np.zeros((size, size), np.uint8)
    for n, (mask, class_id, style, centre) in enumerate(objects, start=1):
        colour = np.asarray(style.colour) + rng.normal(0, 28, 3)
        texture = texture_field(style.texture, style.period * rng.uniform(0.85, 1.15), size, centre, rng)
        paint(image, mask, colour, texture, style.amplitude)
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
    for image_id in (root / SPLIT_DIR / f"{split}.txt").read_text().split():
        gt = read_index_png(root / "SegmentationClassAug" / f"{image_id}.png")
        boxes, classes = parse_annotation(root / "Annotations" / f"{image_id}.xml")
        boxes, keep = clip_boxes(boxes, *gt.shape)
        filled = np.concatenate([boxes[keep], classes[keep, None].astype(np.float32)], 1)
        matrix.update(fill_boxes(filled, *gt.shape), gt)
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
    parser.add_argument("--format", choices=("voc", "coco", "coco-custom"), default="voc",
                        help="VOC layout (default), an MS-COCO 2017 layout with instance "
                             "annotations, or a COCO-format export with its own made-up classes "
                             "(train/, val/, instances_{train,val}.json: your own data's shape)")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    args = parser.parse_args(argv)

    def go():
        if args.format == "coco-custom":
            from data.synthetic_coco import make_custom_coco

            info = make_custom_coco(args.out, args.n_train, args.n_val, args.size, args.seed)
            print(f"Wrote a COCO-format export with the classes {', '.join(info['categories'])} "
                  f"({args.n_train} train + {args.n_val} val images of {args.size} px) to "
                  f"{args.out}; use DATA.DATASET coco DATA.CLASS_MAP all DATA.NUM_CLASSES "
                  f"{info['num_classes']}, after `python data/coco_bbox_setup.py --data-root "
                  f"{args.out}`.")
            return info
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
