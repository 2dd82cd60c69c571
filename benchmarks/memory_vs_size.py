"""Peak memory of labelling one image against its size: predict.py's path (`Segmenter`, single
scale, with and without the CRF), with TEST.MAX_PIXELS off and at its default.

Run from the repository root: `python -m benchmarks.memory_vs_size [--sizes 0.25 1 2 4 8]
[--backbone tiny] [--max-pixels 4000000] [--unlimited-up-to 4]`. Each measurement runs in a fresh process (a
randomly initialised stage-3 network of `--backbone`, on the CPU), labels one smooth random
image of that many megapixels (4:3) and reports the process's peak resident memory
(`ru_maxrss`), and the same process's peak before the image was made (imports and the
network), so the difference is what the image costs. Prints a Markdown table.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _child(megapixels: float, crf: bool, max_pixels: int, backbone: str) -> dict:
    import resource
    import time

    import numpy as np
    import torch

    from engine.predict import Segmenter
    from models.zoo import ModelSpec, build, checkpoint_entry
    from engine.config import load_config

    torch.manual_seed(0)
    net = build(ModelSpec("deeplab", backbone, 21, classes=tuple(f"c{k}" for k in range(21))))
    cfg = load_config(REPO / "configs/demo/stage3.yml")
    path = Path(f"/tmp/memory_vs_size_{backbone}.ckpt")
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "bana": checkpoint_entry(3, net.spec, cfg.to_dict())}, path)
    seg = Segmenter(path, crf=crf, max_pixels=max_pixels)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    width = int(round((megapixels * 1e6 * 4 / 3) ** 0.5))
    height = int(round(megapixels * 1e6 / width))
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = np.ascontiguousarray(np.repeat(np.repeat(small, 16, 0), 16, 1)[:height, :width])
    start = time.perf_counter()
    label = seg(image)
    seconds = time.perf_counter() - start
    assert label.shape == (height, width)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"height": height, "width": width, "before_mib": before / 1024,
            "peak_mib": peak / 1024, "seconds": seconds}


def measure(megapixels: float, crf: bool, max_pixels: int, backbone: str) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); "
            "from benchmarks.memory_vs_size import _child; "
            f"print(json.dumps(_child({megapixels}, {crf}, {max_pixels}, {backbone!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 1, 2, 4, 8],
                        help="image sizes in megapixels")
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--max-pixels", type=int, default=4_000_000,
                        help="the TEST.MAX_PIXELS to compare with no limit")
    parser.add_argument("--unlimited-up-to", type=float, default=4,
                        help="measure without a limit only up to this many megapixels (the "
                             "memory of a larger image may exceed the machine's)")
    args = parser.parse_args()

    columns = [(crf, limit) for crf in (False, True) for limit in (0, args.max_pixels)]
    print(f"Peak resident memory of the process (MiB), single scale, `{args.backbone}` backbone, "
          "CPU; in brackets the image's share (peak minus the process before the image).\n")
    print("| image | " + " | ".join(
        f"{'CRF' if crf else 'no CRF'}, {'no limit' if not limit else f'MAX_PIXELS {limit:,}'}"
        for crf, limit in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for mp in args.sizes:
        cells, shape = [], None
        for crf, limit in columns:
            if not limit and mp > args.unlimited_up_to:
                cells.append("not run")
                continue
            r = measure(mp, crf, limit, args.backbone)
            if "error" in r:
                cells.append(f"failed: {r['error'][:60]}")
                continue
            shape = f"{r['width']}x{r['height']}"
            cells.append(f"{r['peak_mib']:,.0f} (+{r['peak_mib'] - r['before_mib']:,.0f}), "
                         f"{r['seconds']:.1f} s")
        print(f"| {mp:g} MP ({shape}) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
