"""Masks drawn from bounding boxes: the background mask of stage 1 and the box-filling baseline.

Shape shorthand: K boxes, image H × W. A box is (x1, y1, x2, y2[, class]) in pixel coordinates;
it covers rows int(y1):int(y2) and columns int(x1):int(x2). `int` truncates, exactly as the
reference does with VOC's float XML numbers (SPEC §0), so (2.9, 1.2, 5.7, 4.0) covers columns 2..4
and rows 1..3. Boxes are clipped to the image first, so negative or oversized coordinates never
wrap around the way Python slices would.
"""

import numpy as np


def _pixel_ranges(boxes, height: int, width: int) -> np.ndarray:
    """int64 (K, 4) = (col0, row0, col1, row1), the truncated box ranges clipped to the image."""
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
    for x0, y0, x1, y1 in _pixel_ranges(boxes, height, width):
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
    ranges = _pixel_ranges(boxes, height, width)
    areas = (ranges[:, 2] - ranges[:, 0]) * (ranges[:, 3] - ranges[:, 1])
    for k in np.argsort(-areas, kind="stable"):
        x0, y0, x1, y1 = ranges[k]
        label[y0:y1, x0:x1] = int(boxes[k, 4])
    return label
