"""Every stage checks its inputs before the expensive part and names every problem at once."""

import os

import pytest

from engine.preflight import Problems, require_writable
from tests.conftest import REPO
from tests.zygote import run_python
from utils.errors import BanaError


def _run(script, config, tmp_path, *opts):
    """The script as a user runs it, with an empty TORCH_HOME: a download attempt would show."""
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch_home"))
    return run_python([script, "--config-file", config, "--gpu-id", "cpu", "--opts",
                       "OUTPUT_DIR", str(tmp_path / "runs"), *opts], cwd=REPO, timeout=120,
                      env=env)


@pytest.mark.parametrize("script,config", [
    ("stage1.py", "configs/stage1.yml"), ("stage2.py", "configs/stage2.yml"),
    ("stage3.py", "configs/stage3_vgg.yml"), ("stage3.py", "configs/stage3_res.yml"),
    ("evaluate.py", "configs/stage3_vgg.yml")])
def test_a_wrong_data_root_is_named_before_anything_is_built_or_downloaded(script, config,
                                                                          tmp_path):
    proc = _run(script, config, tmp_path, "DATA.ROOT", "/nowhere")
    assert proc.returncode == 2, proc.stderr
    assert "/nowhere" in proc.stderr and "DATA.ROOT" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "torch_home").exists()  # no weights were fetched
    assert not (tmp_path / "runs").exists()  # nothing was written


def test_a_wrong_data_root_and_a_missing_stage1_model_are_reported_together(tmp_path):
    proc = _run("stage2.py", "configs/stage2.yml", tmp_path, "DATA.ROOT", "/nowhere")
    err = " ".join(proc.stderr.split())
    assert "2 problems" in err
    assert "DATA.ROOT /nowhere" in err and "stage1/checkpoints/final.ckpt" in err


def test_stage3_names_missing_labels_init_and_gt_ids_at_once(synthetic_voc, tmp_path):
    proc = _run("stage3.py", "configs/demo/stage3.yml", tmp_path, "DATA.ROOT",
                   str(synthetic_voc), "DATA.PSEUDO_LABEL_DIR", "NoLabels", "MODEL.INIT",
                   str(tmp_path / "missing.pth"), "DATA.GT_IDS", str(tmp_path / "ids.txt"))
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "3 problems" in err, err
    assert "NoLabels" in err and "missing.pth" in err and "ids.txt" in err


def test_problems_lists_each_message_once_and_passes_a_single_one_through():
    problems = Problems("stage 9")
    problems.check(lambda: None)
    problems.raise_if_any()  # nothing recorded: no error

    def fail(msg):
        raise BanaError(msg)

    assert problems.passes(lambda: fail("first")) is False
    problems.check(lambda: fail("first"))
    with pytest.raises(BanaError, match="^first$"):
        problems.raise_if_any()
    problems.check(lambda: fail("second"))
    with pytest.raises(BanaError, match=r"(?s)stage 9 cannot start; 2 problems.*1\. first.*2\. second"):
        problems.raise_if_any()


def test_an_output_folder_under_a_file_is_a_problem(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BanaError, match="is a file"):
        require_writable(tmp_path / "file" / "runs", "OUTPUT_DIR")
    require_writable(tmp_path / "a" / "b", "OUTPUT_DIR")
    assert not (tmp_path / "a").exists()
