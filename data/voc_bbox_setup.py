"""Write the background masks of stage 1: BgMaskfromBoxes/<id>.png for every VOC annotation.

    python data/voc_bbox_setup.py --data-root datasets/VOC2012 [--workers 8] [--splits train_aug val]

Each mask is uint8, 1 outside every box of Annotations/<id>.xml and 0 inside (SPEC §0), the size of
JPEGImages/<id>.jpg. Existing masks are skipped and every write is atomic, so an interrupted run
resumes where it stopped.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data/voc_bbox_setup.py`: make `data` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import os


from data.voc import check_root, parse_annotation, read_split
from utils.boxes import bg_mask_from_boxes
from utils.cli import guarded
from utils.errors import BanaError
from utils.io import atomic_write_png, read_image_size
from utils.pool import run_all


def write_bg_mask(root: Path, image_id: str) -> bool:
    """Write BgMaskfromBoxes/<id>.png unless it exists; True when written."""
    out = root / "BgMaskfromBoxes" / f"{image_id}.png"
    if out.is_file():
        return False
    xml, image = root / "Annotations" / f"{image_id}.xml", root / "JPEGImages" / f"{image_id}.jpg"
    boxes, _ = parse_annotation(xml)
    if not image.is_file():
        raise BanaError(f"image {image} of annotation {xml} not found: the mask takes the image's "
                        "size; restore the image (`bash data/setup_voc.bash DATA_DIR`).")
    height, width = read_image_size(image)
    atomic_write_png(out, bg_mask_from_boxes(boxes, height, width))
    return True


def _write_one(job: tuple[Path, str]) -> bool:
    return write_bg_mask(*job)


def write_bg_masks(root, ids=None, workers: int = 1, progress: bool = True) -> dict:
    """Write the masks of `ids` (default: every Annotations/*.xml); returns counts.

    Returns {"written": n, "skipped": n (already there), "total": n}.
    """
    root = check_root(root)
    if ids is None:
        ann_dir = root / "Annotations"
        if not ann_dir.is_dir():
            raise BanaError(f"{ann_dir} does not exist: create the dataset with "
                            "`bash data/setup_voc.bash DATA_DIR` or "
                            f"`python data/synthetic.py --out {root}`.")
        ids = sorted(p.stem for p in ann_dir.glob("*.xml"))
        if not ids:
            raise BanaError(f"{ann_dir} holds no .xml annotation.")
    jobs = [(root, i) for i in ids]
    written = sum(run_all(_write_one, jobs, workers, "BgMaskfromBoxes", progress, chunksize=32))
    return {"written": written, "skipped": len(jobs) - written, "total": len(jobs)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, metavar="ROOT",
                        help="VOC root holding JPEGImages/ and Annotations/")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="parallel processes (default: min(8, CPUs))")
    parser.add_argument("--splits", nargs="+", metavar="SPLIT",
                        help="only the ids of these ImageSets/Segmentation lists "
                             "(default: every annotation)")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    args = parser.parse_args(argv)

    def go():
        ids = None
        if args.splits:
            ids = sorted({i for split in args.splits for i in read_split(args.data_root, split)})
        counts = write_bg_masks(args.data_root, ids, workers=args.workers)
        print(f"BgMaskfromBoxes: wrote {counts['written']}, kept {counts['skipped']} existing "
              f"({counts['total']} images) in {Path(args.data_root) / 'BgMaskfromBoxes'}")
        return counts

    return guarded(go, args.debug)


if __name__ == "__main__":
    main()
