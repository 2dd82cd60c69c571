"""The review page of a label folder: look at the worst labels first, mark the bad ones, and hand
the marks to stage 3 as DATA.EXCLUDE.

`build_review(labels)` writes <label folder>/review/, a static page that opens from disk in any
browser, offline (no server, no CDN, no framework):
    index.html          the page: styles and script inline
    cards-<hash>.js     the card data, one assignment `window.BANA_REVIEW = {...};` (a script,
                        because a browser refuses fetch() of a local JSON file under file://)
    thumbs/<name>-<hash>.jpg   one strip per image: the image with its boxes | Y_crf | Y_ret
                        | ground truth (where `gt` gives one), each panel at most PANEL px a side

One card per image, worst first: by the IoU of Y_crf against the ground truth where there is some,
else by the lowest box fill of Y_crf (engine/label_quality.py's `image_signals`: a box that its
label leaves mostly background has probably lost its object). The page re-sorts by every number,
filters by class, searches ids and shows one page of cards at a time, so 10,000 images open in
seconds.

A thumbnail's name holds a hash of what it shows (the record, the label files, the image file's size
and time, the ground truth), so a rebuild reuses the thumbnails of unchanged images (and those a
stopped build drew), redraws those of relabelled ones and deletes the stale ones. Every file is
written to a temporary file and renamed; the page switches to the new data by one rename of
index.html, and nothing the old page uses is deleted before that, so a killed build leaves the
previous page whole.

The exclusion list (the page's "Download" button; stage 3 reads it as DATA.EXCLUDE)
-----------------------------------------------------------------------------------------
UTF-8 text, one line per excluded image or set of boxes:
    # a comment (a line whose first character is '#'); blank lines are ignored too
    2008_000123               the whole image: stage 3 does not train on it
    2008_000456<TAB>0 2       boxes 0 and 2 of the image (0-based, the order of the record's
                              `boxes`, as the page numbers them): stage 3 leaves the whole
                              image out (DATA.EXCLUDE), since its label maps hold no box
The id is the image id exactly as in the label folder's records. The page separates the id from the
box indices with a TAB, because ids may hold spaces; a person writing the file by hand may use any
whitespace when the id has none. Lines of one id add up; a whole-image line wins over box lines.
`read_exclusions` is the reference reader.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from data.labelset import LabelSet
from engine.label_quality import image_signals

# Longest side of one thumbnail panel, px; a strip holds at most 4 panels and 3 gaps.
PANEL = 192
GAP = 4
MAX_PANELS = 4
JPEG_QUALITY = 82
# Changing how thumbnails are drawn changes this, so a rebuild redraws every one.
DRAW_VERSION = "1"
DATA_VAR = "BANA_REVIEW"
PAGE = "index.html"
THUMBS = "thumbs"
# The page's markup, styles and script; "@DATA@" stands for the data file's name.
TEMPLATE = Path(__file__).with_name("review_page.html")


# --- the exclusion list ------------------------------------------------------------------------

def read_exclusions(path, ids=None) -> dict[str, set[int] | None]:
    """{image id: None (the whole image) or the set of excluded box indices} of an exclusion list
    (see the module doc). `ids`, the known image ids, settles a hand-written line whose id holds
    spaces ("a b 3": id "a b 3" if it is known, else id "a b", box 3)."""
    known = set(ids) if ids is not None else set()
    excluded: dict[str, set[int] | None] = {}
    # utf-8-sig: a file saved by a Windows editor starts with a byte-order mark.
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" in line:
            image_id, rest = line.split("\t", 1)
            tokens = rest.split()
        else:
            line = line.strip()
            if line in known:
                image_id, tokens = line, []
            else:
                words = line.split()
                k = len(words)
                while k > 1 and re.fullmatch(r"\d+", words[k - 1]):
                    k -= 1
                image_id, tokens = " ".join(words[:k]), words[k:]
        bad = [t for t in tokens if not re.fullmatch(r"\d+", t)]
        if bad:
            raise ValueError(f"{path}, line {number}: box indices must be whole numbers >= 0, "
                             f"found {' '.join(bad)!r} after image id {image_id!r}")
        if ids is not None and image_id not in known:
            raise ValueError(f"{path}, line {number}: image id {image_id!r} is not in the label "
                             "set (an exclusion list names ids as the review page shows them)")
        boxes = {int(t) for t in tokens}
        if not boxes or excluded.get(image_id, set()) is None:
            excluded[image_id] = None
        else:
            excluded.setdefault(image_id, set()).update(boxes)
    return excluded


# --- thumbnails --------------------------------------------------------------------------------

def _fit(height: int, width: int, side: int = PANEL) -> tuple[int, int]:
    scale = min(1.0, side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _overlay(image: np.ndarray, label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """uint8 (h, w, 3): the image dimmed where `label` is background and tinted with the class
    colour (the void colour for 255) elsewhere, so the label and what it covers are both seen."""
    out = image.astype(np.float32) * 0.45
    objects = label > 0
    out[objects] = image[objects] * 0.4 + palette[label[objects]] * 0.6
    return out.round().astype(np.uint8)


def _draw_boxes(panel: np.ndarray, boxes, classes, scale_y: float, scale_x: float,
                palette: np.ndarray) -> None:
    """Box outlines (1 px, the class colour) drawn into `panel` in place."""
    h, w = panel.shape[:2]
    for (x1, y1, x2, y2), c in zip(boxes, classes):
        top, bottom = int(y1 * scale_y), max(int(round(y2 * scale_y)) - 1, int(y1 * scale_y))
        left, right = int(x1 * scale_x), max(int(round(x2 * scale_x)) - 1, int(x1 * scale_x))
        top, bottom = min(top, h - 1), min(bottom, h - 1)
        left, right = min(left, w - 1), min(right, w - 1)
        colour = palette[c] if c else np.array([255, 255, 255], np.uint8)
        panel[top, left:right + 1] = colour
        panel[bottom, left:right + 1] = colour
        panel[top:bottom + 1, left] = colour
        panel[top:bottom + 1, right] = colour


def render_strip(image: np.ndarray, maps: list[np.ndarray], boxes, classes) -> np.ndarray:
    """uint8 (h, W', 3): the image with its boxes, then each label map (uint8 (H, W)) over the
    image, each panel scaled to fit PANEL x PANEL (never enlarged), white gaps between them."""
    from PIL import Image

    from utils.palette import voc_palette

    palette = voc_palette()
    height, width = image.shape[:2]
    h, w = _fit(height, width)
    small = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    # Labels are class ids: NEAREST keeps them ids (any other filter invents classes at edges).
    panels = [small.copy()] + [
        _overlay(small, np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST)), palette)
        for m in maps]
    for p in panels:
        _draw_boxes(p, boxes, classes, h / height, w / width, palette)
    white = np.full((h, GAP, 3), 255, np.uint8)
    parts = []
    for k, p in enumerate(panels):
        parts += [white, p] if k else [p]
    return np.concatenate(parts, axis=1)


# --- per-image numbers -------------------------------------------------------------------------

def image_iou(label: np.ndarray, gt: np.ndarray) -> float:
    """The image's mean IoU of `label` against `gt` (uint8 (H, W), 255 = void, not counted) over
    the classes present in either, background included."""
    valid = gt != 255
    a, b = label[valid], gt[valid]
    present = np.union1d(np.unique(a), np.unique(b))
    if not len(present):
        return 1.0
    ious = [np.sum((a == c) & (b == c)) / np.sum((a == c) | (b == c)) for c in present]
    return float(np.mean(ious))


def _safe_name(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", image_id)[:60].lstrip(".") or "image"


def _content_key(labels: LabelSet, record: dict, shown: list[str], gt_map) -> str:
    """A hash of everything a card shows: a relabelled image gets a new thumbnail name."""
    digest = hashlib.sha256(f"draw {DRAW_VERSION} {PANEL} {GAP} {JPEG_QUALITY}\n".encode())
    digest.update(json.dumps(record, sort_keys=True).encode())
    for variant in shown:
        digest.update((labels.folder / record["labels"][variant]).read_bytes())
    image = labels.image_path(record)
    stat = image.stat()
    digest.update(f"{image} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    if gt_map is not None:
        digest.update(b"gt" + np.ascontiguousarray(gt_map).tobytes())
    return digest.hexdigest()[:12]


def _shown_variants(labels: LabelSet) -> list[str]:
    """The label variants a card shows: Y_crf and Y_ret, or what a folder of another kind holds."""
    preferred = [v for v in ("Y_crf", "Y_ret") if v in labels.variants]
    rest = [v for v in labels.variants if v not in preferred and v != "Y_box"]
    return (preferred + rest)[:MAX_PANELS - 1] or list(labels.variants[:1])


def _card(labels: LabelSet, record: dict, shown: list[str], gt_map, thumb: str,
          strip_shape) -> dict:
    from utils.io import read_index_png

    main = shown[0]
    sig = image_signals(record, main)
    fills = {v: record["fill"].get(v) for v in shown}
    numbers = {"fill_min": sig["fill_min"], "fill_mean": sig["fill_mean"],
               "agreement": sig["agreement"], "lost": sig["lost"]}
    for v in shown[1:]:
        numbers[f"fill_min_{v}"] = image_signals(record, v)["fill_min"]
    numbers["boxes"] = len(record["boxes"])
    if gt_map is not None:
        for v in shown:
            label = read_index_png(labels.folder / record["labels"][v])
            numbers[f"iou_{v}"] = round(image_iou(label, gt_map), 4)
    h, w = _fit(record["height"], record["width"])
    return {"id": record["id"], "thumb": thumb, "size": [record["height"], record["width"]],
            "panel": [h, w], "strip": [int(strip_shape[0]), int(strip_shape[1])],
            "panels": ["image"] + shown + (["GT"] if gt_map is not None else []),
            "boxes": record["boxes"], "classes": record["classes"], "fill": fills,
            "agreement": record.get("agreement"), "numbers": numbers}


def _sort_key(card: dict, key: str):
    value = card["numbers"].get(key)
    return (value is None, value if value is not None else 0, card["id"])


# --- the build ---------------------------------------------------------------------------------

def _previous_cards(out_dir: Path) -> dict[str, dict]:
    """{thumbnail name: card} of the data files a previous (perhaps killed) build left."""
    cards = {}
    for path in sorted(out_dir.glob("cards-*.js")):
        text = path.read_text(encoding="utf-8")
        prefix = f"window.{DATA_VAR} = "
        if not text.startswith(prefix):
            continue
        try:
            data = json.loads(text[len(prefix):].rstrip().rstrip(";"))
        except ValueError:
            continue
        for card in data.get("cards", []):
            cards[card["thumb"]] = card
    return cards


def build_review(labels: LabelSet, out_dir: Path | None = None,
                 gt: Callable[[str], np.ndarray | None] | None = None,
                 progress: bool = True) -> Path:
    """Write (or update) the review page of `labels` into `out_dir` (default: the label folder's
    review/) and return the path of its index.html. `gt(image_id)` gives an image's ground-truth
    label map (uint8 (H, W), 255 = void) or None; with it, cards show the ground truth and the
    IoU of each variant, and the page opens sorted by the IoU of Y_crf."""
    from PIL import Image
    from tqdm import tqdm

    from utils.io import atomic_write_jpeg, atomic_write_text, read_image

    out_dir = Path(out_dir) if out_dir is not None else labels.folder / "review"
    thumbs = out_dir / THUMBS
    thumbs.mkdir(parents=True, exist_ok=True)
    previous = _previous_cards(out_dir)
    shown = _shown_variants(labels)
    cards, drawn = [], 0
    for record in tqdm(labels.records(), total=len(labels.ids), desc="review page",
                       unit="image", disable=not progress):
        gt_map = gt(record["id"]) if gt is not None else None
        key = _content_key(labels, record, shown, gt_map)
        thumb = f"{THUMBS}/{_safe_name(record['id'])}-{key}.jpg"
        old = previous.get(thumb)
        if (out_dir / thumb).is_file():
            if old is not None and old["id"] == record["id"]:
                cards.append(old)
                continue
            # Drawn by a build that was stopped before it wrote its page: keep the drawing.
            with Image.open(out_dir / thumb) as done:
                shape = done.height, done.width
            cards.append(_card(labels, record, shown, gt_map, thumb, shape))
            continue
        image = read_image(labels.image_path(record), exif=True)
        maps = [labels.label(record, v) for v in shown]
        if gt_map is not None:
            maps.append(gt_map)
        strip = render_strip(image, maps, record["boxes"], record["classes"])
        atomic_write_jpeg(out_dir / thumb, strip, quality=JPEG_QUALITY)
        cards.append(_card(labels, record, shown, gt_map, thumb, strip.shape))
        drawn += 1

    with_gt = any(f"iou_{shown[0]}" in c["numbers"] for c in cards)
    order = f"iou_{shown[0]}" if with_gt else "fill_min"
    cards.sort(key=lambda c: _sort_key(c, order))
    data = {"folder": str(labels.folder.resolve()), "split": labels.split,
            "classes": list(labels.classes), "variants": shown, "order": order, "gap": GAP,
            "warnings": labels.quality.get("warnings", []), "cards": cards}
    text = f"window.{DATA_VAR} = " + json.dumps(data, separators=(",", ":")) + ";\n"
    data_name = f"cards-{hashlib.sha256(text.encode()).hexdigest()[:12]}.js"
    atomic_write_text(out_dir / data_name, text)
    page = out_dir / PAGE
    # One rename switches the page to the new data; the old data and thumbnails go after it.
    atomic_write_text(page, TEMPLATE.read_text(encoding="utf-8").replace("@DATA@", data_name))

    keep = {c["thumb"] for c in cards}
    for path in thumbs.iterdir():
        if f"{THUMBS}/{path.name}" not in keep:
            path.unlink()
    for path in out_dir.glob("cards-*.js"):
        if path.name != data_name:
            path.unlink()
    print(f"Review page ({len(cards)} images, {drawn} thumbnails drawn, "
          f"{len(cards) - drawn} reused): {page}", flush=True)
    return page
