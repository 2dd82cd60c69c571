"""--gpu-id parsing and errors as messages."""

import pytest

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
