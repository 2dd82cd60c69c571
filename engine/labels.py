"""Label sets from elsewhere than stage 2, and the label-folder commands of labels.py.

`index_folder` makes a folder of label maps (predict.py's outputs on a dataset's images, e.g.
stage 3's predictions on its own training images, a second and cleaner round of masks) into a
label set (data/labelset.py) by joining each map with the image's boxes from the dataset: each
box's instance is its pixels of its class (where boxes of one class overlap, the smaller box's),
and the same signals as stage 2's are computed. Exporters and the review page then read it as
they read stage 2's folders. Boxes become pixel ranges by truncation (`pixel_edges`), not
through stage 2's default float32 round trip (DATA.BOX_ARITHMETIC reference), which moves a few
box edges by one pixel.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from utils.errors import BanaError

if TYPE_CHECKING:
    from engine.config import Config

PREDICTION = "prediction"


def find_label_map(folder: Path, data, split: str, image_id: str) -> Path | None:
    """The label map of an image in a folder of maps: `<id>.png` (stage 2's naming) or
    `<image stem>.png` (predict.py's)."""
    for name in (data.label_name(image_id), f"{data.image_path(split, image_id).stem}.png"):
        if (folder / name).is_file():
            return folder / name
    return None


def index_folder(cfg: Config, folder, variant: str = PREDICTION, progress: bool = True) -> Path:
    """Write records/ and labelset.json for the label maps in `folder` of the images of
    cfg.DATA.SPLIT (boxes from cfg's dataset); returns the manifest. Every image must have its
    map (checked first); a record newer than its map is kept (a rerun after new predictions
    redoes exactly those images)."""
    from tqdm import tqdm

    from data.base import clip_boxes
    from data.datasets import open_data
    from data.labelset import image_record, record_path, relative_name, write_manifest
    from engine.label_quality import label_warnings, signals
    from utils.io import atomic_write_json, read_image_size, read_label_png

    folder, split = Path(folder), cfg.DATA.SPLIT
    if not folder.is_dir():
        raise BanaError(f"--labels {folder} is not a folder of label maps.")
    data = open_data(cfg)
    ids = list(data.split_ids(split))
    maps = {i: find_label_map(folder, data, split, i) for i in ids}
    missing = [i for i, p in maps.items() if p is None]
    if missing:
        raise BanaError(f"{len(missing)} of {len(ids)} images of split '{split}' have no label "
                        f"map in {folder} (e.g. {missing[0]}: looked for "
                        f"{data.label_name(missing[0])} and "
                        f"{data.image_path(split, missing[0]).stem}.png): predict them first "
                        f"(`python predict.py ... --input <the split's images> --output "
                        f"{folder}`), or set DATA.SPLIT to the split they were predicted for.")
    for image_id in tqdm(ids, desc="index", unit="img", disable=not progress,
                         dynamic_ncols=True):
        out = record_path(folder, image_id)
        image_path = data.image_path(split, image_id)
        height, width = read_image_size(image_path, exif=True)
        ann = data.annotation(split, image_id)
        boxes, keep = clip_boxes(ann.boxes, height, width)
        if _still_valid(out, maps[image_id], folder, variant, boxes[keep], ann.classes[keep]):
            continue
        label = read_label_png(maps[image_id], len(data.classes), "label map", (height, width),
                               "predict it again for this image")
        atomic_write_json(out, image_record(
            image_id, relative_name(image_path, data.root), boxes[keep], ann.classes[keep],
            {variant: label}, {variant: maps[image_id].relative_to(folder).as_posix()}))
    manifest = dict(classes=data.classes, category_ids=data.category_ids(split), split=split,
                    root=data.root, variants=(variant,), ids=ids, made_by="labels.py index")
    from data.labelset import LabelSet

    labels = LabelSet(write_manifest(folder, **manifest).parent)
    sig = signals(labels.records(), data.classes)
    return write_manifest(folder, **manifest,
                          quality={"signals": sig, "warnings": label_warnings(sig)})


def _still_valid(record: Path, label_map: Path, folder: Path, variant: str, boxes,
                 classes) -> bool:
    """A record written before is kept when it is newer than its label map and was made for the
    same variant name and the same boxes (an edited annotation, or another --variant, redoes
    it)."""
    import json

    from utils.boxes import pixel_ranges

    if not record.is_file() or record.stat().st_mtime < label_map.stat().st_mtime:
        return False
    try:
        rec = json.loads(record.read_text())
    except ValueError:
        return False
    height, width = rec.get("height", 0), rec.get("width", 0)
    return (rec.get("labels") == {variant: label_map.relative_to(folder).as_posix()}
            and rec.get("boxes") == pixel_ranges(boxes, height, width).tolist()
            and rec.get("classes") == [int(c) for c in classes])


def gt_reader(data, split: str):
    """A callable id -> ground-truth label map or None (the review page's GT) of a dataset
    (`data.base.DatasetFormat`); None without one."""
    if data is None:
        return None
    with_gt = set(data.gt_ids(split))
    return lambda image_id: data.gt_label(split, image_id) if image_id in with_gt else None


def read_exclusions(path, known_ids) -> dict[str, list[int] | None]:
    """The exclusion list of DATA.EXCLUDE (the review page's download, format in
    engine/review.py): {image id: None (the whole image) or the box indices marked}. An id the
    split does not have is an error that names it (a list from another split or dataset)."""
    from engine.review import read_exclusions as parse

    path = Path(path)
    if not path.is_file():
        raise BanaError(f"DATA.EXCLUDE {path}: file not found (the review page's 'Download "
                        "exclusion list' writes one; set DATA.EXCLUDE '' to train on every "
                        "image).")
    try:
        listed = parse(path, list(known_ids))
    except ValueError as err:
        raise BanaError(f"DATA.EXCLUDE: {err}. Is it the list of another split or dataset? "
                        "Fix or remove that line.") from None
    return {k: None if v is None else sorted(v) for k, v in listed.items()}


def excluded_ids(exclusions: dict) -> set[str]:
    """The images stage 3 leaves out: those marked whole, and those with a marked box (the
    simple, safe choice: training on the image's other boxes would need its label maps to
    mark that box's pixels 'ignore', which they do not)."""
    return set(exclusions)
