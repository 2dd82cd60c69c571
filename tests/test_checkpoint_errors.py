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
