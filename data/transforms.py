"""Training augmentation that moves boxes and masks together with the image (SPEC §0).

Shape shorthand: image uint8 (3, H, W); boxes float32 (K, 5) = x1, y1, x2, y2, class in pixel-edge
coordinates; bg_mask uint8 (1, H, W); label int64 (L, H, W). A sample is a dataset item dict
holding the image and any of the others; keys it does not know (e.g. "id") pass through.
"""

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from data.names import BOX_ARITHMETICS

# The reference's Caffe mean (B, G, R) = (104.008, 116.669, 122.675), here in RGB order and
# rounded to the uint8 grid: after mean subtraction the padding is zero, as in the reference.
MEAN_RGB = (123, 117, 104)


def reference_boxes(boxes: torch.Tensor, scale: float, pad: tuple[int, int],
                    offset: tuple[int, int], crop: tuple[int, int], flip: bool) -> torch.Tensor:
    """Boxes through the authors' augmentation, with their arithmetic (their
    datasets/transforms_bbox.py): boxes float32 (K, 5) x1, y1, x2, y2, class -> (K', 5), the
    boxes that meet the crop, in order. pad (pad_h, pad_w), offset (top, left), crop (crop_h,
    crop_w): what the image went through.

    - `RandomScale`: the coordinates times the drawn factor, in float32 (their numpy array times
      a Python float): x * fl32(s). The image itself is resized to round(side * s) pixels, so a
      box no longer ends exactly on the pixel edge it ended on.
    - `ResizeRandomCrop`: the centred padding shifts the coordinates by (pad_w, pad_h); then
      `clip_bbox` with the window [left, left + crop_w) x [top, top + crop_h): a box with x1 >=
      left + crop_w, y1 >= top + crop_h, x2 <= left or y2 <= top is dropped; x1 < left becomes
      0, otherwise x1 - left; x2 >= left + crop_w becomes crop_w + 1 (one past the crop's edge),
      otherwise x2 - left; y alike.
    - `RandomHFlip` (after the crop): mirror about the crop's centre c = crop_w / 2 as they do,
      m = fl32(x + 2 (c - x)) (in float64, then stored in their float32 array), w = |m1 - m2|,
      x1 = m1 - w, x2 = m2 + w (float32): x1 = crop_w - x2, x2 = crop_w - x1. A box clipped to
      x2 = crop_w + 1 gets x1 = -1.
    """
    (pad_h, pad_w), (top, left), (crop_h, crop_w) = pad, offset, crop
    b = boxes.to(torch.float32).clone()
    b[:, :4] *= torch.tensor(scale, dtype=torch.float32)
    b[:, [0, 2]] += pad_w
    b[:, [1, 3]] += pad_h
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    right, bottom = left + crop_w, top + crop_h
    keep = ~((x1 >= right) | (y1 >= bottom) | (x2 <= left) | (y2 <= top))
    out = b.clone()
    out[:, 0] = torch.where(x1 >= left, x1 - left, torch.zeros_like(x1))
    out[:, 1] = torch.where(y1 >= top, y1 - top, torch.zeros_like(y1))
    out[:, 2] = torch.where(x2 >= right, torch.full_like(x2, crop_w + 1), x2 - left)
    out[:, 3] = torch.where(y2 >= bottom, torch.full_like(y2, crop_h + 1), y2 - top)
    out = out[keep]
    if flip:
        xs = out[:, [0, 2]].double()
        mirrored = (xs + 2 * (crop_w / 2 - xs)).float()
        width = (mirrored[:, 0] - mirrored[:, 1]).abs()
        out[:, 0] = mirrored[:, 0] - width
        out[:, 2] = mirrored[:, 1] + width
    return out


class TrainTransform:
    """Random scale, centred pad to the crop size, random crop, horizontal flip, colour jitter:
    the authors' order and rules (their `transforms_bbox.py` / `transforms_mask.py`, SPEC §7).

    - scale: factor ~ U(scale_range), size round(side · factor); image bilinear without
      antialiasing, masks nearest (the source pixel floor(x / factor), as cv2's INTER_NEAREST);
    - pad, when the scaled image is smaller than the crop: ceil(diff / 2) on *both* sides of
      that axis (so an odd difference pads one pixel more than needed); image with `fill`,
      label and bg_mask with `ignore_index`, so padding is neither background nor a class;
    - crop at offset floor(u · (size - crop)), u ~ U[0, 1); flip with probability 0.5;
    - colour jitter last, on the crop (padding included), in the fixed order brightness →
      contrast → saturation → hue, factors ~ U(1 - j, 1 + j) (hue shift ~ U(-h, h)).
    Boxes follow every geometric step; a box is kept while any of it lies inside the crop
    (however thin) and dropped with its class otherwise. box_arithmetic (DATA.BOX_ARITHMETIC):
    "reference" moves them with the authors' arithmetic (`reference_boxes`: scaled by the drawn
    factor, a box reaching the crop's far edge ends one pixel past it); "pixel_edges" moves them
    with the image's pixels (scaled by round(side * s) / side, clipped to [0, crop]). The image
    and the masks are the same either way.
    Randomness comes from `generator` (default: torch's global RNG, which the trainer seeds), so
    runs are reproducible.
    """

    def __init__(self, crop_size, scale_range=(0.5, 1.5), flip: bool = True,
                 color_jitter=(0.5, 0.5, 0.5, 0.0), fill=MEAN_RGB, ignore_index: int = 255,
                 generator: torch.Generator | None = None, box_arithmetic: str = "reference"):
        if box_arithmetic not in BOX_ARITHMETICS:
            raise ValueError(f"box_arithmetic {box_arithmetic!r}: choose one of {BOX_ARITHMETICS}")
        self.box_arithmetic = box_arithmetic
        self.crop_h, self.crop_w = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
        self.scale_range = scale_range
        self.flip = flip
        self.color_jitter = color_jitter
        # Images are uint8 and a float fill would be truncated (122.675 -> 122): round instead.
        self.fill = [round(float(v)) for v in fill]
        self.ignore_index = ignore_index
        self.generator = generator

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=self.generator).item()

    def _offset(self, room: int) -> int:
        """floor(u · room), u ~ U[0, 1): the reference's crop offset (never `room` itself)."""
        return int(torch.rand((), generator=self.generator).item() * room)

    def _jitter(self, image: torch.Tensor) -> torch.Tensor:
        brightness, contrast, saturation, hue = self.color_jitter
        if brightness > 0:
            image = F.adjust_brightness(image, self._uniform(max(0.0, 1 - brightness), 1 + brightness))
        if contrast > 0:
            image = F.adjust_contrast(image, self._uniform(max(0.0, 1 - contrast), 1 + contrast))
        if saturation > 0:
            image = F.adjust_saturation(image, self._uniform(max(0.0, 1 - saturation), 1 + saturation))
        if hue > 0:
            image = F.adjust_hue(image, self._uniform(-hue, hue))
        return image

    def __call__(self, sample: dict) -> dict:
        image = tv_tensors.Image(sample["image"])
        height, width = image.shape[-2:]
        masks = {k: tv_tensors.Mask(sample[k]) for k in ("bg_mask", "label") if k in sample}
        boxes = classes = None
        reference = "boxes" in sample and self.box_arithmetic == "reference"
        if "boxes" in sample and not reference:
            boxes = tv_tensors.BoundingBoxes(sample["boxes"][:, :4], format="XYXY",
                                             canvas_size=(height, width))
            classes = sample["boxes"][:, 4:]

        # Deviation (docs/SPEC.md §8): torchvision's tensor ops and torch's generator where the
        # authors use cv2 / PIL and Python's `random`: the same operations, other rounding.
        scale = self._uniform(*self.scale_range)
        size = [max(1, round(height * scale)), max(1, round(width * scale))]
        image = F.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=False)
        masks = {k: F.resize(m, size, interpolation=InterpolationMode.NEAREST)
                 for k, m in masks.items()}
        if boxes is not None:
            # Deviation (DATA.BOX_ARITHMETIC pixel_edges): the box scales by the image's own
            # factor round(side * s) / side, not by s.
            boxes = F.resize(boxes, size)

        pad_h = -(-max(0, self.crop_h - size[0]) // 2)
        pad_w = -(-max(0, self.crop_w - size[1]) // 2)
        if pad_h or pad_w:
            padding = [pad_w, pad_h, pad_w, pad_h]  # left, top, right, bottom
            image = F.pad(image, padding, fill=self.fill)
            masks = {k: F.pad(m, padding, fill=self.ignore_index) for k, m in masks.items()}
            if boxes is not None:
                boxes = F.pad(boxes, padding)

        top = self._offset(image.shape[-2] - self.crop_h)
        left = self._offset(image.shape[-1] - self.crop_w)
        image = F.crop(image, top, left, self.crop_h, self.crop_w)
        masks = {k: F.crop(m, top, left, self.crop_h, self.crop_w) for k, m in masks.items()}
        if boxes is not None:
            boxes = F.crop(boxes, top, left, self.crop_h, self.crop_w)

        flipped = self.flip and torch.rand((), generator=self.generator).item() < 0.5
        if flipped:
            image = F.horizontal_flip(image)
            masks = {k: F.horizontal_flip(m) for k, m in masks.items()}
            if boxes is not None:
                boxes = F.horizontal_flip(boxes)

        if any(self.color_jitter):
            image = tv_tensors.wrap(self._jitter(image), like=image)

        out = dict(sample)
        out["image"] = image.as_subclass(torch.Tensor)
        for k, m in masks.items():
            out[k] = m.as_subclass(torch.Tensor)
        if reference:
            out["boxes"] = reference_boxes(sample["boxes"], scale, (pad_h, pad_w), (top, left),
                                           (self.crop_h, self.crop_w), flipped)
        elif boxes is not None:
            # Deviation (DATA.BOX_ARITHMETIC pixel_edges): clipped to the crop's pixel edges.
            xyxy = boxes.as_subclass(torch.Tensor).clone()
            xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, self.crop_w)
            xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, self.crop_h)
            keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
            out["boxes"] = torch.cat([xyxy, classes], dim=1)[keep]
        return out
