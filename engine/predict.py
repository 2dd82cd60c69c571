"""Label maps for new images with a trained stage-3 model (predict.py).

Inputs are image files, folders of images (not recursive) and list files (`.txt`, one path per
line, relative to the list's folder). For each image `<stem>.<ext>` it writes
    <output>/<stem>.png            palette PNG, class ids 0..K, the size of the image as shown
    <output>/overlay/<stem>.jpg    the image with the classes painted over it and a legend
with the most refined configured mode (TEST.SCALES / TEST.FLIP / TEST.CRF, as evaluate.py).
Images whose two outputs exist are skipped, so a killed run resumes. The inference functions
are evaluate.py's, so a single-scale prediction here is the label evaluate.py scores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from utils.config import Config
from utils.errors import BanaError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".gif")
OVERLAY_DIR = "overlay"


def list_images(inputs: list[str]) -> list[Path]:
    """The image files named by `inputs` (files, folders, .txt lists), in the given order,
    folders sorted by name. Every missing path is named in one error; two images with one stem
    would write one output and are refused."""
    found, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file() and path.suffix.lower() == ".txt":
            for line in path.read_text().splitlines():
                if line.strip():
                    entry = Path(line.strip())
                    entry = entry if entry.is_absolute() else path.parent / entry
                    (found if entry.is_file() else missing).append(entry)
        elif path.is_file():
            found.append(path)
        else:
            missing.append(path)
    if missing:
        raise BanaError(f"--input: {len(missing)} path(s) do not exist: "
                        f"{', '.join(map(str, missing[:5]))}.")
    if not found:
        raise BanaError(f"--input {' '.join(inputs)}: no images found (looked for "
                        f"{', '.join(IMAGE_SUFFIXES)}).")
    stems: dict[str, Path] = {}
    for p in found:
        if p.stem in stems and stems[p.stem] != p:
            raise BanaError(f"{stems[p.stem]} and {p} would both be written as {p.stem}.png: "
                            "rename one, or predict them in two runs with different --output.")
        stems[p.stem] = p
    return list(dict.fromkeys(found))


def overlay(image: np.ndarray, label: np.ndarray, names) -> np.ndarray:
    """image uint8 (H, W, 3) with the non-background classes blended in (alpha 0.5), and below
    it a legend of the classes present (22 px per row): uint8 (H + legend, W, 3)."""
    import cv2

    from utils.palette import colorize

    colours = colorize(label)
    blended = image.copy()
    objects = label > 0
    blended[objects] = (0.5 * image[objects] + 0.5 * colours[objects]).astype(np.uint8)
    present = [int(c) for c in np.unique(label) if 0 < c < len(names)]
    if not present:
        return blended
    # Legend items (swatch + name) laid out left to right, wrapping onto new rows.
    width, rows, x = image.shape[1], [[]], 4
    for c in present:
        item = 24 + 8 * len(str(names[c]))
        if x + item > width and rows[-1]:
            rows.append([])
            x = 4
        rows[-1].append((c, x))
        x += item
    legend = np.full((22 * len(rows), width, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, x in row:
            colour = tuple(int(v) for v in colorize(np.array([[c]]))[0, 0])
            cv2.rectangle(legend, (x, 22 * r + 5), (x + 12, 22 * r + 17), colour, -1)
            cv2.putText(legend, str(names[c]), (x + 16, 22 * r + 16), cv2.FONT_HERSHEY_SIMPLEX,
                        0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([blended, legend], 0)


def check_inputs(cfg: Config, args: argparse.Namespace):
    """Images, checkpoint and output folder, checked before the model is loaded."""
    from engine.evaluate import _checkpoint_path, _make_crf, modes_of
    from engine.preflight import Problems, require_checkpoint, require_writable

    problems = Problems("predict.py")
    images = problems.check(lambda: list_images(args.input))
    ckpt_path = problems.check(lambda: _checkpoint_path(cfg, args))
    if ckpt_path is not None:
        problems.check(lambda: require_checkpoint(
            ckpt_path, "the stage-3 checkpoint (MODEL.WEIGHTS, relative to OUTPUT_DIR, or "
            "--checkpoint)", "Train stage 3 first, or pass --checkpoint PATH."))
    mode = modes_of(cfg)[-1]
    crf = problems.check(lambda: _make_crf(cfg, [mode]))
    problems.check(lambda: require_writable(Path(args.output), "--output"))
    problems.raise_if_any()
    return images, ckpt_path, mode, crf


def predict_image(cfg: Config, net, image: np.ndarray, mode: str, crf, device) -> np.ndarray:
    """uint8 (H, W) class ids of one RGB image in `mode` ("single", "multiscale", "+crf")."""
    from engine.evaluate import crf_postprocess, predict_multiscale

    from utils.precision import inference_autocast

    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().to(device)
    with torch.inference_mode(), inference_autocast(cfg.TRAINER.PRECISION, device):
        if mode.startswith("single"):
            cos = net(x[None], out_size=x.shape[-2:])[0]
        else:
            cos = predict_multiscale(net, x, cfg.TEST.SCALES, cfg.TEST.FLIP)
    if mode.endswith("+crf"):
        return crf_postprocess(crf, image, cos.float().cpu().numpy(), cfg.MODEL.TEMPERATURE)
    return cos.argmax(0).byte().cpu().numpy()


def run(cfg: Config, args: argparse.Namespace) -> dict:
    """Predict every input image (skipping those done); returns counts and images/s."""
    from utils.runlock import RunLock, clean_temporary_files

    from utils.distributed import barrier, detect_launch

    images, ckpt_path, mode, crf = check_inputs(cfg, args)
    launch = detect_launch()
    with RunLock(args.output, "predict.py"):
        if launch.is_main:
            clean_temporary_files(args.output)
        barrier(launch)
        return _predict(cfg, args, images, ckpt_path, mode, crf, launch)


def _predict(cfg: Config, args, images, ckpt_path, mode, crf, launch) -> dict:
    from tqdm import tqdm

    from engine.evaluate import _device, load_model, prepare_network
    from utils.distributed import announce_shard, barrier, shard
    from utils.io import atomic_write_jpeg, atomic_write_png, read_image
    from utils.palette import voc_palette

    out = Path(args.output)
    device = _device(args.gpu_id, launch, cfg.TRAINER.PRECISION)
    images = shard(images, launch)
    announce_shard(launch, len(images))
    todo = [p for p in images if not ((out / f"{p.stem}.png").is_file()
                                      and (out / OVERLAY_DIR / f"{p.stem}.jpg").is_file())]
    net = prepare_network(load_model(ckpt_path, cfg), device)
    meta = net.meta
    names = meta.get("classes") or [f"class_{c}" for c in range(meta["num_classes"])]
    print(f"Predicting {len(todo)} image(s) ({len(images) - len(todo)} already done) with "
          f"{ckpt_path}, mode {mode}; writing {out}/<stem>.png and {out}/{OVERLAY_DIR}/.")
    start = time.perf_counter()
    for path in tqdm(todo, desc="predict", unit="img", dynamic_ncols=True):
        image = read_image(path, exif=True)
        label = predict_image(cfg, net, image, mode, crf, device)
        atomic_write_png(out / f"{path.stem}.png", label, palette=voc_palette())
        atomic_write_jpeg(out / OVERLAY_DIR / f"{path.stem}.jpg", overlay(image, label, names))
    seconds = time.perf_counter() - start
    barrier(launch)  # the run ends when every shard is written
    speed = len(todo) / seconds if todo and seconds > 0 else None
    print(f"Done: {len(todo)} image(s) in {seconds:.1f} s"
          + (f" ({speed:.2f} images/s)." if speed else "."))
    return {"images": len(images), "predicted_now": len(todo), "seconds": round(seconds, 2),
            "images_per_second": round(speed, 3) if speed else None, "mode": mode,
            "output": str(out)}
