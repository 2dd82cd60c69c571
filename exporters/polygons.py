"""Masks as polygons, for the formats that store outlines (COCO's polygon option, YOLO-seg).

Shape shorthand: H x W mask, N points. A polygon is float (N, 2) x, y in pixel coordinates whose
point (x, y) is the centre of pixel column x, row y: the outline runs through the mask's border
pixels (OpenCV's convention, which cv2.fillPoly, and so Ultralytics, rasterises back). A polygon
cannot hold a hole: the outline of a mask with holes encloses them (COCO's RLE keeps holes).
"""

from __future__ import annotations

import numpy as np


def mask_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """The outer outline of each connected part of a bool (H, W) mask, largest part first: a list
    of float (N, 2) polygons with N >= 3. A part whose centre-line outline has (almost) no area
    (one pixel, a one-pixel-wide line, straight or not) gets the rectangle around its pixels'
    outer edges instead, so that it is not lost (for a diagonal line, a coarse outline)."""
    import cv2

    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8),
                                   cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        points = contour[:, 0, :].astype(np.float64)
        x0, y0 = points.min(0)
        x1, y1 = points.max(0)
        if len(points) < 3 or x0 == x1 or y0 == y1 or abs(_area(points)) < 1:
            points = np.array([[x0 - 0.5, y0 - 0.5], [x1 + 0.5, y0 - 0.5], [x1 + 0.5, y1 + 0.5],
                               [x0 - 0.5, y1 + 0.5]])
        polygons.append(points)
    return sorted(polygons, key=lambda p: -abs(_area(p)))


def _area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def join_polygons(polygons: list[np.ndarray]) -> np.ndarray:
    """One polygon for several parts (YOLO-seg keeps one outline per instance): each next part is
    visited from the point of the outline so far that is nearest to it, and left by the same
    point, so the bridges have no width and add no area."""
    joined = polygons[0]
    for part in polygons[1:]:
        d = ((joined[:, None, :] - part[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(int(d.argmin()), d.shape)
        loop = np.roll(part, -j, axis=0)
        joined = np.concatenate([joined[:i + 1], loop, loop[:1], joined[i:]])
    return joined
