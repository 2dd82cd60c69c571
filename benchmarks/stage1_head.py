"""Cost of the stage-1 BAP head next to the backbone, and of the vectorised head next to loops,
for both ROI samplings: `reference` (the authors' sampling, the default) and `roi_align`.

Run from the repository root: `python -m benchmarks.stage1_head [--repeats 7]`. CPU only; the
batch is a VOC-like stage-1 batch scaled down (2 crops of 161 px, 3 boxes each). Timings are
interleaved (one repeat of each contender in turn) and the median is reported.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks._report import device_name, record
from models.zoo import ModelSpec, build
from tests.test_labeler import reference_head
from tests.test_reference_bap import slow_reference_logits

SAMPLINGS = ("reference", "roi_align")
# The per-box loop each vectorised head is checked against.
LOOPS = {"reference": slow_reference_logits, "roi_align": reference_head}


def _voc_like_batch(batch, crop, boxes_per_image, generator):
    """Random images, boxes (x1, y1, x2, y2, class) and the bg masks they imply (1 outside boxes)."""
    images = torch.rand(batch, 3, crop, crop, generator=generator) * 255
    boxes, masks = [], []
    for _ in range(batch):
        corners = torch.rand(boxes_per_image, 2, 2, generator=generator) * crop
        lo, hi = corners.min(1).values, corners.max(1).values
        classes = torch.randint(1, 21, (boxes_per_image, 1), generator=generator).float()
        image_boxes = torch.cat([lo, hi, classes], 1)
        mask = torch.ones(1, crop, crop)
        for x1, y1, x2, y2, _ in image_boxes.tolist():
            mask[0, int(y1):int(y2), int(x1):int(x2)] = 0
        boxes.append(image_boxes)
        masks.append(mask)
    return images, boxes, torch.stack(masks)


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved_medians(contenders, repeats):
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(_timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def head_vs_backbone(name, batch, crop, repeats, generator):
    labelers = {m: build(ModelSpec("labeler", name, 21, roi_sampling=m)).train() for m in SAMPLINGS}
    backbone = labelers["reference"].backbone
    images, boxes, bg_mask = _voc_like_batch(batch, crop, 3, generator)
    with torch.no_grad():
        features = backbone(images)

    def backbone_step():
        out = backbone(images)
        out.backward(torch.ones_like(out))

    def head_step(mode):
        def step():
            leaf = features.detach().requires_grad_()
            logits, targets = labelers[mode].head(leaf, boxes, bg_mask)
            F.cross_entropy(logits, targets).backward()
        return step

    contenders = {"backbone": backbone_step, **{m: head_step(m) for m in SAMPLINGS}}
    for m in SAMPLINGS:
        contenders[m]()  # warm-up
    medians = _interleaved_medians(contenders, repeats)
    heads = " | ".join(f"{m} head {medians[m] * 1e3:6.1f} ms = {medians[m] / medians['backbone']:.3f}"
                       f" of the backbone" for m in SAMPLINGS)
    print(f"{name:>6} batch {batch}x{crop}px, features {tuple(features.shape[1:])}, fwd+bwd: "
          f"backbone {medians['backbone'] * 1e3:7.1f} ms | {heads}")
    for m in SAMPLINGS:
        record("stage1_head", f"{m} BAP head / {name} backbone, fwd+bwd, batch {batch}x{crop}px",
               100 * medians[m] / medians["backbone"], "%", device_name(torch.device("cpu")),
               "python -m benchmarks.stage1_head")


def vectorised_vs_loops(num_boxes, repeats, generator):
    features = torch.rand(2, 128, 21, 21, generator=generator)
    _, boxes, bg_mask = _voc_like_batch(2, 161, num_boxes // 2, generator)
    for mode in SAMPLINGS:
        labeler = build(ModelSpec("labeler", "tiny", 21, roi_sampling=mode)).eval()

        def vectorised():
            with torch.no_grad():
                return labeler.head(features, boxes, bg_mask)

        def loops():
            with torch.no_grad():
                return LOOPS[mode](labeler, features, boxes, bg_mask)

        (fast_logits, fast_targets), (slow_logits, slow_targets) = vectorised(), loops()
        assert torch.equal(fast_targets, slow_targets)
        medians = _interleaved_medians({"vectorised": vectorised, "loops": loops}, repeats)
        print(f"{mode:>9} head forward, {num_boxes} boxes on 2x128x21x21 features: vectorised "
              f"{medians['vectorised'] * 1e3:.2f} ms | per-box loops "
              f"{medians['loops'] * 1e3:.0f} ms"
              f" | speed-up {medians['loops'] / medians['vectorised']:.0f}x | max |logit diff| "
              f"{(fast_logits - slow_logits).abs().max():.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    head_vs_backbone("vgg16", 2, 161, args.repeats, generator)
    head_vs_backbone("tiny", 2, 161, args.repeats, generator)
    vectorised_vs_loops(50, max(3, args.repeats // 2), generator)


if __name__ == "__main__":
    main()
