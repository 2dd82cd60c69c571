"""The weights and checkpoints a stage is given: missing, garbage, of another stage or backbone,
or given under a key that stage does not read. Each must stop with one message naming the file
or key and the stage that makes the right one."""

from __future__ import annotations

import pytest

from helpers import Cases, assert_fails_cleanly, evaluate, stage1, stage2, stage3

CASES = Cases()
case = CASES.add


@case
def missing_init_weights(env):
    path = env.tmp / "vgg_caffe.pth"
    return stage1(env, "MODEL.INIT", str(path)), [str(path)], "MODEL.INIT"


@case
def missing_stage1_checkpoint(env):
    path = env.tmp / "stage1/final.ckpt"
    return stage2(env, "MODEL.WEIGHTS", str(path)), [str(path)], "python stage1.py"


@case
def missing_stage3_checkpoint(env):
    path = env.tmp / "best.ckpt"
    return evaluate(env, checkpoint=path), [str(path)], "python stage3.py"


@case
def stage3_checkpoint_for_stage2(env):
    return (stage2(env, "MODEL.WEIGHTS", str(env.stage3_ckpt)),
            [str(env.stage3_ckpt), "stage 3"], "python stage1.py")


@case
def other_backbone_for_stage2(env):
    return (stage2(env, "MODEL.BACKBONE", "vgg16"), [str(env.stage1_ckpt), "'tiny'"],
            "MODEL.BACKBONE tiny")


@case
def stage1_checkpoint_for_evaluate(env):
    return (evaluate(env, checkpoint=env.stage1_ckpt), [str(env.stage1_ckpt), "stage 1"],
            "python stage3.py")


@case
def other_backbone_for_evaluate(env):
    return evaluate(env, "MODEL.BACKBONE", "resnet101"), ["MODEL.BACKBONE", "'tiny'"], "config"


@case
def garbage_checkpoint(env):
    path = env.tmp / "final.ckpt"
    path.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    return stage2(env, "MODEL.WEIGHTS", str(path)), [str(path)], "python stage1.py"


@case
def stage1_weights_given_to_stage3(env):
    return (stage3(env, "MODEL.WEIGHTS", str(env.stage1_ckpt)), ["MODEL.WEIGHTS",
            "stage 3 does not read it"], "set MODEL.INIT to its path")


@case
def weights_given_to_stage1(env):
    return (stage1(env, "MODEL.WEIGHTS", str(env.stage1_ckpt)), ["MODEL.WEIGHTS",
            "stage 1 does not read it"], "set MODEL.INIT to its path")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_cleanly(outcomes, name):
    assert_fails_cleanly(*outcomes[name])


# --- checkpoints a user names are never unpickled beyond tensors and plain values --------------

class _RunsCode:
    """Unpickled by an unrestricted loader, this calls os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def code_checkpoint(path, marker, like):
    """A checkpoint that is `like` (a real one of this project) plus an entry whose unpickling
    runs `touch marker`: read with torch's full unpickler, it creates `marker`."""
    import torch

    raw = torch.load(like, map_location="cpu", weights_only=True)
    raw["payload"] = _RunsCode(f"touch '{marker}'")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(raw, path)
    return path


def _code_cases(artifacts, tmp):
    """name -> (argv, the checkpoint that runs code, its marker, what the message must name)."""
    from helpers import Env

    cases = {}

    def add(name, make_argv, like="stage3", where=None):
        env = Env(tmp / name, artifacts["voc"], artifacts["labelled"], artifacts["stage1"],
                  artifacts["stage3"])
        env.tmp.mkdir()
        marker = env.tmp / "MARKER"
        path = code_checkpoint(where(env) if where else env.tmp / "model.ckpt", marker,
                               artifacts[like])
        cases[name] = (make_argv(env, path), path, marker)

    add("predict", lambda env, p: [
        "predict.py", "--config-file", "configs/demo/stage3.yml", "--gpu-id", "cpu",
        "--input", str(next(iter(sorted((env.voc / "JPEGImages").glob("*.jpg"))))),
        "--output", str(env.tmp / "pred"), "--checkpoint", str(p), "--opts", "OUTPUT_DIR",
        str(env.tmp / "runs")])
    add("evaluate", lambda env, p: evaluate(env, checkpoint=p))
    add("stage2_weights", lambda env, p: stage2(env, "MODEL.WEIGHTS", str(p)), like="stage1")
    add("stage3_weights", lambda env, p: stage3(env, "MODEL.WEIGHTS", str(p)))
    add("stage1_resume", lambda env, p: stage1(env, flags=["--resume"]), like="stage1",
        where=lambda env: env.tmp / "runs/stage1/checkpoints/last.ckpt")
    add("stage3_resume", lambda env, p: stage3(env, flags=["--resume"]),
        where=lambda env: env.tmp / "runs/stage3/checkpoints/last.ckpt")
    add("fresh_run_refusal", lambda env, p: stage3(env),
        where=lambda env: env.tmp / "runs/stage3/checkpoints/final.ckpt")
    return cases


@pytest.fixture(scope="module")
def code_outcomes(artifacts, tmp_path_factory):
    from concurrent.futures import ThreadPoolExecutor

    from helpers import PARALLEL, run_script

    cases = _code_cases(artifacts, tmp_path_factory.mktemp("code"))
    with ThreadPoolExecutor(PARALLEL) as pool:
        procs = dict(zip(cases, pool.map(lambda c: run_script(c[0]), cases.values())))
    return {name: (procs[name], *cases[name][1:]) for name in cases}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["predict", "evaluate", "stage2_weights", "stage3_weights",
                                  "stage1_resume", "stage3_resume"])
def test_checkpoint_that_runs_code_is_refused(code_outcomes, name):
    """Every script that reads a checkpoint a user names (--checkpoint, MODEL.WEIGHTS, the run
    folder's last.ckpt for --resume) refuses one whose pickle would run a command, and the
    command never runs."""
    from helpers import error_paragraph

    proc, path, marker = code_outcomes[name]
    message = error_paragraph(proc)
    assert not marker.exists(), f"{name}: the checkpoint's payload ran"
    assert str(path) in message and "run code" in message, message


@pytest.mark.slow
def test_fresh_run_refusal_reads_no_code(code_outcomes):
    """A fresh run in a folder holding checkpoints is refused with a list of them and their
    iterations; a checkpoint whose pickle runs code is listed as unreadable, and runs nothing."""
    from helpers import error_paragraph

    proc, path, marker = code_outcomes["fresh_run_refusal"]
    message = error_paragraph(proc)
    assert not marker.exists(), "the refusal message ran the checkpoint's payload"
    assert "final.ckpt (unreadable)" in message and "--resume" in message, message


def test_segmenter_refuses_checkpoint_that_runs_code(artifacts, tmp_path):
    from engine.predict import Segmenter
    from utils.errors import BanaError

    marker = tmp_path / "MARKER"
    path = code_checkpoint(tmp_path / "model.ckpt", marker, artifacts["stage3"])
    with pytest.raises(BanaError, match="run code"):
        Segmenter(path)
    assert not marker.exists()


def test_metadata_read_refuses_checkpoint_that_runs_code(artifacts, tmp_path):
    """The read of a checkpoint's stage and iterations alone (the refusal message, MODEL.WEIGHTS
    of a training stage) reads no weights and runs nothing."""
    from models.zoo import read_checkpoint_meta
    from utils.errors import BanaError

    assert read_checkpoint_meta(artifacts["stage3"]) == (3, 2)
    marker = tmp_path / "MARKER"
    path = code_checkpoint(tmp_path / "model.ckpt", marker, artifacts["stage1"])
    with pytest.raises(BanaError, match="run code"):
        read_checkpoint_meta(path)
    assert not marker.exists()


# --- a checkpoint's own entry is checked: one line per defect, nothing of it given as advice ----

def _damaged(artifacts, tmp_path, damage, like="stage3"):
    import torch

    raw = torch.load(artifacts[like], map_location="cpu", weights_only=True)
    damage(raw)
    path = tmp_path / "damaged.ckpt"
    torch.save(raw, path)
    return path


def _refusal(path, **kwargs) -> str:
    from models.zoo import read_checkpoint
    from utils.errors import BanaError

    with pytest.raises(BanaError) as info:
        read_checkpoint(path, **kwargs)
    return str(info.value)


def test_damaged_entry_names_every_defect(artifacts, tmp_path):
    """Missing keys and wrong types were KeyError / TypeError tracebacks; each is now a line of
    one message naming the entry and what was expected."""
    def damage(raw):
        model = raw["bana"]["model"]
        del model["backbone"]
        model["num_classes"] = "21"
        model["fc6_dilation"] = -3
        raw["global_step"] = "many"

    message = _refusal(_damaged(artifacts, tmp_path, damage), stage=3)
    assert "4 defects" in message, message
    for line in ("bana.model.backbone is missing", "bana.model.num_classes is '21' (a str)",
                 "bana.model.fc6_dilation is -3", "global_step is 'many'"):
        assert line in message, message


def test_string_class_count_is_not_echoed_as_advice(artifacts, tmp_path):
    """A class count stored as the string '21' compared unequal to DATA.NUM_CLASSES 21 and the
    message advised "Set DATA.NUM_CLASSES 21"; nothing a refused file holds is given as a
    setting to use."""
    from engine.inference import load_model
    from engine.config import load_config
    from utils.errors import BanaError

    path = _damaged(artifacts, tmp_path,
                    lambda raw: raw["bana"]["model"].update(num_classes="21"))
    cfg = load_config("configs/demo/stage3.yml", ["DATA.NUM_CLASSES", "21"])
    with pytest.raises(BanaError) as info:
        load_model(path, cfg)
    message = str(info.value)
    assert "Set DATA.NUM_CLASSES" not in message and "expected an integer" in message, message


def test_non_finite_weights_are_refused(artifacts, tmp_path):
    """NaN weights were used silently (stage 2 then wrote all-background labels)."""
    def damage(raw):
        raw["state_dict"]["net.classifier.weight"][0, 0] = float("nan")

    message = _refusal(_damaged(artifacts, tmp_path, damage, like="stage1"), stage=1)
    assert "NaN or infinite" in message and "net.classifier.weight" in message, message


def test_class_count_must_match_the_classifier(artifacts, tmp_path):
    """A checkpoint naming 2 classes for a classifier of 21 outputs was accepted."""
    def damage(raw):
        raw["bana"]["model"].update(num_classes=2, classes=["background", "cat"])

    message = _refusal(_damaged(artifacts, tmp_path, damage), stage=3)
    assert "num_classes is 2, but the classifier" in message and "21 outputs" in message, message
    names = _refusal(_damaged(artifacts, tmp_path,
                              lambda raw: raw["bana"]["model"].update(classes=["a", "b"])))
    assert "names 2 classes, but bana.model.num_classes is 21" in names, names


def test_every_checkpoint_the_stages_write_passes_the_checks(artifacts):
    """The checks refuse nothing this project writes (all of them load weights-only)."""
    from models.zoo import check_entry, read_checkpoint
    import torch

    for stage in ("stage1", "stage3"):
        for path in sorted(artifacts[stage].parent.glob("*.ckpt")):
            assert check_entry(torch.load(path, weights_only=True, map_location="cpu")) == []
            read_checkpoint(path)
