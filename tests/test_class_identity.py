"""A checkpoint's classes against the data's, wherever the two meet (issue 22, class 3): the same
names in another order are mapped by name (and said); other names are refused with both lists;
two categories of one name are refused."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import load_config
from tests.test_outputs import stage3_checkpoint
from utils.errors import BanaError
from utils.palette import VOC_CLASSES

REPO = Path(__file__).resolve().parent.parent


def eval_cfg(root, out, *opts):
    return load_config(REPO / "configs/demo/stage3.yml", [
        "DATA.ROOT", str(root), "OUTPUT_DIR", str(out), "DATA.NUM_WORKERS", "0",
        "TEST.SCALES", "[1.0]", "TEST.FLIP", "false", "TEST.CRF", "false", *opts])


def test_evaluate_maps_a_checkpoint_of_another_class_order_by_name(synthetic_voc, tmp_path,
                                                                   capsys):
    """The same network saved with its classes (and classifier rows) in reversed order scores
    exactly as the original: the outputs are taken by name."""
    from engine.evaluate import run
    from models.zoo import read_checkpoint

    plain = stage3_checkpoint(tmp_path / "plain.ckpt", 0)
    raw = torch.load(plain, weights_only=False)
    order = [0, *range(20, 0, -1)]
    raw["state_dict"]["net.classifier.weight"] = raw["state_dict"]["net.classifier.weight"][order]
    raw["bana"]["model"]["classes"] = [VOC_CLASSES[k] for k in order]
    torch.save(raw, tmp_path / "reordered.ckpt")
    assert read_checkpoint(tmp_path / "reordered.ckpt").spec.classes[1] == "tvmonitor"
    first = run(eval_cfg(synthetic_voc, tmp_path / "a"), checkpoint=str(plain), devices="cpu",
                workers=0)
    second = run(eval_cfg(synthetic_voc, tmp_path / "b"),
                 checkpoint=str(tmp_path / "reordered.ckpt"), devices="cpu", workers=0)
    assert "maps them by name" in capsys.readouterr().out
    assert first["confusion"] == second["confusion"]


def test_evaluate_refuses_a_checkpoint_of_other_classes(synthetic_voc, tmp_path):
    from engine.evaluate import run

    names = ("background", *(f"thing{k}" for k in range(1, 21)))
    other = stage3_checkpoint(tmp_path / "other.ckpt", 0, classes=names)
    with pytest.raises(BanaError, match=r"trained on the classes thing1, thing2.*but the data has "
                                        r"aeroplane, bicycle.*the model lacks aeroplane"):
        run(eval_cfg(synthetic_voc, tmp_path), checkpoint=str(other), devices="cpu", workers=0)


def test_stage2_maps_or_refuses_the_stage1_classes(synthetic_voc, stage1_dir, tmp_path, capsys):
    from engine.stage2 import load_labeler

    final = stage1_dir / "stage1/checkpoints/final.ckpt"
    raw = torch.load(final, weights_only=False)
    assert tuple(raw["bana"]["model"]["classes"]) == VOC_CLASSES
    order = [0, 2, 1, *range(3, 21)]
    raw["state_dict"]["net.classifier.weight"] = raw["state_dict"]["net.classifier.weight"][order]
    raw["bana"]["model"]["classes"] = [VOC_CLASSES[k] for k in order]
    torch.save(raw, tmp_path / "swapped.ckpt")
    cfg = load_config(REPO / "configs/demo/stage2.yml", [
        "DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR", str(tmp_path),
        "MODEL.WEIGHTS", str(tmp_path / "swapped.ckpt")])
    net = load_labeler(cfg, VOC_CLASSES)
    reference = load_labeler(load_config(REPO / "configs/demo/stage2.yml", [
        "DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR", str(stage1_dir)]), VOC_CLASSES)
    assert torch.equal(net.classifier.weight, reference.classifier.weight)
    assert "maps them by name" in capsys.readouterr().out
    raw["bana"]["model"]["classes"][1] = "zeppelin"
    torch.save(raw, tmp_path / "swapped.ckpt")
    with pytest.raises(BanaError, match=r"the model lacks bicycle; the data lacks zeppelin"):
        load_labeler(cfg, VOC_CLASSES)


def test_resuming_with_other_classes_is_refused(synthetic_voc, tmp_path):
    from engine.stage1 import run

    opts = ["DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR", str(tmp_path), "DATA.CROP_SIZE",
            "48", "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0", "SOLVER.MAX_ITER", "4",
            "SOLVER.MILESTONES", "[3]", "SOLVER.CKPT_EVERY", "2"]
    cfg = load_config(REPO / "configs/demo/stage1.yml", opts)
    run(cfg, devices="cpu")
    last = tmp_path / "stage1/checkpoints/last.ckpt"
    raw = torch.load(last, weights_only=False)
    raw["bana"]["model"]["classes"][5] = "sailboat"
    raw["global_step"] = 2
    torch.save(raw, last)
    with pytest.raises(BanaError, match=r"cannot resume from .*last.ckpt: it was trained on the "
                                        r"classes .*sailboat"):
        run(load_config(REPO / "configs/demo/stage1.yml", [*opts, "SOLVER.MAX_ITER", "6",
                                                           "SOLVER.MILESTONES", "[5]"]),
            devices="cpu", resume=True, reconfigure=True)


def test_two_coco_categories_of_one_name_are_refused(tmp_path):
    from tests.conftest import open_layout

    root = tmp_path / "R"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 20}],
        "annotations": [],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"},
                       {"id": 3, "name": "cat"}]}))
    with pytest.raises(BanaError, match=r"the category name\(s\) 'cat' belong to more than one id"):
        open_layout("coco", root).classes


def test_coco_split_files_numbering_the_same_names_differently_agree(tmp_path):
    """labelme2coco numbers each folder's categories by first appearance: the val file's ids
    differ from train's, the names match, and both splits label a class with one index."""
    from tests.conftest import open_layout
    from tests.exports import make_images, write_labelme2coco

    images = make_images(9)
    # The first box of image 0 is a dog, of image 7 a bird: first appearances differ.
    export = write_labelme2coco(tmp_path / "E", {"train": images[:7], "val": images[7:]},
                                per_split_runs=True)
    root = tmp_path / "R"
    (root / "annotations").mkdir(parents=True)
    files = export.annotation_files
    for split in export.splits:
        shutil.copy(files[split], root / "annotations" / f"instances_{split}.json")
    train = json.loads(files["train"].read_text())["categories"]
    val = json.loads(files["val"].read_text())["categories"]
    assert {c["name"]: c["id"] for c in train} != {c["name"]: c["id"] for c in val}
    data = open_layout("coco", root, SPLIT="train")
    for split in ("train", "val"):
        cats = json.loads(files[split].read_text())["categories"]
        index = data.class_map(split).index
        assert {c["name"]: data.classes[index[c["id"]]] for c in cats} == \
            {c["name"]: c["name"] for c in cats}
    assert np.unique([data.classes.index(c["name"]) for c in val]).size == len(val)


def test_folder_mode_asks_which_numbering_when_the_coco_files_differ(tmp_path):
    """Label maps carry no class names: where train.json and val.json number the same names
    differently (labelme2coco), evaluate.py's folder mode refuses to guess and scores under the
    numbering --train-split names. The same maps scored under val's own numbering (what it did
    before) are wrong."""
    from engine.evaluate import run_folder
    from tests.conftest import open_layout
    from tests.exports import make_images, write_labelme2coco
    from utils.io import atomic_write_png

    images = make_images(9)
    export = write_labelme2coco(tmp_path / "E", {"train": images[:7], "val": images[7:]},
                                per_split_runs=True, polygons=True)
    root = tmp_path / "R"
    (root / "annotations").mkdir(parents=True)
    for split in export.splits:
        shutil.copy(export.annotation_files[split], root / "annotations" / f"{split}.json")
    as_trained = open_layout("coco", root, SPLIT="train")
    pred = tmp_path / "pred"
    for i in as_trained.gt_ids("val"):  # perfect predictions, numbered as train.json numbers
        atomic_write_png(pred / f"{i}.png", np.where(
            (gt := as_trained.gt_label("val", i)) == 255, 0, gt).astype(np.uint8))
    assert open_layout("coco", root, SPLIT="val").other_numberings("val")

    with pytest.raises(BanaError, match=r"give the same class names other numbers .*"
                                        r"train.json: .* --train-split"):
        run_folder(pred, root, split="val")
    assert run_folder(pred, root, split="val", train_split="train")["miou"] == pytest.approx(100)
    with pytest.raises(BanaError, match="which are no class"):  # val.json knows fewer classes
        run_folder(pred, root, split="val", train_split="val")
    with pytest.raises(BanaError, match=r"--train-split trian: .*trian"):
        run_folder(pred, root, split="val", train_split="trian")


def test_a_file_of_fewer_categories_in_their_places_is_no_other_numbering(tmp_path):
    """A keypoints-style file listing only the first category numbers it as the split does."""
    from tests.conftest import open_layout

    root = tmp_path / "R"
    (root / "annotations").mkdir(parents=True)
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    image = {"id": 1, "file_name": "a.jpg", "height": 20, "width": 20}
    renumbered = [{"id": 5, "name": "dog"}, {"id": 9, "name": "cat"}]
    for name, cats in (("instances_val", categories), ("person_keypoints_val", categories[:1]),
                       ("instances_train", renumbered)):
        (root / "annotations" / f"{name}.json").write_text(json.dumps(
            {"images": [image], "annotations": [], "categories": cats}))
    (root / "annotations" / "notes.json").write_text("[1, 2, 3]")  # not COCO: skipped
    others = open_layout("coco", root, SPLIT="val").other_numberings("val")
    assert [p.name for p in others] == ["instances_train.json"]


def test_coco_files_of_one_numbering_need_no_train_split(tmp_path):
    from engine.evaluate import run_folder
    from tests.conftest import open_layout
    from tests.exports import make_images, write_labelme2coco
    from utils.io import atomic_write_png

    export = write_labelme2coco(tmp_path / "E", {"train": make_images(6)}, polygons=True)
    root = tmp_path / "R"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copy(next(iter(export.annotation_files.values())),
                    root / "annotations" / f"{split}.json")
    data = open_layout("coco", root, SPLIT="val")
    assert data.other_numberings("val") == {}
    pred = tmp_path / "pred"
    for i in data.gt_ids("val"):
        atomic_write_png(pred / f"{i}.png", np.where(
            (gt := data.gt_label("val", i)) == 255, 0, gt).astype(np.uint8))
    assert run_folder(pred, root, split="val")["miou"] == pytest.approx(100)
