"""Commands on a label folder (stage 2's DATA.PSEUDO_LABEL_DIR, or a folder of predict.py outputs).

    python labels.py export --labels DIR --format coco yolo_seg voc [--variant Y_crf] [--out DIR]
                            [--polygons] [--copy-images] [--voc-border]
    python labels.py index  --labels DIR --config-file CONFIG [--opts KEY VALUE ...]
    python labels.py review --labels DIR [--out DIR] [--config-file CONFIG]

export: the masks in the formats other tools train on (exporters/); index: make a folder of
predict.py label maps a label set, joining them with the boxes of CONFIG's dataset (DATA.ROOT,
DATA.SPLIT), so that export and review take it; review: (re)build the review page
DIR/review/index.html (CONFIG adds the ground truth where the split has some).
"""

import argparse


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Export, index or review a folder of labels.")
    sub = p.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write the masks as COCO / YOLO-seg / VOC")
    index = sub.add_parser("index", help="make a folder of predict.py label maps a label set")
    review = sub.add_parser("review", help="(re)build the review page of a label folder")
    for s in (export, index, review):
        s.add_argument("--labels", required=True, metavar="DIR",
                       help="the label folder (stage 2's DATA.ROOT/DATA.PSEUDO_LABEL_DIR, or "
                            "an indexed predict.py output folder)")
        s.add_argument("--debug", action="store_true", help="show Python tracebacks")
    for s, required in ((index, True), (review, False)):
        s.add_argument("--config-file", required=required, metavar="FILE",
                       help="the dataset's config (DATA.* keys: its boxes, classes, split)")
        s.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                       help="config overrides, as for the stages")
    review.add_argument("--out", default=None, metavar="DIR",
                        help="where to write the page (default: <labels>/review)")
    export.add_argument("--format", nargs="+", required=True, metavar="NAME",
                        help="coco, yolo_seg and/or voc")
    export.add_argument("--variant", default=None, metavar="NAME",
                        help="which masks: Y_crf (default for stage 2's folders), Y_ret, Y_box, "
                             "agreement, or an indexed folder's own (prediction)")
    export.add_argument("--out", default=None, metavar="DIR",
                        help="where to write (default: <labels>/exports); each format gets a "
                             "sub-folder")
    export.add_argument("--polygons", action="store_true",
                        help="coco: polygons instead of RLE (holes are filled)")
    export.add_argument("--copy-images", action="store_true",
                        help="yolo_seg: copy the images instead of linking them")
    export.add_argument("--voc-border", action="store_true",
                        help="voc: a 255 band along each object's outline, as VOC's own files")
    index.add_argument("--variant", default="prediction", metavar="NAME",
                       help="the name the maps get in the label set (default: prediction)")
    return p.parse_args(argv)


def run(args):
    from pathlib import Path

    from data.labelset import LabelSet

    if args.command == "index":
        from engine.config import load_config
        from engine.labels import index_folder

        path = index_folder(load_config(args.config_file, args.opts), args.labels, args.variant)
        print(f"Label set: {path}")
        return path
    labels = LabelSet(args.labels)
    if args.command == "review":
        from engine.labels import gt_reader
        from engine.review import build_review

        data = None
        if args.config_file:
            from data.datasets import open_data
            from engine.config import load_config

            data = open_data(load_config(args.config_file, args.opts))
        return build_review(labels, Path(args.out) if args.out else None,
                            gt=gt_reader(data, labels.split))
    from exporters import run_exports

    variant = args.variant or ("Y_crf" if "Y_crf" in labels.variants else labels.variants[0])
    options = {"coco": {"segmentation": "polygon" if args.polygons else "rle"},
               "yolo_seg": {"images": "copy" if args.copy_images else "link"},
               "voc": {"border": args.voc_border}}
    return run_exports(labels, args.format, variant,
                       Path(args.out) if args.out else labels.folder / "exports", options)


def main(argv=None):
    from utils.cli import guarded

    args = parse(argv)
    return guarded(lambda: run(args), args.debug)


if __name__ == "__main__":
    main()
