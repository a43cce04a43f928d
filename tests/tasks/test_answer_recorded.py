"""lxmert-answer without detector flags: the model folder's extractor.json decides the detector (config, image
sizes, box selection, random weights and their seed, or the weights file); flags given override it with the
mismatch warning. And ``--draw`` enlarges a small image so that its labels stay legible."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from answer_model import save_tiny_qa_model
from PIL import Image
from safetensors.torch import save_file

from extract.detector import build_vg_detector, get_detector_cfg
from extract.runner import ExtractConfig, ImageItem, run_extraction
from extract.selection import BoxSelection
from extract.store import FeatureStore
from tasks.answer.answerer import Answer, Answerer, AnswerResult, Region
from tasks.answer.cli import main
from tasks.answer.drawing import draw_result

ANSWERS = ["circle", "rectangle", "triangle", "red", "blue", "yes", "no"]
QUESTION = "What shape is in the image?"
# Not extract-features' defaults (vg_r101_c4, 600-1000 px, caffe 36, seed 0): each must come from the record.
RECORDED = {"config": "vg_tiny", "min_size": 80, "max_size": 96, "seed": 7}
SELECTION = BoxSelection(rule="maxnms", min_boxes=6, max_boxes=12)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tasks/conftest.py


def _shape_image(path: Path, size: int = 64) -> Path:
    img = np.full((size, size, 3), 240, dtype=np.uint8)
    img[size // 4 : 3 * size // 4, size // 3 : 2 * size // 3] = (
        30,
        60,
        220,
    )  # a blue rectangle, as easy-VQA's
    Image.fromarray(img).save(path)
    return path


def _model_folder(root: Path, store: Path, dim: int) -> Path:
    save_tiny_qa_model(root / "best", store, dim, ANSWERS)
    return root / "best"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A random-weight store and a trained-weights store of one 64x64 image, each with a model folder."""
    root = tmp_path_factory.mktemp("recorded")
    image = _shape_image(root / "5.png")
    out: dict = {"root": root, "image": image}
    common = dict(workers=0, batch_size=1, progress=False, selection=SELECTION, **RECORDED)
    random_store = root / "random.lmdb"
    summary = run_extraction(
        ExtractConfig(out=str(random_store), random_weights=True, **common), [ImageItem("5", str(image))]
    )
    assert summary.done == 1, summary.format()
    out["random_model"] = _model_folder(root / "random", random_store, 128)
    with FeatureStore(random_store) as fs:
        out["random_record"] = fs["5"]

    weights = root / "files" / "vg_tiny_w.safetensors"
    weights.parent.mkdir()
    detector = build_vg_detector(get_detector_cfg("vg_tiny"), "cpu", seed=11)
    save_file({k: v.contiguous() for k, v in detector.state_dict().items()}, str(weights))
    file_store = root / "file.lmdb"
    summary = run_extraction(
        ExtractConfig(out=str(file_store), weights=str(weights), **common), [ImageItem("5", str(image))]
    )
    assert summary.done == 1, summary.format()
    out["file_model"] = _model_folder(root / "file", file_store, 128)
    out["weights"] = weights
    return out


def test_no_flags_answers_with_the_recorded_random_detector(trained: dict, capsys) -> None:
    """Exactly the training features (same boxes as the store's record) and the same answer as the flags."""
    code = main([str(trained["image"]), QUESTION, "--model", str(trained["random_model"]), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "warning" not in err
    assert (
        "detector from" in err
        and "vg_tiny, random weights (seed 7), images 80-96 px, maxnms selection of 6-12 boxes" in err
    )
    result = json.loads(out)
    stored = trained["random_record"]
    np.testing.assert_allclose([r["box"] for r in result["regions"]], stored["boxes"], rtol=0, atol=1e-4)

    answerer = Answerer.load(
        trained["random_model"],
        ExtractConfig(out="", random_weights=True, device="cpu", selection=SELECTION, **RECORDED),
        warn=False,
    )
    assert answerer.extractor_check.ok
    expected = answerer.answer(trained["image"], QUESTION)
    assert [a["answer"] for a in result["answers"]] == [a.answer for a in expected.answers]
    np.testing.assert_allclose([a["prob"] for a in result["answers"]], [a.prob for a in expected.answers])


def test_flags_given_override_the_record_with_the_warning(trained: dict, capsys) -> None:
    args = [str(trained["image"]), QUESTION, "--model", str(trained["random_model"]), "--min-size", "72"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "min_size: model trained on 80, here 72" in err
    assert "max_size" not in err and "selection" not in err.split("detector from")[-1].split("\n", 1)[1]
    assert main([*args, "--strict"]) == 2
    assert "min_size" in capsys.readouterr().err


def test_recorded_weights_file_found_by_name_or_named(trained: dict, tmp_path: Path, monkeypatch, capsys):
    args = [str(trained["image"]), QUESTION, "--model", str(trained["file_model"])]
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2  # the file is in none of the places looked at
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vg_tiny_w.safetensors" in err and "--weights" in err and "sha256" in err

    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "vg_tiny_w.safetensors").symlink_to(trained["weights"])
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "warning" not in err and f"weights {tmp_path / 'weights' / 'vg_tiny_w.safetensors'}" in err

    other = tmp_path / "other.safetensors"  # other weights given: the sha256 differs, and is named
    detector = build_vg_detector(get_detector_cfg("vg_tiny"), "cpu", seed=12)
    save_file({k: v.contiguous() for k, v in detector.state_dict().items()}, str(other))
    assert main([*args, "--weights", str(other)]) == 0
    assert "weights_sha256: model trained on" in capsys.readouterr().err


def test_model_without_record_needs_the_detector_flags(trained: dict, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "hub_like"
    for name in ("model.safetensors", "config.json", "label2ans.json"):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes((trained["random_model"] / name).read_bytes())
    assert main([str(trained["image"]), QUESTION, "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "records no extractor" in err and "--weights FILE" in err and "--random-weights" in err


def test_drawing_of_a_small_image_is_enlarged_and_legible(trained: dict, tmp_path: Path) -> None:
    """A 64x64 easy-VQA image is drawn at 512x512, nearest pixel, with its labels and answers whole."""
    regions = [
        Region(box=[21.0, 16.0, 43.0, 48.0], object="box", attribute="blue", attention=0.7),
        Region(box=[0.0, 0.0, 16.0, 16.0], object="wall", attribute="white", attention=0.3),
    ]
    result = AnswerResult(
        str(trained["image"]), QUESTION, [Answer("rectangle", 0.81), Answer("circle", 0.12)], regions
    )
    out = draw_result(result, tmp_path / "seen.png")
    with Image.open(out) as img:
        assert img.size == (512, 512)
        pixels = np.asarray(img.convert("RGB")).astype(int)
    # the rectangle's inside (attention peak: unshaded), enlarged 8 times by whole pixels
    assert (pixels[150:250, 200:300] == (30, 60, 220)).all()
    # the answers' band: white text on black, rows tall enough to read (>= 12 px), not cut at the right edge
    band = pixels[400:]
    white_rows = np.flatnonzero((band > 200).all(-1).any(1))
    assert white_rows.size >= 2 * 12
    white_cols = np.flatnonzero((band > 200).all(-1).any(0))
    assert white_cols.max() < 500
    # the most attended region's frame (gold) lies on its enlarged box: x from 168 to 344
    gold = (pixels[:, :, 0] > 200) & (pixels[:, :, 1] > 180) & (pixels[:, :, 2] < 60)
    cols = np.flatnonzero(gold[200:300].any(0))  # rows where only that region's frame is
    assert cols.min() == 168 and cols.max() == 343
