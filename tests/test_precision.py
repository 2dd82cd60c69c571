"""TRAINER.PRECISION: BAP, the cosine classifier and NAL stay float32 under autocast, and a few
training steps in bf16-mixed land where float32 lands (stages 1 and 3, on the CPU)."""

import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from models.deeplab import DeepLab
from models.labeler import Labeler
from models.losses import compute_loss
from engine.config import load_config
from utils.errors import BanaError
from utils.precision import check_precision, inference_autocast

REPO = Path(__file__).resolve().parents[1]
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


class _Identity(torch.nn.Module):
    """A backbone stand-in whose features are the input, so the head sees the same features in
    both precisions."""

    def __init__(self, channels):
        super().__init__()
        self.out_channels = channels
        self.input_norm = "imagenet"

    def forward(self, x):
        return x

    def new_modules(self):
        return []


def _head_inputs(seed=0, channels=64):
    g = torch.Generator().manual_seed(seed)
    # Post-ReLU-like features: non-negative, so background cosines sit near 1 where BAP's
    # attention differences are small.
    features = torch.rand(2, channels, 12, 12, generator=g) + 0.5
    boxes = [torch.tensor([[8.0, 10.0, 60.0, 50.0, 3.0], [30.0, 4.0, 90.0, 40.0, 7.0]]),
             torch.tensor([[0.0, 0.0, 45.5, 70.2, 1.0]])]
    bg_mask = torch.ones(2, 1, 96, 96)
    for i, b in enumerate(boxes):
        for x1, y1, x2, y2, _ in b.tolist():
            bg_mask[i, 0, int(y1):int(y2), int(x1):int(x2)] = 0
    return features, boxes, bg_mask


@pytest.mark.parametrize("roi_sampling", ["reference", "roi_align"])
@pytest.mark.parametrize("pooling", ["bap", "gap"])
def test_bap_head_under_autocast_is_float32(roi_sampling, pooling):
    torch.manual_seed(0)
    labeler = Labeler(21, _Identity(64), pooling=pooling, roi_sampling=roi_sampling)
    features, boxes, bg_mask = _head_inputs()
    reference, targets = labeler.head(features, boxes, bg_mask)
    with torch.autocast(**BF16):
        mixed, mixed_targets = labeler.head(features, boxes, bg_mask)
        attention = labeler.attention(features, bg_mask)
    assert mixed.dtype == torch.float32 and attention.dtype == torch.float32
    assert torch.equal(targets, mixed_targets)
    assert (mixed - reference).abs().max() < 1e-3
    assert (attention - labeler.attention(features, bg_mask)).abs().max() < 1e-3


def test_the_attention_in_bfloat16_would_miss_the_tolerance():
    """The control of the test above: the cosines of BAP's attention taken in bfloat16, as
    autocast would take the einsum, are off by more than 1e-3."""
    features, _, _ = _head_inputs()
    protos = features.mean((2, 3))[:, None]  # (N,1,D): the mean feature, cosines near 1
    exact = torch.einsum("njd,ndhw->njhw", F.normalize(protos, dim=2),
                         F.normalize(features, dim=1))
    with torch.autocast(**BF16):
        rounded = torch.einsum("njd,ndhw->njhw", F.normalize(protos, dim=2),
                               F.normalize(features, dim=1))
    assert rounded.dtype == torch.bfloat16
    assert (rounded.float() - exact).abs().max() > 1e-3


@pytest.mark.parametrize("loss", ["nal", "ce_crf", "er", "bs"])
def test_cosine_classifier_and_losses_under_autocast_are_float32(loss):
    torch.manual_seed(0)
    net = DeepLab(5, _Identity(32))
    features = torch.rand(2, 32, 9, 9) + 0.2
    y_crf = torch.randint(0, 5, (2, 33, 33))
    y_ret = torch.where(torch.rand(2, 33, 33) < 0.7, y_crf, torch.randint(0, 5, (2, 33, 33)))
    kw = dict(temperature=20.0, gamma=7.0, lam=0.1, beta=0.8)
    cos = net(features, out_size=(33, 33))
    reference = compute_loss(loss, cos, y_crf, y_ret, **kw)
    with torch.autocast(**BF16):
        mixed_cos = net(features, out_size=(33, 33))
        mixed = compute_loss(loss, mixed_cos, y_crf, y_ret, **kw)
    assert mixed_cos.dtype == torch.float32
    assert (mixed_cos - cos).abs().max() < 1e-3
    for name in reference:
        assert mixed[name].dtype == torch.float32
        assert abs(float(mixed[name]) - float(reference[name])) < 1e-3, name
    # The control: the same 1x1 cosine product in bfloat16 is off by more than 1e-3.
    with torch.autocast(**BF16):
        rounded = F.conv2d(F.normalize(features, dim=1), F.normalize(net.classifier.weight, dim=1))
    assert (rounded.float() - F.conv2d(F.normalize(features, dim=1),
                                       F.normalize(net.classifier.weight, dim=1))).abs().max() > 1e-3


def test_precisions_a_device_cannot_run_are_refused():
    with pytest.raises(BanaError, match="16-mixed needs a CUDA GPU"):
        check_precision("16-mixed", "cpu")
    check_precision("bf16-mixed", "cpu")
    with pytest.raises(BanaError, match="one of 32, bf16-mixed, 16-mixed"):
        load_config(None, ["TRAINER.PRECISION", "fp8"])
    # YAML reads 32 as a number: it is the name of the default precision.
    assert load_config(None, ["TRAINER.PRECISION", "32"]).TRAINER.PRECISION == "32"
    with inference_autocast("32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    with inference_autocast("bf16-mixed", torch.device("cpu")):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


# --- a few training steps, bf16-mixed against float32 ----------------------------------------


def _train(module, batch, precision: str, steps: int):
    """`steps` optimisation steps of `module` on `batch` repeated, in `precision`."""
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None,
                                         collate_fn=lambda b: b)
    trainer.fit(module, train_dataloaders=loader)
    return module


def _fixed_batch(dataset, collate, n=4):
    return collate([dataset[i] for i in range(n)])


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _assert_bf16_trains_like_float32(make_module, batch, loss_of, steps=4):
    """From the same initial model, `steps` steps in float32 and in bf16-mixed: the loss on the
    batch afterwards (`loss_of`, float32, eval mode) within 2 % of each other."""
    results = {}
    for precision in ("32", "bf16-mixed"):
        pl.seed_everything(0, verbose=False)
        module = make_module()
        start = loss_of(module)
        module.train()
        _train(module, batch, precision, steps=steps)
        results[precision] = (start, loss_of(module))
    (start32, end32), (start16, end16) = results["32"], results["bf16-mixed"]
    assert start16 == start32  # the same initial model
    assert end32 < start32  # the steps trained
    assert _relative(end16, end32) < 0.02, results


def test_stage1_trains_in_bf16_mixed_like_float32(synthetic_voc, tmp_path):
    from data.datasets import open_data
    from data.base import collate_boxes
    from engine.runs import model_spec
    from engine.stage1 import Stage1LitModule
    from models.zoo import build

    # The authors' learning rate (the shipped configs'), not the demo's 10x: at 10x the first
    # steps are chaotic enough that any rounding (a thread count) moves the loss by percents.
    cfg = load_config(REPO / "configs/demo/stage1.yml", [
        "DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR", str(tmp_path), "SOLVER.LR", "0.001"])
    batch = _fixed_batch(open_data(cfg).box_dataset("train"), collate_boxes)

    def loss_of(module):
        module.eval()
        with torch.no_grad():
            logits, targets = module.net(batch["image"].float(), batch["boxes"],
                                         (batch["bg_mask"] == 1).float())
        return float(F.cross_entropy(logits, targets))

    _assert_bf16_trains_like_float32(
        lambda: Stage1LitModule(build(model_spec(cfg, "labeler"), cfg.MODEL.INIT), cfg), batch,
        loss_of)


def test_stage3_trains_in_bf16_mixed_like_float32(synthetic_voc, tmp_path):
    from data.datasets import open_data
    from data.base import collate_masks
    from engine.runs import model_spec
    from engine.stage3 import Stage3LitModule
    from models.zoo import build

    cfg = load_config(REPO / "configs/demo/stage3.yml", [
        "DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR", str(tmp_path), "SOLVER.LR", "0.001"])
    # GT as Y_crf and a coarser copy as Y_ret: both NAL terms are non-empty.
    gt = open_data(cfg).mask_dataset("train")
    batch = _fixed_batch(gt, collate_masks)
    labels = batch["label"][:, :1]
    coarse = F.interpolate(labels.float(), scale_factor=0.25, mode="nearest")
    coarse = F.interpolate(coarse, size=labels.shape[-2:], mode="nearest").long()
    batch["label"] = torch.cat([labels, coarse], 1)

    def loss_of(module):
        module.eval()  # BatchNorm on its running statistics: the same function of the batch
        with torch.no_grad():
            cos = module.net(batch["image"].float(), out_size=batch["image"].shape[-2:])
            return float(compute_loss("nal", cos, batch["label"][:, 0], batch["label"][:, 1],
                                      temperature=20.0, gamma=7.0, lam=0.1, beta=0.8)["loss"])

    _assert_bf16_trains_like_float32(
        lambda: Stage3LitModule(build(model_spec(cfg, "deeplab"), cfg.MODEL.INIT), cfg), batch,
        loss_of)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_training_stages_run_in_bf16_mixed_and_refuse_16_mixed_on_the_cpu(synthetic_voc,
                                                                          tmp_path, stage):
    """Through the script: TRAINER.PRECISION bf16-mixed trains and records its precision;
    16-mixed on the CPU stops before training with the fix in the message."""
    from engine import stage1, stage3

    labels = tmp_path / "labels"
    if stage == "stage3":  # GT as both label maps: enough to train a few steps
        labels.mkdir()
        for d in ("Y_crf", "Y_ret"):
            (labels / d).symlink_to(synthetic_voc / "SegmentationClassAug")
    opts = ["DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR", str(tmp_path), "DATA.CROP_SIZE", "48",
            "DATA.BATCH_SIZE", "2", "DATA.NUM_WORKERS", "0", "SOLVER.MAX_ITER", "2",
            "SOLVER.MILESTONES", "[1]", "SOLVER.VAL_EVERY", "2", "DATA.PSEUDO_LABEL_DIR",
            str(labels), "TRAINER.PRECISION", "bf16-mixed"]
    run = {"stage1": stage1.run, "stage3": stage3.run}[stage]
    cfg = load_config(REPO / f"configs/demo/{stage}.yml", opts)
    result = run(cfg, devices="cpu")
    assert result["iterations"] == 2
    assert "PRECISION: bf16-mixed" in (cfg.run_dir / "config.yaml").read_text()
    printed = subprocess.run(
        [sys.executable, f"{stage}.py", "--config-file", f"configs/demo/{stage}.yml", "--gpu-id",
         "cpu", "--opts", *opts[:-1], "16-mixed", "NAME", "half"], cwd=REPO, capture_output=True,
        text=True, timeout=300)
    assert printed.returncode == 2 and "16-mixed needs a CUDA GPU" in printed.stderr
    assert not (tmp_path / "half" / "checkpoints").exists()


def test_stage2_refuses_16_mixed_on_the_cpu_before_reading_the_model(synthetic_voc, stage1_dir,
                                                                      tmp_path):
    """A precision the device cannot run stops stage 2 before the stage-1 model is read and
    before anything is written into the label folder."""
    from unittest import mock

    import engine.stage2

    labels = tmp_path / "Generation"
    cfg = load_config(REPO / "configs/demo/stage2.yml", [
        "DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR", str(stage1_dir), "NAME", "stage2_half",
        "DATA.PSEUDO_LABEL_DIR", str(labels), "TRAINER.PRECISION", "16-mixed"])
    with mock.patch.object(engine.stage2, "load_labeler") as load, \
            pytest.raises(BanaError, match="16-mixed needs a CUDA GPU"):
        engine.stage2.run(cfg, devices="cpu", workers=1)
    assert not load.called and not labels.exists()
