"""Runs launched as several processes (torchrun, SLURM's srun): launch detection, device choice,
and every stage under `torchrun --nproc_per_node 2` on the CPU (gloo) against one process."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.zygote import run_python
from utils.devices import resolve_devices
from utils.distributed import Launch, detect_launch, shard
from utils.errors import BanaError

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
               "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS",
               "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_NAME",
               "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_JOB_ID", "SLURM_NODELIST")


@pytest.fixture
def no_launcher(monkeypatch):
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_a_plain_process_is_rank_0_of_1(no_launcher):
    launch = detect_launch()
    assert launch == Launch(None) and not launch.distributed and launch.is_main
    assert shard(list("abcde"), launch) == list("abcde")


def test_torchrun_variables_give_rank_world_and_nodes(no_launcher):
    no_launcher.setenv("TORCHELASTIC_RUN_ID", "x")
    for key, value in {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                       "GROUP_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}.items():
        no_launcher.setenv(key, value)
    launch = detect_launch()
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank,
            launch.local_world_size, launch.num_nodes) == ("torchrun", 5, 8, 1, 4, 2)
    assert shard(list(range(20)), launch) == [5, 13]


def test_srun_variables_give_rank_world_and_nodes(no_launcher):
    for key, value in {"SLURM_NTASKS": "8", "SLURM_PROCID": "6", "SLURM_LOCALID": "2",
                       "SLURM_NODEID": "1", "SLURM_JOB_NAME": "bana", "SLURM_NNODES": "2",
                       "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "123456",
                       "SLURM_NODELIST": "gpu[07-08]"}.items():
        no_launcher.setenv(key, value)
    launch = detect_launch()
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank,
            launch.local_world_size, launch.num_nodes) == ("slurm", 6, 8, 2, 4, 2)


def test_launched_devices_are_one_per_local_process():
    launch = Launch("torchrun", rank=3, world_size=4, local_rank=1, local_world_size=2)
    cpu = resolve_devices("cpu", cuda_count=0, launch=launch)
    assert (cpu.accelerator, cpu.devices, cpu.num_nodes, cpu.total) == ("cpu", 2, 2, 4)
    assert cpu.device_of(launch.local_rank) == torch.device("cpu")
    gpu = resolve_devices("0", cuda_count=4, launch=launch)  # the default: GPUs 0..n-1
    assert gpu.devices == [0, 1] and gpu.device_of(1) == torch.device("cuda:1")
    assert resolve_devices("2,3", cuda_count=4, launch=launch).devices == [2, 3]
    with pytest.raises(BanaError, match="needs 2 GPU id"):
        resolve_devices("0,1,2", cuda_count=4, launch=launch)
    with pytest.raises(BanaError, match="pass --gpu-id cpu"):
        resolve_devices("cpu:3", cuda_count=0, launch=launch)
    fallback = resolve_devices("0", cuda_count=0, launch=launch)
    assert fallback.accelerator == "cpu" and "CUDA is not available" in fallback.note


# --- every stage under torchrun, 2 CPU processes --------------------------------------------


def _environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(argv: list[str], processes: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    """`python SCRIPT ...`, or under `torchrun --nproc_per_node processes` (standalone: a free
    port on this machine); check: the run must succeed."""
    if processes or any(k in os.environ for k in LAUNCH_VARS):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes",
                    "1", "--nproc_per_node", str(processes)] if processes else [sys.executable]
        result = subprocess.run([*launcher, *argv], cwd=REPO, env=_environment(),
                                capture_output=True, text=True, timeout=600)
    else:  # one plain process: through the fork server (tests/zygote.py)
        result = run_python(argv, cwd=REPO, timeout=600)
    assert result.returncode == 0 or not check, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _shard_lines(output: str) -> list[str]:
    return sorted(re.findall(r"^shard \d+/\d+: \d+ images$", output, re.MULTILINE))


def _files(folder: Path, *subfolders: str) -> dict[str, bytes]:
    return {f"{d}/{p.name}": p.read_bytes() for d in subfolders
            for p in sorted((folder / d).glob("*.png"))}


@pytest.fixture(scope="module")
def torchrun_runs(synthetic_voc, tmp_path_factory):
    """Stage 1 under torchrun; stage 2 from its model by one process and under torchrun;
    stage 3 under torchrun on those labels; evaluate.py and predict.py by one process and under
    torchrun. Returns what each wrote and printed."""
    out = tmp_path_factory.mktemp("torchrun")
    small = ["DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR", str(out), "DATA.CROP_SIZE", "48",
             "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0", "SOLVER.LOG_EVERY", "1"]
    runs = {"out": out, "opts": small}
    runs["stage1"] = _run(["stage1.py", "--config-file", "configs/demo/stage1.yml", "--gpu-id",
                           "cpu", "--opts", *small, "SOLVER.MAX_ITER", "3", "SOLVER.MILESTONES",
                           "[2]", "SOLVER.CKPT_EVERY", "2"], processes=2)
    for name, processes, workers in (("single", 0, 2), ("torchrun", 2, 4)):
        # The same CRF workers per process (4 over 2 processes = 2 each), so the backbone runs
        # with the same number of threads in both.
        runs[f"stage2_{name}"] = _run(
            ["stage2.py", "--config-file", "configs/demo/stage2.yml", "--gpu-id", "cpu",
             "--workers", str(workers), "--opts", *small, "NAME", f"stage2_{name}",
             "DATA.PSEUDO_LABEL_DIR", str(out / f"labels_{name}")], processes=processes)
    runs["stage3"] = _run(["stage3.py", "--config-file", "configs/demo/stage3.yml", "--gpu-id",
                           "cpu", "--opts", *small, "DATA.PSEUDO_LABEL_DIR",
                           str(out / "labels_torchrun"), "SOLVER.MAX_ITER", "2",
                           "SOLVER.CKPT_EVERY", "2", "SOLVER.VAL_EVERY", "2"], processes=2)
    checkpoint = out / "stage3/checkpoints/final.ckpt"
    val_images = sorted((synthetic_voc / "JPEGImages").glob("val_*.jpg"))
    for name, processes in (("single", 0), ("torchrun", 2)):
        runs[f"evaluate_{name}"] = _run(
            ["evaluate.py", "--config-file", "configs/demo/stage3.yml", "--gpu-id", "cpu",
             "--checkpoint", str(checkpoint), "--workers", "1", "--save-pred", "--opts", *small,
             "NAME", f"eval_{name}", "TEST.SCALES", "[1.0, 0.75]"], processes=processes)
        runs[f"predict_{name}"] = _run(
            ["predict.py", "--config-file", "configs/demo/stage3.yml", "--gpu-id", "cpu",
             "--checkpoint", str(checkpoint), "--input", *map(str, val_images), "--output",
             str(out / f"predict_{name}"), "--opts", *small, "TEST.CRF", "false"],
            processes=processes)
    return runs


@pytest.mark.slow
def test_stage1_and_stage3_train_under_torchrun(torchrun_runs):
    out = torchrun_runs["out"]
    for stage, steps in (("stage1", 3), ("stage3", 2)):
        printed = torchrun_runs[stage].stdout
        assert "torchrun started 2 process(es), 2 per node on 1 node(s)" in printed
        # Rank 0 alone reports: two processes trained one model.
        assert printed.count(f"{stage.capitalize().replace('e', 'e ', 1)} done") == 1
        ckpt = torch.load(out / stage / "checkpoints/final.ckpt", map_location="cpu",
                          weights_only=False)
        assert ckpt["global_step"] == steps


@pytest.mark.slow
def test_stage2_under_torchrun_writes_the_files_of_one_process(torchrun_runs, synthetic_voc):
    out = torchrun_runs["out"]
    ids = (synthetic_voc / "ImageSets/Segmentation/train.txt").read_text().split()
    single = _files(out / "labels_single", "Y_crf", "Y_ret", "Y_box")
    assert len(single) == 3 * len(ids)
    assert _files(out / "labels_torchrun", "Y_crf", "Y_ret", "Y_box") == single
    printed = torchrun_runs["stage2_torchrun"].stdout
    assert _shard_lines(printed) == [
        f"shard 0/2: {len(ids[0::2])} images", f"shard 1/2: {len(ids[1::2])} images"], printed
    assert _shard_lines(torchrun_runs["stage2_single"].stdout) == []
    reports = [json.loads((out / f"stage2_{n}/quality.json").read_text())
               for n in ("single", "torchrun")]
    assert reports[0]["miou"] == reports[1]["miou"]


@pytest.mark.slow
def test_a_refused_relabel_under_torchrun_stops_every_process_and_keeps_the_labels(torchrun_runs):
    """Rank 0 checks the label folder's record; its refusal (other settings, no --overwrite)
    reaches the other process, which would otherwise wait at the barrier, and both stop with
    the message before anything is written."""
    out = torchrun_runs["out"]
    labels = out / "labels_torchrun"
    before = _files(labels, "Y_crf", "Y_ret", "Y_box")
    record = (labels / "labels.json").read_bytes()
    # The fixture's torchrun labelling, with one labelling key changed.
    refused = _run(["stage2.py", "--config-file", "configs/demo/stage2.yml", "--gpu-id", "cpu",
                    "--workers", "4", "--opts", *torchrun_runs["opts"], "NAME", "stage2_refused",
                    "DATA.PSEUDO_LABEL_DIR", str(labels), "MODEL.USE_U0", "false"],
                   processes=2, check=False)
    printed = " ".join((refused.stdout + refused.stderr).split())  # messages are line-wrapped
    assert refused.returncode != 0, printed[-3000:]
    # Rank 0's message, and the same message from rank 1, which got it from rank 0.
    assert "holds labels made with other settings" in printed, printed[-3000:]
    assert "MODEL.USE_U0: True recorded, False now" in printed, printed[-3000:]
    assert "error: process 0 stopped:" in printed, printed[-3000:]
    # Messages, not tracebacks, from the processes (torchrun's own report of them is a traceback).
    assert not any(f'File "{REPO / part}' in printed
                   for part in ("engine", "utils", "stage2.py")), printed[-3000:]
    assert _files(labels, "Y_crf", "Y_ret", "Y_box") == before
    assert (labels / "labels.json").read_bytes() == record


@pytest.mark.slow
def test_evaluate_under_torchrun_sums_the_confusion_matrices_of_one_process(torchrun_runs):
    out = torchrun_runs["out"]
    single, both = (json.loads((out / f"eval_{n}/eval/metrics.json").read_text())
                    for n in ("single", "torchrun"))
    assert set(single["confusion"]) == {"single", "multiscale", "single+crf", "multiscale+crf"}
    assert both["confusion"] == single["confusion"]
    assert both["modes"] == single["modes"] and both["processes"] == 2
    assert sum(map(sum, single["confusion"]["single"])) > 0
    assert (_files(out / "eval_torchrun/eval", "pred") == _files(out / "eval_single/eval", "pred")
            and len(_files(out / "eval_single/eval", "pred")) == single["images"])
    assert _shard_lines(torchrun_runs["evaluate_torchrun"].stdout) == [
        "shard 0/2: 3 images", "shard 1/2: 3 images"]


@pytest.mark.slow
def test_predict_under_torchrun_writes_the_labels_of_one_process(torchrun_runs):
    out = torchrun_runs["out"]
    single = _files(out, "predict_single")
    assert len(single) == 6 and _files(out, "predict_torchrun") == {
        k.replace("single", "torchrun"): v for k, v in single.items()}
    assert _shard_lines(torchrun_runs["predict_torchrun"].stdout) == [
        "shard 0/2: 3 images", "shard 1/2: 3 images"]
