"""Stage-3 segmentation network: a backbone with a cosine classifier (SPEC §4).

Shape shorthand: N images, H×W image, D feature channels, h×w feature map, C classes.
"""

import torch.nn as nn
import torch.nn.functional as F

from utils.precision import float32_region, full

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def freeze_bn(module):
    """Put every BatchNorm in `module` in eval mode and stop its affine parameters' gradients.

    Optimisers should then be given only parameters with `requires_grad`.
    """
    for m in module.modules():
        if isinstance(m, _BATCH_NORMS):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
    return module


class DeepLab(nn.Module):
    """s_c(p) = cos(f(p), w_c): backbone features against the rows of a bias-free 1×1 classifier.

    frozen_bn: keep BatchNorm statistics and affine parameters fixed, also across `.train()`.
    """

    def __init__(self, num_classes, backbone, frozen_bn=False):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Conv2d(backbone.out_channels, num_classes, 1, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.01)
        self.frozen_bn = frozen_bn
        if frozen_bn:
            freeze_bn(self)

    def new_modules(self):
        """Modules without ImageNet weights (10x/20x learning rate)."""
        return [self.classifier, *self.backbone.new_modules()]

    def train(self, mode=True):
        super().train(mode)
        if self.frozen_bn:
            freeze_bn(self)
        return self

    def forward(self, images, out_size=None):
        """images (N,3,H,W) RGB 0..255 -> cosine scores (N,C,h,w) in [-1, 1], or (N,C,*out_size).

        Upsampling is bilinear with align_corners=True, as in the reference. The backbone runs
        under whatever autocast is active; the cosine classifier and the upsampling run in
        float32 (utils/precision.py), so the scores are float32 in every precision.
        """
        features = self.backbone(images)
        with float32_region(features.device.type):
            features = F.normalize(full(features), dim=1)
            cos = F.conv2d(features, F.normalize(full(self.classifier.weight), dim=1))
            if out_size is not None:
                cos = F.interpolate(cos, size=tuple(out_size), mode="bilinear",
                                    align_corners=True)
        return cos
