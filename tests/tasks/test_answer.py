"""lxmert-answer / tasks.answer.answerer: the tiny VG detector (random weights saved to a file) and a tiny QA model.

The reference is the pipeline users run in two steps: ``run_extraction`` into a feature store, then the model
on the store's record. The answerer must give the same regions and the same answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from answer_model import ANSWERS, SMALL, build_answer_model, make_image
from PIL import Image

from common.config import field_choices
from extract.runner import ExtractConfig
from extract.selection import BoxSelection
from extract.store import FeatureStore
from extract.vg_vocab import load_vg_vocab
from model import LxmertConfig, LxmertForNLVR2, LxmertForQuestionAnswering, LxmertModel, LxmertTokenizer
from tasks.answer.answerer import (
    Answerer,
    AnswerInputError,
    AnswerSetupError,
    compare_extractor,
)
from tasks.answer.cli import build_parser, main, read_questions
from tasks.answer.drawing import draw_result

QUESTION = "What is the man holding?"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tasks/conftest.py


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    return build_answer_model(tmp_path_factory.mktemp("answer"))


def _answer_config(built: dict, **kw) -> ExtractConfig:
    base = dict(out="", weights=str(built["weights"]), config="vg_tiny", device="cpu", **SMALL)
    base.update(kw)
    return ExtractConfig(**base)


def _cli_args(built: dict, *extra: str) -> list[str]:
    return [
        "--model",
        str(built["model_dir"]),
        "--weights",
        str(built["weights"]),
        "--config",
        "vg_tiny",
        "--min-size",
        str(SMALL["min_size"]),
        "--max-size",
        str(SMALL["max_size"]),
        *extra,
    ]


@pytest.fixture(scope="module")
def answerer(built: dict) -> Answerer:
    return Answerer.load(built["model_dir"], _answer_config(built))


# ------------------------------------------------------------------------------ equal to store + model
def test_answers_equal_extracting_into_a_store_then_the_model(built: dict, answerer: Answerer) -> None:
    with FeatureStore(built["store"]) as fs:
        stored = fs["photo"]
    with FeatureStore(built["store"], normalize_boxes=True) as fs:
        normalised = fs["photo"]
    record, seconds = answerer.regions(built["image"])
    for name in ("features", "boxes", "obj_ids", "obj_conf", "attr_ids", "attr_conf"):
        np.testing.assert_array_equal(record[name], stored[name], err_msg=name)
    assert (record["img_h"], record["img_w"]) == (stored["img_h"], stored["img_w"]) == (60, 90)

    enc = LxmertTokenizer()(QUESTION)
    with torch.no_grad():
        logits = built["model"](
            **enc,
            visual_feats=torch.from_numpy(normalised["features"])[None],
            visual_pos=torch.from_numpy(normalised["boxes"])[None],
        ).question_answering_score[0]
    reference = F.softmax(logits, dim=-1)
    with torch.no_grad():  # the comparison means something: other regions give other answers
        other = F.softmax(
            built["model"](
                **enc,
                visual_feats=torch.from_numpy(normalised["features"][::-1].copy())[None],
                visual_pos=torch.from_numpy(normalised["boxes"])[None],
            ).question_answering_score[0],
            dim=-1,
        )
    assert (other - reference).abs().max() > 1e-3
    order = torch.argsort(reference, descending=True, stable=True)

    result = answerer.answer(built["image"], QUESTION, top_k=3)
    assert [a.answer for a in result.answers] == [ANSWERS[i] for i in order[:3].tolist()]
    np.testing.assert_allclose(
        [a.prob for a in result.answers], reference[order[:3]].numpy(), rtol=0, atol=1e-6
    )
    vocab = load_vg_vocab()
    assert len(result.regions) == len(stored["boxes"]) == 36
    assert [r.object for r in result.regions] == [vocab.object_name(i) for i in stored["obj_ids"]]
    assert [r.attribute for r in result.regions] == [vocab.attribute_name(i) for i in stored["attr_ids"]]
    np.testing.assert_allclose([r.box for r in result.regions], stored["boxes"], rtol=0, atol=0)
    assert sum(r.attention for r in result.regions) == pytest.approx(1.0, abs=1e-5)
    assert answerer.extractor_check.ok and answerer.extractor_check.note is None


def test_standardised_features_as_in_training(built: dict, answerer: Answerer, tmp_path: Path) -> None:
    """A model fine-tuned with data.standardize_features gets its features standardised the same way."""
    folder = tmp_path / "standardised"
    built["model"].save_pretrained(folder)
    (folder / "label2ans.json").write_text(json.dumps(ANSWERS))
    rng = np.random.default_rng(0)
    dim = built["model"].config.visual_feat_dim
    mean, std = rng.normal(size=dim).astype(np.float32), rng.uniform(0.5, 2, size=dim).astype(np.float32)
    stats = {"mean": mean.tolist(), "std": std.tolist(), "num_regions": 36}
    (folder / "features.json").write_text(json.dumps({"standardize": stats}))
    standardised = Answerer.load(folder, _answer_config(built), warn=False)
    with FeatureStore(built["store"], normalize_boxes=True) as fs:
        rec = fs["photo"]
    with torch.no_grad():
        logits = built["model"](
            **LxmertTokenizer()(QUESTION),
            visual_feats=torch.from_numpy((rec["features"] - mean) / std)[None],
            visual_pos=torch.from_numpy(rec["boxes"])[None],
        ).question_answering_score[0]
    probs = F.softmax(logits, dim=-1)
    result = standardised.answer(built["image"], QUESTION, top_k=len(ANSWERS))
    got = {a.answer: a.prob for a in result.answers}
    np.testing.assert_allclose([got[a] for a in ANSWERS], probs.numpy(), rtol=0, atol=1e-6)
    plain = {a.answer: a.prob for a in answerer.answer(built["image"], QUESTION, top_k=len(ANSWERS)).answers}
    assert max(abs(plain[a] - got[a]) for a in ANSWERS) > 1e-4  # the standardisation did change them


def test_several_questions_reuse_one_extraction(built: dict, answerer: Answerer) -> None:
    answerer.regions(built["image"])  # cached from here on
    first = answerer.answer(built["image"], "Is it red?", top_k=len(ANSWERS))
    again = answerer.answer(built["image"], "Is it red?", top_k=len(ANSWERS))
    assert first.extract_s == 0.0 and again.extract_s == 0.0
    assert [(a.answer, a.prob) for a in first.answers] == [(a.answer, a.prob) for a in again.answers]
    assert sum(a.prob for a in first.answers) == pytest.approx(1.0, abs=1e-5)


def test_a_batch_answers_as_one_question_at_a_time(
    built: dict, answerer: Answerer, tmp_path: Path, monkeypatch
) -> None:
    """answer_batch (one forward, padded regions + mask): the same answers and attention as answering each pair
    alone; a pair that cannot be answered gets its error in its place, the others are answered."""
    other = make_image(tmp_path / "other.png", 80, 50, seed=5)
    regions_many = answerer.regions_many

    def fewer_regions_for_other(
        images,
    ):  # uneven region counts in one batch (a detector keeping 10..36 boxes)
        found = regions_many(images)
        if str(other) in found and not isinstance(found[str(other)], Exception):
            record, seconds = found[str(other)]
            found[str(other)] = (
                {k: v[:20] if hasattr(v, "shape") else v for k, v in record.items()},
                seconds,
            )
        return found

    monkeypatch.setattr(answerer, "regions_many", fewer_regions_for_other)
    pairs = [
        (built["image"], QUESTION),
        (other, "what color is it?"),
        (tmp_path / "missing.png", QUESTION),
        (built["image"], "   "),
        (other, QUESTION),
    ]
    batch = answerer.answer_batch(pairs, top_k=3)
    assert [type(r).__name__ for r in batch] == ["AnswerResult"] * 2 + ["AnswerInputError"] * 2 + [
        "AnswerResult"
    ]
    assert "missing.png" in str(batch[2]) and "empty question" in str(batch[3])
    for (image, question), got in zip(pairs, batch):
        if isinstance(got, Exception):
            continue
        alone = answerer.answer(image, question, top_k=3)
        assert [a.answer for a in got.answers] == [a.answer for a in alone.answers]
        assert [a.prob for a in got.answers] == pytest.approx([a.prob for a in alone.answers], abs=1e-5)
        assert [r.attention for r in got.regions] == pytest.approx(
            [r.attention for r in alone.regions], abs=1e-5
        )
    regions = {len(r.regions) for r in batch if not isinstance(r, Exception)}
    assert len(regions) == 2, regions  # uneven region counts: the padding path was exercised


def test_images_of_a_batch_go_through_the_detector_together(
    built: dict, answerer: Answerer, tmp_path: Path
) -> None:
    """regions_many: the uncached images in one detector call give the records of one-at-a-time extraction; an
    unreadable image gets its error and the others their regions."""
    a = make_image(tmp_path / "a.png", 70, 40, seed=21)
    b = make_image(tmp_path / "b.png", 45, 90, seed=22)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    alone = {}
    for path in (a, b):
        fresh = Answerer(
            answerer.model, answerer.detector, answerer.extract_config, answerer.answers, cache_size=0
        )
        alone[str(path)] = fresh.regions(path)[0]
    together = Answerer(answerer.model, answerer.detector, answerer.extract_config, answerer.answers)
    found = together.regions_many([a, bad, b, a])
    assert set(found) == {str(a), str(bad), str(b)} and isinstance(found[str(bad)], AnswerInputError)
    for path in (a, b):
        record, seconds = found[str(path)]
        assert seconds > 0
        for key in ("features", "boxes", "obj_ids", "attr_ids"):
            np.testing.assert_allclose(record[key], alone[str(path)][key], rtol=1e-4, atol=1e-4)
    assert together.regions(a)[1] == 0.0  # cached after the batch


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_json_and_picture_of_the_image_enlarged(built: dict, tmp_path: Path, capsys) -> None:
    picture = tmp_path / "seen.png"
    code = main(
        [str(built["image"]), QUESTION, *_cli_args(built, "--json", "--top-k", "2", "--draw", str(picture))]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"image", "question", "answers", "regions"}
    assert result["question"] == QUESTION and len(result["answers"]) == 2
    assert set(result["answers"][0]) == {"answer", "prob"} and result["answers"][0]["answer"] in ANSWERS
    assert len(result["regions"]) == 36
    assert set(result["regions"][0]) == {"box", "object", "attribute", "attention"}
    with Image.open(picture) as img:
        assert img.size == (540, 360)  # 90x60 enlarged 6 times: the long side reaches 512
        pixels = np.asarray(img.convert("RGB"))
    original = np.asarray(Image.open(built["image"]).convert("RGB")).repeat(6, 0).repeat(6, 1)
    assert not np.array_equal(pixels, original)  # shaded and labelled
    assert "loaded in" in err and "per question" in err


def test_picture_of_an_exif_rotated_photo_is_upright(built: dict, answerer: Answerer, tmp_path: Path) -> None:
    """Boxes refer to the image as a viewer shows it (EXIF applied), and so does the picture."""
    rng = np.random.default_rng(5)
    photo = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape 90x60, shown portrait 60x90
    Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(photo, exif=exif)
    result = answerer.answer(photo, QUESTION)
    record, _ = answerer.regions(photo)
    assert (record["img_h"], record["img_w"]) == (90, 60)
    assert max(r.box[2] for r in result.regions) <= 60 and max(r.box[3] for r in result.regions) <= 90
    out = draw_result(result, tmp_path / "rotated_seen.jpg", min_long_side=1)
    with Image.open(out) as img:
        assert img.size == (60, 90)


def test_cli_text_output(built: dict, capsys) -> None:
    assert main([str(built["image"]), QUESTION, *_cli_args(built, "--top-k", "3")]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0] == f"{built['image']}: {QUESTION}"
    assert [line.split()[0] for line in lines[1:4]] == ["1.", "2.", "3."]
    assert lines[4].startswith("  looked at: ")


def test_mismatched_extractor_warns_and_strict_refuses(built: dict, capsys) -> None:
    args = [str(built["image"]), QUESTION, *_cli_args(built, "--selection", "maxnms", "--min-size", "72")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert (
        "warning: the model's features came from another extractor: selection: model trained on 'caffe', here 'maxnms'"
        in err
    )
    assert "min_size: model trained on 64, here 72" in err

    assert main([*args, "--strict"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "error:" in err and "selection" in err and "--strict" in err


def test_other_weights_named_in_the_check(built: dict) -> None:
    other = dict(built["extractor"], weights_sha256="0" * 64)
    current = dict(built["extractor"])
    check = compare_extractor(other, current)
    assert check.differences == [
        f"weights_sha256: model trained on {'0' * 64!r}, here {current['weights_sha256']!r}"
    ]
    assert compare_extractor(None, current).note.startswith("the model carries no extractor record")
    assert "TSV" in compare_extractor({"source": "tsv", "file": "x.tsv"}, current).note


def test_hub_style_model_without_record_gets_a_note(built: dict, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "hub_like"
    built["model"].save_pretrained(folder)  # weights + config only, as a Hub model
    answers = tmp_path / "label2ans.json"
    answers.write_text(json.dumps(ANSWERS))
    args = _cli_args(built, "--answers", str(answers))
    args[1] = str(folder)
    assert main([str(built["image"]), QUESTION, *args]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "no extractor record" in notes[0]

    assert main([str(built["image"]), QUESTION, *args[:-2]]) == 2  # without --answers
    err = capsys.readouterr().err
    assert "carries no answer table" in err and "--answers" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_one_clear_line_each(built: dict, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    cases = [
        ([str(broken), QUESTION], 1, ["broken.jpg", "not a recognised image"]),
        ([str(tmp_path / "missing.jpg"), QUESTION], 1, ["missing.jpg", "file not found"]),
        ([str(built["image"]), "   "], 1, ["empty question"]),
    ]
    backbone = tmp_path / "backbone"
    LxmertModel(built["model"].config).save_pretrained(backbone)
    (backbone / "label2ans.json").write_text(json.dumps(ANSWERS))
    no_head = _cli_args(built)
    no_head[1] = str(backbone)
    short = tmp_path / "short.json"
    short.write_text(json.dumps(ANSWERS[:3]))
    for argv, code, words in cases:
        assert main([*argv, *_cli_args(built)]) == code, argv
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and all(w in err for w in words), err
    assert (
        main([str(built["image"]), QUESTION, *_cli_args(built, "--draw", str(tmp_path / "no" / "x.png"))])
        == 2
    )
    err = capsys.readouterr().err
    assert "--draw" in err and "does not exist" in err
    assert main([str(built["image"]), QUESTION, *no_head]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no answer head" in err and "fine-tune" in err
    assert main([str(built["image"]), QUESTION, *_cli_args(built, "--answers", str(short))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 answers" in err and f"{len(ANSWERS)} outputs" in err


def test_api_errors(built: dict, answerer: Answerer, tmp_path: Path) -> None:
    with pytest.raises(AnswerInputError, match="empty question"):
        answerer.answer(built["image"], "")
    with pytest.raises(AnswerInputError, match="file not found"):
        answerer.answer(tmp_path / "nope.png", QUESTION)
    with pytest.raises(AnswerSetupError, match="weight file .* does not exist"):
        Answerer.load(built["model_dir"], _answer_config(built, weights=str(tmp_path / "w.pkl")))
    with pytest.raises(AnswerSetupError, match="128-d region features but .* expects 2048-d"):
        folder = tmp_path / "wide"
        LxmertForQuestionAnswering(
            LxmertConfig(
                hidden_size=32,
                num_attention_heads=4,
                intermediate_size=64,
                l_layers=1,
                r_layers=1,
                x_layers=1,
                num_qa_labels=len(ANSWERS),
            )
        ).save_pretrained(folder)
        (folder / "label2ans.json").write_text(json.dumps(ANSWERS))
        Answerer.load(folder, _answer_config(built))


# --------------------------------------------------------------------------------------- questions mode
def test_questions_file_bad_lines_reported_rest_answered(built: dict, tmp_path: Path, capsys) -> None:
    second = make_image(tmp_path / "second.jpg", 50, 40, seed=1)
    questions = tmp_path / "questions.jsonl"
    lines = [
        json.dumps({"image": str(built["image"]), "question": QUESTION, "question_id": 7}),
        "{not json",
        json.dumps({"image": "second.jpg", "question": "Is there a dog?"}),  # relative to the file
        json.dumps({"image": str(built["image"])}),
        "",
        json.dumps({"image": "missing.jpg", "question": "What?"}),
        json.dumps({"image": str(built["image"]), "question": "Is it red?"}),
        json.dumps(["image", "question"]),
    ]
    questions.write_text("\n".join(lines) + "\n")
    out_file = tmp_path / "answers.jsonl"
    code = main(["--questions", str(questions), "--out", str(out_file), *_cli_args(built)])
    err = capsys.readouterr().err
    assert code == 1  # some lines were not answered
    assert f"{questions}:2: not valid JSON" in err
    assert f"{questions}:4: 'question' is missing; skipped" in err
    assert f"{questions}:6: image {tmp_path / 'missing.jpg'}: file not found; skipped" in err
    assert f"{questions}:8: expected an object" in err
    answered = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert sorted(a["line"] for a in answered) == [1, 3, 7]
    by_line = {a["line"]: a for a in answered}
    assert by_line[1]["question_id"] == 7 and by_line[1]["question"] == QUESTION
    assert by_line[3]["image"] == str(second) and len(by_line[3]["regions"]) == 36
    assert all(len(a["answers"]) == 5 for a in answered)
    assert "3 question(s) answered: 2 image(s) extracted" in err

    good, bad = read_questions(questions)
    assert [q.line for q in good] == [1, 3, 6, 7] and len(bad) == 3


def test_detector_flags_follow_the_extractor_config() -> None:
    """--amp, --selection and the detector defaults are ExtractConfig's / BoxSelection's (one place)."""
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    assert tuple(actions["amp"].choices) == field_choices(ExtractConfig, "amp")
    assert tuple(actions["selection"].choices) == field_choices(BoxSelection, "rule")
    args = parser.parse_args(["img.jpg", "q?", "--model", "m", "--random-weights"])
    base, selection = ExtractConfig(out=""), BoxSelection()
    for name in ("amp", "config", "device", "min_size", "max_size", "max_pixels"):
        assert getattr(args, name) == getattr(base, name), name
    assert (args.selection, args.conf_thresh, args.nms_thresh) == (
        selection.rule,
        selection.conf_thresh,
        selection.nms_thresh,
    )
    assert BoxSelection.from_spec(args.boxes) == BoxSelection(
        min_boxes=selection.min_boxes, max_boxes=selection.max_boxes
    )


def test_models_that_cannot_answer_are_named_before_any_table_is_asked(
    built: dict, tmp_path: Path, capsys
) -> None:
    """No label2ans.json beside: a backbone or an NLVR2 folder is refused for what it is (not for the missing
    answer table), and a path that names nothing (not a Hub id either) is refused as such."""
    backbone = tmp_path / "backbone_only"
    LxmertModel(built["model"].config).save_pretrained(backbone)
    pair = tmp_path / "nlvr2_best"
    LxmertForNLVR2(built["model"].config).save_pretrained(pair)
    cases = [
        (backbone, "has no answer head"),
        (pair, "is an NLVR2 model"),
        (tmp_path / "runs" / "vqa" / "bets", "no such folder or file"),
    ]
    for model_path, words in cases:
        argv = _cli_args(built)
        argv[1] = str(model_path)
        assert main([str(built["image"]), QUESTION, *argv]) == 2, model_path
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "answer table" not in err, err
    # an owner/name that is no local path: a Hub id, whose answer table must be given
    argv = _cli_args(built)
    argv[1] = "unc-nlp/lxmert-vqa-uncased"
    assert main([str(built["image"]), QUESTION, *argv]) == 2
    err = capsys.readouterr().err
    assert "carries no answer table" in err and "read as a Hub id" in err and "--answers" in err
