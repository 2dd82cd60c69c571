"""Background masks from boxes (hand-drawn cases), the mask writer, its CLI and setup_voc.bash."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from data.voc_bbox_setup import main, write_bg_masks
from utils.boxes import bg_mask_from_boxes, fill_boxes
from utils.errors import BanaError
from utils.io import read_index_png

REPO = Path(__file__).resolve().parent.parent


def test_bg_mask_hand_drawn():
    # 5 x 6 image; box (1, 1)-(4, 3) covers rows 1..2, cols 1..3.
    expected = np.array([[1, 1, 1, 1, 1, 1],
                         [1, 0, 0, 0, 1, 1],
                         [1, 0, 0, 0, 1, 1],
                         [1, 1, 1, 1, 1, 1],
                         [1, 1, 1, 1, 1, 1]], np.uint8)
    assert np.array_equal(bg_mask_from_boxes([[1, 1, 4, 3]], 5, 6), expected)


def test_bg_mask_truncates_float_coordinates():
    # int(1.9) = 1, int(3.99) = 3: cols 1..2; int(0.5) = 0, int(2.01) = 2: rows 0..1.
    # Rounding would give cols 2..3 instead.
    mask = bg_mask_from_boxes(np.array([[1.9, 0.5, 3.99, 2.01, 12]]), 4, 5)
    expected = np.ones((4, 5), np.uint8)
    expected[0:2, 1:3] = 0
    assert np.array_equal(mask, expected)


def test_bg_mask_union_clipping_and_no_boxes():
    boxes = [[-3.0, -2.0, 2.0, 2.0], [4.0, 1.0, 99.0, 3.0], [2.0, 2.0, 2.0, 4.0]]  # last: zero width
    expected = np.array([[0, 0, 1, 1, 1, 1],
                         [0, 0, 1, 1, 0, 0],
                         [1, 1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 1, 1]], np.uint8)
    assert np.array_equal(bg_mask_from_boxes(boxes, 4, 6), expected)
    assert np.array_equal(bg_mask_from_boxes(np.zeros((0, 4)), 2, 3), np.ones((2, 3), np.uint8))
    assert bg_mask_from_boxes([], 2, 3).dtype == np.uint8


def test_fill_boxes_paints_smaller_boxes_on_top():
    # The small box (class 7) is listed first but painted last because it is smaller.
    boxes = [[1, 1, 3, 3, 7], [0, 0, 4, 4, 3], [3, 0, 5, 2, 9]]
    expected = np.array([[3, 3, 3, 9, 9],
                         [3, 7, 7, 9, 9],
                         [3, 7, 7, 3, 0],
                         [3, 3, 3, 3, 0]], np.uint8)
    assert np.array_equal(fill_boxes(boxes, 4, 5), expected)
    assert not fill_boxes([], 2, 2).any()


def _bytes(folder):
    """The masks of a folder (the ledger of their boxes beside them is not a mask)."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_writer_reproduces_masks_in_parallel_and_skips_existing(synthetic_voc_copy):
    root = synthetic_voc_copy
    folder = root / "BgMaskfromBoxes"
    original = _bytes(folder)
    for path in sorted(folder.glob("*.png"))[:7]:
        path.unlink()
    counts = write_bg_masks(root, workers=2, progress=False)
    assert counts == {"written": 7, "skipped": 11, "total": 18}
    assert _bytes(folder) == original
    assert write_bg_masks(root, progress=False)["written"] == 0


def test_cli_with_splits(synthetic_voc_copy, capsys):
    folder = synthetic_voc_copy / "BgMaskfromBoxes"
    for path in folder.iterdir():
        path.unlink()  # the masks and their ledger
    counts = main(["--data-root", str(synthetic_voc_copy), "--splits", "val", "--workers", "1"])
    assert counts["written"] == 6 and len(list(folder.glob("*.png"))) == 6
    assert len((folder / "boxes.jsonl").read_text().splitlines()) == 6  # the record of each
    assert "wrote 6" in capsys.readouterr().out


def test_writer_errors(synthetic_voc_copy, tmp_path):
    with pytest.raises(BanaError, match=r"Annotations does not exist"):
        write_bg_masks(tmp_path, progress=False)
    (synthetic_voc_copy / "JPEGImages" / "val_00001.jpg").unlink()
    (synthetic_voc_copy / "BgMaskfromBoxes" / "val_00001.png").unlink()
    with pytest.raises(BanaError, match=r"1 of 1 images are missing, e.g. .*val_00001.jpg: the "
                                        r"mask takes the image's size"):
        write_bg_masks(synthetic_voc_copy, ["val_00001"], progress=False)


def test_cli_missing_root_exits_2_without_traceback(tmp_path, run_script):
    result = run_script("data/voc_bbox_setup.py", "--data-root", tmp_path / "absent",
                        "--workers", "2")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "absent does not exist" in result.stderr.replace("\n", " ")


@pytest.mark.slow
def test_masks_of_an_export_with_its_own_class_names(synthetic_voc_copy, run_script):
    """The masks do not depend on class names: an export whose objects are named anything gets
    them without a class list, .png images included."""
    from PIL import Image

    root = synthetic_voc_copy
    (root / "Annotations" / "val_00005.xml").write_text(
        "<annotation><object><name>zebra</name><bndbox><xmin>1.5</xmin><ymin>1</ymin>"
        "<xmax>5</xmax><ymax>5.9</ymax></bndbox></object></annotation>")
    image = root / "JPEGImages" / "val_00005.jpg"
    Image.open(image).save(root / "JPEGImages" / "val_00005.png")
    image.unlink()
    (root / "BgMaskfromBoxes" / "val_00005.png").unlink()
    result = run_script("data/voc_bbox_setup.py", "--data-root", root, "--workers", "2")
    assert result.returncode == 0, result.stderr
    expected = np.ones((64, 64), np.uint8)
    expected[1:5, 1:5] = 0  # rows int(1)..int(5.9) = 1..4, columns int(1.5)..int(5) = 1..4
    assert np.array_equal(read_index_png(root / "BgMaskfromBoxes" / "val_00005.png"), expected)


# --- stages 1 and 2 make the masks they need (data.base.ensure_bg_masks) -------------------------

def _box_xml(path: Path, box) -> None:
    x1, y1, x2, y2 = box
    path.write_text(f"<annotation><object><name>cat</name><bndbox><xmin>{x1}</xmin><ymin>{y1}"
                    f"</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object></annotation>")


def _masks_of(data, split):
    from data.voc import xml_boxes
    from utils.io import read_image_size

    return {i: bg_mask_from_boxes(xml_boxes(data.xml_path(split, i))[0],
                                  *read_image_size(data.image_path(split, i), exif=True))
            for i in data.split_ids(split)}


def test_missing_masks_are_made_once_and_an_edited_box_remakes_its_mask(synthetic_voc_copy):
    from data.base import ensure_bg_masks
    from tests.conftest import open_layout

    root = synthetic_voc_copy
    shutil.rmtree(root / "BgMaskfromBoxes")
    data = open_layout("voc", root)
    assert ensure_bg_masks(data, "train", workers=2, progress=False)["written"] == 12
    for image_id, mask in _masks_of(data, "train").items():
        np.testing.assert_array_equal(read_index_png(data.bg_mask_path("train", image_id)), mask)
    assert ensure_bg_masks(data, "train", progress=False)["written"] == 0
    _box_xml(data.xml_path("train", "train_00003"), (2, 3, 20, 30))
    assert ensure_bg_masks(data, "train", progress=False) == {"written": 1, "kept": 11,
                                                              "total": 12}
    np.testing.assert_array_equal(read_index_png(data.bg_mask_path("train", "train_00003")),
                                  _masks_of(data, "train")["train_00003"])


def test_a_mask_found_without_a_record_is_kept_as_it_is(synthetic_voc_copy, capsys):
    """Masks this project did not make (the authors' release) are used as they are; one that
    differs from the boxes is named in a note, not replaced."""
    from data.base import ensure_bg_masks
    from tests.conftest import open_layout
    from utils.boxes import BG_LEDGER
    from utils.io import atomic_write_png

    root = synthetic_voc_copy
    (root / "BgMaskfromBoxes" / BG_LEDGER).unlink()
    foreign = root / "BgMaskfromBoxes" / "train_00002.png"
    theirs = 1 - read_index_png(foreign)
    atomic_write_png(foreign, theirs)
    data = open_layout("voc", root)
    assert ensure_bg_masks(data, "train", progress=False)["written"] == 0
    np.testing.assert_array_equal(read_index_png(foreign), theirs)
    assert "1 background mask(s) found" in capsys.readouterr().out
    assert ensure_bg_masks(data, "train", progress=False)["written"] == 0  # recorded now


def _setup(*args):
    return subprocess.run(["bash", "data/setup_voc.bash", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_setup_script_parses():
    assert subprocess.run(["bash", "-n", "data/setup_voc.bash"], cwd=REPO).returncode == 0


def test_setup_check_accepts_the_synthetic_tree_and_not_full_counts(synthetic_voc):
    ok = _setup(synthetic_voc, "--check")
    assert ok.returncode == 0, ok.stderr
    assert "tree is consistent" in ok.stdout
    full = _setup(synthetic_voc, "--check", "--expect-full")
    assert full.returncode == 1
    assert "JPEGImages/*.jpg: found 18, expected 17125" in full.stderr
    assert "train_aug.txt ids: found 12, expected 10582" in full.stderr


def test_setup_check_names_what_is_missing(synthetic_voc_copy, tmp_path):
    root = synthetic_voc_copy
    (root / "JPEGImages" / "train_00003.jpg").unlink()
    (root / "BgMaskfromBoxes" / "val_00002.png").unlink()
    with open(root / "ImageSets" / "Segmentation" / "train_aug.txt", "a") as f:
        f.write("val_00000\n")
    result = _setup(root, "--check")
    assert result.returncode == 1
    assert f"{root}/JPEGImages/train_00003.jpg" in result.stderr
    assert f"{root}/BgMaskfromBoxes/val_00002.png: run 'python data/voc_bbox_setup.py" in result.stderr
    assert "1 ids are in both train_aug.txt and val.txt" in result.stderr
    assert _setup(tmp_path / "absent", "--check").returncode == 1
    assert _setup(root, "--bogus").returncode == 2


def test_setup_derives_train_aug_and_skips_finished_steps(synthetic_voc_copy):
    # Markers say steps 1-2 (downloads) are done; step 3 must rebuild train_aug.txt as
    # SegmentationClassAug ids minus val ids (= train here), then the full-count check fails.
    root = synthetic_voc_copy
    (root / ".setup").mkdir()
    for step in ("voc2012", "segaug"):
        (root / ".setup" / f"{step}.done").touch()
    lists = root / "ImageSets" / "Segmentation"
    (lists / "train_aug.txt").unlink()
    result = _setup(root)
    assert "step 1/3: VOC 2012 trainval already extracted, skipping" in result.stdout
    assert (lists / "train_aug.txt").read_text() == (lists / "train.txt").read_text()
    assert result.returncode == 1 and "expected 17125" in result.stderr


def test_masks_of_a_read_only_dataset_live_in_bg_mask_dir(synthetic_voc_copy, tmp_path,
                                                          monkeypatch):
    """A read-only dataset without its masks could not be used: the message pointed at keys that
    cannot move them. It names DATA.BG_MASK_DIR, which keeps them elsewhere (the dataset is then
    only read). The dataset's folder is made unwritable by os.access, as the suite may run as
    root, for whom file modes do not stop a write."""
    import os

    from data.base import ensure_bg_masks
    from tests.conftest import open_layout

    root = synthetic_voc_copy
    shutil.rmtree(root / "BgMaskfromBoxes")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
        False if mode & os.W_OK and Path(path).resolve().is_relative_to(root.resolve())
        else real_access(path, mode, **kw)))
    with pytest.raises(BanaError, match=r"12 background mask\(s\) .* DATA.BG_MASK_DIR is not set;"
                                        r" set it to a writable folder"):
        ensure_bg_masks(open_layout("voc", root), "train", progress=False)
    assert not (root / "BgMaskfromBoxes").exists()
    elsewhere = tmp_path / "masks"
    data = open_layout("voc", root, BG_MASK_DIR=str(elsewhere))
    assert ensure_bg_masks(data, "train", progress=False)["written"] == 12
    assert data.bg_mask_path("train", "train_00003") == elsewhere / "train_00003.png"
    np.testing.assert_array_equal(read_index_png(elsewhere / "train_00003.png"),
                                  _masks_of(data, "train")["train_00003"])
    assert not (root / "BgMaskfromBoxes").exists()
    assert open_layout("voc", root, BG_MASK_DIR="masks").bg_mask_root == root / "masks"
