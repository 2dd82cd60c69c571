"""Degenerate geometry and images (issue 22, class 5): each is an error naming the file and the
annotation or image, found before work starts where the file is read up front."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.coco import load_instances
from tests.conftest import open_layout
from utils.errors import BanaError


def coco_tree(root: Path, segmentation, size=(20, 24)) -> Path:
    height, width = size
    (root / "train").mkdir(parents=True)
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(root / "train" / "a.jpg")
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "height": height, "width": width}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 1,
                         "bbox": [0, 0, min(8, width), min(8, height)],
                         "iscrowd": 0, "segmentation": segmentation}],
        "categories": [{"id": 1, "name": "thing"}]}))
    return root


@pytest.mark.parametrize("segmentation, message", [
    ([[2, 2, 10, 2]], r"annotation 7 \(image 1\) has a polygon \[2, 2, 10, 2\] that is not a "
                      r"list of at least three x, y points"),
    ([[2, 2, 10, 2, 10]], "not a list of at least three x, y points"),
    ([[2, 2, 10, 2, 10, 10], []], "not a list of at least three"),
    ({"size": [10, 10], "counts": "abc"}, r"annotation 7 \(image 1\) has an RLE of size \[10, "
                                          r"10\] \(height, width\) but its image is 24x20"),
    ({"counts": "abc"}, "RLE segmentation without 'counts' and 'size'"),
    ("nonsense", "neither polygons nor an RLE"),
])
def test_a_malformed_segmentation_is_named_when_the_file_is_read(tmp_path, segmentation,
                                                                 message):
    root = coco_tree(tmp_path / "R", segmentation)
    with pytest.raises(BanaError, match=message) as info:
        load_instances(root, "train", coco2017=False)
    assert "instances_train.json" in str(info.value)


def test_a_good_polygon_and_an_empty_segmentation_pass(tmp_path):
    ok = coco_tree(tmp_path / "A", [[2, 2, 10, 2, 10, 10]])
    assert load_instances(ok, "train", coco2017=False).has_mask.tolist() == [True]
    boxes_only = coco_tree(tmp_path / "B", [])
    assert load_instances(boxes_only, "train", coco2017=False).has_mask.tolist() == [False]


@pytest.mark.parametrize("size", [(1, 1), (8, 40), (40, 5)])
def test_an_image_too_small_for_the_networks_is_named(synthetic_voc_copy, size):
    path = synthetic_voc_copy / "JPEGImages" / "train_00002.jpg"
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(path)
    xml = synthetic_voc_copy / "Annotations" / "train_00002.xml"
    xml.write_text("<annotation><object><name>cat</name><bndbox><xmin>0</xmin><ymin>0</ymin>"
                   "<xmax>1</xmax><ymax>1</ymax></bndbox></object></annotation>")
    dataset = open_layout("voc", synthetic_voc_copy).box_dataset("train")
    with pytest.raises(BanaError, match=rf"train_00002.jpg is {size[1]}x{size[0]}: the networks "
                                        r"need at least 9 pixels on each side"):
        dataset[2]


def test_a_coco_image_too_small_is_named_before_work_starts(tmp_path):
    root = coco_tree(tmp_path / "R", [], size=(1, 1))
    data = open_layout("coco", root)
    with pytest.raises(BanaError, match=r"1 image\(s\) of split 'train' are smaller than 9 "
                                        r"pixels on a side .*a.jpg, 1x1"):
        data.box_dataset("train")


def test_predict_names_an_image_too_small(tmp_path):
    from engine.predict import Segmenter
    from tests.test_outputs import stage3_checkpoint

    segment = Segmenter(stage3_checkpoint(tmp_path / "m.ckpt", 0))
    with pytest.raises(BanaError, match=r"the image is 1x1: the networks need at least 9 pixels"):
        segment(np.zeros((1, 1, 3), np.uint8))
    assert segment(np.zeros((12, 9, 3), np.uint8)).shape == (12, 9)
