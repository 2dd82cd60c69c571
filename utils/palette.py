"""PASCAL VOC class names and the colour palette of its index PNGs."""

import numpy as np

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


def voc_palette() -> np.ndarray:
    """The standard VOC colormap: uint8 (256, 3), entry i = RGB colour of label i.

    The bits of the label are spread over the colour channels from the most significant colour
    bit down (bit 0 → R, bit 1 → G, bit 2 → B, then the next three bits one step lower), so
    background is black, 255 (void) is (224, 224, 192) and neighbouring classes differ clearly.
    """
    palette = np.zeros((256, 3), dtype=np.uint8)
    for label in range(256):
        value, r, g, b = label, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[label] = (r, g, b)
    return palette


def colorize(label: np.ndarray) -> np.ndarray:
    """Colour an index map with the VOC palette.

    label: integer (H, W) with values in 0..255. Returns uint8 (H, W, 3) RGB.
    """
    label = np.asarray(label)
    if label.min(initial=0) < 0 or label.max(initial=0) > 255:
        raise ValueError(f"labels must lie in 0..255 to be coloured, found {label.min()}..{label.max()}")
    return voc_palette()[label.astype(np.intp)]


def panel(image: np.ndarray, maps, gap: int = 4) -> np.ndarray:
    """A row for looking at labels: the image, then each label map coloured with the VOC palette,
    separated by white gaps. image uint8 (H, W, 3); maps: integer (H, W) arrays. Returns uint8
    (H, W', 3)."""
    white = np.full((image.shape[0], gap, 3), 255, np.uint8)
    parts = [image]
    for m in maps:
        parts += [white, colorize(m)]
    return np.concatenate(parts, axis=1)


def stack_rows(rows, gap: int = 4) -> np.ndarray:
    """Rows of equal width (e.g. `panel`s) one above the other, with white gaps between them."""
    rows = list(rows)
    white = np.full((gap, rows[0].shape[1], 3), 255, np.uint8)
    parts = []
    for k, row in enumerate(rows):
        parts += [white, row] if k else [row]
    return np.concatenate(parts, axis=0)
