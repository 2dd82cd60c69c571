"""Stage 3 end to end on a tiny synthetic VOC tree with hand-made pseudo labels."""

import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import engine.training
from engine.optim import lr_factor
from engine.stage3 import run
from engine.config import load_config
from utils.errors import BanaError

ROOT = Path(__file__).resolve().parents[1]


def small_cfg(data_root, out, *opts):
    return load_config(ROOT / "configs/demo/stage3.yml", [
        "DATA.ROOT", str(data_root), "OUTPUT_DIR", str(out), "DATA.CROP_SIZE", "48",
        "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0", "SOLVER.MAX_ITER", "6",
        "SOLVER.CKPT_EVERY", "2", "SOLVER.VAL_EVERY", "3", "SOLVER.LOG_EVERY", "1", *opts])


def args(resume=False):
    return {"devices": "cpu", "resume": resume}


@pytest.mark.parametrize("loss", ["nal", "ce_crf", "ce_ret", "baseline", "er", "bs"])
def test_every_loss_trains_and_validates(labelled_voc, tmp_path, loss):
    cfg = small_cfg(labelled_voc, tmp_path, "MODEL.LOSS", loss, "SOLVER.MAX_ITER", "3")
    result = run(cfg, **args())
    assert result["iterations"] == 3
    assert 0 <= result["val/miou"] <= 100
    ckpt = torch.load(cfg.run_dir / "checkpoints/final.ckpt", map_location="cpu",
                      weights_only=False)
    assert ckpt["bana"]["stage"] == 3


def test_resume_continues_the_poly_schedule_exactly(labelled_voc, tmp_path, monkeypatch):
    cfg = small_cfg(labelled_voc, tmp_path)
    make_trainer = engine.training.make_trainer

    class Crash(pl.Callback):
        def on_train_batch_end(self, trainer, *a):
            if trainer.global_step == 3:
                raise RuntimeError("simulated crash")

    monkeypatch.setattr("engine.stage3.make_trainer",
                        lambda c, d, cbs, **kw: make_trainer(c, d, [*cbs, Crash()], **kw))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, **args())
    monkeypatch.setattr("engine.stage3.make_trainer", make_trainer)
    result = run(cfg, **args(resume=True))
    assert result["iterations"] == 6
    final = torch.load(cfg.run_dir / "checkpoints/final.ckpt", map_location="cpu",
                       weights_only=False)
    assert final["lr_schedulers"][0]["last_epoch"] == 6
    lrs = {g["name"]: g["lr"] for g in final["optimizer_states"][0]["param_groups"]}
    assert lrs["pw"] == pytest.approx(cfg.SOLVER.LR * lr_factor(6, cfg.SOLVER), abs=1e-12)


def test_semi_supervised_ids_train_on_gt(labelled_voc, tmp_path):
    ids_file = tmp_path / "gt_ids.txt"
    ids_file.write_text("\n".join((labelled_voc / "ImageSets/Segmentation/train.txt")
                                  .read_text().split()[:3]))
    cfg = small_cfg(labelled_voc, tmp_path, "DATA.GT_IDS", str(ids_file),
                    "SOLVER.MAX_ITER", "2")
    assert run(cfg, **args())["iterations"] == 2


def test_missing_pseudo_labels_name_the_stage2_command(synthetic_voc, tmp_path):
    cfg = small_cfg(synthetic_voc, tmp_path, "DATA.PSEUDO_LABEL_DIR", "nowhere")
    with pytest.raises(BanaError, match="Run stage 2 first"):
        run(cfg, **args())


def test_missing_gt_ids_file_is_named(labelled_voc, tmp_path):
    cfg = small_cfg(labelled_voc, tmp_path, "DATA.GT_IDS", str(tmp_path / "none.txt"))
    with pytest.raises(BanaError, match="DATA.GT_IDS"):
        run(cfg, **args())


@pytest.mark.slow
def test_two_process_cpu_ddp_run(labelled_voc, tmp_path):
    cmd = [sys.executable, "stage3.py", "--config-file", "configs/demo/stage3.yml",
           "--gpu-id", "cpu:2", "--opts", "DATA.ROOT", str(labelled_voc), "OUTPUT_DIR",
           str(tmp_path), "DATA.CROP_SIZE", "48", "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0",
           "SOLVER.MAX_ITER", "4", "SOLVER.CKPT_EVERY", "2", "SOLVER.VAL_EVERY", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = torch.load(tmp_path / "stage3" / "checkpoints" / "final.ckpt", map_location="cpu",
                       weights_only=False)
    assert final["global_step"] == 4 and final["bana"]["stage"] == 3


def test_batchnorm_is_synchronised_only_when_it_trains_on_several_devices():
    from engine.training import needs_sync_batchnorm
    from models.zoo import ModelSpec, build
    from utils.devices import Devices

    two, one = Devices("cpu", 2, ""), Devices("cpu", 1, "")
    res = build(ModelSpec("deeplab", "resnet101", 21)).train()
    frozen = build(ModelSpec("deeplab", "resnet101", 21, frozen_bn=True)).train()
    tiny = build(ModelSpec("deeplab", "tiny", 21)).train()  # GroupNorm only
    assert needs_sync_batchnorm(res, two)
    assert not needs_sync_batchnorm(res, one)
    assert not needs_sync_batchnorm(frozen, two)
    assert not needs_sync_batchnorm(tiny, two)
