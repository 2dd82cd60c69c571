"""What every backbone shares: the input normalisation it owns (`InputNorm`) and the interface
the networks and the zoo use (`Backbone`); and what the two DeepLab-V2 ResNet-101s share
(`ResNetDeepLabV2`: body at stride 8, head).

Every backbone takes float RGB images in 0..255 and normalises them itself with an `InputNorm`
whose constants are buffers: they are saved and loaded with the weights, so a checkpoint always
carries the normalisation it was trained with.
"""

from collections import OrderedDict

import torch
import torch.nn as nn
import torchvision

# Per-channel mean in RGB order and 0..255 units, e.g. the colour to pad images with.
MEAN_RGB = {
    "caffe": (122.675, 116.669, 104.008),
    "imagenet": (0.485 * 255, 0.456 * 255, 0.406 * 255),
}
_IMAGENET_STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
INPUT_NORMS = tuple(MEAN_RGB)


def norm_buffers(kind):
    """The `InputNorm` buffers for `kind`: channel order, mean and std in that order, 0..255 units."""
    if kind == "caffe":
        order, mean, std = (2, 1, 0), MEAN_RGB["caffe"][::-1], (1.0, 1.0, 1.0)
    else:
        order, mean, std = (0, 1, 2), MEAN_RGB["imagenet"], _IMAGENET_STD_RGB
    return {"order": torch.tensor(order), "mean": torch.tensor(mean), "std": torch.tensor(std)}


class InputNorm(nn.Module):
    """(N,3,H,W) RGB 0..255 -> network input: Caffe (BGR minus mean) or ImageNet (RGB, mean/std)."""

    def __init__(self, kind="imagenet"):
        super().__init__()
        for name, value in norm_buffers(kind).items():
            self.register_buffer(name, value)

    @property
    def kind(self):
        return "caffe" if self.order[0].item() == 2 else "imagenet"

    def forward(self, images):
        return (images[:, self.order] - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)


class Backbone(nn.Module):
    """Shared interface: `normalize` first, `input_norm` names it, `new_modules()` for lr groups,
    `convert_state_dict` for weight files of other layouts, `IMAGENET_WEIGHTS` (a torchvision
    weights enum, or None) for MODEL.INIT imagenet."""

    out_channels: int
    IMAGENET_WEIGHTS = None

    def __init__(self, input_norm):
        super().__init__()
        self.normalize = InputNorm(input_norm)

    @property
    def input_norm(self):
        return self.normalize.kind

    def new_modules(self):
        return []

    def convert_state_dict(self, state_dict):
        """(own-layout state dict without `normalize.*`, norm the weights expect or None)."""
        return state_dict, None


class ResNetDeepLabV2(Backbone):
    """A torchvision ResNet-101 body at output stride 8 plus DeepLab-V2's head: four summed 3×3
    convs 2048 -> 256 (dilations 6, 12, 18, 24, padding = dilation, no bias, N(0, 0.01)) and a
    ReLU (SPEC §1). (N,3,H,W) RGB 0..255 -> (N,256,h,w). Subclasses say how the torchvision
    network is changed before it becomes the body (`adapt`)."""

    out_channels = 256
    HEAD_DILATIONS = (6, 12, 18, 24)

    def __init__(self, input_norm="imagenet"):
        super().__init__(input_norm)
        # DeepLab-V2: layer3 and layer4 at stride 1, dilated; output stride 8.
        net = torchvision.models.resnet101(weights=None,
                                           replace_stride_with_dilation=[False, True, True])
        self.adapt(net)
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        self.body = nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))
        self.head = nn.ModuleList(nn.Conv2d(2048, 256, 3, padding=d, dilation=d, bias=False)
                                  for d in self.HEAD_DILATIONS)
        for conv in self.head:
            nn.init.normal_(conv.weight, std=0.01)

    def adapt(self, net) -> None:
        """Change the torchvision ResNet-101 in place before it becomes the body."""

    def forward(self, images):
        x = self.body(self.normalize(images))
        return torch.relu(sum(conv(x) for conv in self.head))

    def new_modules(self):
        return list(self.head)

