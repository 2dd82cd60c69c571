"""Label maps for new images with a trained stage-3 model: `Segmenter` in Python, predict.py
from the shell.

    from engine.predict import Segmenter
    seg = Segmenter("runs/stage3_vgg/checkpoints/final.ckpt", device="cpu",
                    scales=(1.0,), flip=False, crf=False)   # these are the defaults
    label = seg(image)  # (H, W, 3) uint8 RGB numpy array -> (H, W) uint8 class ids
    seg.classes         # class names, index = id

Everything a `Segmenter` needs comes from the checkpoint (the network, its class names, the
cosine temperature and the DenseCRF parameters of its run), so no config file is needed.

predict.py takes image files, folders of images (not recursive) and list files (`.txt`, one path
per line, relative to the list's folder). For each image `<stem>.<ext>` it writes
    <output>/<stem>.png            palette PNG, class ids 0..K, the size of the image as shown
    <output>/overlay/<stem>.jpg    the image with the classes painted over it and a legend
with the config's TEST.SCALES / TEST.FLIP / TEST.CRF (its most refined mode, as evaluate.py),
through a `Segmenter` whose CRF runs in worker processes. Images whose two outputs exist are
skipped, so a killed run resumes. The inference is engine/inference.py's, as evaluate.py's is, so a
single-scale prediction here is the label evaluate.py scores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.inference import (STAGE3_HINT, argmax_labels, checkpoint_path, crf_for_modes,
                              crf_job, inference_device, inference_modes, mode_scores, modes_of,
                              prepare_network)
from utils.errors import BanaError

if TYPE_CHECKING:
    from engine.config import Config

OVERLAY_DIR = "overlay"
# What each output was made from (utils/records.py): the model, the settings, the image.
LEDGER = "predictions.jsonl"
# TEST.MAX_PIXELS's default: below it, an image is labelled at its own size (as before the key).
DEFAULT_MAX_PIXELS = 4_000_000


def list_images(inputs: list[str], recursive: bool = False, skipped: list | None = None,
                exclude: Path | None = None) -> list[Path]:
    """The image files named by `inputs` (files, folders, .txt lists), in the given order,
    folders sorted by name (with `recursive`, their sub-folders too, except the folder
    `exclude`: predict.py's --output). Every missing path is named in one error; two images with
    one stem would write one output and are refused. What a folder holds besides images (other
    files; sub-folders, without `recursive`) is appended to `skipped` as (path, why)."""
    from utils.io import IMAGE_SUFFIXES_SHOWN, image_files

    found, missing = [], []
    skipped = skipped if skipped is not None else []
    exclude = Path(exclude).resolve() if exclude is not None else None

    def excluded(p: Path) -> bool:
        return exclude is not None and (p.resolve() == exclude or exclude in p.resolve().parents)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = [p for p in image_files(path, recursive) if not excluded(p)]
            found += images
            listed = set(images)
            for p in sorted(path.rglob("*") if recursive else path.iterdir()):
                if p in listed or (recursive and p.is_dir()) or excluded(p):
                    continue
                skipped.append((p, "a sub-folder" if p.is_dir() else "not an image"))
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
        raise BanaError(f"--input: {len(missing)} path(s) do not exist or are not files: "
                        f"{', '.join(map(str, missing[:5]))}.")
    if not found:
        raise BanaError(f"--input {' '.join(inputs)}: no images found (looked for "
                        f"{IMAGE_SUFFIXES_SHOWN}"
                        + ("; the folders hold sub-folders: pass --recursive to search them"
                           if any(p.is_dir() for p, _ in skipped) else "") + ").")
    stems: dict[str, Path] = {}
    for p in found:
        if p.stem in stems and stems[p.stem] != p:
            raise BanaError(f"{stems[p.stem]} and {p} would both be written as {p.stem}.png: "
                            "rename one, or predict them in two runs with different --output.")
        stems[p.stem] = p
    return list(dict.fromkeys(found))


def describe_skipped_inputs(skipped: list) -> str | None:
    """One line saying what --input left out of its folders and why (None if nothing)."""
    if not skipped:
        return None
    folders = [p for p, _ in skipped if p.is_dir()]
    files = [p for p, _ in skipped if not p.is_dir()]

    def some(paths) -> str:
        return ", ".join(str(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")

    parts = ([f"{len(files)} file(s) that are not images by their extension ({some(files)})"]
             if files else []) + \
        ([f"{len(folders)} sub-folder(s) ({some(folders)}; pass --recursive to read their "
          "images)"] if folders else [])
    return "--input: left out " + " and ".join(parts) + "."


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


class Segmenter:
    """A trained stage-3 model as a function of an image (see the module doc).

    checkpoint: the path of a stage-3 checkpoint of this project (e.g. `final.ckpt`), or one
    already read (`models.zoo.read_checkpoint`); device: a torch device ("cpu", "cuda"); scales, flip: multi-scale and mirrored inference
    (SPEC §5; scales (1.0,) and no flip = single scale); crf: DenseCRF post-processing with the
    run's MODEL.DCRF and MODEL.CRF_BACKEND; precision: TRAINER.PRECISION's autocast for the
    network ("32", "bf16-mixed", "16-mixed"). dcrf, crf_backend and temperature override the
    checkpoint's values. max_pixels (TEST.MAX_PIXELS; 0 = no limit): a larger image is labelled
    downscaled to that many pixels (network and CRF) and its labels are scaled back up (nearest),
    so that the memory a call takes is bounded whatever the image's size.
    """

    def __init__(self, checkpoint, device="cpu", scales=(1.0,), flip: bool = False,
                 crf: bool = False, precision: str = "32", dcrf=None,
                 crf_backend: str | None = None, temperature: float | None = None,
                 max_pixels: int = 0):
        from models.zoo import Checkpoint, read_checkpoint
        from utils.crf import make_crf

        self.device = torch.device(device)
        self.scales = tuple(float(s) for s in scales)
        if not self.scales or min(self.scales) <= 0:
            raise BanaError(f"scales {scales}: give at least one scale, each > 0.")
        self.flip, self.precision = bool(flip), precision
        self.max_pixels = int(max_pixels)
        if not isinstance(checkpoint, Checkpoint):
            checkpoint = read_checkpoint(checkpoint, stage=3, kind="deeplab", hint=STAGE3_HINT)
        self.net = prepare_network(checkpoint.network(STAGE3_HINT), self.device)
        spec = checkpoint.spec
        self.classes = tuple(spec.classes or (f"class_{c}" for c in range(spec.num_classes)))
        model = checkpoint.config.get("MODEL", {})
        self.temperature = float(temperature if temperature is not None
                                 else model.get("TEMPERATURE", 20.0))
        self.dcrf = list(dcrf if dcrf is not None else model.get("DCRF", [4, 55, 3, 3, 3]))
        backend = crf_backend or model.get("CRF_BACKEND", "pydensecrf")
        self.crf = make_crf(self.dcrf, backend) if crf else None

    @property
    def mode(self) -> str:
        """The evaluate.py mode this segmenter computes: single / multiscale, "+crf"."""
        return inference_modes(self.scales, self.flip, self.crf is not None)[-1]

    def scores(self, image: np.ndarray, what: str = "the image") -> torch.Tensor:
        """Cosine scores float32 (C, H, W) of an (H, W, 3) uint8 RGB image, before the CRF; an
        image too small for the network at its smallest scale is refused, named `what`."""
        from utils.precision import inference_autocast

        mode = self.mode
        image = _checked_image(image, self.scales if mode.startswith("multi") else (1.0,), what)
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
        x = x.to(self.device)
        with torch.inference_mode(), inference_autocast(self.precision, self.device):
            return mode_scores(self.net, x, mode, self.scales, self.flip).float()

    def crf_job(self, image: np.ndarray, scores: torch.Tensor) -> dict:
        """The CRF of one image as a job for `utils.crf.labels_job` (in a worker process)."""
        return crf_job(self.crf, _checked_image(image), scores, self.temperature)

    def fit(self, image: np.ndarray) -> np.ndarray:
        """The image the network and the CRF see: `image` itself, or, above max_pixels, the
        image downscaled (area-averaged, aspect kept) to at most max_pixels pixels."""
        height, width = image.shape[:2]
        if not self.max_pixels or height * width <= self.max_pixels:
            return image
        from PIL import Image

        scale = (self.max_pixels / (height * width)) ** 0.5
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        return np.array(Image.fromarray(image).resize(size, Image.Resampling.BOX))

    @staticmethod
    def full_size(label: np.ndarray, shape) -> np.ndarray:
        """A label map of a fitted image, scaled back (nearest) to the image's (H, W)."""
        if label.shape == tuple(shape[:2]):
            return label
        from PIL import Image

        return np.array(Image.fromarray(label).resize((shape[1], shape[0]),
                                                      Image.Resampling.NEAREST))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W) uint8 class ids of an (H, W, 3) uint8 RGB image."""
        from utils.crf import labels_job

        small = self.fit(_checked_image(image))
        scores = self.scores(small)
        if self.crf is None:
            return self.full_size(argmax_labels(scores), image.shape)
        return self.full_size(labels_job(self.crf_job(small, scores)), image.shape)


def _checked_image(image, scales=(1.0,), what="the image") -> np.ndarray:
    from data.base import check_side

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise BanaError(f"expected an (H, W, 3) uint8 RGB image, got a {image.dtype} array of "
                        f"shape {image.shape} (utils.io.read_image reads any file that way).")
    check_side(*image.shape[:2], what, scales)
    return image


def output_paths(out: Path, image: Path) -> tuple[Path, Path]:
    """The label map and the overlay predict.py writes for `image`."""
    return out / f"{image.stem}.png", out / OVERLAY_DIR / f"{image.stem}.jpg"


def check_outputs_spare_inputs(out: Path, images: list[Path]) -> None:
    """An output may never replace an input: refuse an --output where a label map or overlay
    would be written over one of the input images."""
    inputs = {p.resolve() for p in images}
    clashes = [(image, path) for image in images for path in output_paths(out, image)
               if path.resolve() in inputs]
    if clashes:
        image, path = clashes[0]
        raise BanaError(f"--output {out} would write {path} over the input image {image} "
                        f"({len(clashes)} such output(s)): choose an --output folder apart from "
                        "the images.")


def check_inputs(cfg: Config, inputs: list[str], output, checkpoint: str | None,
                 recursive: bool = False):
    """Images, checkpoint and output folder, checked before the model is loaded; returns (the
    images, the checkpoint path). What the input folders hold besides images is said."""
    from engine.preflight import Problems, require_checkpoint, require_writable

    problems = Problems("predict.py")
    left_out: list = []
    images = problems.check(lambda: list_images(inputs, recursive, left_out,
                                                exclude=Path(output) if recursive else None))
    note = describe_skipped_inputs(left_out)
    if note:
        print(note, flush=True)
    if images is not None:
        problems.check(lambda: check_outputs_spare_inputs(Path(output), images))
    ckpt_path = problems.check(lambda: checkpoint_path(cfg, checkpoint))
    if ckpt_path is not None:
        problems.check(lambda: require_checkpoint(
            ckpt_path, "the stage-3 checkpoint (MODEL.WEIGHTS, relative to OUTPUT_DIR, or "
            "--checkpoint)", "Train stage 3 first, or pass --checkpoint PATH."))
    problems.check(lambda: crf_for_modes(cfg, modes_of(cfg)[-1:]))
    problems.check(lambda: require_writable(Path(output), "--output"))
    problems.raise_if_any()
    return images, ckpt_path


def run(cfg: Config, *, inputs: list[str], output, checkpoint: str | None = None,
        devices: str = "0", workers: int | None = None, overwrite: bool = False,
        recursive: bool = False) -> dict:
    """Predict every input image (skipping those done from the same model, settings and image);
    returns counts and images/s.

    inputs: image files, folders of images and .txt lists; output: the folder for <stem>.png
    and overlay/<stem>.jpg; checkpoint: the model (default MODEL.WEIGHTS under OUTPUT_DIR);
    devices: as --gpu-id; workers: CRF processes (None = the number of cores, 0 = here);
    overwrite: predict again the images whose outputs exist but were made otherwise (another
    model or settings, another image of that name) or not by predict.py, replacing them;
    recursive: read the images of the input folders' sub-folders too. An image that cannot be
    read or used is skipped, the others predicted, and the run ends with
    `utils.skips.SkippedImages` listing each skipped image and why (exit status 2)."""
    from utils.distributed import barrier, detect_launch
    from utils.runlock import RunLock, clean_temporary_files

    images, ckpt_path = check_inputs(cfg, inputs, output, checkpoint, recursive)
    launch = detect_launch()
    with RunLock(output, "predict.py"):
        if launch.is_main:
            clean_temporary_files(output)
        barrier(launch)
        return _predict(cfg, Path(output), devices, workers, images, ckpt_path, launch,
                        overwrite)


def _stale_outputs(out: Path, images: list[Path], run: str, prints: dict) -> dict[str, list]:
    """The images whose two outputs exist, by why they cannot count as done: {"model or
    settings": [...], "image": [...], "no record": [...]} (empty lists left out)."""
    from utils.records import Ledger

    recorded = Ledger(out / LEDGER).read()
    stale: dict[str, list] = {}
    for image in images:
        if not all(p.is_file() for p in output_paths(out, image)):
            continue
        entry = recorded.get(image.stem)
        why = ("no record" if entry is None else "model or settings" if entry["run"] != run
               else "image" if entry["image"] != prints[image] else None)
        if why:
            stale.setdefault(why, []).append(image)
    return stale


def _predict(cfg: Config, out: Path, devices, workers, images, ckpt_path, launch,
             overwrite: bool) -> dict:
    import os

    from tqdm import tqdm

    from engine.runs import expectations
    from models.zoo import read_checkpoint
    from utils.crf import labels_job
    from utils.distributed import announce_shard, barrier, shard
    from utils.io import atomic_write_jpeg, atomic_write_png, read_image
    from utils.palette import voc_palette
    from utils.pool import WorkerPool
    from utils.records import Ledger, file_sha256, fingerprint
    from utils.skips import Skips

    device = inference_device(devices, launch, cfg.TRAINER.PRECISION)
    images = shard(images, launch)
    announce_shard(launch, len(images))
    # Read once, and it must fit the config's backbone and classes.
    ckpt = read_checkpoint(ckpt_path, stage=3, kind="deeplab", expect=expectations(cfg),
                           hint="Use the config the model was trained with, or another "
                                "checkpoint. " + STAGE3_HINT)
    seg = Segmenter(ckpt, device, scales=cfg.TEST.SCALES, flip=cfg.TEST.FLIP,
                    crf=cfg.TEST.CRF, precision=cfg.TRAINER.PRECISION, dcrf=cfg.MODEL.DCRF,
                    crf_backend=cfg.MODEL.CRF_BACKEND, temperature=cfg.MODEL.TEMPERATURE,
                    max_pixels=cfg.TEST.MAX_PIXELS)
    # What decides "already done": the model file, every setting of the prediction, the image.
    run = fingerprint(file_sha256(ckpt_path), seg.mode, seg.scales, seg.flip, seg.precision,
                      seg.temperature, seg.dcrf if seg.crf is not None else None,
                      cfg.MODEL.CRF_BACKEND if seg.crf is not None else None,
                      *((seg.max_pixels,) if seg.max_pixels != DEFAULT_MAX_PIXELS else ()))
    skips = Skips()
    total = len(images)
    prints = {}
    for p in images:
        try:
            prints[p] = file_sha256(p)
        except OSError as e:  # unreadable (permissions): the others go on
            skips.add(p, f"cannot read the file ({e.strerror}).")
    images = [p for p in images if p in prints]
    stale = _stale_outputs(out, images, run, prints)
    if stale and not overwrite:
        why = {"model or settings": "were made with another model or other settings",
               "image": "were made from another image of that name",
               "no record": "were not written by predict.py (no line in "
                            f"{out / LEDGER})"}
        listed = "; ".join(f"{len(v)} {why[k]} (e.g. {output_paths(out, v[0])[0].name})"
                           for k, v in stale.items())
        raise BanaError(f"--output {out} already holds outputs for these images that cannot "
                        f"count as done: {listed}. Pass --overwrite to predict them again "
                        "(their files are replaced), or choose another --output.")
    redo = {p for v in stale.values() for p in v}
    todo = [p for p in images if p in redo
            or not all(q.is_file() for q in output_paths(out, p))]
    ledger = Ledger(out / LEDGER)
    if workers is None:
        workers = os.cpu_count() or 1
    workers = min(workers, len(todo)) if seg.crf is not None else 0
    print(f"Predicting {len(todo)} image(s) ({len(images) - len(todo)} already done) with "
          f"{ckpt_path}, mode {seg.mode}; writing {out}/<stem>.png and {out}/{OVERLAY_DIR}/.")

    def write(finished) -> None:
        for (path, image), label in finished:
            label = seg.full_size(label, image.shape)
            png, jpg = output_paths(out, path)
            atomic_write_png(png, label, palette=voc_palette())
            atomic_write_jpeg(jpg, overlay(image, label, seg.classes))
            ledger.add(path.stem, run=run, image=prints[path], input=str(path.resolve()))
            bar.update()

    start, failed = time.perf_counter(), 0
    with tqdm(total=len(todo), desc="predict", unit="img", dynamic_ncols=True) as bar, \
            WorkerPool(workers) as pool:
        for path in todo:
            try:  # a file that cannot be read or used costs only itself
                image = read_image(path, exif=True)
                small = seg.fit(image)
                scores = seg.scores(small, f"image {path}")
            except BanaError as e:
                skips.add(path, str(e))
                failed += 1
                bar.update()
                continue
            if seg.crf is None:
                write([((path, image), argmax_labels(scores))])
            else:
                write(pool.submit(labels_job, seg.crf_job(small, scores), tag=(path, image)))
        write(pool.finish())
    seconds = time.perf_counter() - start
    barrier(launch)  # the run ends when every shard is written
    predicted = len(todo) - failed
    speed = predicted / seconds if predicted and seconds > 0 else None
    print(f"Done: {predicted} image(s) in {seconds:.1f} s"
          + (f" ({speed:.2f} images/s)." if speed else "."))
    result = {"images": total, "predicted_now": predicted, "skipped": len(skips),
              "seconds": round(seconds, 2),
              "images_per_second": round(speed, 3) if speed else None, "mode": seg.mode,
              "output": str(out)}
    skips.raise_if_any(total, result)
    return result
