"""Mask R-CNN trained on each mask source with one schedule: box < Y_crf <= gt expected.

    python -m benchmarks.instance_masks [--out /tmp/instance_masks] [--write-docs]

On a synthetic COCO-format export with made-up classes (data/synthetic.py --format
coco-custom, 120 train / 30 val images of 96 px), CPU: stage 1 and stage 2 with the demo configs,
then stage 3's instance task (configs/demo/stage3_instance.yml: tiny Mask R-CNN, 400
iterations) on MODEL.INSTANCE_MASKS box, Y_ret, Y_crf and gt, each scored by evaluate.py on the
val split's masks. Prints the table; --write-docs also writes docs/instance_results.md.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("box", "Y_ret", "Y_crf", "gt")


def _run(*args):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/instance_masks"))
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES,
                        help="mask sources to (re)train; the table has every source whose run "
                             "exists under --out")
    args = parser.parse_args(argv)
    root, out = args.out / "R", args.out / "O"
    opts = ["DATA.DATASET", "coco", "DATA.CLASS_MAP", "all", "DATA.ROOT", root, "DATA.SPLIT",
            "train", "DATA.VAL_SPLIT", "val", "DATA.NUM_CLASSES", "5", "OUTPUT_DIR", out]
    if not (out / "stage2" / "quality.json").is_file():  # data, stage 1 and 2 once per --out
        _run("data/synthetic.py", "--format", "coco-custom", "--out", root, "--n-train", "120",
             "--n-val", "30", "--size", "96", "--seed", "0")
        _run("data/coco_bbox_setup.py", "--data-root", root)
        _run("stage1.py", "--config-file", "configs/demo/stage1.yml", "--gpu-id", "cpu",
             "--opts", *opts)
        _run("stage2.py", "--config-file", "configs/demo/stage2.yml", "--gpu-id", "cpu",
             "--opts", *opts)
    it = args.iterations
    for source in args.sources:
        shutil.rmtree(out / f"instance_{source}", ignore_errors=True)
        run = ["MODEL.INSTANCE_MASKS", source, "NAME", f"instance_{source}",
               "MODEL.WEIGHTS", f"instance_{source}/checkpoints/final.ckpt",
               "SOLVER.MAX_ITER", str(it), "SOLVER.MILESTONES", f"[{it * 3 // 4}]"]
        _, seconds = _run("stage3.py", "--config-file", "configs/demo/stage3_instance.yml",
                          "--gpu-id", "cpu", "--opts", *opts, *run)
        _run("evaluate.py", "--config-file", "configs/demo/stage3_instance.yml", "--gpu-id",
             "cpu", "--save-vis", "4", "--opts", *opts, *run, "TEST.SPLIT", "val")
        ap = json.loads((out / f"instance_{source}" / "eval" / "metrics.json").read_text())["ap"]
        print(f"{source:6s} segm AP {ap['segm']['AP']:.1f}  AP50 {ap['segm']['AP50']:.1f}  "
              f"bbox AP {ap['bbox']['AP']:.1f}  ({seconds:.0f} s training)", flush=True)
    rows = {}
    for source in SOURCES:
        metrics = out / f"instance_{source}" / "eval" / "metrics.json"
        if metrics.is_file():
            rows[source] = json.loads(metrics.read_text())["ap"]
    lines = ["# Mask R-CNN on each mask source (synthetic COCO-format export, CPU)", "",
             "`python -m benchmarks.instance_masks --write-docs`: 120 train / 30 val images of "
             "96 px with made-up classes; tiny Mask R-CNN, "
             f"{it} iterations, batch 4, the same schedule for every source; COCO AP (%) on "
             "the val split's masks.", "",
             "| trained on | segm AP | segm AP50 | segm AP75 | bbox AP | bbox AP50 |",
             "|---|---|---|---|---|---|"]
    for source, r in rows.items():
        s, b = r["segm"], r["bbox"]
        lines.append(f"| {source} | {s['AP']:.1f} | {s['AP50']:.1f} | {s['AP75']:.1f} | "
                     f"{b['AP']:.1f} | {b['AP50']:.1f} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (args.out / "instance_results.json").write_text(json.dumps(rows, indent=2) + "\n")
    if args.write_docs:
        (REPO / "docs" / "instance_results.md").write_text(text)
    return rows


if __name__ == "__main__":
    main()
