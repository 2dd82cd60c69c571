"""Shared fixtures: a tiny synthetic VOC tree, written once per test session."""

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory) -> Path:
    """Root of a read-only synthetic VOC tree: 12 train / 6 val images of 64 px, seed 0, the five
    default classes. Tests that damage a tree use `synthetic_voc_copy`."""
    from data.synthetic import make_synthetic_voc

    root = tmp_path_factory.mktemp("synthetic_voc") / "VOC"
    make_synthetic_voc(root, n_train=12, n_val=6, size=64, seed=0)
    return root


@pytest.fixture
def synthetic_voc_copy(synthetic_voc, tmp_path) -> Path:
    """A private copy of `synthetic_voc` that a test may modify."""
    return Path(shutil.copytree(synthetic_voc, tmp_path / "VOC"))


@pytest.fixture(scope="session")
def run_script():
    """Run a repository script as a user would (`python data/x.py ...` from the repo root)."""
    import subprocess

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    return run


@pytest.fixture(scope="session")
def stage1_dir(synthetic_voc, tmp_path_factory) -> Path:
    """OUTPUT_DIR holding a 4-iteration tiny stage-1 model (21 classes, as VOC and COCO's voc20
    map need) in stage1/checkpoints/final.ckpt. Tests add their own runs beside it by NAME."""
    from engine.stage1 import run as run_stage1
    from engine.config import load_config

    out = tmp_path_factory.mktemp("stage1_runs")
    run_stage1(load_config(REPO / "configs/demo/stage1.yml", [
        "DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR", str(out), "DATA.CROP_SIZE", "48",
        "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0", "SOLVER.MAX_ITER", "4",
        "SOLVER.MILESTONES", "[2]"]), devices="cpu")
    return out


def open_layout(name: str, root, **keys):
    """A dataset layout of data.datasets.FORMATS at `root`, its DATA keys given as keywords
    (defaults: any classes of the files, DATA.SPLIT train)."""
    from types import SimpleNamespace

    from data.datasets import FORMATS

    data_cfg = SimpleNamespace(**{"CLASSES": [], "CLASS_MAP": "all", "NUM_CLASSES": None,
                                  "SPLIT": "train", **keys})
    return FORMATS[name](data_cfg, Path(root))
