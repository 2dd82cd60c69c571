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

from data.voc import VOCData, xml_boxes
from utils.boxes import bg_mask_summary, write_new_bg_masks
from utils.cli import guarded
from utils.errors import BanaError
from utils.records import fingerprint


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
    voc = VOCData(_AnyClasses(), root)
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


class _AnyClasses:
    """A data config for the masks: they do not depend on class names or counts."""

    CLASSES = ["object"]
    NUM_CLASSES = None


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
            voc = VOCData(_AnyClasses(), root)
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
