"""The inference every consumer of a trained model shares (SPEC §5): evaluate.py, predict.py and
its `Segmenter`, stage 3's validation, the instance task's evaluation and the demo.

Shape shorthand: N images, C classes, H×W image, h×w a rescaled input.

A mode is how a label map is made from the network: "single" (scale 1, no flip), "multiscale"
(TEST.SCALES, TEST.FLIP: cosine scores averaged over the copies) and either of them with "+crf"
(softmax(T·cos) refined by the DenseCRF of MODEL.DCRF, in `utils.crf.labels_job`, which runs in
worker processes without torch). `inference_modes` says which a setting computes, `mode_scores`
runs the network for one, `crf_job` hands its scores to the CRF and `argmax_labels` takes the
arg-max.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import BanaError

if TYPE_CHECKING:
    from engine.config import Config

EVAL_DIR = "eval"  # the folder of a run that evaluate.py writes (semantic and instance)
STAGE3_HINT = ("Train stage 3 first (python stage3.py --config-file CONFIG) with the same "
               "OUTPUT_DIR, or pass --checkpoint PATH.")


def inference_modes(scales, flip: bool, crf: bool) -> list[str]:
    """The modes of a setting (TEST.SCALES, TEST.FLIP, TEST.CRF), the most refined last: single
    always, multiscale unless scales is (1.0,) without flip, and each of them "+crf" with crf."""
    found = ["single"]
    if [float(s) for s in scales] != [1.0] or flip:
        found.append("multiscale")
    if crf:
        found += [f"{m}+crf" for m in found]
    return found


def modes_of(cfg: Config) -> list[str]:
    """The configured evaluation modes, the most refined last."""
    return inference_modes(cfg.TEST.SCALES, cfg.TEST.FLIP, cfg.TEST.CRF)


def single_scale(net, images: torch.Tensor) -> torch.Tensor:
    """Cosine scores (N, C, H, W) of images float (N, 3, H, W) RGB 0..255, at their own size."""
    return net(images, out_size=images.shape[-2:])


def predict_multiscale(net, image: torch.Tensor, scales, flip: bool) -> torch.Tensor:
    """Cosine scores averaged over rescaled (and mirrored) copies of one image, at full size.

    image: float (3, H, W) RGB 0..255; net(images (N, 3, h, w), out_size) -> (N, C, *out_size).
    Each copy is resized to (⌊H·s⌋, ⌊W·s⌋), as the authors' `interpolate(scale_factor=s)`,
    bilinearly with align_corners=True, and its scores come back at H×W. A mirrored
    copy's scores are mirrored back before averaging. Cosine scores, not probabilities, are
    averaged (SPEC §5). Returns float (C, H, W).
    """
    height, width = image.shape[-2:]
    batch = image[None]
    total, count = None, 0
    for scale in scales:
        size = (max(1, math.floor(height * scale)), max(1, math.floor(width * scale)))
        x = batch if size == (height, width) else F.interpolate(
            batch, size=size, mode="bilinear", align_corners=True)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        cos = net(x, out_size=(height, width))
        if flip:
            cos = torch.stack([cos[0], cos[1].flip(-1)])
        part = cos.sum(0)
        total = part if total is None else total + part
        count += cos.shape[0]
    return total / count


def mode_scores(net, image: torch.Tensor, mode: str, scales, flip: bool) -> torch.Tensor:
    """Cosine scores (C, H, W) of one image float (3, H, W) in `mode` ("single" or "multiscale";
    a "+crf" mode starts from the scores of its base), before the CRF. The caller chooses the
    inference mode and the autocast."""
    if mode.removesuffix("+crf") == "single":
        return single_scale(net, image[None])[0]
    return predict_multiscale(net, image, scales, flip)


def argmax_labels(scores: torch.Tensor) -> np.ndarray:
    """The label map uint8 (H, W) of cosine scores (C, H, W): the arg-max class."""
    return scores.argmax(0).byte().cpu().numpy()


def crf_job(crf, image: np.ndarray, scores: torch.Tensor, temperature: float) -> dict:
    """The CRF post-processing of one image as a job for `utils.crf.labels_job` (run in a worker
    process): image uint8 (H, W, 3), the real RGB image, as SPEC §7 says (the authors' script
    hands the CRF the mean-subtracted input cast to uint8, a bug we do not copy: docs/SPEC.md
    §8); scores (C, H, W) the cosine scores of `mode_scores`."""
    # pydensecrf takes a writable C-ordered image (np.asarray of a PIL image is read-only).
    return {"crf": crf, "image": np.require(image, requirements="CW"),
            "cos": scores.float().cpu().numpy(), "temperature": temperature}


def crf_for_modes(cfg: Config, modes: list[str]):
    """The DenseCRF of MODEL.DCRF when a "+crf" mode is configured, else None."""
    from utils.crf import make_crf

    if not any(m.endswith("+crf") for m in modes):
        return None
    try:
        return make_crf(cfg.MODEL.DCRF, cfg.MODEL.CRF_BACKEND)
    except BanaError as e:
        raise BanaError(f"{e} Or set TEST.CRF false.") from None


def checkpoint_path(cfg: Config, checkpoint: str | None = None) -> Path:
    """The model to evaluate: `checkpoint` (--checkpoint) if given, else MODEL.WEIGHTS."""
    if checkpoint:
        return Path(checkpoint)
    if cfg.MODEL.WEIGHTS:
        return cfg.output_path(cfg.MODEL.WEIGHTS)
    raise BanaError("no model to evaluate: set MODEL.WEIGHTS (relative to OUTPUT_DIR, e.g. "
                    "--opts MODEL.WEIGHTS stage3_vgg/checkpoints/final.ckpt) or pass "
                    "--checkpoint PATH.")


def load_model(path: Path, cfg: Config | None = None, classes=None):
    """The stage-3 DeepLab of a checkpoint, in eval mode, rebuilt from the checkpoint's own
    description (`net.spec`: backbone, classes, fc6 dilation, input normalisation). With `cfg`,
    a backbone or class count that contradicts MODEL.BACKBONE / DATA.NUM_CLASSES is an error;
    with `classes` (the data's names) its class names are compared with them (`match_classes`)
    and its outputs taken in the data's order."""
    from engine.runs import expectations, match_classes, reorder_classifier
    from models.zoo import read_checkpoint

    hint = ("Use the config the model was trained with, or another checkpoint. " + STAGE3_HINT)
    ckpt = read_checkpoint(path, stage=3, kind="deeplab",
                           expect=expectations(cfg) if cfg is not None else None, hint=hint)
    order = match_classes(ckpt, classes, "evaluate.py") if classes is not None else None
    return reorder_classifier(ckpt.network(hint), order)


def inference_device(gpu_id: str, launch=None, precision: str = "32") -> torch.device:
    """This process's device: under torchrun / srun the one of its local rank, else the first
    of --gpu-id (evaluation and prediction run one process per device). Refuses a precision the
    device cannot run."""
    from utils.devices import resolve_devices
    from utils.distributed import detect_launch
    from utils.precision import check_precision

    launch = launch or detect_launch()
    devices = resolve_devices(gpu_id, launch=launch)
    check_precision(precision, devices.accelerator)
    if launch.is_main:
        print(devices.note)
    if devices.accelerator == "gpu" and devices.count > 1 and not launch.distributed:
        print(f"Evaluation runs on one device: using GPU {devices.devices[0]} (torchrun "
              "--nproc_per_node N shards the images over N devices).")
    return devices.device_of(launch.local_rank if launch.distributed else 0)


def prepare_network(net, device: torch.device):
    """`net` on `device`, in channels-last memory order on a GPU (faster convolutions under
    autocast)."""
    net = net.to(device)
    return net.to(memory_format=torch.channels_last) if device.type == "cuda" else net
