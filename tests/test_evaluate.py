"""evaluate.py: multi-scale/flip averaging, CRF post-processing, folder scoring, the model path
end to end on a tiny checkpoint, the test-split server layout, and the entry point's errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine.config import load_config
from engine.evaluate import SERVER_LAYOUT, run, score_folder
from engine.inference import load_model, modes_of, predict_multiscale
from models.zoo import ModelSpec, build
from utils.crf import crf_labels
from utils.errors import BanaError
from utils.io import atomic_write_png, read_image, read_index_png
from utils.metrics import ConfusionMatrix

ROOT = Path(__file__).resolve().parents[1]
GT = "SegmentationClassAug"


class SizeNet(nn.Module):
    """Scores that say what the network saw: channel 0 = input height, 1 = input width."""

    def forward(self, images, out_size=None):
        n, _, h, w = images.shape
        out = torch.empty(n, 2, *out_size)
        out[:, 0], out[:, 1] = h, w
        return out


class RampNet(nn.Module):
    """Not flip-equivariant: score = red channel + column index (same size in and out)."""

    def forward(self, images, out_size=None):
        assert tuple(out_size) == images.shape[-2:]
        ramp = torch.arange(images.shape[-1], dtype=images.dtype)
        return (images[:, :1] + ramp).expand(-1, 2, -1, -1).clone()


class PointwiseNet(nn.Module):
    """A DeepLab-like stub that is flip-equivariant by construction: a 1×1 conv, then cosine."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, images, out_size=None):
        return nn.functional.normalize(self.conv(images / 255), dim=1)


def test_multiscale_averages_every_scale_and_flip_with_equal_weight():
    """Image 10×12, scales {1, 0.5, 0.25}: the copies are 10×12, 5×6 and 2×3 (⌊x·s⌋ as the
    authors' scale_factor, so 2.5 rounds down), each seen twice with flip, so the averaged
    channels are (10+5+2)/3 = 17/3 and (12+6+3)/3 = 7."""
    image = torch.rand(3, 10, 12) * 255
    cos = predict_multiscale(SizeNet(), image, [1.0, 0.5, 0.25], flip=True)
    assert cos.shape == (2, 10, 12)
    torch.testing.assert_close(cos[0], torch.full((10, 12), 17 / 3))
    assert torch.equal(cos[1], torch.full((10, 12), 7.0))


def test_flip_scores_are_flipped_back_before_averaging():
    """f(x) = R + j (column j of W). Its flipped pass, flipped back, is R + (W-1-j); the mean is
    R + (W-1)/2, whatever the image. Without the flip-back it would be (R + flip(R))/2 + j."""
    image = torch.rand(3, 5, 7) * 255
    cos = predict_multiscale(RampNet(), image, [1.0], flip=True)
    expected = image[0] + 3.0
    torch.testing.assert_close(cos, expected.expand(2, -1, -1))
    single = predict_multiscale(RampNet(), image, [1.0], flip=False)
    torch.testing.assert_close(single, (image[:1] + torch.arange(7.0)).expand(2, -1, -1))


def test_flip_changes_nothing_for_a_flip_equivariant_network():
    image = torch.rand(3, 16, 20) * 255
    net = PointwiseNet()
    torch.testing.assert_close(predict_multiscale(net, image, [1.0], flip=True),
                               net(image[None])[0])


def test_multiscale_flip_prediction_mirrors_with_the_image():
    """Averaging f(x) with flip(f(flip x)) at every scale makes any network's result mirror
    exactly with its input: the two terms swap."""
    torch.manual_seed(0)
    net = build(ModelSpec("deeplab", "tiny", 21)).eval()
    image = torch.rand(3, 40, 56) * 255
    with torch.inference_mode():
        cos = predict_multiscale(net, image, [1.0, 0.5, 1.25], flip=True)
        mirrored = predict_multiscale(net, image.flip(-1), [1.0, 0.5, 1.25], flip=True)
    assert cos.shape == (21, 40, 56) and cos.abs().max() <= 1 + 1e-5
    torch.testing.assert_close(mirrored, cos.flip(-1), atol=1e-5, rtol=0)


def test_crf_postprocess_feeds_softmax_of_scaled_scores_and_takes_argmax():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    cos = rng.uniform(-1, 1, (3, 6, 7)).astype(np.float32)
    seen = {}

    def crf(img, probs):
        seen["image"], seen["probs"] = img, probs
        return probs[::-1]  # reversing the classes shows the argmax is taken after the CRF

    label = crf_labels(crf, image, cos, temperature=20.0)
    e = np.exp(20.0 * cos)
    np.testing.assert_allclose(seen["probs"], e / e.sum(0), rtol=1e-5)
    assert seen["image"] is image
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, 2 - cos.argmax(0))


def test_real_crf_keeps_a_confident_prediction():
    from utils.crf import DenseCRF

    image = np.zeros((16, 16, 3), np.uint8)
    image[:, 8:] = 200
    cos = np.full((2, 16, 16), -1.0, np.float32)
    cos[0, :, :8] = cos[1, :, 8:] = 1.0
    label = crf_labels(DenseCRF.from_list([4, 5, 3, 3, 1]), image, cos, 20.0)
    np.testing.assert_array_equal(label, cos.argmax(0))


def test_modes_follow_the_test_config():
    cfg = load_config(None)
    assert modes_of(cfg) == ["single", "multiscale", "single+crf", "multiscale+crf"]
    cfg.TEST.SCALES, cfg.TEST.FLIP = [1.0], False
    assert modes_of(cfg) == ["single", "single+crf"]
    cfg.TEST.FLIP, cfg.TEST.CRF = True, False
    assert modes_of(cfg) == ["single", "multiscale"]


def ids_of(root, split="val"):
    return (root / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()


def test_folder_of_gt_copies_scores_100(synthetic_voc, tmp_path):
    pred = Path(shutil.copytree(synthetic_voc / GT, tmp_path / "pred"))
    metrics = score_folder(pred, synthetic_voc, "val")
    assert metrics["miou"] == 100 and metrics["pixel_acc"] == 100


def test_folder_of_corrupted_labels_matches_a_direct_confusion_matrix(synthetic_voc, tmp_path):
    expected = ConfusionMatrix(21)
    for k, i in enumerate(ids_of(synthetic_voc)):
        gt = read_index_png(synthetic_voc / GT / f"{i}.png")
        pred = np.where(gt == 255, 0, gt).astype(np.uint8)
        pred[: 8 + 4 * k] = 0  # a band of background of a different height per image
        pred[-5:, -5:] = 15
        atomic_write_png(tmp_path / "pred" / f"{i}.png", pred)
        expected.update(pred, gt)
    metrics = score_folder(tmp_path / "pred", synthetic_voc, "val")
    assert metrics["miou"] < 100
    np.testing.assert_equal(metrics, expected.compute())


def test_missing_predictions_are_counted_and_named(synthetic_voc, tmp_path):
    pred = Path(shutil.copytree(synthetic_voc / GT, tmp_path / "pred"))
    ids = ids_of(synthetic_voc)
    for i in ids[1:4]:
        (pred / f"{i}.png").unlink()
    with pytest.raises(BanaError, match=f"3 of {len(ids)} predictions") as info:
        score_folder(pred, synthetic_voc, "val")
    assert all(i in str(info.value) for i in ids[1:4])


@pytest.mark.parametrize("bad, message", [
    (np.zeros((5, 5), np.uint8), "is 5x5, but the ground truth of image val_00000 is 64x64"),
    (np.full((64, 64), 255, np.uint8), "holds the value 255, which is no class"),
    (np.full((64, 64), 21, np.uint8), "holds values 21, which are no class"),
])
def test_unscorable_prediction_is_named(synthetic_voc, tmp_path, bad, message):
    pred = Path(shutil.copytree(synthetic_voc / GT, tmp_path / "pred"))
    first = ids_of(synthetic_voc)[0]
    atomic_write_png(pred / f"{first}.png", bad)
    with pytest.raises(BanaError, match=f"{first}.png.*{message}"):
        score_folder(pred, synthetic_voc, "val")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A stage-3 checkpoint as Stage3LitModule writes it, holding a random tiny DeepLab."""
    torch.manual_seed(0)
    net = build(ModelSpec("deeplab", "tiny", 21))
    cfg = load_config(ROOT / "configs/demo/stage3.yml")
    ckpt = {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "bana": {"stage": 3, "backbone": "tiny", "num_classes": 21, "fc6_dilation": 1,
                     "input_norm": net.backbone.input_norm, "config": cfg.to_dict()}}
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save(ckpt, path)
    return path


def eval_cfg(data_root, out, checkpoint, *opts):
    return load_config(ROOT / "configs/demo/stage3.yml", [
        "DATA.ROOT", str(data_root), "OUTPUT_DIR", str(out), "MODEL.WEIGHTS", str(checkpoint),
        "DATA.NUM_WORKERS", "0", "TEST.SCALES", "[1.0, 0.5]", "MODEL.DCRF", "[4, 10, 5, 3, 1]",
        *opts])


def eval_args(**kw):
    return {"devices": "cpu", "workers": 0, **kw}


def test_model_end_to_end_with_crf_in_the_main_process(synthetic_voc, tmp_path, tiny_checkpoint):
    cfg = eval_cfg(synthetic_voc, tmp_path, tiny_checkpoint)
    result = run(cfg, **eval_args(save_pred=True, save_vis=2))
    assert list(result["modes"]) == ["single", "multiscale", "single+crf", "multiscale+crf"]
    ids = ids_of(synthetic_voc)
    assert result["images"] == len(ids)

    net = load_model(tiny_checkpoint)
    single = ConfusionMatrix(21)
    for i in ids:
        image = torch.from_numpy(read_image(synthetic_voc / "JPEGImages" / f"{i}.jpg"))
        with torch.inference_mode():
            pred = net(image.permute(2, 0, 1)[None].float(), out_size=image.shape[:2])[0]
        single.update(pred.argmax(0), read_index_png(synthetic_voc / GT / f"{i}.png"))
    np.testing.assert_equal(result["modes"]["single"], single.compute())

    eval_dir = cfg.run_dir / "eval"
    saved = json.loads((eval_dir / "metrics.json").read_text())
    assert saved["modes"]["multiscale+crf"]["miou"] == pytest.approx(
        result["modes"]["multiscale+crf"]["miou"])
    table = (eval_dir / "metrics.md").read_text()
    assert "### single+crf" in table and "| aeroplane |" in table
    assert sorted(p.stem for p in (eval_dir / "pred").glob("*.png")) == sorted(ids)
    assert len(list((eval_dir / "vis").glob("*.png"))) == 2
    assert (eval_dir / "config.yaml").is_file()


def test_crf_off_and_crf_in_a_worker_pool_agree(synthetic_voc, tmp_path, tiny_checkpoint):
    no_crf = run(eval_cfg(synthetic_voc, tmp_path / "a", tiny_checkpoint, "TEST.CRF", "false"),
                 **eval_args())
    assert list(no_crf["modes"]) == ["single", "multiscale"]
    opts = ("TEST.SCALES", "[1.0]", "TEST.FLIP", "false")
    inline = run(eval_cfg(synthetic_voc, tmp_path / "b", tiny_checkpoint, *opts), **eval_args())
    pooled = run(eval_cfg(synthetic_voc, tmp_path / "c", tiny_checkpoint, *opts),
                 **eval_args(workers=1))
    assert list(pooled["modes"]) == ["single", "single+crf"]
    np.testing.assert_equal(pooled["modes"], inline["modes"])
    np.testing.assert_equal(no_crf["modes"]["single"], pooled["modes"]["single"])


def test_test_split_writes_the_server_layout_without_scoring(synthetic_voc_copy, tmp_path,
                                                             tiny_checkpoint):
    ids = ids_of(synthetic_voc_copy)[:3]
    (synthetic_voc_copy / "ImageSets/Segmentation/test.txt").write_text("\n".join(ids) + "\n")
    for i in ids:
        (synthetic_voc_copy / GT / f"{i}.png").unlink()
    cfg = eval_cfg(synthetic_voc_copy, tmp_path, tiny_checkpoint, "TEST.SPLIT", "test",
                   "TEST.CRF", "false")
    result = run(cfg, **eval_args())
    assert result["modes"] == {}
    out = cfg.run_dir / "eval" / SERVER_LAYOUT
    assert str(SERVER_LAYOUT) == "results/VOC2012/Segmentation/comp6_test_cls"
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(ids)
    for i in ids:
        label = read_index_png(out / f"{i}.png")
        assert label.shape == read_image(synthetic_voc_copy / "JPEGImages" / f"{i}.jpg").shape[:2]
        assert label.max() < 21


def test_missing_weights_and_wrong_stage_are_messages(synthetic_voc, tmp_path, tiny_checkpoint):
    cfg = eval_cfg(synthetic_voc, tmp_path, "nowhere.ckpt")
    with pytest.raises(BanaError, match="nowhere.ckpt, which does not exist. Train stage 3 first"):
        run(cfg, **eval_args())
    ckpt = torch.load(tiny_checkpoint, weights_only=False)
    ckpt["bana"]["stage"] = 1
    torch.save(ckpt, tmp_path / "stage1.ckpt")
    with pytest.raises(BanaError, match="written by stage 1"):
        run(cfg, **eval_args(checkpoint=str(tmp_path / "stage1.ckpt")))
    with pytest.raises(BanaError, match="MODEL.BACKBONE is 'vgg16'"):
        run(eval_cfg(synthetic_voc, tmp_path, tiny_checkpoint, "MODEL.BACKBONE", "vgg16"),
            **eval_args())


def test_folder_mode_entry_point_prints_miou_last(synthetic_voc, tmp_path, run_script):
    pred = shutil.copytree(synthetic_voc / GT, tmp_path / "pred")
    proc = run_script("evaluate.py", "--pred-dir", pred, "--data-root", synthetic_voc,
                      "--out", tmp_path / "report")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "mIoU: 100.00"
    assert json.loads((tmp_path / "report/metrics.json").read_text())["modes"]["folder"][
        "miou"] == 100


@pytest.mark.parametrize("args, message", [
    ((), "give --config-file CONFIG"),
    (("--pred-dir", "x"), "--pred-dir needs --data-root"),
    (("--config-file", "configs/nowhere.yml"), "configs/nowhere.yml does not exist"),
    (("--pred-dir", "{tmp}/none", "--data-root", "{voc}"), "none does not exist"),
    (("--config-file", "configs/demo/stage3.yml", "--gpu-id", "cpu", "--opts", "DATA.ROOT",
      "{voc}", "OUTPUT_DIR", "{tmp}"), "stage3/checkpoints/final.ckpt, which does not exist"),
])
def test_entry_point_errors_exit_2_without_traceback(args, message, synthetic_voc, tmp_path,
                                                     run_script):
    proc = run_script("evaluate.py", *(a.format(tmp=tmp_path, voc=synthetic_voc) for a in args))
    assert proc.returncode == 2
    assert message in " ".join(proc.stderr.split()) and "Traceback" not in proc.stderr


def test_entry_point_missing_predictions_exit_2(synthetic_voc, tmp_path, run_script):
    pred = Path(shutil.copytree(synthetic_voc / GT, tmp_path / "pred"))
    first = ids_of(synthetic_voc)[0]
    (pred / f"{first}.png").unlink()
    proc = run_script("evaluate.py", "--pred-dir", pred, "--data-root", synthetic_voc)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = " ".join(proc.stderr.split())
    assert "1 of 6 predictions" in err and first in err
