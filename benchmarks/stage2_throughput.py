"""Stage-2 throughput: images/s with 1 CRF worker and with the default (one per core), same images.

Run from the repository root: `python -m benchmarks.stage2_throughput [--images 24] [--size 320]
[--rounds 3] [--backbone tiny] [--workers N]`. CPU only.

A synthetic VOC tree of `--images` images of `--size` px (VOC images are about 500×375) is written
to a temporary folder; a randomly initialised stage-1 network stands in for a trained one (the
CRF, which dominates, costs the same whatever the labels). In each of `--rounds` rounds every
contender in turn starts and warms its process pool, and `engine.stage2.generate` labels all
images into a fresh folder; the median rate is reported, and the median of the ratios taken
within each round (robust to a load that changes between rounds). Pool start-up (spawning the
workers, each importing torch) is timed apart: it is paid once per run, not per image. Peak
memory, measured in one more, untimed run per contender, is the largest sum of the memory of the
main process and all its descendants, sampled every 20 ms from /proc as PSS (shared pages split
between the processes that map them; RSS would count torch's libraries once per worker). The
machine's load average is printed too: on a shared machine other processes take the cores the
workers are meant to have.

Also printed, to tell whether the main process or the workers limit the speed-up: the cost of
one image in the main process (decode and backbone, one thread, as `generate` runs it on the
CPU) and in a worker (`label_one`: unaries, CRF, retrieval, PNG writes), each measured alone.
"""

import argparse
import contextlib
import os
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks._report import device_name, record


def _pss_bytes(pid: int) -> int:
    """Proportional set size: resident memory with pages shared by n processes (torch's
    libraries, mapped by every worker) counted 1/n in each, so that sums over processes hold."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # the process ended between listing and reading
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found += children
            stack += children
    return found


class PeakMemory:
    """Samples the summed PSS of this process and its descendants in a background thread."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak = every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        me = os.getpid()
        while not self._stop.is_set():
            total = sum(_pss_bytes(p) for p in [me, *_descendants(me)])
            self.peak = max(self.peak, total)
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _config(root: Path, label_dir: Path, backbone: str):
    from engine.config import load_config

    return load_config("configs/demo/stage2.yml", [
        "DATA.ROOT", str(root), "DATA.SPLIT", "train", "DATA.PSEUDO_LABEL_DIR", str(label_dir),
        "MODEL.BACKBONE", backbone])


def _per_image_costs(cfg, net, dataset, ids, out: Path) -> tuple[float, float]:
    """Median seconds per image of the main process's part and of a worker's part, alone."""
    import numpy as np

    from engine.stage2_jobs import label_one, output_paths
    from utils.crf import make_crf

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    weight = net.classifier.weight.detach()[:, :, 0, 0].numpy()
    main_s, worker_s = [], []
    try:
        for k, image_id in enumerate(ids):
            start = time.perf_counter()
            item = dataset[k]
            with torch.inference_mode():
                feats = net.backbone(item["image"][None].float())[0].numpy()
            main_s.append(time.perf_counter() - start)
            job = {"id": image_id, "features": feats, "weight": weight,
                   "crf": make_crf(cfg.MODEL.DCRF, cfg.MODEL.CRF_BACKEND), "grid_size": cfg.MODEL.GRID_SIZE,
                   "bg_threshold": cfg.MODEL.BG_THRESHOLD, "use_u0": cfg.MODEL.USE_U0,
                   "image": np.ascontiguousarray(item["image"].permute(1, 2, 0).numpy()),
                   "boxes": item["boxes"].numpy().astype(np.int64),
                   "bg_mask": (item["bg_mask"][0].numpy() == 1).astype(np.uint8),
                   "file_name": image_id, "out": output_paths(out, image_id)}
            start = time.perf_counter()
            label_one(job)
            worker_s.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(main_s), statistics.median(worker_s)


def synthetic_labelling(tmp: Path, args):
    """A synthetic VOC tree of args.images images of args.size px under `tmp`, a randomly
    initialised stage-1 network of args.backbone and the split to label: (cfg, net, dataset)."""
    from data.synthetic import make_synthetic_voc
    from engine.runs import model_spec
    from engine.stage2 import open_dataset
    from models.zoo import build

    make_synthetic_voc(tmp / "VOC", n_train=args.images, n_val=1, size=args.size, seed=0)
    cfg = _config(tmp / "VOC", tmp / "unused", args.backbone)
    return cfg, build(model_spec(cfg, "labeler")).eval(), open_dataset(cfg)


def _label_all(cfg, net, dataset, workers: int, memory: bool, device=torch.device("cpu"),
               pixel_work: str = "auto"):
    """Start and warm a pool, label every image; returns (start-up s, images/s, peak summed PSS
    bytes or 0 when `memory` is off, the label files)."""
    from engine.stage2 import generate, pixel_work_on_device
    from engine.stage2_jobs import preload_pixel_work
    from utils.pool import WorkerPool

    initializer = None if pixel_work_on_device(pixel_work, device) else preload_pixel_work
    sampler = PeakMemory() if memory else contextlib.nullcontext()
    with sampler:
        start = time.perf_counter()
        with WorkerPool(workers, initializer) as pool:
            for _ in range(workers):
                pool.submit(int, 0)
            list(pool.finish())
            startup = time.perf_counter() - start
            start = time.perf_counter()
            done = generate(cfg, net, dataset, dataset.ids, device, workers, progress=False,
                            pixel_work=pixel_work, pool=pool)
            rate = done / (time.perf_counter() - start)
    label_dir = cfg.pseudo_label_dir
    files = {p.relative_to(label_dir): p.read_bytes() for p in sorted(label_dir.rglob("*.png"))}
    return startup, rate, sampler.peak if memory else 0, files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The synthetic split and the labelling setup of the stage-2 benchmarks."""
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbone", default="tiny", choices=("tiny", "vgg16", "resnet101"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="CRF workers (default: one per core, as stage2.py)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    cores = os.cpu_count()
    load_before = os.getloadavg()[0]
    contenders = sorted({1, args.workers})
    startup = {n: [] for n in contenders}
    rates = {n: [] for n in contenders}
    with tempfile.TemporaryDirectory(prefix="stage2_bench_") as tmp:
        tmp = Path(tmp)
        cfg, net, dataset = synthetic_labelling(tmp, args)
        t_main, t_worker = _per_image_costs(cfg, net, dataset, dataset.ids[:6], tmp / "alone")
        # Only one pool is alive at a time, and memory is sampled in a round of its own: reading
        # /proc/<pid>/smaps_rollup every few ms costs enough CPU to slow the timed rounds.
        for r in range(args.rounds):
            # ABBA order: a load that drifts during a round hurts both contenders alike.
            for n in contenders if r % 2 == 0 else contenders[::-1]:
                run_cfg = _config(tmp / "VOC", tmp / f"labels_{n}_{r}", args.backbone)
                seconds, rate, _, _ = _label_all(run_cfg, net, dataset, n, memory=False)
                startup[n].append(seconds)
                rates[n].append(rate)
        peaks, outputs = {}, {}
        for n in contenders:
            run_cfg = _config(tmp / "VOC", tmp / f"labels_{n}_memory", args.backbone)
            _, _, peaks[n], outputs[n] = _label_all(run_cfg, net, dataset, n, memory=True)

    one, many = contenders[0], contenders[-1]
    median = {n: statistics.median(v) for n, v in rates.items()}
    bound = min(many / t_worker, 1 / t_main, cores / (t_main + t_worker)) * max(t_main, t_worker)
    gb = 1024 ** 3
    print(f"Stage-2 throughput: {args.images} synthetic images of {args.size}x{args.size} px, "
          f"{args.backbone} backbone (random weights), CPU with {cores} cores, torch "
          f"{torch.__version__}; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print("worker start-up (spawn + imports, once per run, not in the rates): "
          + ", ".join(f"{n} worker(s) {statistics.median(startup[n]):.1f} s"
                      for n in contenders))
    print(f"per image, alone in one thread: main process (decode + backbone) {t_main * 1e3:.0f} ms"
          f" | worker (unaries + CRF + retrieval + PNGs) {t_worker * 1e3:.0f} ms"
          f" -> at most {bound:.2f}x from {many} workers on {cores} cores")
    print(f"images/s, median of {args.rounds} interleaved rounds: "
          + " | ".join(f"{n} worker(s) {median[n]:.2f} (all: "
                       f"{', '.join(f'{v:.2f}' for v in rates[n])})" for n in contenders)
          + f" | ratio of medians {median[many] / median[one]:.2f}x, median of the per-round "
          f"ratios {statistics.median(a / b for a, b in zip(rates[many], rates[one])):.2f}x")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("peak memory, main process + workers (summed PSS): "
          + " | ".join(f"{n} worker(s) {peaks[n] / gb:.2f} GB" for n in contenders)
          + f" | main process alone, peak RSS {own / gb:.2f} GB")
    print(f"label files identical across worker counts: {outputs[one] == outputs[many]}")
    command = (f"python -m benchmarks.stage2_throughput --images {args.images} --size {args.size} "
               f"--rounds {args.rounds} --backbone {args.backbone}")
    where = device_name(torch.device("cpu"))
    for n in contenders:
        record("stage2_throughput", f"stage 2 images/s, {n} CRF worker(s) ({args.backbone}, "
               f"{args.size} px)", median[n], "img/s", where, command)
    record("stage2_throughput", f"stage 2 speed-up, {many} vs {one} worker(s)",
           median[many] / median[one], "x", where, command)


if __name__ == "__main__":
    main()
