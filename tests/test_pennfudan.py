"""Penn-Fudan: the converter to the VOC layout (data/pennfudan.py) and the real-photo path of
benchmarks/pennfudan.py (stages 1 and 2 with its keys) on six photos.

The tests that read the photos need ../shared/data/PennFudanPed (the unzipped Penn-Fudan
folder) and are skipped without it; the others use no data."""

from pathlib import Path

import numpy as np
import pytest

from data.pennfudan import (SOURCES, check_boxes, convert, is_source, locate_source,
                            read_annotation, split_stems, to_pixel_edges)
from utils.errors import BanaError
from utils.io import read_image_size, read_index_png

REPO = Path(__file__).resolve().parents[1]
SOURCE = SOURCES[0]  # ../shared/data/PennFudanPed beside the repository
needs_data = pytest.mark.skipif(
    not is_source(SOURCE), reason=f"Penn-Fudan is not at {SOURCE} (python data/pennfudan.py "
                                  "--out DIR downloads it)")

ANNOTATION = """# Compatible with PASCAL Annotation Version 1.00
Image filename : "PennFudanPed/PNGImages/FudanPed00001.png"
Image size (X x Y x C) : 559 x 536 x 3
Database : "The Penn-Fudan-Pedestrian Database"
Objects with ground truth : 2 { "PASpersonWalking" "PASpersonWalking" }
# Top left pixel co-ordinates : (1, 1)
Bounding box for object 1 "PASpersonWalking" (Xmin, Ymin) - (Xmax, Ymax) : (160, 182) - (302, 431)
Bounding box for object 2 "PASpersonWalking" (Xmin, Ymin) - (Xmax, Ymax) : (420, 171) - (535, 486)
"""


def test_annotation_is_read_and_corners_become_pixel_edges(tmp_path):
    """Penn-Fudan's (160, 182) - (302, 431) names 1-based pixels 160..302 inclusive, i.e. 0-based
    columns 159..301 and rows 181..430: pixel edges x1 = 159, y1 = 181, x2 = 302, y2 = 431
    (data/voc.py covers columns int(x1) .. int(x2) - 1)."""
    path = tmp_path / "a.txt"
    path.write_text(ANNOTATION)
    size, boxes, numbers = read_annotation(path)
    assert size == (536, 559)  # (H, W)
    assert boxes.tolist() == [[160, 182, 302, 431], [420, 171, 535, 486]]
    assert numbers.tolist() == [1, 2]
    assert to_pixel_edges(boxes).tolist() == [[159, 181, 302, 431], [419, 170, 535, 486]]
    assert to_pixel_edges(np.array([[1, 1, 559, 536]])).tolist() == [[0, 0, 559, 536]]


def test_an_annotation_missing_a_box_is_refused(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(ANNOTATION.replace("Objects with ground truth : 2", "Objects with ground "
                                       "truth : 3"))
    with pytest.raises(BanaError, match="as many 'Bounding box for object' lines"):
        read_annotation(path)


def test_a_mask_leaving_its_box_means_misread_corners():
    """A pedestrian on 0-based columns 2..4, rows 1..2: its pixel-edge box is (2, 1, 5, 3). The
    box read without the 1-based shift, (3, 2, 5, 3), leaves its first column and row out."""
    instances = np.zeros((5, 6), np.uint8)
    instances[1:3, 2:5] = 1
    one = np.array([1])
    assert check_boxes("x", np.array([[2, 1, 5, 3]]), one, instances) == 1
    assert check_boxes("x", np.array([[1, 1, 6, 3]]), one, instances) == 0  # wider box: kept
    with pytest.raises(BanaError, match="misread"):
        check_boxes("x", np.array([[3, 2, 5, 3]]), one, instances)
    with pytest.raises(BanaError, match=r"pedestrian\(s\) \[2\] without a box"):
        check_boxes("x", np.array([[2, 1, 5, 3]]), one, np.where(instances, 1, 2))


def test_split_is_fixed_and_spread():
    stems = [f"FudanPed{i:05d}" for i in range(1, 75)] + [f"PennPed{i:05d}" for i in range(1, 97)]
    split = split_stems(stems[::-1])  # any order in, the same split out
    assert len(split["train"]) == 120 and len(split["val"]) == 50
    assert set(split["train"]) | set(split["val"]) == set(stems)
    assert split["val"][:3] == ["FudanPed00001", "FudanPed00004", "FudanPed00007"]
    assert 15 < sum(s.startswith("Fudan") for s in split["val"]) < 30  # both sources in val


def test_offline_download_says_where_to_put_the_data(tmp_path):
    """Nothing at --source and a download that cannot connect (a closed local port stands in for
    an offline machine): the message names the URL, the folder to create and --source."""
    url = "http://127.0.0.1:9/PennFudanPed.zip"
    with pytest.raises(BanaError) as err:
        locate_source(tmp_path / "nowhere", url=url, download_dir=tmp_path / "datasets")
    message = str(err.value)
    assert url in message and "offline" in message
    assert str(tmp_path / "datasets" / "PennFudanPed") in message
    assert "--source" in message and "PNGImages/" in message
    assert not (tmp_path / "datasets" / "PennFudanPed.zip").exists()


@pytest.fixture(scope="module")
def six_photos(tmp_path_factory) -> Path:
    """The first 4 train and 2 val photos, converted."""
    if not is_source(SOURCE):
        pytest.skip(f"Penn-Fudan is not at {SOURCE}")
    root = tmp_path_factory.mktemp("pennfudan") / "PennFudanVOC"
    info = convert(SOURCE, root, n_train=4, n_val=2)
    assert (info["n_train"], info["n_val"]) == (4, 2)
    return root


@needs_data
def test_converter_boxes_match_the_masks(six_photos):
    from data.voc import VOCData, read_xml
    from types import SimpleNamespace

    root = six_photos
    ids = {s: (root / "ImageSets/Segmentation" / f"{s}.txt").read_text().split()
           for s in ("train", "val")}
    assert ids == {"train": ["FudanPed00002", "FudanPed00003", "FudanPed00005",
                             "FudanPed00006"], "val": ["FudanPed00001", "FudanPed00004"]}
    for stem in ids["train"] + ids["val"]:
        boxes, classes, size = read_xml(root / "Annotations" / f"{stem}.xml", ("background",
                                                                               "person"))
        instances = read_index_png(SOURCE / "PedMasks" / f"{stem}_mask.png")
        assert size == instances.shape == read_image_size(root / "JPEGImages" / f"{stem}.png")
        assert len(boxes) == instances.max() and set(classes.tolist()) == {1}
        for k, box in enumerate(boxes, start=1):  # the annotation lists pedestrian k k-th
            rows, cols = np.nonzero(instances == k)
            extent = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            assert np.abs(np.asarray(box) - extent).max() <= 1, (stem, k, box, extent)
        gt = read_index_png(root / "SegmentationClass" / f"{stem}.png")
        assert set(np.unique(gt).tolist()) <= {0, 1, 255}
        np.testing.assert_array_equal(gt == 1, instances > 0)
    # The VOC reader takes the class from labelmap.txt and gives the same boxes.
    data = VOCData(SimpleNamespace(CLASSES=[], NUM_CLASSES=2), root)
    assert data.classes == ("background", "person")
    assert data.split_ids("val") == ids["val"] and data.gt_ids("val") == ids["val"]
    assert data.annotation("train", "FudanPed00002").boxes.shape[1] == 4


@needs_data
def test_converting_again_replaces_the_earlier_tree(six_photos, tmp_path):
    root = Path(__import__("shutil").copytree(six_photos, tmp_path / "t", symlinks=True))
    convert(SOURCE, root, n_train=2, n_val=1)
    assert len(list((root / "Annotations").glob("*.xml"))) == 3
    (root / "pennfudan.json").unlink()
    with pytest.raises(BanaError, match="not a conversion written by this script"):
        convert(SOURCE, root, n_train=2, n_val=1)


@needs_data
@pytest.mark.slow
def test_stages_1_and_2_run_on_the_photos_with_the_benchmarks_keys(six_photos, tmp_path):
    """Stage 1 (4 iterations) and stage 2 as benchmarks/pennfudan.py runs them (its keys on
    configs/custom/*.yml), on the 4 train photos: labels for every photo and a quality report
    scored against the masks."""
    import json

    from benchmarks.pennfudan import dataset_opts, preset_opts, stage1_opts, stage2_opts
    from engine.config import load_config
    from engine.stage1 import run as run_stage1
    from engine.stage2 import run as run_stage2

    out = tmp_path / "runs"
    common = dataset_opts(six_photos, out)
    run_stage1(load_config(REPO / "configs/custom/stage1.yml", [
        *common, *preset_opts([], "stage1"),
        *stage1_opts("stage1_bap", "bap", 4, batch=2, crop=161, workers=0)]), devices="cpu")
    result = run_stage2(load_config(REPO / "configs/custom/stage2.yml", [
        *common, *preset_opts([], "stage2"), *stage2_opts("bap", "stage1_bap", True, 0)]),
        devices="cpu", workers=1)

    ids = (six_photos / "ImageSets/Segmentation/train.txt").read_text().split()
    for kind in ("Y_crf", "Y_ret", "Y_box"):
        for i in ids:
            label = read_index_png(six_photos / "Generation/bap" / kind / f"{i}.png")
            assert label.shape == read_image_size(six_photos / "JPEGImages" / f"{i}.png")
            assert set(np.unique(label).tolist()) <= {0, 1}
    quality = json.loads((out / "stage2_bap" / "quality.json").read_text())
    assert quality["images"] == len(ids) == 4
    assert set(quality["per_class_iou"]["Y_crf"]) == {"background", "person"}
    assert all(0 <= v <= 100 for v in quality["miou"].values())
    # Stage 2's box baseline is the converted boxes filled: its person IoU is the one computed
    # here from the XML and the masks (the masks cover 34-44 % of these photos' boxes), up to
    # the 1-px moves of the authors' box arithmetic (DATA.BOX_ARITHMETIC reference).
    from data.voc import read_xml

    inter = union = 0
    for i in ids:
        person = read_index_png(six_photos / "SegmentationClass" / f"{i}.png") == 1
        filled = np.zeros_like(person)
        for x1, y1, x2, y2 in read_xml(six_photos / "Annotations" / f"{i}.xml",
                                       ("background", "person"))[0].astype(int):
            filled[y1:y2, x1:x2] = True
        inter, union = inter + (filled & person).sum(), union + (filled | person).sum()
    assert quality["per_class_iou"]["box_baseline"]["person"] == pytest.approx(
        100 * inter / union, abs=0.5)
    assert result["quality"] == quality["miou"]

    # The no-ground-truth signals and their verdict, for every variant, in the result, in
    # quality.json and in the label set's manifest; Y_box fills its boxes by construction.
    from data.labelset import LabelSet
    from engine.label_quality import label_warnings

    signals = quality["signals"]
    boxes = sum(len(read_xml(six_photos / "Annotations" / f"{i}.xml",
                             ("background", "person"))[0]) for i in ids)
    assert signals["images"] == 4 and signals["boxes"] == boxes
    assert set(signals["variants"]) == {"Y_crf", "Y_ret", "Y_box"}
    assert signals["variants"]["Y_box"]["overall"]["fill_mean"] == 1.0
    for variant in ("Y_crf", "Y_ret"):
        person = signals["variants"][variant]["per_class"]["person"]
        assert person["boxes"] == boxes and 0 <= person["fill_p10"] <= person["fill_mean"] <= 1
    assert 0 <= signals["agreement"]["overall"]["mean"] <= 1
    assert result["warnings"] == quality["warnings"] == label_warnings(signals)
    assert LabelSet(six_photos / "Generation/bap").quality["warnings"] == result["warnings"]
    # Labels that lost the pedestrians (each photo's Y_crf with its person pixels eroded away
    # to a quarter of their boxes' width at most), indexed as a label set: the warning fires,
    # naming the class.
    from engine.labels import index_folder
    from utils.io import atomic_write_png

    lost = tmp_path / "lost"
    for i in ids:
        label = read_index_png(six_photos / "Generation/bap/Y_crf" / f"{i}.png")
        label[:, ::4] = 0
        label[:, 1::4] = 0
        label[:, 2::4] = 0
        label[::2] = 0
        atomic_write_png(lost / f"{i}.png", label)
    cfg2 = load_config(REPO / "configs/custom/stage2.yml", [*common, *preset_opts([], "stage2"),
                                                            *stage2_opts("bap", "stage1_bap",
                                                                         True, 0)])
    index_folder(cfg2, lost, variant="Y_crf", progress=False)
    warned = LabelSet(lost).quality["warnings"]
    assert warned and warned[0].startswith("Y_crf: boxes are mostly background") \
        and "person" in warned[0], warned


def benchmark_commands(tmp_path, argv: list[str]) -> list[list[str]]:
    """The argv of every step benchmarks/pennfudan.py would run with `argv`, none run."""
    import benchmarks.pennfudan as bench

    commands = []
    runner = bench.Benchmark(bench.parse_args(argv), dict(bench.PRESETS["default"]),
                             tmp_path / "out", tmp_path / "data")
    runner.step = lambda key, script, *rest: commands.append([script, *rest])
    runner.collect = lambda: None
    runner.run()
    return commands


@pytest.mark.parametrize("user_opts", [[], ["MODEL.BACKBONE", "vgg16", "MODEL.INIT", "imagenet"]])
def test_benchmark_configs_load_and_take_the_passthrough_opts(tmp_path, user_opts):
    """Every stage's config, as the benchmark builds it, loads; by default the tiny preset from
    scratch with stage 3 from the stage-1 BAP checkpoint, and with the GPU user's --opts the
    configs' VGG-16 recipe (its learning rate, stage 3 from ImageNet)."""
    from engine.config import load_config

    commands = benchmark_commands(tmp_path, ["--opts", *user_opts] if user_opts else [])
    scripts = [c[0] for c in commands]
    assert scripts == ["data/pennfudan.py", "stage1.py", "stage1.py", "stage2.py", "stage2.py",
                       "stage2.py"] + ["stage3.py", "evaluate.py"] * 3
    for command in commands[1:]:
        config = command[command.index("--config-file") + 1]
        cfg = load_config(REPO / config, command[command.index("--opts") + 1:])
        assert cfg.DATA.ROOT == str(tmp_path / "data") and cfg.DATA.NUM_CLASSES == 2
        assert cfg.MODEL.BACKBONE == ("vgg16" if user_opts else "tiny")
        if command[0] in ("stage1.py", "stage3.py"):
            assert cfg.SOLVER.LR == (0.001 if user_opts else 0.01)
        if command[0] == "stage1.py":
            assert cfg.MODEL.INIT == ("imagenet" if user_opts else "none")
        if command[0] == "stage3.py":
            assert cfg.MODEL.INIT == ("imagenet" if user_opts else
                                      str(tmp_path / "out/stage1_bap/checkpoints/final.ckpt"))


def test_upper_bound_adds_a_stage_3_run_on_the_masks(tmp_path):
    from engine.config import load_config

    commands = benchmark_commands(tmp_path, ["--upper-bound"])
    assert [c[0] for c in commands].count("stage3.py") == 4
    stage3 = commands[-2]
    cfg = load_config(REPO / "configs/custom/stage3.yml", stage3[stage3.index("--opts") + 1:])
    assert cfg.NAME == "stage3_gt" and cfg.MODEL.LOSS == "ce_crf"
    assert cfg.DATA.GT_IDS == str(tmp_path / "data/ImageSets/Segmentation/train.txt")
