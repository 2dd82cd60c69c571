"""Stage 2: pseudo labels Y_crf (DenseCRF) and Y_ret (feature retrieval) for every image.

    python stage2.py --config-file configs/stage2.yml --gpu-id 0 [--workers N] [--save-vis N]
    python stage2.py --config-file configs/stage2_coco.yml --gpu-id 0   # COCO: + instance masks
    torchrun --nproc_per_node 4 stage2.py --config-file configs/stage2.yml  # one shard per process
"""

import os

from utils.cli import main


def add_arguments(parser):
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="CRF worker processes (default: number of cores)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the labels DATA.PSEUDO_LABEL_DIR already holds and label "
                             "again (needed when they were made with other settings)")
    parser.add_argument("--pixel-work", default="auto", choices=("auto", "device", "workers"),
                        help="where the per-pixel work (upsampling, cosines, unaries, retrieval) "
                             "runs: on the backbone's device, or in the CRF workers; auto = the "
                             "device on a GPU, the workers on the CPU")
    parser.add_argument("--save-vis", type=int, default=0, metavar="N",
                        help="write image | GT | Y_crf | Y_ret panels for the first N images")


def run(cfg, args):
    from engine.stage2 import run as run_stage2

    if args.workers < 1:
        from utils.errors import BanaError

        raise BanaError(f"--workers {args.workers}: need at least 1 CRF worker process.")
    return run_stage2(cfg, args)


if __name__ == "__main__":
    main(run, "Stage 2: pseudo labels Y_crf and Y_ret (SPEC §3).", add_arguments)
