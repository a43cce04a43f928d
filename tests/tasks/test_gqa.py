"""GQA fine-tuning: string question ids, the CE loss option, the official metric during validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from finetune_data import COLOURS, qa_setup, write_json
from torch.utils.data import DataLoader

from tasks.data.jsonio import DataFormatError
from tasks.finetune import gqa


def official_questions(items: list[dict], extra: int = 3) -> dict:
    """GQA's questions file for ``items`` (all balanced), plus ``extra`` questions of other images."""
    out = {}
    for it in items + [{"question_id": f"x{i}", "label": {"red": 1.0}} for i in range(extra)]:
        out[it["question_id"]] = {
            "question": "What colour is it?",
            "answer": next(iter(it["label"])),
            "isBalanced": True,
            "types": {"structural": "query", "semantic": "attr", "detailed": "colorAttr"},
            "groups": {"global": "color", "local": None},
            "semantic": [{"operation": "select", "argument": "thing", "dependencies": []}],
            "entailed": [],
        }
    return out


def quick_train(task, steps: int = 40, lr: float = 3e-3):
    torch.manual_seed(0)
    model = task.build_model(None)
    loader = DataLoader(task.train_dataset(), batch_size=16, shuffle=True, collate_fn=task.collate)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    done = 0
    while done < steps:
        for batch in loader:
            opt.zero_grad()
            task.step(model, batch, 0).loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return model.eval()


def test_ce_finetune_and_official_metric_in_validation(tmp_path: Path):
    cfg = qa_setup(tmp_path, task="gqa", n_train=96, n_valid=30)
    cfg.finetune.loss = "ce"
    valid = json.loads(Path(cfg.data.valid).read_text())
    valid[0]["question_id"] = "0071"  # GQA ids are strings, leading zeros kept
    valid[1]["label"] = {"purple": 1.0}  # outside the table: always scored wrong
    write_json(Path(cfg.data.valid), valid)
    cfg.finetune.annotations = write_json(
        tmp_path / "testdev_balanced_questions.json", official_questions(valid)
    )
    task = gqa.build(cfg)
    model = quick_train(task)
    loader = DataLoader(task.valid_dataset(), batch_size=8, collate_fn=task.collate)
    metrics = task.evaluate(model, loader, torch.device("cpu"))
    majority = max(sum(a in it["label"] for it in valid) for a in COLOURS) / len(valid)
    assert metrics["score"] > majority + 0.2
    assert metrics["oracle"] == pytest.approx(29 / 30)  # "purple" cannot be predicted
    # answers of the table are exact strings: the official accuracy (percent) equals LXMERT's
    assert metrics["official_accuracy"] == pytest.approx(100 * metrics["accuracy"])
    assert metrics["official_open"] == pytest.approx(100 * metrics["accuracy"])
    assert "official_consistency" not in metrics  # not scored during training: absent, not a false 0
    preds, _ = task.predict(model, loader, torch.device("cpu"))
    rows = task.submission(preds)
    assert rows[0] == {"questionId": "0071", "prediction": preds[0].answer}


def test_official_file_must_hold_the_valid_questions(tmp_path: Path):
    cfg = qa_setup(tmp_path, task="gqa", n_train=16, n_valid=6)
    valid = json.loads(Path(cfg.data.valid).read_text())
    cfg.finetune.annotations = write_json(tmp_path / "q.json", official_questions(valid[:4], extra=0))
    task = gqa.build(cfg)
    loader = DataLoader(task.valid_dataset(), batch_size=8, collate_fn=task.collate)
    with pytest.raises(DataFormatError, match=r"q\.json: 2 of the 6 predicted questions are not in it"):
        task.evaluate(task.build_model(None).eval(), loader, torch.device("cpu"))


def test_missing_official_file_fails_before_training(tmp_path: Path):
    cfg = qa_setup(tmp_path, task="gqa", n_train=16, n_valid=6)
    cfg.finetune.annotations = str(tmp_path / "testdev_balanced_questions.json")
    with pytest.raises(
        DataFormatError, match=r"finetune.annotations: .*testdev_balanced_questions.json is not a file"
    ):
        gqa.build(cfg).valid_dataset()
