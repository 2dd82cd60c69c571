"""Mask R-CNN (torchvision) for stage 3's instance task: trained on stage 2's pseudo instance
masks, the filled boxes, or the GT masks of a COCO-layout split.

Backbones: "resnet50_fpn" / "resnet50_fpn_v2" (torchvision's `maskrcnn_resnet50_fpn[_v2]`) and
"tiny" (five convolutions, one feature map at stride 8: for CPU tests and the demo).
Initialisation (`init`), always through torchvision's own builders and weight enums, so the
files and their cache paths are torchvision's:
- "imagenet": the ResNet-50 ImageNet classifier as backbone (`weights_backbone`);
- "coco": COCO *detection* weights (Faster R-CNN: backbone, RPN and box head; the box
  classifier is re-initialised for our classes, and the mask head starts from scratch, because
  torchvision's COCO Mask R-CNN weights were trained on COCO's masks: starting from them would
  leak mask supervision into a box-supervised result);
- "none": random; or a path to a state dict of this very model, or to one of this project's
  instance checkpoints of the same backbone and class count (its weights are taken).
Images go in as float RGB 0..255 (N, 3, H, W) or a list of (3, H, W); the model's transform
normalises and resizes them (short side `min_size`, long side at most `max_size`).
"""

from __future__ import annotations

import os
import pickle

import torch
from torch import nn

from utils.errors import BanaError



class _TinyBody(nn.Module):
    """Five 3×3 conv + GroupNorm + ReLU layers at stride 8, 64 channels: one feature map."""

    out_channels = 64

    def __init__(self):
        super().__init__()
        plan = ((3, 32, 2), (32, 64, 2), (64, 64, 1), (64, 64, 2), (64, 64, 1))
        layers = []
        for in_ch, out_ch, stride in plan:
            layers += [nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(8, out_ch), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x)


def _tiny(num_classes: int, min_size: int, max_size: int):
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    anchors = AnchorGenerator(sizes=((8, 16, 32, 64),), aspect_ratios=((0.5, 1.0, 2.0),))
    # Proposal and sampling budgets for ~100 px images with a handful of objects: torchvision's
    # defaults (2000 proposals, 512 RoIs per image) are sized for 800 px COCO images.
    return MaskRCNN(_TinyBody(), num_classes=num_classes, min_size=min_size, max_size=max_size,
                    rpn_anchor_generator=anchors, rpn_pre_nms_top_n_train=300,
                    rpn_post_nms_top_n_train=150, rpn_pre_nms_top_n_test=300,
                    rpn_post_nms_top_n_test=100, box_batch_size_per_image=128,
                    box_detections_per_img=50,
                    box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
                    mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2))


def _fetch(what: str, weights, build):
    """build() with torchvision weights; a failed download becomes a message naming the file."""
    target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        return build()
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise BanaError(
            f"could not get the {what} ({type(err).__name__}: {err}). Without internet, "
            f"download {weights.url} elsewhere and put it at {target} (the folder follows "
            "$TORCH_HOME), or set MODEL.INIT to none or to the path of a state dict.") from None


def _resnet50_fpn(v2: bool):
    """A builder of torchvision's maskrcnn_resnet50_fpn[_v2] with our init names."""

    def make(num_classes: int, init: str, min_size: int, max_size: int) -> nn.Module:
        from torchvision.models import ResNet50_Weights
        from torchvision.models.detection import (FasterRCNN_ResNet50_FPN_V2_Weights,
                                                  FasterRCNN_ResNet50_FPN_Weights,
                                                  maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2)

        builder = maskrcnn_resnet50_fpn_v2 if v2 else maskrcnn_resnet50_fpn
        sizes = {"min_size": min_size, "max_size": max_size}
        if init == "imagenet":
            weights = ResNet50_Weights.IMAGENET1K_V1
            return _fetch("ImageNet ResNet-50", weights, lambda: builder(
                weights=None, weights_backbone=weights, num_classes=num_classes, **sizes))
        model = builder(weights=None, weights_backbone=None, num_classes=num_classes, **sizes)
        if init == "coco":
            weights = (FasterRCNN_ResNet50_FPN_V2_Weights if v2
                       else FasterRCNN_ResNet50_FPN_Weights).COCO_V1
            state = _fetch("COCO detection weights", weights,
                           lambda: weights.get_state_dict(progress=False, check_hash=True))
            # Everything but the 91-way box classifier (our classes differ).
            state = {k: v for k, v in state.items() if not k.startswith("roi_heads.box_predictor")}
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or any(not k.startswith(("roi_heads.box_predictor",
                                                   "roi_heads.mask_")) for k in missing):
                raise BanaError(f"the COCO detection weights do not fit resnet50_fpn"
                                f"{'_v2' if v2 else ''}: unexpected {unexpected[:3]}, missing "
                                f"{missing[:3]}.")
        return model

    return make


def _tiny_model(num_classes: int, init: str, min_size: int, max_size: int) -> nn.Module:
    if init in ("imagenet", "coco"):
        raise BanaError(f"MODEL.INIT {init}: there are no pretrained weights for the tiny "
                        "Mask R-CNN; use none (or resnet50_fpn).")
    return _tiny(num_classes, min_size, max_size)


# MODEL.BACKBONE of the instance task: name -> builder(num_classes, init, min_size, max_size)
# for "none" / "imagenet" / "coco" (a path is loaded afterwards, whatever the backbone).
MASK_RCNN_BACKBONES = {
    "tiny": _tiny_model,
    "resnet50_fpn": _resnet50_fpn(v2=False),
    "resnet50_fpn_v2": _resnet50_fpn(v2=True),
}


def mask_rcnn(backbone: str, num_classes: int, init: str = "none", min_size: int = 800,
              max_size: int = 1333, own_checkpoint=None) -> nn.Module:
    """torchvision's MaskRCNN with `num_classes` outputs (background included); models/zoo.py's
    `build` is the way in. own_checkpoint(path, raw, num_classes) -> state dict: how a MODEL.INIT
    that is one of this project's checkpoints is read (zoo's, passed in: zoo imports this
    module)."""
    if backbone not in MASK_RCNN_BACKBONES:
        raise BanaError(f"MODEL.BACKBONE {backbone!r} is no Mask R-CNN backbone: choose one of "
                        f"{', '.join(MASK_RCNN_BACKBONES)}.")
    named = init in ("none", "imagenet", "coco")
    model = MASK_RCNN_BACKBONES[backbone](num_classes, init if named else "none", min_size,
                                          max_size)
    if not named:
        _load_path(model, init, own_checkpoint)
    return model


def _load_path(model: nn.Module, path: str, own_checkpoint=None) -> None:
    if not os.path.isfile(path):
        raise BanaError(f"MODEL.INIT is {path!r}, which is not a file: expected none, imagenet, "
                        "coco or the path of a Mask R-CNN state dict.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise BanaError(f"MODEL.INIT {path} cannot be read as a state dict "
                        f"({str(err).strip().splitlines()[0][:200]}).") from None
    if not isinstance(state, dict):
        raise BanaError(f"MODEL.INIT {path} holds a {type(state).__name__}, expected a state dict "
                        "of a Mask R-CNN (names to tensors) or one of this project's instance "
                        "checkpoints.")
    if isinstance(state.get("bana"), dict) and "stage" in state["bana"] and own_checkpoint:
        state = own_checkpoint(path, state, model.roi_heads.box_predictor.cls_score.out_features)
    else:
        state = state.get("state_dict", state)
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = sorted(k for k in expected.keys() & state.keys()
                    if not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        found = "; ".join(part for part in (
            f"{len(missing)} of its weights are missing (e.g. {', '.join(missing[:3])})"
            if missing else "",
            f"{len(unexpected)} are not this network's (e.g. {', '.join(unexpected[:3])})"
            if unexpected else "",
            f"{len(shapes)} have other shapes (e.g. {shapes[0]})" if shapes else "") if part)
        raise BanaError(f"MODEL.INIT {path} is not a state dict of this Mask R-CNN "
                        f"({type(model).__name__} on MODEL.BACKBONE, MODEL.INSTANCE_SIZE): "
                        f"{found}. Give a state dict of the same backbone and classes, one of "
                        "this project's instance checkpoints, 'coco', 'imagenet' or 'none'.")
    model.load_state_dict(state)
