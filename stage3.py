"""Stage 3: train DeepLab-V1 (VGG-16) or DeepLab-V2 (ResNet-101) with the noise-aware loss.

    python stage3.py --config-file configs/stage3_vgg.yml --gpu-id 0 [--resume] [--opts ...]
    python stage3.py --config-file configs/stage3_maskrcnn_coco.yml --gpu-id 0   # Mask R-CNN
"""

from utils.cli import main


def add_arguments(parser):
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR/NAME/checkpoints/last.ckpt")
    parser.add_argument("--reconfigure", action="store_true",
                        help="with --resume: continue with settings that differ from the run's "
                             "record (config.yaml; the old one is kept as config.<n>.yaml)")


def run(cfg, args):
    if cfg.MODEL.TASK == "instance":  # Mask R-CNN on instance masks (engine/instance.py)
        from engine.instance import train

        return train(cfg, args)
    from engine.stage3 import run as run_stage3

    return run_stage3(cfg, args)


if __name__ == "__main__":
    main(run, "Stage 3: DeepLab trained on pseudo labels with the noise-aware loss (SPEC §4).",
         add_arguments)
