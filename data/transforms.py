"""Training augmentation that moves boxes and masks together with the image (SPEC §0).

Shape shorthand: image uint8 (3, H, W); boxes float32 (K, 5) = x1, y1, x2, y2, class in pixel-edge
coordinates; bg_mask uint8 (1, H, W); label int64 (L, H, W). A sample is a dataset item dict
holding the image and any of the others; keys it does not know (e.g. "id") pass through.
"""

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

# The reference's Caffe mean (B, G, R) = (104.008, 116.669, 122.675), here in RGB order and
# rounded to the uint8 grid: after mean subtraction the padding is zero, as in the reference.
MEAN_RGB = (123, 117, 104)


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
    Boxes follow every geometric step and are clipped to the crop; a box is kept while any of it
    lies inside (positive width and height, however thin) and dropped with its class otherwise.
    Randomness comes from `generator` (default: torch's global RNG, which the trainer seeds), so
    runs are reproducible.
    """

    def __init__(self, crop_size, scale_range=(0.5, 1.5), flip: bool = True,
                 color_jitter=(0.5, 0.5, 0.5, 0.0), fill=MEAN_RGB, ignore_index: int = 255,
                 generator: torch.Generator | None = None):
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
        if "boxes" in sample:
            boxes = tv_tensors.BoundingBoxes(sample["boxes"][:, :4], format="XYXY",
                                             canvas_size=(height, width))
            classes = sample["boxes"][:, 4:]

        scale = self._uniform(*self.scale_range)
        size = [max(1, round(height * scale)), max(1, round(width * scale))]
        image = F.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=False)
        masks = {k: F.resize(m, size, interpolation=InterpolationMode.NEAREST)
                 for k, m in masks.items()}
        if boxes is not None:
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

        if self.flip and torch.rand((), generator=self.generator).item() < 0.5:
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
        if boxes is not None:
            xyxy = boxes.as_subclass(torch.Tensor).clone()
            xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, self.crop_w)
            xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, self.crop_h)
            keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
            out["boxes"] = torch.cat([xyxy, classes], dim=1)[keep]
        return out
