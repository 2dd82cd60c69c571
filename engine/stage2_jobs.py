"""Stage 2's files, and the per-image work its worker processes run (utils/pool.py).

Under DATA.PSEUDO_LABEL_DIR, per image: Y_crf/<id>.png, Y_ret/<id>.png and Y_box/<id>.png (each
box filled, the box baseline), and on COCO-layout data instances/<id>.json (its instance masks).

Nothing here imports torch or Lightning at module level: a worker that only runs the CRF and
writes files (`write_job`, and utils.crf's `regions_job`) holds numpy, the CRF and PIL alone.
`label_one`, the CPU path's job that also does the per-pixel work, imports models.pseudo_labels
(torch) when it first runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LABELS = ("Y_crf", "Y_ret")
# Each box filled with its class (smaller boxes on top): the box baseline, as a label set stage 3
# can train on (DATA.PSEUDO_LABELS [Y_box, Y_box]).
BOX_LABEL = "Y_box"
INSTANCES = "instances"
# What the per-image instance files hold: the two pseudo labels and the box-filling baseline.
INSTANCE_SOURCES = ("box_baseline", *LABELS)


def output_paths(out_root: Path, image_id: str, instances: bool) -> dict[str, Path]:
    """The files one image is done with: its label maps, and its instances on COCO."""
    paths = {d: out_root / d / f"{image_id}.png" for d in (*LABELS, BOX_LABEL)}
    if instances:
        paths[INSTANCES] = out_root / INSTANCES / f"{image_id}.json"
    return paths


def pending_ids(ids: list[str], out_root: Path, instances: bool = False) -> list[str]:
    """Ids whose output files are not all there yet."""
    return [i for i in ids
            if not all(p.is_file() for p in output_paths(out_root, i, instances).values())]


def preload_pixel_work() -> None:
    """Worker initializer of the CPU path: import the per-pixel code (torch) while the main
    process is still loading data, not on the first image."""
    import models.pseudo_labels  # noqa: F401


def label_one(job: dict) -> str:
    """Worker, per-pixel work on the CPU: features of one image -> Y_crf and Y_ret PNGs (and on
    COCO its instance JSON). Returns the image id."""
    from models.pseudo_labels import make_pseudo_labels

    labels = make_pseudo_labels(
        job["features"], job["weight"], job["image"], job["boxes"], job["bg_mask"],
        grid_size=job["grid_size"], bg_threshold=job["bg_threshold"], crf=job["crf"],
        use_u0=job["use_u0"], return_box_scores="category_ids" in job)
    return write_labels(job, *labels)


def write_labels(job: dict, y_crf: np.ndarray, y_ret: np.ndarray,
                 box_scores: np.ndarray | None = None) -> str:
    """Write one image's Y_crf, Y_ret and Y_box PNGs (and on COCO its instance JSON, the
    instances split by `box_scores`); returns the image id. Runs in a worker."""
    from utils.boxes import fill_boxes
    from utils.io import atomic_write_json, atomic_write_png
    from utils.palette import voc_palette

    if "category_ids" in job:
        atomic_write_json(job["out"][INSTANCES], image_instances(job, y_crf, y_ret, box_scores))
    palette = voc_palette()
    for d, label in zip(LABELS, (y_crf, y_ret)):
        atomic_write_png(job["out"][d], label, palette=palette)
    atomic_write_png(job["out"][BOX_LABEL], fill_boxes(job["boxes"], *y_crf.shape),
                     palette=palette)
    return job["id"]


def write_job(job: dict) -> str:
    """Worker, device path: `write_labels` of a job that carries its labels."""
    return write_labels(job, job["y_crf"], job["y_ret"], job.get("box_scores"))


def image_instances(job: dict, y_crf: np.ndarray, y_ret: np.ndarray,
                    box_scores: np.ndarray) -> dict:
    """COCO results entries of one image for each of INSTANCE_SOURCES: one mask per box from Y_crf
    and from Y_ret, scored by the mean box CAM over the mask, and the filled box with score 1."""
    from utils.instances import box_pixel_masks, instance_masks, instance_results, mask_scores

    boxes, image_id, categories = job["boxes"], int(job["id"]), job["category_ids"]
    record = {"box_baseline": instance_results(box_pixel_masks(boxes, *y_crf.shape), image_id,
                                               categories, np.ones(len(boxes)))}
    for name, label in zip(LABELS, (y_crf, y_ret)):
        masks = instance_masks(label, boxes, box_scores)
        record[name] = instance_results(masks, image_id, categories,
                                        mask_scores(masks, box_scores))
    return record
