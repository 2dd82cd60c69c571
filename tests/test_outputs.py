"""What a run may write over, and when an output counts as done (issue 22, classes 1 and 2).

- An output never replaces an input; a run folder's checkpoints, and another model's
  predictions or evaluation, are never replaced without an explicit flag; --resume with nothing
  to resume says what is there.
- "Already done" covers every input that shaped an output: the model and settings (predict.py),
  the image and its boxes (stage 2, predict.py), per image.
"""

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import load_config
from models.zoo import ModelSpec, build, checkpoint_entry
from utils.errors import BanaError
from utils.io import read_index_png
from utils.palette import VOC_CLASSES

REPO = Path(__file__).resolve().parent.parent


def stage3_checkpoint(path: Path, seed: int, classes=VOC_CLASSES) -> Path:
    """A stage-3 checkpoint as Stage3LitModule writes it, holding a random tiny DeepLab."""
    torch.manual_seed(seed)
    net = build(ModelSpec("deeplab", "tiny", len(classes), classes=tuple(classes)))
    cfg = load_config(REPO / "configs/demo/stage3.yml")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "bana": checkpoint_entry(3, net.spec, cfg.to_dict())}, path)
    return path


@pytest.fixture
def models(tmp_path):
    return stage3_checkpoint(tmp_path / "a.ckpt", 0), stage3_checkpoint(tmp_path / "b.ckpt", 1)


def predict(synthetic_voc, tmp_path, inputs, output, checkpoint, overwrite=False):
    from engine.predict import run

    cfg = load_config(REPO / "configs/demo/stage3.yml", [
        "DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR", str(tmp_path / "runs"), "TEST.SCALES",
        "[1.0]", "TEST.FLIP", "false", "TEST.CRF", "false"])
    return run(cfg, inputs=[str(p) for p in inputs], output=output, checkpoint=str(checkpoint),
               devices="cpu", workers=0, overwrite=overwrite)


def photos(synthetic_voc, folder: Path, n: int = 3, suffix: str = ".png") -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for image in sorted((synthetic_voc / "JPEGImages").glob("*.jpg"))[:n]:
        Image.open(image).save(folder / f"{image.stem}{suffix}")
    return folder


# --- class 1: outputs written over what they must not touch ---------------------------------------

@pytest.mark.parametrize("scales, flip, crf", [((1.0,), False, False),
                                                ((0.75, 1.0, 1.25), True, True)])
def test_segmenter_gives_predict_pys_labels(synthetic_voc, tmp_path, scales, flip, crf):
    """The Python API and predict.py agree byte for byte when Segmenter's scales / flip / crf
    are the config's TEST.SCALES / TEST.FLIP / TEST.CRF; the CRF parameters come from the
    checkpoint alone."""
    from engine.predict import Segmenter, run
    from utils.io import read_image

    ckpt = stage3_checkpoint(tmp_path / "m.ckpt", 3)
    inputs = sorted(photos(synthetic_voc, tmp_path / "in", n=2).iterdir())
    cfg = load_config(REPO / "configs/demo/stage3.yml", [
        "DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR", str(tmp_path / "runs"), "TEST.SCALES",
        str(list(scales)), "TEST.FLIP", str(flip).lower(), "TEST.CRF", str(crf).lower()])
    run(cfg, inputs=[str(p) for p in inputs], output=tmp_path / "out", checkpoint=str(ckpt),
        devices="cpu", workers=0)
    segment = Segmenter(ckpt, scales=scales, flip=flip, crf=crf)
    assert segment.classes == VOC_CLASSES
    for image in inputs:
        label = segment(read_image(image, exif=True))
        np.testing.assert_array_equal(label, read_index_png(tmp_path / "out" / f"{image.stem}.png"))


def test_predict_never_writes_over_an_input_image(synthetic_voc, tmp_path, models):
    folder = photos(synthetic_voc, tmp_path / "photos")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(BanaError, match=r"would write .*\.png over the input image"):
        predict(synthetic_voc, tmp_path, [folder], folder, models[0])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_predict_never_writes_over_a_file_it_did_not_write(synthetic_voc, tmp_path, models):
    folder = photos(synthetic_voc, tmp_path / "photos", suffix=".jpg")
    out = tmp_path / "out"
    out.mkdir()
    mine = out / f"{sorted(folder.iterdir())[0].stem}.png"
    mine.write_bytes(b"a user's own file")
    (out / "overlay").mkdir()
    (out / "overlay" / f"{mine.stem}.jpg").write_bytes(b"and another")
    with pytest.raises(BanaError, match=r"1 were not written by predict.py.*--overwrite"):
        predict(synthetic_voc, tmp_path, [folder], out, models[0])
    assert mine.read_bytes() == b"a user's own file"
    assert predict(synthetic_voc, tmp_path, [folder], out, models[0],
                   overwrite=True)["predicted_now"] == 3


def stage_cfg(stage, root, out, *opts):
    return load_config(REPO / f"configs/demo/stage{stage}.yml", [
        "DATA.ROOT", str(root), "OUTPUT_DIR", str(out), "DATA.CROP_SIZE", "48",
        "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0", "SOLVER.MAX_ITER", "2",
        "SOLVER.MILESTONES", "[1]", "SOLVER.CKPT_EVERY", "1", "SOLVER.VAL_EVERY", "2", *opts])


@pytest.fixture(scope="module")
def finished_stage1(synthetic_voc, tmp_path_factory):
    from engine.stage1 import run

    out = tmp_path_factory.mktemp("finished")
    run(stage_cfg(1, synthetic_voc, out), devices="cpu")
    return out


def test_a_fresh_run_is_refused_by_any_checkpoint_of_the_run(synthetic_voc, finished_stage1,
                                                             tmp_path):
    """The guard looks at the run, not at last.ckpt alone: with last.ckpt deleted, final.ckpt
    and config.yaml stay untouched."""
    from engine.stage1 import run

    out = Path(shutil.copytree(finished_stage1, tmp_path / "copy"))
    (out / "stage1/checkpoints/last.ckpt").unlink()
    before = {p: p.read_bytes() for p in (out / "stage1").rglob("*") if p.is_file()}
    with pytest.raises(BanaError, match=r"already holds a run \(final.ckpt \(iteration 2\)\).*"
                                        r"--overwrite"):
        run(stage_cfg(1, synthetic_voc, out, "SOLVER.LR", "0.5"), devices="cpu")
    assert {p: p.read_bytes() for p in (out / "stage1").rglob("*") if p.is_file()} == before


def test_resume_with_nothing_to_resume_says_what_is_there(synthetic_voc, finished_stage1,
                                                          tmp_path):
    from engine.stage1 import run

    out = Path(shutil.copytree(finished_stage1, tmp_path / "copy"))
    (out / "stage1/checkpoints/last.ckpt").unlink()
    final = (out / "stage1/checkpoints/final.ckpt").read_bytes()
    with pytest.raises(BanaError, match=r"--resume: .* has no checkpoints/last.ckpt to continue "
                                        r"from; it holds final.ckpt \(iteration 2\)"):
        run(stage_cfg(1, synthetic_voc, out), devices="cpu", resume=True)
    assert (out / "stage1/checkpoints/final.ckpt").read_bytes() == final
    with pytest.raises(BanaError, match=r"holds no checkpoint to continue from"):
        run(stage_cfg(1, synthetic_voc, tmp_path / "empty"), devices="cpu", resume=True)


def test_resuming_a_finished_run_says_it_is_finished(synthetic_voc, finished_stage1, tmp_path,
                                                     capsys):
    """All iterations trained and final.ckpt written: --resume trains nothing, touches nothing
    and says where the model is (it reported "0 iterations"-style scores of nothing before)."""
    from engine.stage1 import run

    out = Path(shutil.copytree(finished_stage1, tmp_path / "copy"))
    before = {p: p.read_bytes() for p in (out / "stage1/checkpoints").iterdir()}
    result = run(stage_cfg(1, synthetic_voc, out), devices="cpu", resume=True)
    assert result["already_finished"] and result["iterations"] == 2
    assert "already finished its 2 iterations; nothing to train" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in (out / "stage1/checkpoints").iterdir()} == before
    # Nor is its record rewritten by a --reconfigure that trains nothing.
    record = (out / "stage1/config.yaml").read_bytes()
    assert run(stage_cfg(1, synthetic_voc, out, "SOLVER.LR", "0.5"), devices="cpu", resume=True,
               reconfigure=True)["already_finished"]
    assert (out / "stage1/config.yaml").read_bytes() == record
    assert not list((out / "stage1").glob("config.*.yaml"))
    # Stopped between last.ckpt and final.ckpt: final.ckpt is written from last.ckpt.
    final = out / "stage1/checkpoints/final.ckpt"
    final.unlink()
    assert run(stage_cfg(1, synthetic_voc, out), devices="cpu", resume=True)["already_finished"]
    assert final.read_bytes() == (out / "stage1/checkpoints/last.ckpt").read_bytes()
    assert run(stage_cfg(1, synthetic_voc, out, "SOLVER.MAX_ITER", "3"), devices="cpu",
               resume=True, reconfigure=True)["iterations"] == 3


def test_overwrite_trains_a_finished_run_again(synthetic_voc, finished_stage1, tmp_path):
    from engine.stage1 import run

    out = Path(shutil.copytree(finished_stage1, tmp_path / "copy"))
    final = out / "stage1/checkpoints/final.ckpt"
    before = final.read_bytes()
    with pytest.raises(BanaError, match="give one"):
        run(stage_cfg(1, synthetic_voc, out), devices="cpu", resume=True, overwrite=True)
    assert run(stage_cfg(1, synthetic_voc, out, "SOLVER.LR", "0.5"), devices="cpu",
               overwrite=True)["iterations"] == 2
    assert final.read_bytes() != before


def test_evaluate_keeps_another_models_evaluation(synthetic_voc, tmp_path, models):
    from engine.evaluate import run

    cfg = load_config(REPO / "configs/demo/stage3.yml", [
        "DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR", str(tmp_path), "DATA.NUM_WORKERS", "0",
        "TEST.SCALES", "[1.0]", "TEST.FLIP", "false", "TEST.CRF", "false"])
    run(cfg, checkpoint=str(models[0]), devices="cpu", workers=0)
    run(cfg, checkpoint=str(models[0]), devices="cpu", workers=0)  # the same model: fine
    metrics = cfg.run_dir / "eval" / "metrics.json"
    before = metrics.read_bytes()
    with pytest.raises(BanaError, match=r"holds the evaluation of another model .*a.ckpt.*"
                                        r"--overwrite"):
        run(cfg, checkpoint=str(models[1]), devices="cpu", workers=0)
    assert metrics.read_bytes() == before
    run(cfg, checkpoint=str(models[1]), devices="cpu", workers=0, overwrite=True)
    assert "b.ckpt" in metrics.read_text()


# --- class 2: stale results reused under changed inputs --------------------------------------------

def test_predict_with_another_model_is_refused_then_redone(synthetic_voc, tmp_path, models):
    folder = photos(synthetic_voc, tmp_path / "photos", suffix=".jpg")
    out = tmp_path / "out"
    assert predict(synthetic_voc, tmp_path, [folder], out, models[0])["predicted_now"] == 3
    first = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert predict(synthetic_voc, tmp_path, [folder], out, models[0])["predicted_now"] == 0
    with pytest.raises(BanaError, match=r"3 were made with another model or other settings"):
        predict(synthetic_voc, tmp_path, [folder], out, models[1])
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == first
    assert predict(synthetic_voc, tmp_path, [folder], out, models[1],
                   overwrite=True)["predicted_now"] == 3
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} != first


def test_predict_with_other_settings_or_a_changed_image_is_not_done(synthetic_voc, tmp_path,
                                                                    models):
    from PIL import Image

    from engine.predict import run

    folder = photos(synthetic_voc, tmp_path / "photos", suffix=".jpg")
    out = tmp_path / "out"
    predict(synthetic_voc, tmp_path, [folder], out, models[0])
    cfg = load_config(REPO / "configs/demo/stage3.yml", [
        "DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR", str(tmp_path / "runs")])  # multi-scale
    with pytest.raises(BanaError, match="3 were made with another model or other settings"):
        run(cfg, inputs=[str(folder)], output=out, checkpoint=str(models[0]), devices="cpu",
            workers=0)
    victim = sorted(folder.iterdir())[1]
    Image.open(victim).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(victim)
    with pytest.raises(BanaError, match=rf"1 were made from another image of that name \(e.g. "
                                        rf"{victim.stem}.png\)"):
        predict(synthetic_voc, tmp_path, [folder], out, models[0])


def test_stage2_labels_again_exactly_the_images_whose_boxes_changed(synthetic_voc, stage1_dir,
                                                                    tmp_path, capsys):
    from engine.stage2 import run

    root = Path(shutil.copytree(synthetic_voc, tmp_path / "VOC"))
    cfg = load_config(REPO / "configs/demo/stage2.yml", [
        "DATA.ROOT", str(root), "OUTPUT_DIR", str(stage1_dir), "NAME", "stage2_outputs",
        "DATA.NUM_WORKERS", "0", "DATA.PSEUDO_LABEL_DIR", str(tmp_path / "G")])
    assert run(cfg, devices="cpu", workers=1)["labelled_now"] == 12
    labels = {p: p.read_bytes() for p in (tmp_path / "G").glob("Y_*/*.png")}
    xml = root / "Annotations" / "train_00003.xml"
    tree = ET.parse(xml)
    for obj in tree.getroot().findall("object"):
        tree.getroot().remove(obj)  # the image's boxes removed: it is all background now
    tree.write(xml)
    assert run(cfg, devices="cpu", workers=1)["labelled_now"] == 1
    after = {p: p.read_bytes() for p in (tmp_path / "G").glob("Y_*/*.png")}
    changed = {p.name for p in labels if labels[p] != after[p]}
    assert changed == {"train_00003.png"}
    assert not read_index_png(tmp_path / "G" / "Y_crf" / "train_00003.png").any()
    # The image itself changed (same boxes): labelled again too.
    from PIL import Image

    image = root / "JPEGImages" / "train_00005.jpg"
    Image.fromarray(np.asarray(Image.open(image))[:, ::-1].copy()).save(image)
    assert run(cfg, devices="cpu", workers=1)["labelled_now"] == 1
    assert run(cfg, devices="cpu", workers=1)["labelled_now"] == 0
    # Labels written but not recorded (a run killed between the files and its ledger line):
    # nothing says what they were made from, so they are made again.
    ledger = tmp_path / "G" / "inputs.jsonl"
    ledger.write_text("".join(line + "\n" for line in ledger.read_text().splitlines()
                              if '"train_00007"' not in line))
    capsys.readouterr()
    assert run(cfg, devices="cpu", workers=1)["labelled_now"] == 1
    assert "1 image(s) whose labels were written but not recorded" in capsys.readouterr().out
    assert '"train_00007"' in ledger.read_text()


# --- issue 29, class 3: one bad or big image costs only itself ---------------------------------

def test_predict_skips_a_bad_image_lists_it_and_does_the_others(synthetic_voc, tmp_path, models,
                                                                 capsys):
    """Before: the truncated JPEG stopped the run with the images after it undone; a folder
    named x.jpg was an IsADirectoryError; .jfif files and sub-folders were left out silently."""
    from PIL import Image

    from utils.skips import SkippedImages

    folder = photos(synthetic_voc, tmp_path / "photos", n=3, suffix=".jfif")
    good = sorted(folder.iterdir())
    bad = folder / "b_truncated.jpg"
    bad.write_bytes(good[0].read_bytes()[:200])
    (folder / "notes.txt").write_text("not an image")
    (folder / "album.jpg").mkdir()
    Image.open(good[0]).save(folder / "album.jpg" / "extra.png")
    out = tmp_path / "out"
    with pytest.raises(SkippedImages) as info:
        predict(synthetic_voc, tmp_path, [folder], out, models[0])
    message = str(info.value)
    assert message.startswith("1 of 4 image(s) could not be used and were skipped; the other 3 "
                              "are done.")
    assert f"  1. {bad}: cannot read image {bad}: the file is corrupt" in message
    assert info.value.result["predicted_now"] == 3
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{p.stem}.png" for p in good)
    said = capsys.readouterr().out
    assert (f"--input: left out 1 file(s) that are not images by their extension "
            f"({folder / 'notes.txt'}) and 1 sub-folder(s) ({folder / 'album.jpg'}; pass "
            "--recursive to read their images).") in said
    # Fixed, the rerun does the one image left (and, with --recursive, the sub-folder's).
    bad.unlink()
    from engine.predict import run

    cfg = load_config(REPO / "configs/demo/stage3.yml", [
        "DATA.ROOT", str(synthetic_voc), "OUTPUT_DIR", str(tmp_path / "runs"), "TEST.SCALES",
        "[1.0]", "TEST.FLIP", "false", "TEST.CRF", "false"])
    result = run(cfg, inputs=[str(folder)], output=out, checkpoint=str(models[0]),
                 devices="cpu", workers=0, recursive=True)
    assert result["predicted_now"] == 1 and result["skipped"] == 0
    # An --output inside the input folder is no input of a recursive run.
    inner = folder / "predictions"
    result = run(cfg, inputs=[str(folder)], output=inner, checkpoint=str(models[0]),
                 devices="cpu", workers=0, recursive=True)
    result = run(cfg, inputs=[str(folder)], output=inner, checkpoint=str(models[0]),
                 devices="cpu", workers=0, recursive=True)
    assert result["images"] == 4 and result["predicted_now"] == 0


def test_predict_cli_exits_2_naming_each_skipped_image(synthetic_voc, tmp_path, models):
    from tests.zygote import run_python

    folder = photos(synthetic_voc, tmp_path / "photos", n=1)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    proc = run_python(["predict.py", "--config-file", "configs/demo/stage3.yml", "--gpu-id",
                       "cpu", "--input", str(folder), "--output", str(tmp_path / "out"),
                       "--checkpoint", str(models[0]), "--workers", "0", "--opts",
                       "TEST.SCALES", "[1.0]", "TEST.FLIP", "false", "TEST.CRF", "false",
                       "DATA.ROOT", str(synthetic_voc)], cwd=REPO, timeout=240)
    said = " ".join(proc.stderr.split())  # the message is wrapped at 100 columns
    assert proc.returncode == 2, said[-2000:]
    assert "1 of 2 image(s) could not be used" in said
    assert f"1. {folder / 'broken.png'}: cannot read image" in said
    assert "Traceback" not in proc.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def test_an_image_over_test_max_pixels_is_labelled_downscaled_at_its_own_size(tmp_path):
    """Before: every image went whole through the network and the CRF (11.7 GiB for a
    6-megapixel photo); now one of more than max_pixels is labelled at max_pixels and its
    labels scaled back to the image."""
    from PIL import Image

    from engine.predict import Segmenter

    ckpt = stage3_checkpoint(tmp_path / "m.ckpt", 5)
    rng = np.random.default_rng(0)
    image = np.repeat(np.repeat(rng.integers(0, 256, (10, 12, 3), np.uint8), 8, 0), 8, 1)
    whole = Segmenter(ckpt, crf=True)
    limited = Segmenter(ckpt, crf=True, max_pixels=40 * 48)
    small = np.asarray(Image.fromarray(image).resize((48, 40), Image.Resampling.BOX))
    np.testing.assert_array_equal(limited.fit(image), small)
    label = limited(image)
    assert label.shape == (80, 96)
    expected = np.asarray(Image.fromarray(whole(small)).resize((96, 80),
                                                              Image.Resampling.NEAREST))
    np.testing.assert_array_equal(label, expected)
    assert Segmenter(ckpt, max_pixels=80 * 96).fit(image) is image
