"""Ultralytics YOLO segment layout (YOLOv8/11 `task=segment`).

    <out>/images/<split>/<name>.<ext>   the images: links to the originals (default) or copies
    <out>/labels/<split>/<name>.txt     per instance `class x1 y1 x2 y2 ...`, the class 0-based
                                        (our class index - 1), the polygon normalised by the
                                        image's width and height
    <out>/data.yaml                     path, train/val (the split), names {0: ..., ...}

Ultralytics finds a label by replacing the last `/images/` of the image's path with `/labels/`,
so the images must sit under images/ (a list of the originals' paths would point it at labels
beside them): linked by default (nothing copied), copied with images="copy".
One outline per instance: an instance in several parts is joined into one polygon by zero-width
bridges (exporters/polygons.py), holes are filled; an image without instances gets an empty file
(a background image, as Ultralytics expects).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

IMAGES = ("link", "copy")


def safe_name(image_id: str) -> str:
    """The file stem of an image id (ids may hold folders: "a/b" -> "a__b")."""
    return image_id.replace("/", "__").replace(os.sep, "__")


def _place_image(src: Path, dst: Path, how: str) -> None:
    if not src.is_file():
        from utils.errors import BanaError

        raise BanaError(f"YOLO-seg export: image {src} not found (the label set's dataset root "
                        "moved?): labelset.json's 'root' names where the images are.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    if how == "copy":
        shutil.copy2(src, dst)
    else:
        os.symlink(os.path.abspath(src), dst)


def export(labels, variant: str, out: Path, images: str = "link", split: str | None = None,
           val_split: str | None = None) -> Path:
    """split: the folder name under images/ and labels/ (default: the label set's split);
    val_split: what data.yaml names as val (default: the same split)."""
    import yaml

    from exporters.polygons import join_polygons, mask_polygons
    from utils.errors import BanaError
    from utils.io import atomic_write_text

    if images not in IMAGES:
        raise BanaError(f"YOLO-seg export: images {images!r}: choose one of {', '.join(IMAGES)}.")
    out, split = Path(out), split or labels.split
    for rec in labels.records():
        src = labels.image_path(rec)
        name = safe_name(rec["id"])
        _place_image(src, out / "images" / split / f"{name}{src.suffix}", images)
        lines = []
        height, width = rec["height"], rec["width"]
        for k, mask in enumerate(labels.instance_masks(rec, variant)):
            if not mask.any():
                continue
            polygon = join_polygons(mask_polygons(mask))
            xy = (polygon / [width, height]).clip(0, 1)
            lines.append(" ".join([str(rec["classes"][k] - 1)]
                                  + [f"{v:.6f}" for v in xy.ravel()]))
        atomic_write_text(out / "labels" / split / f"{name}.txt",
                          "".join(line + "\n" for line in lines))
    source = f"images/{split}"
    names = {k - 1: name for k, name in enumerate(labels.classes) if k}
    data = {"path": str(out.absolute()), "train": source,
            "val": source if val_split is None else f"images/{val_split}", "names": names}
    atomic_write_text(out / "data.yaml", yaml.safe_dump(data, sort_keys=False,
                                                          allow_unicode=True))
    return out / "data.yaml"
