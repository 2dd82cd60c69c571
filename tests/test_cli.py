"""--gpu-id parsing and errors as messages (and --debug, which shows the traceback instead)."""

import pytest

from helpers import run_script
from utils.cli import guarded
from utils.devices import resolve_devices
from utils.errors import BanaError


@pytest.mark.parametrize("spec, cuda, expected", [
    ("cpu", 0, ("cpu", 1)),
    ("cpu:2", 0, ("cpu", 2)),
    ("0", 0, ("cpu", 1)),
    ("0", 2, ("gpu", [0])),
    ("0,1", 2, ("gpu", [0, 1])),
    (" 1 ", 2, ("gpu", [1])),
])
def test_device_specs(spec, cuda, expected):
    d = resolve_devices(spec, cuda_count=cuda)
    assert (d.accelerator, d.devices) == expected


def test_gpu_zero_without_cuda_says_it_runs_on_cpu():
    assert "CUDA is not available" in resolve_devices("0", cuda_count=0).note


@pytest.mark.parametrize("spec, cuda, pattern", [
    ("3", 0, "no CUDA GPU"),
    ("0,1", 0, "no CUDA GPU"),
    ("3", 2, "GPU 3 does not exist; this machine has 2"),
    ("a", 1, "expected GPU ids"),
    ("0,0", 2, "distinct"),
    ("cpu:0", 0, "cpu:N"),
    ("cpu:x", 0, "cpu:N"),
])
def test_bad_device_specs(spec, cuda, pattern):
    with pytest.raises(BanaError, match=pattern):
        resolve_devices(spec, cuda_count=cuda)


def test_guarded_turns_user_errors_into_exit_2(capsys):
    def fail():
        raise BanaError("file x is missing; run y")

    with pytest.raises(SystemExit) as info:
        guarded(fail, debug=False)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: file x is missing; run y" in err and "Traceback" not in err


def test_guarded_debug_reraises():
    def fail():
        raise BanaError("boom")

    with pytest.raises(BanaError):
        guarded(fail, debug=True)


def test_debug_shows_the_traceback():
    argv = ["stage1.py", "--config-file", "configs/demo/stage1.yml", "--gpu-id", "cpu", "--debug",
            "--opts", "SOLVER.MAX_ITER", "ten"]
    proc = run_script(argv)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "BanaError: --opts SOLVER.MAX_ITER" in proc.stderr


def test_a_message_raised_in_a_loader_worker_loses_the_worker_traceback():
    from torch._utils import ExceptionWrapper

    from utils.cli import error_message

    try:
        raise BanaError("image x.jpg is corrupt: re-create it.")
    except BanaError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(BanaError) as info:
        wrapped.reraise()  # what the DataLoader does in the main process
    assert "Traceback" in str(info.value)
    assert error_message(info.value) == "image x.jpg is corrupt: re-create it."
    assert error_message(BanaError("plain")) == "plain"


def test_os_errors_on_output_paths_become_messages_and_others_stay_bugs(tmp_path):
    from utils.cli import os_error_message

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError) as info:
        (blocker / "runs/stage1").mkdir(parents=True, exist_ok=True)
    assert f"{blocker} is a file, not a folder" in os_error_message(info.value)
    with pytest.raises(OSError) as info:
        blocker.mkdir(parents=True, exist_ok=True)
    assert "a file of that name exists" in os_error_message(info.value)
    with pytest.raises(OSError) as info:
        open(tmp_path / "missing.txt")
    assert os_error_message(info.value) is None
