"""The end-to-end demo: the whole BANA pipeline on the embedded synthetic dataset, on a CPU.

    python demo.py [--preset default|test] [--out runs/demo] [--data datasets/synthetic]
                   [--write-docs]

It runs the very scripts and configs a user runs on PASCAL VOC (`configs/demo/*.yml`, changed
only through `--opts`), one subprocess per step:
  1. data/synthetic.py     a VOC-layout tree with non-rectangular objects and GT masks
  2. stage1.py             BAP and GAP classifiers
  3. stage2.py             pseudo labels from BAP (with and without u0) and from GAP
  4. stage3.py             DeepLab (tiny backbone, initialised from the stage-1 BAP backbone as
                           the real one starts from pretrained weights) trained four ways: on
                           the filled boxes (the box baseline), on Y_crf with CE, with NAL on
                           Y_crf + Y_ret, and on the GT masks (the upper bound)
  5. evaluate.py           the four stage-3 models (their final checkpoints) on the val split
and ends with a table of pseudo-label and stage-3 mIoU plus a figure of panels. `--write-docs`
also writes them to docs/demo_results.md and docs/demo.png (the committed copies).
The demo owns its output folders and starts them afresh on every run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent

# Sizes: "default" is the `make demo` run (a few minutes on 2 cores); "test" is the same
# pipeline at the smallest size that still exercises every step (the test suite runs it).
PRESETS = {
    "default": {"n_train": 200, "n_val": 50, "size": 96, "crop": 80, "batch": 8,
                "stage1_iter": 600, "stage3_iter": 1000, "workers": 2, "panels": 4},
    "test": {"n_train": 10, "n_val": 4, "size": 64, "crop": 48, "batch": 4,
             "stage1_iter": 4, "stage3_iter": 4, "workers": 1, "panels": 2},
}
PSEUDO_LABELS = {  # name -> (stage-1 run, use u0)
    "bap": ("stage1_bap", True),
    "bap_no_u0": ("stage1_bap", False),
    "gap": ("stage1_gap", True),
}
# Stage-3 runs: name -> (table row, loss, extra --opts); {train_list} is the train split's list.
STAGE3_RUNS = {
    "box": ("filled boxes (box baseline), CE", "ce_crf", ["DATA.PSEUDO_LABELS", "[Y_box,Y_box]"]),
    "ce_crf": ("Y_crf, CE", "ce_crf", []),
    "nal": ("Y_crf + Y_ret, NAL", "nal", []),
    "gt": ("GT masks, CE (upper bound)", "ce_crf", ["DATA.GT_IDS", "{train_list}"]),
}


class Demo:
    def __init__(self, preset: dict, out: Path, data: Path):
        self.p, self.out, self.data = preset, out, data
        self.timings: list[tuple[str, float]] = []

    def step(self, title: str, script: str, *args: str) -> None:
        cmd = [sys.executable, script, *args]
        print(f"\n=== {title}\n$ {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO)
        seconds = time.perf_counter() - start
        self.timings.append((title, seconds))
        if proc.returncode != 0:
            raise SystemExit(f"demo: step '{title}' failed (exit {proc.returncode}); its "
                             "message is above.")

    def stage(self, title: str, script: str, config: str, *opts: str) -> None:
        common = ["DATA.ROOT", str(self.data), "OUTPUT_DIR", str(self.out)]
        self.step(title, script, "--config-file", config, "--gpu-id", "cpu",
                  *(["--workers", str(self.p["workers"])] if script == "stage2.py" else []),
                  "--opts", *common, *opts)

    def run(self) -> dict:
        p = self.p
        self.step("synthetic dataset", "data/synthetic.py", "--out", str(self.data),
                  "--n-train", str(p["n_train"]), "--n-val", str(p["n_val"]),
                  "--size", str(p["size"]), "--seed", "0")
        train = ["DATA.CROP_SIZE", str(p["crop"]), "DATA.BATCH_SIZE", str(p["batch"])]
        it1 = p["stage1_iter"]
        for pooling in ("bap", "gap"):
            self.stage(f"stage 1 ({pooling.upper()})", "stage1.py", "configs/demo/stage1.yml",
                       "NAME", f"stage1_{pooling}", "MODEL.POOLING", pooling, *train,
                       "SOLVER.MAX_ITER", str(it1), "SOLVER.MILESTONES", f"[{it1 * 2 // 3}]",
                       "SOLVER.CKPT_EVERY", str(max(1, it1 // 4)))
        for name, (stage1_run, u0) in PSEUDO_LABELS.items():
            self.stage(f"stage 2 ({name})", "stage2.py", "configs/demo/stage2.yml",
                       "NAME", f"stage2_{name}", "MODEL.WEIGHTS",
                       f"{stage1_run}/checkpoints/final.ckpt", "MODEL.USE_U0", str(u0).lower(),
                       "DATA.PSEUDO_LABEL_DIR", f"Generation/{name}")
        self.step("masks out (COCO, YOLO-seg, VOC)", "labels.py", "export", "--labels",
                  str(self.data / "Generation/bap"), "--format", "coco", "yolo_seg", "voc")
        it3 = p["stage3_iter"]
        # Stage 3 starts from the stage-1 BAP backbone: the CPU demo has no ImageNet weights for
        # its `tiny` backbone, and stage 1 is its pretraining (the paper: ImageNet; SPEC §8).
        init = self.out / "stage1_bap" / "checkpoints" / "final.ckpt"
        train_list = self.data / "ImageSets" / "Segmentation" / "train.txt"
        for name, (_, loss, extra) in STAGE3_RUNS.items():
            extra = [str(v).format(train_list=train_list) for v in extra]
            self.stage(f"stage 3 ({name})", "stage3.py", "configs/demo/stage3.yml",
                       "NAME", f"stage3_{name}", "MODEL.LOSS", loss, *train,
                       "MODEL.INIT", str(init), "DATA.PSEUDO_LABEL_DIR", "Generation/bap",
                       "SOLVER.MAX_ITER", str(it3), "SOLVER.VAL_EVERY", str(max(1, it3 // 4)),
                       "SOLVER.CKPT_EVERY", str(max(1, it3 // 4)), *extra)
            self.stage(f"evaluate ({name})", "evaluate.py", "configs/demo/stage3.yml",
                       "NAME", f"stage3_{name}",
                       "MODEL.WEIGHTS", f"stage3_{name}/checkpoints/final.ckpt")
        return self.collect()

    def collect(self) -> dict:
        box = json.loads((self.out / "stage2_bap" / "quality.json").read_text())["miou"]
        pseudo = {"box baseline": box["box_baseline"]}
        for name, label in (("gap", "GAP Y_crf"), ("bap_no_u0", "BAP Y_crf w/o u0"),
                            ("bap", "BAP Y_crf")):
            pseudo[label] = json.loads(
                (self.out / f"stage2_{name}" / "quality.json").read_text())["miou"]["Y_crf"]
        pseudo["BAP Y_ret"] = box["Y_ret"]
        pseudo["BAP Y_crf & Y_ret (disagreement = background)"] = box["Y_crf&Y_ret"]
        stage3 = {}
        for name, (row, _, _) in STAGE3_RUNS.items():
            metrics = json.loads((self.out / f"stage3_{name}" / "eval" / "metrics.json")
                                 .read_text())
            stage3[row] = {mode: round(float(m["miou"]), 2)
                           for mode, m in metrics["modes"].items()}
        stage3["untrained (random init)"] = {"single": untrained_miou(self.data)}
        warnings = {name: json.loads((self.out / f"stage2_{name}" / "quality.json").read_text())
                    ["warnings"] for name in PSEUDO_LABELS}
        return {"pseudo_labels": pseudo, "stage3": stage3, "label_warnings": warnings,
                "seconds": {t: round(s, 1) for t, s in self.timings}}


def untrained_miou(data: Path) -> float:
    """Val mIoU of a randomly initialised tiny DeepLab (seed 0): the floor stage 3 must beat."""
    import torch

    from types import SimpleNamespace

    from data.voc import VOCData
    from engine.inference import single_scale
    from models.zoo import ModelSpec, build
    from utils.metrics import ConfusionMatrix

    torch.manual_seed(0)
    net = build(ModelSpec("deeplab", "tiny", 21)).eval()
    confmat = ConfusionMatrix(21)
    for item in VOCData(SimpleNamespace(CLASSES=[], NUM_CLASSES=21), data).mask_dataset("val"):
        with torch.inference_mode():
            cos = single_scale(net, item["image"][None].float())
        confmat.update(cos[0].argmax(0), item["label"][0])
    return round(float(confmat.compute()["miou"]), 2)


def results_markdown(results: dict, preset_name: str, preset: dict) -> str:
    lines = [f"# Demo results (`python demo.py --preset {preset_name}`)", "",
             f"Synthetic VOC-layout data: {preset['n_train']} train / {preset['n_val']} val "
             f"images of {preset['size']} px; tiny backbone; stage 1 {preset['stage1_iter']} and "
             f"stage 3 {preset['stage3_iter']} iterations on CPU. Numbers are mIoU (%).", "",
             "## Pseudo labels on the train split", "", "| labels | mIoU |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in results["pseudo_labels"].items()]
    modes = list(next(iter(results["stage3"].values())))
    lines += ["", "## Stage 3 on the val split (DeepLab, tiny backbone initialised from stage 1; "
              "the final checkpoint of each run)", "",
              "| trained on | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    lines += [f"| {loss} | " + " | ".join(f"{m[k]:.2f}" if k in m else "" for k in modes) + " |"
              for loss, m in results["stage3"].items()]
    warned = {k: v for k, v in results["label_warnings"].items() if v}
    lines += ["", "Stage 2's no-ground-truth warnings: " + (
        "; ".join(f"{k}: {' '.join(v)}" for k, v in warned.items()) if warned else
        "none (every label set's box fill, lost boxes and agreement are plausible).")]
    total = sum(results["seconds"].values())
    lines += ["", f"Wall time of the steps: {total:.0f} s "
              f"({', '.join(f'{k} {v:.0f} s' for k, v in results['seconds'].items())})."]
    return "\n".join(lines) + "\n"


def figure(out: Path, data: Path, n: int, path: Path) -> None:
    """Rows of image | GT | Y_crf | Y_ret | stage-3 (nal) prediction for the first n train images."""
    from engine.predict import Segmenter
    from utils.io import atomic_write_png, read_image, read_index_png
    from utils.palette import panel, stack_rows

    segment = Segmenter(out / "stage3_nal" / "checkpoints" / "final.ckpt")  # single scale
    ids = (data / "ImageSets/Segmentation/train.txt").read_text().split()[:n]
    rows = []
    for i in ids:
        image = read_image(data / "JPEGImages" / f"{i}.jpg")
        maps = [read_index_png(data / "SegmentationClassAug" / f"{i}.png"),
                read_index_png(data / "Generation/bap/Y_crf" / f"{i}.png"),
                read_index_png(data / "Generation/bap/Y_ret" / f"{i}.png"), segment(image)]
        rows.append(panel(image, maps, gap=3))
    atomic_write_png(path, stack_rows(rows, gap=3))


def exports_figure(data: Path, n: int, path: Path) -> None:
    """Rows of image | COCO export (each instance its colour) | YOLO-seg polygons | VOC
    SegmentationObject, read back from the files `labels.py export` wrote for Generation/bap."""
    import cv2
    import numpy as np
    from pycocotools.coco import COCO

    from utils.io import atomic_write_png, read_image, read_index_png
    from utils.palette import colorize, stack_rows

    exports = data / "Generation/bap/exports"
    coco = COCO(str(exports / "coco/instances_train_Y_crf.json"))
    by_name = {im["file_name"]: im["id"] for im in coco.dataset["images"]}
    rows = []
    for i in (data / "ImageSets/Segmentation/train.txt").read_text().split()[:n]:
        image = read_image(data / "JPEGImages" / f"{i}.jpg")
        h, w = image.shape[:2]
        instances = np.zeros((h, w), np.uint8)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=by_name[f"JPEGImages/{i}.jpg"]))
        for k, ann in enumerate(anns):
            instances[coco.annToMask(ann) > 0] = k + 1
        drawn = image.copy()
        for line in (exports / "yolo_seg/labels/train" / f"{i}.txt").read_text().splitlines():
            xy = np.array(line.split()[1:], float).reshape(-1, 2) * [w, h]
            cv2.polylines(drawn, [np.round(xy).astype(np.int32)], True, (255, 255, 0), 1)
        objects = read_index_png(exports / "voc/SegmentationObject" / f"{i}.png")
        gap = np.full((h, 3, 3), 255, np.uint8)
        rows.append(np.concatenate([image, gap, colorize(instances), gap, drawn, gap,
                                    colorize(objects)], 1))
    atomic_write_png(path, stack_rows(rows, gap=3))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--data", type=Path, default=Path("datasets/synthetic"))
    parser.add_argument("--write-docs", action="store_true",
                        help="also write docs/demo_results.md, docs/demo.png and "
                             "docs/exports.png")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    out, data = args.out.resolve(), args.data.resolve()
    for folder in (out, data):
        if folder.exists():
            print(f"demo: removing the previous demo output {folder}")
            shutil.rmtree(folder)
    start = time.perf_counter()
    results = Demo(preset, out, data).run()
    text = results_markdown(results, args.preset, preset)
    fig = out / "demo.png"
    figure(out, data, preset["panels"], fig)
    exports_figure(data, preset["panels"], out / "exports.png")
    (out / "demo_results.md").write_text(text)
    (out / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + text)
    print(f"Figure (image | GT | Y_crf | Y_ret | stage-3 nal prediction): {fig}")
    print(f"Demo finished in {time.perf_counter() - start:.0f} s.")
    if args.write_docs:
        docs = REPO / "docs"
        docs.mkdir(exist_ok=True)
        (docs / "demo_results.md").write_text(text)
        shutil.copyfile(fig, docs / "demo.png")
        shutil.copyfile(out / "exports.png", docs / "exports.png")
        print(f"Wrote {docs / 'demo_results.md'}, {docs / 'demo.png'} and "
              f"{docs / 'exports.png'}.")
    return results


if __name__ == "__main__":
    main()
