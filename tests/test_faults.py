"""Real faults in the middle of a run: a NaN loss, SIGKILL (then --resume), Ctrl-C, a full disk,
and evaluate.py or stage 2 killed mid-way. The run stops with a message that says how to go on,
keeps its last whole checkpoint and files, and picks up where it stopped."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.optim import lr_factor
from engine.stage2 import INPUTS
from engine.config import load_config
from helpers import (FAST, REPO, Env, assert_same_labels, kill_when, read_labels, run_script,
                     stage2_argv, stage3, start)
from utils.errors import BanaError
from utils.io import read_index_png
from utils.records import Ledger


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("log_every", [1, 100])
def test_a_nan_in_stage1_stops_at_that_iteration_and_keeps_the_last_checkpoint(
        synthetic_voc, tmp_path, monkeypatch, log_every):
    """CKPT_EVERY 2: last.ckpt holds step 4 when iteration 5 (0-based) computes a NaN loss.
    With LOG_EVERY 100 finiteness is read only before the checkpoint of step 6: the error still
    names iteration 5, and no checkpoint of NaN weights is written."""
    import models.zoo
    from engine.stage1 import run

    cfg = load_config(REPO / "configs/demo/stage1.yml", [
        "DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR", str(tmp_path), *FAST,
        "SOLVER.MAX_ITER", "8", "SOLVER.MILESTONES", "[6]", "SOLVER.CKPT_EVERY", "2",
        "SOLVER.LOG_EVERY", str(log_every)])
    last = cfg.run_dir / "checkpoints/last.ckpt"
    seen = {}

    build = models.zoo.build

    def poisoned_build(spec, init="none"):
        net = build(spec, init)
        forward, calls = net.forward, iter(range(10 ** 6))

        def forward_with_nan(*a, **kw):
            logits, targets = forward(*a, **kw)
            if next(calls) == 5:  # one forward per iteration: this is iteration 5
                seen["hash"], seen["step"] = sha256(last), load_ckpt(last)["global_step"]
                logits = logits * float("nan")
            return logits, targets

        net.forward = forward_with_nan
        return net

    # engine.stage1 imports the zoo's build when it trains, so patching the module is enough.
    monkeypatch.setattr(models.zoo, "build", poisoned_build)
    with pytest.raises(BanaError, match=r"non-finite loss at iteration 5: term 'ce' = nan"):
        run(cfg, devices="cpu")
    assert seen["step"] == 4 and sha256(last) == seen["hash"]
    assert not (cfg.run_dir / "checkpoints/final.ckpt").exists()

    monkeypatch.setattr(models.zoo, "build", build)
    assert run(cfg, devices="cpu", resume=True)["iterations"] == 8


def test_a_nan_term_in_stage3_is_named_before_the_total(labelled_voc, tmp_path, monkeypatch):
    import models.losses
    from engine.stage3 import run

    cfg = load_config(REPO / "configs/demo/stage3.yml", [
        "DATA.ROOT", str(labelled_voc), "OUTPUT_DIR", str(tmp_path), *FAST,
        "SOLVER.MAX_ITER", "6", "SOLVER.CKPT_EVERY", "2", "SOLVER.VAL_EVERY", "6"])
    last = cfg.run_dir / "checkpoints/last.ckpt"
    compute_loss, calls, seen = models.losses.compute_loss, iter(range(10 ** 6)), {}

    def loss_with_nan(*a, **kw):
        losses = compute_loss(*a, **kw)
        if next(calls) == 3:
            seen["hash"] = sha256(last)
            losses["wce"] = losses["wce"] * float("nan")
            losses["loss"] = losses["ce"] + losses["wce"]
        return losses

    # engine.stage3 imports compute_loss at each step, so patching the module is enough.
    monkeypatch.setattr(models.losses, "compute_loss", loss_with_nan)
    with pytest.raises(BanaError, match=r"iteration 3: term 'wce' = nan, term 'loss' = nan"):
        run(cfg, devices="cpu")
    assert sha256(last) == seen["hash"] and load_ckpt(last)["global_step"] == 2


def ckpt_step(path: Path) -> int:
    return load_ckpt(path)["global_step"] if path.is_file() else -1


def logged_lrs(run_dir: Path, group: str = "pw") -> dict[int, float]:
    """step -> logged learning rate of a parameter group, over every launch of the run."""
    import csv

    lrs = {}
    for path in sorted((run_dir / "logs").glob("version_*/metrics.csv")):
        with open(path) as f:
            lrs.update({int(r["step"]): float(r[f"lr-SGD/{group}"]) for r in csv.DictReader(f)
                        if r.get(f"lr-SGD/{group}")})
    return lrs


def check_resumed_schedule(run_dir: Path, cfg, max_iter: int) -> None:
    final = load_ckpt(run_dir / "checkpoints/final.ckpt")
    assert final["global_step"] == max_iter
    assert final["lr_schedulers"][0]["last_epoch"] == max_iter
    mult = {"pw": 1, "pb": 2, "nw": 10, "nb": 20}
    for group in final["optimizer_states"][0]["param_groups"]:
        expected = mult[group["name"]] * cfg.SOLVER.LR * lr_factor(max_iter, cfg.SOLVER)
        assert group["lr"] == pytest.approx(expected, abs=1e-12)
    # Two launches, and every logged step's lr is the uninterrupted schedule's.
    assert len(list((run_dir / "logs").glob("version_*"))) == 2
    lrs = logged_lrs(run_dir)
    assert min(lrs) < 5 and max(lrs) >= max_iter - 2
    for step, lr in lrs.items():
        assert lr == pytest.approx(cfg.SOLVER.LR * lr_factor(step, cfg.SOLVER), abs=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_sigkill_mid_run_then_resume_finishes_the_same_schedule(stage, artifacts, tmp_path):
    """Killed once last.ckpt holds step >= 10 of 30 (written every 5), resumed with --resume."""
    opts = ["DATA.ROOT", str(artifacts["voc" if stage == 1 else "labelled"]), "OUTPUT_DIR",
            str(tmp_path), *FAST, "SOLVER.MAX_ITER", "30", "SOLVER.CKPT_EVERY", "5"]
    opts += ["SOLVER.MILESTONES", "[20]"] if stage == 1 else ["SOLVER.VAL_EVERY", "15"]
    config = f"configs/demo/stage{stage}.yml"
    argv = [f"stage{stage}.py", "--config-file", config, "--gpu-id", "cpu", "--opts", *opts]
    last = tmp_path / f"stage{stage}/checkpoints/last.ckpt"
    log = tmp_path / "killed.log"
    kill_when(start(argv, log), lambda: ckpt_step(last) >= 10, log)
    killed_at = ckpt_step(last)
    assert 10 <= killed_at < 30 and not (last.parent / "final.ckpt").exists()

    proc = run_script(argv[:5] + ["--resume"] + argv[5:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Resuming from {last}" in proc.stdout
    check_resumed_schedule(tmp_path / f"stage{stage}", load_config(REPO / config, opts), 30)


@pytest.mark.slow
def test_stage2_killed_mid_run_leaves_whole_labels_and_resumes(artifacts, clean_labels, tmp_path):
    argv = stage2_argv(artifacts, tmp_path)
    labels = tmp_path / "Generation"
    log = tmp_path / "killed.log"
    kill_when(start(argv, log), lambda: len(list(labels.glob("Y_ret/*.png"))) >= 2, log)
    partial = read_labels(labels)
    assert 2 <= len(partial) < len(clean_labels)
    assert_same_labels(partial, {k: clean_labels[k] for k in partial})

    # Done = every label file of the image written (Y_crf, Y_ret, then Y_box) and recorded in
    # the folder's ledger (a label killed before its line is labelled again).
    names = [k.split("/")[1] for k in partial]
    recorded = {f"{key}.png" for key in Ledger(labels / INPUTS).read()}
    done_before = sum(names.count(n) == 3 and n in recorded for n in set(names))
    proc = run_script(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{done_before} already labelled" in proc.stdout
    assert_same_labels(read_labels(labels), clean_labels)


# --- issue 16, class 6: messages for real faults ------------------------------------------------

def test_a_full_disk_names_the_file_being_written_and_leaves_no_tmp(tmp_path, monkeypatch):
    import errno

    from utils.cli import os_error_message
    from utils.io import atomic_write_png

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "labels" / "x.png"
    with pytest.raises(OSError) as info:
        atomic_write_png(target, np.zeros((4, 4), np.uint8))
    assert info.value.filename == str(target)
    assert list((tmp_path / "labels").iterdir()) == []
    message = os_error_message(info.value)
    assert str(target) in message and "--resume" in message


def test_a_full_disk_while_checkpointing_names_the_checkpoint(tmp_path):
    import errno

    from engine.runs import atomic_save_checkpoint

    class FullDisk:
        is_global_zero = True

        def save_checkpoint(self, path, weights_only=False):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", "/tmp/tmpabc")

    with pytest.raises(OSError) as info:
        atomic_save_checkpoint(FullDisk(), tmp_path / "last.ckpt")
    assert info.value.filename == str(tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_ctrl_c_in_stage3_exits_130_with_the_way_back(labelled_voc, tmp_path):
    env = Env(tmp_path, labelled_voc, labelled_voc, tmp_path, tmp_path)
    log = tmp_path / "run.log"
    proc = start(stage3(env, "SOLVER.MAX_ITER", "5000", "SOLVER.VAL_EVERY", "5000"), log)
    deadline = time.monotonic() + 120
    while "iter " not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    text = " ".join(log.read_text().split())
    assert "interrupted" in text and "add --resume" in text and "Traceback" not in text


@pytest.mark.slow
def test_evaluate_killed_mid_run_leaves_whole_files_and_reruns(artifacts, tmp_path):
    argv = ["evaluate.py", "--config-file", "configs/demo/stage3.yml", "--gpu-id", "cpu",
            "--workers", "0", "--save-pred", "--checkpoint", str(artifacts["stage3"]), "--opts",
            "DATA.ROOT", str(artifacts["voc"]), "OUTPUT_DIR", str(tmp_path), "DATA.NUM_WORKERS",
            "0", "TEST.SPLIT", "train"]
    eval_dir = tmp_path / "stage3/eval"
    log = tmp_path / "killed.log"
    kill_when(start(argv, log), lambda: len(list(eval_dir.glob("pred/*.png"))) >= 1, log)
    partial = {p.name: read_index_png(p) for p in eval_dir.glob("pred/*.png")}
    assert 1 <= len(partial) < 12 and not (eval_dir / "metrics.json").exists()

    proc = run_script(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["images"] == 12 and set(metrics["modes"]) == {
        "single", "multiscale", "single+crf", "multiscale+crf"}
    for name, pred in partial.items():
        np.testing.assert_array_equal(read_index_png(eval_dir / "pred" / name), pred)
    assert len(list(eval_dir.glob("pred/*.png"))) == 12
