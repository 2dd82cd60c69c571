"""Config and command-line input: unknown keys, wrong types and impossible values in YAML or
--opts, broken or empty YAML, a missing config file, GPU ids and worker counts, and NAME or label
folders that would leave their place. Each must stop with one message naming the key or file and
the fix."""

from __future__ import annotations

import pytest

from engine.config import load_config
from helpers import REPO, Cases, assert_fails_cleanly, evaluate, stage1, stage2, stage3

CASES = Cases()
case = CASES.add


@case
def unknown_key_in_yaml(env):
    config = env.config("stage1.yml", "SOLVER:\n  MAX_ITERS: 10\n")
    return stage1(env, config=config), [str(config), "'SOLVER.MAX_ITERS'"], "SOLVER.MAX_ITER,"


@case
def unknown_key_in_opts(env):
    return stage3(env, "MODEL.LOS", "nal"), ["'MODEL.LOS'"], "configs/README.md"


@case
def wrong_type_in_opts(env):
    return stage1(env, "SOLVER.MAX_ITER", "ten"), ["SOLVER.MAX_ITER"], "expected an integer"


@case
def wrong_type_in_yaml(env):
    config = env.config("stage2.yml", "MODEL:\n  DCRF: 4\n")
    return stage2(env, config=config), [str(config), "MODEL.DCRF"], "expected a list of float"


@case
def impossible_value(env):
    return stage3(env, "SOLVER.LR", "-0.1"), ["SOLVER.LR"], "> 0"


@case
def invalid_yaml(env):
    config = env.config("stage2.yml", "DATA: [unclosed\n")
    return stage2(env, config=config), [str(config)], "not valid YAML"


@case
def missing_config_file(env):
    config = env.tmp / "nowhere.yml"
    return evaluate(env, config=config), [str(config)], "configs/demo/stage1.yml"


@case
def gpu_3_for_stage1(env):
    return stage1(env, gpu="3"), ["--gpu-id 3"], "--gpu-id cpu"


@case
def gpu_3_for_evaluate(env):
    return evaluate(env, gpu="3"), ["--gpu-id 3"], "--gpu-id cpu"


# --- issue 16, class 4: paths that leave their place --------------------------------------------

@case
def name_dot_dot_for_stage1(env):
    return stage1(env, "NAME", ".."), ["NAME = '..'"], "plain folder name"


@case
def name_with_a_path_for_stage3(env):
    return stage3(env, "NAME", "a/../../escape"), ["NAME = 'a/../../escape'"], "plain folder name"


@case
def name_dot_for_evaluate(env):
    return evaluate(env, "NAME", "."), ["NAME = '.'"], "plain folder name"


@case
def label_dir_leaving_the_root_for_stage2(env):
    argv = stage2(env)
    argv[argv.index("DATA.PSEUDO_LABEL_DIR") + 1] = "../outside"
    return argv, ["DATA.PSEUDO_LABEL_DIR = '../outside'"], "an absolute path"


# --- issue 16, class 5: garbage that used to be accepted without a word -------------------------

@case
def section_written_twice_in_yaml(env):
    config = env.raw_config("stage1.yml", "SOLVER:\n  MAX_ITER: 5\n")
    return stage1(env, config=config), [str(config), "'SOLVER' is written twice"], "Merge them"


@case
def empty_yaml_file(env):
    config = env.tmp / "empty.yml"
    config.write_text("# nothing here\n")
    return stage1(env, config=config), [str(config), "is empty"], "configs/stage1.yml"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_cleanly(outcomes, name):
    assert_fails_cleanly(*outcomes[name])


@pytest.mark.parametrize("opts, key, expected", [
    (["SOLVER.LR", "1e-3"], "SOLVER.LR", 1e-3), (["SOLVER.LR", "5E-4"], "SOLVER.LR", 5e-4),
    (["NAME", "2024"], "NAME", "2024"), (["NAME", "1.10"], "NAME", "1.10"),
    (["SEED", "7"], "SEED", 7)])
def test_opts_are_read_as_a_person_means_them(opts, key, expected):
    cfg = load_config(REPO / "configs/demo/stage1.yml", opts)
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected and type(value) is type(expected)


def test_no_crf_workers_for_stage2_is_a_usage_error():
    """--workers 0 is refused by the argument parser, as any malformed argument is: its usage
    line and the reason, exit status 2, nothing run."""
    from tests.helpers import run_script

    proc = run_script(["stage2.py", "--config-file", "configs/demo/stage2.yml", "--workers", "0"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "argument --workers: expected an integer >= 1, got 0" in proc.stderr
