"""Stage 3's instance task: Mask R-CNN on Y_crf / Y_ret / box / gt masks, scored with COCOeval."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data.coco import COCOInstanceDataset
from models.zoo import ModelSpec, build
from utils.coco_eval import evaluate_instances
from engine.config import load_config
from utils.errors import BanaError
from utils.instances import encode_masks, results_as_dataset
from utils.io import atomic_write_json

REPO = Path(__file__).resolve().parent.parent


def _hand_gt(tmp_path):
    """Two 20×20 images: three instances of two categories (ids 5 and 9), masks as RLE."""
    masks = np.zeros((3, 20, 20), bool)
    masks[0, 2:10, 2:12] = True
    masks[1, 12:18, 4:9] = True
    masks[2, 5:15, 5:15] = True
    rles = encode_masks(masks)
    anns = []
    for k, (image_id, cat) in enumerate(((1, 5), (1, 9), (2, 5))):
        ys, xs = np.nonzero(masks[k])
        anns.append({"id": k + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                     "segmentation": rles[k], "area": float(masks[k].sum()),
                     "bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()),
                              float(ys.max() + 1 - ys.min())]})
    path = tmp_path / "gt.json"
    atomic_write_json(path, {"images": [{"id": i, "file_name": f"{i}.jpg", "height": 20,
                                         "width": 20} for i in (1, 2)],
                             "annotations": anns,
                             "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]})
    return path, anns


def test_a_perfect_prediction_scores_100_and_a_wrong_class_0(tmp_path):
    path, anns = _hand_gt(tmp_path)
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"],
                "segmentation": a["segmentation"], "bbox": a["bbox"], "score": 1.0} for a in anns]
    assert evaluate_instances(path, perfect)["AP"] == pytest.approx(100)
    assert evaluate_instances(path, perfect, iou_type="bbox")["AP"] == pytest.approx(100)
    swapped = [dict(r, category_id=14 - r["category_id"]) for r in perfect]
    assert evaluate_instances(path, swapped, image_ids=[1, 2])["AP"] == pytest.approx(0)
    assert evaluate_instances(path, [], image_ids=[1, 2])["AP"] == pytest.approx(0)


def build_instance_model(backbone, num_classes, init, min_size, max_size):
    return build(ModelSpec("maskrcnn", backbone, num_classes, instance_size=(min_size, max_size)),
                 init)


@pytest.mark.parametrize("backbone", ["tiny", pytest.param("resnet50_fpn", marks=pytest.mark.slow)])
def test_mask_rcnn_trains_and_predicts_on_small_images(backbone):
    torch.manual_seed(0)
    model = build_instance_model(backbone, 4, "none", 64, 96).train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 70, 64)]
    masks = torch.zeros(1, 64, 80, dtype=torch.uint8)
    masks[0, 10:30, 12:40] = 1
    targets = [{"boxes": torch.tensor([[12.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([2]),
                "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                "masks": torch.zeros(0, 70, 64, dtype=torch.uint8)}]  # an image without boxes
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"} <= set(losses)
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    out = model.eval()([images[0]])[0]
    assert out["masks"].shape[1:] == (1, 64, 80)


@pytest.mark.slow
def test_mask_rcnn_v2_builds_and_runs():
    model = build_instance_model("resnet50_fpn_v2", 3, "none", 64, 64).eval()
    with torch.inference_mode():
        assert "masks" in model([torch.rand(3, 64, 64)])[0]


def test_pretrained_weights_come_from_torch_home_or_a_clear_message(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no network")),
                        raising=False)
    with pytest.raises(BanaError, match=r"resnet50-0676ba61.pth.*TORCH_HOME"):
        build_instance_model("resnet50_fpn", 3, "imagenet", 64, 64)
    with pytest.raises(BanaError, match=r"fasterrcnn_resnet50_fpn_coco.*TORCH_HOME"):
        build_instance_model("resnet50_fpn", 3, "coco", 64, 64)
    with pytest.raises(BanaError, match="no pretrained weights for the tiny"):
        build_instance_model("tiny", 3, "coco", 64, 64)


@pytest.mark.slow
def test_imagenet_and_coco_detection_weights_load_through_torchvision(tmp_path, monkeypatch):
    """Randomly initialised state dicts of the right shapes stand in for the downloads."""
    import torchvision
    from torchvision.models import ResNet50_Weights
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    checkpoints = tmp_path / "home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50().state_dict()
    torch.save(resnet, checkpoints / Path(ResNet50_Weights.IMAGENET1K_V1.url).name)
    model = build_instance_model("resnet50_fpn", 3, "imagenet", 64, 64)
    assert torch.equal(model.backbone.body.conv1.weight, resnet["conv1.weight"])
    detector = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None).state_dict()
    torch.save(detector, checkpoints / Path(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.url).name)
    model = build_instance_model("resnet50_fpn", 3, "coco", 64, 64)
    assert torch.equal(model.rpn.head.conv[0][0].weight, detector["rpn.head.conv.0.0.weight"])
    assert torch.equal(model.roi_heads.box_head.fc6.weight, detector["roi_heads.box_head.fc6.weight"])
    assert model.roi_heads.box_predictor.cls_score.out_features == 3


def test_instance_configs_are_validated():
    with pytest.raises(BanaError, match="does not fit MODEL.TASK instance"):
        load_config(REPO / "configs/demo/stage3_instance.yml", ["MODEL.BACKBONE", "vgg16"])
    with pytest.raises(BanaError, match="set DATA.DATASET coco"):
        load_config(REPO / "configs/demo/stage3_instance.yml", ["DATA.DATASET", "voc"])
    cfg = load_config(REPO / "configs/stage3_maskrcnn_coco.yml")
    assert cfg.MODEL.TASK == "instance" and cfg.MODEL.WEIGHTS.endswith("final.ckpt")


@pytest.fixture(scope="module")
def instance_tree(tmp_path_factory):
    """A custom COCO export whose stage-2 'pseudo' instance files are its own GT masks, eroded
    for Y_ret: enough to drive every mask source without running stages 1 and 2."""
    from data.coco_bbox_setup import write_bg_masks
    from data.synthetic_coco import make_custom_coco

    root = tmp_path_factory.mktemp("instance") / "R"
    make_custom_coco(root, n_train=6, n_val=3, size=64, seed=2)
    write_bg_masks(root, progress=False)
    from pycocotools import mask as mask_utils

    from utils.coco_eval import load_ground_truth

    gt = load_ground_truth(root / "annotations/instances_train.json")
    for name, erode in (("Y_crf", 0), ("Y_ret", 2)):
        results = []
        for a in gt.dataset["annotations"]:
            if a["iscrowd"]:
                continue
            m = gt.annToMask(a).astype(bool)
            if erode:
                m[:erode], m[-erode:], m[:, :erode], m[:, -erode:] = False, False, False, False
                m = m & np.roll(m, erode, 0) & np.roll(m, -erode, 1)
            if m.any():
                results.append({"image_id": a["image_id"], "category_id": a["category_id"],
                                "segmentation": encode_masks(m[None])[0], "score": 1.0})
        atomic_write_json(root / "Generation/exports/coco" / f"instances_train_{name}.json",
                          results_as_dataset(results, gt.dataset["images"],
                                             gt.dataset["categories"]))
    assert mask_utils is not None
    return root


def test_mask_sources_give_the_expected_targets(instance_tree):
    from tests.conftest import open_layout

    data = open_layout("coco", instance_tree)
    split = instance_tree / "annotations/instances_train.json"
    box = COCOInstanceDataset(data, "train", split, masks="box")
    gt = COCOInstanceDataset(data, "train", split, masks="gt")
    pseudo = COCOInstanceDataset(data, "train", instance_tree / "Generation/exports/coco/instances_train_Y_crf.json")
    item_box, item_gt, item_pseudo = box[2], gt[2], pseudo[2]
    assert len(item_box["boxes"]) == len(item_gt["boxes"]) > 0
    for k, (x1, y1, x2, y2) in enumerate(item_box["boxes"].tolist()):
        mask = item_box["masks"][k].bool()
        assert mask.sum() == (int(y2) - int(y1)) * (int(x2) - int(x1))  # the filled box
        assert (item_gt["masks"][k].bool() & ~mask).sum() == 0  # the object lies in its box
    assert torch.equal(item_pseudo["masks"], item_gt["masks"])  # Y_crf = GT here
    assert set(item_gt["labels"].tolist()) <= {1, 2, 3, 4}
    flipped = COCOInstanceDataset(data, "train", split, masks="gt", flip=True)
    torch.manual_seed(1)
    for _ in range(4):  # at least one flip
        f = flipped[2]
        if not torch.equal(f["masks"], item_gt["masks"]):
            assert torch.equal(f["masks"], item_gt["masks"].flip(-1))
            assert torch.allclose(f["boxes"][:, 0], 64 - item_gt["boxes"][:, 2])
            break
    else:
        pytest.fail("no flip in four draws")
    assert len(gt[1]["boxes"]) == 0  # the image without annotations stays, without targets


@pytest.mark.slow
@pytest.mark.parametrize("source", ["Y_crf", "Y_ret", "box", "gt"])
def test_each_mask_source_trains_and_is_scored_with_cocoeval(instance_tree, tmp_path, source,
                                                              capsys):
    from engine.instance import evaluate, train

    opts = ["DATA.ROOT", str(instance_tree), "OUTPUT_DIR", str(tmp_path), "DATA.NUM_WORKERS",
            "0", "MODEL.INSTANCE_MASKS", source, "SOLVER.MAX_ITER", "3", "SOLVER.MILESTONES",
            "[2]", "SOLVER.WARMUP_ITERS", "2", "SOLVER.LOG_EVERY", "1", "DATA.BATCH_SIZE", "2"]
    cfg = load_config(REPO / "configs/demo/stage3_instance.yml", opts)
    result = train(cfg, devices="cpu")
    assert result["iterations"] == 3
    summary = evaluate(cfg, devices="cpu", save_vis=2)
    assert set(summary["ap"]) == {"segm", "bbox"}
    assert 0 <= summary["ap"]["segm"]["AP"] <= 100
    printed = capsys.readouterr().out
    assert any(line.startswith("segm AP ") for line in printed.splitlines())
    eval_dir = tmp_path / "stage3_instance" / "eval"
    results = json.loads((eval_dir / "results_segm.json").read_text())
    assert all(r["category_id"] in {3, 7, 13, 42} for r in results)
    assert len(list((eval_dir / "vis").glob("*.png"))) == 2


def test_evaluating_a_semantic_checkpoint_as_instance_is_refused(tmp_path):
    from engine.instance import load_instance_model

    ckpt = {"bana": {"stage": 3, "backbone": "tiny", "num_classes": 21}, "state_dict": {}}
    torch.save(ckpt, tmp_path / "semantic.ckpt")
    with pytest.raises(BanaError, match="holds a semantic-segmentation model"):
        load_instance_model(tmp_path / "semantic.ckpt")
    shutil.rmtree(tmp_path)


def test_an_instance_checkpoint_of_this_project_is_a_model_init(tmp_path):
    """MODEL.INIT naming one of this project's instance checkpoints was refused with no detail
    (its weights sit under the LightningModule's 'model.' prefix): it is taken when backbone and
    classes fit, and otherwise refused saying what the file holds and what this run needs."""
    from models.zoo import ModelSpec, build, checkpoint_entry

    spec = ModelSpec("maskrcnn", "tiny", num_classes=5, instance_size=(64, 96))
    trained = build(spec)
    with torch.no_grad():
        trained.roi_heads.box_predictor.cls_score.weight.fill_(0.25)
    path = tmp_path / "final.ckpt"
    torch.save({"bana": checkpoint_entry(3, spec, {}, category_ids=[0, 3, 7, 13, 42]),
                "global_step": 3,
                "state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}}, path)
    started = build(spec, init=str(path))
    assert torch.equal(started.roi_heads.box_predictor.cls_score.weight,
                       trained.roi_heads.box_predictor.cls_score.weight)
    with pytest.raises(BanaError, match=r"Mask R-CNN of 5 classes, but this run trains 3"):
        build(ModelSpec("maskrcnn", "tiny", num_classes=3, instance_size=(64, 96)),
              init=str(path))
    plain = tmp_path / "plain.pth"
    torch.save({k: v for k, v in trained.state_dict().items() if "mask_head" not in k}, plain)
    with pytest.raises(BanaError, match=r"of its weights are missing \(e.g. roi_heads.mask_head"):
        build(spec, init=str(plain))


def test_instance_checkpoints_that_run_code_are_refused(instance_tree, tmp_path):
    """evaluate.py (instance) and --resume of the instance task read the checkpoint with the
    weights-only loader: a file whose pickle runs a command is refused, the command never runs."""
    from engine.instance import evaluate, train
    from test_checkpoint_errors import code_checkpoint

    from models.zoo import checkpoint_entry

    spec = ModelSpec("maskrcnn", "tiny", num_classes=5, instance_size=(64, 96))
    like = tmp_path / "like.ckpt"
    torch.save({"bana": checkpoint_entry(3, spec, {}), "global_step": 1,
                "state_dict": {f"model.{k}": v for k, v in build(spec).state_dict().items()}},
               like)
    cfg = load_config(REPO / "configs/demo/stage3_instance.yml", [
        "DATA.ROOT", str(instance_tree), "OUTPUT_DIR", str(tmp_path / "runs"),
        "DATA.NUM_WORKERS", "0", "SOLVER.MAX_ITER", "3", "SOLVER.MILESTONES", "[2]",
        "SOLVER.WARMUP_ITERS", "2", "DATA.BATCH_SIZE", "2"])
    marker = tmp_path / "MARKER"
    model = code_checkpoint(tmp_path / "model.ckpt", marker, like)
    with pytest.raises(BanaError, match="run code"):
        evaluate(cfg, checkpoint=str(model), devices="cpu")
    code_checkpoint(cfg.run_dir / "checkpoints/last.ckpt", marker, like)
    with pytest.raises(BanaError, match="run code"):
        train(cfg, devices="cpu", resume=True)
    assert not marker.exists()
