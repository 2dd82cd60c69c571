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
