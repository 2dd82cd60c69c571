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

from data.coco import load_instances
from utils.boxes import bg_mask_summary, write_new_bg_masks
from utils.errors import BanaError
from utils.cli import guarded
from utils.records import fingerprint


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
