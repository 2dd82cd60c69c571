"""Label maps for new images with a trained stage-3 model.

    python predict.py --config-file configs/stage3_vgg.yml --gpu-id 0 --input photos/ \
                      --output predictions/ [--checkpoint PATH] [--opts KEY VALUE ...]

--input takes image files, folders of images (--recursive: with their sub-folders) and .txt
lists of paths; it says what else the folders hold. Writes <stem>.png (class ids, VOC palette,
the image's size) and overlay/<stem>.jpg per image, with the config's TEST.SCALES / TEST.FLIP /
TEST.CRF (e.g. --opts TEST.SCALES [1.0] TEST.FLIP false TEST.CRF false for single scale); an
image over TEST.MAX_PIXELS is labelled downscaled. Already written images are skipped; an image
that cannot be read is skipped and listed at the end (exit status 2), the others are written.
"""

from utils.cli import main, workers_argument


def add_arguments(parser):
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="image files, folders of images, or .txt files listing images")
    parser.add_argument("--recursive", action="store_true",
                        help="also read the images in the sub-folders of --input's folders")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the outputs")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="stage-3 checkpoint (default: MODEL.WEIGHTS under OUTPUT_DIR)")
    workers_argument(parser, "CRF worker processes")
    parser.add_argument("--overwrite", action="store_true",
                        help="predict again the images whose outputs in --output were made "
                             "with another model or settings, from another image, or not by "
                             "predict.py (their files are replaced)")


def run(args):
    from engine.config import load_config
    from engine.predict import run

    return run(load_config(args.config_file, args.opts), inputs=args.input, output=args.output,
               checkpoint=args.checkpoint, devices=args.gpu_id, workers=args.workers,
               overwrite=args.overwrite, recursive=args.recursive)


if __name__ == "__main__":
    main(run, "Predict label maps for new images with a trained stage-3 model.", add_arguments)
