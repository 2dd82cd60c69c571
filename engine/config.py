"""One config schema for every stage, in code.

The YAML keys are the reference's (`NAME`, `SEED`, `OUTPUT_DIR`, `DATA.*`, `MODEL.*`, `SOLVER.*`)
plus `TEST.*` for evaluation. Defaults live here, every key is documented by its `help`, and a
YAML file or `--opts KEY VALUE` override can only name keys that exist. Each stage reads the keys
it needs; the shipped YAML files set the values the paper uses for that stage.

Path conventions (so that overriding `DATA.ROOT` and `OUTPUT_DIR` re-targets the whole pipeline):
- `DATA.ROOT` and `MODEL.INIT` (when a path) are relative to the working directory.
- `DATA.PSEUDO_LABEL_DIR` is relative to `DATA.ROOT`.
- `MODEL.WEIGHTS` names an earlier stage's output and is relative to `OUTPUT_DIR`.
- A stage writes into its run folder `OUTPUT_DIR/NAME`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

# The choices of the keys below are defined where they are implemented, one dict each; the
# schema reads their names from the torch-free `names` modules beside them (or the dicts
# themselves where those import no torch), so loading a config imports no network and no torch.
from data.names import BOX_ARITHMETICS, FORMAT_NAMES
from exporters import EXPORTERS
from models.names import (BACKBONE_NAMES, LOSS_NAMES, MASK_RCNN_BACKBONE_NAMES, POOLINGS,
                          ROI_SAMPLINGS)
from utils.crf import CRF_BACKENDS
from utils.errors import BanaError
from utils.parsing import BoundedYamlLoader, read_text

# SOLVER.PARAM_GROUPS: the keys of engine.optim.PARAM_GROUPS (which imports torch).
PARAM_GROUP_NAMES = ("four", "two")
EXPORT_FORMATS = tuple(EXPORTERS)
# Which backbones each MODEL.TASK builds: DeepLab (stages 1-3) or Mask R-CNN (stage 3, instance).
TASK_BACKBONES = {"semantic": BACKBONE_NAMES, "instance": MASK_RCNN_BACKBONE_NAMES}
BACKBONES = tuple(dict.fromkeys(b for names in TASK_BACKBONES.values() for b in names))


def _key(default, help: str, choices=None, check: Callable[[Any], bool] | None = None,
         rule: str = ""):
    """A config field: its default, what it means, and what values are allowed."""
    meta = {"help": help, "choices": choices, "check": check, "rule": rule}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


def _unit(v) -> bool:
    return 0 <= v <= 1


@dataclass
class DataConfig:
    DATASET: str = _key("voc", "Dataset layout (data/datasets.py FORMATS): PASCAL VOC XML "
                        "(data/voc.py: VOC 2012, or any VOC-format export with DATA.CLASSES or a "
                        "labelmap.txt), COCO JSON (data/coco.py: MS-COCO 2017, or any "
                        "COCO-format export with DATA.CLASS_MAP all) or YOLO txt (data/yolo.py: "
                        "Ultralytics / Roboflow / darknet exports). The README's 'Exports we "
                        "read' lists the tools' layouts. On COCO, stage 2 also writes one "
                        "instance mask per box.",
                        choices=FORMAT_NAMES)
    CLASS_MAP: str = _key("voc20", "COCO only: the classes a box is labelled with; 'voc20' keeps the "
                          "20 categories VOC shares, numbered as VOC (a VOC-trained model, "
                          "NUM_CLASSES 21), 'coco80' all 80 of COCO 2017 (NUM_CLASSES 81), 'all' "
                          "every category of your annotation file, numbered 1..K by ascending "
                          "category id (NUM_CLASSES K + 1).",
                          choices=("voc20", "coco80", "all"))
    CLASSES: list[str] = _key([], "VOC and YOLO: your class names, background excluded (class k "
                              "is the k-th name), or the path of a file with one name per line "
                              "(CVAT / datumaro / LabelImg labelmap.txt works). VOC: empty = "
                              "DATA.ROOT/labelmap.txt if there is one, else the 20 PASCAL VOC "
                              "classes. YOLO: the names in the order of the label files' ids, "
                              "for exports without data.yaml, obj.names or classes.txt (globox); "
                              "where one exists, it must agree. COCO: unused (the JSON names "
                              "its categories).")
    ROOT: str = _key("datasets/VOC2012", "Dataset root (VOC: JPEGImages/, Annotations/, "
                     "ImageSets/, or one folder per split; COCO: annotation files and image "
                     "folders; YOLO: data.yaml, images/, labels/). Background masks are written to its BgMaskfromBoxes/ "
                     "on first use (DATA.BG_MASK_DIR moves them).")
    BG_MASK_DIR: str = _key("", "Folder of the background masks (1 outside every box, written "
                            "from the boxes on first use): '' = BgMaskfromBoxes/ under DATA.ROOT "
                            "(the authors' place); a folder relative to DATA.ROOT or absolute, "
                            "e.g. for a read-only dataset. It holds the same tree "
                            "BgMaskfromBoxes/ would (VOC: <id>.png; COCO, YOLO: <split>/<id>.png).")
    SPLIT: str = _key("train_aug", "The split the stage trains on (stage 1, 3) or labels (stage "
                      "2): VOC's ImageSets/Segmentation (or Main)/<SPLIT>.txt, COCO's "
                      "annotations/instances_<SPLIT>.json (e.g. train2017), YOLO's "
                      "images/<SPLIT>/. On COCO its categories number the classes.")
    VAL_SPLIT: str = _key("val", "Split used for validation during stage 3, on its images that "
                          "have a ground-truth mask; '' (or a split without masks) = train "
                          "without validation.")
    NUM_CLASSES: int = _key(21, "Number of classes including background.", check=lambda v: v >= 2,
                            rule=">= 2")
    BATCH_SIZE: int = _key(20, "Images per optimisation step (summed over all devices).",
                           check=_positive, rule="> 0")
    CROP_SIZE: int = _key(321, "Square training crop size in pixels.", check=_positive, rule="> 0")
    SCALE_RANGE: list[float] = _key([0.5, 1.5], "Random rescaling range [min, max] before the crop.",
                                    check=lambda v: len(v) == 2 and 0 < v[0] <= v[1],
                                    rule="two numbers 0 < min <= max")
    FLIP: bool = _key(True, "Random horizontal flip (p = 0.5) during training.")
    MAX_PIXELS: int = _key(16_000_000, "The most pixels (height x width) of an image that is "
                           "used whole: stage 2, evaluate.py and stage 3's validation label it "
                           "at its full size, with memory growing with it (the CRF alone about "
                           "0.8 GiB per megapixel: the README's 'Memory against image size'); a "
                           "larger one is refused before it is "
                           "decoded (stage 2 skips it and lists it at the end). Training crops "
                           "are not limited. 0 = no limit.",
                           check=lambda v: v >= 0, rule=">= 0")
    COLOR_JITTER: list[float] = _key([0.5, 0.5, 0.5, 0.0], "Colour jitter strength: brightness, "
                                     "contrast, saturation, hue.",
                                     check=lambda v: len(v) == 4 and all(x >= 0 for x in v),
                                     rule="four numbers >= 0")
    BOX_ARITHMETIC: str = _key("reference", "Stages 1 and 2: the coordinates of a box. "
                               "'reference' = the authors' arithmetic: stage 1's augmentation "
                               "scales a box by the drawn factor s (the image is resized to "
                               "round(side * s)), a box reaching the crop's right or bottom edge "
                               "ends at crop + 1 (x1 = -1 after a flip); stage 2 takes the boxes "
                               "through their float32 round trip x / ((W-1)/2) - 1, back with "
                               "x_n * (W-1)/2 + (W-1)/2, truncated (3.5 % of integer VOC "
                               "coordinates come back 1 px lower). 'pixel_edges' = boxes stay "
                               "on the image's pixel edges: scaled with the image, clipped to "
                               "[0, crop], truncated as they are in stage 2 (docs/SPEC.md §8).",
                               choices=BOX_ARITHMETICS)
    NUM_WORKERS: int = _key(4, "Data-loading worker processes per device.", check=_non_negative,
                            rule=">= 0")
    PSEUDO_LABEL_DIR: str = _key("Generation", "Folder of stage 2's Y_crf/ and Y_ret/ label maps, "
                                 "relative to DATA.ROOT (stage 2 writes it, stage 3 reads it).")
    PSEUDO_LABELS: list[str] = _key(["Y_crf", "Y_ret"], "Stage 3: the two label folders under "
                                    "PSEUDO_LABEL_DIR it trains on, in the roles of Y_crf and "
                                    "Y_ret (e.g. [Y_box, Y_box] trains on the filled boxes stage "
                                    "2 also writes: the box baseline).",
                                    check=lambda v: len(v) == 2 and all(v),
                                    rule="two folder names")
    EXPORTS: list[str] = _key([], "Stage 2: after labelling, export the masks into "
                              "PSEUDO_LABEL_DIR/exports/<format>/ for each format listed: coco "
                              "(instances JSON), yolo_seg (Ultralytics segment layout), voc "
                              "(SegmentationClass/Object PNGs); `python labels.py export` does "
                              "the same on any label folder.",
                              check=lambda v: all(x in EXPORT_FORMATS for x in v),
                              rule=f"a list of {', '.join(EXPORT_FORMATS)}")
    EXPORT_VARIANT: str = _key("Y_crf", "Stage 2: which masks DATA.EXPORTS writes: Y_crf (the "
                               "best pseudo label in the paper's and our measurements), Y_ret, "
                               "Y_box (the filled boxes) or agreement (Y_crf where Y_ret "
                               "agrees).", choices=("Y_crf", "Y_ret", "Y_box", "agreement"))
    EXCLUDE: str = _key("", "Stage 3: a file of image ids (one per line, '#' comments; the "
                        "review page's download) to leave out of training. Empty = none.")
    GT_IDS: str = _key("", "Semi-supervised setting: a list file of image ids whose GT masks "
                       "(SegmentationClassAug) replace the pseudo labels. Empty = none.")


@dataclass
class ModelConfig:
    BACKBONE: str = _key("vgg16", "Feature extractor.", choices=BACKBONES)
    # Deviation (docs/SPEC.md §8): 'imagenet' is torchvision's weights; the authors start VGG-16
    # from DeepLab's Caffe vgg16_20M, and their ResNet-101 code loads no weights at all.
    INIT: str = _key("imagenet", "Training stages (1 and 3) only: the backbone's initial "
                     "weights, 'imagenet' (torchvision weights), 'none' (random), or a path to a "
                     "state dict (torchvision layout or the authors' Caffe-converted "
                     "vgg_caffe.pth) or to a checkpoint of this project whose backbone to start "
                     "from (e.g. stage 3 from the stage-1 final.ckpt). Stage 2, evaluate.py and "
                     "predict.py load MODEL.WEIGHTS whole and do not read it.")
    INPUT_NORM: str = _key("auto", "Input normalisation; 'auto' follows the weights (Caffe BGR "
                           "mean for Caffe-converted VGG, ImageNet mean/std otherwise). Stage 2, "
                           "evaluate.py and predict.py take it from the checkpoint and refuse a "
                           "value other than 'auto' that contradicts it.",
                           choices=("auto", "caffe", "imagenet"))
    FC6_DILATION: int = _key(1, "VGG-16 fc6 dilation (1 in stage 1, 12 in stage 3). Stage 2, "
                             "evaluate.py and predict.py take it from the checkpoint and refuse "
                             "a value other than 1 that contradicts it.",
                             check=_positive, rule="> 0")
    WEIGHTS: str = _key("", "Checkpoint of an earlier stage, relative to OUTPUT_DIR (stage 2: the "
                        "stage-1 model; evaluate.py: the stage-3 model).")
    POOLING: str = _key("bap", "Stage-1 pooling: background-aware (bap) or global average (gap).",
                        choices=tuple(POOLINGS))
    ROI_SAMPLING: str = _key("reference", "Stage 1: how a box becomes its ROI cells. 'reference' "
                             "samples and pools exactly as the authors' code (grid_sample over "
                             "the box, attention on the samples, overlapping windows); "
                             "'roi_align' is a faster opt-in variant (attention at feature "
                             "pixels, one roi_align, disjoint cells) that pools the same region "
                             "with slightly different weights.",
                             choices=tuple(ROI_SAMPLINGS))
    ROI_SIZE: list[int] = _key([2, 2], "ROI grid per box (rows, cols) for foreground prototypes.",
                               check=lambda v: len(v) == 2 and all(x > 0 for x in v),
                               rule="two integers > 0")
    GRID_SIZE: int = _key(4, "G x G grid for background prototypes (stage 1: 4, stage 2: 1).",
                          check=_positive, rule="> 0")
    BG_FRACTION_MIN: float = _key(0.125, "Images whose background fraction is <= this use GAP for "
                                  "their boxes.", check=_unit, rule="in [0, 1]")
    BG_THRESHOLD: float = _key(0.99, "Stage 2: tau; background attention below tau * max is set to "
                               "0 in u0.", check=_unit, rule="in [0, 1]")
    USE_U0: bool = _key(True, "Stage 2: use the background attention u0 as the background unary "
                        "inside boxes (False = the 'Y_crf w/o u0' ablation).")
    U0_CHECK: int = _key(0, "Stage 2, ours (docs/SPEC.md §8): 0 = off (the authors' recipe). N > "
                         "0 = before labelling the split, label N of its images (evenly spaced) "
                         "with and without u0 and, if with u0 their mean Y_crf box fill is below "
                         "the plausible minimum (engine/label_quality.py MIN_FILL) while without "
                         "it is not, label the split without u0 (MODEL.USE_U0 false), saying so. "
                         "A weakly trained stage 1 (from scratch, few iterations) can give a "
                         "background attention that claims most of every box.",
                         check=_non_negative, rule=">= 0")
    DCRF: list[float] = _key([4, 55, 3, 3, 3], "DenseCRF [bi_w, bi_xy_std, bi_rgb_std, pos_w, "
                             "pos_xy_std] (stage 2, and evaluate.py's post-processing).",
                             check=lambda v: len(v) == 5 and v[0] >= 0 and v[3] >= 0
                             and min(v[1], v[2], v[4]) > 0,
                             rule="five numbers: weights >= 0, standard deviations > 0")
    CRF_BACKEND: str = _key("pydensecrf", "The DenseCRF implementation that MODEL.DCRF "
                            "configures (utils/crf.py CRF_BACKENDS).",
                            choices=tuple(CRF_BACKENDS))
    LOSS: str = _key("nal", "Stage-3 loss: noise-aware (nal), CE on Y_crf (ce_crf) or Y_ret "
                     "(ce_ret), reliable pixels only (baseline), entropy regularisation (er), "
                     "bootstrapping (bs).", choices=LOSS_NAMES)
    TEMPERATURE: float = _key(20.0, "T: logits = T * cosine similarity.", check=_positive,
                              rule="> 0")
    GAMMA: float = _key(7.0, "gamma: sharpness of the NAL confidence map.", check=_non_negative,
                        rule=">= 0")
    LAMBDA: float = _key(0.1, "lambda: weight of the loss term on unreliable pixels.",
                         check=_non_negative, rule=">= 0")
    BETA: float = _key(0.8, "Bootstrapping: weight of Y_crf in the soft target.", check=_unit,
                       rule="in [0, 1]")
    # Deviation when true (docs/SPEC.md §8): the authors' freeze_bn() fixes BatchNorm's
    # statistics only; true here fixes its affine parameters as well (DeepLab-V2's Caffe habit).
    FREEZE_BN: bool = _key(False, "Stage 3: keep BatchNorm statistics and affine parameters fixed.")
    TASK: str = _key("semantic", "Stage 3 and evaluate.py: 'semantic' trains and scores DeepLab "
                     "(mIoU); 'instance' trains torchvision's Mask R-CNN on instance masks of a "
                     "COCO-layout split and scores COCO mask and box AP (MODEL.BACKBONE tiny, "
                     "resnet50_fpn or resnet50_fpn_v2; MODEL.INIT imagenet = ResNet-50 ImageNet "
                     "backbone, coco = COCO detection (Faster R-CNN, no mask) weights, none, or "
                     "a path).", choices=("semantic", "instance"))
    INSTANCE_MASKS: str = _key("Y_crf", "Instance task: the masks Mask R-CNN trains on: stage 2's "
                               "Y_crf or Y_ret (the COCO export of DATA.PSEUDO_LABEL_DIR's labels), "
                               "box (each box filled: the baseline) or gt (the split's own "
                               "segmentations: the upper bound).",
                               choices=("Y_crf", "Y_ret", "box", "gt"))
    INSTANCE_SIZE: list[int] = _key([800, 1333], "Instance task: Mask R-CNN resizes each image "
                                    "so its short side is the first number and its long side at "
                                    "most the second (torchvision's min_size, max_size).",
                                    check=lambda v: len(v) == 2 and 0 < v[0] <= v[1],
                                    rule="two integers 0 < min <= max")


@dataclass
class SolverConfig:
    LR: float = _key(1e-3, "Base learning rate: of the pretrained weights; the other parameters "
                     "train at multiples of it (SOLVER.PARAM_GROUPS).", check=_positive,
                     rule="> 0")
    MOMENTUM: float = _key(0.9, "SGD momentum.", check=_unit, rule="in [0, 1]")
    WEIGHT_DECAY: float = _key(5e-4, "Weight decay (SOLVER.PARAM_GROUPS four: not on biases; two: "
                               "on every parameter).", check=_non_negative, rule=">= 0")
    PARAM_GROUPS: str = _key("auto", "Stages 1 and 3 (semantic): SGD parameter groups. 'four' = "
                             "pretrained weights 1x LR, pretrained biases 2x without decay, new "
                             "weights 10x, new biases 20x (the authors' VGG-16 code); 'two' = "
                             "the whole pretrained backbone, BatchNorm included, 1x and the new "
                             "layers (DeepLab-V2's four dilated convolutions, the classifier) "
                             "10x, all decayed (the authors' DeepLab_ASPP; the decay is inferred, "
                             "docs/SPEC.md §8); 'auto' = the authors' scheme for MODEL.BACKBONE: "
                             "four for vgg16 (and tiny, ours), two for resnet101 and "
                             "resnet101_torchvision.", choices=("auto", *PARAM_GROUP_NAMES))
    SCHEDULER: str = _key("multistep", "Learning-rate schedule.", choices=("multistep", "poly"))
    MILESTONES: list[int] = _key([5000], "Multistep: iterations where lr is multiplied by "
                                 "LR_DECAY.", check=lambda v: all(x > 0 for x in v),
                                 rule="integers > 0")
    LR_DECAY: float = _key(0.1, "Multistep: lr factor at each milestone.", check=_positive,
                           rule="> 0")
    POLY_POWER: float = _key(0.9, "Poly: lr = LR * (1 - it / MAX_ITER) ** POLY_POWER.",
                             check=_non_negative, rule=">= 0")
    MAX_ITER: int = _key(8000, "Number of optimisation steps.", check=_positive, rule="> 0")
    CKPT_EVERY: int = _key(1000, "Save the 'last' checkpoint every this many iterations.",
                           check=_positive, rule="> 0")
    # Ours (docs/SPEC.md §8): the authors validate the final model once; the curve is extra and
    # the model evaluate.py scores stays the final one.
    VAL_EVERY: int = _key(2000, "Stage 3: validate every this many iterations (and at the end).",
                          check=_positive, rule="> 0")
    LOG_EVERY: int = _key(20, "Log training scalars every this many iterations.",
                          check=_positive, rule="> 0")
    WARMUP_ITERS: int = _key(0, "Linear learning-rate warm-up over this many iterations (0 = "
                             "none, as the authors' stages 1 and 3).", check=_non_negative,
                             rule=">= 0")


@dataclass
class TestConfig:
    SPLIT: str = _key("val", "Split evaluate.py scores ('test' writes the VOC server layout).")
    SCALES: list[float] = _key([1.0, 0.5, 0.75, 1.5], "Multi-scale inference scales.",
                               check=lambda v: len(v) > 0 and all(x > 0 for x in v),
                               rule="a non-empty list of numbers > 0")
    FLIP: bool = _key(True, "Also average horizontally flipped inputs.")
    CRF: bool = _key(True, "Also report results after DenseCRF post-processing (MODEL.DCRF).")
    MAX_PIXELS: int = _key(4_000_000, "predict.py (and engine.predict.Segmenter): an image of "
                           "more pixels (height x width) is labelled downscaled to this many "
                           "(aspect kept; the network and the CRF at that size) and its labels "
                           "are scaled back up to the image (nearest), so that memory stays "
                           "bounded: the README's 'Memory against image size' measures it "
                           "(with the CRF, about 0.8 GiB per megapixel). 0 = no limit.",
                           check=lambda v: v == 0 or v >= 81, rule="0 (no limit) or >= 81")


PRECISIONS = ("32", "bf16-mixed", "16-mixed")


@dataclass
class TrainerConfig:
    PRECISION: str = _key("32", "Arithmetic of the networks: '32' (float32 everywhere, the "
                          "authors' numbers), 'bf16-mixed' (bfloat16 autocast: GPUs with bf16, "
                          "e.g. A100/H100, and CPUs) or '16-mixed' (float16 autocast with loss "
                          "scaling, CUDA only). Stages 1 and 3 train with Lightning's precision "
                          "plugin; stage 2, evaluate.py and predict.py run their backbone under "
                          "the same autocast. BAP's attention and prototypes, the cosine "
                          "classifier, the losses and every CRF input stay float32 (docs/SPEC.md "
                          "§9).", choices=PRECISIONS)


@dataclass
class Config:
    NAME: str = _key("stage1", "Run name; outputs go to OUTPUT_DIR/NAME.")
    SEED: int = _key(0, "Random seed (python, numpy, torch, data order, augmentation).")
    OUTPUT_DIR: str = _key("runs/voc", "Root of all run folders of one pipeline.")
    DATA: DataConfig = field(default_factory=DataConfig)
    MODEL: ModelConfig = field(default_factory=ModelConfig)
    SOLVER: SolverConfig = field(default_factory=SolverConfig)
    TEST: TestConfig = field(default_factory=TestConfig)
    TRAINER: TrainerConfig = field(default_factory=TrainerConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.OUTPUT_DIR) / self.NAME

    def output_path(self, path: str) -> Path:
        """A path naming an earlier stage's output: relative paths resolve against OUTPUT_DIR."""
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else Path(self.OUTPUT_DIR) / p

    @property
    def data_root(self) -> Path:
        return Path(os.path.expanduser(self.DATA.ROOT))

    @property
    def pseudo_label_dir(self) -> Path:
        # normpath: 'sub/../Gen' is DATA.ROOT/Gen even where DATA.ROOT/sub does not exist.
        p = Path(os.path.normpath(os.path.expanduser(self.DATA.PSEUDO_LABEL_DIR)))
        return p if p.is_absolute() else self.data_root / p

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: Path | None = None) -> Path:
        """Write the resolved config into the run folder (atomically)."""
        from utils.io import atomic_write_text

        path = Path(path) if path is not None else self.run_dir / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.dump())
        return path


def iter_keys(cfg_type=Config, prefix: str = ""):
    """Yield (dotted key, dataclass field) for every leaf key of the schema, in order."""
    for f in dataclasses.fields(cfg_type):
        t = _field_type(cfg_type, f)
        if dataclasses.is_dataclass(t):
            yield from iter_keys(t, prefix + f.name + ".")
        else:
            yield prefix + f.name, f


def key_value(cfg: Config, dotted: str):
    """The value of a key of `cfg` by its dotted name: key_value(cfg, "SOLVER.MAX_ITER")."""
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _field_type(cls, f):
    return typing.get_type_hints(cls)[f.name]


def _describe_type(t) -> str:
    if typing.get_origin(t) is list:
        return f"a list of {typing.get_args(t)[0].__name__}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[t]


class _StrictLoader(BoundedYamlLoader):
    """SafeLoader that refuses a key written twice in one mapping: PyYAML would keep the last
    one silently (a second `SOLVER:` section would drop every key of the first); and, as every
    YAML file here, one nested too deep or whose aliases expand without bound (an alias bomb in
    DATA.CLASSES would fill the memory when a message repeats the value)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise BanaError(f"the key '{key}' is written twice (lines {seen[key] + 1} and "
                                f"{key_node.start_mark.line + 1}); the second would silently "
                                "replace the first. Merge them into one.")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _coerce(value, t, where: str, raw: str | None = None):
    """Check `value` against the annotated type `t`; ints are accepted where floats are. What a
    person obviously means is accepted: `1e-3` (a string to YAML 1.1) as a number, `2024` as a
    name (with `raw`, the text as typed after --opts, so `1.10` stays `1.10`)."""
    bad = BanaError(f"{where}: expected {_describe_type(t)}, found {value!r} "
                    f"({type(value).__name__}).")
    if typing.get_origin(t) is list:
        item_t = typing.get_args(t)[0]
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, str) and item_t is str:
            value = [value]  # e.g. DATA.CLASSES labelmap.txt
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, item_t, where) for v in value]
    if t is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if t is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if t is str:
        if value is None:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return raw if raw is not None else str(value)
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported schema type {t}")


def _set(cfg: Config, dotted: str, value, source: str, raw: str | None = None,
         origin: dict | None = None) -> None:
    """Set one key (or a section's keys) of `cfg`, checked; `origin` records where each key's
    value came from (`source`), for the messages of `_validate`."""
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            prefix = ".".join(parts[:i])
            here = f"{prefix}." if prefix else ""
            raise BanaError(
                f"{source}: unknown config key '{dotted}'. Keys allowed under "
                f"'{prefix or 'the top level'}': {', '.join(here + n for n in names)}. "
                f"See configs/README.md for every key.")
        f = next(f for f in dataclasses.fields(node) if f.name == part)
        t = _field_type(type(node), f)
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(t):
                raise BanaError(f"{source}: '{'.'.join(parts[:i + 1])}' is a value, not a "
                                f"section, so '{dotted}' does not exist.")
            node = getattr(node, part)
            continue
        if dataclasses.is_dataclass(t):
            if not isinstance(value, dict):
                raise BanaError(f"{source}: '{dotted}' is a section; expected a mapping of its "
                                f"keys, found {value!r}.")
            for k, v in value.items():
                _set(cfg, f"{dotted}.{k}", v, source, origin=origin)
            return
        setattr(node, part, _coerce(value, t, f"{source}: {dotted}", raw))
        if origin is not None:
            origin[dotted] = source


def _validate(cfg: Config, source: str, origin: dict | None = None) -> None:
    """Check the values together; a message about one key names where its value came from (the
    file or `--opts KEY`: `origin`), else `source`."""
    origin = origin or {}

    def where(key: str) -> str:
        return origin.get(key, source)

    for dotted, f in iter_keys():
        value = key_value(cfg, dotted)
        choices, check = f.metadata.get("choices"), f.metadata.get("check")
        if choices and value not in choices:
            raise BanaError(f"{where(dotted)}: {dotted} = {value!r} is not allowed; choose one "
                            f"of {', '.join(map(str, choices))}.")
        if check and not check(value):
            raise BanaError(f"{where(dotted)}: {dotted} = {value!r} is impossible; it must be "
                            f"{f.metadata['rule']}.")
    if cfg.SOLVER.SCHEDULER == "multistep" and any(m >= cfg.SOLVER.MAX_ITER
                                                   for m in cfg.SOLVER.MILESTONES):
        raise BanaError(f"{source}: SOLVER.MILESTONES {cfg.SOLVER.MILESTONES} must all be "
                        f"below SOLVER.MAX_ITER = {cfg.SOLVER.MAX_ITER}.")
    if cfg.DATA.DATASET == "coco" and cfg.DATA.CLASS_MAP != "all":
        classes = {"voc20": 21, "coco80": 81}[cfg.DATA.CLASS_MAP]
        if cfg.DATA.NUM_CLASSES != classes:
            raise BanaError(f"{source}: DATA.CLASS_MAP {cfg.DATA.CLASS_MAP} has {classes - 1} "
                            f"classes plus background, so DATA.NUM_CLASSES must be {classes}, not "
                            f"{cfg.DATA.NUM_CLASSES}.")
    allowed = TASK_BACKBONES[cfg.MODEL.TASK]
    if cfg.MODEL.BACKBONE not in allowed:
        raise BanaError(f"{source}: MODEL.BACKBONE {cfg.MODEL.BACKBONE} does not fit MODEL.TASK "
                        f"{cfg.MODEL.TASK}; choose one of {', '.join(allowed)}.")
    if cfg.MODEL.TASK == "instance" and cfg.DATA.DATASET != "coco":
        raise BanaError(f"{source}: MODEL.TASK instance trains on COCO-format instance "
                        "annotations: set DATA.DATASET coco (stage 2 on a COCO-layout dataset "
                        "writes the pseudo instance masks).")
    if not re.fullmatch(r"[A-Za-z0-9_.+=-]+", cfg.NAME) or cfg.NAME in (".", ".."):
        raise BanaError(f"{source}: NAME = {cfg.NAME!r} must be a plain folder name (letters, "
                        "digits, '_', '-', '.', not '.' or '..'): the run is written to "
                        "OUTPUT_DIR/NAME and must stay inside OUTPUT_DIR.")
    for key, value in (("OUTPUT_DIR", cfg.OUTPUT_DIR), ("DATA.ROOT", cfg.DATA.ROOT),
                       ("DATA.PSEUDO_LABEL_DIR", cfg.DATA.PSEUDO_LABEL_DIR)):
        if not value.strip():
            raise BanaError(f"{where(key)}: {key} is empty, which would put the files in the "
                            "current folder (or DATA.ROOT) without saying so: give a folder, or "
                            "'.' for the current one.")
    label_dir = Path(os.path.expanduser(cfg.DATA.PSEUDO_LABEL_DIR))
    # 'sub/../Gen' is DATA.ROOT/Gen; only a path that ends up above DATA.ROOT is refused.
    if not label_dir.is_absolute() and os.path.normpath(label_dir).split(os.sep)[0] == "..":
        raise BanaError(f"{where('DATA.PSEUDO_LABEL_DIR')}: DATA.PSEUDO_LABEL_DIR = "
                        f"{cfg.DATA.PSEUDO_LABEL_DIR!r} leaves DATA.ROOT through '..': give a "
                        "folder inside DATA.ROOT, or an absolute path if the labels belong "
                        "elsewhere.")


def _leaf_type(dotted: str):
    """The annotated type of a key of the schema, or None for a section or an unknown key."""
    node = Config
    for part in dotted.split("."):
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return None
        f = next((f for f in dataclasses.fields(node) if f.name == part), None)
        if f is None:
            return None
        node = _field_type(node, f)
    return None if dataclasses.is_dataclass(node) else node


def parse_opts(opts: list[str]) -> list[tuple[str, Any]]:
    """`['A.B', '1', 'C', '[1, 2]']` -> `[('A.B', 1), ('C', [1, 2])]`: values are read as YAML,
    except for a key whose value is text (a path, a name): that takes the text as typed, so that
    `--opts DATA.ROOT "ds #1"` is the folder `ds #1`, not `ds` and a YAML comment (nor a YAML
    tag, quote or null). A list of texts takes one literal text unless written as `[...]`."""
    if len(opts) % 2:
        raise BanaError(f"--opts takes KEY VALUE pairs; got an odd number of items: {opts}.")
    pairs = []
    for key, raw in zip(opts[::2], opts[1::2]):
        t = _leaf_type(key)
        if t is str or (t == list[str] and not raw.lstrip().startswith("[")):
            pairs.append((key, raw))
            continue
        try:  # bounded: an alias bomb or a deep nest in a value is refused, not expanded
            value = yaml.load(raw, Loader=BoundedYamlLoader)  # noqa: S506 (a SafeLoader)
        except yaml.composer.ComposerError as err:
            raise BanaError(f"--opts {key}: {err.problem}.") from None
        except yaml.YAMLError:
            value = raw
        # A bare YAML scalar like `runs/x` stays a string; '' means an empty string.
        pairs.append((key, "" if raw == "" else value))
    return pairs


def load_config(path: str | Path | None = None, opts: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then `--opts` overrides; validated as a whole."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.yml"))[:6]
            raise BanaError(f"--config-file {path} is a folder; give one YAML file in it"
                            + (f", e.g. {', '.join(found)}" if found else "") + ".")
        if not path.is_file():
            raise BanaError(f"Config file {path} does not exist. Shipped configs live in "
                            "configs/ (e.g. configs/stage1.yml, configs/demo/stage1.yml).")
        text = read_text(path, "config file")
        try:
            data = yaml.load(text, Loader=_StrictLoader)
        except BanaError as e:
            raise BanaError(f"{path}: {e}") from None
        except yaml.YAMLError as e:
            raise BanaError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
        if data is None:
            raise BanaError(f"{path} is empty: a config file sets at least the keys of its stage "
                            "(see the shipped configs in configs/, e.g. configs/stage1.yml).")
        if not isinstance(data, dict):
            raise BanaError(f"{path}: expected a mapping of config keys at the top level, "
                            f"found {type(data).__name__}.")
        origin: dict[str, str] = {}
        for key, value in data.items():
            _set(cfg, str(key), value, str(path), origin=origin)
    else:
        origin = {}
    raw_opts = list(opts or [])
    for (key, value), raw in zip(parse_opts(raw_opts), raw_opts[1::2]):
        _set(cfg, key, value, f"--opts {key}", raw, origin=origin)
    _validate(cfg, str(path) if path is not None else "config", origin)
    return cfg


def schema_markdown() -> str:
    """Every key with its default and meaning: the body of configs/README.md."""
    lines = ["# Config keys", "",
             "Generated from `engine/config.py` by `python -m engine.config > configs/README.md`; "
             "a test checks it is current.", "",
             "Every stage script takes `--config-file FILE` and `--opts KEY VALUE ...` "
             "(values are read as YAML, e.g. `--opts SOLVER.MAX_ITER 100 MODEL.ROI_SIZE [2,2]`, "
             "except that a text key (a path, a name) takes the value as typed: `--opts "
             "DATA.ROOT 'ds #1'` is the folder `ds #1`). "
             "Unknown keys, wrong types and impossible values are errors.", "",
             "| key | default | allowed | meaning |", "|---|---|---|---|"]
    defaults = Config()
    for dotted, f in iter_keys():
        value = key_value(defaults, dotted)
        allowed = (" \\| ".join(map(str, f.metadata["choices"])) if f.metadata.get("choices")
                   else f.metadata.get("rule") or "")
        lines.append(f"| `{dotted}` | `{value!r}` | {allowed} | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(schema_markdown(), end="")
