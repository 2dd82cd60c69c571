"""Write the background masks of any dataset layout ahead of stages 1 and 2 (which write the ones
they need themselves on first use): BgMaskfromBoxes/ under DATA.ROOT, 1 outside every box and 0
inside (SPEC §0).

    python data/bbox_setup.py --config-file configs/custom/stage1.yml [--splits train val]
                              [--workers 8] [--opts DATA.ROOT ... DATA.DATASET yolo ...]

The config names the layout (DATA.DATASET) and the dataset (DATA.ROOT, DATA.CLASSES,
DATA.CLASS_MAP, DATA.NUM_CLASSES); the splits default to DATA.SPLIT and DATA.VAL_SPLIT. Existing
masks are kept and every write is atomic, so an interrupted run resumes where it stopped.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data/bbox_setup.py`: make `data` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import os

from utils.cli import guarded


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE",
                        help="a stage's YAML config naming the dataset")
    parser.add_argument("--splits", nargs="+", metavar="SPLIT",
                        help="splits to write (default: DATA.SPLIT and DATA.VAL_SPLIT)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="parallel processes (default: min(8, CPUs))")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="override config keys, e.g. --opts DATA.ROOT datasets/mine")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    args = parser.parse_args(argv)

    def go():
        from data.base import ensure_bg_masks
        from data.datasets import open_data
        from engine.config import load_config

        cfg = load_config(args.config_file, args.opts)
        data = open_data(cfg)
        splits = args.splits or [s for s in dict.fromkeys((cfg.DATA.SPLIT, cfg.DATA.VAL_SPLIT))
                                 if s]
        totals = {}
        for split in splits:
            counts = ensure_bg_masks(data, split, args.workers)
            print(f"'{split}': wrote {counts['written']}, kept {counts['kept']} that match "
                  f"their boxes ({counts['total']} images).")
            totals[split] = counts
        return totals

    return guarded(go, args.debug)


if __name__ == "__main__":
    main()
