"""VOC datasets, collates and I/O helpers on the synthetic tree, and every bad input they catch."""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data.base import collate_boxes, collate_masks
from data.transforms import TrainTransform
from data.voc import parse_annotation
from data.voc_bbox_setup import write_bg_masks
from utils.boxes import bg_mask_from_boxes
from utils.errors import BanaError
from utils.io import atomic_write_png, read_image, read_index_png
from utils.palette import VOC_CLASSES, colorize, voc_palette

from tests.conftest import open_layout

SYNTHETIC_CLASSES = {VOC_CLASSES.index(c) for c in ("cat", "dog", "bird", "car", "person")}


def VOCBoxDataset(root, split, transform=None):
    return open_layout("voc", root).box_dataset(split, transform)


def VOCMaskDataset(root, split, label_dirs=(), gt_ids=None):
    return open_layout("voc", root).mask_dataset(split, label_dirs, gt_ids)


def _xml(objects: str, width: int = 64, height: int = 64) -> str:
    return (f"<annotation><size><width>{width}</width><height>{height}</height></size>"
            f"{objects}</annotation>")


def _obj(name: str, x1, y1, x2, y2, difficult: int = 0) -> str:
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin>"
            f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")


def test_box_dataset_items(synthetic_voc):
    dataset = VOCBoxDataset(synthetic_voc, "train")
    assert len(dataset) == 12
    for item in dataset:
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.uint8
        boxes = item["boxes"]
        assert boxes.dtype == torch.float32 and boxes.shape[1] == 5 and 1 <= len(boxes) <= 3
        assert set(boxes[:, 4].long().tolist()) <= SYNTHETIC_CLASSES
        xml_boxes, xml_classes = parse_annotation(
            synthetic_voc / "Annotations" / f"{item['id']}.xml")
        assert np.array_equal(boxes[:, :4].numpy(), xml_boxes)
        assert np.array_equal(boxes[:, 4].numpy(), xml_classes)
        assert item["bg_mask"].shape == (1, 64, 64) and item["bg_mask"].dtype == torch.uint8
        assert np.array_equal(item["bg_mask"][0].numpy(), bg_mask_from_boxes(xml_boxes, 64, 64))


def test_mask_dataset_channels_and_gt_override(synthetic_voc):
    single = VOCMaskDataset(synthetic_voc, "val")
    item = single[0]
    assert item["label"].shape == (1, 64, 64) and item["label"].dtype == torch.int64
    gt = read_index_png(synthetic_voc / "SegmentationClassAug" / f"{item['id']}.png")
    assert np.array_equal(item["label"][0].numpy(), gt)
    assert set(np.unique(gt)) <= SYNTHETIC_CLASSES | {0, 255}

    # Two channels, one relative and one absolute folder; ids in gt_ids read the GT twice.
    double = VOCMaskDataset(synthetic_voc, "train", ("SegmentationClass", synthetic_voc / "BgMaskfromBoxes"),
                            gt_ids=["train_00001"])
    first, second = double[0], double[1]
    assert first["label"].shape == (2, 64, 64)
    assert np.array_equal(first["label"][1].numpy(),
                          read_index_png(synthetic_voc / "BgMaskfromBoxes" / "train_00000.png"))
    gt1 = read_index_png(synthetic_voc / "SegmentationClassAug" / "train_00001.png")
    assert np.array_equal(second["label"].numpy(), np.stack([gt1, gt1]))


def test_loaders_batch_with_the_train_transform_and_at_full_size(synthetic_voc):
    torch.manual_seed(0)
    boxes = DataLoader(VOCBoxDataset(synthetic_voc, "train", TrainTransform(48)), batch_size=4,
                       collate_fn=collate_boxes)
    batch = next(iter(boxes))
    assert batch["image"].shape == (4, 3, 48, 48) and batch["bg_mask"].shape == (4, 1, 48, 48)
    assert len(batch["boxes"]) == 4 and len(batch["id"]) == 4
    assert all(b.shape[1] == 5 for b in batch["boxes"])

    masks = DataLoader(VOCMaskDataset(synthetic_voc, "val"), batch_size=1, collate_fn=collate_masks)
    batch = next(iter(masks))
    assert batch["image"].shape == (1, 3, 64, 64) and batch["label"].shape == (1, 1, 64, 64)


def test_collate_refuses_different_sizes_with_a_message():
    items = [{"id": "a", "image": torch.zeros(3, 4, 5, dtype=torch.uint8), "boxes": torch.zeros(0, 5),
              "bg_mask": torch.ones(1, 4, 5, dtype=torch.uint8)},
             {"id": "b", "image": torch.zeros(3, 6, 5, dtype=torch.uint8), "boxes": torch.zeros(1, 5),
              "bg_mask": torch.ones(1, 6, 5, dtype=torch.uint8)}]
    with pytest.raises(BanaError, match="batch size 1"):
        collate_boxes(items)


def test_read_split_accepts_deeplab_pairs(synthetic_voc_copy):
    lists = synthetic_voc_copy / "ImageSets" / "Segmentation"
    (lists / "pairs.txt").write_text("/JPEGImages/a_1.jpg /SegmentationClassAug/a_1.png\n\nb_2\n")
    assert open_layout("voc", synthetic_voc_copy).split_ids("pairs") == ["a_1", "b_2"]


def test_missing_root(tmp_path):
    with pytest.raises(BanaError, match=r"DATA.ROOT .*nowhere.*setup_voc.bash") as err:
        VOCBoxDataset(tmp_path / "nowhere", "train")
    assert "synthetic" not in str(err.value)
    # An export with its own classes is no PASCAL VOC to download.
    with pytest.raises(BanaError, match=r"DATA.ROOT .*nowhere") as err:
        open_layout("voc", tmp_path / "nowhere", CLASSES=["crack"]).box_dataset("train")
    assert "setup_voc" not in str(err.value) and "synthetic" not in str(err.value)


def test_missing_and_empty_split_list(synthetic_voc_copy):
    with pytest.raises(BanaError, match=r"split 'nosplit' not found .*Segmentation/nosplit.txt "
                                        r"or .*Main/nosplit.txt, and no folder nosplit/.*the "
                                        r"split lists there are: train, train_aug, val"):
        VOCMaskDataset(synthetic_voc_copy, "nosplit")
    (synthetic_voc_copy / "ImageSets" / "Segmentation" / "val.txt").write_text("\n\n")
    with pytest.raises(BanaError, match=r"val.txt is empty"):
        VOCMaskDataset(synthetic_voc_copy, "val")


def test_missing_image_names_path_and_command(synthetic_voc_copy):
    (synthetic_voc_copy / "JPEGImages" / "train_00004.jpg").unlink()
    with pytest.raises(BanaError) as err:
        VOCBoxDataset(synthetic_voc_copy, "train")
    assert "JPEGImages/train_00004.jpg" in str(err.value)
    assert "setup_voc.bash" in str(err.value)


def test_a_missing_bg_mask_is_named_when_read(synthetic_voc_copy):
    (synthetic_voc_copy / "BgMaskfromBoxes" / "train_00004.png").unlink()
    dataset = VOCBoxDataset(synthetic_voc_copy, "train")
    with pytest.raises(BanaError, match=r"BgMaskfromBoxes/train_00004.png not found.*stages 1 "
                                        r"and 2 write the missing ones"):
        dataset[4]


def test_an_image_listed_without_xml_has_no_objects(synthetic_voc_copy, capsys):
    """LabelImg writes no XML for an image without boxes: counted, and read as all background;
    an XML that exists but does not parse stays an error."""
    (synthetic_voc_copy / "Annotations" / "train_00004.xml").unlink()
    (synthetic_voc_copy / "BgMaskfromBoxes" / "train_00004.png").unlink()
    data = open_layout("voc", synthetic_voc_copy)
    assert data.split_ids("train")[4] == "train_00004"
    assert "1 of 12 images of split 'train' have no Annotations/<id>.xml" in " ".join(
        capsys.readouterr().out.split())
    write_bg_masks(synthetic_voc_copy, ["train_00004"], progress=False)
    item = data.box_dataset("train")[4]
    assert item["boxes"].shape == (0, 5) and (item["bg_mask"] == 1).all()


def test_missing_label_names_stage2_for_pseudo_labels(synthetic_voc_copy):
    with pytest.raises(BanaError, match=r"Generation/Y_crf/train_00000.png.*stage2.py"):
        VOCMaskDataset(synthetic_voc_copy, "train", (synthetic_voc_copy / "Generation" / "Y_crf",))
    (synthetic_voc_copy / "SegmentationClassAug" / "val_00002.png").unlink()
    assert VOCMaskDataset(synthetic_voc_copy, "val")[2]["label"].shape == (1, 64, 64)  # the
    # ground truth falls back to SegmentationClass/, VOC's own masks
    (synthetic_voc_copy / "SegmentationClass" / "val_00002.png").unlink()
    with pytest.raises(BanaError, match=r"1 of 6 images of split 'val' have no ground-truth mask "
                                        r"\(e.g. val_00002\).*setup_voc.bash"):
        VOCMaskDataset(synthetic_voc_copy, "val")
    # Scoring and validation take the images that have a mask.
    assert len(open_layout("voc", synthetic_voc_copy).mask_dataset("val", only_gt=True)) == 5


def test_unknown_class_names_file_and_class(synthetic_voc_copy):
    xml = synthetic_voc_copy / "Annotations" / "train_00000.xml"
    xml.write_text(_xml(_obj("cat", 1, 1, 9, 9) + _obj("unicorn", 2, 2, 5, 5)))
    with pytest.raises(BanaError, match=r"train_00000.xml.*unknown class 'unicorn'"):
        VOCBoxDataset(synthetic_voc_copy, "train")[0]


def test_malformed_xml(synthetic_voc_copy):
    xml = synthetic_voc_copy / "Annotations" / "train_00000.xml"
    xml.write_text("<annotation><object>")
    with pytest.raises(BanaError, match=r"train_00000.xml is not valid XML"):
        parse_annotation(xml)
    xml.write_text(_xml("<object><name>dog</name><bndbox><xmin>a</xmin></bndbox></object>"))
    with pytest.raises(BanaError, match=r"train_00000.xml.*numeric <bndbox>"):
        parse_annotation(xml)


def test_corrupt_jpeg_names_the_file(synthetic_voc_copy):
    path = synthetic_voc_copy / "JPEGImages" / "train_00002.jpg"
    path.write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.raises(BanaError, match=r"cannot read image .*train_00002.jpg"):
        VOCBoxDataset(synthetic_voc_copy, "train")[2]
    path.write_bytes(b"not a jpeg at all")
    with pytest.raises(BanaError, match=r"train_00002.jpg.*corrupt"):
        VOCMaskDataset(synthetic_voc_copy, "train")[2]


def test_boxes_clipped_degenerate_dropped_with_warning_difficult_kept(synthetic_voc_copy):
    root = synthetic_voc_copy
    (root / "Annotations" / "train_00000.xml").write_text(_xml(
        _obj("cat", -5.5, 10, 30.5, 80) + _obj("dog", 20, 20, 20, 40)
        + _obj("bird", 70, 1, 90, 9) + _obj("car", 3.7, 4.2, 8.9, 9.9, difficult=1)))
    (root / "BgMaskfromBoxes" / "train_00000.png").unlink()
    write_bg_masks(root, ["train_00000"], progress=False)
    with pytest.warns(UserWarning, match=r"train_00000.xml: dropped 2 empty or degenerate"):
        item = VOCBoxDataset(root, "train")[0]
    assert item["boxes"].tolist() == [[0.0, 10.0, 30.5, 64.0, 8.0],
                                      [pytest.approx(3.7), pytest.approx(4.2), pytest.approx(8.9),
                                       pytest.approx(9.9), 7.0]]
    expected = np.ones((64, 64), np.uint8)
    expected[10:64, 0:30] = 0  # int(-5.5) = -5 is clipped to 0, int(30.5) = 30
    expected[4:9, 3:8] = 0  # the zero-width dog box and the bird outside the image paint nothing
    assert np.array_equal(item["bg_mask"][0].numpy(), expected)


def test_image_without_boxes_is_kept_with_an_all_background_mask(synthetic_voc_copy):
    root = synthetic_voc_copy
    (root / "Annotations" / "train_00003.xml").write_text(_xml(""))
    (root / "BgMaskfromBoxes" / "train_00003.png").unlink()
    write_bg_masks(root, ["train_00003"], progress=False)
    item = VOCBoxDataset(root, "train")[3]
    assert item["boxes"].shape == (0, 5)
    assert (item["bg_mask"] == 1).all()


def test_size_mismatches_name_both_files(synthetic_voc_copy):
    root = synthetic_voc_copy
    atomic_write_png(root / "BgMaskfromBoxes" / "train_00000.png", np.ones((32, 64), np.uint8))
    with pytest.raises(BanaError, match=r"BgMaskfromBoxes/train_00000.png is 64x32 but image "
                                        r".*train_00000.jpg is 64x64"):
        VOCBoxDataset(root, "train")[0]
    atomic_write_png(root / "SegmentationClassAug" / "val_00000.png", np.zeros((64, 60), np.uint8))
    with pytest.raises(BanaError, match=r"val_00000.png is 60x64, but its image .*val_00000.jpg is 64x64"):
        VOCMaskDataset(root, "val")[0]


def test_label_values_outside_the_classes(synthetic_voc_copy):
    label = np.zeros((64, 64), np.uint8)
    label[0, :3] = (21, 254, 255)
    atomic_write_png(synthetic_voc_copy / "SegmentationClassAug" / "val_00001.png", label, voc_palette())
    with pytest.raises(BanaError, match=r"val_00001.png holds values 21, 254, which are no class: expected 0..20"):
        VOCMaskDataset(synthetic_voc_copy, "val")[1]


def test_bg_mask_values_other_than_0_1(synthetic_voc_copy):
    atomic_write_png(synthetic_voc_copy / "BgMaskfromBoxes" / "train_00000.png",
                     np.full((64, 64), 255, np.uint8))
    with pytest.raises(BanaError, match=r"train_00000.png holds values other than 0 and 1"):
        VOCBoxDataset(synthetic_voc_copy, "train")[0]


def test_palette_and_colorize():
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    # The well-known VOC colours: background, aeroplane, person, tvmonitor, void.
    assert palette[[0, 1, 15, 20, 255]].tolist() == [[0, 0, 0], [128, 0, 0], [192, 128, 128],
                                                      [0, 64, 128], [224, 224, 192]]
    assert len({tuple(c) for c in palette}) == 256
    assert colorize(np.array([[0, 15], [255, 1]])).tolist() == [[[0, 0, 0], [192, 128, 128]],
                                                               [[224, 224, 192], [128, 0, 0]]]
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background"


def test_index_png_round_trip_and_atomic_write(tmp_path):
    label = np.random.default_rng(0).integers(0, 21, (7, 9)).astype(np.uint8)
    label[0, 0] = 255
    atomic_write_png(tmp_path / "sub" / "l.png", label, voc_palette())
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["l.png"]  # no temp file left
    with Image.open(tmp_path / "sub" / "l.png") as image:
        assert image.mode == "P"
        assert np.array_equal(np.asarray(image.convert("RGB")), colorize(label))
    assert np.array_equal(read_index_png(tmp_path / "sub" / "l.png"), label)


def test_reading_bad_images(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(BanaError, match=re.escape(str(tmp_path / "rgb.png")) + r" is a RGB image"):
        read_index_png(tmp_path / "rgb.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(BanaError, match=r"cannot read label PNG .*bad.png"):
        read_index_png(tmp_path / "bad.png")
    with pytest.raises(BanaError, match=r"image not found: .*none.jpg"):
        read_image(tmp_path / "none.jpg")
    assert read_image(tmp_path / "rgb.png").shape == (4, 4, 3)


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """mkstemp makes 0600 files; labels must be readable by others like any written file."""
    import os

    from utils.io import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_voc_export_without_split_lists_is_told_how_to_write_one(tmp_path):
    """Label Studio's VOC export has Annotations/ and images but no ImageSets: the message says
    what a split list is (it read "keeps split under DATA.ROOT")."""
    from tests.conftest import open_layout
    from utils.errors import BanaError

    (tmp_path / "Annotations").mkdir()
    (tmp_path / "images").mkdir()
    data = open_layout("voc", tmp_path, CLASSES=["apple", "pear"])
    with pytest.raises(BanaError, match=r"split 'train' not found.*a split list "
                                        r"ImageSets/Main/<split>.txt \(one image id per line"):
        data.split_ids("train")


def test_a_voc_export_with_images_in_images_is_read_there(tmp_path):
    """Label Studio's "Pascal VOC XML" export: Annotations/ and images/, float coordinates."""
    import numpy as np
    from PIL import Image

    from tests.conftest import open_layout

    (tmp_path / "Annotations").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "ImageSets/Main").mkdir(parents=True)
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "images" / "a1b2-fruit.jpg")
    (tmp_path / "Annotations" / "a1b2-fruit.xml").write_text(
        "<annotation><size><width>40</width><height>30</height><depth>3</depth></size>"
        "<object><name>pear</name><bndbox><xmin>2.5</xmin><ymin>3.25</ymin><xmax>20.75</xmax>"
        "<ymax>18.5</ymax></bndbox></object></annotation>")
    (tmp_path / "ImageSets/Main/train.txt").write_text("a1b2-fruit\n")
    data = open_layout("voc", tmp_path, CLASSES=["apple", "pear"])
    assert data.image_path("train", "a1b2-fruit") == tmp_path / "images" / "a1b2-fruit.jpg"
    ann = data.annotation("train", "a1b2-fruit")
    assert ann.boxes.tolist() == [[2.5, 3.25, 20.75, 18.5]] and ann.classes.tolist() == [2]


def test_a_format_that_lacks_part_of_the_interface_cannot_be_created(tmp_path):
    """A new layout that forgets a method fails when it is opened, naming the method, not in
    the middle of a stage."""
    from data.base import DatasetFormat
    from data.voc import VOCData

    class Partial(DatasetFormat):
        def split_ids(self, split):
            return []

    with pytest.raises(TypeError, match="abstract method.*annotation"):
        Partial(None, tmp_path)
    assert not VOCData.__abstractmethods__


# --- issue 29, class 2: every number of an annotation is checked where its file is read --------

@pytest.mark.parametrize("box, shown", [
    (("nan", 1, 9, 9), r"\[nan, 1.0, 9.0, 9.0\], which is not a finite number"),
    ((1, 1, "inf", 9), r"\[1.0, 1.0, inf, 9.0\], which is not a finite number"),
    ((1, 1, "1e30", 9), r"\[1.0, 1.0, 1e\+30, 9.0\], outside \[-262,144, 262,144\]"),
])
def test_a_voc_box_that_is_no_finite_coordinate_is_named(synthetic_voc_copy, box, shown):
    """Before: xmin=nan made the object background without a word, xmax=inf or 1e30 a box to
    the image's edge."""
    xml = synthetic_voc_copy / "Annotations" / "train_00000.xml"
    xml.write_text(_xml(_obj("cat", 1, 1, 9, 9) + _obj("dog", *box)))
    with pytest.raises(BanaError, match=rf"train_00000.xml: object 2 \('dog'\) has <bndbox> xmin, "
                                        rf"ymin, xmax, ymax {shown}"):
        VOCBoxDataset(synthetic_voc_copy, "train")[0]


@pytest.mark.parametrize("height, message", [
    ("1e400", "which is not a finite number"),
    ("1" * 30, r"outside \[1, 131,072\]"),
    ("63.5", "where an integer was expected"),
])
def test_a_voc_size_that_is_no_image_size_is_named(synthetic_voc_copy, height, message):
    """Before: 1e400 (and int(float) of it) ended in an OverflowError traceback; 63.5 became 63."""
    xml = synthetic_voc_copy / "Annotations" / "train_00000.xml"
    xml.write_text(_xml(_obj("cat", 1, 1, 9, 9), height=height))
    with pytest.raises(BanaError, match=rf"train_00000.xml: <size> has width, height "
                                        rf".*{message}"):
        parse_annotation(xml)
    xml.write_text(_xml(_obj("cat", 1, 1, 9, 9), width=0, height=0))  # 0: the tool did not know
    assert parse_annotation(xml)[0].shape == (1, 4)


def test_xml_entity_bombs_and_external_entities_stay_refused(synthetic_voc_copy, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("cat")
    xml = synthetic_voc_copy / "Annotations" / "train_00000.xml"
    lol = "".join(f'<!ENTITY l{k} "{f"&l{k - 1};" * 10}">' for k in range(1, 10))
    xml.write_text(f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY l0 "lol">{lol}]>'
                   "<annotation><object><name>&l9;</name></object></annotation>")
    with pytest.raises(BanaError, match=r"train_00000.xml is not valid XML"):
        parse_annotation(xml)
    xml.write_text(f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file://{secret}">]>'
                   "<annotation><object><name>&x;</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
                   "<xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>")
    with pytest.raises(BanaError, match=r"train_00000.xml is not valid XML"):
        parse_annotation(xml)
