"""Feature extractors at output stride 8: VGG-16 (DeepLab-LargeFOV), ResNet-101 (DeepLab-V2), tiny.

Shape shorthand: N images, H×W image, D = `out_channels`, h×w feature map (about H/8 × W/8;
the exact size depends on the backbone's padding, so callers derive the scale from shapes).

Every backbone takes float RGB images in 0..255 and normalises them itself with an `InputNorm`
whose constants are buffers: they are saved and loaded with the weights, so a checkpoint always
carries the normalisation it was trained with.
"""

import math

import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models import ResNet101_Weights, VGG16_Weights

from models.backbone_base import (INPUT_NORMS, MEAN_RGB, Backbone, InputNorm,  # noqa: F401
                                  ResNetDeepLabV2, norm_buffers)
from models.resnet_v1 import ResNet101V1DeepLabV2
from utils.errors import BanaError

_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_CAFFE_VGG16_CONVS = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
                      "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")
_FC_SHAPES = {"fc6": (1024, 512, 3, 3), "fc7": (1024, 1024, 1, 1)}


class VGG16LargeFOV(Backbone):
    """VGG-16 as in DeepLab-LargeFOV (SPEC §1); `features` keeps torchvision's layer indices."""

    out_channels = 1024
    IMAGENET_WEIGHTS = VGG16_Weights.IMAGENET1K_V1

    def __init__(self, fc6_dilation=1, input_norm="imagenet"):
        super().__init__(input_norm)
        layers, in_ch, pools = [], 3, 0
        for v in _VGG16_CFG:
            if v == "M":
                pools += 1
                # Round down as the authors' VGG16 (PyTorch's default, not Caffe's ceil); pools
                # 4 and 5 keep the resolution so the stride stays 8.
                layers.append(nn.MaxPool2d(3, stride=2 if pools <= 3 else 1, padding=1))
            else:
                dilation = 2 if pools == 4 else 1
                layers += [nn.Conv2d(in_ch, v, 3, padding=dilation, dilation=dilation),
                           nn.ReLU(inplace=True)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.pool5a = nn.AvgPool2d(3, stride=1, padding=1)
        self.fc6 = nn.Conv2d(512, 1024, 3, padding=fc6_dilation, dilation=fc6_dilation)
        self.fc7 = nn.Conv2d(1024, 1024, 1)
        self.drop6 = nn.Dropout2d(0.5)
        self.drop7 = nn.Dropout2d(0.5)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # torchvision's VGG initialisation, used when no weights are loaded.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, images):
        x = self.pool5a(self.features(self.normalize(images)))
        x = self.drop6(F.relu(self.fc6(x), inplace=True))
        return self.drop7(F.relu(self.fc7(x), inplace=True))

    def convert_state_dict(self, state_dict):
        if "conv1_1.weight" in state_dict:
            return convert_caffe_vgg16(state_dict), "caffe"
        if "classifier.0.weight" in state_dict:
            return convert_torchvision_vgg16(state_dict), "imagenet"
        return state_dict, None


class ResNet101DeepLabV2(ResNetDeepLabV2):
    """torchvision ResNet-101 at stride 8 plus DeepLab-V2's four summed dilated 3×3 convs (SPEC §1)."""

    IMAGENET_WEIGHTS = ResNet101_Weights.IMAGENET1K_V1

    def adapt(self, net) -> None:
        # torchvision gives the first block of a dilated layer the previous layer's dilation (1
        # in layer3, 2 in layer4); DeepLab-V2 dilates every block of layer3 by 2 and of layer4
        # by 4, the first included. Same weights, so only the 3×3 convolution changes.
        for layer, dilation in ((net.layer3, 2), (net.layer4, 4)):
            conv = layer[0].conv2
            conv.dilation, conv.padding = (dilation, dilation), (dilation, dilation)

    def convert_state_dict(self, state_dict):
        if "conv1.weight" in state_dict:
            own = {f"body.{k}": v for k, v in state_dict.items() if not k.startswith("fc.")}
            return own, "imagenet"
        return state_dict, None


class TinyBackbone(Backbone):
    """Five 3×3 conv + GroupNorm + ReLU layers, stride 8, D = 128: for CPU demos and tests.

    GroupNorm rather than BatchNorm so that training from scratch on tiny batches behaves the
    same in train and eval mode.
    """

    out_channels = 128

    def __init__(self, input_norm="imagenet"):
        super().__init__(input_norm)
        plan = ((3, 32, 2, 1), (32, 64, 2, 1), (64, 64, 1, 1), (64, 128, 2, 1), (128, 128, 1, 2))
        layers = []
        for in_ch, out_ch, stride, dilation in plan:
            layers += [nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation,
                                 dilation=dilation, bias=False),
                       nn.GroupNorm(8, out_ch), nn.ReLU(inplace=True)]
        # A linear last layer, centred per image and channel (instance norm, the same in train
        # and eval mode). Trained from scratch, post-ReLU features all point in nearly one
        # direction, which leaves cosine similarities (BAP attention, the stage-3 classifier)
        # almost nothing to separate; pretrained VGG/ResNet features do not have this problem.
        layers += [nn.Conv2d(128, 128, 1), nn.GroupNorm(128, 128)]
        self.features = nn.Sequential(*layers)

    def forward(self, images):
        return self.features(self.normalize(images))


def convert_torchvision_vgg16(state_dict):
    """torchvision `vgg16` state dict -> `VGG16LargeFOV` layout (without `normalize.*`).

    fc6/fc7 are decimated as DeepLab's "vgg16_20M": fc6 (4096, 25088) is viewed as
    (4096, 512, 7, 7) and every 4th output and every 3rd spatial tap (0, 3, 6) is kept ->
    (1024, 512, 3, 3); fc7 keeps every 4th row and column -> (1024, 1024, 1, 1); biases every
    4th. The 1000-way classifier (classifier.6) is dropped.
    """
    own = {k: v for k, v in state_dict.items() if not k.startswith("classifier.")}
    try:
        fc6 = state_dict["classifier.0.weight"].view(4096, 512, 7, 7)
        own["fc6.weight"] = fc6[::4, :, ::3, ::3].clone()
        own["fc6.bias"] = state_dict["classifier.0.bias"][::4].clone()
        own["fc7.weight"] = state_dict["classifier.3.weight"][::4, ::4].reshape(1024, 1024, 1, 1).clone()
        own["fc7.bias"] = state_dict["classifier.3.bias"][::4].clone()
    except (KeyError, RuntimeError) as err:
        raise BanaError(f"not a torchvision VGG-16 state dict: its classifier.0 / classifier.3 "
                        f"tensors are missing or have the wrong shape ({err})") from err
    return own


def convert_caffe_vgg16(state_dict):
    """The BANA authors' Caffe-converted `vgg_caffe.pth` (conv1_1 ... conv5_3, fc6, fc7) -> own layout.

    fc6/fc7 there are already the reduced 1024-channel convolutions; a `fc8*` classifier of the
    source network, if present, is not part of the backbone and is dropped.
    """
    conv_indices = [i for i, v in enumerate(_features_layout()) if v == "conv"]
    names = dict(zip(_CAFFE_VGG16_CONVS, conv_indices))
    own = {}
    for key, value in state_dict.items():
        layer, _, param = key.rpartition(".")
        if layer in names:
            own[f"features.{names[layer]}.{param}"] = value
        elif param == "weight" and layer in _FC_SHAPES and value.numel() == math.prod(_FC_SHAPES[layer]):
            # Converters store a Caffe fully connected layer flat or as a convolution.
            own[key] = value.reshape(_FC_SHAPES[layer])
        elif not layer.startswith("fc8"):
            own[key] = value
    return own


def _features_layout():
    """Kinds of the modules in `VGG16LargeFOV.features`, index by index ("conv", "relu", "pool")."""
    kinds = []
    for v in _VGG16_CFG:
        kinds += ["pool"] if v == "M" else ["conv", "relu"]
    return kinds


# MODEL.BACKBONE of the semantic networks (stages 1-3): name -> class. A new backbone is a
# `Backbone` subclass in its own module and one line here; the zoo (models/zoo.py) builds it,
# passing the options its constructor names (VGG-16: fc6_dilation).
BACKBONES = {
    "vgg16": VGG16LargeFOV,  # DeepLab-LargeFOV (DeepLab-V1)
    "resnet101": ResNet101V1DeepLabV2,  # DeepLab-V2 as the authors build it (v1, models/resnet_v1.py)
    "resnet101_torchvision": ResNet101DeepLabV2,  # torchvision's v1.5 with DeepLab-V2's dilations
    "tiny": TinyBackbone,  # five convolutions, for CPU demos and tests
}
