"""File I/O for the whole project: atomic writes and image reads that fail with a clear message.

Every writer goes through `_atomic_write`: the bytes land in a temporary file in the target
folder, are fsync'ed, then `os.replace`d over the target. A crash or a Ctrl-C mid-write never
leaves a truncated PNG behind, which matters because the setup scripts skip files that exist.
"""

import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.errors import BanaError

# The EXIF tag of the orientation; values 5-8 turn the stored pixels by 90° for display.
_ORIENTATION = 0x0112
# What Pillow raises on a truncated or garbled file, besides its own UnidentifiedImageError.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)


def _pillow_suffixes() -> tuple[str, ...]:
    """Every file extension Pillow opens and decodes itself (.jpg, .jfif, .png, .webp, .tif,
    ...): not its stubs (HDF5, GRIB, BUFR, WMF need a handler) nor MPEG (identified, never
    decoded)."""
    from PIL import ImageFile

    Image.init()
    suffixes = []
    for suffix, format_ in Image.registered_extensions().items():
        factory = Image.OPEN.get(format_, (None,))[0]
        stub = isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)
        if factory is not None and not stub and format_ != "MPEG":
            suffixes.append(suffix.lower())
    return tuple(sorted(set(suffixes)))


# The one list of image extensions: the dataset layouts and predict.py's --input folders.
IMAGE_SUFFIXES = _pillow_suffixes()
# How messages name them.
IMAGE_SUFFIXES_SHOWN = ("the image files Pillow reads: .jpg, .jpeg, .jfif, .png, .bmp, .tif, "
                        ".webp, .gif, ...")


def image_files(folder, recursive: bool = False) -> list[Path]:
    """The image files of `folder` (by extension, IMAGE_SUFFIXES), sorted by path; with
    `recursive`, those of its sub-folders too. A folder named like an image (x.jpg/) is no
    image."""
    folder = Path(folder)
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _too_large(path, err) -> BanaError:
    return BanaError(f"cannot read image {path}: {err} Pillow refuses images this large as a "
                     "guard against decompression bombs (a small file that decodes to gigabytes). "
                     "If the image is genuine, downscale it first (e.g. `convert IMAGE -resize "
                     "8000x8000 SMALLER.jpg` with ImageMagick); otherwise remove it.")


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; give the result the mode a plain open() would.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        # Name the file being written, not the temporary one (a full disk, a quota).
        raise OSError(err.errno, err.strerror, str(path)) from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_png(path, array: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Write a PNG atomically.

    array: uint8 (H, W) or (H, W, 3). With `palette` (uint8 (256, 3), e.g. `voc_palette()`) and
    an (H, W) array the file is an index ("P" mode) PNG, the format of VOC's label files: the
    pixel values are the labels and viewers show the palette colours.
    """
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"PNG data must be uint8, got {array.dtype} for {path}")
    if palette is None:
        image = Image.fromarray(array)
    else:
        if array.ndim != 2:
            raise ValueError(f"an index PNG needs an (H, W) array, got shape {array.shape} for {path}")
        # frombytes keeps the values as indices; convert("P") would quantise them as colours.
        image = Image.frombytes("P", (array.shape[1], array.shape[0]), array.tobytes())
        image.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    _atomic_write(path, buffer.getvalue())


def atomic_write_jpeg(path, rgb: np.ndarray, quality: int = 95) -> None:
    """Write uint8 (H, W, 3) RGB as a JPEG atomically (4:4:4, no chroma subsampling)."""
    rgb = np.ascontiguousarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"JPEG data must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape} for {path}")
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality, subsampling=0)
    _atomic_write(path, buffer.getvalue())


def atomic_write_text(path, text: str) -> None:
    """Write UTF-8 text atomically."""
    _atomic_write(path, text.encode("utf-8"))


def json_safe(value):
    """`value` with every NaN float (a class absent from ground truth and prediction, an AP with
    nothing to score) replaced by None, through dicts and lists, so the JSON written is strict."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def atomic_write_json(path, obj) -> None:
    """Write `obj` as indented JSON (keys in insertion order) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _open(path, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise BanaError(f"{what} not found: {path}")
    try:
        image = Image.open(path)
        image.load()
    except Image.DecompressionBombError as err:
        raise _too_large(path, err) from None
    except _DECODE_ERRORS as err:
        raise BanaError(
            f"cannot read {what} {path}: the file is corrupt or not an image ({err}). "
            "Re-create or re-download it."
        ) from None
    return image


def read_image(path, exif: bool = False) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3) RGB. Corrupt or missing → BanaError naming the file.

    Greyscale, palette, RGBA (alpha dropped) and CMYK images are converted to RGB; 16- and 32-bit
    integer greyscale (e.g. 16-bit PNG) is scaled to 0..255 (value / 257), not clipped to white.
    exif: apply the EXIF orientation (photos from a phone), as a viewer shows the image; dataset
    readers leave it off, since annotations refer to the stored pixels.
    """
    image = _open(path, "image")
    if exif:
        from PIL import ImageOps

        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        import warnings

        warnings.warn(f"{path} is a {image.mode} (more than 8 bits per pixel) image: scaled to "
                      "8 bits (value / 257) for the network.", stacklevel=2)
        grey = np.asarray(image, dtype=np.float64) / 257.0
        grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.array(image.convert("RGB"), dtype=np.uint8)


def read_index_png(path) -> np.ndarray:
    """Read a label PNG as its raw indices, uint8 (H, W).

    Palette ("P") PNGs such as VOC's SegmentationClass give their indices, not their colours;
    greyscale ("L") PNGs such as SegmentationClassAug give their values. A colour PNG is refused:
    converting colours back to labels would silently guess.
    """
    image = _open(path, "label PNG")
    if image.mode not in ("P", "L"):
        raise BanaError(
            f"{path} is a {image.mode} image, but a label PNG must hold class indices "
            "(palette 'P' or greyscale 'L' mode, as VOC's SegmentationClassAug)."
        )
    return np.array(image, dtype=np.uint8)


def read_label_png(path, num_classes: int, what: str = "label", size=None,
                   fix: str = "re-create it", image=None, ignore: bool = True) -> np.ndarray:
    """A label map uint8 (H, W) that is checked: its values are classes 0..num_classes-1 (or 255,
    ignore, unless `ignore` is False: a prediction must name a class), and its size is `size`
    (H, W) when given. Any other file is a BanaError naming it, saying it is the `what` (e.g.
    "ground truth", "prediction"), what was expected and what was found, which file the size was
    taken from (`image`, default "its image"), and ending with `fix`."""
    label = read_index_png(path)
    if size is not None and label.shape != tuple(size):
        raise BanaError(f"{what} {path} is {label.shape[1]}x{label.shape[0]}, but "
                        f"{image or 'its image'} is {size[1]}x{size[0]}: a label map must have "
                        f"its image's size; {fix}.")
    counts = np.bincount(label.reshape(-1), minlength=256)
    bad = np.flatnonzero(counts[num_classes:255 if ignore else 256])
    if bad.size:
        values = ", ".join(str(v + num_classes) for v in bad[:10])
        allowed = f"0..{num_classes - 1} (DATA.NUM_CLASSES {num_classes})" + (
            " or 255 (ignore)" if ignore else "; 255 (ignore) is not a class")
        raise BanaError(f"{what} {path} holds values {values}, which are no class: "
                        f"expected {allowed}; {fix}.")
    return label


def read_image_size(path, exif: bool = False) -> tuple[int, int]:
    """(height, width) of an image from its header, without decoding the pixels; with `exif`,
    as shown (an EXIF orientation that turns the image by 90° swaps them, as `read_image`)."""
    path = Path(path)
    if not path.is_file():
        raise BanaError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = exif and image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8)
    except Image.DecompressionBombError as err:
        raise _too_large(path, err) from None
    except _DECODE_ERRORS as err:
        raise BanaError(f"cannot read image {path}: the file is corrupt or not an image ({err}). "
                        "Re-create or re-download it.") from None
    return (width, height) if turned else (height, width)
