"""The review page (engine/review.py): the builder on a small label set written from the synthetic
tree's ground truth, and the page itself in headless Chromium (skipped, saying why, where Chromium,
chromedriver or selenium is absent).

The label set: Y_crf = GT with the void band as background, then damaged by image (image k loses
the lower k/12 of its object rows, so the images' lowest box fills differ); Y_ret = Y_crf with its
top quarter erased; Y_box the filled boxes."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.labelset import LabelSet, image_record, record_path, write_manifest
from data.voc import parse_annotation
from engine.label_quality import image_signals
from engine.review import (MAX_PANELS, PANEL, GAP, THUMBS, build_review, read_exclusions)
from utils.boxes import fill_boxes
from utils.io import atomic_write_json, atomic_write_png, read_index_png
from utils.palette import VOC_CLASSES, voc_palette


def write_label_set(voc: Path, folder: Path, split: str = "train") -> LabelSet:
    ids = (voc / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()
    for k, i in enumerate(ids):
        boxes, classes = parse_annotation(voc / "Annotations" / f"{i}.xml")
        gt = read_index_png(voc / "SegmentationClassAug" / f"{i}.png")
        y_crf = np.where(gt == 255, 0, gt).astype(np.uint8)
        rows = np.nonzero((y_crf > 0).any(1))[0]
        if len(rows) and k:
            cut = rows[-1] + 1 - (rows[-1] + 1 - rows[0]) * k // len(ids)
            y_crf[cut:] = 0
        y_ret = y_crf.copy()
        y_ret[: y_ret.shape[0] // 4] = 0
        box5 = np.c_[boxes, classes]
        maps = {"Y_crf": y_crf, "Y_ret": y_ret, "Y_box": fill_boxes(box5, *gt.shape)}
        for v, m in maps.items():
            atomic_write_png(folder / v / f"{i}.png", m, voc_palette())
        record = image_record(i, f"JPEGImages/{i}.jpg", boxes, classes, maps,
                              {v: f"{v}/{i}.png" for v in maps})
        atomic_write_json(record_path(folder, i), record)
    write_manifest(folder, classes=VOC_CLASSES, category_ids=list(range(21)), split=split,
                   root=voc, variants=("Y_crf", "Y_ret", "Y_box"), ids=ids, made_by="test")
    return LabelSet(folder)


def gt_reader(voc: Path):
    return lambda i: read_index_png(voc / "SegmentationClassAug" / f"{i}.png")


def page_data(page: Path) -> dict:
    """The card data the page loads (the script its index.html names)."""
    name = re.search(r'<script src="(cards-[0-9a-f]+\.js)">', page.read_text()).group(1)
    text = (page.parent / name).read_text()
    return json.loads(text[text.index("=") + 1:].rstrip().rstrip(";"))


@pytest.fixture
def labels(synthetic_voc, tmp_path) -> LabelSet:
    return write_label_set(synthetic_voc, tmp_path / "Generation")


def test_every_image_has_a_card_and_a_bounded_jpeg(labels, capsys):
    page = build_review(labels)
    assert page == labels.folder / "review" / "index.html"
    assert str(page) in capsys.readouterr().out
    data = page_data(page)
    assert sorted(c["id"] for c in data["cards"]) == sorted(labels.ids)
    for card in data["cards"]:
        thumb = page.parent / card["thumb"]
        with Image.open(thumb) as im:
            assert im.format == "JPEG"
            # image | Y_crf | Y_ret; each panel within PANEL (64 px images are not enlarged)
            assert im.size == (3 * 64 + 2 * GAP, 64) == tuple(card["strip"][::-1])
            assert im.height <= PANEL and im.width <= MAX_PANELS * PANEL + (MAX_PANELS - 1) * GAP
    assert {p.name for p in (page.parent / THUMBS).iterdir()} == {
        Path(c["thumb"]).name for c in data["cards"]}


def test_large_images_are_shrunk_to_the_panel_size(synthetic_voc, tmp_path):
    from data.synthetic import make_synthetic_voc

    voc = tmp_path / "VOC"
    make_synthetic_voc(voc, n_train=2, n_val=1, size=400, seed=1)
    page = build_review(write_label_set(voc, tmp_path / "labels"), gt=gt_reader(voc),
                        progress=False)
    for card in page_data(page)["cards"]:
        with Image.open(page.parent / card["thumb"]) as im:
            assert im.size == (4 * PANEL + 3 * GAP, PANEL)  # image, Y_crf, Y_ret, GT


def test_cards_are_worst_first_by_the_lowest_box_fill(labels):
    data = page_data(build_review(labels, progress=False))
    assert data["order"] == "fill_min"
    fills = [c["numbers"]["fill_min"] for c in data["cards"]]
    assert fills == sorted(fills)
    expected = sorted(labels.records(), key=lambda r: (image_signals(r)["fill_min"], r["id"]))
    assert [c["id"] for c in data["cards"]] == [r["id"] for r in expected]
    assert fills[0] < fills[-1]


def test_with_ground_truth_cards_are_worst_first_by_iou(labels, synthetic_voc):
    data = page_data(build_review(labels, gt=gt_reader(synthetic_voc), progress=False))
    assert data["order"] == "iou_Y_crf"
    ious = [c["numbers"]["iou_Y_crf"] for c in data["cards"]]
    assert ious == sorted(ious) and ious[0] < ious[-1] <= 1
    assert all(c["panels"] == ["image", "Y_crf", "Y_ret", "GT"] for c in data["cards"])


def test_image_iou_by_hand():
    from engine.review import image_iou

    # gt: 4 pixels of class 1, 4 of background, 1 void. label: 3 of the class-1 pixels, and one
    # background pixel as class 1. Class 1: 3 / 5; background: 3 / 5 -> mean 0.6; the void
    # pixel is not counted whatever the label says there.
    gt = np.array([1, 1, 1, 1, 0, 0, 0, 0, 255], np.uint8).reshape(3, 3)
    label = np.array([1, 1, 1, 0, 1, 0, 0, 0, 1], np.uint8).reshape(3, 3)
    assert image_iou(label, gt) == pytest.approx(0.6)


def test_rebuild_redraws_only_the_relabelled_image(labels):
    page = build_review(labels, progress=False)
    before = {c["id"]: c["thumb"] for c in page_data(page)["cards"]}
    times = {i: (page.parent / t).stat().st_mtime_ns for i, t in before.items()}
    changed = labels.ids[3]
    path = labels.folder / "Y_crf" / f"{changed}.png"
    relabelled = read_index_png(path)
    relabelled[:] = 0
    atomic_write_png(path, relabelled, voc_palette())
    record = json.loads(record_path(labels.folder, changed).read_text())
    record["fill"]["Y_crf"] = [0.0] * len(record["boxes"])
    atomic_write_json(record_path(labels.folder, changed), record)
    time.sleep(0.01)

    data = page_data(build_review(LabelSet(labels.folder), progress=False))
    after = {c["id"]: c["thumb"] for c in data["cards"]}
    assert [i for i in before if before[i] != after[i]] == [changed]
    for i, thumb in after.items():
        if i != changed:
            assert (page.parent / thumb).stat().st_mtime_ns == times[i]  # reused, not redrawn
    assert not (page.parent / before[changed]).exists()  # the stale thumbnail is gone
    assert data["cards"][0]["id"] == changed  # now the worst
    assert len(list((page.parent / THUMBS).iterdir())) == len(labels.ids)
    assert len(list(page.parent.glob("cards-*.js"))) == 1


def test_a_killed_build_leaves_the_previous_page_whole(labels, monkeypatch, tmp_path):
    import engine.review

    page = build_review(labels, progress=False)
    html, data = page.read_bytes(), page_data(page)
    for i in labels.ids:  # every image relabelled: every thumbnail must be redrawn
        record = json.loads(record_path(labels.folder, i).read_text())
        record["agreement"] = [0.5] * len(record["boxes"])
        atomic_write_json(record_path(labels.folder, i), record)
    drawn = []

    def dies_on_the_fifth(*args, **kwargs):
        if len(drawn) == 4:
            raise KeyboardInterrupt
        drawn.append(1)
        return render_strip(*args, **kwargs)

    render_strip = engine.review.render_strip
    monkeypatch.setattr(engine.review, "render_strip", dies_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        build_review(LabelSet(labels.folder), progress=False)
    assert page.read_bytes() == html and page_data(page) == data
    for card in data["cards"]:
        assert (page.parent / card["thumb"]).is_file()
    assert not list(page.parent.rglob("*.tmp"))

    # The rerun resumes: the four thumbnails drawn before the kill are kept, not redrawn.
    kept = {p.name: p.stat().st_mtime_ns for p in (page.parent / THUMBS).iterdir()}
    assert len(kept) == len(labels.ids) + 4
    monkeypatch.setattr(engine.review, "render_strip", render_strip)
    new = page_data(build_review(LabelSet(labels.folder), progress=False))
    assert all(c["agreement"] == [0.5] * len(c["boxes"]) for c in new["cards"])
    now = {p.name: p.stat().st_mtime_ns for p in (page.parent / THUMBS).iterdir()}
    assert len(now) == len(labels.ids) and len(set(now) - set(kept)) == len(labels.ids) - 4
    assert all(kept[name] == now[name] for name in set(now) & set(kept))
    fresh = build_review(LabelSet(labels.folder), tmp_path / "fresh", progress=False)
    assert new["cards"] == page_data(fresh)["cards"]  # as an uninterrupted build makes them


def test_odd_ids_get_safe_thumbnail_names(synthetic_voc, tmp_path):
    labels = write_label_set(synthetic_voc, tmp_path / "Generation")
    # An id with a space, a slash and a quote: the record keeps it, the file name must not.
    odd = 'a b/c"d'
    record = labels.record(labels.ids[0])
    record["id"] = odd
    manifest = json.loads((labels.folder / "labelset.json").read_text())
    manifest["ids"] = [odd]
    atomic_write_json(labels.folder / "labelset.json", manifest)
    odd_labels = LabelSet(labels.folder)
    odd_labels.record = lambda i: record  # records/<id>.json cannot hold a slash in its name
    data = page_data(build_review(odd_labels, progress=False))
    (card,) = data["cards"]
    assert card["id"] == odd
    assert re.fullmatch(r"thumbs/a_b_c_d-[0-9a-f]{12}\.jpg", card["thumb"])


def test_labels_review_command_takes_the_ground_truth_from_a_config(labels, synthetic_voc,
                                                                    tmp_path, run_script):
    """With --config-file the page shows the dataset's ground truth and opens sorted by IoU;
    without it, by the no-ground-truth signal."""
    proc = run_script("labels.py", "review", "--labels", str(labels.folder), "--out",
                      str(tmp_path / "gt"), "--config-file", "configs/demo/stage2.yml",
                      "--opts", "DATA.ROOT", str(synthetic_voc), "DATA.SPLIT", labels.split)
    assert proc.returncode == 0, proc.stderr
    data = page_data(tmp_path / "gt" / "index.html")
    assert data["order"] == "iou_Y_crf" and all("GT" in c["panels"] for c in data["cards"])
    proc = run_script("labels.py", "review", "--labels", str(labels.folder), "--out",
                      str(tmp_path / "nogt"))
    data = page_data(tmp_path / "nogt" / "index.html")
    assert data["order"] != "iou_Y_crf" and not any("GT" in c["panels"] for c in data["cards"])


def test_labels_review_command_writes_the_page_where_asked(labels, tmp_path, run_script):
    proc = run_script("labels.py", "review", "--labels", str(labels.folder), "--out",
                      str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r" / "index.html").is_file()
    assert str(tmp_path / "r" / "index.html") in proc.stdout


def test_read_exclusions(tmp_path):
    path = tmp_path / "exclude.txt"
    path.write_text("# comment\n\n2008_000123\n2008_000456\t0 2\n  # indented comment\n"
                    "a b\t1\nhand 3 4\n2008_000456\t5\nwhole\twith\n")
    with pytest.raises(ValueError, match="line 9: box indices must be whole numbers"):
        read_exclusions(path)
    path.write_text(path.read_text().replace("whole\twith\n", "2008_000123\t7\n"))
    assert read_exclusions(path) == {"2008_000123": None, "2008_000456": {0, 2, 5},
                                     "a b": {1}, "hand": {3, 4}}
    assert read_exclusions(path, ids=["2008_000123", "2008_000456", "a b", "hand 3 4"]) == {
        "2008_000123": None, "2008_000456": {0, 2, 5}, "a b": {1}, "hand 3 4": None}
    with pytest.raises(ValueError, match="'hand' is not in the label set"):
        read_exclusions(path, ids=["2008_000123", "2008_000456", "a b"])


# --- the page in a browser ---------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is absent (apt-get install chromium chromium-driver)"
    return None


def start_chromium(downloads: Path, width: int = 1400, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads), "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))
def test_the_page_in_headless_chromium(labels, synthetic_voc, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    page = build_review(labels, gt=gt_reader(synthetic_voc), progress=False)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = start_chromium(downloads)
    try:
        driver.get(page.as_uri())
        cards = lambda: driver.find_elements(By.CSS_SELECTOR, "article.card")  # noqa: E731
        ids = lambda: [c.get_attribute("data-id") for c in cards()]  # noqa: E731

        def all_thumbnails_loaded():
            WebDriverWait(driver, 10).until(lambda d: d.execute_script(
                "return [...document.images].every(i => i.complete)"))
            widths = driver.execute_script(
                "return [...document.images].map(i => i.naturalWidth)")
            assert widths and all(w > 0 for w in widths), widths

        # Worst first by IoU, all 12 on one page; then 10 per page: two pages, 12 cards seen.
        assert len(cards()) == len(labels.ids) == 12
        all_thumbnails_loaded()
        iou_order = ids()
        Select(driver.find_element(By.ID, "per-page")).select_by_visible_text("10")
        assert ids() == iou_order[:10]
        all_thumbnails_loaded()
        driver.find_element(By.ID, "next").click()
        assert ids() == iou_order[10:]
        all_thumbnails_loaded()
        Select(driver.find_element(By.ID, "per-page")).select_by_visible_text("50")

        # Sorting changes the order; reversing it reverses it.
        Select(driver.find_element(By.ID, "sort")).select_by_value("id")
        assert ids() == sorted(labels.ids) != iou_order
        driver.find_element(By.ID, "direction").click()
        assert ids() == sorted(labels.ids, reverse=True)
        Select(driver.find_element(By.ID, "sort")).select_by_value("fill_min")
        by_fill = sorted(labels.records(), key=lambda r: (image_signals(r)["fill_min"], r["id"]))
        assert ids() == [r["id"] for r in by_fill] != sorted(labels.ids)

        # The class filter keeps the images with a box of that class.
        records = {r["id"]: r for r in labels.records()}
        options = Select(driver.find_element(By.ID, "class")).options[1:]
        assert len(options) >= 2
        for option in options:
            c = int(option.get_attribute("value"))
            Select(driver.find_element(By.ID, "class")).select_by_value(str(c))
            want = {i for i, r in records.items() if c in r["classes"]}
            assert set(ids()) == want and 0 < len(want) < 12
        Select(driver.find_element(By.ID, "class")).select_by_value("")
        assert len(cards()) == 12

        # Search by id.
        driver.find_element(By.ID, "search").send_keys(labels.ids[5])
        assert ids() == [labels.ids[5]]
        driver.find_element(By.ID, "search").clear()
        driver.execute_script("document.getElementById('search')"
                              ".dispatchEvent(new Event('input'))")
        assert len(cards()) == 12

        # Mark the worst image whole and box 0 of the second (by clicking its number on the image).
        first, second = cards()[:2]
        bad_id, box_id = ids()[:2]
        first.find_element(By.CSS_SELECTOR, "input.bad-image").click()
        second.find_element(By.CSS_SELECTOR, ".strip .box[data-box='0'] span").click()
        assert second.find_element(By.CSS_SELECTOR, "input.bad-box[data-box='0']").is_selected()
        # The marks survive a reload (localStorage).
        driver.refresh()
        Select(driver.find_element(By.ID, "sort")).select_by_value("fill_min")
        assert cards()[0].find_element(By.CSS_SELECTOR, "input.bad-image").is_selected()
        driver.find_element(By.ID, "only-marked").click()
        assert ids() == [bad_id, box_id]

        driver.find_element(By.ID, "download").click()
        target = downloads / "exclude.txt"
        deadline = time.time() + 10
        while not target.is_file() and time.time() < deadline:
            time.sleep(0.1)
        text = target.read_text()
        body = [line for line in text.splitlines() if not line.startswith("#")]
        assert sorted(body) == sorted([bad_id, f"{box_id}\t0"])
        assert text.startswith("# BANA exclusion list")
        exclusions = tmp_path / "exclude.txt"
        shutil.copy(target, exclusions)
        assert read_exclusions(exclusions, labels.ids) == {bad_id: None, box_id: {0}}

        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
