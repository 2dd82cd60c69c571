"""Stage 2: pseudo labels Y_crf (DenseCRF) and Y_ret (feature retrieval) for every image.

    python stage2.py --config-file configs/stage2.yml --gpu-id 0 [--workers N] [--save-vis N]
    python stage2.py --config-file configs/stage2_coco.yml --gpu-id 0   # COCO: + instance masks
    torchrun --nproc_per_node 4 stage2.py --config-file configs/stage2.yml  # one shard per process
"""

from utils.cli import main, positive, workers_argument


def add_arguments(parser):
    workers_argument(parser, "CRF worker processes", minimum=1)
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the labels DATA.PSEUDO_LABEL_DIR already holds and label "
                             "again (needed when they were made with other settings)")
    parser.add_argument("--pixel-work", default="auto", choices=("auto", "device", "workers"),
                        help="where the per-pixel work (upsampling, cosines, unaries, retrieval) "
                             "runs: on the backbone's device, or in the CRF workers; auto = the "
                             "device on a GPU, the workers on the CPU")
    parser.add_argument("--save-vis", type=positive(0), default=0, metavar="N",
                        help="write image | GT | Y_crf | Y_ret panels for the first N images")


def run(args):
    from engine.config import load_config
    from engine.stage2 import run

    return run(load_config(args.config_file, args.opts), devices=args.gpu_id,
               workers=args.workers, overwrite=args.overwrite, pixel_work=args.pixel_work,
               save_vis=args.save_vis)


if __name__ == "__main__":
    main(run, "Stage 2: pseudo labels Y_crf and Y_ret (SPEC §3).", add_arguments)
