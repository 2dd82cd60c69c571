"""Stage 3: train DeepLab-V1 (VGG-16) or DeepLab-V2 (ResNet-101) with the noise-aware loss.

    python stage3.py --config-file configs/stage3_vgg.yml --gpu-id 0 [--resume] [--opts ...]
    python stage3.py --config-file configs/stage3_maskrcnn_coco.yml --gpu-id 0   # Mask R-CNN
"""

from utils.cli import main, resume_arguments


def run(args):
    from engine.config import load_config

    cfg = load_config(args.config_file, args.opts)
    if cfg.MODEL.TASK == "instance":  # Mask R-CNN on instance masks (engine/instance.py)
        from engine.instance import train as run_stage3
    else:
        from engine.stage3 import run as run_stage3
    return run_stage3(cfg, devices=args.gpu_id, resume=args.resume, reconfigure=args.reconfigure,
                      overwrite=args.overwrite)


if __name__ == "__main__":
    main(run, "Stage 3: DeepLab trained on pseudo labels with the noise-aware loss (SPEC §4).",
         resume_arguments)
