"""Evaluation (SPEC §5), in one of two modes.

    python evaluate.py --config-file configs/stage3_vgg.yml --gpu-id 0 [--checkpoint PATH]
                       [--workers N] [--save-pred] [--save-vis N] [--opts KEY VALUE ...]
        the stage-3 model (MODEL.WEIGHTS, or --checkpoint) on TEST.SPLIT: single scale,
        multi-scale + flip, each with and without DenseCRF; writes OUTPUT_DIR/NAME/eval/.
    python evaluate.py --pred-dir DIR --data-root ROOT [--split val] [--out DIR]
        a folder of index PNGs (predictions or pseudo labels) against the split's ground truth:
        VOC's SegmentationClassAug, or, where ROOT/annotations/instances_<split>.json exists,
        the COCO-format instance masks; the last line printed is `mIoU: XX.XX`.
"""

import argparse

from utils.cli import guarded, positive, workers_argument


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a stage-3 model, or score a folder of "
                                "label PNGs, against the VOC ground truth (SPEC §5).")
    model = p.add_argument_group("model mode")
    model.add_argument("--config-file", metavar="FILE", help="YAML config of the stage-3 run")
    model.add_argument("--gpu-id", default="0", metavar="ID",
                       help="GPU id, or 'cpu' (default 0; falls back to CPU without CUDA)")
    model.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                       help="override config keys, e.g. --opts TEST.SCALES [1.0] TEST.CRF false")
    model.add_argument("--checkpoint", metavar="PATH",
                       help="stage-3 checkpoint (default: MODEL.WEIGHTS under OUTPUT_DIR)")
    workers_argument(model, "CRF worker processes")
    model.add_argument("--save-pred", action="store_true",
                       help="write the predictions as index PNGs to OUTPUT_DIR/NAME/eval/pred")
    model.add_argument("--overwrite", action="store_true",
                       help="replace an evaluation of another model in the run's eval/")
    model.add_argument("--save-vis", type=positive(0), default=0, metavar="N",
                       help="write image | GT | prediction panels for the first N images")
    folder = p.add_argument_group("folder mode")
    folder.add_argument("--pred-dir", metavar="DIR", help="folder of <id>.png index PNGs")
    folder.add_argument("--data-root", metavar="ROOT",
                        help="dataset root (VOC: SegmentationClassAug/ and ImageSets/; COCO "
                             "layout: annotations/instances_<split>.json)")
    folder.add_argument("--split", default="val", help="split list to score (default val)")
    folder.add_argument("--num-classes", type=positive(2), default=None,
                        help="classes incl. background (default: what the dataset says: 21 for "
                             "VOC, K + 1 for a COCO-format file with K categories)")
    folder.add_argument("--classes", metavar="FILE",
                        help="VOC layout with your own classes: a file with one name per line")
    folder.add_argument("--class-map", default="all", choices=("all", "voc20", "coco80"),
                        help="COCO layout: which categories the predictions number (default all)")
    folder.add_argument("--train-split", metavar="SPLIT",
                        help="COCO-format exports whose split files number the categories "
                             "differently: the split the labels were made with (DATA.SPLIT), "
                             "whose numbering they use")
    folder.add_argument("--out", metavar="DIR", help="also write metrics.json and metrics.md here")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pred_dir is not None:
        if args.config_file is not None:
            parser.error("--pred-dir (folder mode) and --config-file (model mode) exclude each "
                         "other; give one of them.")
        if args.data_root is None:
            parser.error("--pred-dir needs --data-root, the dataset root holding "
                         "SegmentationClassAug/.")
        from engine.evaluate import run_folder

        return guarded(lambda: run_folder(
            args.pred_dir, args.data_root, split=args.split, num_classes=args.num_classes,
            classes=[args.classes] if args.classes else (), class_map=args.class_map,
            out=args.out, train_split=args.train_split), args.debug)
    if args.config_file is None:
        parser.error("give --config-file CONFIG (evaluate a stage-3 model) or --pred-dir DIR "
                     "--data-root ROOT (score a folder of label PNGs).")

    def go():
        from engine.config import load_config

        cfg = load_config(args.config_file, args.opts)
        if cfg.MODEL.TASK == "instance":  # Mask R-CNN: COCO mask and box AP
            from engine.instance import evaluate

            return evaluate(cfg, checkpoint=args.checkpoint, devices=args.gpu_id,
                            save_vis=args.save_vis)
        from engine.evaluate import run

        return run(cfg, checkpoint=args.checkpoint, devices=args.gpu_id, workers=args.workers,
                   save_pred=args.save_pred, save_vis=args.save_vis, overwrite=args.overwrite)

    return guarded(go, args.debug)


if __name__ == "__main__":
    main()
