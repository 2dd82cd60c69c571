"""The names the config accepts for data/'s choices, without importing torch: engine/config.py
checks a YAML against them, so loading a config imports no network, dataset or torch.

Each tuple lists the keys of the dict that implements it; tests/test_configs.py checks that they
agree, so adding a layout means one line in FORMATS (data/datasets.py) and its name here.
"""

# DATA.DATASET: the keys of data.datasets.FORMATS.
FORMAT_NAMES = ("voc", "coco", "yolo")

# DATA.BOX_ARITHMETIC: how boxes follow the geometry (data/transforms.py). "reference" is the
# authors' arithmetic (`reference_boxes`); "pixel_edges" keeps a box on the pixel edges of the
# transformed image.
BOX_ARITHMETICS = ("reference", "pixel_edges")
