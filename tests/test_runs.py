"""Run folders and their records: resuming from a checkpoint that is not this run's, output
folders that cannot be created or hold something else, folders in use by another run (locks,
stale locks, two runs started together), resuming or relabelling with other settings (refused
until --reconfigure or --overwrite) and temporary files left by a killed run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import (Cases, Env, assert_fails_cleanly, assert_same_labels, evaluate,
                     read_labels, run_script, stage1, stage2, stage2_argv, stage3, start, stop,
                     temporary_files, truncate)
from utils.errors import BanaError

CASES = Cases()
case = CASES.add


@case
def resume_from_another_stage(env):
    ckpt_dir = env.tmp / "runs/stage3/checkpoints"
    ckpt_dir.mkdir(parents=True)
    shutil.copy(env.stage1_ckpt, ckpt_dir / "last.ckpt")
    return (stage3(env, flags=["--resume"]), [str(ckpt_dir / "last.ckpt"), "stage 1"],
            "--opts NAME")


@case
def resume_with_another_backbone(env):
    ckpt_dir = env.tmp / "runs/stage3/checkpoints"
    ckpt_dir.mkdir(parents=True)
    shutil.copy(env.stage3_ckpt, ckpt_dir / "last.ckpt")
    return (stage3(env, "MODEL.BACKBONE", "vgg16", flags=["--resume"]),
            [str(ckpt_dir / "last.ckpt"), "'tiny'", "MODEL.BACKBONE"], "--opts NAME")


@case
def resume_from_truncated_checkpoint(env):
    ckpt_dir = env.tmp / "runs/stage1/checkpoints"
    ckpt_dir.mkdir(parents=True)
    shutil.copy(env.stage1_ckpt, ckpt_dir / "last.ckpt")
    truncate(ckpt_dir / "last.ckpt")
    return stage1(env, flags=["--resume"]), [str(ckpt_dir / "last.ckpt")], "--opts NAME"


@case
def output_dir_under_a_file_for_stage1(env):
    out = env.a_file() / "runs"
    argv = stage1(env, "OUTPUT_DIR", str(out))
    return argv, [str(env.a_file())], "writable folder"


@case
def label_dir_under_a_file_for_stage2(env):
    out = env.a_file() / "Generation"
    return stage2(env, "DATA.PSEUDO_LABEL_DIR", str(out)), [str(env.a_file())], "writable folder"


@case
def output_dir_under_a_file_for_evaluate(env):
    out = env.a_file() / "runs"
    return evaluate(env, "OUTPUT_DIR", str(out)), [str(env.a_file())], "writable folder"


@case
def report_dir_under_a_file_for_evaluate(env):
    pred = env.voc / "SegmentationClassAug"
    out = env.a_file() / "report"
    return (["evaluate.py", "--pred-dir", str(pred), "--data-root", str(env.voc), "--out",
             str(out)], [str(env.a_file())], "writable folder")


@case
def out_under_a_file_for_synthetic(env):
    out = env.a_file() / "synthetic"
    return (["data/synthetic.py", "--out", str(out), "--n-train", "1", "--n-val", "1"],
            [str(env.a_file())], "writable folder")


@case
def mask_folder_is_a_file_for_bbox_setup(env):
    root = env.copy()
    shutil.rmtree(root / "BgMaskfromBoxes")
    (root / "BgMaskfromBoxes").write_text("")
    return (["data/voc_bbox_setup.py", "--data-root", str(root), "--workers", "1"],
            [str(root / "BgMaskfromBoxes")], "writable folder")


@case
def foreign_folder_for_synthetic(env):
    out = env.tmp / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    return ["data/synthetic.py", "--out", str(out)], [str(out)], "empty or new folder"


# --- issue 16, class 2: a folder in use (a lock held by a live process: this test's own) --------

def hold_lock(folder: Path) -> Path:
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".lock").write_text(json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(), "started": "now", "what": "stage 9",
        "command": "another run"}))
    return folder / ".lock"


@case
def run_folder_in_use_for_stage1(env):
    lock = hold_lock(env.tmp / "runs" / "stage1")
    return stage1(env), [str(lock.parent), f"PID {os.getpid()}"], "choose another folder"


@case
def label_folder_in_use_for_stage2(env):
    lock = hold_lock(env.tmp / "Generation")
    return stage2(env), [str(lock.parent), "in use by another run"], f"delete {lock}"


@case
def eval_folder_in_use_for_evaluate(env):
    lock = hold_lock(env.tmp / "runs" / "stage3" / "eval")
    return evaluate(env), [str(lock.parent), "in use by another run"], "Wait for it to finish"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_cleanly(outcomes, name):
    assert_fails_cleanly(*outcomes[name])


def race(argv: list[str], tmp_path) -> tuple[list[int], list[str]]:
    """The same command started twice at once: both exit statuses and both outputs."""
    procs = [start(argv, tmp_path / f"run{k}.log") for k in range(2)]
    try:
        codes = [proc.wait(timeout=240) for proc in procs]
    finally:
        for proc in procs:
            stop(proc)
    return codes, [(tmp_path / f"run{k}.log").read_text() for k in range(2)]


@pytest.mark.slow
def test_two_stage2_runs_on_one_folder_never_corrupt_a_label(artifacts, clean_labels, tmp_path):
    """Started together, one run takes the label folder's lock and the other is refused with a
    message naming the folder; the labels are those of one clean run."""
    argv = stage2_argv(artifacts, tmp_path)
    codes, logs = race(argv, tmp_path)
    assert sorted(codes) == [0, 2], logs
    refused = logs[codes.index(2)]
    assert "in use by another run" in " ".join(refused.split()) and "Traceback" not in refused
    assert_same_labels(read_labels(tmp_path / "Generation"), clean_labels)
    assert temporary_files(tmp_path / "Generation") == []
    assert not (tmp_path / "Generation" / ".lock").exists()


@pytest.mark.slow
def test_two_stage3_runs_into_one_folder_one_is_refused(labelled_voc, tmp_path):
    env = Env(tmp_path, labelled_voc, labelled_voc, tmp_path, tmp_path)
    argv = stage3(env, "SOLVER.MAX_ITER", "6", "SOLVER.VAL_EVERY", "6")
    codes, logs = race(argv, tmp_path)
    assert sorted(codes) == [0, 2], logs
    assert ("in use by another run" in " ".join(logs[codes.index(2)].split())
            or "already holds a run" in " ".join(logs[codes.index(2)].split()))


def test_a_stale_lock_is_taken_over_and_a_live_one_refused(tmp_path):
    import socket

    from utils.runlock import RunLock

    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with RunLock(folder, "test"):
        assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(BanaError, match="in use by another run"):
            RunLock(folder, "second").__enter__()
    assert not (folder / ".lock").exists()
    # another host's lock is never judged stale from here
    (folder / ".lock").write_text(json.dumps({"pid": dead.pid, "host": "elsewhere"}))
    with pytest.raises(BanaError, match="on elsewhere"):
        RunLock(folder, "test").__enter__()


def test_secondary_ranks_run_under_rank_0s_lock(tmp_path, monkeypatch):
    from utils.runlock import RunLock

    monkeypatch.setenv("LOCAL_RANK", "1")
    with RunLock(tmp_path, "rank 1"):
        assert not (tmp_path / ".lock").exists()


# --- issue 16, class 3: runs that change under their record -------------------------------------

@pytest.fixture(scope="module")
def trained_stage3(labelled_voc, tmp_path_factory):
    """A 4-iteration stage-3 run (its config.yaml and checkpoints)."""
    out = tmp_path_factory.mktemp("record")
    env = Env(out, labelled_voc, labelled_voc, out, out)
    proc = run_script(stage3(env, "SOLVER.MAX_ITER", "4", "SOLVER.VAL_EVERY", "4",
                             "SOLVER.CKPT_EVERY", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return env


def _copy_run(env: Env, tmp_path: Path) -> Env:
    shutil.copytree(env.tmp / "runs", tmp_path / "runs")
    return Env(tmp_path, env.voc, env.labelled, env.stage1_ckpt, env.stage3_ckpt)


@pytest.mark.slow
@pytest.mark.parametrize("opts, names", [
    (["SOLVER.MAX_ITER", "2"], ["trained 4 iterations", "SOLVER.MAX_ITER 2"]),
    (["SOLVER.MAX_ITER", "6", "MODEL.LOSS", "ce_crf"], ["MODEL.LOSS: 'nal' recorded, 'ce_crf' now"]),
    (["SOLVER.MAX_ITER", "6", "SOLVER.LR", "0.5"], ["SOLVER.LR: 0.01 recorded, 0.5 now"]),
    (["SOLVER.MAX_ITER", "6", "DATA.CROP_SIZE", "40"], ["DATA.CROP_SIZE: 48 recorded, 40 now"]),
])
def test_resume_with_other_settings_is_refused_and_the_record_kept(trained_stage3, tmp_path,
                                                                   opts, names):
    env = _copy_run(trained_stage3, tmp_path)
    record = tmp_path / "runs/stage3/config.yaml"
    before = record.read_bytes()
    proc = run_script(stage3(env, *opts, flags=["--resume"]))
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and all(n in err for n in names), err
    assert "Traceback" not in proc.stderr
    assert record.read_bytes() == before


@pytest.mark.slow
def test_reconfigure_continues_with_new_settings_and_keeps_the_old_record(trained_stage3,
                                                                          tmp_path):
    env = _copy_run(trained_stage3, tmp_path)
    proc = run_script(stage3(env, "SOLVER.MAX_ITER", "6", "SOLVER.VAL_EVERY", "6",
                             "MODEL.LOSS", "ce_crf", flags=["--resume", "--reconfigure"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MODEL.LOSS" in proc.stdout
    assert "loss: nal" in (tmp_path / "runs/stage3/config.1.yaml").read_text().lower()
    assert "ce_crf" in (tmp_path / "runs/stage3/config.yaml").read_text()
    assert torch.load(tmp_path / "runs/stage3/checkpoints/final.ckpt", weights_only=False,
                      map_location="cpu")["global_step"] == 6


@pytest.mark.slow
def test_a_leftover_temporary_file_is_cleaned_up_on_resume(trained_stage3, tmp_path):
    env = _copy_run(trained_stage3, tmp_path)
    leftover = tmp_path / "runs/stage3/checkpoints/.last.ckpt.tmp"
    leftover.write_bytes(b"half a checkpoint")
    proc = run_script(stage3(env, "SOLVER.MAX_ITER", "4", "SOLVER.VAL_EVERY", "4",
                             flags=["--resume"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not leftover.exists() and "Removed 1 temporary file" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("opts, key", [(["MODEL.USE_U0", "false"], "MODEL.USE_U0"),
                                       (["MODEL.DCRF", "[3,50,3,3,3]"], "MODEL.DCRF"),
                                       (["MODEL.BG_THRESHOLD", "0.5"], "MODEL.BG_THRESHOLD")])
def test_relabelling_with_other_settings_is_refused_until_overwrite(artifacts, tmp_path, opts,
                                                                    key):
    env = Env(tmp_path, artifacts["voc"], artifacts["labelled"], artifacts["stage1"],
              artifacts["stage3"])
    first = run_script(stage2(env))
    assert first.returncode == 0, first.stderr[-3000:]
    record = (tmp_path / "Generation/labels.json").read_bytes()
    refused = run_script(stage2(env, *opts))
    err = " ".join(refused.stderr.split())
    assert refused.returncode == 2 and key in err and "--overwrite" in err, err
    assert (tmp_path / "Generation/labels.json").read_bytes() == record
    again = run_script(stage2(env, *opts, flags=["--overwrite"]))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "deleted the labels" in again.stdout and "0 already labelled" in again.stdout
    assert json.loads((tmp_path / "Generation/labels.json").read_text())[key] != \
        json.loads(record)[key]


@pytest.mark.slow
def test_failed_reconfigured_resume_changes_no_record(trained_stage3, tmp_path):
    """A --resume --reconfigure that fails after its settings were accepted (here: a batch the
    split cannot fill) had already moved config.yaml to config.1.yaml and written the new
    settings as the record; the record is now written only once training has started."""
    env = _copy_run(trained_stage3, tmp_path)
    run_dir = tmp_path / "runs/stage3"
    before = {p.name: p.read_bytes() for p in run_dir.glob("config*.yaml")}
    proc = run_script(stage3(env, "SOLVER.MAX_ITER", "6", "DATA.BATCH_SIZE", "64",
                             flags=["--resume", "--reconfigure"]))
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "DATA.BATCH_SIZE 64" in err, err
    assert {p.name: p.read_bytes() for p in run_dir.glob("config*.yaml")} == before


# --- issue 29, class 4: runs that share folders -------------------------------------------------

def _label_copy(artifacts, tmp_path) -> Env:
    """An env whose labelled tree (with Generation/Y_crf, Y_ret) is a private copy."""
    labelled = Path(shutil.copytree(artifacts["labelled"], tmp_path / "labelled"))
    return Env(tmp_path, artifacts["voc"], labelled, artifacts["stage1"], artifacts["stage3"])


@pytest.mark.slow
def test_stage2_cannot_rewrite_labels_a_training_run_reads(artifacts, tmp_path):
    """`stage2.py --overwrite` deleted the labels a running stage 3 trained on. The training run
    holds a ReadLock on its label folder (held here by this process, alive), and stage 2 is
    refused with its owner and the folder; nothing is deleted."""
    from utils.runlock import ReadLock

    env = _label_copy(artifacts, tmp_path)
    labels = env.labelled / "Generation"
    before = read_labels(labels)
    with ReadLock(labels, "stage 3 (training)"):
        proc = run_script(stage2(env, "DATA.PSEUDO_LABEL_DIR", str(labels), root=env.labelled,
                                 flags=["--overwrite"]))
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "in use by a run that reads it" in err, err
    assert f"PID {os.getpid()}" in err and "DATA.PSEUDO_LABEL_DIR" in err, err
    assert_same_labels(read_labels(labels), before)
    assert not list(labels.glob(".reader.*")) and not (labels / ".lock").exists()


@pytest.mark.slow
def test_training_run_refuses_labels_being_written(artifacts, tmp_path):
    """Stage 3 takes its ReadLock: while stage 2 holds the label folder (its RunLock, held here
    by this process), stage 3 is refused rather than train on labels being rewritten."""
    from utils.runlock import RunLock

    env = _label_copy(artifacts, tmp_path)
    labels = env.labelled / "Generation"
    with RunLock(labels, "stage 2"):
        proc = run_script(stage3(env))
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and f"{labels} is being written by another run" in err, err
    assert not list(labels.glob(".reader.*"))


def test_a_reader_and_a_writer_exclude_each_other(tmp_path):
    """The locks in one process: a writer is refused while a live reader holds the folder, a
    reader while a writer does; a reader left by a process that is gone is removed."""
    import socket

    from utils.runlock import ReadLock, RunLock

    with ReadLock(tmp_path, "reader"):
        with pytest.raises(BanaError, match="in use by a run that reads it"):
            RunLock(tmp_path, "writer").__enter__()
    assert not (tmp_path / ".lock").exists()
    with RunLock(tmp_path, "writer"):
        with pytest.raises(BanaError, match="is being written by another run"):
            ReadLock(tmp_path, "reader").__enter__()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".reader.x.{dead.pid}"
    stale.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with RunLock(tmp_path, "writer"):
        assert not stale.exists()


def test_a_full_disk_while_taking_the_lock_leaves_no_lock(tmp_path, monkeypatch):
    """A full disk while writing the lock left a 0-byte .lock (every later run refused) and the
    message "cannot write None". The lock is written whole or not at all, and the message says
    the disk is full."""
    import errno
    import io

    import utils.runlock as runlock

    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    real_fdopen = os.fdopen
    monkeypatch.setattr(runlock, "open", lambda *a, **k: FullDisk(), raising=False)
    monkeypatch.setattr(runlock.os, "fdopen",
                        lambda fd, *a, **k: (os.close(fd), FullDisk())[1])
    with pytest.raises(BanaError, match="the disk is full") as info:
        runlock.RunLock(tmp_path, "stage 2").__enter__()
    assert "None" not in str(info.value)
    monkeypatch.setattr(runlock.os, "fdopen", real_fdopen)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_empties_a_symlinked_label_folder(artifacts, tmp_path):
    """--overwrite with a label folder that is a link (labels on another disk) was an rmtree
    traceback; the link and its target stay, the labels in the target are deleted."""
    from engine.config import load_config
    from engine.stage2 import check_label_record

    elsewhere = tmp_path / "other_disk/Y_crf"
    elsewhere.mkdir(parents=True)
    (elsewhere / "train_00000.png").write_bytes(b"old label")
    out = tmp_path / "Generation"
    out.mkdir()
    (out / "Y_crf").symlink_to(elsewhere, target_is_directory=True)
    cfg = load_config(Path("configs/demo/stage2.yml"), [
        "DATA.ROOT", str(artifacts["voc"]), "DATA.PSEUDO_LABEL_DIR", str(out),
        "OUTPUT_DIR", str(artifacts["stage1"].parents[2]), "MODEL.WEIGHTS",
        str(artifacts["stage1"])])
    check_label_record(cfg, overwrite=True)
    assert (out / "Y_crf").is_symlink() and elsewhere.is_dir()
    assert list(elsewhere.iterdir()) == [] and (out / "labels.json").is_file()
