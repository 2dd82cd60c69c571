"""Write the background masks of stage 1: BgMaskfromBoxes/<id>.png for every VOC annotation.

    python data/voc_bbox_setup.py --data-root datasets/VOC2012 [--workers 8] [--splits train_aug val]

Each mask is uint8, 1 outside every box of Annotations/<id>.xml and 0 inside (SPEC §0), the size of
the image (JPEGImages/<id>.<ext>, as shown). It works on any VOC-layout export whatever its class
names (the mask does not depend on them); an image listed in a split without an XML gets an
all-background mask. Existing masks are skipped and every write is atomic, so an interrupted run
resumes where it stopped. Stages 1 and 2 write the masks they need themselves on first use; this
script writes them ahead (e.g. for every split at once).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data/voc_bbox_setup.py`: make `data` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import os

from data.voc import AnyClasses, VOCData, write_bg_masks
from utils.boxes import bg_mask_summary
from utils.cli import guarded


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, metavar="ROOT",
                        help="VOC root holding JPEGImages/ and Annotations/")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="parallel processes (default: min(8, CPUs))")
    parser.add_argument("--splits", nargs="+", metavar="SPLIT",
                        help="only the images of these splits (ImageSets/Segmentation or "
                             "ImageSets/Main lists, or split folders ROOT/<split>/) (default: "
                             "every Annotations/*.xml)")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    args = parser.parse_args(argv)

    def go():
        root = Path(args.data_root)
        if not args.splits:
            counts = write_bg_masks(root, workers=args.workers)
        else:
            voc = VOCData(AnyClasses(), root)
            groups: dict[str, set] = {}  # "" for split lists, the split for split folders
            for split in args.splits:
                ids = voc.split_ids(split)
                groups.setdefault(split if voc.in_own_folder(split) else "", set()).update(ids)
            counts = {"written": 0, "skipped": 0, "total": 0}
            for split, ids in groups.items():
                for key, n in write_bg_masks(root, sorted(ids), args.workers, split=split).items():
                    counts[key] += n
        print(bg_mask_summary(counts, Path(args.data_root) / "BgMaskfromBoxes"))
        return counts

    return guarded(go, args.debug)


if __name__ == "__main__":
    main()
