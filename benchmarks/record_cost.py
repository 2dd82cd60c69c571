"""What stage 2's per-image record (data/labelset.py: one instance mask per box and variant,
RLE-encoded, and the per-box signals) costs next to the DenseCRF the same worker runs, measured
side by side on one image in interleaved rounds.

    python -m benchmarks.record_cost [--size 500 375] [--boxes 3] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main(argv=None) -> dict:
    from data.labelset import image_record
    from utils.crf import crf_in_regions, make_crf

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    p.add_argument("--boxes", type=int, default=3)
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args(argv)
    (w, h), rng = a.size, np.random.default_rng(0)
    x1 = rng.integers(0, w // 2, a.boxes)
    y1 = rng.integers(0, h // 2, a.boxes)
    boxes = np.stack([x1, y1, x1 + rng.integers(w // 4, w // 2, a.boxes),
                      y1 + rng.integers(h // 4, h // 2, a.boxes)], 1)
    classes = rng.integers(1, 3, a.boxes)
    # A photo-like image (flat regions, mild noise): the CRF's lattice grows with colour noise.
    image = np.full((h, w, 3), 90, np.uint8)
    for (bx1, by1, bx2, by2), c in zip(boxes, classes):
        image[by1:by2, bx1:bx2] = (60 * c, 200 - 50 * c, 120)
    image = (image + rng.integers(0, 8, image.shape)).astype(np.uint8)
    probs = rng.random((3, h, w)).astype(np.float32)
    probs /= probs.sum(0)
    regions = np.zeros((2, h, w), bool)
    for (bx1, by1, bx2, by2), c in zip(boxes, classes):
        regions[c - 1, by1:by2, bx1:bx2] = True
    crf = make_crf([4, 55, 3, 3, 3])
    scores = rng.random((a.boxes, h, w)).astype(np.float32)
    timed = {"crf": [], "record": []}
    for _ in range(a.rounds):
        start = time.perf_counter()
        label = crf_in_regions(crf, image, probs, regions).astype(np.uint8)
        timed["crf"].append(time.perf_counter() - start)
        start = time.perf_counter()
        image_record("x", "x.jpg", boxes, classes,
                     {"Y_crf": label, "Y_ret": label, "Y_box": label},
                     {v: f"{v}/x.png" for v in ("Y_crf", "Y_ret", "Y_box")}, scores)
        timed["record"].append(time.perf_counter() - start)
    ms = {k: 1000 * statistics.median(v) for k, v in timed.items()}
    print(f"{w}x{h} image, {a.boxes} boxes, median of {a.rounds} interleaved rounds: DenseCRF "
          f"{ms['crf']:.1f} ms, record {ms['record']:.1f} ms "
          f"({100 * ms['record'] / ms['crf']:.0f} % of the CRF)")
    return ms


if __name__ == "__main__":
    main()
