"""Stage-2 images/s with the per-pixel work on the backbone's device (`--pixel-work device`, the
default on GPUs) and in the CRF workers (`--pixel-work workers`, the default on the CPU).

Run from the repository root: `python -m benchmarks.stage2_paths [--images 24] [--size 320]
[--rounds 3] [--backbone tiny] [--workers N] [--device cuda]`. The device defaults to the first
GPU when there is one.

A synthetic VOC tree of `--images` images is written to a temporary folder and labelled by
`engine.stage2.generate` with a randomly initialised stage-1 network, once per path per round
(ABBA order), each into a fresh folder; worker start-up is outside the timing. Reported: the
median images/s of each path, the median of the per-round ratios, and whether both paths wrote
identical label files (on the CPU they run the same float32 operations; on a GPU they may differ
in the last bits of a few pixels).
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks._report import device_name, record
from benchmarks.stage2_throughput import (_config, _label_all, add_arguments,
                                          synthetic_labelling)

PATHS = ("workers", "device")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    where = device_name(device)
    torch.manual_seed(0)
    rates = {p: [] for p in PATHS}
    files = {}
    with tempfile.TemporaryDirectory(prefix="stage2_paths_") as tmp:
        tmp = Path(tmp)
        _, net, dataset = synthetic_labelling(tmp, args)
        for r in range(args.rounds):
            for path in PATHS if r % 2 == 0 else PATHS[::-1]:
                run_cfg = _config(tmp / "VOC", tmp / f"labels_{path}_{r}", args.backbone)
                _, rate, _, files[path] = _label_all(run_cfg, net, dataset, args.workers,
                                                     memory=False, device=device,
                                                     pixel_work=path)
                rates[path].append(rate)
    median = {p: statistics.median(v) for p, v in rates.items()}
    ratio = statistics.median(d / w for d, w in zip(rates["device"], rates["workers"]))
    command = (f"python -m benchmarks.stage2_paths --images {args.images} --size {args.size} "
               f"--rounds {args.rounds} --backbone {args.backbone} --workers {args.workers}")
    print(f"Stage 2, {args.images} images of {args.size} px, {args.backbone} backbone, "
          f"{args.workers} CRF worker(s), backbone on {where}:")
    print("images/s, median of interleaved rounds: "
          + " | ".join(f"per-pixel work in {p} {median[p]:.2f} (all: "
                       f"{', '.join(f'{v:.2f}' for v in rates[p])})" for p in PATHS)
          + f" | device / workers {ratio:.2f}x")
    print(f"label files identical between the paths: {files['device'] == files['workers']}")
    for p in PATHS:
        record("stage2_paths", f"stage 2 images/s, per-pixel work in {p} ({args.backbone}, "
               f"{args.size} px, {args.workers} workers)", median[p], "img/s", where, command)
    record("stage2_paths", "stage 2 speed-up, device path vs worker path", ratio, "x", where,
           command)


if __name__ == "__main__":
    main()
