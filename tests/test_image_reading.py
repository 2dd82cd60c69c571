"""One way to read every file (issue 22, class 7): images as they are shown (EXIF orientation)
in every stage as in predict.py, with EXIF named when an annotation was made on the stored
pixels; the common image formats in a VOC export; config paths that cannot mean what they say."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.config import load_config
from tests.conftest import open_layout
from tests.zygote import run_python
from utils.errors import BanaError
from utils.io import read_image, read_image_size

REPO = Path(__file__).resolve().parent.parent


def save_turned(path: Path, rgb: np.ndarray) -> None:
    """Store `rgb` turned so that a viewer applying EXIF orientation 6 shows `rgb` again."""
    stored = Image.fromarray(np.rot90(rgb, k=1).copy())  # stored 90° anticlockwise
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    stored.save(path, exif=exif)


def test_stages_read_images_as_shown_like_predict(synthetic_voc_copy):
    root = synthetic_voc_copy
    path = root / "JPEGImages" / "train_00001.jpg"
    shown = np.zeros((64, 40, 3), np.uint8)
    shown[:, :20] = 255
    save_turned(path, shown)
    assert read_image_size(path) == (40, 64) and read_image_size(path, exif=True) == (64, 40)
    xml = root / "Annotations" / "train_00001.xml"
    xml.write_text("<annotation><size><width>40</width><height>64</height></size><object>"
                   "<name>cat</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>20</xmax>"
                   "<ymax>64</ymax></bndbox></object></annotation>")
    (root / "BgMaskfromBoxes" / "train_00001.png").unlink()
    from data.base import ensure_bg_masks

    data = open_layout("voc", root)
    ensure_bg_masks(data, "train", progress=False)
    item = data.box_dataset("train")[1]
    assert item["image"].shape == (3, 64, 40)
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(),
                                  read_image(path, exif=True))
    assert item["bg_mask"].shape == (1, 64, 40) and not item["bg_mask"][0, :, :20].any()


def test_an_annotation_of_the_stored_pixels_is_blamed_on_exif(synthetic_voc_copy):
    root = synthetic_voc_copy
    path = root / "JPEGImages" / "train_00001.jpg"
    save_turned(path, np.zeros((64, 40, 3), np.uint8))
    (root / "Annotations" / "train_00001.xml").write_text(
        "<annotation><size><width>64</width><height>40</height></size></annotation>")
    dataset = open_layout("voc", root).box_dataset("train")
    with pytest.raises(BanaError, match=r"is 40x64 but its annotation says 64x40: the file's "
                                        r"EXIF orientation turns it by 90°.*exiftool"):
        dataset[1]
    (root / "Annotations" / "train_00001.xml").write_text(
        "<annotation><size><width>30</width><height>30</height></size></annotation>")
    with pytest.raises(BanaError, match=r"is 40x64 but its annotation says 30x30: the <size> of "
                                        r"its XML does not match"):
        dataset[1]


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".jpeg"])
def test_a_voc_export_of_other_image_formats(synthetic_voc_copy, suffix):
    root = synthetic_voc_copy
    for path in (root / "JPEGImages").glob("*.jpg"):
        Image.open(path).save(path.with_suffix(suffix))
        path.unlink()
    data = open_layout("voc", root)
    item = data.box_dataset("train")[0]
    assert data.image_path("train", "train_00000").suffix == suffix
    assert item["image"].shape == (3, 64, 64)


@pytest.mark.parametrize("opts, message", [
    (["OUTPUT_DIR", ""], "OUTPUT_DIR is empty"),
    (["DATA.ROOT", " "], "DATA.ROOT is empty"),
    (["DATA.PSEUDO_LABEL_DIR", ""], "DATA.PSEUDO_LABEL_DIR is empty"),
])
def test_empty_paths_are_refused(opts, message):
    with pytest.raises(BanaError, match=message):
        load_config(REPO / "configs/demo/stage1.yml", opts)
    assert load_config(REPO / "configs/demo/stage1.yml", [opts[0], "."])


def test_a_config_folder_is_named_as_a_folder():
    with pytest.raises(BanaError, match=r"--config-file configs/demo is a folder; give one YAML "
                                        r"file in it, e.g. configs/demo/stage1.yml"):
        load_config("configs/demo")
    proc = run_python(["stage1.py", "--config-file", "configs/"], cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "is a folder" in proc.stderr and "Traceback" not in proc.stderr


# --- issue 29, class 3: big or broken images --------------------------------------------------

def png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid 8x8 greyscale PNG whose header says width x height: what Pillow's guard against
    decompression bombs reads (a real 20000x20000 bomb compresses to 388 KB)."""
    import struct
    import zlib

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    path.write_bytes(bytes(data))
    return path


def test_a_decompression_bomb_is_named_with_what_to_do(tmp_path):
    """Before: PIL's DecompressionBombError, a traceback (it is no OSError)."""
    path = png_claiming(tmp_path / "huge.png", 20000, 20000)
    for read in (read_image, read_image_size):
        with pytest.raises(BanaError, match=rf"cannot read image {path}: .*400000000 pixels.*"
                                            r"decompression bombs.*downscale it first"):
            read(path)


def test_one_list_of_image_extensions_read_by_every_layout_and_predict(synthetic_voc_copy):
    """Before: data/voc.py and engine/predict.py each had a list, different (.gif in one), and
    neither had .jfif; a folder named x.jpg was taken for an image."""
    import data.voc
    import data.yolo
    import engine.predict
    from utils.io import IMAGE_SUFFIXES

    assert {".jfif", ".jpe", ".jpg", ".png", ".gif", ".webp", ".tif", ".ppm"} <= set(IMAGE_SUFFIXES)
    assert not {".h5", ".mpg", ".pdf", ".txt", ".xml"} & set(IMAGE_SUFFIXES)
    for module in (data.voc, data.yolo, engine.predict):
        assert getattr(module, "IMAGE_SUFFIXES", IMAGE_SUFFIXES) is IMAGE_SUFFIXES
    root = synthetic_voc_copy
    first = root / "JPEGImages" / "train_00000.jpg"
    first.rename(first.with_suffix(".jfif"))
    (root / "JPEGImages" / "folder.jpg").mkdir()
    data = open_layout("voc", root)
    assert data.image_path("train", "train_00000").suffix == ".jfif"
    assert data.box_dataset("train")[0]["image"].shape == (3, 64, 64)
    assert "folder" not in data._images


def test_an_image_over_data_max_pixels_is_refused_where_used_whole(synthetic_voc_copy):
    """Stage 2 and evaluation use an image whole: over DATA.MAX_PIXELS it is refused before it
    is decoded, naming the key (before: no limit, the memory grew with the image); a training
    crop is not limited. SkipUnreadable turns the refusal into a skipped item for stage 2."""
    from data.base import SkipUnreadable
    from data.transforms import TrainTransform

    data = open_layout("voc", synthetic_voc_copy, MAX_PIXELS=64 * 64 - 1)
    with pytest.raises(BanaError, match=r"train_00000.jpg is 64x64 \(0.0 megapixels\), more than "
                                        r"DATA.MAX_PIXELS \(4,095\).*--opts DATA.MAX_PIXELS"):
        data.box_dataset("train")[0]
    item = SkipUnreadable(data.box_dataset("train"))[0]
    assert item["id"] == "train_00000" and "DATA.MAX_PIXELS" in item["skipped"]
    cropped = data.box_dataset("train", TrainTransform(32, (1.0, 1.0), flip=False))[0]
    assert cropped["image"].shape[-2:] == (32, 32)
    assert open_layout("voc", synthetic_voc_copy, MAX_PIXELS=64 * 64).box_dataset("train")[0]
