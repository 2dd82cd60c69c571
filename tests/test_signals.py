"""Processes that outlive or confuse their run (issue 22, class 6).

1. SIGTERM (`kill PID`, or to the whole process group as SLURM's scancel and `timeout` send it)
   ends every stage as Ctrl-C does: the run's children end (CRF pool workers and the
   multiprocessing resource tracker, DataLoader workers, Lightning's DDP processes), the run prints
   the "interrupted ... rerun" paragraph and exits with 143 (Ctrl-C: 130), and what it wrote is
   whole files.
2. Under torchrun, a process that stops with an error prints its message and every other process
   one line naming it, with no traceback and no wait.

Each run is a subprocess in its own session (as a user's shell would start it), whose
descendants are noted just before the signal and must all be gone afterwards (zombies aside).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from utils.io import atomic_write_png, read_index_png

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
               "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "MASTER_ADDR",
               "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID",
               "SLURM_JOB_NAME", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_JOB_ID",
               "SLURM_NODELIST")
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node",
            "2"]
SMALL = ["DATA.CROP_SIZE", "48", "DATA.BATCH_SIZE", "4", "SOLVER.LOG_EVERY", "1"]
INTERRUPTED = "interrupted by SIGTERM; outputs written so far are complete files. Rerun the same " \
              "command to continue (stages 1 and 3: add --resume"


# --- processes ---------------------------------------------------------------------------------

def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start(argv: list[str], log: Path) -> subprocess.Popen:
    """`python ARGV` in its own session, output to `log`, SIGINT at its default (a suite started
    in the background of a non-interactive shell runs with SIGINT ignored)."""
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, *argv], cwd=REPO, env=environment(), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (children, their children, ...)."""
    parent_of = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None and stat[0] != "Z":
            parent_of[int(entry)] = stat[1]
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parent_of.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    return {p for p in pids if (stat := _stat(p)) is not None and stat[0] != "Z"}


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, (f"the run ended (exit {proc.returncode}) before the signal:"
                                     f"\n{log.read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def terminate(proc: subprocess.Popen, log: Path, to: str,
              timeout: float = 60) -> tuple[int, set, set]:
    """SIGTERM to the run's main process alone (`to="process"`) or to its process group; returns
    (its exit status, the processes below it when it was signalled, those of them still alive a
    few seconds after it ended). Whatever is left is SIGKILLed afterwards."""
    children = descendants(proc.pid)
    (os.kill if to == "process" else os.killpg)(proc.pid, signal.SIGTERM)
    try:
        status = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"still running {timeout} s after SIGTERM:\n"
                             f"{log.read_text()[-3000:]}") from None
    return status, children, reap(children)


def reap(children: list[int], seconds: float = 10) -> list[int]:
    """The children still alive after `seconds` (a killed caller's workers may take a moment:
    the DataLoader's notice it within 5 s); those are killed so no test leaves them behind."""
    deadline = time.monotonic() + seconds
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = alive(children)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


def flat(log: Path) -> str:
    """The log with line wrapping undone (messages are wrapped at 100 columns)."""
    return " ".join(log.read_text().split())


def tracebacks_of_ours(text: str) -> list[str]:
    """Traceback lines from the run's own code (torchrun's report of a failed process is a
    traceback of torchrun's, which is not the run's to change)."""
    found = re.findall(rf'File "{re.escape(str(REPO))}/[^"]+"', text)
    return [line for line in found if "/site-packages/" not in line]  # a venv inside the clone


# --- data ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def labelled_voc(synthetic_voc, tmp_path_factory) -> Path:
    """The synthetic tree plus pseudo labels of its train split (the ground truth, top quarter
    erased in Y_ret), for stage 3."""
    root = Path(shutil.copytree(synthetic_voc, tmp_path_factory.mktemp("signals") / "VOC"))
    for i in (root / "ImageSets/Segmentation/train.txt").read_text().split():
        gt = read_index_png(root / "SegmentationClassAug" / f"{i}.png")
        y = np.where(gt == 255, 0, gt).astype(np.uint8)
        atomic_write_png(root / "Generation/Y_crf" / f"{i}.png", y)
        y[: y.shape[0] // 4] = 0
        atomic_write_png(root / "Generation/Y_ret" / f"{i}.png", y)
    return root


@pytest.fixture(scope="module")
def stage3_ckpt(labelled_voc, tmp_path_factory) -> Path:
    """A 2-iteration stage-3 model."""
    from engine.config import load_config
    from engine.stage3 import run

    out = tmp_path_factory.mktemp("signals_stage3")
    run(load_config(REPO / "configs/demo/stage3.yml", [
        "DATA.ROOT", str(labelled_voc), "OUTPUT_DIR", str(out), *SMALL, "DATA.NUM_WORKERS", "0",
        "SOLVER.MAX_ITER", "2", "SOLVER.VAL_EVERY", "2"]), devices="cpu")
    return out / "stage3/checkpoints/final.ckpt"


def stage2_argv(root: Path, stage1_dir: Path, out: Path, workers: int = 2) -> list[str]:
    return ["stage2.py", "--config-file", "configs/demo/stage2.yml", "--gpu-id", "cpu",
            "--workers", str(workers), "--opts", "DATA.ROOT", str(root), "OUTPUT_DIR", str(out),
            "DATA.NUM_WORKERS", "1", "DATA.SPLIT", "train", "DATA.PSEUDO_LABEL_DIR",
            str(out / "Generation"), "MODEL.WEIGHTS",
            str(stage1_dir / "stage1/checkpoints/final.ckpt")]


def stage3_argv(root: Path, out: Path, *opts: str, gpu: str = "cpu", flags=()) -> list[str]:
    return ["stage3.py", "--config-file", "configs/demo/stage3.yml", "--gpu-id", gpu, *flags,
            "--opts", "DATA.ROOT", str(root), "OUTPUT_DIR", str(out), *SMALL,
            "DATA.NUM_WORKERS", "1", *opts]


def evaluate_argv(root: Path, ckpt: Path, out: Path, split: str = "val",
                  workers: int = 2) -> list[str]:
    return ["evaluate.py", "--config-file", "configs/demo/stage3.yml", "--gpu-id", "cpu",
            "--workers", str(workers), "--save-pred", "--checkpoint", str(ckpt), "--opts",
            "DATA.ROOT", str(root), "OUTPUT_DIR", str(out), "DATA.NUM_WORKERS", "1",
            "TEST.SPLIT", split]


def check_whole_labels(folder: Path) -> int:
    """Every label written decodes, each labelled image has all three maps, and no temporary
    file of a cut write is left; returns the number of labelled images."""
    names = {d: {p.name for p in (folder / d).glob("*.png")} for d in ("Y_crf", "Y_ret", "Y_box")}
    for d, files in names.items():
        for name in files:
            read_index_png(folder / d / name)
    assert names["Y_crf"] == names["Y_ret"] == names["Y_box"], names
    assert list(folder.rglob("*.tmp")) == []
    return len(names["Y_crf"])


# --- 1. SIGTERM ends a run as Ctrl-C does ------------------------------------------------------

GUARDED = """
import os, signal, sys, time
from pathlib import Path
from utils.cli import guarded

def run():
    try:
        os.kill(os.getpid(), signal.{first})
        time.sleep(20)
    finally:
        # a run's teardown (a pool waiting for its workers): a SIGTERM meanwhile only counts
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.3)
        Path(sys.argv[1]).write_text("torn down")

guarded(run, debug=False)
"""


PENDING_SIGCHLD = """
import os, signal
from utils.cli import Terminated, handle_termination

both = {signal.SIGTERM, signal.SIGCHLD}
signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # as torch's DataLoader does
handle_termination()
signal.pthread_sigmask(signal.SIG_BLOCK, both)
os.kill(os.getpid(), signal.SIGCHLD)
os.kill(os.getpid(), signal.SIGTERM)
try:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, both)  # SIGTERM's handler runs first
    sum(range(1000))
except Terminated:
    print("terminated")
sum(range(1000))  # the pending SIGCHLD is delivered by now
print("teardown done")
"""


def test_a_child_that_ended_just_before_the_sigterm_is_no_error():
    """SIGTERM to the group kills a DataLoader worker too: its SIGCHLD can be pending, for
    torch's handler, when the SIGTERM handler swaps SIGCHLD's handler for the teardown. Python
    then delivers that SIGCHLD to the new handler; SIG_DFL there raised "Signal 17 ignored due
    to race condition", with a traceback, wherever the main thread was."""
    result = subprocess.run([sys.executable, "-c", PENDING_SIGCHLD], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["terminated", "teardown", "done"]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("first, status, by", [("SIGTERM", 143, " by SIGTERM"),
                                               ("SIGINT", 130, "")])
def test_a_signal_exits_with_128_plus_it_after_the_teardown(tmp_path, first, status, by):
    """The first SIGTERM raises in the main thread (as Ctrl-C does), a second one during the
    teardown does not cut it short; the exit status tells the two signals apart."""
    marker = tmp_path / "marker"
    proc = subprocess.run([sys.executable, "-c", GUARDED.format(first=first), str(marker)],
                          cwd=REPO, env=environment(), capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == status, proc.stderr[-3000:]
    assert marker.read_text() == "torn down"
    err = " ".join(proc.stderr.split())
    assert f"error: interrupted{by}; outputs written so far are complete files" in err, err
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("to", ["process", "group"])
def test_sigterm_to_stage2_ends_its_workers_and_keeps_whole_labels(synthetic_voc, stage1_dir,
                                                                   tmp_path, to):
    """Mid-run, with 2 CRF workers and a DataLoader worker: `kill PID` (the workers and the
    resource tracker were left running forever) or SIGTERM to the group (scancel, timeout)."""
    log = tmp_path / "run.log"
    labels = tmp_path / "Generation"
    proc = start(stage2_argv(synthetic_voc, stage1_dir, tmp_path), log)
    wait_for(lambda: any(labels.glob("Y_box/*.png")), proc, log)
    status, children, left = terminate(proc, log, to)
    text = flat(log)
    assert status == 143, text[-3000:]
    assert INTERRUPTED in text and "Traceback" not in text, text[-3000:]
    assert len(children) >= 4  # 2 CRF workers, the resource tracker, the DataLoader worker
    assert not left, f"still running after the run ended: {left}"
    assert 1 <= check_whole_labels(labels) < 12


def test_sigterm_to_evaluate_ends_its_crf_workers(synthetic_voc, stage3_ckpt, tmp_path):
    log = tmp_path / "run.log"
    proc = start(evaluate_argv(synthetic_voc, stage3_ckpt, tmp_path, split="train"), log)
    wait_for(lambda: any(tmp_path.glob("*/eval/pred/*.png")), proc, log)
    status, children, left = terminate(proc, log, "process")
    text = flat(log)
    assert status == 143 and INTERRUPTED in text and "Traceback" not in text, text[-3000:]
    assert len(children) >= 4  # 2 CRF workers, the resource tracker, the DataLoader worker
    assert not left, f"still running after the run ended: {left}"
    assert list(tmp_path.rglob("*.tmp")) == []
    for path in tmp_path.glob("*/eval/pred/*.png"):
        read_index_png(path)


@pytest.mark.slow
def test_sigterm_to_stage3_mid_training_exits_143_and_resumes(labelled_voc, tmp_path):
    """SIGTERM to the group (the DataLoader worker gets it too) once a checkpoint is written;
    --resume then finishes the run from it."""
    log = tmp_path / "run.log"
    argv = stage3_argv(labelled_voc, tmp_path, "SOLVER.MAX_ITER", "8", "SOLVER.VAL_EVERY", "8",
                       "SOLVER.CKPT_EVERY", "2")
    last = tmp_path / "stage3/checkpoints/last.ckpt"
    proc = start(argv, log)
    wait_for(last.is_file, proc, log)
    status, children, left = terminate(proc, log, "group")
    text = flat(log)
    assert status == 143 and INTERRUPTED in text and "Traceback" not in text, text[-3000:]
    assert not left, f"still running after the run ended: {left}"
    assert not (tmp_path / "stage3/checkpoints/final.ckpt").exists()

    resumed = subprocess.run([sys.executable, *argv[:5], "--resume", *argv[5:]], cwd=REPO,
                             env=environment(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {last}" in resumed.stdout
    assert (tmp_path / "stage3/checkpoints/final.ckpt").is_file()


@pytest.mark.slow
def test_sigterm_to_stage3_ends_lightnings_ddp_processes(labelled_voc, tmp_path):
    """--gpu-id cpu:2: Lightning starts the second process itself; `kill PID` of the first ends
    both (the second gets the signal passed on, and Lightning kills it if it is not gone by the
    time the first has stopped, so its own message may be missing)."""
    log = tmp_path / "run.log"
    proc = start(stage3_argv(labelled_voc, tmp_path, "SOLVER.MAX_ITER", "5000",
                             "SOLVER.VAL_EVERY", "5000", "SOLVER.CKPT_EVERY", "2", gpu="cpu:2"),
                 log)
    wait_for((tmp_path / "stage3/checkpoints/last.ckpt").is_file, proc, log)
    status, children, left = terminate(proc, log, "process")
    text = flat(log)
    assert status == 143 and INTERRUPTED in text and "Traceback" not in text, text[-3000:]
    assert len(children) >= 2  # the second process and the DataLoader workers
    assert not left, f"still running after the run ended: {left}"


@pytest.mark.slow
def test_sigterm_to_stage2_under_torchrun_ends_every_process(synthetic_voc, stage1_dir,
                                                             tmp_path):
    """SIGTERM to torchrun's group: torchrun passes it on to each process's own group; each
    process ends with the message, its workers with it (torchrun's own exit is torchrun's)."""
    log = tmp_path / "run.log"
    labels = tmp_path / "Generation"
    proc = start([*TORCHRUN, *stage2_argv(synthetic_voc, stage1_dir, tmp_path, workers=4)], log)
    wait_for(lambda: any(labels.glob("Y_box/*.png")), proc, log)
    status, children, left = terminate(proc, log, "group")
    text = flat(log)
    assert status != 0 and text.count(INTERRUPTED) == 2, text[-3000:]
    assert not tracebacks_of_ours(text), text[-3000:]
    assert not left, f"still running after the run ended: {left}"
    check_whole_labels(labels)


def test_a_killed_callers_pool_workers_exit(tmp_path):
    """A pool whose caller is SIGKILLed (the out-of-memory killer) does not outlive it: each
    worker finishes its job and exits."""
    script = ("import time\nfrom utils.pool import WorkerPool\n"
              "pool = WorkerPool(2)\n"
              "for _ in range(4):\n    pool.submit(time.sleep, 0.5)\n"
              "print('ready', flush=True)\ntime.sleep(60)\n")
    log = tmp_path / "run.log"
    proc = start(["-c", script], log)
    wait_for(lambda: "ready" in log.read_text(), proc, log, timeout=60)
    children = descendants(proc.pid)
    assert len(children) >= 2  # the workers (and the resource tracker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = reap(children)
    assert not left, f"still running after their caller was killed: {left}"


# --- 2. under torchrun, every process ends with one clean line -----------------------------------

def test_peer_lost_is_gloos_dead_peer_error_and_nothing_else():
    from utils.distributed import peer_lost
    from utils.errors import BanaError

    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] "
                        "Connection closed by peer [127.0.0.1]:46471. This is typically caused "
                        "by a remote worker crashing.")
    assert peer_lost(gloo)
    reset = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Read error "
                         "[127.0.0.1]:1234: Connection reset by peer")
    assert peer_lost(reset)
    try:  # raised while handling it (Lightning's teardown, a DDP wrapper)
        try:
            raise gloo
        except RuntimeError:
            raise RuntimeError("DDP reducer failed") from gloo
    except RuntimeError as wrapped:
        assert peer_lost(wrapped)
    assert not peer_lost(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not peer_lost(RuntimeError("[gloo] invalid tensor size"))
    assert not peer_lost(RuntimeError("DataLoader worker (pid 12) exited: Connection closed by "
                                      "peer"))  # not gloo's
    assert not peer_lost(BanaError("cannot read image x.jpg"))
    assert not peer_lost(ConnectionResetError("Connection reset by peer"))


def corrupt(path: Path) -> Path:
    path.write_bytes(b"GIF89a garbage")
    return path


def check_one_line_each(result: subprocess.CompletedProcess, message: str, failed: int | None,
                        seconds: float, limit: float = 150) -> None:
    """The failed process's message once, one line from the other process naming it (when
    `failed` is None: whichever one failed), no traceback of the run's code, no gloo error."""
    text = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0, text[-3000:]
    assert text.count(message) == 1, text[-3000:]
    stopped = re.findall(r"error: process (\d) of this run stopped \(its message is above\); this "
                         r"process \(process (\d)\) stops too", text)
    assert len(stopped) == 1, text[-3000:]
    assert stopped[0][0] != stopped[0][1] and (failed is None or int(stopped[0][0]) == failed)
    assert not tracebacks_of_ours(text) and "Connection closed by peer" not in text, text[-3000:]
    assert seconds < limit


def torchrun(argv: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, *TORCHRUN, *argv], cwd=REPO, env=environment(),
                            capture_output=True, text=True, timeout=300)
    return result, time.monotonic() - t0


def split_ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()


@pytest.mark.slow
def test_a_corrupt_image_in_stage2_under_torchrun_is_skipped_and_listed_once(
        synthetic_voc_copy, stage1_dir, tmp_path):
    """Rank 1 meets the corrupt image (its shard: every second image from the second) and skips
    it (issue 29: one bad file costs only itself); both shards finish, process 0 writes the label
    set of the other 11 and ends the run listing the bad one once, with no traceback of ours."""
    from data.labelset import LabelSet

    ids = split_ids(synthetic_voc_copy, "train")
    bad = corrupt(synthetic_voc_copy / "JPEGImages" / f"{ids[1]}.jpg")
    result, seconds = torchrun(stage2_argv(synthetic_voc_copy, stage1_dir, tmp_path, workers=2))
    text = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0, text[-3000:]
    assert text.count(f"cannot read image {bad}") == 1, text[-3000:]
    assert f"1 of {len(ids)} image(s) could not be used" in text, text[-3000:]
    assert not tracebacks_of_ours(text) and "Connection closed by peer" not in text, text[-3000:]
    assert LabelSet(tmp_path / "Generation").ids == [i for i in ids if i != ids[1]]
    assert seconds < 150


@pytest.mark.slow
def test_a_corrupt_image_in_evaluate_under_torchrun_stops_both_with_one_line_each(
        synthetic_voc_copy, stage3_ckpt, tmp_path):
    first = split_ids(synthetic_voc_copy, "val")[1]  # rank 1's first image
    bad = corrupt(synthetic_voc_copy / "JPEGImages" / f"{first}.jpg")
    result, seconds = torchrun(evaluate_argv(synthetic_voc_copy, stage3_ckpt, tmp_path))
    check_one_line_each(result, f"error: cannot read image {bad}", 1, seconds)


@pytest.mark.slow
def test_a_corrupt_image_in_stage3_under_torchrun_stops_both_with_one_line_each(labelled_voc,
                                                                                tmp_path):
    """Which process samples the corrupt image is the sampler's choice; the other one, waiting
    in DDP's gradient all-reduce, names it."""
    root = Path(shutil.copytree(labelled_voc, tmp_path / "VOC"))
    bad = corrupt(root / "JPEGImages" / f"{split_ids(root, 'train')[3]}.jpg")
    result, seconds = torchrun(stage3_argv(root, tmp_path / "runs", "DATA.NUM_WORKERS", "0",
                                           "DATA.BATCH_SIZE", "2", "SOLVER.MAX_ITER", "20",
                                           "SOLVER.VAL_EVERY", "20"))
    check_one_line_each(result, f"error: cannot read image {bad}", None, seconds)
