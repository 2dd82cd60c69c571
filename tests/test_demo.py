"""The end-to-end demo at its smallest size: every artefact appears, every number is a percentage."""

import json

import pytest

import demo


@pytest.mark.slow
def test_demo_pipeline_produces_every_artefact(tmp_path):
    out, data = tmp_path / "runs", tmp_path / "data"
    results = demo.main(["--preset", "test", "--out", str(out), "--data", str(data)])

    pseudo = results["pseudo_labels"]
    assert list(pseudo) == ["box baseline", "GAP Y_crf", "BAP Y_crf w/o u0", "BAP Y_crf",
                            "BAP Y_ret"]
    assert set(results["stage3"]) == {"ce_crf", "nal", "untrained (random init)"}
    numbers = list(pseudo.values()) + [v for m in results["stage3"].values() for v in m.values()]
    assert numbers and all(0 <= v <= 100 for v in numbers)
    for loss in ("ce_crf", "nal"):
        assert set(results["stage3"][loss]) == {"single", "multiscale", "single+crf",
                                                "multiscale+crf"}

    for name in ("stage1_bap", "stage1_gap", "stage3_ce_crf", "stage3_nal"):
        assert (out / name / "checkpoints" / "final.ckpt").is_file()
    for name in ("bap", "bap_no_u0", "gap"):
        assert (out / f"stage2_{name}" / "quality.json").is_file()
        ids = (data / "ImageSets/Segmentation/train.txt").read_text().split()
        for kind in ("Y_crf", "Y_ret"):
            assert all((data / "Generation" / name / kind / f"{i}.png").is_file() for i in ids)
    assert (out / "demo.png").stat().st_size > 0
    table = (out / "demo_results.md").read_text()
    assert "BAP Y_crf" in table and "nal" in table
    assert json.loads((out / "demo_results.json").read_text())["pseudo_labels"] == pseudo
