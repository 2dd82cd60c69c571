"""Every network this project builds or saves, behind one door: describe it, build it, read it back.

    spec = ModelSpec("deeplab", "vgg16", num_classes=21, fc6_dilation=12)
    net = build(spec, init="imagenet")      # a new network, its backbone initialised from `init`
    ckpt = read_checkpoint(path, stage=3, expect={"backbone": ("MODEL.BACKBONE", "vgg16")})
    net = ckpt.network()                    # rebuilt from the checkpoint's own spec, in eval mode

Kinds of network (`ModelSpec.kind`):
- "backbone": a feature extractor alone (`models.backbones.BACKBONES`);
- "labeler": stage 1's box classifier over BAP/GAP prototypes (`models.labeler.Labeler`);
- "deeplab": stage 3's backbone with a cosine classifier (`models.deeplab.DeepLab`);
- "maskrcnn": stage 3's instance task, torchvision's Mask R-CNN (`models.instance`).

A checkpoint is a Lightning checkpoint with one extra entry, `checkpoint["bana"]` =
`checkpoint_entry(stage, spec, config, ...)`: {"stage", "model": the spec as a dict, "config": the
run's resolved config, ...}. Checkpoints written before the "model" entry existed describe their
network with flat keys (backbone, num_classes, fc6_dilation, input_norm, pooling, classes, task,
instance_size) next to the config; `read_checkpoint` reads both into the same spec.

Initialisation (`init` of `build`): "none" (random), "imagenet" (torchvision's weights for the
backbone, from `$TORCH_HOME/hub/checkpoints/` or downloaded), "coco" (Mask R-CNN only), or a path:
a state dict in any layout the backbone converts (`convert_state_dict`: torchvision, the authors'
Caffe-converted files, our own), or one of this project's checkpoints, whose backbone is taken.

torch only: nothing here imports Lightning or the config schema.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from utils.errors import BanaError

KINDS = ("backbone", "labeler", "deeplab", "maskrcnn")
# What a person calls each kind in a message.
_KIND_NAMES = {"backbone": "a feature extractor", "labeler": "a stage-1 box classifier",
               "deeplab": "a semantic-segmentation model (DeepLab)",
               "maskrcnn": "an instance-segmentation model (Mask R-CNN)"}
# Where each kind's weights sit inside the LightningModule that trains it.
_PREFIX = {"labeler": "net.", "deeplab": "net.", "maskrcnn": "model."}
# Backbone names in checkpoints written before `checkpoint_entry` whose meaning changed since:
# "resnet101" was torchvision's v1.5 then, the authors' v1 now.
LEGACY_BACKBONES = {"resnet101": "resnet101_torchvision"}


@dataclass(frozen=True)
class ModelSpec:
    """A network, described well enough to build it again.

    kind: see KINDS; backbone: a name of `models.backbones.BACKBONES` (or, for maskrcnn,
    `models.instance.MASK_RCNN_BACKBONES`); num_classes: outputs, background included; classes:
    their names, index = class id (None where unknown); input_norm: "caffe", "imagenet" or (before
    building) "auto" = follow the weights. The other fields matter to one kind each and keep their
    defaults elsewhere.
    """

    kind: str
    backbone: str
    num_classes: int = 0
    classes: tuple[str, ...] | None = None
    input_norm: str = "auto"
    fc6_dilation: int = 1  # VGG-16's fc6 (1 in stage 1, 12 in stage 3)
    # labeler
    pooling: str = "bap"
    roi_sampling: str = "reference"
    roi_size: tuple[int, int] = (2, 2)
    grid_size: int = 4
    bg_fraction_min: float = 0.125
    # deeplab
    frozen_bn: bool = False
    # maskrcnn: short side, longest long side of its resized input
    instance_size: tuple[int, int] = (800, 1333)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind of network {self.kind!r}; expected one of {KINDS}")
        # Lists from YAML or JSON become tuples, so that specs compare and hash by value.
        for name in ("classes", "roi_size", "instance_size"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def describe(self) -> str:
        return f"{_KIND_NAMES[self.kind]} on '{self.backbone}' with {self.num_classes} classes"


def build(spec: ModelSpec, init: str = "none") -> nn.Module:
    """A new network of `spec`, its backbone initialised from `init` (see the module doc). The
    network's `spec` attribute is `spec` with the input normalisation resolved."""
    if spec.kind == "maskrcnn":
        from models.instance import mask_rcnn

        net = mask_rcnn(spec.backbone, spec.num_classes, init, *spec.instance_size,
                        own_checkpoint=own_instance_weights)
        net.spec = spec
        return net
    backbone = _backbone(spec, init)
    if spec.kind == "backbone":
        net = backbone
    elif spec.kind == "labeler":
        from models.labeler import Labeler

        net = Labeler(spec.num_classes, backbone, pooling=spec.pooling, roi_size=spec.roi_size,
                      grid_size=spec.grid_size, bg_fraction_min=spec.bg_fraction_min,
                      roi_sampling=spec.roi_sampling)
    else:
        from models.deeplab import DeepLab

        net = DeepLab(spec.num_classes, backbone, frozen_bn=spec.frozen_bn)
    net.spec = dataclasses.replace(spec, input_norm=backbone.input_norm)
    return net


def _backbone(spec: ModelSpec, init: str) -> nn.Module:
    """The feature extractor of `spec`, with the weights of `init` and the input normalisation
    they expect (an explicit spec.input_norm that contradicts them is an error)."""
    from models.backbones import BACKBONES, INPUT_NORMS, norm_buffers

    if spec.backbone not in BACKBONES:
        raise BanaError(f"unknown backbone {spec.backbone!r}: MODEL.BACKBONE must be one of "
                        f"{sorted(BACKBONES)}")
    if spec.input_norm not in ("auto", *INPUT_NORMS):
        raise BanaError(f"unknown input normalisation {spec.input_norm!r}: MODEL.INPUT_NORM must "
                        "be 'auto', 'caffe' or 'imagenet'")
    cls = BACKBONES[spec.backbone]
    # A backbone takes the options its constructor names (VGG-16: fc6_dilation).
    options = {"fc6_dilation": spec.fc6_dilation}
    accepted = inspect.signature(cls).parameters
    net = cls(**{k: v for k, v in options.items() if k in accepted})
    if init == "none":
        source, state_dict = None, None
    elif init == "imagenet":
        source, state_dict = f"torchvision's ImageNet {spec.backbone}", _imagenet(spec.backbone, cls)
    else:
        source, state_dict = str(init), read_init(init)
    weights_norm = None
    if state_dict is not None:
        state_dict, weights_norm = net.convert_state_dict(state_dict)
        if weights_norm is None:  # own layout: the normalisation is stored with the weights
            weights_norm = _stored_norm(state_dict, source)
    norm = spec.input_norm
    if norm == "auto":
        norm = weights_norm or "imagenet"
    elif weights_norm is not None and norm != weights_norm:
        raise BanaError(f"MODEL.INPUT_NORM={norm!r} contradicts the weights from {source}, which "
                        f"expect {weights_norm!r} inputs: set MODEL.INPUT_NORM to 'auto'")
    if state_dict is None:
        net.normalize.load_state_dict(norm_buffers(norm))
    else:
        norm_state = {f"normalize.{k}": v for k, v in norm_buffers(norm).items()}
        _load_strict(net, {**_new_layers(net), **state_dict, **norm_state}, source)
    return net


def _new_layers(net: nn.Module) -> dict:
    """The backbone's own (fresh) weights of its `new_modules()`, e.g. DeepLab-V2's four dilated
    convolutions: an ImageNet classifier's file has none, and they keep their initialisation."""
    ids = {id(t) for m in net.new_modules() for t in (*m.parameters(), *m.buffers())}
    return {k: v for k, v in net.state_dict(keep_vars=True).items() if id(v) in ids}


def _stored_norm(state_dict, source):
    order = state_dict.get("normalize.order")
    if order is None:
        return None
    if order.tolist() not in ([0, 1, 2], [2, 1, 0]):
        raise BanaError(f"normalize.order in {source} is {order.tolist()}, expected [0, 1, 2] "
                        "(RGB, ImageNet) or [2, 1, 0] (BGR, Caffe)")
    return "caffe" if order[0].item() == 2 else "imagenet"


def _load_strict(net, state_dict, source):
    expected = net.state_dict().keys()
    missing, unexpected = expected - state_dict.keys(), state_dict.keys() - expected
    if missing or unexpected:
        raise BanaError(
            f"the weights from {source} do not fit {type(net).__name__}: "
            f"{len(missing)} missing keys (e.g. {sorted(missing)[:4]}), "
            f"{len(unexpected)} unexpected keys (e.g. {sorted(unexpected)[:4]}). Expected a "
            "torchvision, Caffe-converted VGG-16 (vgg_caffe.pth) or this project's own state dict.")
    try:
        net.load_state_dict(state_dict)
    except RuntimeError as err:
        raise BanaError(f"the weights from {source} have the wrong shapes for "
                        f"{type(net).__name__}: {err}") from err


def _imagenet(name: str, cls) -> dict:
    weights = getattr(cls, "IMAGENET_WEIGHTS", None)
    if weights is None:
        raise BanaError(f"there are no ImageNet weights for the {name!r} backbone: set MODEL.INIT "
                        "to 'none' or to the path of a state dict")
    target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise BanaError(
            f"could not get the ImageNet weights for {name} ({type(err).__name__}: {err}). "
            f"Without internet, download {weights.url} elsewhere and put it at {target} "
            "(the folder follows $TORCH_HOME), or set MODEL.INIT to the path of a state dict.") \
            from err


def read_init(path) -> dict:
    """The state dict an init file holds: a plain state dict as it is, or the backbone weights of
    one of this project's checkpoints (own layout, with the input normalisation they were
    trained with), e.g. stage 3 starting from stage 1's backbone."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise BanaError(f"MODEL.INIT is {path!r}, which is not a file: expected 'none', "
                        "'imagenet' or the path of a state dict (.pth)")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise BanaError(f"could not read the state dict {path}: {err}") from err
    if not isinstance(state_dict, dict):
        raise BanaError(f"{path} holds a {type(state_dict).__name__}, expected a state dict "
                        "(a dict of tensor names to tensors)")
    if isinstance(state_dict.get("bana"), dict) and "state_dict" in state_dict \
            and "stage" in state_dict["bana"]:
        _raise_defects(Path(path), check_entry(state_dict), "Or set MODEL.INIT to 'imagenet', "
                       "'none' or the path of another state dict.")
        ckpt = _parse(Path(path), state_dict)
        if ckpt.spec.kind not in ("labeler", "deeplab"):
            raise BanaError(f"{path} holds {ckpt.spec.describe()}, whose backbone does not fit "
                            "the networks of stages 1 and 3: give a stage-1 or stage-3 checkpoint, "
                            "a state dict, 'imagenet' or 'none'.")
        own = {k[len("backbone."):]: v for k, v in ckpt.state.items() if k.startswith("backbone.")}
        if not own:
            raise BanaError(f"{path} is a stage-{ckpt.stage} checkpoint without backbone weights "
                            "(no 'net.backbone.*' entries)")
        return own
    return state_dict


def checkpoint_entry(stage: int, spec: ModelSpec, config: dict, **extra) -> dict:
    """What every LightningModule of this project writes as `checkpoint["bana"]`."""
    return {"stage": stage, "model": spec.as_dict(), "config": config, **extra}


@dataclass
class Checkpoint:
    """A checkpoint of this project, read and checked: its network's spec and weights (without
    the LightningModule's prefix), the iterations it trained, the run's config and any further
    entries its stage recorded (e.g. the instance task's category ids)."""

    path: Path
    stage: int
    spec: ModelSpec
    state: dict
    step: int
    config: dict
    extra: dict

    def network(self, hint: str = "") -> nn.Module:
        """The network, built from the spec with these weights, in eval mode."""
        net = build(self.spec)
        try:
            net.load_state_dict(self.state)
        except RuntimeError as e:
            raise BanaError(f"{self.path}: the weights do not fit {self.spec.describe()} "
                            f"({str(e).splitlines()[0]}). {hint}".rstrip()) from None
        return net.eval()


class UnsafeCheckpoint(BanaError):
    """A checkpoint whose pickle asks to run code or build objects other than tensors and plain
    values: refused by the weights-only loader before any of it ran."""


def _load_untrusted(path: Path, hint: str, mmap: bool = False) -> dict:
    """The contents of a checkpoint file, unpickled with torch's weights-only loader: tensors,
    numbers, strings and plain containers, nothing that runs code (a file whose pickle calls a
    function is refused before anything of it runs). mmap: leave the tensors on disk (for a
    read of the metadata alone)."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:  # the legacy (non-zip) format cannot be mapped: read it whole
            if not (mmap and "mmap" in str(e)):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # also what the weights-only loader raises for code
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights only load failed" in first.lower():
            raise UnsafeCheckpoint(
                f"cannot read checkpoint {path}: it asks to run code or build objects other than "
                "tensors and plain values, which a checkpoint of this project never does, so "
                f"nothing of it was used. {hint}".rstrip()) from None
        raise BanaError(f"cannot read checkpoint {path}: the file is truncated or not a "
                        f"checkpoint. {hint}".rstrip()) from None
    except Exception as e:  # a truncated or foreign file: say which, not a pickle traceback
        reason = str(e).split(". ")[0].strip().splitlines()[0] if str(e).strip() else ""
        raise BanaError(f"cannot read checkpoint {path}: the file is truncated or not a "
                        f"checkpoint ({type(e).__name__}: {reason[:200]}). {hint}".rstrip()) \
            from None


def _entry(path: Path, raw, what: str, hint: str) -> dict:
    """The `bana` entry of a loaded checkpoint, or a BanaError saying the file is not ours."""
    if not isinstance(raw, dict) or not isinstance(raw.get("bana"), dict) \
            or "stage" not in raw["bana"]:
        raise BanaError(f"{path} is not a checkpoint written by this project's {what}. "
                        f"{hint}".rstrip())
    return raw["bana"]


def read_checkpoint_meta(path, hint: str = "") -> tuple[int, int]:
    """(stage, iterations trained) of one of this project's checkpoints, read without loading
    its weights (the tensors stay on disk) and without running anything the file holds: for
    the checks that need only these two numbers. A BanaError for an unreadable, foreign or
    damaged file."""
    path = Path(path)
    if not path.is_file():
        raise BanaError(f"checkpoint {path} does not exist. {hint}".rstrip())
    raw = _load_untrusted(path, hint, mmap=True)
    meta = _entry(path, raw, "stages", hint)
    defects = [d for d in (_check_stage(meta.get("stage")), _check_step(raw.get("global_step", 0)))
               if d]
    _raise_defects(path, defects, hint)
    return meta["stage"], raw.get("global_step", 0)


def read_checkpoint(path, *, stage: int | None = None, kind: str | tuple | None = None,
                    expect: dict | None = None, hint: str = "") -> Checkpoint:
    """Read one of this project's checkpoints and check it is what the caller needs.

    stage: the stage that must have written it; kind: the kind(s) of network it must hold;
    expect: {spec field: (config key, value)} that must match, e.g. {"backbone":
    ("MODEL.BACKBONE", "tiny"), "num_classes": ("DATA.NUM_CLASSES", 21)}. hint: how to get the
    right file, appended to every message. A missing, truncated or foreign file, one whose pickle
    would run code, a damaged `bana` entry or weights (`check_entry`), another stage's or kind's
    model, or a mismatch is a BanaError naming the file, what it holds and what was needed.
    """
    path = Path(path)
    if not path.is_file():
        raise BanaError(f"checkpoint {path} does not exist. {hint}".rstrip())
    raw = _load_untrusted(path, hint)
    what = f"stage {stage}" if stage is not None else "a stage"
    _entry(path, raw, what, hint)
    _raise_defects(path, check_entry(raw), hint)
    ckpt = _parse(path, raw)
    if stage is not None and ckpt.stage != stage:
        raise BanaError(f"{path} was written by stage {ckpt.stage}, but stage {stage}'s model is "
                        f"needed here. {hint}".rstrip())
    kinds = (kind,) if isinstance(kind, str) else tuple(kind or ())
    if kinds and ckpt.spec.kind not in kinds:
        raise BanaError(f"{path} holds {_KIND_NAMES[ckpt.spec.kind]}, but "
                        f"{' or '.join(_KIND_NAMES[k] for k in kinds)} is needed here. "
                        f"{hint}".rstrip())
    check_spec(ckpt, expect or {}, hint)
    if not ckpt.state:
        raise BanaError(f"{path} holds no weights of its network: the file is damaged or not "
                        f"this project's. {hint}".rstrip())
    return ckpt


def check_spec(ckpt: Checkpoint, expect: dict, hint: str = "") -> None:
    """Raise a BanaError when the checkpoint's spec differs from `expect` ({spec field: (config
    key, value)}), naming the file, both values and how to use the checkpoint as it is."""
    for field, (key, wanted) in expect.items():
        stored = getattr(ckpt.spec, field)
        if stored == wanted:
            continue
        if field == "num_classes":
            found = f"{ckpt.path} was trained with {stored} classes, but {key} is {wanted}"
        elif field == "backbone":
            found = (f"{ckpt.path} holds a {stored!r} stage-{ckpt.stage} model but {key} is "
                     f"{wanted!r}")
        else:
            found = (f"{ckpt.path} holds a stage-{ckpt.stage} model with {key} {stored!r}, but "
                     f"{key} is {wanted!r} here")
        raise BanaError(f"{found}. Set {key} {stored} to use it as it is. {hint}".rstrip())


# The classifier whose rows are the classes, per kind: its outputs must be the recorded count.
_CLASSIFIER = {"labeler": "classifier.weight", "deeplab": "classifier.weight",
               "maskrcnn": "roi_heads.box_predictor.cls_score.weight"}


def _shown(value) -> str:
    """A value found in a file, for a message: its repr, cut short, and its type."""
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{text} (a {type(value).__name__})"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _check_stage(value) -> str | None:
    if not (_is_int(value) and value in (1, 3)):
        return f"bana.stage is {_shown(value)}; expected the integer 1 or 3"
    return None


def _check_step(value) -> str | None:
    if not (_is_int(value) and value >= 0):
        return f"global_step is {_shown(value)}; expected an integer of at least 0"
    return None


def _pair(v) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) and x >= 1 for x in v)


def _spec_values(meta: dict) -> tuple[dict, dict]:
    """(spec fields as the file holds them, unchecked; the stage's further entries), from the
    "model" entry or, in a checkpoint written before it, the flat keys and the config."""
    stage = meta.get("stage")
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    if "model" in meta:
        model = meta["model"]
        if not isinstance(model, dict):
            return {"model": model}, {}
        extra = {k: v for k, v in meta.items() if k not in ("stage", "model", "config")}
        return dict(model), extra
    model = config.get("MODEL") if isinstance(config.get("MODEL"), dict) else {}
    backbone = meta.get("backbone")
    values = {"backbone": LEGACY_BACKBONES.get(backbone, backbone) if isinstance(backbone, str)
              else backbone, "num_classes": meta.get("num_classes"),
              "classes": meta.get("classes") or None}
    if meta.get("task") == "instance":
        values.update(kind="maskrcnn", instance_size=meta.get("instance_size"))
        return values, {k: meta[k] for k in ("category_ids", "masks") if k in meta}
    values.update(input_norm=meta.get("input_norm", "imagenet"),
                  fc6_dilation=meta.get("fc6_dilation", 1))
    if stage == 1:
        values.update(kind="labeler", pooling=meta.get("pooling", "bap"),
                      roi_sampling=model.get("ROI_SAMPLING", "reference"),
                      roi_size=model.get("ROI_SIZE", [2, 2]), grid_size=model.get("GRID_SIZE", 4),
                      bg_fraction_min=model.get("BG_FRACTION_MIN", 0.125))
    else:
        values.update(kind="deeplab", frozen_bn=model.get("FREEZE_BN", False))
    return values, {}


def _spec_defects(values: dict) -> list[str]:
    """What is wrong with a spec as a file holds it (`_spec_values`), one line per defect."""
    from models.backbones import BACKBONES
    from models.instance import MASK_RCNN_BACKBONES
    from models.labeler import POOLINGS, ROI_SAMPLINGS

    if "model" in values:
        return [f"bana.model is {_shown(values['model'])}; expected a mapping of the network's "
                "description"]
    defects = []

    def need(name, ok, expected):
        if name in values and not ok(values[name]):
            defects.append(f"bana.model.{name} is {_shown(values[name])}; expected {expected}")

    def found(name):
        return f"bana.model.{name} is " + (_shown(values[name]) if name in values else "missing")

    kind = values.get("kind")
    if kind not in KINDS[1:]:  # (a kind another stage writes is `read_checkpoint`'s message)
        defects.append(f"{found('kind')}; expected one of {', '.join(KINDS[1:])}")
    known = MASK_RCNN_BACKBONES if kind == "maskrcnn" else BACKBONES
    if not (isinstance(values.get("backbone"), str) and values["backbone"] in known):
        defects.append(f"{found('backbone')}; expected one of {', '.join(sorted(known))}")
    count = values.get("num_classes")
    if not (_is_int(count) and count >= 2):
        defects.append(f"{found('num_classes')}; expected an integer of at least 2 "
                       "(background included)")
        count = None
    classes = values.get("classes")
    if classes is not None:
        if not (isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes)):
            defects.append(f"bana.model.classes is {_shown(classes)}; expected a list of class "
                           "names")
        elif count is not None and len(classes) != count:
            defects.append(f"bana.model.classes names {len(classes)} classes, but "
                           f"bana.model.num_classes is {count}")
    need("input_norm", lambda v: v in ("auto", "caffe", "imagenet"), "'caffe' or 'imagenet'")
    need("fc6_dilation", lambda v: _is_int(v) and v >= 1, "an integer of at least 1")
    need("pooling", lambda v: v in POOLINGS, f"one of {', '.join(POOLINGS)}")
    need("roi_sampling", lambda v: v in ROI_SAMPLINGS, f"one of {', '.join(ROI_SAMPLINGS)}")
    need("roi_size", _pair, "two integers of at least 1")
    need("grid_size", lambda v: _is_int(v) and v >= 1, "an integer of at least 1")
    need("bg_fraction_min", lambda v: _is_number(v) and 0 <= v <= 1, "a number from 0 to 1")
    need("frozen_bn", lambda v: isinstance(v, bool), "true or false")
    need("instance_size", _pair, "two integers of at least 1")
    return defects


def _config_defects(config) -> list[str]:
    """The recorded config's values that a loaded model uses (`engine.predict.Segmenter`)."""
    if config is None:
        return []
    if not isinstance(config, dict):
        return [f"bana.config is {_shown(config)}; expected the run's config (a mapping)"]
    model = config.get("MODEL", {})
    if not isinstance(model, dict):
        return [f"bana.config.MODEL is {_shown(model)}; expected a mapping"]
    defects = []
    if "TEMPERATURE" in model and not (_is_number(model["TEMPERATURE"])
                                       and model["TEMPERATURE"] > 0):
        defects.append(f"bana.config.MODEL.TEMPERATURE is {_shown(model['TEMPERATURE'])}; "
                       "expected a number above 0")
    if "DCRF" in model and not (isinstance(model["DCRF"], (list, tuple))
                                and len(model["DCRF"]) == 5
                                and all(_is_number(v) for v in model["DCRF"])):
        defects.append(f"bana.config.MODEL.DCRF is {_shown(model['DCRF'])}; expected 5 numbers")
    if "CRF_BACKEND" in model and not isinstance(model["CRF_BACKEND"], str):
        defects.append(f"bana.config.MODEL.CRF_BACKEND is {_shown(model['CRF_BACKEND'])}; "
                       "expected a name")
    return defects


def check_entry(raw: dict) -> list[str]:
    """Every defect of a loaded checkpoint (`raw`, with a `bana` entry), one line each: the
    entry's types and ranges, the network's description, the class count against its
    classifier's outputs, the weights (tensors, all finite). Empty for a sound checkpoint."""
    meta = raw["bana"]
    defects = [d for d in (_check_stage(meta["stage"]), _check_step(raw.get("global_step", 0)))
               if d]
    defects += _config_defects(meta.get("config"))
    values, extra = _spec_values(meta)
    defects += _spec_defects(values)
    kind = values.get("kind")
    if kind == "maskrcnn" and "category_ids" in extra:
        ids = extra["category_ids"]
        count = values.get("num_classes")
        if not (isinstance(ids, (list, tuple)) and all(_is_int(i) for i in ids)):
            defects.append(f"bana.category_ids is {_shown(ids)}; expected a list of integers")
        elif _is_int(count) and len(ids) != count:
            defects.append(f"bana.category_ids has {len(ids)} ids, but bana.model.num_classes "
                           f"is {count}")
    weights = raw.get("state_dict")
    if not isinstance(weights, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        defects.append(f"state_dict is {_shown(weights)}; expected a mapping of names to tensors")
        return defects
    if kind not in _PREFIX:
        return defects
    prefix = _PREFIX[kind]
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        defects.append(f"{len(bad)} weight tensor(s) hold NaN or infinite values (e.g. "
                       f"{prefix}{bad[0]}): the model would compute nothing meaningful")
    rows = state.get(_CLASSIFIER[kind])
    count = values.get("num_classes")
    if rows is not None and _is_int(count) and rows.dim() >= 1 and rows.shape[0] != count:
        defects.append(f"bana.model.num_classes is {count}, but the classifier "
                       f"({prefix}{_CLASSIFIER[kind]}) has {rows.shape[0]} outputs")
    return defects


def _raise_defects(path: Path, defects: list[str], hint: str) -> None:
    """One message for a damaged checkpoint, a line per defect. It says what the file holds, and
    never suggests a setting taken from it."""
    if not defects:
        return
    fix = ("The file is damaged or was not written by this project's stages: use a checkpoint "
           f"they wrote. {hint}").rstrip()
    if len(defects) == 1:
        raise BanaError(f"{path} cannot be used: {defects[0]}. {fix}")
    listed = "\n".join(f"  {k}. {d}." for k, d in enumerate(defects, 1))
    raise BanaError(f"{path} cannot be used; {len(defects)} defects. {fix}\n{listed}")


def _parse(path: Path, raw: dict) -> Checkpoint:
    """A checkpoint `check_entry` found sound, as a `Checkpoint`."""
    meta = raw["bana"]
    values, extra = _spec_values(meta)
    spec = ModelSpec.from_dict(values)
    prefix = _PREFIX[spec.kind]
    state = {k[len(prefix):]: v for k, v in (raw.get("state_dict") or {}).items()
             if k.startswith(prefix)}
    return Checkpoint(path, meta["stage"], spec, state, raw.get("global_step", 0),
                      meta.get("config") or {}, extra)


def own_instance_weights(path: str, raw: dict, outputs: int) -> dict:
    """MODEL.INIT of the instance task that is one of this project's checkpoints (`raw`, read
    weights-only; checked as every checkpoint is: `check_entry`): its Mask R-CNN weights, to
    start a network of `outputs` classes from: an instance checkpoint of the same backbone and
    class count. Anything else is refused saying what the file holds."""
    from pathlib import Path

    hint = "Or set MODEL.INIT to 'coco', 'imagenet', 'none' or a Mask R-CNN state dict."
    _raise_defects(Path(path), check_entry(raw), hint)
    ckpt = _parse(Path(path), raw)
    if ckpt.spec.kind != "maskrcnn":
        raise BanaError(f"MODEL.INIT {path} holds {ckpt.spec.describe()} (stage {ckpt.stage}), "
                        "not a Mask R-CNN: the instance task starts from an instance checkpoint "
                        f"of this project or a Mask R-CNN state dict. {hint}")
    if ckpt.spec.num_classes != outputs:
        raise BanaError(f"MODEL.INIT {path} is a Mask R-CNN of {ckpt.spec.num_classes} classes, "
                        f"but this run trains {outputs} (DATA.NUM_CLASSES / the class map): its "
                        f"class layers cannot be used. {hint}")
    return ckpt.state
