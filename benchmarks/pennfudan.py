"""BANA on real photos: the Penn-Fudan pedestrians, box-only, through the own-data route.

    python benchmarks/pennfudan.py [--quick] [--out runs/pennfudan] [--data datasets/PennFudanVOC]
        [--source DIR] [--stage1-iter N] [--stage3-iter N] [--batch N] [--crop N]
        [--workers N] [--gpu-id cpu] [--upper-bound] [--opts KEY VALUE ...]

The steps, each the script a user runs on their own export (configs/custom/*.yml, changed only
through --opts; README "Your own data"), one subprocess each:
  0. data/pennfudan.py     Penn-Fudan (../shared/data/PennFudanPed, else downloaded) converted to
                           the VOC layout: 120 train / 50 val photos, one class, person; the
                           ground truth made from its masks is used for scoring only
  1. stage1.py             BAP and GAP classifiers on the boxes of the train photos
  2. stage2.py             Y_crf, Y_ret, Y_box of the train photos from BAP (with and without
                           u0) and from GAP, each scored against the masks (quality.json)
  3. stage3.py             DeepLab on the BAP labels: the box baseline (CE on Y_box), CE on Y_crf
                           and NAL on Y_crf + Y_ret (--upper-bound: also CE on the GT masks)
  4. evaluate.py           each stage-3 model (its final checkpoint) on the 50 held-out photos
and prints one table of every label variant and model with the time each step took; it writes
the table to OUT/pennfudan_results.{md,json}. The benchmark owns OUT and DATA and starts them
afresh on every run.

By default it runs on the CPU with the `tiny` backbone from scratch (no ImageNet weights) and
stage 3 starting from the stage-1 BAP backbone, as demo.py does: 38 minutes on a busy 2-core
machine.
On a GPU, the paper's networks: `--gpu-id 0 --opts MODEL.BACKBONE vgg16 MODEL.INIT imagenet`
(with a backbone named in --opts, the tiny preset's SOLVER.LR and MODEL.INIT are not applied:
the configs' VGG-16 recipe is; a MODEL.INIT in --opts also replaces stage 3's start from the
stage-1 checkpoint); add --batch, --crop and the iteration counts to taste. --opts reach every stage and evaluate.py, after the benchmark's own keys.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/pennfudan.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import time

REPO = Path(__file__).resolve().parent.parent

# Sizes: "default" is the measured benchmark; "quick" checks that every step runs (minutes).
PRESETS = {
    "default": {"n_train": None, "n_val": None, "stage1_iter": 150, "stage3_iter": 150,
                "batch": 8, "crop": 241},
    "quick": {"n_train": 8, "n_val": 4, "stage1_iter": 10, "stage3_iter": 10, "batch": 4,
              "crop": 161},
}
# The CPU preset: a backbone small enough for 2 cores, trained from scratch at the demo's rate.
TINY = ["MODEL.BACKBONE", "tiny", "MODEL.INIT", "none", "SOLVER.LR", "0.01"]
PSEUDO_LABELS = {  # name -> (stage-1 run, use u0, table row)
    "gap": ("stage1_gap", True, "GAP Y_crf"),
    "bap_no_u0": ("stage1_bap", False, "BAP Y_crf w/o u0"),
    "bap": ("stage1_bap", True, "BAP Y_crf"),
}
# Stage-3 runs: name -> (table row, loss, extra --opts); {train_list} is the train split's list.
STAGE3_RUNS = {
    "box": ("stage 3, box baseline (CE on Y_box)", "ce_crf",
            ["DATA.PSEUDO_LABELS", "[Y_box,Y_box]"]),
    "ce_crf": ("stage 3, CE on Y_crf", "ce_crf", []),
    "nal": ("stage 3, NAL on Y_crf + Y_ret", "nal", []),
}
UPPER_BOUND = {"gt": ("stage 3, CE on the GT masks (upper bound)", "ce_crf",
                      ["DATA.GT_IDS", "{train_list}"])}
# The demo's three test scales rather than the VOC recipe's four: a third less evaluation time.
EVAL_SCALES = ["TEST.SCALES", "[1.0,0.75,1.25]"]


def dataset_opts(data: Path, out: Path) -> list[str]:
    """The keys that point configs/custom/*.yml at the converted Penn-Fudan tree."""
    return ["DATA.DATASET", "voc", "DATA.ROOT", str(data), "DATA.NUM_CLASSES", "2",
            "DATA.SPLIT", "train", "DATA.VAL_SPLIT", "val", "OUTPUT_DIR", str(out)]


def preset_opts(user_opts: list[str], stage: str, stage1_ckpt: Path | None = None) -> list[str]:
    """The tiny CPU preset for `stage` ('stage1', 'stage2', 'stage3', 'evaluate'), left out where
    the user's --opts name a backbone; stage 3 starts from the stage-1 BAP backbone unless the
    user's --opts name MODEL.INIT."""
    keys = set(user_opts[0::2])
    opts = []
    if "MODEL.BACKBONE" not in keys:
        opts += TINY[:2] if stage in ("stage2", "evaluate") else TINY
    if stage == "stage3" and stage1_ckpt is not None and "MODEL.INIT" not in keys:
        opts += ["MODEL.INIT", str(stage1_ckpt)]
    return opts


def stage1_opts(name: str, pooling: str, iterations: int, batch: int, crop: int,
                workers: int) -> list[str]:
    return ["NAME", name, "MODEL.POOLING", pooling, "DATA.BATCH_SIZE", str(batch),
            "DATA.CROP_SIZE", str(crop), "DATA.NUM_WORKERS", str(workers),
            "SOLVER.MAX_ITER", str(iterations), "SOLVER.MILESTONES", f"[{iterations * 2 // 3}]",
            "SOLVER.CKPT_EVERY", str(max(1, iterations // 4)), "SOLVER.LOG_EVERY", "10"]


def stage2_opts(name: str, stage1_run: str, u0: bool, workers: int) -> list[str]:
    return ["NAME", f"stage2_{name}", "MODEL.WEIGHTS", f"{stage1_run}/checkpoints/final.ckpt",
            "MODEL.USE_U0", str(u0).lower(), "DATA.PSEUDO_LABEL_DIR", f"Generation/{name}",
            "DATA.NUM_WORKERS", str(workers)]


class Benchmark:
    def __init__(self, args, preset: dict, out: Path, data: Path):
        self.a, self.p, self.out, self.data = args, preset, out, data
        self.seconds: dict[str, float] = {}
        self.loads: list[float] = []

    def step(self, key: str, script: str, *args: str) -> None:
        cmd = [sys.executable, script, *args]
        print(f"\n=== {key}\n$ {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO)
        self.seconds[key] = round(time.perf_counter() - start, 1)
        self.loads.append(os.getloadavg()[0])
        if proc.returncode != 0:
            raise SystemExit(f"pennfudan: step '{key}' failed (exit {proc.returncode}); its "
                             "message is above.")

    def stage(self, key: str, script: str, config: str, stage: str, *opts: str) -> None:
        user = list(self.a.opts)
        init = self.out / "stage1_bap" / "checkpoints" / "final.ckpt"
        flags = ["--workers", str(self.a.workers)] if script in ("stage2.py", "evaluate.py") \
            else []
        self.step(key, script, "--config-file", config, "--gpu-id", self.a.gpu_id, *flags,
                  "--opts", *dataset_opts(self.data, self.out),
                  *preset_opts(user, stage, init), *opts, *user)

    def run(self) -> dict:
        p, a = self.p, self.a
        self.step("convert", "data/pennfudan.py", "--out", str(self.data),
                  *(["--source", str(a.source)] if a.source else []),
                  *(["--n-train", str(p["n_train"])] if p["n_train"] else []),
                  *(["--n-val", str(p["n_val"])] if p["n_val"] else []))
        for pooling in ("bap", "gap"):
            self.stage(f"stage1_{pooling}", "stage1.py", "configs/custom/stage1.yml", "stage1",
                       *stage1_opts(f"stage1_{pooling}", pooling, p["stage1_iter"], p["batch"],
                                    p["crop"], a.workers))
        for name, (stage1_run, u0, _) in PSEUDO_LABELS.items():
            self.stage(f"stage2_{name}", "stage2.py", "configs/custom/stage2.yml", "stage2",
                       *stage2_opts(name, stage1_run, u0, a.workers))
        it3 = p["stage3_iter"]
        train_list = self.data / "ImageSets" / "Segmentation" / "train.txt"
        for name, (_, loss, extra) in self.stage3_runs().items():
            extra = [str(v).format(train_list=train_list) for v in extra]
            run = ["NAME", f"stage3_{name}", "MODEL.WEIGHTS",
                   f"stage3_{name}/checkpoints/final.ckpt", "DATA.PSEUDO_LABEL_DIR",
                   "Generation/bap", "DATA.NUM_WORKERS", str(a.workers)]
            self.stage(f"stage3_{name}", "stage3.py", "configs/custom/stage3.yml", "stage3",
                       *run, "MODEL.LOSS", loss, "DATA.BATCH_SIZE", str(p["batch"]),
                       "DATA.CROP_SIZE", str(p["crop"]), "SOLVER.MAX_ITER", str(it3),
                       "SOLVER.VAL_EVERY", str(it3),  # once, at the end: evaluate.py scores
                       "SOLVER.CKPT_EVERY", str(max(1, it3 // 4)), "SOLVER.LOG_EVERY", "10",
                       *extra)
            self.stage(f"evaluate_{name}", "evaluate.py", "configs/custom/stage3.yml",
                       "evaluate", *run, *EVAL_SCALES)
        return self.collect()

    def stage3_runs(self) -> dict:
        return {**STAGE3_RUNS, **(UPPER_BOUND if self.a.upper_bound else {})}

    def collect(self) -> dict:
        """The rows of the table: {row: {"scored on", "miou", "person_iou", "miou_ms_crf",
        "seconds"}}, plus the settings and the time of every step."""
        rows = {"convert Penn-Fudan to the VOC layout": {"seconds": self.seconds["convert"]}}
        for pooling in ("bap", "gap"):
            rows[f"stage 1, {pooling.upper()} ({self.p['stage1_iter']} iterations)"] = {
                "seconds": self.seconds[f"stage1_{pooling}"]}
        quality = {n: json.loads((self.out / f"stage2_{n}" / "quality.json").read_text())
                   for n in PSEUDO_LABELS}

        def label_row(report: dict, key: str, seconds=None) -> dict:
            return {"scored on": f"train ({report['images']} photos)",
                    "miou": report["miou"][key],
                    "person_iou": round(report["per_class_iou"][key]["person"], 2),
                    "seconds": seconds}

        rows["labels: box baseline (Y_box, each box filled)"] = label_row(quality["bap"],
                                                                          "box_baseline")
        for name, (_, _, row) in PSEUDO_LABELS.items():
            rows[f"labels: {row}"] = label_row(quality[name], "Y_crf",
                                               self.seconds[f"stage2_{name}"])
        rows["labels: BAP Y_ret"] = label_row(quality["bap"], "Y_ret")
        rows["labels: BAP Y_crf & Y_ret (disagreement = background)"] = label_row(
            quality["bap"], "Y_crf&Y_ret")
        rows["background everywhere (the floor a model must beat)"] = self.all_background()
        for name, (row, _, _) in self.stage3_runs().items():
            metrics = json.loads((self.out / f"stage3_{name}" / "eval" / "metrics.json")
                                 .read_text())
            modes = metrics["modes"]
            rows[f"{row}, {self.p['stage3_iter']} iterations"] = {
                "scored on": f"val ({metrics.get('images', len(self.val_ids()))} photos)",
                "miou": round(float(modes["single"]["miou"]), 2),
                "person_iou": round(float(modes["single"]["iou"][1]), 2),
                "miou_ms_crf": round(float(modes["multiscale+crf"]["miou"]), 2)
                if "multiscale+crf" in modes else None,
                "seconds": self.seconds[f"stage3_{name}"],
                "eval_seconds": self.seconds[f"evaluate_{name}"]}
        return {"rows": rows, "seconds": self.seconds,
                "total_seconds": round(sum(self.seconds.values()), 1)}

    def val_ids(self) -> list[str]:
        return (self.data / "ImageSets/Segmentation/val.txt").read_text().split()

    def all_background(self) -> dict:
        """The scores of a model that predicts background everywhere on the val photos: with
        pedestrians on a sixth of the pixels, its mIoU is far from 0."""
        import numpy as np

        from utils.io import read_index_png

        person = total = 0
        for i in self.val_ids():
            gt = read_index_png(self.data / "SegmentationClass" / f"{i}.png")
            person, total = person + int((gt == 1).sum()), total + int((gt != 255).sum())
        return {"scored on": f"val ({len(self.val_ids())} photos)",
                "miou": round(50.0 * (1 - person / total), 2), "person_iou": 0.0}


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def results_markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# BANA on Penn-Fudan (`{s['command']}`)", "",
             f"{s['date']}, {s['machine']}, 1-min load average after the steps "
             f"{s['load_average_1min']['mean']} (mean), {s['load_average_1min']['max']} (max); "
             f"{s['n_train']} train / {s['n_val']} val photos, "
             f"box-only; stage 1 {s['stage1_iter']} and stage 3 {s['stage3_iter']} iterations, "
             f"batch {s['batch']}, crop {s['crop']}; "
             + ("`tiny` backbone from scratch, stage 3 from the stage-1 BAP backbone"
                if not s["opts"] else f"--opts {' '.join(s['opts'])}")
             + ". Labels are scored on the train photos they label, models on the held-out val "
             "photos; mIoU over background and person, and the person IoU, in %. Model columns: "
             "single scale; and multi-scale + flip + DenseCRF.", "",
             "| step | scored on | mIoU | person IoU | mIoU, multi-scale + flip + CRF | time |",
             "|---|---|---|---|---|---|"]

    def cell(value):
        return "" if value is None else f"{value:.2f}"

    for row, r in results["rows"].items():
        t = r.get("seconds")
        time_text = "" if t is None else f"{t:.0f} s"
        if r.get("eval_seconds") is not None:
            time_text += f" + {r['eval_seconds']:.0f} s eval"
        lines.append(f"| {row} | {r.get('scored on', '')} | {cell(r.get('miou'))} | "
                     f"{cell(r.get('person_iou'))} | {cell(r.get('miou_ms_crf'))} | "
                     f"{time_text} |")
    lines.append(f"| **total** | | | | | {results['total_seconds'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="8 train / 4 val photos and 10 iterations: checks that every step "
                             "runs, measures nothing")
    parser.add_argument("--out", type=Path, default=Path("runs/pennfudan"),
                        help="OUTPUT_DIR of every stage (removed first)")
    parser.add_argument("--data", type=Path, default=Path("datasets/PennFudanVOC"),
                        help="where the converted tree goes (removed first)")
    parser.add_argument("--source", type=Path, default=None,
                        help="the unzipped PennFudanPed/ (default: ../shared/data/PennFudanPed, "
                             "then datasets/PennFudanPed, then download)")
    parser.add_argument("--stage1-iter", type=int, default=None, metavar="N")
    parser.add_argument("--stage3-iter", type=int, default=None, metavar="N")
    parser.add_argument("--batch", type=int, default=None, metavar="N",
                        help="DATA.BATCH_SIZE of stages 1 and 3")
    parser.add_argument("--crop", type=int, default=None, metavar="PX",
                        help="DATA.CROP_SIZE of stages 1 and 3")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="data-loading and CRF workers of every stage (2)")
    parser.add_argument("--gpu-id", default="cpu", help="the stages' --gpu-id (default cpu)")
    parser.add_argument("--upper-bound", action="store_true",
                        help="also train stage 3 on the GT masks (the upper bound)")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="config overrides for every stage, applied last, e.g. "
                             "MODEL.BACKBONE vgg16 MODEL.INIT imagenet")
    args = parser.parse_args(argv)
    if len(args.opts) % 2:
        parser.error("--opts takes KEY VALUE pairs")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    preset = dict(PRESETS["quick" if args.quick else "default"])
    for key in ("stage1_iter", "stage3_iter", "batch", "crop"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    out, data = args.out.resolve(), args.data.resolve()
    for folder in (out, data):
        if folder.exists():
            print(f"pennfudan: removing the previous benchmark output {folder}")
            shutil.rmtree(folder)
    out.mkdir(parents=True)
    start = time.perf_counter()
    bench = Benchmark(args, preset, out, data)
    results = bench.run()
    info = json.loads((data / "pennfudan.json").read_text())
    results["settings"] = {
        "command": " ".join(["python benchmarks/pennfudan.py", *(argv if argv is not None
                                                                  else sys.argv[1:])]),
        "date": datetime.date.today().isoformat(), "machine": machine(),
        # Other processes slow every step down: how busy the machine was, sampled after each.
        "load_average_1min": {"mean": round(sum(bench.loads) / len(bench.loads), 1),
                              "max": round(max(bench.loads), 1)},
        "n_train": info["n_train"], "n_val": info["n_val"], "opts": args.opts,
        **{k: preset[k] for k in ("stage1_iter", "stage3_iter", "batch", "crop")}}
    text = results_markdown(results)
    (out / "pennfudan_results.md").write_text(text)
    (out / "pennfudan_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + text)
    print(f"Benchmark finished in {(time.perf_counter() - start) / 60:.1f} min; the table is in "
          f"{out / 'pennfudan_results.md'} and {out / 'pennfudan_results.json'}.")
    return results


if __name__ == "__main__":
    main()
