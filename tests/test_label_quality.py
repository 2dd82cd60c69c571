"""No-ground-truth signals of a label set, the warnings they raise (stage 2's closing summary, and
stage 3 again when it starts on those labels), and DATA.EXCLUDE (the review page's list)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest

from data.labelset import LabelSet, image_record, record_path, write_manifest
from engine.config import load_config
from engine.label_quality import (MIN_FILL, format_signals, label_warnings, signals)
from engine.labels import read_exclusions
from utils.errors import BanaError
from utils.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("background", "person", "car", "bike")


def record(fills_crf, fills_ret, classes, agreement=None):
    """A record whose signals are given (the rest of a record does not matter here)."""
    return {"classes": list(classes), "fill": {"Y_crf": list(fills_crf), "Y_ret": list(fills_ret),
                                               "Y_box": [1.0] * len(classes)},
            "agreement": list(agreement) if agreement is not None else None}


def test_signals_per_variant_and_class_against_numpy():
    rng = np.random.default_rng(0)
    recs, crf, ret, cls, agree = [], [], [], [], []
    for _ in range(30):
        k = int(rng.integers(0, 4))
        c, r, cl, a = rng.random(k), rng.random(k), rng.integers(1, 3, k), rng.random(k)
        recs.append(record(c, r, cl, a))
        crf += list(c)
        ret += list(r)
        cls += list(cl)
        agree += list(a)
    sig = signals(recs, CLASSES)
    crf, cls = np.array(crf), np.array(cls)
    assert sig["images"] == 30 and sig["boxes"] == len(cls)
    person = sig["variants"]["Y_crf"]["per_class"]["person"]
    assert person["boxes"] == (cls == 1).sum()
    assert person["fill_mean"] == pytest.approx(crf[cls == 1].mean(), abs=1e-4)
    assert person["fill_p10"] == pytest.approx(np.percentile(crf[cls == 1], 10), abs=1e-4)
    assert person["lost"] == (crf[cls == 1] < 0.05).sum()
    assert sig["variants"]["Y_crf"]["overall"]["fill_mean"] == pytest.approx(crf.mean(), abs=1e-4)
    assert sig["agreement"]["overall"]["mean"] == pytest.approx(np.mean(agree), abs=1e-4)
    assert "person" in format_signals(sig) and "Y_ret" in format_signals(sig)


def test_warning_fires_on_labels_that_leave_boxes_background():
    """Penn-Fudan's failure (issue 26): Y_crf gives a pedestrian 15 % of its box, many boxes
    nothing at all; Y_ret is plausible."""
    rng = np.random.default_rng(1)
    recs = [record(np.clip(rng.normal(0.15, 0.1, 3), 0, 1), rng.uniform(0.3, 0.6, 3), [1, 1, 1],
                   rng.uniform(0.6, 0.9, 3)) for _ in range(40)]
    warnings = label_warnings(signals(recs, CLASSES))
    assert len(warnings) == 2
    assert warnings[0].startswith("Y_crf: boxes are mostly background") and "person" in warnings[0]
    assert warnings[1].startswith("Y_crf: objects lost")
    assert not any(w.startswith("Y_ret") for w in warnings)


def test_no_warning_on_plausible_labels_and_rare_classes_are_judged_together():
    rng = np.random.default_rng(2)
    recs = [record(rng.uniform(0.45, 0.9, 2), rng.uniform(0.4, 0.9, 2), [1, 2],
                   rng.uniform(0.7, 1, 2)) for _ in range(20)]
    assert label_warnings(signals(recs, CLASSES)) == []
    # 3 bike boxes with nothing labelled: too few to judge alone, and the whole set is fine
    few = recs + [record([0.0], [0.5], [3], [0.5]) for _ in range(3)]
    assert label_warnings(signals(few, CLASSES)) == []
    # ...but once the rare classes have 5 boxes between them, they are judged together
    rarer = recs + [record([0.0], [0.5], [3], [0.5]) for _ in range(3)] \
        + [record([0.0], [0.5], [4], [0.5]) for _ in range(2)]
    warned = label_warnings(signals(rarer, CLASSES + ("boat",)))
    assert any("the rare classes (bike, boat)" in w for w in warned), warned
    # ...and 3 of 4 boxes of a set that small are judged together, and are lost
    tiny = [record([0.0], [0.5], [2], [0.5]) for _ in range(3)] + [record([0.6], [0.6], [1])]
    warned = label_warnings(signals(tiny, CLASSES))
    assert any("all classes" in w for w in warned)


def test_warning_threshold_is_where_the_docs_say():
    at = [record([MIN_FILL + 0.01] * 5, [0.5] * 5, [1] * 5, [0.9] * 5)]
    below = [record([MIN_FILL - 0.01] * 5, [0.5] * 5, [1] * 5, [0.9] * 5)]
    assert label_warnings(signals(at, CLASSES)) == []
    assert len(label_warnings(signals(below, CLASSES))) == 1


def labelled_set(folder: Path, warnings: list[str]) -> None:
    """A one-image label set whose manifest carries `warnings`."""
    label = np.zeros((8, 8), np.uint8)
    rec = image_record("0", "0.jpg", np.array([[0, 0, 4, 4]]), [1], {"Y_crf": label},
                       {"Y_crf": "Y_crf/0.png"})
    atomic_write_json(record_path(folder, "0"), rec)
    write_manifest(folder, classes=CLASSES, category_ids=[0, 1, 2, 3], split="train", root=folder,
                   variants=("Y_crf",), ids=["0"], made_by="test",
                   quality={"signals": {}, "warnings": warnings})


def test_stage3_prints_the_warnings_of_the_labels_it_trains_on(labelled_voc, tmp_path):
    """stage 3's input check prints stage 2's warnings (those of the variants it trains on)."""
    import shutil

    from engine.stage3 import open_datasets

    root = Path(shutil.copytree(labelled_voc, tmp_path / "VOC"))
    labelled_set(root / "Generation", ["Y_crf: boxes are mostly background — mean box fill "
                                       "person 12.0 %", "Y_box: never shown"])
    cfg = load_config(ROOT / "configs/demo/stage3.yml", ["DATA.ROOT", str(root),
                                                         "OUTPUT_DIR", str(tmp_path / "runs")])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        open_datasets(cfg)
    assert "WARNING: the labels in" in printed.getvalue()
    assert "person 12.0 %" in printed.getvalue() and "MODEL.USE_U0 false" in printed.getvalue()
    assert "never shown" not in printed.getvalue()
    cfg = load_config(ROOT / "configs/demo/stage3.yml", [
        "DATA.ROOT", str(root), "OUTPUT_DIR", str(tmp_path / "runs"),
        "DATA.PSEUDO_LABELS", "[Y_ret, Y_ret]"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        open_datasets(cfg)
    assert "WARNING" not in printed.getvalue()


def test_stage3_trains_on_exactly_the_images_not_excluded(labelled_voc, tmp_path):
    from engine.stage3 import open_datasets

    ids = (labelled_voc / "ImageSets/Segmentation/train.txt").read_text().split()
    listed = tmp_path / "exclude.txt"
    listed.write_text(f"# marked on the review page\n{ids[0]}\n{ids[3]}\t0 2\n\n{ids[0]}\n")
    cfg = load_config(ROOT / "configs/demo/stage3.yml", [
        "DATA.ROOT", str(labelled_voc), "OUTPUT_DIR", str(tmp_path / "runs"),
        "DATA.EXCLUDE", str(listed)])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train, _, _ = open_datasets(cfg)
    assert train.ids == [i for i in ids if i not in (ids[0], ids[3])]
    assert f"2 of {len(ids)} images of 'train' left out" in printed.getvalue()
    assert LabelSet is not None


def test_exclusion_list_errors_name_the_line():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.txt"
        path.write_text("a\nzzz\n")
        with pytest.raises(BanaError, match=r"line 2: image id 'zzz'.*another split"):
            read_exclusions(path, ["a", "b"])
        path.write_text("a\t1 x\n")
        with pytest.raises(BanaError, match="line 1: box indices"):
            read_exclusions(path, ["a"])
        with pytest.raises(BanaError, match="file not found"):
            read_exclusions(Path(d) / "none.txt", ["a"])
        path.write_text("a 1\na 3\nb\n")
        assert read_exclusions(path, ["a", "b"]) == {"a": [1, 3], "b": None}


@pytest.mark.parametrize("with_u0, without_u0, keeps", [
    (0.15, 0.38, False),   # Penn-Fudan's case: u0 claims the boxes, without it they are fine
    (0.55, 0.60, True),    # u0 is fine: the authors' recipe stands
    (0.10, 0.20, True),    # both implausible: u0 is not the cause, keep the recipe (and warn)
])
def test_u0_check_drops_u0_only_when_it_alone_makes_the_labels_implausible(
        monkeypatch, tmp_path, with_u0, without_u0, keeps):
    import engine.stage2 as stage2

    labelled = []

    def fake_generate(cfg, net, dataset, ids, device, workers, progress=True):
        labelled.append((cfg.MODEL.USE_U0, list(ids), cfg.pseudo_label_dir))
        fill = with_u0 if cfg.MODEL.USE_U0 else without_u0
        for i in ids:
            atomic_write_json(record_path(cfg.pseudo_label_dir, i), {"fill": {"Y_crf": [fill]}})
        return len(ids)

    monkeypatch.setattr(stage2, "generate", fake_generate)
    cfg = load_config(ROOT / "configs/demo/stage2.yml", ["MODEL.U0_CHECK", "3",
                                                         "DATA.ROOT", str(tmp_path)])
    dataset = type("D", (), {"ids": [f"im{k}" for k in range(10)]})()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert stage2.check_u0(cfg, None, dataset, "cpu", 1) is keeps
    assert [u0 for u0, _, _ in labelled] == [True, False]
    assert labelled[0][1] == ["im0", "im3", "im6"]  # evenly spaced
    assert all(not folder.exists() for _, _, folder in labelled)  # a temporary folder
    assert ("labelling WITHOUT u0" in printed.getvalue()) is not keeps
    assert cfg.DATA.PSEUDO_LABEL_DIR == "Generation"  # the run's own config is untouched


@pytest.mark.slow
def test_the_demo_labels_raise_no_warning(tmp_path):
    """The first half of `make demo` as it runs (its default preset: 200 synthetic images of 96
    px, stage 1 BAP 600 iterations, stage 2 with u0): labels the demo shows to be better than the
    boxes (docs/demo_results.md) must not be called implausible."""
    import demo
    from data.synthetic import make_synthetic_voc
    from engine import stage1, stage2

    p = demo.PRESETS["default"]
    data = tmp_path / "synthetic"
    make_synthetic_voc(data, n_train=p["n_train"], n_val=p["n_val"], size=p["size"], seed=0)
    common = ["DATA.ROOT", str(data), "OUTPUT_DIR", str(tmp_path / "runs")]
    it = p["stage1_iter"]
    stage1.run(load_config(ROOT / "configs/demo/stage1.yml", [
        *common, "NAME", "stage1_bap", "DATA.CROP_SIZE", str(p["crop"]), "DATA.BATCH_SIZE",
        str(p["batch"]), "SOLVER.MAX_ITER", str(it), "SOLVER.MILESTONES", f"[{it * 2 // 3}]",
        "SOLVER.CKPT_EVERY", str(it)]), devices="cpu")
    result = stage2.run(load_config(ROOT / "configs/demo/stage2.yml", [
        *common, "NAME", "stage2_bap", "MODEL.WEIGHTS", "stage1_bap/checkpoints/final.ckpt"]),
        devices="cpu", workers=p["workers"])
    assert result["warnings"] == []
    fills = LabelSet(data / "Generation").quality["signals"]["variants"]["Y_crf"]["overall"]
    assert fills["fill_mean"] >= MIN_FILL and fills["lost_share"] <= 0.10
