"""The BANA authors' ResNet-101 for DeepLab-V2: Caffe-style ResNet v1 at output stride 8.

Shape shorthand: N images, H×W image, D = 256 = `out_channels`, h×w feature map.

The authors (cvlab-yonsei/BANA, models/Layers.py `RES101` with `_Stem`, `_ResLayer`,
`_Bottleneck`, `_ConvBnReLU`; models/SegNet.py `DeepLab_ASPP`) build MSRA's original ResNet-101 as
kazuto1011/deeplab-pytorch does (libs/models/resnet.py), not torchvision's "v1.5". Both share
every tensor, so `ResNet101V1DeepLabV2` keeps exactly the parameter and buffer names of
`models.backbones.ResNet101DeepLabV2` (a state dict of one loads into the other); they differ in:

- stride placement: the stride-2 block (first block of torchvision's layer2) strides in its first
  1×1 convolution (and, as in both, in the 1×1 projection shortcut), not in the 3×3;
- the stem's 3×3 max-pool (stride 2, padding 1) rounds up (`ceil_mode=True`, Caffe's rule): on a
  side whose 7×7-conv output c is even it gives c/2 + 1 rows instead of c/2. Per side,
  h = ceil((floor(ceil(H/2) / 2) + 1) / 2) here against ceil(H/8) for v1.5: 320 px -> 41×41
  features instead of 40×40; 321 px (the authors' crop) -> 41×41 for both; a 500×375 (W×H)
  VOC image -> pooled stem 126×95 instead of 125×94, features 63×48 instead of 63×47;
- BatchNorm momentum 0.999 in PyTorch's convention (new = 0.001·old + 0.999·batch), as the
  authors' `_ConvBnReLU` sets it, so in train mode the running statistics are almost the last
  batch's. (kazuto1011's later resnet.py uses 1 - 0.999, Caffe's moving-average fraction.)
  eps stays 1e-5.

As in DeepLab-V2 (and our v1.5 class), torchvision's layer3 is dilated by 2 and layer4 by 4 in
every block, the first included, at stride 1: output stride 8. The head sums four 3×3 convs
2048 -> 256 (dilations 6, 12, 18, 24, padding = dilation, no bias, N(0, 0.01)) and applies a ReLU,
the authors' `DeepLab_ASPP.get_features`.

`convert_state_dict` reads, besides this module's own layout and torchvision's `resnet101`
(ImageNet, "imagenet" inputs), the Caffe-converted ResNet-101 files of DeepLab-V2 PyTorch ports
("caffe" inputs: BGR, mean subtracted, as the Caffe ResNet was trained):

- kazuto1011/deeplab-pytorch (convert.py, libs/models/resnet.py, deeplabv1.py, deeplabv2.py,
  msc.py), the naming the BANA authors' Layers.py keeps: `layer1.conv1.conv.weight`,
  `layer1.conv1.bn.{weight,bias,running_mean,running_var}`, `layer2.block1.reduce.conv.weight`,
  `layer2.block1.conv3x3.bn.weight`, `layer2.block1.increase.conv.weight`,
  `layer3.block1.shortcut.conv.weight` / `.shortcut.bn.*` (`.proj.` in early versions), behind any
  prefix: none (deeplabv1_resnet101-coco.pth, `fc.*` dropped), `base.`
  (deeplabv2_resnet101_msc-vocaug.pth, with `base.aspp.c0..c3`), `scale.` (early MSC files,
  `scale.aspp.stages.*`) or `backbone.` (the BANA authors' `DeepLab_ASPP`, whose `c1..c4` are
  this head and are kept; its `classifier` is dropped). Other ASPP / classifier entries are
  dropped. The authors' layer2..layer5 are torchvision's layer1..layer4.
- isht7/pytorch-deeplab-resnet (deeplab_resnet.py, init_net_surgery.py ->
  MS_DeepLab_resnet_pretrained_COCO_init.pth; wasidennis/AdaptSegNet's
  train_gta2cityscapes_multi.py reads its init file the same way, stripping `Scale.`):
  torchvision's names behind `Scale.`: `Scale.conv1.weight`, `Scale.bn1.*`,
  `Scale.layer1.0.conv1.weight`, `Scale.layer1.0.downsample.0.weight` / `.downsample.1.*`;
  the classifier `Scale.layer5.conv2d_list.*` is dropped.

Converted files made with PyTorch < 0.4.1 have no BatchNorm `num_batches_tracked`; zeros are
filled in. No ImageNet or Caffe file holds this head: the module's own freshly initialised head
goes with the converted weights so that a strict load keeps it. A Caffe-converted file saved in
plain torchvision naming cannot be told from torchvision's by its keys and reads as "imagenet".
"""

import torch
import torch.nn as nn
import torchvision

from models.backbone_base import ResNetDeepLabV2
from utils.errors import BanaError

BN_MOMENTUM = 0.999
HEAD_DILATIONS = ResNetDeepLabV2.HEAD_DILATIONS

# Our Bottleneck's conv1/conv2/conv3 (and bn1/2/3) in kazuto1011's naming.
_KAZUTO_BRANCHES = {"1": "reduce", "2": "conv3x3", "3": "increase"}
_EXPECTED = ("this module's own layout (body.*, head.*, normalize.*); torchvision's resnet101 "
             "(conv1.weight, layer1.0.conv1.weight, ...); kazuto1011/deeplab-pytorch's or the BANA "
             "authors' Caffe-converted ResNet-101 ([base.|backbone.|scale.]layer1.conv1.conv.weight, "
             "layer2.block1.reduce.conv.weight, ...); isht7/pytorch-deeplab-resnet's "
             "(Scale.conv1.weight, Scale.layer1.0.conv1.weight, ...)")


class ResNet101V1DeepLabV2(ResNetDeepLabV2):
    """The authors' ResNet-101 v1 at stride 8 plus DeepLab-V2's four summed dilated 3×3 convs.

    (N,3,H,W) RGB 0..255 -> (N,256,h,w); names as `ResNet101DeepLabV2` (see the module docstring).
    MODEL.INIT imagenet loads torchvision's ResNet-101 file into it: the same tensors.
    """

    IMAGENET_WEIGHTS = torchvision.models.ResNet101_Weights.IMAGENET1K_V1

    def adapt(self, net) -> None:
        # Authors' choice (DeepLab-V2, as ResNet101DeepLabV2): every block of layer3 dilated by 2
        # and of layer4 by 4, the first included (torchvision gives those first blocks 1 and 2).
        for layer, dilation in ((net.layer3, 2), (net.layer4, 4)):
            for block in layer:
                block.conv2.dilation, block.conv2.padding = (dilation, dilation), (dilation, dilation)
        # Authors' choice (Caffe's rounding): the stem's max-pool rounds its output size up.
        net.maxpool.ceil_mode = True
        # Authors' choice (MSRA ResNet v1): the stride-2 block strides in its first 1×1, not the 3×3.
        net.layer2[0].conv1.stride, net.layer2[0].conv2.stride = (2, 2), (1, 1)
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                # Authors' choice: momentum 0.999 in PyTorch's convention (torchvision: 0.1).
                module.momentum = BN_MOMENTUM

    def convert_state_dict(self, state_dict):
        if any(k.startswith(("body.", "head.", "normalize.")) for k in state_dict):
            return state_dict, None
        layout = _find_layout(state_dict)
        if layout is None:
            found = sorted(state_dict)[:4]
            raise BanaError(f"the state dict fits no ResNet-101 layout that {type(self).__name__} "
                            f"reads (its first keys: {found}). Expected {_EXPECTED}.")
        return convert_resnet101(state_dict, layout, self.state_dict()), layout.norm


class _Layout:
    """Where a ResNet-101 layout keeps our body's tensors: `prefix + rename(own key)`.

    `owns(key)`: the source key belongs to the backbone, so it must be one of ours (anything
    else there means another network, e.g. a ResNet-152); other keys (heads) are dropped.
    """

    def __init__(self, name, prefix, rename, owns, norm, head_root=None):
        self.name, self.prefix, self.rename, self.owns = name, prefix, rename, owns
        self.norm, self.head_root = norm, head_root

    def source_key(self, body_key):
        return self.prefix + self.rename(body_key)


def _find_layout(state_dict):
    """The `_Layout` of a foreign state dict, or None when it fits none."""
    for key in state_dict:
        prefix = _prefix_of(key, "layer1.conv1.conv.weight")
        if prefix is not None:
            shortcut = "proj" if f"{prefix}layer2.block1.proj.conv.weight" in state_dict else "shortcut"
            scopes = tuple(f"{prefix}layer{i}." for i in range(1, 6))
            head_root = prefix[:-len("backbone.")] if prefix.endswith("backbone.") else None
            return _Layout("kazuto1011/deeplab-pytorch (the BANA authors' naming)", prefix,
                           lambda k: _kazuto_name(k, shortcut), lambda k: k.startswith(scopes),
                           "caffe", head_root)
        prefix = _prefix_of(key, "Scale.conv1.weight")
        if prefix is not None:
            scale = prefix + "Scale."
            return _Layout("isht7/pytorch-deeplab-resnet", scale, lambda k: k,
                           lambda k: k.startswith(scale) and not k.startswith(scale + "layer5."),
                           "caffe")
    if "conv1.weight" in state_dict and "layer1.0.conv1.weight" in state_dict:
        return _Layout("torchvision resnet101", "", lambda k: k,
                       lambda k: not k.startswith("fc."), "imagenet")
    return None


def _prefix_of(key, anchor):
    """`key` minus `anchor` when it ends with it after a module boundary, else None."""
    if key == anchor or key.endswith("." + anchor):
        return key[:-len(anchor)]
    return None


def _kazuto_name(body_key, shortcut):
    """Our body key (without `body.`) -> kazuto1011's name: `layer1.0.conv2.weight` ->
    `layer2.block1.conv3x3.conv.weight`, `layer2.0.downsample.1.bias` ->
    `layer3.block1.shortcut.bn.bias`, `bn1.running_mean` -> `layer1.conv1.bn.running_mean`."""
    parts = body_key.split(".")
    if parts[0] in ("conv1", "bn1"):
        return f"layer1.conv1.{parts[0][:-1]}.{parts[1]}"
    layer, block, module, *rest = parts
    stem = f"layer{int(layer[len('layer'):]) + 1}.block{int(block) + 1}"
    if module == "downsample":
        return f"{stem}.{shortcut}.{('conv', 'bn')[int(rest[0])]}.{rest[1]}"
    return f"{stem}.{_KAZUTO_BRANCHES[module[-1]]}.{module[:-1]}.{rest[0]}"


def convert_resnet101(state_dict, layout, own_state):
    """A foreign ResNet-101 state dict -> own layout (without `normalize.*`), checked.

    `own_state` is the target module's state dict: it gives the expected keys and shapes and the
    head to keep when the source has none. Missing `num_batches_tracked` become 0; a missing
    tensor, a wrong shape or an unknown tensor inside the backbone is a BanaError.
    """
    own, used, missing, wrong = {}, set(), [], []

    def take(own_key, source):
        value = state_dict[source]
        used.add(source)
        expected = tuple(own_state[own_key].shape)
        if tuple(value.shape) != expected:
            wrong.append(f"{source} is {tuple(value.shape)}, expected {expected}")
        own[own_key] = value

    for key in own_state:
        if not key.startswith("body."):
            continue
        source = layout.source_key(key[len("body."):])
        if source in state_dict:
            take(key, source)
        elif key.endswith(".num_batches_tracked"):
            own[key] = torch.zeros((), dtype=torch.long)
        else:
            missing.append(source)

    heads = [f"head.{i}.weight" for i in range(len(HEAD_DILATIONS))]
    authors_head = ([f"{layout.head_root}c{i + 1}.weight" for i in range(len(heads))]
                    if layout.head_root is not None else [])
    if authors_head and any(k in state_dict for k in authors_head):
        # The BANA authors' DeepLab_ASPP: c1..c4 are this head (2048 -> 256, rates 6..24, no bias).
        for key, source in zip(heads, authors_head):
            if source in state_dict:
                take(key, source)
            else:
                missing.append(source)
    else:
        own.update((k, own_state[k].detach().clone()) for k in heads)

    unexpected = sorted(k for k in state_dict if layout.owns(k) and k not in used)
    problems = [f"{len(found)} {what} (e.g. {found[:4]})" for what, found in (
        ("missing keys", missing), ("unexpected keys", unexpected), ("with the wrong shape", wrong))
        if found]
    if problems:
        raise BanaError(
            f"not a ResNet-101 state dict in the layout of {layout.name} (keys such as "
            f"{layout.source_key('layer1.0.conv1.weight')!r}): {', '.join(problems)}. Expected "
            f"the 101-layer network (blocks [3, 4, 23, 3]) with all its BatchNorm statistics.")
    return own
