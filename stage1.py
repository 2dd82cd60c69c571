"""Stage 1: train the box classifier with background-aware pooling (or GAP).

    python stage1.py --config-file configs/stage1.yml --gpu-id 0 [--resume] [--opts KEY VALUE ...]
"""

from utils.cli import main


def add_arguments(parser):
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR/NAME/checkpoints/last.ckpt")
    parser.add_argument("--reconfigure", action="store_true",
                        help="with --resume: continue with settings that differ from the run's "
                             "record (config.yaml; the old one is kept as config.<n>.yaml)")


def run(cfg, args):
    from engine.stage1 import run as run_stage1

    return run_stage1(cfg, args)


if __name__ == "__main__":
    main(run, "Stage 1: box classifier with background-aware pooling (SPEC §2).", add_arguments)
