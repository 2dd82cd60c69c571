"""Runs launched as several processes, on one machine or many: torchrun and SLURM's srun.

    torchrun --nnodes 2 --nproc_per_node 4 ... stage2.py --config-file ...
    srun python stage2.py --config-file ...          (inside an sbatch allocation)

Detection is Lightning's own (`TorchElasticEnvironment`, `SLURMEnvironment`), so the training
stages (which Lightning runs) and the sharded ones (stage 2, evaluate.py, predict.py, which this
module runs) agree on who is who. Without a launcher, every function here describes a single
process (rank 0 of 1) and does nothing else.

The sharded stages split their images by rank (`shard`), write their own files, and meet at
`barrier()` before rank 0 sums up (`all_reduce_sum`). The process group is gloo, over TCP: it
carries a barrier and a confusion matrix, never a tensor on a GPU, so it works the same on
CPU-only machines and between GPU nodes.

When one process stops (an error, a signal, killed), the others must not wait for it: gloo raises
in the collective they wait in as soon as the stopped process's connections close (`peer_lost`
tells those errors from others), and torchrun terminates them (SIGTERM) once one has exited. Each
of the others then ends with one line (`peer_message`) instead of gloo's traceback; under
torchrun, whose agent holds the process group's store, the process that stopped with an error
first writes its rank there (`announce_stop`), and the line names it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch

# How long a process waits at a barrier for the others. Shards of one split take about the same
# time, but stage 2 on COCO runs for hours and nodes differ; a crashed process ends the whole run
# through the launcher (torchrun and srun stop the other processes), not through this timeout.
BARRIER_TIMEOUT = timedelta(hours=24)
# Where the first process to stop with an error writes its rank (one key per attempt: torchrun
# --max-restarts starts the processes again with the same store), and how long a process waits
# for torchrun's agent to answer.
STOPPED_KEY = "bana/stopped/{attempt}"
STORE_TIMEOUT = timedelta(seconds=10)
# What gloo raises in a collective whose peer's connections closed: its process exited or was
# killed, or it destroyed its process group (gloo/transport/tcp/pair.cc).
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


@dataclass(frozen=True)
class Launch:
    """Where this process stands in the run: `launcher` is "torchrun", "slurm" or None."""

    launcher: str | None
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    @property
    def distributed(self) -> bool:
        return self.launcher is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_tasks_per_node(world_size: int) -> int:
    """SLURM_NTASKS_PER_NODE ('4', or '4(x2)' in some versions), else tasks / nodes."""
    raw = os.environ.get("SLURM_NTASKS_PER_NODE", "")
    if raw:
        try:
            return int(raw.split("(")[0])
        except ValueError:
            pass
    nodes = int(os.environ.get("SLURM_NNODES", os.environ.get("SLURM_JOB_NUM_NODES", "1")))
    return max(1, world_size // max(1, nodes))


def detect_launch() -> Launch:
    """The launcher that started this process (Lightning's detection), or a single process."""
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        env = TorchElasticEnvironment()
        world = env.world_size()
        return Launch("torchrun", env.global_rank(), world, env.local_rank(),
                      int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if SLURMEnvironment.detect() and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        env = SLURMEnvironment()
        world = env.world_size()
        return Launch("slurm", env.global_rank(), world, env.local_rank(),
                      _slurm_tasks_per_node(world))
    return Launch(None)


def shard(items: list, launch: Launch) -> list:
    """This process's share of `items`: every world_size-th one from its rank (a strided split
    keeps the shards balanced when items are sorted by size or source)."""
    return list(items[launch.rank::launch.world_size])


def announce_shard(launch: Launch, count: int) -> None:
    """The one line each process of a sharded run prints: `shard R/W: N images`."""
    if launch.distributed:
        # One write, newline included: print() writes the text and the newline separately, and
        # the processes' lines would interleave on a shared terminal or log.
        sys.stdout.write(f"shard {launch.rank}/{launch.world_size}: {count} images\n")
        sys.stdout.flush()


def init_process_group(launch: Launch) -> None:
    """Join the run's gloo process group (once). Under SLURM without torchrun, the rendezvous
    address is derived as Lightning derives it (first node of the allocation, a port from the
    job id) unless MASTER_ADDR / MASTER_PORT say otherwise."""
    import torch.distributed as dist

    if not launch.distributed or dist.is_initialized():
        return
    if launch.launcher == "slurm":
        from lightning_fabric.plugins.environments import SLURMEnvironment

        env = SLURMEnvironment()
        os.environ.setdefault("MASTER_ADDR", env.main_address)
        os.environ.setdefault("MASTER_PORT", str(env.main_port))
    dist.init_process_group("gloo", rank=launch.rank, world_size=launch.world_size,
                            timeout=BARRIER_TIMEOUT)


def barrier(launch: Launch) -> None:
    if launch.distributed:
        import torch.distributed as dist

        init_process_group(launch)
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, launch: Launch) -> torch.Tensor:
    """The sum of `tensor` (on the CPU) over every process; `tensor` itself alone when not
    launched as several processes."""
    if not launch.distributed:
        return tensor
    import torch.distributed as dist

    init_process_group(launch)
    total = tensor.detach().cpu().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def broadcast_error(message: str | None, launch: Launch) -> str | None:
    """Rank 0's `message` (e.g. an error found while preparing the output folder) on every
    process, so that they all stop together instead of waiting at the next barrier."""
    if not launch.distributed:
        return message
    import torch.distributed as dist

    init_process_group(launch)
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _store():
    """The default process group's key-value store when torchrun's agent holds it, else None
    (under srun or Lightning's own launcher rank 0 holds it, and may be gone: asking it then
    fails after C++ warnings). Never imports torch: a process that has not imported it has no
    process group."""
    dist = sys.modules.get("torch.distributed")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        if dist is None or not dist.is_available() or not dist.is_initialized():
            return None
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(STORE_TIMEOUT)
        return store
    except Exception:  # noqa: BLE001 - no store to use is no store
        return None


def peer_lost(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) is gloo's report of a process of the
    run that stopped while this one waited for it in a collective."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        if isinstance(error, RuntimeError) and "gloo" in text and any(
                reason in text for reason in PEER_LOST):
            return True
        error = error.__cause__ or error.__context__
    return False


def _stopped_key() -> str:
    return STOPPED_KEY.format(attempt=os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def announce_stop() -> None:
    """Write this process's rank to the store as the one that stopped with an error (unless
    another one did first); nothing without a process group."""
    store = _store()
    if store is None:
        return
    try:
        if not store.check([_stopped_key()]):
            store.set(_stopped_key(), str(sys.modules["torch.distributed"].get_rank()))
    except Exception:  # noqa: BLE001 - the others then stop without naming this process
        pass


def stopped_peer() -> int | None:
    """The rank of the process of this run that stopped with an error, if one did and the store
    still answers."""
    store = _store()
    if store is None:
        return None
    try:
        if store.check([_stopped_key()]):
            return int(store.get(_stopped_key()).decode())
    except Exception:  # noqa: BLE001 - a store that is gone cannot name it
        pass
    return None


def peer_message(rank: int | None) -> str:
    """The one line of a process that stops because another one of the run did."""
    who = (f"process {rank} of this run stopped (its message is above)" if rank is not None else
           "another process of this run stopped (killed, interrupted, or with a message above)")
    mine = ""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        mine = f" (process {dist.get_rank()})"
    return (f"{who}; this process{mine} stops too. Outputs written so far are complete files: "
            "fix what that message reports, then rerun the same command to continue.")
