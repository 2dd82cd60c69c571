"""What every backbone shares: the input normalisation it owns (`InputNorm`) and the interface
the networks and the zoo use (`Backbone`).

Every backbone takes float RGB images in 0..255 and normalises them itself with an `InputNorm`
whose constants are buffers: they are saved and loaded with the weights, so a checkpoint always
carries the normalisation it was trained with.
"""

import torch
import torch.nn as nn

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
