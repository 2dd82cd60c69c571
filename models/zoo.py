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

        net = mask_rcnn(spec.backbone, spec.num_classes, init, *spec.instance_size)
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
    if isinstance(state_dict.get("bana"), dict) and "state_dict" in state_dict:
        ckpt = _parse(path, state_dict)
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


def read_checkpoint(path, *, stage: int | None = None, kind: str | tuple | None = None,
                    expect: dict | None = None, hint: str = "") -> Checkpoint:
    """Read one of this project's checkpoints and check it is what the caller needs.

    stage: the stage that must have written it; kind: the kind(s) of network it must hold;
    expect: {spec field: (config key, value)} that must match, e.g. {"backbone":
    ("MODEL.BACKBONE", "tiny"), "num_classes": ("DATA.NUM_CLASSES", 21)}. hint: how to get the
    right file, appended to every message. A missing, truncated or foreign file, another stage's
    or kind's model, or a mismatch is a BanaError naming the file, what it holds and what was
    needed.
    """
    path = Path(path)
    if not path.is_file():
        raise BanaError(f"checkpoint {path} does not exist. {hint}".rstrip())
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which, not a pickle traceback
        reason = str(e).split(". ")[0].strip()
        raise BanaError(f"cannot read checkpoint {path}: the file is truncated or not a "
                        f"checkpoint ({type(e).__name__}: {reason}). {hint}".rstrip()) from None
    what = f"stage {stage}" if stage is not None else "a stage"
    if not isinstance(raw, dict) or not isinstance(raw.get("bana"), dict) \
            or "stage" not in raw["bana"]:
        raise BanaError(f"{path} is not a checkpoint written by this project's {what}. "
                        f"{hint}".rstrip())
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


def _parse(path: Path, raw: dict) -> Checkpoint:
    meta = raw["bana"]
    stage = int(meta["stage"])
    config = meta.get("config") or {}
    if "model" in meta:
        spec = ModelSpec.from_dict(meta["model"])
        extra = {k: v for k, v in meta.items() if k not in ("stage", "model", "config")}
    else:
        spec, extra = _legacy_spec(meta, stage, config)
    prefix = _PREFIX[spec.kind]
    state = {k[len(prefix):]: v for k, v in (raw.get("state_dict") or {}).items()
             if k.startswith(prefix)}
    return Checkpoint(path, stage, spec, state, int(raw.get("global_step", 0)), config, extra)


def _legacy_spec(meta: dict, stage: int, config: dict) -> tuple[ModelSpec, dict]:
    """The spec of a checkpoint written before `checkpoint_entry` (flat keys plus the config)."""
    model = config.get("MODEL", {})
    classes = meta.get("classes")
    common = {"backbone": LEGACY_BACKBONES.get(meta["backbone"], meta["backbone"]),
              "num_classes": meta["num_classes"],
              "classes": tuple(classes) if classes else None}
    if meta.get("task") == "instance":
        spec = ModelSpec("maskrcnn", instance_size=tuple(meta["instance_size"]), **common)
        return spec, {k: meta[k] for k in ("category_ids", "masks") if k in meta}
    common.update(input_norm=meta.get("input_norm", "imagenet"),
                  fc6_dilation=meta.get("fc6_dilation", 1))
    if stage == 1:
        return ModelSpec("labeler", pooling=meta.get("pooling", "bap"),
                         roi_sampling=model.get("ROI_SAMPLING", "reference"),
                         roi_size=tuple(model.get("ROI_SIZE", (2, 2))),
                         grid_size=model.get("GRID_SIZE", 4),
                         bg_fraction_min=model.get("BG_FRACTION_MIN", 0.125), **common), {}
    return ModelSpec("deeplab", frozen_bn=model.get("FREEZE_BN", False), **common), {}
