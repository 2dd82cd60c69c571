"""Stage-1 classification network: foreground and background prototypes classified per box / cell.

Shape shorthand: N images, H×W image, D feature channels, h×w feature map, C classes, K_i boxes
of image i (K in all), Rh×Rw ROI grid, J = G*G background cells, M = K*Rh*Rw + (valid cells).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.names import POOLINGS, ROI_SAMPLINGS
from models.pooling import (background_attention, background_prototypes, box_prototypes,
                            sampled_box_prototypes, to_device)
from utils.errors import BanaError
from utils.precision import float32_region, full


class Labeler(nn.Module):
    """Backbone + bias-free 1×1 classifier over pooled prototypes (SPEC §2).

    backbone: any module with `out_channels` mapping images (N,3,H,W) to features (N,D,h,w).
    pooling: "bap" (background-aware) or "gap" (A_fg ≡ 1). Images whose background fraction is
    at most `bg_fraction_min` pool their boxes with GAP.
    roi_sampling: how a box becomes its ROI cells. "reference" (default) samples and pools exactly
    as the authors' code (`models.pooling.sampled_box_prototypes`: attention on the resampled box,
    overlapping windows); "roi_align" is our faster variant (`box_prototypes`: attention at
    feature pixels, one `roi_align`, disjoint cells), kept as an opt-in.
    """

    def __init__(self, num_classes, backbone, pooling="bap", roi_size=(2, 2), grid_size=4,
                 bg_fraction_min=1 / 8, roi_sampling="reference"):
        super().__init__()
        if pooling not in POOLINGS:
            raise BanaError(f"unknown pooling {pooling!r}: MODEL.POOLING must be one of "
                            f"{tuple(POOLINGS)}")
        if roi_sampling not in ROI_SAMPLINGS:
            raise BanaError(f"unknown ROI sampling {roi_sampling!r}: MODEL.ROI_SAMPLING must be "
                            f"one of {tuple(ROI_SAMPLINGS)}")
        self.roi_sampling = roi_sampling
        self.backbone = backbone
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

        Runs in float32 under autocast (utils/precision.py). Boxes given on the CPU (as stage 1
        keeps them) stay there: the sample layout is computed on the host and only its result is
        copied to the device, without waiting for the device.
        """
        with float32_region(features.device.type):
            return self._head(full(features), boxes, full(bg_mask))

    def _head(self, features, boxes, bg_mask):
        n, _, h, w = features.shape
        device = features.device
        all_boxes = torch.cat([torch.as_tensor(b).cpu() for b in boxes]).to(features.dtype)
        counts = torch.tensor([len(b) for b in boxes])
        image_index = torch.repeat_interleave(torch.arange(n), counts)
        rois = torch.cat([image_index[:, None].to(all_boxes.dtype), all_boxes[:, :4]], 1)
        if self.roi_sampling == "reference":
            protos, valid = self._background(features, bg_mask)
            fg = sampled_box_prototypes(features, rois, bg_mask.shape[2:], protos, valid,
                                        self._uses_bap(bg_mask), self.roi_size)
        else:
            protos, valid, a_fg = self._prototypes_and_attention(features, bg_mask)
            scale = (h / bg_mask.shape[2], w / bg_mask.shape[3])
            fg = box_prototypes(features, a_fg, to_device(rois, device), self.roi_size, scale)
        bg = protos[valid]
        cells = self.roi_size[0] * self.roi_size[1]
        targets = torch.cat([to_device(all_boxes[:, 4].long().repeat_interleave(cells), device),
                             torch.zeros(len(bg), dtype=torch.long, device=device)])
        return self.classify(torch.cat([fg, bg])), targets

    def classify(self, prototypes):
        """(M,D) -> (M,C) logits with the 1×1 classifier."""
        return self.classifier(prototypes[:, :, None, None]).flatten(1)

    def attention(self, features, bg_mask):
        """A_fg (N,h,w) that `head` pools boxes with: 1 - A_bg (BAP), or 1 (GAP, little background).
        float32 under autocast, as `head`."""
        with float32_region(features.device.type):
            return self._prototypes_and_attention(full(features), full(bg_mask))[2]

    def _background(self, features, bg_mask):
        """Background prototypes (N,J,D) and valid cells (N,J) of the G×G grid."""
        # Nearest keeps the mask binary, so a cell is valid only where true background lands.
        small_mask = F.interpolate(bg_mask, size=features.shape[2:], mode="nearest")
        return background_prototypes(features, small_mask, self.grid_size)

    def _uses_bap(self, bg_mask):
        """(N,) bool: images whose boxes are weighted by A_fg; GAP for the others (SPEC §2.4)."""
        enough_bg = bg_mask.flatten(1).mean(1) > self.bg_fraction_min
        return enough_bg & (self.pooling == "bap")

    def _prototypes_and_attention(self, features, bg_mask):
        n, _, h, w = features.shape
        protos, valid = self._background(features, bg_mask)
        if self.pooling == "gap":
            return protos, valid, features.new_ones(n, h, w)
        a_fg = 1 - background_attention(features, protos, valid)
        return protos, valid, torch.where(self._uses_bap(bg_mask)[:, None, None], a_fg,
                                          torch.ones_like(a_fg))
