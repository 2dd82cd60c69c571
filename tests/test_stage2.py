"""Stage 2 end to end on the tiny synthetic VOC tree: labels, quality report, panels, resume,
device shards, and the checkpoints it must refuse."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data.base import BoxDataset
from data.voc import parse_annotation
from engine.label_quality import format_report, quality_report
from engine.stage2 import INPUTS, generate, load_labeler, open_dataset, run
from engine.stage2_jobs import BOX_LABEL, LABELS, pending_ids
from utils.pool import WorkerPool
from data.datasets import open_data
from utils.boxes import fill_boxes
from engine.config import load_config
from utils.errors import BanaError
from utils.io import atomic_write_png, read_image, read_index_png
from utils.palette import colorize
from utils.records import Ledger

ROOT = Path(__file__).resolve().parents[1]


def stage2_cfg(root, out, label_dir, *opts):
    return load_config(ROOT / "configs/demo/stage2.yml", [
        "DATA.ROOT", str(root), "OUTPUT_DIR", str(out), "DATA.NUM_WORKERS", "0",
        "DATA.PSEUDO_LABEL_DIR", str(label_dir), *opts])


def stage2_args(gpu_id="cpu", workers=1, save_vis=0, **options):
    return {"devices": gpu_id, "workers": workers, "save_vis": save_vis, **options}


def label_bytes(label_dir: Path) -> dict[str, bytes]:
    return {f"{d}/{p.name}": p.read_bytes() for d in LABELS
            for p in sorted((label_dir / d).glob("*.png"))}


@pytest.fixture(scope="module")
def reference(synthetic_voc, stage1_dir, tmp_path_factory):
    """An uninterrupted run with 2 CRF workers and 3 panels: (cfg, result, printed, files)."""
    label_dir = tmp_path_factory.mktemp("reference") / "Generation"
    cfg = stage2_cfg(synthetic_voc, stage1_dir, label_dir)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = run(cfg, **stage2_args(workers=2, save_vis=3))
    return cfg, result, printed.getvalue(), label_bytes(label_dir)


def split_ids(root, split="train"):
    return (root / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()


def test_run_labels_every_image_with_labels_inside_boxes(synthetic_voc, reference):
    cfg, result, printed, files = reference
    ids = split_ids(synthetic_voc)
    assert result["images"] == result["labelled_now"] == len(ids) == 12
    assert sorted(files) == sorted(f"{d}/{i}.png" for d in LABELS for i in ids)
    for i in ids:
        boxes, classes = parse_annotation(synthetic_voc / "Annotations" / f"{i}.xml")
        for d in LABELS:
            label = read_index_png(cfg.pseudo_label_dir / d / f"{i}.png")
            assert label.shape == read_image(synthetic_voc / "JPEGImages" / f"{i}.jpg").shape[:2]
            for c in np.unique(label[label > 0]):
                inside = fill_boxes(np.c_[boxes, classes][classes == c], *label.shape) > 0
                assert inside[label == c].all()
    assert any((read_index_png(cfg.pseudo_label_dir / "Y_crf" / f"{i}.png") > 0).any()
               for i in ids)


def test_box_label_set_is_the_filled_boxes(synthetic_voc, reference):
    cfg, *_ = reference
    for i in split_ids(synthetic_voc):
        boxes, classes = parse_annotation(synthetic_voc / "Annotations" / f"{i}.xml")
        expected = fill_boxes(np.c_[boxes, classes], *read_image(
            synthetic_voc / "JPEGImages" / f"{i}.jpg").shape[:2])
        assert np.array_equal(read_index_png(cfg.pseudo_label_dir / BOX_LABEL / f"{i}.png"),
                              expected)


def test_quality_report_is_printed_and_saved(reference):
    cfg, result, printed, _ = reference
    saved = json.loads((cfg.run_dir / "quality.json").read_text())
    assert set(saved) == {"split", "images", "labelled_images", "miou", "per_class_iou",
                          "signals", "warnings"}
    keys = {"box_baseline", "Y_crf", "Y_ret", "Y_crf&Y_ret", "agreement"}
    assert set(saved["miou"]) == keys | {"agreement_coverage"}
    assert all(0 <= v <= 100 for v in saved["miou"].values())
    assert set(saved["per_class_iou"]) == keys
    assert saved["miou"] == result["quality"] and saved["images"] == 12
    for name in ("box baseline", "Y_crf", "Y_ret", "Y_crf & Y_ret", "Y_crf = Y_ret region"):
        assert name in printed
    assert f"{saved['miou']['Y_crf']:6.2f}" in printed


def test_quality_report_numbers_on_hand_made_labels(synthetic_voc_copy, tmp_path):
    voc = synthetic_voc_copy
    """Y_crf = GT scores 100; Y_ret = the filled boxes scores what the box baseline scores; they
    agree where the GT equals the filled boxes, and on that region Y_crf (= GT) scores 100."""
    label_dir = tmp_path / "Generation"
    cfg = stage2_cfg(voc, tmp_path, label_dir)
    ids = split_ids(voc)
    agree = valid = 0
    for i in ids:
        gt = read_index_png(voc / "SegmentationClassAug" / f"{i}.png")
        boxes, classes = parse_annotation(voc / "Annotations" / f"{i}.xml")
        filled = fill_boxes(np.c_[boxes, classes], *gt.shape)
        atomic_write_png(label_dir / "Y_crf" / f"{i}.png", gt)
        atomic_write_png(label_dir / "Y_ret" / f"{i}.png", filled)
        atomic_write_png(label_dir / "Y_box" / f"{i}.png", filled)
        agree += int(((gt == filled) & (gt != 255)).sum())
        valid += int((gt != 255).sum())
    data = open_data(cfg)
    m = quality_report(cfg, data, ids)["miou"]
    assert m["Y_crf"] == 100 and m["agreement"] == 100
    assert m["Y_ret"] == m["box_baseline"] < 90
    # Y_crf & Y_ret is Y_crf (= GT) where it equals Y_ret (= filled boxes), background elsewhere;
    # scored here by its own confusion matrix.
    from utils.metrics import ConfusionMatrix
    mat = ConfusionMatrix(21)
    for i in ids:
        gt = read_index_png(voc / "SegmentationClassAug" / f"{i}.png")
        boxes, classes = parse_annotation(voc / "Annotations" / f"{i}.xml")
        filled = fill_boxes(np.c_[boxes, classes], *gt.shape)
        mat.update(np.where(gt == filled, gt, 0).astype(np.uint8), gt)
    assert m["Y_crf&Y_ret"] == round(float(mat.compute()["miou"]), 2)
    assert m["box_baseline"] < m["Y_crf&Y_ret"] < m["Y_crf"]
    assert m["agreement_coverage"] == pytest.approx(100 * agree / valid, abs=0.01)
    # One image without a mask (none in SegmentationClass/ either): the others are scored, and
    # the report says how many; without any mask there is no report.
    for folder in ("SegmentationClassAug", "SegmentationClass"):
        (voc / folder / f"{ids[0]}.png").unlink()
    partial = quality_report(cfg, data, ids)
    assert partial["images"] == len(ids) - 1 and partial["labelled_images"] == len(ids)
    assert partial["miou"]["Y_crf"] == 100.0
    assert "the 11 of 12 images that have a ground-truth mask" in format_report(partial)
    for i in ids[1:]:
        for folder in ("SegmentationClassAug", "SegmentationClass"):
            (voc / folder / f"{i}.png").unlink()
    assert quality_report(cfg, data, ids) is None


def test_save_vis_writes_image_gt_and_label_panels(synthetic_voc, reference):
    cfg, *_ = reference
    vis = sorted((cfg.run_dir / "vis").glob("*.png"))
    ids = split_ids(synthetic_voc)[:3]
    assert [p.stem for p in vis] == sorted(ids)
    i = ids[0]
    panel = read_image(cfg.run_dir / "vis" / f"{i}.png")
    image = read_image(synthetic_voc / "JPEGImages" / f"{i}.jpg")
    h, w = image.shape[:2]
    assert panel.shape == (h, 4 * w + 3 * 4, 3)
    np.testing.assert_array_equal(panel[:, :w], image)
    gt = read_index_png(synthetic_voc / "SegmentationClassAug" / f"{i}.png")
    y_ret = read_index_png(cfg.pseudo_label_dir / "Y_ret" / f"{i}.png")
    np.testing.assert_array_equal(panel[:, w + 4:2 * w + 4], colorize(gt))
    np.testing.assert_array_equal(panel[:, 3 * w + 12:], colorize(y_ret))


def test_a_stopped_run_resumes_to_identical_files(synthetic_voc, stage1_dir, reference,
                                                  tmp_path, monkeypatch):
    """Stop after 5 images (the loader fails), then leave what a kill can leave: one image with
    Y_crf but no Y_ret, and a temporary file of an interrupted atomic write. The rerun labels
    exactly the unfinished images and ends with the files of the uninterrupted run."""
    cfg = stage2_cfg(synthetic_voc, stage1_dir, tmp_path / "Generation")
    dataset, net = open_dataset(cfg), load_labeler(cfg)
    ids = dataset.ids
    served = []
    original = BoxDataset.__getitem__

    def stopping(self, index):
        if len(served) == 5:
            raise RuntimeError("simulated stop")
        served.append(index)
        return original(self, index)

    with WorkerPool(1) as pool:
        monkeypatch.setattr(BoxDataset, "__getitem__", stopping)
        with pytest.raises(RuntimeError, match="simulated stop"):
            generate(cfg, net, dataset, ids, torch.device("cpu"), 1, progress=False, pool=pool)
        list(pool.finish())  # the images in flight are written now
        monkeypatch.setattr(BoxDataset, "__getitem__", original)
        out = cfg.pseudo_label_dir
        assert pending_ids(ids, out) == ids[5:]
        (out / "Y_ret" / f"{ids[2]}.png").unlink()
        (out / "Y_crf" / f".{ids[7]}.png.x1y2z3.tmp").write_bytes(b"\x89PNG trunc")
        assert pending_ids(ids, out) == [ids[2], *ids[5:]]
        assert generate(cfg, net, dataset, ids, torch.device("cpu"), 1, progress=False,
                        pool=pool) == len(ids) - 4
        assert generate(cfg, net, dataset, ids, torch.device("cpu"), 1, progress=False,
                        pool=pool) == 0
    assert label_bytes(out) == reference[3]


def test_a_finished_run_is_skipped_and_reports_again(synthetic_voc, stage1_dir, reference):
    cfg, first, *_ = reference
    result = run(cfg, **stage2_args(workers=1))
    assert result["labelled_now"] == 0 and result["quality"] == first["quality"]


def test_stage3_and_other_backbone_checkpoints_are_refused(synthetic_voc, stage1_dir, tmp_path):
    ckpt = torch.load(stage1_dir / "stage1/checkpoints/final.ckpt", map_location="cpu",
                      weights_only=False)
    ckpt["bana"]["stage"] = 3  # what stage 3 writes there; the rest does not matter to stage 2
    stage3 = tmp_path / "stage3.ckpt"
    torch.save(ckpt, stage3)
    label_dir = tmp_path / "Generation"
    cases = [(["MODEL.WEIGHTS", str(stage3)], rf"{stage3} was written by stage 3.*stage1\.py"),
             (["MODEL.BACKBONE", "vgg16"], r"'tiny' stage-1 model but MODEL.BACKBONE is 'vgg16'"),
             (["MODEL.WEIGHTS", str(tmp_path / "none.ckpt")], r"does not exist.*stage1\.py")]
    for opts, message in cases:
        cfg = stage2_cfg(synthetic_voc, stage1_dir, label_dir, *opts)
        with pytest.raises(BanaError, match=message):
            run(cfg, **stage2_args())
    assert not label_dir.exists()  # refused before anything was written


def test_crf_workers_import_neither_torch_nor_lightning():
    """What a CRF-only worker imports (the spawned copy of the entry script, the pool, the job
    modules of stage 2's device path, evaluate.py and predict.py): no torch, no Lightning; the
    CPU path's job module loads torch only when its job runs."""
    code = ("import sys, stage2, evaluate, predict, utils.pool, utils.crf, engine.stage2_jobs, "
            "utils.io, utils.boxes, utils.palette, utils.instances, data.labelset, exporters; "
            "print(sorted(m for m in ('torch', 'pytorch_lightning', 'lightning_fabric', "
            "'torchvision') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


@pytest.mark.slow
def test_two_cpu_shards_write_the_files_of_one_process(synthetic_voc, stage1_dir, reference,
                                                       tmp_path):
    cfg = stage2_cfg(synthetic_voc, stage1_dir, tmp_path / "Generation")
    result = run(cfg, **stage2_args(gpu_id="cpu:2", workers=2))
    assert result["labelled_now"] == 12 and result["quality"] == reference[1]["quality"]
    assert label_bytes(cfg.pseudo_label_dir) == reference[3]


@pytest.mark.slow
def test_a_killed_run_resumes_to_identical_files(synthetic_voc, stage1_dir, reference, tmp_path):
    """SIGKILL the whole process group (main process and CRF workers) once a few images are
    written, then rerun the same command."""
    label_dir = tmp_path / "Generation"
    cmd = [sys.executable, "stage2.py", "--config-file", "configs/demo/stage2.yml", "--gpu-id",
           "cpu", "--workers", "1", "--opts", "DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR",
           str(stage1_dir), "NAME", "killed", "DATA.NUM_WORKERS", "0",
           "DATA.PSEUDO_LABEL_DIR", str(label_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    def finished() -> int:  # labels written and recorded in the folder's ledger
        recorded = Ledger(label_dir / INPUTS).read()
        return sum(i in recorded for i in split_ids(synthetic_voc)
                   if i not in pending_ids([i], label_dir))

    deadline = time.monotonic() + 120
    while finished() < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = finished()
    assert 3 <= finished < 12, "the run was not killed halfway"
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{finished} already labelled, {12 - finished} to go" in rerun.stdout
    assert label_bytes(label_dir) == reference[3]


@pytest.mark.parametrize("workers", [1, 2])
def test_the_device_path_writes_the_files_of_the_worker_path(synthetic_voc, stage1_dir, reference,
                                                             tmp_path, workers):
    """--pixel-work device (unaries and retrieval in the main process, only the CRF in the
    workers, as on a GPU) against the default CPU path (everything per pixel in the workers):
    the same float32 operations, so the same files, Y_box and the quality report included."""
    cfg = stage2_cfg(synthetic_voc, stage1_dir, tmp_path / "Generation")
    result = run(cfg, **stage2_args(workers=workers, pixel_work="device"))
    assert result["labelled_now"] == len(reference[3]) // len(LABELS)
    assert label_bytes(cfg.pseudo_label_dir) == reference[3]
    assert result["quality"] == reference[1]["quality"]
    boxes = {p.name: p.read_bytes() for p in (cfg.pseudo_label_dir / BOX_LABEL).glob("*.png")}
    assert boxes == {p.name: p.read_bytes()
                     for p in (reference[0].pseudo_label_dir / BOX_LABEL).glob("*.png")}


def test_a_bad_image_is_skipped_listed_and_costs_only_itself(synthetic_voc_copy, stage1_dir,
                                                             reference, tmp_path):
    """Issue 29, class 3. Before: the truncated JPEG stopped stage 2 (the images after it in the
    order unlabelled); now every other image is labelled, byte for byte as in the reference
    run, and the run ends with each skipped image and why (exit status 2 from stage2.py)."""
    from utils.skips import SKIPPED, SkippedImages

    root = synthetic_voc_copy
    bad = root / "JPEGImages" / "train_00001.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    label_dir = tmp_path / "Generation"
    cfg = stage2_cfg(root, stage1_dir, label_dir, "DATA.MAX_PIXELS", str(64 * 64 - 1))
    with pytest.raises(SkippedImages) as info:
        run(cfg, **stage2_args(workers=1))
    ids = split_ids(root)
    assert sorted(i for i, _ in info.value.skipped) == sorted(ids)  # every one is over the limit
    cfg = stage2_cfg(root, stage1_dir, label_dir)
    with pytest.raises(SkippedImages) as info:
        run(cfg, **stage2_args(workers=1))
    assert [i for i, _ in info.value.skipped] == ["train_00001"]
    assert f"1 of {len(ids)} image(s) could not be used" in str(info.value)
    assert f"  1. train_00001: cannot read image {bad}" in str(info.value)
    assert (label_dir / SKIPPED).is_file()
    from data.labelset import LabelSet  # the others still make a label set, without it
    assert LabelSet(label_dir).ids == [i for i in ids if i != "train_00001"]
    written = label_bytes(label_dir)
    expected = {k: v for k, v in reference[3].items() if "train_00001" not in k}
    assert written == expected
