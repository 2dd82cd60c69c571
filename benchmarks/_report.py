"""One row per figure for `benchmarks/run_all.sh`: a benchmark calls `record(...)` next to the
line it prints; when BANA_BENCH_OUT names a file, the row is appended there as one JSON line,
and `python -m benchmarks.table FILE` prints every row in one table."""

import json
import os
import platform

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def record(benchmark: str, figure: str, value: float, unit: str, device: str,
           command: str) -> None:
    path = os.environ.get("BANA_BENCH_OUT")
    if not path:
        return
    row = {"benchmark": benchmark, "figure": figure, "value": value, "unit": unit,
           "device": device, "command": command}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
