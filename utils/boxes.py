"""Masks drawn from bounding boxes: the background mask of stage 1 and the box-filling baseline.

Shape shorthand: K boxes, image H × W. A box is (x1, y1, x2, y2[, class]) in pixel coordinates;
it covers rows int(y1):int(y2) and columns int(x1):int(x2). `int` truncates, exactly as the
reference does with VOC's float XML numbers (SPEC §0), so (2.9, 1.2, 5.7, 4.0) covers columns 2..4
and rows 1..3. Boxes are clipped to the image first, so negative or oversized coordinates never
wrap around the way Python slices would.
"""

import numpy as np

from utils.errors import BanaError
from utils.io import atomic_write_png, read_image_size, read_index_png


def pixel_ranges(boxes, height: int, width: int) -> np.ndarray:
    """int64 (K, 4) = (col0, row0, col1, row1), the truncated box ranges clipped to the image.

    boxes: (K, >=4) array-like (columns after the fourth are ignored), or one box; K may be 0.
    Every rasteriser of boxes (here, utils/instances.py, models/pseudo_labels.py, the label
    records of data/labelset.py) goes through this one function.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    boxes = boxes.reshape(0, 4) if boxes.size == 0 else np.atleast_2d(boxes)
    ranges = np.trunc(boxes[:, :4]).astype(np.int64)
    ranges[:, [0, 2]] = ranges[:, [0, 2]].clip(0, width)
    ranges[:, [1, 3]] = ranges[:, [1, 3]].clip(0, height)
    return ranges


def bg_mask_from_boxes(boxes, height: int, width: int) -> np.ndarray:
    """Background mask: uint8 (H, W), 1 outside every box, 0 inside any box.

    boxes: (K, 4) or (K, 5) array-like (a class column is ignored); K may be 0, giving all ones.
    """
    mask = np.ones((height, width), dtype=np.uint8)
    for x0, y0, x1, y1 in pixel_ranges(boxes, height, width):
        mask[y0:y1, x0:x1] = 0
    return mask


def fill_boxes(boxes, height: int, width: int) -> np.ndarray:
    """Box-filling baseline label map: uint8 (H, W), each box painted with its class, 0 elsewhere.

    boxes: (K, 5) array-like, column 4 = class index. Boxes are painted from the largest area down
    so that a small box inside a large one stays visible (where boxes overlap, the smaller wins);
    equal areas keep the given order.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    boxes = boxes.reshape(0, 5) if boxes.size == 0 else np.atleast_2d(boxes)
    label = np.zeros((height, width), dtype=np.uint8)
    ranges = pixel_ranges(boxes, height, width)
    areas = (ranges[:, 2] - ranges[:, 0]) * (ranges[:, 3] - ranges[:, 1])
    for k in np.argsort(-areas, kind="stable"):
        x0, y0, x1, y1 = ranges[k]
        label[y0:y1, x0:x1] = int(boxes[k, 4])
    return label


# Worker jobs of the background-mask pools (stages 1 and 2, the setup scripts). They live here,
# where nothing imports torch, so that a pool's workers stay small (a worker imports the module
# of its job).

BG_LEDGER = "boxes.jsonl"  # beside the masks: the boxes each mask was made from


def bg_mask_summary(counts: dict, folder) -> str:
    """The setup scripts' last line: what was written and kept, and where."""
    return (f"BgMaskfromBoxes: wrote {counts['written']}, kept {counts['skipped']} existing "
            f"({counts['total']} images) in {folder}")


def write_new_bg_masks(jobs: list, records: list, workers: int, progress: bool = True,
                       chunksize: int = 32) -> int:
    """The setup scripts' step: write the masks of `jobs` (`write_bg_mask_job`'s) that do not
    exist yet, in `workers` processes, and record each one written in its folder's ledger
    (BG_LEDGER, the record stages 1 and 2 keep: data/base.py ensure_bg_masks). records: per job,
    (image id, fingerprint of the boxes and size it is made from). Returns how many it wrote."""
    from utils.pool import run_all
    from utils.records import Ledger

    done = run_all(write_bg_mask_job, jobs, workers, "BgMaskfromBoxes", progress,
                   chunksize=chunksize)
    lines: dict = {}
    for job, (key, boxes), new in zip(jobs, records, done):
        if new:
            lines.setdefault(job[0].parent, {})[key] = {"boxes": boxes}
    for folder, entries in lines.items():
        Ledger(folder / BG_LEDGER).add_many(entries)
    return sum(done)


def write_bg_mask_job(job: tuple) -> bool:
    """Worker job: write one background mask unless it exists; True when written. job: (path,
    boxes float32 (A, 4), (H, W) or None, the image whose size (as shown) to take when None)."""
    path, boxes, size, image = job
    if path.is_file():
        return False
    if size is None:
        size = read_image_size(image, exif=True)
    atomic_write_png(path, bg_mask_from_boxes(boxes, *size))
    return True


def bg_mask_job(job: tuple) -> str:
    """Worker job: make one background mask right; returns "written", or for an existing file
    found without a record (`check`: the setup scripts' of old, or the authors' release) "kept"
    when it matches the boxes and "differs" when it does not (it is kept as it is). job: (path,
    boxes float32 (A, 4), (H, W) or None (then the image's size as shown), the image, check)."""
    path, boxes, size, image, check = job
    if size is None:
        size = read_image_size(image, exif=True)
    mask = bg_mask_from_boxes(boxes, *size)
    if check and path.is_file():
        try:
            return "kept" if np.array_equal(read_index_png(path), mask) else "differs"
        except BanaError:
            pass  # unreadable: written again
    atomic_write_png(path, mask)
    return "written"
