"""Stage 2: write the pseudo labels Y_crf and Y_ret for every image of a split (SPEC §3).

The pipeline streams: the main process decodes images and runs the backbone (GPU or CPU), a pool
of worker processes turns each image's features into the two label maps (`make_pseudo_labels`,
whose DenseCRF dominates the cost) and writes them. At most `2 × workers` images are in flight,
so memory stays bounded whatever the split size. Every file is written atomically and an image
whose outputs all exist is skipped, so a killed run restarted finishes with the same files as an
uninterrupted one, and two runs pointed at the same folder never leave a corrupt label.

Every image also gets a record (data/labelset.py): its boxes, one instance mask per box from each
label (the box's pixels of its class; where boxes of one class overlap, the box whose CAM is
highest), and per-box signals. At the end the folder gets its manifest, labelset.json, with the
no-ground-truth quality signals (engine/label_quality.py) that stage 2 prints and warns on, and
the exports DATA.EXPORTS lists (exporters/). Files under DATA.PSEUDO_LABEL_DIR:
    Y_crf/<id>.png, Y_ret/<id>.png, Y_box/<id>.png   label maps (class ids, VOC palette)
    records/<id>.json                                the image's record
    labelset.json                                    the manifest (written when all are done)
    review/index.html                                the review page (engine/review.py)
    inputs.jsonl                                     what each image's labels were made from
    exports/<format>/                                DATA.EXPORTS
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from utils.errors import BanaError

if TYPE_CHECKING:
    from engine.config import Config

from data.base import SkipUnreadable
from data.labelset import MANIFEST, RECORDS
from engine.stage2_jobs import (VARIANTS, label_one, output_paths, pending_ids,
                                preload_pixel_work, write_job)
from utils.records import Ledger, file_sha256, fingerprint
from utils.skips import SKIPPED, SkippedImages, Skips, unfinished_error

# The ledger of what each image's labels were made from (utils/records.py).
INPUTS = "inputs.jsonl"

STAGE1_HINT = ("Train stage 1 first (python stage1.py --config-file configs/stage1.yml) with the "
               "same OUTPUT_DIR, or point MODEL.WEIGHTS at its checkpoints/final.ckpt.")


def load_labeler(cfg: Config, classes=None):
    """The stage-1 network named by MODEL.WEIGHTS (relative to OUTPUT_DIR), in eval mode, built
    from the checkpoint's own description (fc6 dilation and input normalisation included).
    classes: the data's class names, compared with the checkpoint's (`match_classes`): the
    classifier's rows are taken in the data's order."""
    from engine.runs import expectations, match_classes, reorder_classifier
    from models.zoo import read_checkpoint

    hint = ("A stage-1 model labels the classes it was trained on (on COCO 2017: a VOC-trained "
            "model under DATA.CLASS_MAP voc20, a COCO-trained one under coco80). " + STAGE1_HINT)
    ckpt = read_checkpoint(cfg.output_path(cfg.MODEL.WEIGHTS), stage=1, kind="labeler",
                           expect=expectations(cfg), hint=hint)
    order = match_classes(ckpt, classes, "stage 2") if classes is not None else None
    return reorder_classifier(ckpt.network(hint), order)


def open_dataset(cfg: Config, data=None):
    """The split to label, full-size images with their boxes, whose `ids` are the images in
    labelling order. data: the `data.base.DatasetFormat` (default: opened from cfg)."""
    from data.datasets import open_data

    return (data or open_data(cfg)).box_dataset(cfg.DATA.SPLIT)


def box_pixels(boxes: np.ndarray, height: int, width: int, arithmetic: str) -> np.ndarray:
    """The pixel box a box labels, as rows y1:y2 and columns x1:x2: boxes float32 (K, 5) x1, y1,
    x2, y2, class -> int64 (K, 5), in an H x W image.

    arithmetic (DATA.BOX_ARITHMETIC) "reference": the authors' float32 round trip. Their dataset
    transform (`Normalize_Caffe`) stores x_n = x / ((W-1)/2) - 1 in a float32 numpy array; their
    stage2.py brings it back with x_n * (W-1)/2 + (W-1)/2 on the float32 tensor and truncates
    (`.long()`); y alike with H. The rounding brings 3.5 % of integer VOC coordinates back 1 px
    lower (tests/test_authors_recipe.py); a 1-px box can come back empty and then labels no
    pixel, where their `.max()` over its empty region fails. "pixel_edges": the coordinates
    truncated as they are, as the background masks are made (SPEC §0).
    """
    b = np.asarray(boxes, np.float32).reshape(-1, 5).copy()
    if arithmetic == "pixel_edges":
        return b.astype(np.int64)
    half_h, half_w = (height - 1) / 2, (width - 1) / 2
    b[:, [0, 2]] = b[:, [0, 2]] / half_w - 1
    b[:, [1, 3]] = b[:, [1, 3]] / half_h - 1
    t = torch.from_numpy(b)
    t[:, [0, 2]] = t[:, [0, 2]] * half_w + half_w
    t[:, [1, 3]] = t[:, [1, 3]] * half_h + half_h
    return t.long().numpy()


PIXEL_WORK = ("auto", "device", "workers")


def _backbone_threads(device: torch.device, workers: int) -> int:
    """Threads for the backbone: on the CPU only the cores the CRF workers leave (at least one).
    A multi-threaded forward next to busy workers waits on OpenMP barriers whenever one of its
    threads is descheduled: on 2 cores next to two CRF workers, the tiny backbone's forward on a
    320 px image took 240 ms with 2 threads and 21 ms with 1."""
    if device.type != "cpu":
        return torch.get_num_threads()
    return max(1, (os.cpu_count() or 1) - workers)


def pixel_work_on_device(choice: str, device: torch.device) -> bool:
    """Where the per-pixel work (upsampling, cosines, unaries, retrieval) runs: on the backbone's
    device ("device"), or in the CRF workers next to the CRF ("workers"); "auto" picks the device
    when it is a GPU. On the CPU the workers win: they run it in parallel, the main process one
    image at a time (benchmarks/stage2_throughput.py measures both)."""
    if choice == "auto":
        return device.type != "cpu"
    return choice == "device"


def generate(cfg: Config, net, dataset, ids: list[str], device: torch.device, workers: int,
             position: int = 0, progress: bool = True, pixel_work: str = "auto", pool=None,
             fingerprints: dict | None = None) -> int:
    """Label `ids` of `dataset` (skipping finished ones) with `workers` CRF processes; returns
    how many images were labelled. pixel_work: see `pixel_work_on_device`. pool: a
    `utils.pool.WorkerPool` of `workers` processes to use (default: one of its own).
    fingerprints: {id: fingerprint of what shapes its labels} (`input_fingerprints`), added to
    the folder's ledger as each image's files are complete.

    Streaming: the main process decodes images and runs the backbone (under TRAINER.PRECISION's
    autocast) and, on the device path, the unaries and the retrieval; the workers run the CRF
    and write the files. At most 2 × workers jobs are in flight, so memory stays flat."""
    from tqdm import tqdm

    from models.pseudo_labels import retrieval
    from utils.crf import make_crf, regions_job
    from utils.pool import WorkerPool
    from utils.precision import full, inference_autocast

    out_root = cfg.pseudo_label_dir
    todo = pending_ids(ids, out_root)
    if not todo:
        return 0
    ledger = Ledger(out_root / INPUTS) if fingerprints is not None else None
    for d in VARIANTS:
        (out_root / d).mkdir(parents=True, exist_ok=True)
    on_device = pixel_work_on_device(pixel_work, device)
    cuda = device.type == "cuda"
    position_of = {image_id: k for k, image_id in enumerate(dataset.ids)}
    # An image that cannot be used is skipped, recorded with its reason, and costs only itself.
    subset = torch.utils.data.Subset(SkipUnreadable(dataset), [position_of[i] for i in todo])
    skips = Skips(out_root / SKIPPED)
    loader = torch.utils.data.DataLoader(subset, batch_size=None, shuffle=False,
                                         num_workers=min(cfg.DATA.NUM_WORKERS, 2),
                                         pin_memory=cuda)
    crf = make_crf(cfg.MODEL.DCRF, cfg.MODEL.CRF_BACKEND)
    net = net.to(device)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    weight = net.classifier.weight.detach()[:, :, 0, 0].float()
    # NumPy arrays, not tensors, go to the workers: torch would move every tensor through a
    # shared-memory file per job, numpy pickles as plain bytes.
    common = {"crf": crf, "grid_size": cfg.MODEL.GRID_SIZE, "bg_threshold": cfg.MODEL.BG_THRESHOLD,
              "use_u0": cfg.MODEL.USE_U0}
    if not on_device:
        common["weight"] = weight.cpu().numpy()
    done = 0

    def handle(finished, pool) -> None:
        """Results handed back: a written image, or (device path) an image's CRF, whose
        retrieval runs here before its files are written by a worker."""
        nonlocal done
        queue = list(finished)
        while queue:
            tag, result = queue.pop(0)
            if tag is None:  # `result` is the image id: its files are complete
                if ledger is not None:
                    ledger.add(result, inputs=fingerprints[result])
                done += 1
                bar.update(1)
                continue
            job, state = tag
            labels = retrieval(state, result, return_box_scores=True)
            for key in ("probs", "class_regions", "image", "crf"):
                del job[key]  # the writer needs none of them: do not pickle them again
            job.update(zip(("y_crf", "y_ret", "box_scores"), labels))
            queue += pool.submit(write_job, job)

    threads = torch.get_num_threads()
    torch.set_num_threads(_backbone_threads(device, workers))
    bar = tqdm(total=len(todo), desc="stage 2", unit="img", position=position,
               disable=not progress, dynamic_ncols=True)
    try:
        # The CPU path's workers do the per-pixel work (torch); the device path's run only the
        # CRF and the writes, and import neither torch nor Lightning.
        own = pool is None
        if own:
            pool = WorkerPool(workers, None if on_device else preload_pixel_work)
        with pool if own else contextlib.nullcontext():
            for item in loader:
                if "skipped" in item:
                    skips.add(item["id"], item["skipped"])
                    bar.update(1)
                    continue
                x = item["image"][None].float().to(device, non_blocking=cuda)
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode():
                    with inference_autocast(cfg.TRAINER.PRECISION, device):
                        feats = net.backbone(x)[0]
                    feats = full(feats).float()
                boxes = item["boxes"].numpy()
                image = np.ascontiguousarray(item["image"].permute(1, 2, 0).numpy())
                job = dict(common, id=item["id"], image=image,
                           boxes=box_pixels(boxes, *image.shape[:2], cfg.DATA.BOX_ARITHMETIC),
                           file_name=dataset.file_name(item["id"]),
                           out=output_paths(out_root, item["id"]))
                bg_mask = (item["bg_mask"][0] == 1).to(torch.uint8)
                if not on_device:
                    job.update(features=feats.cpu().numpy(), bg_mask=bg_mask.numpy())
                    handle(pool.submit(label_one, job), pool)
                    continue
                job, state = _device_unaries(cfg, job, feats, weight, bg_mask.to(device))
                if state is None:
                    handle(pool.submit(write_job, job), pool)
                else:
                    handle(pool.submit(regions_job, job, tag=(job, state)), pool)
            while pool.pending:  # handing back a CRF submits its image's writes
                handle(pool.finish(), pool)
    finally:
        torch.set_num_threads(threads)
        bar.close()
    return done


def _device_unaries(cfg: Config, job: dict, feats: torch.Tensor, weight: torch.Tensor,
                    bg_mask: torch.Tensor):
    """Device path: the unaries of one image where its features are. Returns (the CRF job, the
    image's state for the retrieval), or (a write job of empty labels, None) without boxes."""
    from models.pseudo_labels import check_inputs, unaries

    feats, weight, bg_mask, boxes = check_inputs(feats, weight, job["image"].shape, job["boxes"],
                                                 bg_mask)
    if len(boxes) == 0:
        empty = np.zeros(bg_mask.shape, np.uint8)
        job.update(y_crf=empty, y_ret=empty.copy(),
                   box_scores=np.zeros((0, *bg_mask.shape), np.float32))
        return job, None
    probs, state = unaries(feats, weight, boxes, bg_mask, cfg.MODEL.GRID_SIZE,
                           cfg.MODEL.BG_THRESHOLD, cfg.MODEL.USE_U0)
    job.update(probs=probs.cpu().numpy(), class_regions=state.class_regions.cpu().numpy())
    return job, state


def _shard_main(rank: int, cfg: Config, device_ids, accelerator: str, workers: int,
                pixel_work: str, fingerprints: dict) -> None:
    """One process of a multi-device run on one machine (--gpu-id 0,1): labels ids[rank::n] on
    its own device. SIGTERM (from the run's main process, or to the whole process group) ends it
    as it ends the main process: after the images its CRF workers are writing."""
    from data.datasets import open_data
    from utils.cli import handle_termination

    handle_termination()
    data = open_data(cfg)
    dataset = open_dataset(cfg, data)
    ids = dataset.ids[rank::len(device_ids)]
    device = torch.device(f"cuda:{device_ids[rank]}" if accelerator == "gpu" else "cpu")
    generate(cfg, load_labeler(cfg, data.classes), dataset, ids, device, workers, position=rank,
             pixel_work=pixel_work, fingerprints=fingerprints)


def check_inputs(cfg: Config):
    """Every input of stage 2, checked before the stage-1 model is loaded or a worker started;
    returns the dataset (`data.base.DatasetFormat`) and its split to label."""
    from engine.preflight import Problems, require_checkpoint, require_data_root, require_writable

    from data.datasets import open_data

    problems = Problems("stage 2")
    data = dataset = None
    if problems.passes(lambda: require_data_root(cfg)):
        data = problems.check(lambda: open_data(cfg))
        if data is not None:
            dataset = problems.check(lambda: open_dataset(cfg, data))
        problems.check(lambda: require_writable(cfg.pseudo_label_dir, "DATA.PSEUDO_LABEL_DIR"))
    problems.check(lambda: require_checkpoint(
        cfg.output_path(cfg.MODEL.WEIGHTS), "MODEL.WEIGHTS (the stage-1 model, relative to "
        "OUTPUT_DIR)", STAGE1_HINT))
    problems.check(lambda: require_writable(cfg.run_dir, "OUTPUT_DIR"))
    problems.raise_if_any()
    return data, dataset


RECORD = "labels.json"
# What decides the labels a folder holds (besides the stage-1 model, recorded by its checksum).
RECORD_KEYS = ("MODEL.BACKBONE", "MODEL.GRID_SIZE", "MODEL.BG_THRESHOLD", "MODEL.USE_U0",
               "MODEL.DCRF", "MODEL.CRF_BACKEND", "DATA.DATASET", "DATA.CLASS_MAP", "DATA.CLASSES",
               "DATA.NUM_CLASSES", "TRAINER.PRECISION", "DATA.BOX_ARITHMETIC")
# Keys added to the record later: a record without them was made with these values (labels
# from before DATA.BOX_ARITHMETIC truncated the boxes as they are: pixel_edges).
RECORD_DEFAULTS = {"TRAINER.PRECISION": "32", "MODEL.CRF_BACKEND": "pydensecrf",
                   "DATA.BOX_ARITHMETIC": "pixel_edges"}


def input_fingerprints(data, split: str, ids: list[str]) -> dict[str, str]:
    """{id: fingerprint of what its labels are made from}: the image file's bytes and the
    annotation as read (boxes, classes, the boxes of the background mask, the recorded size and
    the per-box ids). The settings and the stage-1 model are the folder's record (labels.json)."""
    from tqdm import tqdm

    prints = {}
    for i in tqdm(ids, desc="inputs", unit="img", disable=len(ids) < 2000, dynamic_ncols=True):
        ann = data.annotation(split, i)
        prints[i] = fingerprint(file_sha256(data.image_path(split, i)), ann.boxes, ann.classes,
                                ann.all_boxes, ann.size,
                                *(ann.extras[k] for k in sorted(ann.extras)))
    return prints


def redo_changed_inputs(out_root: Path, ids: list[str], prints: dict[str, str]) -> list[str]:
    """Images whose labels exist but were made from other inputs than today's (their boxes or
    their image changed since; the ledger DATA.PSEUDO_LABEL_DIR/inputs.jsonl says what each label
    was made from): their files are deleted, so that this run labels them again; says how many.
    A label folder written before the ledger existed keeps its labels, with a note."""
    ledger = Ledger(out_root / INPUTS)
    pending = set(pending_ids(ids, out_root))
    written = [i for i in ids if i not in pending]
    if not written:
        return []
    if not ledger.exists():
        print(f"note: {out_root} has no {INPUTS} (labelled before inputs were recorded): its "
              f"{len(written)} labels are kept as they are and recorded as made from today's "
              "inputs; pass --overwrite to label them again.", flush=True)
        ledger.add_many({i: {"inputs": prints[i]} for i in written})
        return []
    recorded = ledger.read()
    unrecorded = [i for i in written if i not in recorded]
    changed = [i for i in written if i in recorded and recorded[i].get("inputs") != prints[i]]
    for i in unrecorded + changed:
        for path in output_paths(out_root, i).values():
            path.unlink(missing_ok=True)
    if changed:
        print(f"{len(changed)} image(s) labelled before from other boxes or another image "
              f"(e.g. {changed[0]}) are labelled again.", flush=True)
    if unrecorded:
        print(f"{len(unrecorded)} image(s) whose labels were written but not recorded in "
              f"{INPUTS} (a run stopped between the two, e.g. {unrecorded[0]}) are labelled "
              "again.", flush=True)
    return unrecorded + changed


def labelling_record(cfg: Config) -> dict:
    """The settings the labels of DATA.PSEUDO_LABEL_DIR are made with."""
    from engine.config import key_value

    record = {key: key_value(cfg, key) for key in RECORD_KEYS}
    record["stage-1 model (sha256)"] = file_sha256(cfg.output_path(cfg.MODEL.WEIGHTS))
    return record


def _empty_label_folder(folder: Path) -> None:
    """Delete a label folder for --overwrite. One that is a symbolic link (labels kept on
    another disk) keeps the link and its target folder, and loses what the target holds."""
    import shutil

    if not folder.is_symlink():
        shutil.rmtree(folder)
        return
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    print(f"--overwrite: {folder} is a link to {folder.resolve()}: emptied it, kept the link.")


def check_label_record(cfg: Config, overwrite: bool) -> None:
    """Labels in a folder come from one labelling: a rerun with other settings is refused
    (naming the keys) unless `overwrite`, which empties the folder's label files first. Writes
    the record for a new or overwritten folder."""
    from utils.io import atomic_write_json

    out_root = cfg.pseudo_label_dir
    path = out_root / RECORD
    new = labelling_record(cfg)
    # "instances": the per-image files of label folders written before records existed.
    labels = [d for d in (*VARIANTS, RECORDS, "instances", "exports", "review")
              if (out_root / d).is_dir()]
    if path.is_file():
        old = json.loads(path.read_text())
        old = {**RECORD_DEFAULTS, **old}
        diffs = [(k, old.get(k), new.get(k)) for k in new if old.get(k) != new.get(k)]
    else:
        diffs = [("(no record)", "labels of an unknown labelling", "these settings")] \
            if any(any((out_root / d).iterdir()) for d in labels) else []
    if diffs and not overwrite:
        listed = "; ".join(f"{k}: {a!r} recorded, {b!r} now" for k, a, b in diffs)
        raise BanaError(f"{out_root} holds labels made with other settings ({path}): {listed}. "
                        "Its labels would be kept as 'already labelled' and scored as if made "
                        "with the new ones. Label into another folder (--opts "
                        "DATA.PSEUDO_LABEL_DIR Generation_new), or pass --overwrite to delete "
                        "them and label again.")
    if overwrite and labels:
        for d in labels:
            _empty_label_folder(out_root / d)
        (out_root / INPUTS).unlink(missing_ok=True)
        (out_root / MANIFEST).unlink(missing_ok=True)
        for stale in out_root.glob("*_Y_*.json"):
            stale.unlink()
        print(f"--overwrite: deleted the labels in {out_root}.")
    if overwrite or diffs or not path.is_file():
        atomic_write_json(path, new)


def run(cfg: Config, *, devices: str = "0", workers: int | None = None,
        overwrite: bool = False, pixel_work: str = "auto", save_vis: int = 0) -> dict:
    """Generate (or finish generating) the pseudo labels; returns counts and the quality report.

    devices: as --gpu-id; workers: CRF worker processes (None = the number of cores, shared by
    the processes of a node under torchrun / srun); overwrite: delete the labels the folder
    holds first; pixel_work: see `pixel_work_on_device`; save_vis: image | GT | Y_crf | Y_ret
    panels of the first N images."""
    from utils.devices import resolve_devices
    from utils.distributed import detect_launch
    from utils.precision import check_precision
    from utils.runlock import RunLock

    if workers is not None and workers < 1:
        raise BanaError(f"--workers {workers}: need at least 1 CRF worker process.")
    if pixel_work not in PIXEL_WORK:
        raise BanaError(f"--pixel-work {pixel_work}: choose one of {', '.join(PIXEL_WORK)}.")
    data, dataset = check_inputs(cfg)
    launch = detect_launch()
    resolved = resolve_devices(devices, launch=launch)
    check_precision(cfg.TRAINER.PRECISION, resolved.accelerator)  # before the model is read
    net = load_labeler(cfg, data.classes)  # a bad checkpoint fails here, before any write
    with RunLock(cfg.pseudo_label_dir, "stage 2"), RunLock(cfg.run_dir, "stage 2"):
        return _label(cfg, data, dataset, net, launch, resolved, workers or os.cpu_count() or 1,
                      overwrite, pixel_work, save_vis)


def _prepare_folder(cfg: Config, overwrite: bool, launch) -> None:
    """Rank 0 readies the label folder (leftovers, the labelling record, --overwrite) while the
    other processes of a torchrun / srun launch wait; an error there stops all of them."""
    from utils.distributed import barrier, broadcast_error
    from utils.runlock import clean_temporary_files

    problem = None
    if launch.is_main:
        try:
            clean_temporary_files(cfg.pseudo_label_dir)
            check_label_record(cfg, overwrite)
            cfg.save()
        except (BanaError, OSError) as e:
            broadcast_error(str(e), launch)
            raise
    problem = broadcast_error(problem, launch)
    if problem is not None:
        raise BanaError(f"process 0 stopped: {problem}")
    barrier(launch)


def check_u0(cfg: Config, net, dataset, device: torch.device, workers: int) -> bool:
    """MODEL.U0_CHECK: label MODEL.U0_CHECK images of the split (evenly spaced) with and without
    u0 into a temporary folder; False (label without u0) when with it their mean Y_crf box fill
    is below MIN_FILL and without it is not, else True. The stage-1 model and the images are
    the run's, so a rerun decides the same."""
    import copy
    import tempfile

    from data.labelset import RECORDS
    from engine.label_quality import MIN_FILL

    ids = list(dataset.ids)
    step = max(1, len(ids) // cfg.MODEL.U0_CHECK)
    sample = ids[::step][:cfg.MODEL.U0_CHECK]
    fill = {}
    with tempfile.TemporaryDirectory(prefix="u0_check_") as tmp:
        for use_u0 in (True, False):
            trial = copy.deepcopy(cfg)
            trial.MODEL.USE_U0 = use_u0
            trial.DATA.PSEUDO_LABEL_DIR = str(Path(tmp) / str(use_u0))
            generate(trial, net, dataset, sample, device, workers, progress=False)
            # An image the trial skipped as unusable has no record: the others decide.
            written = [trial.pseudo_label_dir / RECORDS / f"{i}.json" for i in sample]
            fills = [f for p in written if p.is_file()
                     for f in json.loads(p.read_text())["fill"]["Y_crf"]]
            fill[use_u0] = float(np.mean(fills)) if fills else 1.0
    keep = not (fill[True] < MIN_FILL <= fill[False])
    print(f"MODEL.U0_CHECK on {len(sample)} images: mean Y_crf box fill {100 * fill[True]:.1f} % "
          f"with u0, {100 * fill[False]:.1f} % without (plausible: at least "
          f"{100 * MIN_FILL:.0f} %): labelling {'with' if keep else 'WITHOUT'} u0.", flush=True)
    return keep


def _label(cfg: Config, data, dataset, net, launch, devices, workers: int, overwrite: bool,
           pixel_work: str, save_vis: int) -> dict:
    from data.base import ensure_bg_masks
    from utils.distributed import all_reduce_sum, announce_shard, shard

    if launch.distributed:  # the processes of one node share its cores
        workers = max(1, workers // launch.local_world_size)
    if launch.is_main:
        print(devices.note)
    ensure_bg_masks(data, cfg.DATA.SPLIT, workers, launch)
    if cfg.MODEL.U0_CHECK and cfg.MODEL.USE_U0:
        cfg.MODEL.USE_U0 = check_u0(cfg, net, dataset, devices.device_of(launch.local_rank),
                                    workers)
    _prepare_folder(cfg, overwrite, launch)
    ids = list(dataset.ids)
    mine = shard(ids, launch)
    announce_shard(launch, len(mine))
    out_root = cfg.pseudo_label_dir
    fingerprints = input_fingerprints(data, cfg.DATA.SPLIT, mine)
    redo_changed_inputs(out_root, mine, fingerprints)
    todo = len(pending_ids(mine, out_root))
    if todo and launch.is_main:  # the folder is unfinished until every record is written
        (out_root / MANIFEST).unlink(missing_ok=True)
    where = f"shard {launch.rank}/{launch.world_size} of " if launch.distributed else ""
    print(f"Stage 2: {where}{len(mine)} images in '{cfg.DATA.SPLIT}', {len(mine) - todo} already "
          f"labelled, {todo} to go; writing to {out_root} with {workers} CRF "
          "worker(s).", flush=True)
    start = time.perf_counter()
    if launch.distributed:
        if todo:
            device = devices.device_of(launch.local_rank)
            generate(cfg, net, dataset, mine, device, workers,
                     position=launch.local_rank, pixel_work=pixel_work,
                     fingerprints=fingerprints)
        seconds = time.perf_counter() - start
        # Waits for every shard to be written before rank 0 checks and scores the split.
        labelled = int(all_reduce_sum(torch.tensor(todo), launch))
        if not launch.is_main:
            return {"images": len(mine), "labelled_now": todo, "seconds": round(seconds, 2),
                    "shard": f"{launch.rank}/{launch.world_size}", "label_dir": str(out_root)}
        todo = labelled
    elif devices.count > 1 and todo:
        import torch.multiprocessing as mp

        ids_per = devices.devices if isinstance(devices.devices, list) \
            else list(range(devices.devices))
        per_shard = max(1, workers // len(ids_per))
        shards = mp.start_processes(_shard_main, nprocs=len(ids_per), join=False,
                                    args=(cfg, ids_per, devices.accelerator, per_shard,
                                          pixel_work, fingerprints))
        try:
            while not shards.join():
                pass
        except BaseException:
            # Interrupted (a SIGTERM to this process alone, too): stop the device processes, which
            # would otherwise label their whole shard before this one could exit.
            for process in shards.processes:
                if process.is_alive():
                    process.terminate()
            for process in shards.processes:
                process.join()
            raise
    elif todo:
        device = devices.device_of(0)
        generate(cfg, net, dataset, ids, device, workers, pixel_work=pixel_work,
                 fingerprints=fingerprints)
    seconds = time.perf_counter() - start
    missing = pending_ids(ids, out_root)
    skipped = unfinished_error(missing, len(ids), out_root / SKIPPED) if missing else None
    if skipped is not None and not isinstance(skipped, SkippedImages):
        raise skipped  # the run was cut short: nothing to report on yet
    # Images skipped as unusable are left out of the label set, which the others still get
    # (signals, page, exports); the run then ends with the list of skipped images.
    unlabelled = set(missing)
    done = [i for i in ids if i not in unlabelled]
    result = {"images": len(ids), "labelled_now": todo, "seconds": round(seconds, 2),
              "images_per_second": round(todo / seconds, 3) if todo and seconds > 0 else None,
              "label_dir": str(out_root)}
    if save_vis and done:
        from engine.label_quality import save_panels

        save_panels(cfg, data, dataset, done[:save_vis], cfg.run_dir / "vis")
        print(f"Panels image | GT | Y_crf | Y_ret: {cfg.run_dir / 'vis'}")
    if done:
        result.update(finish_label_set(cfg, data, done))
    if skipped is not None:
        skipped.result = result
        raise skipped
    return result


def finish_label_set(cfg: Config, data, ids: list[str]) -> dict:
    """Once every image is labelled: the signals (printed, with warnings), the manifest, the
    reports against ground truth where the split has some (quality.json), the review page,
    DATA.EXPORTS.
    Returns what the run's result adds."""
    from data.labelset import LabelSet, write_manifest
    from engine.label_quality import (format_instance_report, format_report, format_signals,
                                      format_warnings, instance_report, label_warnings,
                                      quality_report, signals)
    from utils.io import atomic_write_json

    split, out_root = cfg.DATA.SPLIT, cfg.pseudo_label_dir
    manifest = dict(classes=data.classes, category_ids=data.category_ids(split), split=split,
                    root=data.root, variants=VARIANTS, ids=ids, made_by="stage 2")
    labels = LabelSet(write_manifest(out_root, **manifest).parent)  # the records, read once
    sig = signals(labels.records(), data.classes)
    warnings = label_warnings(sig)
    write_manifest(out_root, **manifest, quality={"signals": sig, "warnings": warnings})
    print(format_signals(sig))
    quality, result = {"signals": sig, "warnings": warnings}, {"warnings": warnings}
    report = quality_report(cfg, data, ids)
    if report is not None:
        print(format_report(report))
        quality.update(report)
        result["quality"] = report["miou"]
    else:
        print(f"Split '{split}' has no ground-truth masks: the labels are written and the "
              "quality report against ground truth (mIoU) is skipped; the signals above need "
              "none.")
    gt = data.instance_ground_truth(split) if report is not None else None
    if gt is not None:
        with_gt = set(data.gt_ids(split))
        instance = instance_report(labels, gt, [i for i in ids if i in with_gt])
        print(format_instance_report(instance))
        quality.update(instance)
        result["instance_quality"] = {k: v["AP"] for k, v in instance["ap"].items()}
    atomic_write_json(cfg.run_dir / "quality.json", quality)
    from engine.labels import gt_reader
    from engine.review import build_review

    build_review(labels, gt=gt_reader(data, split), progress=len(ids) >= 200)
    if cfg.DATA.EXPORTS:
        from exporters import run_exports

        run_exports(labels, cfg.DATA.EXPORTS, cfg.DATA.EXPORT_VARIANT, out_root / "exports")
    if warnings:
        print(format_warnings(warnings, str(out_root)), flush=True)
    return result
