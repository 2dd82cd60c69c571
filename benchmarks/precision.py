"""Training-step time in float32 and in bf16-mixed (and 16-mixed on CUDA): the stage-3 networks,
DeepLab-LargeFOV (VGG-16) and DeepLab-V2 (ResNet-101), one SGD step with the noise-aware loss.

Run from the repository root: `python -m benchmarks.precision [--batch 2] [--size 321]
[--rounds 3] [--backbones vgg16 resnet101] [--device cuda]`. The device defaults to the first
GPU when there is one, else the CPU.

A step is what stage 3 runs per iteration: forward under the precision's autocast (Lightning's
precision plugin does the same), the float32 cosine classifier and NAL, backward, SGD (with a
gradient scaler for 16-mixed). Random weights and labels: the cost does not depend on them.
Contenders are interleaved (one step of each in turn, ABBA) after two warm-up steps, the median
is reported, and the ratio fp32 / mixed is taken within each round (the machine is noisy). On
CUDA every step is synchronised before the clock is read, and the networks are channels-last
as in the stages.
"""

import argparse
import contextlib
import statistics
import time

import torch

from benchmarks._report import device_name, record
from models.zoo import ModelSpec, build
from models.losses import compute_loss
from utils.precision import autocast_dtype


def _step_fn(net, images, labels, precision, device):
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-9, momentum=0.9)
    dtype = autocast_dtype(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None

    def step():
        optimizer.zero_grad(set_to_none=True)
        ctx = (torch.autocast(device.type, dtype=dtype) if dtype is not None
               else contextlib.nullcontext())
        with ctx:
            cos = net(images, out_size=images.shape[-2:])
        loss = compute_loss("nal", cos, labels[:, 0], labels[:, 1], temperature=20.0,
                            gamma=7.0, lam=0.1, beta=0.8)["loss"]
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=321)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbones", nargs="+", default=["vgg16", "resnet101"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    precisions = ["32", "bf16-mixed"] + (["16-mixed"] if device.type == "cuda" else [])
    where = device_name(device)
    command = (f"python -m benchmarks.precision --batch {args.batch} --size {args.size} "
               f"--rounds {args.rounds}")
    print(f"Training step, batch {args.batch} x {args.size}^2, NAL, on {where}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    for name in args.backbones:
        spec = ModelSpec("deeplab", name, 21, fc6_dilation=12 if name == "vgg16" else 1)
        net = build(spec).to(device).train()
        if device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        images = torch.rand(args.batch, 3, args.size, args.size, device=device) * 255
        labels = torch.randint(0, 21, (args.batch, 2, args.size, args.size), device=device)
        steps = {p: _step_fn(net, images, labels, p, device) for p in precisions}
        for p in precisions:
            for _ in range(2):
                steps[p]()  # warm-up: allocator, cuDNN / oneDNN algorithm choice
        times = {p: [] for p in precisions}
        for r in range(args.rounds):
            for p in precisions if r % 2 == 0 else precisions[::-1]:
                start = time.perf_counter()
                steps[p]()
                times[p].append(time.perf_counter() - start)
        median = {p: statistics.median(v) for p, v in times.items()}
        parts = []
        for p in precisions:
            ratio = statistics.median(a / b for a, b in zip(times["32"], times[p]))
            parts.append(f"{p} {median[p] * 1e3:.0f} ms" + ("" if p == "32" else
                         f" ({ratio:.2f}x the speed of fp32)"))
            record("precision", f"{name} train step, {p}", median[p] * 1e3, "ms", where, command)
            if p != "32":
                record("precision", f"{name} speed-up {p} vs fp32", ratio, "x", where, command)
        print(f"{name:>9}: " + " | ".join(parts))
        del net, steps
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
