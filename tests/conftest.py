"""Shared fixtures: a tiny synthetic VOC tree, written once per test session, its labelled copy
and tiny checkpoints, and the batch runner of the bad-input tables (see helpers.py)."""

from __future__ import annotations

import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.register_assert_rewrite("helpers")

from helpers import (FAST, PARALLEL, Env, read_labels, run_script as run_argv,  # noqa: E402
                     stage2_argv, write_pseudo_labels)

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

    from tests.zygote import run_python

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        return run_python([script, *args], cwd=REPO, timeout=120)

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


@pytest.fixture(scope="session")
def labelled_voc(synthetic_voc, tmp_path_factory) -> Path:
    """The synthetic tree plus pseudo labels of its train split, for stage 3: Y_crf = GT with the
    void band as background, Y_ret = Y_crf with its top quarter erased. Read-only."""
    root = Path(shutil.copytree(synthetic_voc, tmp_path_factory.mktemp("labelled") / "VOC"))
    write_pseudo_labels(root, "train")
    return root


@pytest.fixture(scope="session")
def artifacts(synthetic_voc, labelled_voc, tmp_path_factory):
    """The trees and a 2-iteration stage-1 and stage-3 checkpoint. Read-only."""
    from engine.config import load_config
    from engine.stage1 import run as run_stage1
    from engine.stage3 import run as run_stage3

    out = tmp_path_factory.mktemp("checkpoints")
    run_stage1(load_config(REPO / "configs/demo/stage1.yml", [
        "DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR", str(out), *FAST,
        "SOLVER.MAX_ITER", "2", "SOLVER.MILESTONES", "[1]"]), devices="cpu")
    run_stage3(load_config(REPO / "configs/demo/stage3.yml", [
        "DATA.ROOT", str(labelled_voc), "OUTPUT_DIR", str(out), *FAST,
        "SOLVER.MAX_ITER", "2", "SOLVER.VAL_EVERY", "2"]), devices="cpu")
    return {"voc": synthetic_voc, "labelled": labelled_voc,
            "stage1": out / "stage1/checkpoints/final.ckpt",
            "stage3": out / "stage3/checkpoints/final.ckpt"}


@pytest.fixture(scope="module")
def outcomes(request, artifacts, tmp_path_factory):
    """Set up and run the selected cases of the requesting test file's table (its `CASES`),
    PARALLEL processes at a time; name -> outcome."""
    selected = [item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_bad_input_fails_cleanly"
                and item.module is request.module]
    jobs = {}
    for name in selected:
        env = Env(tmp_path_factory.mktemp(name), artifacts["voc"], artifacts["labelled"],
                  artifacts["stage1"], artifacts["stage3"])
        jobs[name] = request.module.CASES[name](env)
    with ThreadPoolExecutor(PARALLEL) as pool:
        procs = dict(zip(jobs, pool.map(lambda job: run_argv(job[0]), jobs.values())))
    return {name: (procs[name], *jobs[name]) for name in jobs}


@pytest.fixture(scope="session")
def clean_labels(artifacts, tmp_path_factory) -> dict[str, np.ndarray]:
    """Stage 2's labels of the 12 train images from one uninterrupted run."""
    out = tmp_path_factory.mktemp("stage2_clean")
    proc = run_argv(stage2_argv(artifacts, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = read_labels(out / "Generation")
    assert len(labels) == 3 * 12
    return labels
