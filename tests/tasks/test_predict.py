"""`lxmert-train vqa|gqa|nlvr2 --eval-only`: result files in the official formats, scores.json, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from finetune_data import COLOURS, nlvr2_setup, qa_setup, write_json
from torch.utils.data import DataLoader

from common.config import save_config
from tasks.cli import main as cli_main
from tasks.engine.checkpointing import save_model_dir
from tasks.finetune import gqa, nlvr2, vqa
from tasks.metrics.vqa import evaluate_vqa


def quick_model_folder(root: Path, cfg, build) -> tuple[Path, object, object]:
    """A few plain optimizer steps, then RUN_DIR/best (model + extras) and RUN_DIR/config.yaml, as a run leaves them."""
    task = build(cfg)
    torch.manual_seed(0)
    model = task.build_model(None)
    loader = DataLoader(task.train_dataset(), batch_size=16, shuffle=True, collate_fn=task.collate)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(3):
        for batch in loader:
            opt.zero_grad()
            task.step(model, batch, 0).loss.backward()
            opt.step()
    run = root / "run"
    save_model_dir(run / "best", model.eval(), task.checkpoint_extras())
    save_config(cfg, run / "config.yaml")
    return run / "best", task, model


@pytest.fixture(scope="module")
def vqa_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa_predict")
    cfg = qa_setup(root, n_train=64, n_valid=24)
    best, task, model = quick_model_folder(root, cfg, vqa.build)
    return root, cfg, best, task, model


def test_vqa_labelled_split_writes_predictions_and_lxmert_accuracy(vqa_folder, capsys):
    root, cfg, best, task, model = vqa_folder
    out = root / "eval_valid"
    # no --config: the run's own config.yaml beside --load
    assert (
        cli_main(["vqa", "--eval-only", "--load", str(best), "--data", cfg.data.valid, "--output", str(out)])
        == 0
    )
    preds = json.loads((out / "predictions.json").read_text())
    items = json.loads(Path(cfg.data.valid).read_text())
    assert [p["question_id"] for p in preds] == [it["question_id"] for it in items]
    assert all(
        type(p["question_id"]) is int and p["answer"] in COLOURS and set(p) == {"question_id", "answer"}
        for p in preds
    )
    scores = json.loads((out / "scores.json").read_text())
    by_hand = sum(it["label"].get(p["answer"], 0.0) for it, p in zip(items, preds)) / len(items)
    assert scores["lxmert_accuracy"] == pytest.approx(by_hand)
    loader = DataLoader(task.valid_dataset(), batch_size=7, collate_fn=task.collate)
    assert task.evaluate(model, loader, torch.device("cpu"))["score"] == pytest.approx(by_hand)
    assert "LXMERT accuracy" in capsys.readouterr().out


def test_vqa_official_metric_with_annotations(vqa_folder):
    root, cfg, best, _, _ = vqa_folder
    items = json.loads(Path(cfg.data.valid).read_text())
    # official annotations of these questions (and of others, as the val2014 file holds more than minival)
    anns = []
    for k, it in enumerate(items + [{"question_id": 1, "label": {"red": 1.0}}]):
        truth = max(it["label"], key=it["label"].get)
        answers = [truth] * 10 if k % 2 else [truth] * 8 + ["Dog.", "dog"]
        anns.append(
            {
                "question_id": it["question_id"],
                "image_id": k,
                "question_type": "what color",
                "answer_type": "other",
                "multiple_choice_answer": truth,
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                    for i, a in enumerate(answers)
                ],
            }
        )
    raw = write_json(root / "annotations.json", {"annotations": anns})
    out = root / "eval_official"
    args = [
        "vqa",
        "--eval-only",
        "--load",
        str(best),
        "--data",
        cfg.data.valid,
        "--annotations",
        raw,
        "--output",
        str(out),
    ]
    assert cli_main(args) == 0
    scores = json.loads((out / "scores.json").read_text())
    preds = json.loads((out / "predictions.json").read_text())
    want = evaluate_vqa(anns[:-1], preds)
    assert scores["official"]["overall"] == want["overall"]
    assert scores["official"]["perAnswerType"] == {"other": want["overall"]}


def test_vqa_test_split_without_labels_gives_the_submission_only(vqa_folder, capsys):
    root, cfg, best, _, _ = vqa_folder
    items = [
        {k: v for k, v in it.items() if k != "label"} for it in json.loads(Path(cfg.data.valid).read_text())
    ]
    test = write_json(root / "test.json", items)
    out = root / "eval_test"
    assert cli_main(["vqa", "--eval-only", "--load", str(best), "--data", test, "--output", str(out)]) == 0
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == len(items) and not (out / "scores.json").exists()
    assert "nothing scored" in capsys.readouterr().out


def test_model_folder_alone_is_enough(vqa_folder):
    """No config at all: answers from label2ans.json, stores from features.json."""
    root, cfg, best, _, _ = vqa_folder
    alone = root / "elsewhere" / "model"
    shutil.copytree(best, alone)
    out = root / "eval_alone"
    assert (
        cli_main(["vqa", "--eval-only", "--load", str(alone), "--data", cfg.data.valid, "--output", str(out)])
        == 0
    )
    assert json.loads((out / "predictions.json").read_text()) == json.loads(
        (root / "eval_valid" / "predictions.json").read_text()
    )


def test_eval_only_errors(vqa_folder, capsys):
    root, cfg, best, _, _ = vqa_folder
    assert cli_main(["vqa", "--eval-only", "--load", str(best), "--output", str(root / "x")]) == 2
    assert "--data" in capsys.readouterr().err
    bare = root / "bare"
    shutil.copytree(best, bare)
    (bare / "label2ans.json").unlink()
    args = ["vqa", "--eval-only", "--load", str(bare), "--data", cfg.data.valid, "--output", str(root / "y")]
    assert cli_main(args) == 1
    assert "data.answers" in capsys.readouterr().err
    assert cli_main(["vqa", "--output", str(root / "z")]) == 2  # training needs --config
    # a raw annotations file that is not there: refused before the inference, nothing written
    args = ["vqa", "--eval-only", "--load", str(best), "--data", cfg.data.valid, "--output", str(root / "w")]
    assert cli_main([*args, "--annotations", str(root / "v2_mscoco_val2014_annotations.json")]) == 1
    err = capsys.readouterr().err
    assert "v2_mscoco_val2014_annotations.json: no such file" in err
    assert not (root / "w").exists()
    # a model path that names nothing: said so, not "no answer table"
    args = ["vqa", "--eval-only", "--load", str(root / "runs" / "bets"), "--data", cfg.data.valid]
    assert cli_main([*args, "--output", str(root / "u")]) == 1
    assert "is no local folder or file" in capsys.readouterr().err


def test_gqa_submission_format(tmp_path: Path):
    cfg = qa_setup(tmp_path, task="gqa", n_train=32, n_valid=10)
    best, _, _ = quick_model_folder(tmp_path, cfg, gqa.build)
    out = tmp_path / "out"
    assert (
        cli_main(["gqa", "--eval-only", "--load", str(best), "--data", cfg.data.valid, "--output", str(out)])
        == 0
    )
    preds = json.loads((out / "predictions.json").read_text())
    items = json.loads(Path(cfg.data.valid).read_text())
    assert [p["questionId"] for p in preds] == [it["question_id"] for it in items]
    assert all(set(p) == {"questionId", "prediction"} and isinstance(p["questionId"], str) for p in preds)


def test_nlvr2_csv_and_official_scores(tmp_path: Path):
    cfg = nlvr2_setup(tmp_path)
    best, _, _ = quick_model_folder(tmp_path, cfg, nlvr2.build)
    out = tmp_path / "out"
    # the converted file itself serves as the annotations (the official metrics read both formats)
    args = [
        "nlvr2",
        "--eval-only",
        "--load",
        str(best),
        "--data",
        cfg.data.valid,
        "--annotations",
        cfg.data.valid,
    ]
    assert cli_main([*args, "--output", str(out)]) == 0
    lines = (out / "predictions.csv").read_text().splitlines()
    items = json.loads(Path(cfg.data.valid).read_text())
    assert [line.split(",")[0] for line in lines] == [it["identifier"] for it in items]
    assert {line.split(",")[1] for line in lines} <= {"True", "False"}
    scores = json.loads((out / "scores.json").read_text())
    right = sum((line.split(",")[1] == "True") == bool(it["label"]) for line, it in zip(lines, items))
    assert scores["lxmert_accuracy"] == pytest.approx(right / len(items))
    assert scores["official"]["accuracy"] == pytest.approx(right / len(items))


@pytest.mark.parametrize("setting", ["standardize_features", "whiten_features"])
def test_standardised_features_follow_the_model(tmp_path: Path, setting: str):
    """A model fine-tuned on standardised (or whitened) features is evaluated with its own statistics, config or
    not."""
    cfg = qa_setup(tmp_path, n_train=32, n_valid=10, **{setting: True})
    best, task, _ = quick_model_folder(tmp_path, cfg, vqa.build)
    stats = json.loads((best / "features.json").read_text())["standardize"]
    assert len(stats["mean"]) == 8 and stats["num_regions"] == 32 * 4
    assert ("whiten" in stats) == (setting == "whiten_features")
    if "whiten" in stats:
        assert np.array(stats["whiten"]).shape == (8, 8)
    with_config, alone = tmp_path / "with_config", tmp_path / "alone"
    assert (
        cli_main(
            [
                "vqa",
                "--eval-only",
                "--load",
                str(best),
                "--data",
                cfg.data.valid,
                "--output",
                str(with_config),
            ]
        )
        == 0
    )
    shutil.copytree(best, tmp_path / "copy")
    assert (
        cli_main(
            [
                "vqa",
                "--eval-only",
                "--load",
                str(tmp_path / "copy"),
                "--data",
                cfg.data.valid,
                "--output",
                str(alone),
            ]
        )
        == 0
    )
    assert (with_config / "scores.json").read_text().replace(str(best), "") == (
        alone / "scores.json"
    ).read_text().replace(str(tmp_path / "copy"), "")
