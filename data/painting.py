"""Drawing synthetic objects and backgrounds: shared by the VOC-layout and COCO-layout
generators (data/synthetic.py, data/synthetic_coco.py), which do not import each other.

Every function draws with the `np.random.Generator` it is given, so an image depends only on
the seed. Sizes are in pixels of a square S × S image; periods and radii scale with S.
"""

import zlib
from dataclasses import dataclass

import cv2
import numpy as np

from utils.palette import VOC_CLASSES

# What a generator writes at the root of its tree; it only ever replaces a tree holding it.
MARKER = "synthetic.json"
MIN_VISIBLE_FRACTION = 0.4
SHAPES = ("ellipse", "blob", "polygon", "ring")
TEXTURES = ("stripes", "blotches", "grain", "checks", "rings")


@dataclass(frozen=True)
class ClassStyle:
    """How instances of one class look. Colours are RGB means in 0..255; periods are fractions of
    the image size, so the look does not depend on --size."""

    colour: tuple[float, float, float]
    texture: str
    period: float
    amplitude: float
    shape_weights: tuple[float, float, float, float]  # over SHAPES


# Warm colours are shared by cat, dog and person, and car's red sits between them: colour alone
# leaves classes ambiguous, texture alone too (the background borrows textures).
STYLES = {
    "cat": ClassStyle((200, 130, 70), "stripes", 0.07, 0.35, (0.4, 0.6, 0.0, 0.0)),
    "dog": ClassStyle((150, 100, 60), "blotches", 0.14, 0.40, (0.2, 0.5, 0.3, 0.0)),
    "bird": ClassStyle((90, 125, 180), "grain", 0.05, 0.35, (0.4, 0.0, 0.6, 0.0)),
    "car": ClassStyle((175, 75, 70), "checks", 0.09, 0.30, (0.0, 0.2, 0.5, 0.3)),
    "person": ClassStyle((190, 150, 130), "rings", 0.09, 0.30, (0.4, 0.1, 0.0, 0.5)),
}


def style_for(name: str) -> ClassStyle:
    """The style of a class: from STYLES, else drawn from a generator seeded by the class (its
    VOC index for a VOC class, a checksum of the name for any other), so a name always looks the
    same."""
    if name in STYLES:
        return STYLES[name]
    seed = VOC_CLASSES.index(name) if name in VOC_CLASSES else zlib.crc32(name.encode())
    rng = np.random.default_rng(seed)
    return ClassStyle(tuple(rng.uniform(50, 210, 3).round()), TEXTURES[seed % 5],
                      float(rng.uniform(0.05, 0.14)), float(rng.uniform(0.3, 0.4)),
                      tuple(rng.dirichlet(np.ones(4))))


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return xs, ys


def shape_mask(kind: str, cx: float, cy: float, radius: float, size: int,
                rng: np.random.Generator) -> np.ndarray:
    """bool (S, S): one filled shape of roughly `radius` around (cx, cy)."""
    xs, ys = grid(size)
    angle = rng.uniform(0, np.pi)
    u = (xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)
    v = -(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle)
    aspect = rng.uniform(0.35, 1.0)
    if kind == "ellipse":
        return (u / radius) ** 2 + (v / (radius * aspect)) ** 2 <= 1
    if kind == "blob":  # radius modulated by a few low harmonics: lobes and dents
        theta = np.arctan2(v, u)
        r = np.ones_like(theta)
        for k in (2, 3, 4, 5):
            r += rng.uniform(0, 0.18) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        return np.hypot(u, v / (0.6 + 0.4 * aspect)) <= radius * r
    if kind == "polygon":  # star-like: vertices at random angles and radii
        n = int(rng.integers(5, 10))
        thetas = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = radius * rng.uniform(0.45, 1.1, n)
        points = np.stack([cx + radii * np.cos(thetas), cy + radii * np.sin(thetas)], 1)
        mask = np.zeros((size, size), np.uint8)
        cv2.fillPoly(mask, [np.round(points * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
        return mask.astype(bool)
    if kind == "ring":
        d = np.hypot(u, v / (0.7 + 0.3 * aspect))
        return (d <= radius) & (d >= radius * rng.uniform(0.35, 0.6))
    if kind == "rectangle":
        return (np.abs(u) <= radius) & (np.abs(v) <= radius * aspect)
    if kind == "bar":
        return (np.abs(u) <= radius * 1.5) & (np.abs(v) <= max(1.0, radius * 0.12))
    raise ValueError(kind)


def smooth_noise(size: int, cells: int, rng: np.random.Generator, channels: int = 1) -> np.ndarray:
    """float32 (S, S, channels) in about [-1, 1]: a random cells × cells grid, bicubic upsampled."""
    cells = max(2, cells)
    grid = rng.uniform(-1, 1, (cells, cells, channels)).astype(np.float32)
    out = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    return out.reshape(size, size, channels)


def texture_field(kind: str, period: float, size: int, centre: tuple[float, float],
             rng: np.random.Generator) -> np.ndarray:
    """float32 (S, S) in about [-1, 1]; period is a fraction of the image size (at least 3 px)."""
    xs, ys = grid(size)
    p = max(3.0, period * size)
    angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    u = xs * np.cos(angle) + ys * np.sin(angle)
    v = -xs * np.sin(angle) + ys * np.cos(angle)
    if kind == "stripes":
        return np.sin(2 * np.pi * u / p + phase)
    if kind == "checks":
        return np.sign(np.sin(2 * np.pi * u / p + phase) * np.sin(2 * np.pi * v / p))
    if kind == "rings":
        return np.sin(2 * np.pi * np.hypot(xs - centre[0], ys - centre[1]) / p + phase)
    if kind == "blotches":
        return np.tanh(2.5 * smooth_noise(size, round(size / p), rng)[..., 0])
    if kind == "grain":
        return rng.uniform(-1, 1, (size, size)).astype(np.float32)
    raise ValueError(kind)


def paint(image: np.ndarray, mask: np.ndarray, colour, texture: np.ndarray, amplitude: float) -> None:
    shaded = np.asarray(colour, np.float32) * (1 + amplitude * texture[..., None])
    image[mask] = shaded[mask]


def background(size: int, styles: list[ClassStyle], rng: np.random.Generator) -> np.ndarray:
    """float32 (S, S, 3): smooth colour field, faint texture, 2–5 distractor shapes."""
    base = rng.uniform(60, 200) + rng.normal(0, 35, 3)
    image = (base + 40 * smooth_noise(size, 3, rng, channels=3)).astype(np.float32)
    faint = texture_field(TEXTURES[rng.integers(len(TEXTURES))], rng.uniform(0.05, 0.15), size,
                     (size / 2, size / 2), rng)
    image *= 1 + 0.08 * faint[..., None]
    for _ in range(int(rng.integers(2, 6))):
        kind = ("rectangle", "bar", "ellipse", "polygon")[rng.integers(4)]
        radius = size * rng.uniform(0.08, 0.25)
        mask = shape_mask(kind, *rng.uniform(0, size, 2), radius, size, rng)
        style = styles[rng.integers(len(styles))]
        if rng.random() < 0.5:  # a class colour with a texture no class uses here
            colour = np.asarray(style.colour) + rng.normal(0, 30, 3)
            texture = smooth_noise(size, 4, rng)[..., 0]
            amplitude = 0.2
        else:  # a class texture in a random colour, fainter than on objects
            colour = rng.uniform(50, 210, 3)
            texture = texture_field(style.texture, style.period, size, (size / 2, size / 2), rng)
            amplitude = style.amplitude * 0.6
        paint(image, mask, colour, texture, amplitude)
    return image


def all_visible(objects: list, size: int) -> bool:
    """Every object keeps MIN_VISIBLE_FRACTION of its area visible under the later ones."""
    covered = np.zeros((size, size), bool)
    for mask, *_ in reversed(objects):
        area = mask.sum()
        if area < max(12, 0.003 * size * size):
            return False
        if (mask & ~covered).sum() < MIN_VISIBLE_FRACTION * area:
            return False
        covered |= mask
    return True
