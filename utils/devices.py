"""Where a run computes: `--gpu-id` (and a torchrun / srun launch) resolved into Lightning's
`accelerator`, `devices` and `num_nodes`, with a line saying why."""

from __future__ import annotations

from dataclasses import dataclass

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
