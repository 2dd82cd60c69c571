"""Stage 1: train the box classifier with background-aware pooling (or GAP).

    python stage1.py --config-file configs/stage1.yml --gpu-id 0 [--resume] [--opts KEY VALUE ...]
"""

from utils.cli import main, resume_arguments


def run(args):
    from engine.config import load_config
    from engine.stage1 import run

    return run(load_config(args.config_file, args.opts), devices=args.gpu_id,
               resume=args.resume, reconfigure=args.reconfigure, overwrite=args.overwrite)


if __name__ == "__main__":
    main(run, "Stage 1: box classifier with background-aware pooling (SPEC §2).",
         resume_arguments)
