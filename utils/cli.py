"""What every entry script shares: arguments, device choice, and errors as messages.

A stage script is `main(run, description)`: it parses `--config-file`, `--gpu-id`, `--opts`
(plus the script's own flags), loads the config and calls `run(cfg, args)`. A `BanaError`
(or another error a user can act on: an output path that is a file or not writable, a full
disk) becomes one paragraph on stderr and exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import re
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from utils.errors import BanaError


@dataclass(frozen=True)
class Devices:
    """Where to run: Lightning's `accelerator` and `devices`, plus a line saying why."""

    accelerator: str  # "gpu" or "cpu"
    devices: list[int] | int  # GPU ids, or the number of CPU processes (per node)
    note: str
    num_nodes: int = 1  # machines of a torchrun / SLURM launch
    launched: bool = False  # started by torchrun or srun: one process per device already

    @property
    def count(self) -> int:
        """Devices per node."""
        return len(self.devices) if isinstance(self.devices, list) else self.devices

    @property
    def total(self) -> int:
        """Devices over all nodes: the processes a batch is split across."""
        return self.count * self.num_nodes

    def device_of(self, local_rank: int = 0):
        """The torch device of the process with this local rank."""
        import torch

        if self.accelerator == "gpu":
            return torch.device(f"cuda:{self.devices[local_rank]}")
        return torch.device("cpu")


def resolve_devices(gpu_id: str, cuda_count: int | None = None, launch=None) -> Devices:
    """`0` / `0,1` -> those GPUs; `cpu` -> one CPU process; `cpu:2` -> two CPU processes (DDP over
    gloo, for testing multi-process code without GPUs). Without CUDA, `--gpu-id 0` falls back to
    the CPU and says so; asking for any other GPU there is an error.

    Under torchrun or srun (`launch`, default: detected), the launcher has started one process
    per device: the devices per node are its processes per node, and --gpu-id only says CPU or
    GPU (or lists one GPU id per local process)."""
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if launch is None:
        from utils.distributed import detect_launch

        launch = detect_launch()
    if launch.distributed:
        return _launched_devices(gpu_id, cuda_count, launch)
    spec = gpu_id.strip().lower()
    if spec == "cpu" or spec.startswith("cpu:"):
        n = 1
        if spec.startswith("cpu:"):
            try:
                n = int(spec[4:])
            except ValueError:
                n = 0
            if n < 1:
                raise BanaError(f"--gpu-id {gpu_id}: expected cpu:N with N >= 1 processes.")
        return Devices("cpu", n, f"Running on CPU ({n} process{'es' if n > 1 else ''}).")
    try:
        ids = [int(x) for x in spec.split(",") if x != ""]
    except ValueError:
        raise BanaError(f"--gpu-id {gpu_id}: expected GPU ids like 0 or 0,1, or 'cpu'.") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise BanaError(f"--gpu-id {gpu_id}: expected distinct GPU ids like 0 or 0,1, or 'cpu'.")
    if cuda_count == 0:
        if ids == [0]:
            return Devices("cpu", 1, "CUDA is not available on this machine: running on CPU "
                                     "(pass --gpu-id cpu to silence this note).")
        raise BanaError(f"--gpu-id {gpu_id}: this machine has no CUDA GPU. Use --gpu-id cpu "
                        "(or cpu:N for N processes).")
    missing = [i for i in ids if i >= cuda_count]
    if missing:
        raise BanaError(f"--gpu-id {gpu_id}: GPU {missing[0]} does not exist; this machine has "
                        f"{cuda_count} GPU(s), ids 0..{cuda_count - 1}. Pick among those, or use "
                        "--gpu-id cpu.")
    return Devices("gpu", ids, f"Running on GPU {','.join(map(str, ids))}.")


def _launched_devices(gpu_id: str, cuda_count: int, launch) -> Devices:
    per_node = launch.local_world_size
    where = (f"{launch.launcher} started {launch.world_size} process(es), {per_node} per node on "
             f"{launch.num_nodes} node(s)")
    spec = gpu_id.strip().lower()
    if spec == "cpu" or spec.startswith("cpu:"):
        if spec != "cpu" and spec != f"cpu:{per_node}":
            raise BanaError(f"--gpu-id {gpu_id}: {where}, one CPU process each; pass --gpu-id "
                            "cpu (the launcher sets the number of processes).")
        return Devices("cpu", per_node, f"Running on CPU: {where}.", launch.num_nodes, True)
    try:
        ids = [int(x) for x in spec.split(",") if x != ""]
    except ValueError:
        raise BanaError(f"--gpu-id {gpu_id}: expected GPU ids like 0 or 0,1, or 'cpu'.") from None
    if cuda_count == 0:
        if ids == [0]:
            return Devices("cpu", per_node, f"CUDA is not available: running on CPU; {where}.",
                           launch.num_nodes, True)
        raise BanaError(f"--gpu-id {gpu_id}: this machine has no CUDA GPU. Use --gpu-id cpu.")
    if ids == [0] and per_node > 1:
        ids = list(range(per_node))  # the default: GPUs 0..n-1, one per local process
    if len(ids) != per_node or max(ids) >= cuda_count:
        raise BanaError(f"--gpu-id {gpu_id}: {where}, so each node needs {per_node} GPU id(s) "
                        f"(one per local process) among its {cuda_count} GPU(s). Leave --gpu-id "
                        f"at 0 to use GPUs 0..{per_node - 1}, or start as many processes per node "
                        "as GPUs listed.")
    return Devices("gpu", ids, f"Running on GPU {','.join(map(str, ids))} of each node; {where}.",
                   launch.num_nodes, True)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config-file", required=True, metavar="FILE", help="YAML config")
    p.add_argument("--gpu-id", default="0", metavar="ID",
                   help="GPU ids ('0', '0,1'), 'cpu', or 'cpu:N' for N CPU processes "
                        "(default 0; falls back to CPU when CUDA is absent)")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                   help="override config keys, e.g. --opts SOLVER.MAX_ITER 100 OUTPUT_DIR runs/x")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return p


def report_error(message: str) -> None:
    # One paragraph, except a list of problems ("  1. ...", "  2. ..."): one paragraph each.
    parts = re.split(r"\n(?=  \d+\. )", message)
    wrapped = "\n".join(
        textwrap.fill(part, width=100, break_long_words=False, break_on_hyphens=False,
                      initial_indent="  " if k else "", subsequent_indent="     " if k else "")
        for k, part in enumerate(parts))
    # Start on a fresh line: a progress bar may have left the cursor mid-line.
    print(f"\nerror: {wrapped}", file=sys.stderr)


def error_message(error: BanaError) -> str:
    """The error's own words. A DataLoader worker re-raises it as "Caught BanaError in DataLoader
    worker process N. Original Traceback ...", whose last line holds them."""
    text = str(error)
    marker = f"{BanaError.__module__}.{BanaError.__qualname__}: "
    if text.startswith("Caught ") and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


_OUTPUT_FIX = ("choose a writable folder instead (the OUTPUT_DIR or DATA.PSEUDO_LABEL_DIR key, "
               "or the script's --out).")


def os_error_message(error: OSError) -> str | None:
    """A message for an OSError the user can fix (an output path that cannot be written, a full
    or read-only disk), or None for one that is a bug."""
    path = error.filename
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: {error.strerror}. Fix the permissions, or {_OUTPUT_FIX}"
    if error.errno == errno.ENOTDIR and path is not None:
        blocker = next((p for p in Path(path).parents if p.exists() and not p.is_dir()), path)
        return (f"cannot create {path}: {blocker} is a file, not a folder. Move the file away, "
                f"or {_OUTPUT_FIX}")
    if error.errno == errno.EEXIST and path is not None and not Path(path).is_dir():
        return (f"cannot create the folder {path}: a file of that name exists. Move the file "
                f"away, or {_OUTPUT_FIX}")
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"cannot write {path}: no space left on the device ({error.strerror}). Nothing "
                "half-written was kept. Free some space, then rerun the same command (stages 1 "
                "and 3: add --resume to continue from the last checkpoint); files already "
                "written are complete and are not redone.")
    return None


def guarded(fn: Callable[[], object], debug: bool) -> object:
    """Run `fn`; turn user-fixable errors into a message and exit status 2."""
    try:
        return _guarded(fn, debug)
    finally:
        # A process group left to the interpreter's exit aborts the process ("terminate called
        # without an active exception") under torchrun / srun.
        from utils.distributed import destroy_process_group

        destroy_process_group()


def _guarded(fn: Callable[[], object], debug: bool) -> object:
    # Whole lines, one write each: the processes of a torchrun / srun launch share one stdout,
    # and print() writes a text and its newline separately, so their lines would interleave
    # mid-line. In a log file, a line also appears as soon as it is printed.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True, write_through=False)
    try:
        return fn()
    except BanaError as e:
        if debug:
            raise
        report_error(error_message(e))
    except OSError as e:
        message = os_error_message(e)
        if debug or message is None:
            raise
        report_error(message)
    except KeyboardInterrupt:
        report_error("interrupted; outputs written so far are complete files. Rerun the same "
                     "command to continue (stages 1 and 3: add --resume to continue from the "
                     "last checkpoint).")
        sys.exit(130)
    sys.exit(2)


def main(run: Callable, description: str,
         add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
         argv: list[str] | None = None):
    """Parse arguments, load the config, and call `run(cfg, args)` with errors as messages."""
    parser = base_parser(description)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)

    def go():
        from utils.config import load_config

        cfg = load_config(args.config_file, args.opts)
        return run(cfg, args)

    if not args.debug:
        # Library deprecation chatter that a user can do nothing about.
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    return guarded(go, args.debug)
