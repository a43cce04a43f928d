"""Malformed task items (issue 24, case 11) are refused by every path that reads them, training included (not only
--eval-only), naming the file, the entry and the id: a VQA question id that is not an int, a GQA one that is not
a string, an empty question or sentence, a label score outside [0, 1]."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from finetune_data import nlvr2_setup, qa_setup, write_json

from common.config import save_config
from tasks.cli import main as cli_main
from tasks.data.jsonio import DataFormatError
from tasks.engine.checkpointing import save_model_dir
from tasks.finetune import gqa, nlvr2, vqa
from tasks.finetune.nlvr2 import load_pair_items
from tasks.finetune.qa_data import load_qa_items

pytestmark = pytest.mark.usefixtures("one_thread")

ITEM = {"img_id": "img0001", "sent": "What colour is it?", "question_id": 5, "label": {"red": 1.0}}


@pytest.mark.parametrize(
    ("change", "qid_type", "message"),
    [
        ({"question_id": "5"}, int, r"entry 1 \(question_id '5'\): question_id must be an int for vqa"),
        ({"question_id": 5}, str, r"entry 1 \(question_id 5\): question_id must be a string for gqa"),
        ({"sent": ""}, int, r"entry 1 \(question_id 5\): the question \(sent\) is empty"),
        ({"sent": "  \t"}, int, r"entry 1 \(question_id 5\): the question \(sent\) is empty"),
        ({"img_id": ""}, int, r"entry 1 \(question_id 5\): img_id is empty"),
        ({"label": {"red": 1.5}}, int, r"entry 1 \(question_id 5\): label scores must lie in \[0, 1\]"),
        (
            {"label": {"red": float("nan")}},
            int,
            r"entry 1 \(question_id 5\): label scores must lie in \[0, 1\]",
        ),
    ],
)
def test_malformed_qa_items_are_named(tmp_path: Path, change, qid_type, message):
    good = {**ITEM, "question_id": 4 if qid_type is int else "4"}
    bad = {**ITEM, "question_id": 5 if qid_type is int else "5", **change}
    path = tmp_path / "items.json"
    path.write_text(json.dumps([good, bad]))  # json.dumps writes NaN, as Python's json reads it
    task = "vqa" if qid_type is int else "gqa"
    with pytest.raises(DataFormatError, match=message) as err:
        load_qa_items([path], question_id_type=qid_type, task=task)
    assert str(path) in str(err.value)


def _with_bad_train_item(cfg, change: dict) -> None:
    path = Path(cfg.data.train[0])
    items = json.loads(path.read_text())
    items[3].update(change)
    write_json(path, items)


@pytest.mark.parametrize(
    ("task", "change", "message"),
    [
        ("vqa", {"question_id": "4"}, "question_id must be an int for vqa"),
        ("vqa", {"sent": ""}, r"the question \(sent\) is empty"),
        ("gqa", {"question_id": 4}, "question_id must be a string for gqa"),
    ],
)
def test_training_refuses_them_before_any_step(tmp_path: Path, task, change, message):
    cfg = qa_setup(tmp_path, task=task, n_train=16, n_valid=4)
    _with_bad_train_item(cfg, change)
    with pytest.raises(DataFormatError, match=message):
        (vqa if task == "vqa" else gqa).build(cfg).train_dataset()


def test_cli_training_and_eval_only_refuse_in_one_line(tmp_path: Path, capsys):
    cfg = qa_setup(tmp_path, n_train=16, n_valid=4)
    _with_bad_train_item(cfg, {"question_id": "4"})
    config = str(save_config(cfg, tmp_path / "vqa.yaml"))
    assert cli_main(["vqa", "--config", config, "--output", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{cfg.data.train[0]}: entry 3 (question_id '4')" in err, err
    task = vqa.build(cfg)
    model = save_model_dir(tmp_path / "model", task.build_model(None), {"label2ans.json": task.answers})
    argv = ["vqa", "--eval-only", "--config", config, "--load", str(model), "--data", cfg.data.train[0]]
    assert cli_main([*argv, "--output", str(tmp_path / "pred")]) == 1
    err = capsys.readouterr().err.strip()
    assert "entry 3 (question_id '4'): question_id must be an int for vqa" in err, err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sent": ""}, r"entry 3 \(identifier 'train-3-0-0'\): the sentence \(sent\) is empty"),
        ({"img1": ""}, r"entry 3 \(identifier 'train-3-0-0'\): img0 and img1 must name images"),
    ],
)
def test_malformed_nlvr2_items_are_refused_in_training(tmp_path: Path, change, message):
    cfg = nlvr2_setup(tmp_path, n_images=10)
    _with_bad_train_item(cfg, change)
    with pytest.raises(DataFormatError, match=message):
        nlvr2.build(cfg).train_dataset()
    with pytest.raises(DataFormatError, match=message):
        load_pair_items(cfg.data.train)


def test_pretraining_labels_must_be_finite(tmp_path: Path):
    from tasks.pretrain.corpus import PretrainDataError, read_pretrain_json

    entry = {"img_id": "img1", "sentf": {"vqa": ["Is it red?"]}, "labelf": {"vqa": [{"yes": float("nan")}]}}
    path = tmp_path / "pre.json"
    path.write_text(json.dumps([entry]))
    with pytest.raises(PretrainDataError, match=r"pre.json: entry 0 .*img1.*scores must be finite"):
        read_pretrain_json(path)
