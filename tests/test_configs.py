"""Config schema: every shipped YAML loads; bad keys, types and values fail with the key named."""

from pathlib import Path

import pytest

from engine.config import Config, load_config, parse_opts, schema_markdown
from utils.errors import BanaError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").rglob("*.yml"))


def test_there_are_shipped_configs():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in SHIPPED}
    assert {"stage1.yml", "stage2.yml", "stage3_vgg.yml", "stage3_res.yml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_voc_configs_carry_the_spec_values():
    s1 = load_config(ROOT / "configs/stage1.yml")
    assert (s1.MODEL.POOLING, s1.MODEL.GRID_SIZE, s1.MODEL.ROI_SIZE) == ("bap", 4, [2, 2])
    assert (s1.SOLVER.LR, s1.SOLVER.MAX_ITER, s1.SOLVER.MILESTONES, s1.DATA.BATCH_SIZE) == \
        (1e-3, 8000, [5000], 20)
    s2 = load_config(ROOT / "configs/stage2.yml")
    assert (s2.MODEL.GRID_SIZE, s2.MODEL.BG_THRESHOLD, s2.MODEL.DCRF) == (1, 0.99, [4, 55, 3, 3, 3])
    vgg = load_config(ROOT / "configs/stage3_vgg.yml")
    assert (vgg.MODEL.FC6_DILATION, vgg.MODEL.TEMPERATURE, vgg.MODEL.GAMMA, vgg.MODEL.LAMBDA) == \
        (12, 20.0, 7.0, 0.1)
    assert (vgg.SOLVER.MAX_ITER, vgg.SOLVER.SCHEDULER, vgg.MODEL.DCRF) == \
        (23805, "poly", [4, 121, 5, 3, 3])
    res = load_config(ROOT / "configs/stage3_res.yml")
    assert (res.MODEL.BACKBONE, res.SOLVER.LR, res.DATA.BATCH_SIZE, res.SOLVER.MAX_ITER,
            res.MODEL.DCRF) == ("resnet101", 2.5e-4, 10, 20000, [4, 67, 3, 3, 1])


def test_opts_override_dotted_keys_with_yaml_values():
    cfg = load_config(ROOT / "configs/stage1.yml",
                      ["DATA.ROOT", "/data/VOC2012", "OUTPUT_DIR", "runs/x", "SOLVER.MAX_ITER",
                       "100", "MODEL.ROI_SIZE", "[3, 3]", "DATA.FLIP", "false",
                       "SOLVER.MILESTONES", "[50]"])
    assert cfg.DATA.ROOT == "/data/VOC2012" and cfg.OUTPUT_DIR == "runs/x"
    assert cfg.SOLVER.MAX_ITER == 100 and cfg.MODEL.ROI_SIZE == [3, 3] and cfg.DATA.FLIP is False


def test_int_is_accepted_for_float_keys_but_not_the_reverse():
    assert load_config(None, ["SOLVER.LR", "1"]).SOLVER.LR == 1.0
    with pytest.raises(BanaError, match="SOLVER.MAX_ITER.*integer"):
        load_config(None, ["SOLVER.MAX_ITER", "1.5"])


@pytest.mark.parametrize("yaml_text, pattern", [
    ("DATA:\n  ROOTS: x\n", r"unknown config key 'DATA.ROOTS'.*DATA.ROOT"),
    ("FOO: 1\n", r"unknown config key 'FOO'"),
    ("SOLVER:\n  MAX_ITER: many\n", r"SOLVER.MAX_ITER: expected an integer, found 'many'"),
    ("MODEL:\n  POOLING: max\n", r"MODEL.POOLING = 'max' is not allowed; choose one of bap, gap"),
    ("MODEL:\n  LOSS: focal\n", r"MODEL.LOSS.*nal, ce_crf, ce_ret, baseline, er, bs"),
    ("DATA:\n  BATCH_SIZE: 0\n", r"DATA.BATCH_SIZE = 0 is impossible; it must be > 0"),
    ("MODEL:\n  BG_THRESHOLD: 1.5\n", r"MODEL.BG_THRESHOLD.*in \[0, 1\]"),
    ("MODEL:\n  DCRF: [4, 55, 3]\n", r"MODEL.DCRF.*five numbers"),
    ("SOLVER:\n  MAX_ITER: 100\n  MILESTONES: [200]\n", r"MILESTONES.*below SOLVER.MAX_ITER"),
    ("DATA: 3\n", r"'DATA' is a section"),
    ("- a\n- b\n", r"expected a mapping"),
    ("MODEL:\n  POOLING: [bap\n", r"not valid YAML"),
])
def test_bad_yaml_fails_naming_file_and_key(tmp_path, yaml_text, pattern):
    path = tmp_path / "bad.yml"
    path.write_text(yaml_text)
    with pytest.raises(BanaError, match=pattern) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_bad_opts_fail_naming_the_key():
    with pytest.raises(BanaError, match=r"--opts SOLVER.MAXITER: unknown config key"):
        load_config(None, ["SOLVER.MAXITER", "3"])
    with pytest.raises(BanaError, match="odd number"):
        parse_opts(["SOLVER.MAX_ITER"])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(BanaError, match="does not exist"):
        load_config(tmp_path / "nope.yml")


def test_paths_resolve_against_output_dir_and_data_root():
    cfg = load_config(ROOT / "configs/stage2.yml",
                      ["OUTPUT_DIR", "runs/x", "DATA.ROOT", "/data/voc"])
    assert cfg.output_path(cfg.MODEL.WEIGHTS) == Path("runs/x/stage1/checkpoints/final.ckpt")
    assert cfg.output_path("/abs/w.ckpt") == Path("/abs/w.ckpt")
    assert cfg.pseudo_label_dir == Path("/data/voc/Generation")
    assert cfg.run_dir == Path("runs/x/stage2")


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(ROOT / "configs/stage3_vgg.yml", ["OUTPUT_DIR", str(tmp_path)])
    saved = cfg.save()
    assert saved == tmp_path / "stage3_vgg" / "config.yaml"
    assert load_config(saved) == cfg


def test_configs_readme_is_current():
    """configs/README.md is generated from the schema; regenerate with
    `python -m engine.config > configs/README.md`."""
    assert (ROOT / "configs/README.md").read_text() == schema_markdown()


# The authors' recipe (their configs/*.yml and SPEC §2, §4, §7): what a user who runs our VOC
# configs unchanged gets.
AUTHORS_RECIPE = {
    "stage1.yml": {"MODEL.ROI_SAMPLING": "reference", "MODEL.POOLING": "bap", "SOLVER.LR": 1e-3,
                   "DATA.BATCH_SIZE": 20, "SOLVER.MAX_ITER": 8000, "SOLVER.MILESTONES": [5000],
                   "MODEL.GRID_SIZE": 4, "MODEL.ROI_SIZE": [2, 2], "DATA.CROP_SIZE": 321},
    "stage2.yml": {"MODEL.GRID_SIZE": 1, "MODEL.BG_THRESHOLD": 0.99,
                   "MODEL.DCRF": [4.0, 55.0, 3.0, 3.0, 3.0]},
    "stage3_vgg.yml": {"SOLVER.LR": 1e-3, "DATA.BATCH_SIZE": 20, "SOLVER.MAX_ITER": 23805,
                       "MODEL.FC6_DILATION": 12, "MODEL.LOSS": "nal",
                       "MODEL.WEIGHTS": "stage3_vgg/checkpoints/final.ckpt"},
    "stage3_res.yml": {"SOLVER.LR": 2.5e-4, "DATA.BATCH_SIZE": 10, "SOLVER.MAX_ITER": 20000,
                       "MODEL.FREEZE_BN": False, "MODEL.LOSS": "nal",
                       "MODEL.WEIGHTS": "stage3_res/checkpoints/final.ckpt"},
}


@pytest.mark.parametrize("name", sorted(AUTHORS_RECIPE))
def test_shipped_voc_configs_default_to_the_authors_recipe(name):
    cfg = load_config(Path("configs") / name)
    for key, expected in AUTHORS_RECIPE[name].items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert value == expected, f"{name}: {key} = {value!r}, the authors use {expected!r}"


@pytest.mark.parametrize("path", sorted(Path("configs").rglob("stage3*.yml")))
def test_every_stage3_config_reports_the_final_model(path):
    assert load_config(path).MODEL.WEIGHTS.endswith("checkpoints/final.ckpt")


def _alias_bomb(levels: int = 6, fan: int = 10) -> str:
    """A YAML document whose last anchor expands to fan ** levels strings (a "billion laughs"):
    a few hundred bytes here; each level more multiplies it by `fan`."""
    lines = ['a0: &a0 "lol"']
    for k in range(1, levels + 1):
        lines.append(f"a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * fan)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_in_data_classes_is_refused_in_a_short_message(tmp_path):
    """Before: the bomb loaded (aliases share objects), and the type error for DATA.CLASSES
    repeated its value in full: here 10^6 strings, 7 MB of message; from a 4 KB file, more than
    the machine's memory."""
    path = tmp_path / "c.yml"
    path.write_text("DATA:\n  CLASSES:\n" + "".join(f"    {line}\n"
                                                    for line in _alias_bomb().splitlines()))
    with pytest.raises(BanaError) as info:
        load_config(path)
    message = str(info.value)
    assert len(message) < 1000, message[:300]
    assert message.startswith(f"{path} is not valid YAML: its aliases (*name) expand to more "
                              "than 100,000 values")
    # Anchors and aliases as people use them still load.
    path.write_text("DATA:\n  SCALE_RANGE: &r [0.5, 1.5]\n  COLOR_JITTER: [0.5, 0.5, 0.5, 0.0]\n"
                    "MODEL:\n  DCRF: &d [4, 55, 3, 3, 3]\nTEST:\n  SCALES: *r\n")
    assert load_config(path).TEST.SCALES == [0.5, 1.5]


def test_yaml_nested_too_deep_is_named(tmp_path):
    """Before: PyYAML's composer recursed once per level: a RecursionError traceback."""
    path = tmp_path / "deep.yml"
    path.write_text("DATA:\n  CLASSES: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(BanaError, match=rf"{path} is not valid YAML: the document nests more "
                                        r"than 100 levels deep.*line 2"):
        load_config(path)


def test_yaml_python_tags_stay_refused(tmp_path):
    """The bounded loader is still a SafeLoader: no object of a YAML file is ever code."""
    path = tmp_path / "c.yml"
    path.write_text("DATA:\n  CLASSES: !!python/object/apply:os.system ['echo owned']\n")
    with pytest.raises(BanaError, match=rf"{path} is not valid YAML: .*python/object/apply"):
        load_config(path)


def test_opts_take_text_keys_as_typed():
    """`--opts DATA.ROOT "ds #1"` was read as YAML: `ds` and a comment, so another dataset was
    relabelled (and OUTPUT_DIR "exp #2" wrote into exp). A text key takes the text as typed:
    no comment, tag, quote or null parsing; numbers and lists keep their YAML reading."""
    cfg = load_config(ROOT / "configs/demo/stage2.yml", [
        "DATA.ROOT", "ds #1", "OUTPUT_DIR", "exp #2", "MODEL.INIT", "!!python/name:os.system",
        "NAME", "null", "DATA.CLASSES", "my #labels.txt", "SOLVER.LR", "0.5",
        "MODEL.ROI_SIZE", "[3, 3]"])
    assert (cfg.DATA.ROOT, cfg.OUTPUT_DIR, cfg.MODEL.INIT, cfg.NAME) == \
        ("ds #1", "exp #2", "!!python/name:os.system", "null")
    assert cfg.DATA.CLASSES == ["my #labels.txt"]
    assert (cfg.SOLVER.LR, cfg.MODEL.ROI_SIZE) == (0.5, [3, 3])
    assert load_config(opts=["DATA.CLASSES", "[cat, dog]"]).DATA.CLASSES == ["cat", "dog"]


def test_label_dir_through_dot_dot_inside_the_root_is_accepted(tmp_path):
    """`sub/../Gen` is DATA.ROOT/Gen and was refused as leaving DATA.ROOT; only a path that
    ends above DATA.ROOT is, and the message names where the value came from."""
    cfg = load_config(opts=["DATA.ROOT", str(tmp_path), "DATA.PSEUDO_LABEL_DIR", "sub/../Gen"])
    assert cfg.pseudo_label_dir == tmp_path / "Gen"
    with pytest.raises(BanaError, match=r"^--opts DATA.PSEUDO_LABEL_DIR: .*leaves DATA.ROOT"):
        load_config(ROOT / "configs/demo/stage2.yml",
                    ["DATA.PSEUDO_LABEL_DIR", "sub/../../Gen"])
    config = tmp_path / "c.yml"
    config.write_text("DATA:\n  PSEUDO_LABEL_DIR: ../Gen\n")
    with pytest.raises(BanaError, match=rf"^{config}: DATA.PSEUDO_LABEL_DIR"):
        load_config(config)
    with pytest.raises(BanaError, match=r"^--opts SOLVER.MAX_ITER: SOLVER.MAX_ITER = 0"):
        load_config(ROOT / "configs/demo/stage2.yml", ["SOLVER.MAX_ITER", "0"])


def test_the_schema_names_are_the_registries_keys():
    """The schema reads its choices from torch-free name tuples; each must list exactly the keys
    of the dict that implements it, in its order (an entry missing from one side fails here)."""
    from data.datasets import FORMATS
    from data.names import FORMAT_NAMES
    from engine.config import PARAM_GROUP_NAMES
    from engine.optim import PARAM_GROUPS
    from models.backbones import BACKBONES
    from models.instance import MASK_RCNN_BACKBONES
    from models.losses import LOSSES
    from models.names import BACKBONE_NAMES, LOSS_NAMES, MASK_RCNN_BACKBONE_NAMES

    assert FORMAT_NAMES == tuple(FORMATS)
    assert PARAM_GROUP_NAMES == tuple(PARAM_GROUPS)
    assert BACKBONE_NAMES == tuple(BACKBONES)
    assert MASK_RCNN_BACKBONE_NAMES == tuple(MASK_RCNN_BACKBONES)
    assert LOSS_NAMES == tuple(LOSSES)


def test_loading_a_config_imports_no_torch():
    """A fresh interpreter reads and checks a YAML without importing torch (or any network):
    the schema needs the names of the choices, not their implementations."""
    import subprocess
    import sys

    code = ("import sys; from engine.config import load_config; "
            f"load_config({str(ROOT / 'configs/stage1.yml')!r}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'torchvision', 'pytorch_lightning', 'lightning')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_an_alias_bomb_in_opts_is_not_expanded():
    """--opts values are read as YAML (lists, numbers); an alias bomb there (10^6 values from
    a few hundred characters) is refused by the bounded loader, naming the key (yaml.safe_load
    built it, and only the shortened repr of the message kept it from spreading)."""
    import time

    bomb = "[" + ", ".join(["&a [x,x,x,x,x,x,x,x,x,x]"] + [f"&{c} [*{p},*{p},*{p},*{p},*{p},*{p},"
                                                          f"*{p},*{p},*{p},*{p}]"
                                                          for p, c in zip("abcde",
                                                                          "bcdef")]) + "]"
    start = time.monotonic()
    with pytest.raises(BanaError, match=r"--opts DATA.EXPORTS: its aliases \(\*name\) expand to "
                                        r"more than 100,000 values") as info:
        load_config(ROOT / "configs/demo/stage2.yml", ["DATA.EXPORTS", bomb])
    assert time.monotonic() - start < 30
    assert len(str(info.value)) < 3000
