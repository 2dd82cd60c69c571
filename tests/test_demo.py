"""The end-to-end demo at its smallest size: every artefact appears, every number is a percentage."""

import json
from types import SimpleNamespace

import pytest

import demo
from tests.zygote import run_python


def through_the_fork_server(cmd, cwd):
    """demo.py's `subprocess.run([python, script, ...], cwd=...)`, each step still its own
    process, without importing torch again for each (tests/zygote.py)."""
    result = run_python(cmd[1:], cwd=cwd, timeout=600)
    if result.returncode:
        print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
    return result


@pytest.mark.slow
def test_demo_pipeline_produces_every_artefact(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "subprocess", SimpleNamespace(run=through_the_fork_server))
    out, data = tmp_path / "runs", tmp_path / "data"
    results = demo.main(["--preset", "test", "--out", str(out), "--data", str(data)])

    pseudo = results["pseudo_labels"]
    assert list(pseudo) == ["box baseline", "GAP Y_crf", "BAP Y_crf w/o u0", "BAP Y_crf",
                            "BAP Y_ret", "BAP Y_crf & Y_ret (disagreement = background)"]
    rows = [row for row, _, _ in demo.STAGE3_RUNS.values()]
    assert list(results["stage3"]) == rows + ["untrained (random init)"]
    numbers = list(pseudo.values()) + [v for m in results["stage3"].values() for v in m.values()]
    assert numbers and all(0 <= v <= 100 for v in numbers)
    for row in rows:
        assert set(results["stage3"][row]) == {"single", "multiscale", "single+crf",
                                               "multiscale+crf"}

    for name in ("stage1_bap", "stage1_gap", *(f"stage3_{n}" for n in demo.STAGE3_RUNS)):
        assert (out / name / "checkpoints" / "final.ckpt").is_file()
    # Stage 3 started from the stage-1 BAP backbone.
    saved = (out / "stage3_nal" / "config.yaml").read_text()
    assert str(out / "stage1_bap" / "checkpoints" / "final.ckpt") in saved
    ids = (data / "ImageSets/Segmentation/train.txt").read_text().split()
    for name in ("bap", "bap_no_u0", "gap"):
        assert (out / f"stage2_{name}" / "quality.json").is_file()
        for kind in ("Y_crf", "Y_ret", "Y_box"):
            assert all((data / "Generation" / name / kind / f"{i}.png").is_file() for i in ids)
    assert (out / "demo.png").stat().st_size > 0 and (out / "exports.png").stat().st_size > 0
    exported = data / "Generation/bap/exports"
    assert (exported / "coco/instances_train_Y_crf.json").is_file()
    assert (exported / "yolo_seg/data.yaml").is_file()
    assert len(list((exported / "voc/SegmentationObject").glob("*.png"))) == len(ids)
    assert set(results["label_warnings"]) == {"bap", "bap_no_u0", "gap"}
    assert (data / "Generation/bap/review/index.html").is_file()
    table = (out / "demo_results.md").read_text()
    assert "BAP Y_crf" in table and "NAL" in table and "GT masks" in table
    assert json.loads((out / "demo_results.json").read_text())["pseudo_labels"] == pseudo
