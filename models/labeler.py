"""Stage-1 classification network: foreground and background prototypes classified per box / cell.

Shape shorthand: N images, H×W image, D feature channels, h×w feature map, C classes, K_i boxes
of image i (K in all), Rh×Rw ROI grid, J = G*G background cells, M = K*Rh*Rw + (valid cells).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.backbones import build_backbone
from models.pooling import background_attention, background_prototypes, box_prototypes
from utils.errors import BanaError

POOLINGS = ("bap", "gap")


class Labeler(nn.Module):
    """Backbone + bias-free 1×1 classifier over pooled prototypes (SPEC §2).

    backbone: a name for `build_backbone` (random init) or any module with `out_channels`.
    pooling: "bap" (background-aware) or "gap" (A_fg ≡ 1). Images whose background fraction is
    at most `bg_fraction_min` pool their boxes with GAP.
    """

    def __init__(self, num_classes, backbone, pooling="bap", roi_size=(2, 2), grid_size=4,
                 bg_fraction_min=1 / 8):
        super().__init__()
        if pooling not in POOLINGS:
            raise BanaError(f"unknown pooling {pooling!r}: MODEL.POOLING must be one of {POOLINGS}")
        self.backbone = build_backbone(backbone) if isinstance(backbone, str) else backbone
        self.classifier = nn.Conv2d(self.backbone.out_channels, num_classes, 1, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.01)
        self.pooling = pooling
        self.roi_size = tuple(roi_size)
        self.grid_size = grid_size
        self.bg_fraction_min = bg_fraction_min

    def new_modules(self):
        """Modules without ImageNet weights (10x/20x learning rate)."""
        return [self.classifier, *self.backbone.new_modules()]

    def forward(self, images, boxes, bg_mask):
        """images (N,3,H,W) RGB 0..255; see `head` for the rest."""
        return self.head(self.backbone(images), boxes, bg_mask)

    def head(self, features, boxes, bg_mask):
        """(logits (M,C), targets (M,) long) for every foreground and background prototype.

        features (N,D,h,w); boxes: list of N float tensors (K_i,5) = x1, y1, x2, y2, class in
        input pixels; bg_mask (N,1,H,W) float, 1 = background, 0 inside boxes and in padding.
        Rows: foreground prototypes first (box order, ROI cells row-major, target = box class),
        then the background prototypes of valid grid cells (image order, cells row-major,
        target 0).
        """
        protos, valid, a_fg = self._prototypes_and_attention(features, bg_mask)
        n, _, h, w = features.shape
        all_boxes = torch.cat(list(boxes)).to(features.device)
        counts = torch.tensor([len(b) for b in boxes], device=features.device)
        image_index = torch.repeat_interleave(torch.arange(n, device=features.device), counts)
        rois = torch.cat([image_index[:, None].to(all_boxes.dtype), all_boxes[:, :4]], 1)
        scale = (h / bg_mask.shape[2], w / bg_mask.shape[3])
        fg = box_prototypes(features, a_fg, rois, self.roi_size, scale)
        bg = protos[valid]
        cells = self.roi_size[0] * self.roi_size[1]
        targets = torch.cat([all_boxes[:, 4].long().repeat_interleave(cells),
                             torch.zeros(len(bg), dtype=torch.long, device=features.device)])
        return self.classify(torch.cat([fg, bg])), targets

    def classify(self, prototypes):
        """(M,D) -> (M,C) logits with the 1×1 classifier."""
        return self.classifier(prototypes[:, :, None, None]).flatten(1)

    def attention(self, features, bg_mask):
        """A_fg (N,h,w) that `head` pools boxes with: 1 - A_bg (BAP), or 1 (GAP, little background)."""
        return self._prototypes_and_attention(features, bg_mask)[2]

    def _prototypes_and_attention(self, features, bg_mask):
        n, _, h, w = features.shape
        # Nearest keeps the mask binary, so a cell is valid only where true background lands.
        small_mask = F.interpolate(bg_mask, size=(h, w), mode="nearest")
        protos, valid = background_prototypes(features, small_mask, self.grid_size)
        if self.pooling == "gap":
            return protos, valid, features.new_ones(n, h, w)
        a_fg = 1 - background_attention(features, protos, valid)
        enough_bg = bg_mask.flatten(1).mean(1) > self.bg_fraction_min
        return protos, valid, torch.where(enough_bg[:, None, None], a_fg, torch.ones_like(a_fg))
