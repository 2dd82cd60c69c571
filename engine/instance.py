"""Stage 3's instance task: Mask R-CNN trained on instance masks and scored with COCO AP.

    python stage3.py   --config-file configs/stage3_maskrcnn_coco.yml --gpu-id 0
    python evaluate.py --config-file configs/stage3_maskrcnn_coco.yml --gpu-id 0 [--save-vis N]

`MODEL.INSTANCE_MASKS` picks the masks of DATA.SPLIT it trains on: stage 2's Y_crf or Y_ret
(the COCO export of DATA.ROOT/DATA.PSEUDO_LABEL_DIR's label set), `box` (each GT box filled) or `gt`
(the split's own segmentations). The same YAML / --opts / --gpu-id / --resume conventions,
Lightning trainer, DDP and atomic checkpoints as stages 1 and 3. Evaluation runs the final model
on TEST.SPLIT, writes COCO results files (results_segm.json, results_bbox.json: what the test-dev
server takes) and, where the split has masks, prints COCOeval's segm and bbox AP lines.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from engine.config import Config
from engine.optim import make_optimizer, parameter_groups
from engine.runs import (CHECKPOINT_DIR, AtomicCheckpoint, finished_run, model_spec,
                         start_training)
from engine.training import BanaLitModule, final_checkpoint, fit, make_trainer
from utils.errors import BanaError

STAGE = 3


def mask_annotation(cfg: Config, data) -> Path:
    """The annotation file whose masks training uses (MODEL.INSTANCE_MASKS): the split's own, or
    the COCO export of stage 2's label set (exporters/coco.py), written from the records when it
    is missing or older than the label set."""
    if cfg.MODEL.INSTANCE_MASKS in ("box", "gt"):
        return data.annotation_file(cfg.DATA.SPLIT)
    from data.labelset import MANIFEST, LabelSet
    from exporters.coco import export

    folder, variant = cfg.pseudo_label_dir, cfg.MODEL.INSTANCE_MASKS
    path = folder / "exports" / "coco" / f"instances_{cfg.DATA.SPLIT}_{variant}.json"
    manifest = folder / MANIFEST
    if manifest.is_file() and (not path.is_file()
                               or path.stat().st_mtime < manifest.stat().st_mtime):
        export(LabelSet(folder), variant, path.parent)
    return path


def class_map_of(data, split: str):
    """The class map of the split (DATA.CLASS_MAP, names matched to the training split's);
    checks DATA.NUM_CLASSES."""
    data.classes  # noqa: B018 -- reading them checks DATA.NUM_CLASSES
    return data.class_map(split)


def collate_list(batch):
    return list(batch)


class InstanceLitModule(BanaLitModule):
    """Wraps a torchvision MaskRCNN; one step = the sum of its losses (RPN, box, mask). Its
    checkpoints also record the COCO category id of each class and the masks trained on."""

    STAGE = STAGE

    def __init__(self, model, cfg: Config, **extra):
        super().__init__(cfg, model.spec, **extra)
        self.model = model

    def training_step(self, batch, batch_idx):
        # torchvision's transform expects RGB in 0..1 and normalises with ImageNet statistics.
        images = [item["image"].float() / 255 for item in batch]
        targets = [{"boxes": item["boxes"], "labels": item["labels"], "masks": item["masks"]}
                   for item in batch]
        losses = self.model(images, targets)
        losses = {"loss": sum(losses.values()), **losses}
        self.finite_watch.update(losses, self.global_step)
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=len(batch))
        return losses["loss"]

    def configure_optimizers(self):
        groups = parameter_groups([self.model], [], self.cfg.SOLVER.LR,
                                  self.cfg.SOLVER.WEIGHT_DECAY)
        return make_optimizer(groups, self.cfg.SOLVER)


def check_train_inputs(cfg: Config):
    """Every input of an instance training run, before a network is built; returns (dataset,
    class map)."""
    from data.coco import COCOInstanceDataset
    from data.datasets import open_data
    from engine.preflight import Problems, require_data_root, require_init, require_writable

    problems = Problems("stage 3 (instance)")
    dataset = class_map = None
    if problems.passes(lambda: require_data_root(cfg)):
        data = open_data(cfg)
        class_map = problems.check(lambda: class_map_of(data, cfg.DATA.SPLIT))
        if class_map is not None:
            masks = {"box": "box", "gt": "gt"}.get(cfg.MODEL.INSTANCE_MASKS, "segm")
            from engine.stage3 import excluded_images

            dataset = problems.check(lambda: COCOInstanceDataset(
                data, cfg.DATA.SPLIT, mask_annotation(cfg, data), masks=masks,
                flip=cfg.DATA.FLIP,
                exclude=excluded_images(cfg, data.split_ids(cfg.DATA.SPLIT))))
    problems.check(lambda: require_init(cfg.MODEL.INIT, named=("none", "imagenet", "coco"),
                                        what="a Mask R-CNN state dict"))
    problems.check(lambda: require_writable(cfg.run_dir, "OUTPUT_DIR"))
    problems.raise_if_any()
    return dataset, class_map


def train(cfg: Config, *, devices: str = "0", resume: bool = False, reconfigure: bool = False,
          overwrite: bool = False) -> dict:
    """Train Mask R-CNN; returns the iteration count and the final checkpoint. Options as
    `engine.stage1.run`'s."""
    from utils.runlock import ReadLock, RunLock

    dataset, class_map = check_train_inputs(cfg)
    # The pseudo instance masks it trains on cannot be rewritten (stage 2) while it runs.
    with RunLock(cfg.run_dir, "stage 3 (instance)"), \
            ReadLock(cfg.pseudo_label_dir, "stage 3 (instance training)"):
        return _train(cfg, dataset, class_map, devices, resume, reconfigure, overwrite)


def _train(cfg: Config, dataset, class_map, devices, resume, reconfigure, overwrite) -> dict:
    from models.zoo import build

    devices, ckpt_path, step = start_training(cfg, devices, STAGE, resume, reconfigure, overwrite,
                                         class_map.names)
    finished = finished_run(cfg, ckpt_path, step, "Mask R-CNN")
    if finished is not None:
        return finished
    model = build(model_spec(cfg, "maskrcnn", class_map.names), init=cfg.MODEL.INIT)
    extra = {"category_ids": [0] + class_map.category_ids_by_index(),
             "masks": cfg.MODEL.INSTANCE_MASKS}
    per_device = max(1, cfg.DATA.BATCH_SIZE // devices.total)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=per_device, shuffle=True, drop_last=len(dataset) >= per_device,
        num_workers=cfg.DATA.NUM_WORKERS, collate_fn=collate_list,
        persistent_workers=cfg.DATA.NUM_WORKERS > 0)
    print(f"Mask R-CNN ({cfg.MODEL.BACKBONE}, init {cfg.MODEL.INIT}) on '{cfg.DATA.SPLIT}' "
          f"({len(dataset)} images), masks {cfg.MODEL.INSTANCE_MASKS} from "
          f"{dataset.annotation_file}.")
    ckpt_dir = cfg.run_dir / CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    trainer = make_trainer(cfg, devices, [AtomicCheckpoint(ckpt_dir, cfg.SOLVER.CKPT_EVERY)])
    fit(trainer, InstanceLitModule(model, cfg, **extra), train_dataloaders=loader,
        ckpt_path=ckpt_path)
    final = final_checkpoint(trainer, ckpt_dir, "stage 3", cfg.SOLVER.MAX_ITER)
    if trainer.is_global_zero:
        print(f"Stage 3 (instance) done: {trainer.global_step} iterations, checkpoint {final}")
    return {"iterations": trainer.global_step, "checkpoint": str(final),
            **{k: float(v) for k, v in trainer.callback_metrics.items()}}


def load_instance_model(path: Path):
    """The Mask R-CNN of an instance checkpoint, in eval mode, and the checkpoint (its spec names
    the classes, `extra["category_ids"]` their COCO category ids)."""
    from models.zoo import read_checkpoint

    hint = ("MODEL.TASK is instance: train a Mask R-CNN first (python stage3.py --config-file "
            "CONFIG with MODEL.TASK instance) and the same OUTPUT_DIR, or pass --checkpoint PATH; "
            "a semantic model is evaluated with its own (semantic) config.")
    ckpt = read_checkpoint(path, stage=STAGE, kind="maskrcnn", hint=hint)
    return ckpt.network(hint), ckpt


def predict_instances(model, image: np.ndarray, device, threshold: float = 0.5):
    """Detections of one RGB uint8 (H, W, 3) image: boxes (N, 4) x1, y1, x2, y2, labels (N,),
    scores (N,), masks bool (N, H, W) (the mask probabilities above `threshold`)."""
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().to(device) / 255
    with torch.inference_mode():
        out = model([x])[0]
    return (out["boxes"].cpu().numpy(), out["labels"].cpu().numpy(), out["scores"].cpu().numpy(),
            (out["masks"][:, 0] > threshold).cpu().numpy())


def draw_instances(image: np.ndarray, boxes, labels, scores, masks, names,
                   min_score: float = 0.3) -> np.ndarray:
    """The image with each detection above `min_score` painted (mask), framed (box) and named."""
    import cv2

    from utils.palette import voc_palette

    out = image.copy()
    palette = voc_palette()
    for k in np.flatnonzero(scores >= min_score):
        colour = palette[1 + k % 20]
        out[masks[k]] = (0.5 * out[masks[k]] + 0.5 * colour).astype(np.uint8)
        x1, y1, x2, y2 = (int(round(v)) for v in boxes[k])
        cv2.rectangle(out, (x1, y1), (x2, y2), tuple(int(c) for c in colour), 1)
        cv2.putText(out, f"{names[labels[k]]} {scores[k]:.2f}", (x1, max(8, y1 - 2)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.3, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def evaluate(cfg: Config, *, checkpoint: str | None = None, devices: str = "0",
             save_vis: int = 0) -> dict:
    """Run the instance model on TEST.SPLIT, write COCO results, score them where there is GT.
    checkpoint: default MODEL.WEIGHTS under OUTPUT_DIR; save_vis: pictures of the first N
    images' detections."""
    from tqdm import tqdm

    from data.base import read_dataset_image
    from data.datasets import open_data
    from engine.inference import EVAL_DIR, checkpoint_path, inference_device
    from engine.preflight import Problems, require_checkpoint, require_data_root, require_writable
    from utils.coco_eval import evaluate_instances, format_ap, load_ground_truth
    from utils.instances import encode_masks
    from utils.io import atomic_write_json, atomic_write_png, json_safe

    split = cfg.TEST.SPLIT
    problems = Problems("evaluate.py (instance)")
    data = None
    if problems.passes(lambda: require_data_root(cfg)):
        data = open_data(cfg)
        problems.check(lambda: data.class_map(split))
    ckpt_path = problems.check(lambda: checkpoint_path(cfg, checkpoint))
    if ckpt_path is not None:
        problems.check(lambda: require_checkpoint(ckpt_path, "the instance checkpoint "
                                                  "(MODEL.WEIGHTS or --checkpoint)",
                                                  "Train it first with stage3.py."))
    problems.check(lambda: require_writable(cfg.run_dir / EVAL_DIR, "OUTPUT_DIR"))
    problems.raise_if_any()

    annotation_file = data.annotation_file(split)
    gt = load_ground_truth(annotation_file)
    annotations = gt.dataset.get("annotations", [])
    score = bool(annotations)
    if score and any(not a.get("segmentation") for a in annotations if not a.get("iscrowd")):
        raise BanaError(f"{annotation_file} has annotations without a segmentation, so mask AP "
                        "cannot be computed: evaluate on a split whose annotations have masks.")
    from utils.distributed import detect_launch

    launch = detect_launch()
    if launch.world_size > 1:
        raise BanaError("evaluate.py with MODEL.TASK instance runs as one process (COCOeval "
                        "scores the whole split at once): start it without torchrun / srun.")
    device = inference_device(devices, launch)
    model, ckpt = load_instance_model(ckpt_path)
    model.to(device)
    names = ckpt.spec.classes
    # This split's category id of each class the model predicts (ids may differ between split
    # files; the names match: class_map checks it).
    category_of = {k: cat_id for cat_id, k in data.class_map(split).index.items()}
    categories = [category_of.get(k, -1) for k in range(len(names))]
    out_dir = cfg.run_dir / EVAL_DIR
    vis_n = save_vis
    segm, bbox = [], []
    image_ids = sorted(gt.getImgIds())
    start = time.perf_counter()
    for n, image_id in enumerate(tqdm(image_ids, desc="evaluate", unit="img", dynamic_ncols=True)):
        image = read_dataset_image(data, split, str(image_id))
        boxes, labels, scores, masks = predict_instances(model, image, device)
        for k, rle in enumerate(encode_masks(masks)):
            if categories[labels[k]] < 0:  # a class this split's file does not list
                continue
            common = {"image_id": int(image_id), "category_id": int(categories[labels[k]]),
                      "score": float(scores[k])}
            segm.append({**common, "segmentation": rle})
            x1, y1, x2, y2 = (float(v) for v in boxes[k])
            bbox.append({**common, "bbox": [x1, y1, x2 - x1, y2 - y1]})
        if n < vis_n:
            atomic_write_png(out_dir / "vis" / f"{image_id}.png",
                             draw_instances(image, boxes, labels, scores, masks, names))
    seconds = time.perf_counter() - start
    atomic_write_json(out_dir / "results_segm.json", segm)
    atomic_write_json(out_dir / "results_bbox.json", bbox)
    summary = {"split": split, "images": len(image_ids), "checkpoint": str(ckpt_path),
               "masks": ckpt.extra.get("masks"), "seconds": round(seconds, 2), "ap": {}}
    if score:
        evaluated = [c for c in categories[1:] if c >= 0]
        for iou_type, results in (("segm", segm), ("bbox", bbox)):
            summary["ap"][iou_type] = evaluate_instances(gt, results, image_ids=image_ids,
                                                         category_ids=evaluated,
                                                         iou_type=iou_type)
    atomic_write_json(out_dir / "metrics.json", json_safe(summary))
    print(f"Wrote {out_dir / 'results_segm.json'} and {out_dir / 'results_bbox.json'} "
          f"({len(segm)} detections on {len(image_ids)} images).")
    if vis_n:
        print(f"Pictures of the predicted instances: {out_dir / 'vis'}")
    if not score:
        print(f"'{split}' has no annotations: nothing to score (upload the results files).")
    for iou_type, stats in summary["ap"].items():
        print(f"{iou_type} {format_ap(stats)}")
    return summary
