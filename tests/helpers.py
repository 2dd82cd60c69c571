"""What the tests of the entry points' reliability share (test_config_errors, test_data_errors,
test_checkpoint_errors, test_runs, test_faults, test_cli): the argv of each script on the tiny
synthetic trees, the table of bad inputs and its check, and starting and killing a script.

The bad-input tables run every script as a user would, as a subprocess from the repository root,
and expect exit status 2, one paragraph on stderr naming the file or key and the fix, and no
traceback. Each process pays a few seconds for importing torch, so the cases of a test file run as
one batch, a few processes at a time (the `outcomes` fixture of conftest.py), and each case is
then checked as its own test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.zygote import run_python
from utils.io import atomic_write_png, read_index_png

REPO = Path(__file__).resolve().parents[1]
PARALLEL = 3
# Small enough for a 2-core CPU; 3 iterations of batch 4 visit all 12 synthetic train images.
FAST = ["DATA.CROP_SIZE", "48", "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0",
        "SOLVER.LOG_EVERY", "1"]


def write_pseudo_labels(root: Path, split: str) -> None:
    """Y_crf = GT with the void band as background, Y_ret = Y_crf with its top quarter erased:
    two plausible, different label maps for stage 3."""
    for i in (root / "ImageSets/Segmentation" / f"{split}.txt").read_text().split():
        gt = read_index_png(root / "SegmentationClassAug" / f"{i}.png")
        y = np.where(gt == 255, 0, gt).astype(np.uint8)
        atomic_write_png(root / "Generation/Y_crf" / f"{i}.png", y)
        y[: y.shape[0] // 4] = 0
        atomic_write_png(root / "Generation/Y_ret" / f"{i}.png", y)


@dataclass
class Env:
    """What a bad-input case may use: a private folder, the pristine trees, the checkpoints."""

    tmp: Path
    voc: Path
    labelled: Path
    stage1_ckpt: Path
    stage3_ckpt: Path

    def copy(self, tree: Path | None = None) -> Path:
        """A private copy of a dataset tree (default: the synthetic one) to damage."""
        return Path(shutil.copytree(tree or self.voc, self.tmp / "VOC"))

    def config(self, template: str, text: str) -> Path:
        """A config file: a shipped demo config with the keys of `text` merged in (its values
        win), written as one YAML mapping (a section written twice is itself an error)."""
        import yaml

        def merge(base, extra):
            for key, value in extra.items():
                if isinstance(value, dict) and isinstance(base.get(key), dict):
                    merge(base[key], value)
                else:
                    base[key] = value
            return base

        base = yaml.safe_load((REPO / "configs/demo" / template).read_text())
        try:
            extra = yaml.safe_load(text)
        except yaml.YAMLError:  # deliberately broken YAML: append it as it is
            return self.raw_config(template, text)
        path = self.tmp / "config.yml"
        path.write_text(yaml.safe_dump(merge(base, extra or {}), sort_keys=False))
        return path

    def raw_config(self, template: str, text: str) -> Path:
        """A config file: a shipped demo config with `text` appended verbatim."""
        path = self.tmp / "config.yml"
        path.write_text((REPO / "configs/demo" / template).read_text() + "\n" + text)
        return path

    def a_file(self) -> Path:
        """A regular file, so that any folder below it cannot be created, even by root."""
        path = self.tmp / "a_file"
        path.write_text("not a folder\n")
        return path


def stage1(env: Env, *opts: str, root=None, config="configs/demo/stage1.yml", flags=(),
           gpu="cpu"):
    return ["stage1.py", "--config-file", str(config), "--gpu-id", gpu, *flags, "--opts",
            "DATA.ROOT", str(root or env.voc), "OUTPUT_DIR", str(env.tmp / "runs"), *FAST,
            "SOLVER.MAX_ITER", "3", "SOLVER.MILESTONES", "[2]", *opts]


def stage2(env: Env, *opts: str, root=None, config="configs/demo/stage2.yml", flags=(),
           gpu="cpu", workers=1):
    return ["stage2.py", "--config-file", str(config), "--gpu-id", gpu, "--workers", str(workers),
            *flags, "--opts", "DATA.ROOT", str(root or env.voc), "OUTPUT_DIR",
            str(env.tmp / "runs"), "DATA.NUM_WORKERS", "0", "DATA.SPLIT", "val",
            "DATA.PSEUDO_LABEL_DIR", str(env.tmp / "Generation"),
            "MODEL.WEIGHTS", str(env.stage1_ckpt), *opts]


def stage3(env: Env, *opts: str, root=None, config="configs/demo/stage3.yml", flags=(),
           gpu="cpu"):
    return ["stage3.py", "--config-file", str(config), "--gpu-id", gpu, *flags, "--opts",
            "DATA.ROOT", str(root or env.labelled), "OUTPUT_DIR", str(env.tmp / "runs"), *FAST,
            "SOLVER.MAX_ITER", "3", "SOLVER.VAL_EVERY", "3", *opts]


def evaluate(env: Env, *opts: str, root=None, config="configs/demo/stage3.yml", flags=(),
             checkpoint=None, gpu="cpu", workers=0):
    return ["evaluate.py", "--config-file", str(config), "--gpu-id", gpu, "--workers", str(workers),
            "--checkpoint", str(checkpoint or env.stage3_ckpt), *flags, "--opts",
            "DATA.ROOT", str(root or env.voc), "OUTPUT_DIR", str(env.tmp / "runs"),
            "DATA.NUM_WORKERS", "0", "TEST.SCALES", "[1.0]", "TEST.FLIP", "false",
            "TEST.CRF", "false", *opts]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


class Cases(dict):
    """A table of bad inputs, name -> case. Each case damages its own copy of what it needs and
    returns (argv, what the message must name, the fix it must give); strings are compared with
    the message's line wrapping undone. A test file declares `CASES = Cases()` and
    `case = CASES.add`, decorates its cases with `@case` and parametrizes
    `test_bad_input_fails_cleanly` over `list(CASES)`."""

    def add(self, fn):
        self[fn.__name__] = fn
        return fn


def run_script(argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """`python *argv` from the repository root (through tests/zygote.py's fork server)."""
    return run_python(argv, cwd=REPO, timeout=timeout)


def error_paragraph(proc: subprocess.CompletedProcess) -> str:
    """The one `error: ...` paragraph a failed script printed, last and on a line of its own,
    with its line wrapping undone."""
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err + proc.stdout, err[-3000:]
    before, found, message = err.rpartition("error: ")
    assert found and "error: " not in before, f"expected one 'error:' message:\n{err[-3000:]}"
    assert before == "" or before.endswith("\n"), f"the message starts mid-line:\n{err[-500:]}"
    # A blank line or a progress bar's carriage return would mean something followed it.
    assert "\n\n" not in message.strip() and "\r" not in message, f"not one paragraph:\n{message}"
    return " ".join(message.split())


def assert_fails_cleanly(proc, argv, names, fix) -> None:
    """One outcome of the `outcomes` fixture: the script failed with one message that names
    every one of `names` and gives `fix`."""
    message = error_paragraph(proc)
    for where in names:
        assert where in message, f"{argv}\nthe message does not name {where!r}:\n{message}"
    assert fix in message, f"{argv}\nthe message does not give the fix {fix!r}:\n{message}"


def start(argv: list[str], log: Path) -> subprocess.Popen:
    """Start a script in its own process group (so that it can be killed with its workers); its
    output goes to `log`, since an unread pipe would block it. SIGINT is restored to its
    default in the child: a suite started as a background job of a non-interactive shell runs
    with SIGINT ignored, which children would otherwise inherit."""
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def kill_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 240) -> None:
    """SIGKILL `proc` and its children as soon as `ready()` holds; it must still be running."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, (f"the run ended (exit {proc.returncode}) before it was "
                                         f"killed:\n{log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, "timed out waiting to kill the run"
            time.sleep(0.02)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stage2_argv(artifacts, out: Path) -> list[str]:
    return ["stage2.py", "--config-file", "configs/demo/stage2.yml", "--gpu-id", "cpu",
            "--workers", "1", "--opts", "DATA.ROOT", str(artifacts["voc"]), "OUTPUT_DIR",
            str(out), "DATA.NUM_WORKERS", "0", "DATA.SPLIT", "train", "DATA.PSEUDO_LABEL_DIR",
            str(out / "Generation"), "MODEL.WEIGHTS", str(artifacts["stage1"])]


def read_labels(folder: Path) -> dict[str, np.ndarray]:
    """Every label PNG under Y_crf/, Y_ret/ and Y_box/, decoded (a half-written one would fail
    here)."""
    return {f"{p.parent.name}/{p.name}": read_index_png(p)
            for p in sorted(folder.glob("Y_*/*.png"))}


def temporary_files(folder: Path) -> list[Path]:
    """What `utils.io`'s atomic writes leave behind only when killed mid-write."""
    return list(folder.rglob(".*.tmp"))


def assert_same_labels(labels: dict, expected: dict) -> None:
    assert labels.keys() == expected.keys()
    for name, label in labels.items():
        np.testing.assert_array_equal(label, expected[name], err_msg=name)
