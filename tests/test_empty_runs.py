"""Runs that would do nothing and say done (issue 22, class 4): a training run that cannot make one
step is refused before it starts, and no stage reports a file it did not write."""

from pathlib import Path

import pytest

from engine.config import load_config
from engine.runs import check_steps
from utils.devices import Devices
from utils.errors import BanaError

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("images, batch, processes, ok", [
    (12, 12, 1, True), (12, 13, 1, False), (12, 100, 1, False),
    # Two processes take ceil(12 / 2) = 6 images each: a per-process batch of 6 fits, 7 not.
    (12, 12, 2, True), (12, 14, 2, False),
    # ceil(5 / 2) = 3 each (the sampler pads): a total batch of 6 still makes a step.
    (5, 6, 2, True), (5, 8, 2, False),
])
def test_a_batch_larger_than_each_process_share_is_refused(images, batch, processes, ok):
    devices = Devices("cpu", processes, "")
    if ok:
        assert check_steps(images, batch, devices, "train") == max(1, batch // processes)
    else:
        with pytest.raises(BanaError, match=rf"DATA.BATCH_SIZE {batch}.* more than the {images} "
                                            r"images of split 'train': no training step"):
            check_steps(images, batch, devices, "train")


@pytest.mark.parametrize("stage", [1, 3])
def test_training_with_a_batch_larger_than_the_split_never_starts(synthetic_voc, tmp_path,
                                                                 stage, capsys):
    from engine import stage1, stage3

    labels = tmp_path / "labels"
    labels.mkdir()
    for d in ("Y_crf", "Y_ret"):
        (labels / d).symlink_to(synthetic_voc / "SegmentationClassAug")
    cfg = load_config(REPO / f"configs/demo/stage{stage}.yml", [
        "DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR", str(tmp_path), "DATA.BATCH_SIZE", "100",
        "DATA.NUM_WORKERS", "0", "DATA.PSEUDO_LABEL_DIR", str(labels), "DATA.SPLIT", "train"])
    run = {1: stage1.run, 3: stage3.run}[stage]
    with pytest.raises(BanaError, match=r"DATA.BATCH_SIZE 100 is more than the 12 images of "
                                        r"split 'train'.*at most 12"):
        run(cfg, devices="cpu")
    assert not (cfg.run_dir / "checkpoints").exists() or \
        not any((cfg.run_dir / "checkpoints").iterdir())
    assert "done" not in capsys.readouterr().out


def test_a_run_that_stops_early_does_not_claim_its_final_checkpoint(synthetic_voc, tmp_path,
                                                                    monkeypatch, capsys):
    """Should training end before its last iteration without an error (here a trainer told to
    stop), the stage says it stopped instead of naming a final.ckpt that is not there."""
    import pytorch_lightning as pl

    import engine.stage1

    class StopEarly(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step >= 2:
                trainer.should_stop = True

    make_trainer = engine.stage1.make_trainer
    monkeypatch.setattr(engine.stage1, "make_trainer",
                        lambda cfg, devices, callbacks, **kw: make_trainer(
                            cfg, devices, [*callbacks, StopEarly()], **kw))
    cfg = load_config(REPO / "configs/demo/stage1.yml", [
        "DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR", str(tmp_path), "DATA.CROP_SIZE", "48",
        "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0", "SOLVER.MAX_ITER", "6",
        "SOLVER.MILESTONES", "[5]"])
    with pytest.raises(BanaError, match=r"stopped after 2 of 6 iterations without writing "
                                        r".*final.ckpt; rerun with --resume"):
        engine.stage1.run(cfg, devices="cpu")
    assert "Stage 1 done" not in capsys.readouterr().out
