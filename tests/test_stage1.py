"""Stage 1 end to end on a tiny synthetic VOC tree: training, checkpoints, resume, DDP."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import engine.training
from engine.optim import lr_factor, parameter_groups
from engine.stage1 import run
from engine.config import load_config
from utils.errors import BanaError

ROOT = Path(__file__).resolve().parents[1]


def small_cfg(data_root, out, *opts):
    return load_config(ROOT / "configs/demo/stage1.yml", [
        "DATA.ROOT", str(data_root), "OUTPUT_DIR", str(out), "DATA.CROP_SIZE", "48",
        "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0", "SOLVER.MAX_ITER", "8",
        "SOLVER.MILESTONES", "[5]", "SOLVER.CKPT_EVERY", "2", "SOLVER.LOG_EVERY", "1", *opts])


def args(resume=False):
    return {"devices": "cpu", "resume": resume}


def read_log(run_dir):
    """Rows of every launch's CSV log (a resumed run logs into a new version folder)."""
    rows = []
    for path in sorted((run_dir / "logs").glob("version_*/metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def test_parameter_groups_follow_the_reference_multipliers():
    pre, new = torch.nn.Conv2d(2, 2, 1), torch.nn.Conv2d(2, 2, 1)
    whole = torch.nn.Sequential(pre, new)
    groups = {g["name"]: g for g in parameter_groups([whole], [new], 0.1, 5e-4)}
    expected = {"pw": (0.1, 5e-4), "pb": (0.2, 0.0), "nw": (1.0, 5e-4), "nb": (2.0, 0.0)}
    assert set(groups) == set(expected)
    for name, (lr, wd) in expected.items():
        assert (groups[name]["lr"], groups[name]["weight_decay"]) == pytest.approx((lr, wd))
    assert groups["pw"]["params"] == [pre.weight] and groups["nb"]["params"] == [new.bias]


def test_lr_schedules():
    cfg = load_config(None, ["SOLVER.MAX_ITER", "100", "SOLVER.MILESTONES", "[50, 80]"])
    assert [lr_factor(i, cfg.SOLVER) for i in (0, 49, 50, 79, 80)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01])
    cfg = load_config(None, ["SOLVER.MAX_ITER", "100", "SOLVER.SCHEDULER", "poly"])
    assert lr_factor(30, cfg.SOLVER) == pytest.approx((1 - 30 / 100) ** 0.9)
    assert lr_factor(100, cfg.SOLVER) == 0.0


def test_stage1_trains_writes_checkpoints_logs_and_config(synthetic_voc, tmp_path):
    cfg = small_cfg(synthetic_voc, tmp_path)
    result = run(cfg, **args())
    assert result["iterations"] == 8
    ckpt_dir = cfg.run_dir / "checkpoints"
    final = torch.load(ckpt_dir / "final.ckpt", map_location="cpu", weights_only=False)
    assert final["bana"]["stage"] == 1 and final["bana"]["model"]["backbone"] == "tiny"
    assert final["global_step"] == 8
    assert (ckpt_dir / "last.ckpt").is_file() and (cfg.run_dir / "config.yaml").is_file()
    assert load_config(cfg.run_dir / "config.yaml") == cfg
    rows = read_log(cfg.run_dir)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 7 and all(torch.isfinite(torch.tensor(losses)))
    assert any(r.get("train/fg_acc") for r in rows) and any(r.get("train/bg_acc") for r in rows)


def test_a_fresh_run_refuses_to_overwrite_an_existing_one(synthetic_voc, tmp_path):
    cfg = small_cfg(synthetic_voc, tmp_path, "SOLVER.MAX_ITER", "2", "SOLVER.MILESTONES", "[1]")
    run(cfg, **args())
    with pytest.raises(BanaError, match="--resume"):
        run(cfg, **args())


class Crash(pl.Callback):
    """Dies like a killed process would, right after iteration `at` has been taken."""

    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, *a):
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


def test_resume_continues_at_the_right_iteration_and_learning_rate(synthetic_voc, tmp_path,
                                                                  monkeypatch):
    cfg = small_cfg(synthetic_voc, tmp_path)
    make_trainer = engine.training.make_trainer

    def crashing(cfg_, devices, callbacks, **kw):
        return make_trainer(cfg_, devices, [*callbacks, Crash(at=5)], **kw)

    monkeypatch.setattr("engine.stage1.make_trainer", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, **args())
    ckpt_dir = cfg.run_dir / "checkpoints"
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4 and not (ckpt_dir / "final.ckpt").exists()

    monkeypatch.setattr("engine.stage1.make_trainer", make_trainer)
    result = run(cfg, **args(resume=True))
    assert result["iterations"] == 8
    final = torch.load(ckpt_dir / "final.ckpt", map_location="cpu", weights_only=False)
    assert final["lr_schedulers"][0]["last_epoch"] == 8
    lrs = {g["name"]: g["lr"] for g in final["optimizer_states"][0]["param_groups"]}
    base = cfg.SOLVER.LR * cfg.SOLVER.LR_DECAY  # past the milestone at 5
    assert lrs["pw"] == pytest.approx(base) and lrs["nw"] == pytest.approx(10 * base)
    # The logged lr, before and after the restart, follows the uninterrupted schedule.
    steps = {int(r["step"]): float(r["lr-SGD/pw"]) for r in read_log(cfg.run_dir)
             if r.get("lr-SGD/pw")}
    assert len(list((cfg.run_dir / "logs").glob("version_*"))) == 2
    assert min(steps) < 4 and max(steps) >= 6
    for step, lr in steps.items():
        assert lr == pytest.approx(cfg.SOLVER.LR * lr_factor(step, cfg.SOLVER))


@pytest.mark.slow
def test_two_process_cpu_ddp_run(synthetic_voc, tmp_path):
    cmd = [sys.executable, "stage1.py", "--config-file", "configs/demo/stage1.yml",
           "--gpu-id", "cpu:2", "--opts", "DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR",
           str(tmp_path), "DATA.CROP_SIZE", "48", "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0",
           "SOLVER.MAX_ITER", "4", "SOLVER.MILESTONES", "[2]", "SOLVER.CKPT_EVERY", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = torch.load(tmp_path / "stage1" / "checkpoints" / "final.ckpt", map_location="cpu",
                       weights_only=False)
    assert final["global_step"] == 4 and final["bana"]["stage"] == 1
