"""Write the background masks of a COCO-layout dataset: BgMaskfromBoxes/<split>/<image_id>.png.

    python data/coco_bbox_setup.py --data-root datasets/coco [--splits train2017 val2017] [--workers 8]

Without --splits, every annotations/instances_<split>.json under the root is used (MS-COCO 2017,
or your own export with any categories).

Each mask is uint8, 1 outside every box of annotations/instances_<split>.json and 0 inside
(crowd boxes and every category included: see data/coco.py), the size the annotation file gives
the image. Existing masks are skipped and every write is atomic, so an interrupted run resumes
where it stopped.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data/coco_bbox_setup.py`: make `data` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import os

from data.coco import write_bg_masks
from utils.boxes import bg_mask_summary
from utils.cli import guarded


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, metavar="ROOT",
                        help="COCO root holding annotations/instances_<split>.json")
    parser.add_argument("--splits", nargs="+", default=None, metavar="SPLIT",
                        help="annotation files to read (default: every "
                             "annotations/instances_<split>.json)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="parallel processes (default: min(8, CPUs))")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    args = parser.parse_args(argv)

    def go():
        counts = write_bg_masks(args.data_root, args.splits, workers=args.workers)
        print(bg_mask_summary(counts, Path(args.data_root) / "BgMaskfromBoxes"))
        return counts

    return guarded(go, args.debug)


if __name__ == "__main__":
    main()
