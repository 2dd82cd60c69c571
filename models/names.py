"""The names the config accepts for models/'s choices, without importing torch: engine/config.py
checks a YAML against them, so loading a config imports no network and no torch.

Each tuple lists the keys of the dict that implements it; tests/test_configs.py checks that they
agree, so adding a backbone or a loss means one line in its dict and its name here.
"""

# MODEL.BACKBONE with MODEL.TASK semantic: the keys of models.backbones.BACKBONES.
BACKBONE_NAMES = ("vgg16", "resnet101", "resnet101_torchvision", "tiny")
# MODEL.BACKBONE with MODEL.TASK instance: the keys of models.instance.MASK_RCNN_BACKBONES.
MASK_RCNN_BACKBONE_NAMES = ("tiny", "resnet50_fpn", "resnet50_fpn_v2")
# MODEL.LOSS: the keys of models.losses.LOSSES.
LOSS_NAMES = ("nal", "ce_crf", "ce_ret", "baseline", "er", "bs")

# MODEL.POOLING: how a box's features are weighted before pooling (SPEC §2; models/labeler.py).
POOLINGS = {
    "bap": "background-aware: each position weighted by A_fg = 1 - its background attention",
    "gap": "global average: every position of the box weighted alike (A_fg = 1)",
}
# MODEL.ROI_SAMPLING: how a box becomes its ROI cells (models/labeler.py).
ROI_SAMPLINGS = {
    "reference": "the authors' sampling: grid_sample over the box, attention on the samples, "
                 "overlapping windows (`sampled_box_prototypes`)",
    "roi_align": "faster opt-in: attention at feature pixels, one roi_align, disjoint cells "
                 "(`box_prototypes`)",
}
