"""Evaluation (SPEC §5): a stage-3 model on a split, or a folder of label PNGs, against the GT.

Model mode streams like stage 2: the main process decodes images and runs the network at every
configured scale, a pool of worker processes runs the DenseCRF of earlier images meanwhile, and
at most `2 × workers` CRF jobs are in flight, so memory stays bounded whatever the split size.
The modes are "single" (scale 1, no flip), "multiscale" (TEST.SCALES, TEST.FLIP) and the same two
"+crf" (TEST.CRF with MODEL.DCRF), each scored by one `utils.metrics.ConfusionMatrix`; the
network, the modes and the CRF jobs are engine/inference.py's, which predict.py shares.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.config import Config
from engine.inference import (EVAL_DIR, STAGE3_HINT, argmax_labels, checkpoint_path, crf_for_modes,
                              crf_job, inference_device, load_model, mode_scores, modes_of,
                              prepare_network)
from utils.distributed import all_reduce_sum, announce_shard, shard
from utils.errors import BanaError
from utils.io import atomic_write_json, atomic_write_png, atomic_write_text, json_safe
from utils.metrics import ConfusionMatrix, format_table
from utils.palette import panel, voc_palette
from utils.precision import inference_autocast

# Where the PASCAL VOC evaluation server expects test-set predictions (tar the `results` folder).
SERVER_LAYOUT = Path("results") / "VOC2012" / "Segmentation" / "comp6_test_cls"
MISSING_SHOWN = 5


def format_report(metrics: dict, names: list[str]) -> str:
    """Per-class IoU table for each mode, then one summary line per mode."""
    parts = []
    for mode, m in metrics.items():
        parts += [f"### {mode}", "", format_table(m, names), ""]
    parts += [f"{mode:>16}: mIoU {m['miou']:6.2f}  pixel acc {m['pixel_acc']:6.2f}  "
              f"mean acc {m['mean_acc']:6.2f}" for mode, m in metrics.items()]
    return "\n".join(parts)


def _write_report(out_dir: Path, summary: dict, names: list[str]) -> None:
    atomic_write_json(out_dir / "metrics.json", json_safe(summary))
    atomic_write_text(out_dir / "metrics.md", format_report(summary["modes"], names) + "\n")


class _Evaluation:
    """Bookkeeping of the streamed evaluation: the confusion matrices, what each image still
    waits for, and the files written once an image's most refined prediction is known."""

    def __init__(self, modes: list[str], num_classes: int, out_dir: Path, *, score: bool,
                 save_dir: Path | None, vis_ids: set[str]):
        self.modes = modes
        self.final = modes[-1]
        self.matrices = {m: ConfusionMatrix(num_classes) for m in modes} if score else {}
        self.save_dir = save_dir
        self.vis_dir = out_dir / "vis"
        self.vis_ids = vis_ids
        self.waiting: dict[str, dict] = {}
        self.done = 0

    def start(self, image_id: str, image: np.ndarray, gt: np.ndarray | None) -> None:
        self.waiting[image_id] = {"left": len(self.modes), "gt": gt,
                                  "image": image if image_id in self.vis_ids else None}

    def record(self, image_id: str, mode: str, pred: np.ndarray) -> None:
        entry = self.waiting[image_id]
        if self.matrices:
            self.matrices[mode].update(pred, entry["gt"])
        if mode == self.final:
            if self.save_dir is not None:
                atomic_write_png(self.save_dir / f"{image_id}.png", pred, palette=voc_palette())
            if entry["image"] is not None:
                maps = [pred] if entry["gt"] is None else [entry["gt"], pred]
                atomic_write_png(self.vis_dir / f"{image_id}.png", panel(entry["image"], maps))
        entry["left"] -= 1
        if entry["left"] == 0:
            del self.waiting[image_id]
            self.done += 1


def _dataset(data, split: str, score: bool):
    """The split's images that have a ground truth (scoring), or the images alone (a test split
    whose predictions go to an evaluation server). A split to score without any ground truth is
    an error."""
    if not score:
        return data.image_dataset(split)
    dataset = data.mask_dataset(split, only_gt=True)
    if not len(dataset):
        raise BanaError(f"split '{split}' of {data.root} has no ground-truth masks, so there is "
                        "nothing to score: evaluate on a split some of whose images have masks "
                        "(TEST.SPLIT), or label its images with predict.py.")
    return dataset


def check_inputs(cfg: Config, checkpoint: str | None, data, split: str, score: bool, modes):
    """Every input of the evaluation, checked before the model is loaded; returns (the CRF or
    None, the checkpoint path, the dataset). Images differ in size: the loader takes one at a
    time, at full resolution."""
    from engine.preflight import Problems, require_checkpoint, require_data_root, require_writable

    problems = Problems("evaluate.py")
    dataset = None
    if problems.passes(lambda: require_data_root(cfg)):
        dataset = problems.check(lambda: _dataset(data, split, score))
    crf = problems.check(lambda: crf_for_modes(cfg, modes))
    ckpt_path = problems.check(lambda: checkpoint_path(cfg, checkpoint))
    if ckpt_path is not None:
        problems.check(lambda: require_checkpoint(
            ckpt_path, "the stage-3 checkpoint (MODEL.WEIGHTS, relative to OUTPUT_DIR, or "
            "--checkpoint)", STAGE3_HINT))
    problems.check(lambda: require_writable(cfg.run_dir / EVAL_DIR, "OUTPUT_DIR"))
    problems.raise_if_any()
    return crf, ckpt_path, dataset


def _stream(cfg: Config, net, loader, device: torch.device, state: _Evaluation, crf,
            workers: int, bar) -> None:
    """Run the network on every image and hand each configured mode's prediction to `state`;
    CRF jobs go to `workers` processes (0: run here), at most 2 × workers in flight."""
    from utils.crf import labels_job
    from utils.pool import WorkerPool

    modes = set(state.modes)

    def record(finished) -> None:
        for (image_id, mode), label in finished:
            state.record(image_id, mode, label)

    # The workers run the CRF alone: they import neither torch nor Lightning.
    with WorkerPool(workers if crf is not None else 0) as pool:
        for item in loader:
            image_id, image = item["id"], item["image"]
            if "multiscale" in modes or "multiscale+crf" in modes:
                from data.base import check_side

                check_side(*image.shape[-2:], f"image {image_id} of '{cfg.TEST.SPLIT}'",
                           cfg.TEST.SCALES)
            rgb = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
            state.start(image_id, rgb, item["label"][0].numpy() if "label" in item else None)
            x = image.float().to(device, non_blocking=device.type == "cuda")
            scores = {}
            with torch.inference_mode(), inference_autocast(cfg.TRAINER.PRECISION, device):
                for base in ("single", "multiscale"):
                    if {base, f"{base}+crf"} & modes:
                        scores[base] = mode_scores(net, x, base, cfg.TEST.SCALES, cfg.TEST.FLIP)
            for base, cos in scores.items():
                if base in modes:
                    state.record(image_id, base, argmax_labels(cos))
                if f"{base}+crf" in modes:
                    job = crf_job(crf, rgb, cos, cfg.MODEL.TEMPERATURE)
                    record(pool.submit(labels_job, job, tag=(image_id, f"{base}+crf")))
            bar.update(state.done - bar.n)
        record(pool.finish())
        bar.update(state.done - bar.n)


def check_evaluated_model(out_dir: Path, ckpt_path: Path, overwrite: bool) -> str:
    """The checkpoint's sha256, after checking that `out_dir` holds no evaluation of another
    model (its metrics.json says which): a run's results are never replaced by another model's
    without --overwrite."""
    import json

    from utils.records import file_sha256

    sha = file_sha256(ckpt_path)
    path = out_dir / "metrics.json"
    if path.is_file() and not overwrite:
        try:
            before = json.loads(path.read_text())
        except json.JSONDecodeError:
            before = {}
        if before.get("checkpoint_sha256", sha) != sha:
            raise BanaError(f"{out_dir} holds the evaluation of another model "
                            f"({before.get('checkpoint')}, metrics.json); this one is "
                            f"{ckpt_path}. Pass --overwrite to replace it, or evaluate into "
                            "another run folder (--opts NAME other_eval).")
    return sha


def run(cfg: Config, *, checkpoint: str | None = None, devices: str = "0",
        workers: int | None = None, save_pred: bool = False, save_vis: int = 0,
        overwrite: bool = False) -> dict:
    """Evaluate the stage-3 model on TEST.SPLIT; returns {"split", "images", "checkpoint",
    "classes", "modes": {mode: ConfusionMatrix.compute() output}, "seconds", ...}, which
    metrics.json holds too (NaN written as null). On the test split nothing is scored ("modes"
    is empty) and the most refined predictions go to the evaluation server's layout.

    checkpoint: the model (default MODEL.WEIGHTS under OUTPUT_DIR); devices: as --gpu-id;
    workers: CRF processes (None = the number of cores, 0 = in this process); save_pred: write
    the predictions as PNGs to eval/pred; save_vis: image | GT | prediction panels of the first
    N images; overwrite: replace an evaluation of another model in the run's eval/."""
    from data.datasets import open_data
    from utils.distributed import barrier, detect_launch
    from utils.runlock import RunLock, clean_temporary_files

    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 0:
        raise BanaError(f"--workers {workers}: give 0 (CRF in the main process) or more.")
    data = open_data(cfg)
    split = cfg.TEST.SPLIT
    score = split != data.test_split
    modes = modes_of(cfg) if score else modes_of(cfg)[-1:]
    crf, ckpt_path, dataset = check_inputs(cfg, checkpoint, data, split, score, modes)
    launch = detect_launch()
    if launch.distributed:  # the processes of one node share its cores
        workers = max(1, workers // launch.local_world_size) if workers else 0
    with RunLock(cfg.run_dir / EVAL_DIR, "evaluate.py"):
        if launch.is_main:
            clean_temporary_files(cfg.run_dir / EVAL_DIR)
        barrier(launch)
        sha = check_evaluated_model(cfg.run_dir / EVAL_DIR, ckpt_path, overwrite)
        return _evaluate(cfg, data, split, score, modes, crf, ckpt_path, dataset, workers,
                         launch, devices, save_pred, save_vis, sha)


def _evaluate(cfg, data, split, score, modes, crf, ckpt_path, dataset, workers, launch, devices,
              save_pred, save_vis, sha) -> dict:
    device = inference_device(devices, launch, cfg.TRAINER.PRECISION)
    net = prepare_network(load_model(ckpt_path, cfg, data.classes), device)
    all_ids = list(dataset.ids)
    mine = shard(list(range(len(all_ids))), launch)
    announce_shard(launch, len(mine))
    images = dataset if not launch.distributed else torch.utils.data.Subset(dataset, mine)
    loader = torch.utils.data.DataLoader(images, batch_size=None, shuffle=False,
                                         num_workers=min(cfg.DATA.NUM_WORKERS, 2),
                                         pin_memory=device.type == "cuda")
    out_dir = cfg.run_dir / EVAL_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    if launch.is_main:
        cfg.save(out_dir / "config.yaml")
    if not score:
        save_dir = out_dir / SERVER_LAYOUT
    elif save_pred:
        save_dir = out_dir / "pred"
    else:
        save_dir = None
    state = _Evaluation(modes, cfg.DATA.NUM_CLASSES, out_dir, score=score, save_dir=save_dir,
                        vis_ids=set(all_ids[:save_vis]))
    total = len(data.split_ids(split))
    scored = f"{len(dataset)} images" + (f" of {total}: those with a ground-truth mask"
                                          if len(dataset) < total else "")
    if launch.is_main:
        print(f"Evaluating {ckpt_path} on '{split}' ({scored}), modes: "
              f"{', '.join(modes)}" + (f"; {workers} CRF worker(s)" if crf else "")
              + (f" per process, {launch.world_size} processes" if launch.distributed else "")
              + ".", flush=True)

    start = time.perf_counter()
    with tqdm(total=len(images), desc="evaluate", unit="img", dynamic_ncols=True,
              position=launch.local_rank) as bar:
        _stream(cfg, net, loader, device, state, crf, workers, bar)
    seconds = time.perf_counter() - start
    # Each process scored its shard: add the confusion matrices up (waits for every shard).
    for mat in state.matrices.values():
        mat.matrix = all_reduce_sum(mat.matrix, launch)
    if not launch.is_main:
        return {"split": split, "images": len(mine), "shard": f"{launch.rank}/{launch.world_size}",
                "seconds": round(seconds, 2)}

    names = list(data.classes)
    summary = {"split": split, "images": len(dataset), "checkpoint": str(ckpt_path),
               "checkpoint_sha256": sha,
               "seconds": round(seconds, 2),
               "images_per_second": round(len(dataset) / seconds, 3) if seconds > 0 else None,
               "scales": list(cfg.TEST.SCALES), "flip": cfg.TEST.FLIP,
               "dcrf": list(cfg.MODEL.DCRF) if crf else None, "classes": names,
               "modes": {m: mat.compute() for m, mat in state.matrices.items()},
               "confusion": {m: mat.matrix.tolist() for m, mat in state.matrices.items()}}
    if launch.distributed:
        summary["processes"] = launch.world_size
    if score:
        _write_report(out_dir, summary, names)
        print(format_report(summary["modes"], names))
        print(f"Wrote {out_dir / 'metrics.json'} and {out_dir / 'metrics.md'}.")
        if save_dir is not None:
            print(f"Predictions ({modes[-1]}): {save_dir}")
    else:
        atomic_write_json(out_dir / "metrics.json", json_safe(summary))
        print(f"'{split}' has no ground truth: wrote the {modes[0]} predictions to {save_dir} "
              f"for the evaluation server (upload a tar of {out_dir / 'results'}).")
    if state.vis_ids:
        print(f"Panels image | {'GT | ' if score else ''}prediction ({modes[-1]}): "
              f"{state.vis_dir}")
    return summary


def score_folder(pred_dir: Path, data_root: Path, split: str, num_classes: int | None = None,
                 classes=(), class_map: str = "all", data=None,
                 train_split: str | None = None) -> dict:
    """Score `<pred_dir>/<id>.png` index PNGs against the ground truth of every image of the
    split (VOC: SegmentationClassAug; COCO layout: rasterised from the instance masks); returns
    `ConfusionMatrix.compute()`'s dict. Every prediction must exist and match its GT's size;
    255 in a prediction is not a class and is an error. data: the `data.datasets` dataset at
    data_root (default: detected from its layout). train_split: the split whose class numbering
    the label maps use, where split files number their classes each their own way (COCO
    exports); without it such a dataset is refused rather than scored under a guess."""
    from data.datasets import detect_data
    from utils.io import read_label_png

    pred_dir, data_root = Path(pred_dir), Path(data_root)
    if not pred_dir.is_dir():
        raise BanaError(f"--pred-dir {pred_dir} does not exist or is not a folder.")
    if not data_root.is_dir():
        raise BanaError(f"--data-root {data_root} does not exist or is not a folder.")
    data = data or detect_data(data_root, split, num_classes, classes, class_map, train_split)
    _check_numbering(data, split, pred_dir, train_split)
    ids = data.gt_ids(split)
    total = len(data.split_ids(split))
    if not ids:
        raise BanaError(f"split '{split}' of {data_root} has no ground-truth masks (VOC: "
                        "SegmentationClassAug/<id>.png; COCO: segmentations; YOLO: "
                        "masks/<split>/<stem>.png), so there is nothing to score against.")
    if len(ids) < total:
        print(f"Scoring the {len(ids)} of {total} images of '{split}' that have a ground-truth "
              "mask.")
    missing = [i for i in ids if not (pred_dir / data.label_name(i)).is_file()]
    if missing:
        raise BanaError(
            f"{len(missing)} of {len(ids)} predictions of split '{split}' are missing from "
            f"{pred_dir} (first: {', '.join(missing[:MISSING_SHOWN])}). Every image of the split "
            "that has a ground truth needs an <id>.png there; check --split and the folder.")
    matrix = None
    for image_id in tqdm(ids, desc="score", unit="img", dynamic_ncols=True):
        gt = data.gt_label(split, image_id)
        # A COCO-format dataset knows its classes once a split's annotations are read.
        matrix = matrix or ConfusionMatrix(len(data.classes))
        pred = read_label_png(pred_dir / data.label_name(image_id), len(data.classes),
                              "prediction", gt.shape,
                              "write every prediction at the full size of its image, as class "
                              "ids only, or check --num-classes",
                              image=f"the ground truth of image {image_id}")
        unscorable = int(((pred == 255) & (gt != 255)).sum())
        if unscorable:
            raise BanaError(f"prediction {pred_dir / data.label_name(image_id)} holds the value "
                            f"255, which is no class, at {unscorable} pixel(s) where the ground "
                            "truth has one: write predictions as class ids only (255 is only "
                            "tolerated where the ground truth is ignored).")
        matrix.update(pred, gt)
    return matrix.compute()


def _check_numbering(data, split: str, pred_dir: Path, train_split: str | None) -> None:
    """Label maps carry no class names: where the dataset's files number the classes in more
    than one way, the caller must say which numbering the maps use (the training split's)."""
    if train_split is not None:
        try:
            data.split_ids(train_split)
        except BanaError as err:
            raise BanaError(f"--train-split {train_split}: {err}") from None
        return
    others = data.other_numberings(split)
    if others:
        def listed(names):
            return ", ".join(names[1:9]) + (", ..." if len(names) > 9 else "")

        files = "; ".join(f"{path}: {listed(names)}" for path, names in others.items())
        raise BanaError(
            f"{data.root}: the annotation files give the same class names other numbers (split "
            f"'{split}': {listed(data.classes)}; {files}), and the label maps in {pred_dir} do "
            "not say which numbering they use. Labels made by this project (stage 2, stage 3's "
            "predictions) number the classes as the training split's file does (DATA.SPLIT of "
            "the run): pass --train-split with that split (the split name of one of the files "
            "above).")


def run_folder(pred_dir, data_root, *, split: str = "val", num_classes: int | None = None,
               classes=(), class_map: str = "all", out=None,
               train_split: str | None = None) -> dict:
    """Folder mode of evaluate.py: score the index PNGs of `pred_dir` against the ground truth
    of `split` at `data_root` (see `score_folder`), print the report (last line `mIoU: XX.XX`),
    and write metrics.json and metrics.md to `out` when given. Returns the metrics dict."""
    if num_classes is not None and num_classes < 2:
        raise BanaError(f"--num-classes {num_classes}: need at least 2 classes.")
    from data.datasets import detect_data

    if not Path(data_root).is_dir():
        raise BanaError(f"--data-root {data_root} does not exist or is not a folder.")
    data = detect_data(data_root, split, num_classes, classes, class_map, train_split)
    metrics = score_folder(pred_dir, data_root, split, data=data, train_split=train_split)
    names = list(data.classes)
    if out:
        summary = {"split": split, "pred_dir": str(pred_dir), "classes": names,
                   "modes": {"folder": metrics}}
        _write_report(Path(out), summary, names)
        print(f"Wrote {Path(out) / 'metrics.json'} and {Path(out) / 'metrics.md'}.")
    print(format_report({"folder": metrics}, names))
    print(f"mIoU: {metrics['miou']:.2f}")
    return metrics
