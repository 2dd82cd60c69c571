"""Stage 2's files, and the per-image work its worker processes run (utils/pool.py).

Under DATA.PSEUDO_LABEL_DIR, per image: Y_crf/<id>.png, Y_ret/<id>.png and Y_box/<id>.png (each
box filled, the box baseline), and records/<id>.json (its boxes, instance masks and signals:
data/labelset.py), written last.

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
VARIANTS = (*LABELS, BOX_LABEL)


def output_paths(out_root: Path, image_id: str) -> dict[str, Path]:
    """The files one image is done with: its label maps and, written last, its record
    (data/labelset.py: boxes, instance masks, signals)."""
    from data.labelset import RECORDS, record_path

    paths = {d: out_root / d / f"{image_id}.png" for d in VARIANTS}
    paths[RECORDS] = record_path(out_root, image_id)
    return paths


def pending_ids(ids: list[str], out_root: Path) -> list[str]:
    """Ids whose output files are not all there yet."""
    return [i for i in ids if not all(p.is_file() for p in output_paths(out_root, i).values())]


def preload_pixel_work() -> None:
    """Worker initializer of the CPU path: import the per-pixel code (torch) while the main
    process is still loading data, not on the first image."""
    import models.pseudo_labels  # noqa: F401


def label_one(job: dict) -> str:
    """Worker, per-pixel work on the CPU: features of one image -> its label maps and record.
    Returns the image id."""
    from models.pseudo_labels import make_pseudo_labels

    labels = make_pseudo_labels(
        job["features"], job["weight"], job["image"], job["boxes"], job["bg_mask"],
        grid_size=job["grid_size"], bg_threshold=job["bg_threshold"], crf=job["crf"],
        use_u0=job["use_u0"], return_box_scores=True)
    return write_labels(job, *labels)


def write_labels(job: dict, y_crf: np.ndarray, y_ret: np.ndarray,
                 box_scores: np.ndarray) -> str:
    """Write one image's Y_crf, Y_ret and Y_box PNGs, then its record (one instance mask per box
    and variant, the instances of overlapping boxes of one class split by `box_scores`, and the
    per-box signals); returns the image id. Runs in a worker."""
    from data.labelset import RECORDS, image_record
    from utils.boxes import fill_boxes
    from utils.io import atomic_write_json, atomic_write_png
    from utils.palette import voc_palette

    palette = voc_palette()
    boxes = np.asarray(job["boxes"]).reshape(-1, 5)
    labels = {"Y_crf": y_crf, "Y_ret": y_ret, BOX_LABEL: fill_boxes(boxes, *y_crf.shape)}
    for d in VARIANTS:
        atomic_write_png(job["out"][d], labels[d], palette=palette)
    record = image_record(job["id"], job["file_name"], boxes[:, :4], boxes[:, 4], labels,
                          {d: f"{d}/{job['out'][d].name}" for d in VARIANTS}, box_scores)
    atomic_write_json(job["out"][RECORDS], record)
    return job["id"]


def write_job(job: dict) -> str:
    """Worker, device path: `write_labels` of a job that carries its labels."""
    return write_labels(job, job["y_crf"], job["y_ret"], job["box_scores"])
