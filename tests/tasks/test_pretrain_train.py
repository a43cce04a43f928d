"""Pretraining through the shared trainer: the run's logs, and a run stopped and resumed (with data workers)
reaching bitwise the weights of an uninterrupted one (masks and negatives included)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from region_labels import random_labels
from safetensors.torch import load_file
from tiny_bert import LANGUAGE_PREFIXES, bert_name, save_tiny_bert

from common.config import load_config
from extract.store import FeatureStore, FeatureWriter
from extract.tsv import import_tsv
from tasks.config import TrainConfig
from tasks.pretrain.task import build

trainer = pytest.importorskip("tasks.engine.trainer")

ROOT = Path(__file__).resolve().parents[2]
DIM = 8
ANSWERS = ["yes", "no", "2", "cat", "dog", "red"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tasks/conftest.py


@pytest.fixture
def config_for(tmp_path: Path):
    rng = np.random.default_rng(1)
    ids = [f"img{i}" for i in range(6)]
    with FeatureWriter(tmp_path / "f.lmdb", extractor={"source": "tsv", "file": "x.tsv"}) as writer:
        for img_id in ids:
            xy = rng.uniform(0, 100, (5, 2))
            writer.put(
                img_id,
                {
                    "features": rng.normal(0.0, 1.0, (5, DIM)).astype(np.float32),
                    "boxes": np.concatenate([xy, xy + 50], 1).astype(np.float32),
                    **random_labels(rng, 5, conf_low=0.1),
                    "img_h": 200,
                    "img_w": 200,
                },
            )
    data = [
        {
            "img_id": img_id,
            "sentf": {
                "mscoco": ["a cat on a red mat", "two dogs in a park"],
                "vqa": ["what is it?", "how many?"],
            },
            "labelf": {"vqa": [{"cat": 1.0, "dog": 0.3}, {ANSWERS[k]: 1.0}]},
        }
        for k, img_id in enumerate(ids)
    ]
    (tmp_path / "p.json").write_text(json.dumps(data))
    (tmp_path / "answers.json").write_text(json.dumps(ANSWERS))

    def make(*overrides: str) -> TrainConfig:
        return load_config(
            TrainConfig,
            ROOT / "tasks" / "configs" / "pretrain_tiny.yaml",
            [
                f"data.train=[{tmp_path / 'p.json'}]",
                f"data.valid={tmp_path / 'p.json'}",
                f"data.features=[{tmp_path / 'f.lmdb'}]",
                f"data.answers={tmp_path / 'answers.json'}",
                f"model.visual_feat_dim={DIM}",
                "model.hidden_size=32",
                "model.intermediate_size=64",
                "model.l_layers=1",
                "data.batch_size=8",
                "train.epochs=2",
                "train.amp=none",
                "train.device=cpu",
                *overrides,
            ],
        )

    return make


def test_resumed_run_equals_uninterrupted(config_for, tmp_path: Path):
    whole = tmp_path / "whole"
    trainer.train(config_for(), build(config_for()), whole)
    lines = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    train_line = next(x for x in lines if x["split"] == "train")
    valid_line = next(x for x in lines if x["split"] == "valid")
    for name in ("mlm", "matched", "obj", "attr", "feat", "qa"):
        assert np.isfinite(train_line[f"loss_{name}"]) and np.isfinite(valid_line[f"loss_{name}"])
    assert 0 <= valid_line["qa_accuracy"] <= 1
    assert json.loads((whole / "final" / "label2ans.json").read_text()) == ANSWERS
    assert json.loads((whole / "final" / "features.json").read_text())["feature_dim"] == DIM

    parts = tmp_path / "parts"
    trainer.train(config_for(), build(config_for()), parts, max_steps=4)
    workers = config_for("data.workers=2")  # the draws depend on (seed, epoch, index) only
    trainer.train(workers, build(workers), parts, resume=True)
    a = load_file(whole / "final" / "model.safetensors")
    b = load_file(parts / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_pretraining_from_bert_keeps_its_weights_through_the_first_step(config_for, tmp_path: Path, caplog):
    """--load <BERT>: embeddings, the language layer, pooler, MLM and matching heads from BERT; after the first
    optimizer step (lr 0 under the warmup, as the original's schedule) they still equal BERT's."""
    caplog.set_level(logging.INFO, logger="model.bert_init")
    bert = save_tiny_bert(tmp_path / "bert", hidden_size=32, num_attention_heads=4, intermediate_size=64)
    config = config_for("model.num_attention_heads=4")
    summary = trainer.train(config, build(config), tmp_path / "run", load=str(tmp_path / "bert"), max_steps=1)
    assert summary["step"] == 1
    step = load_file(tmp_path / "run" / "checkpoints" / "step_00000001" / "model.safetensors")
    from_bert = [k for k in step if k.startswith((*LANGUAGE_PREFIXES, "cls.")) and bert_name(k) in bert]
    assert {k.split(".")[1] for k in from_bert} >= {"embeddings", "encoder", "pooler", "predictions"}
    for key in from_bert:
        assert torch.equal(step[key], bert[bert_name(key)]), key
    assert not step["lxmert.encoder.x_layers.0.lang_output.dense.bias"].any()  # the rest: LXMERT's init
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] == 0 and np.isfinite(first["loss"])
    assert f"{len(from_bert)} tensors from BERT" in caplog.text


def test_real_lxmert_features_and_answer_table(coco_tsv: Path, shared_data: Path, tmp_path: Path):
    """The original LXMERT TSV features (36 x 2048, imported into a store) and the real 9500-answer table through
    the shipped tiny config: one training step and a validation."""
    answers = shared_data / "lxmert_answers" / "all_ans.json"
    if not answers.is_file():
        pytest.skip(f"{answers} is missing")
    import_tsv(coco_tsv, tmp_path / "coco.lmdb")
    with FeatureStore(tmp_path / "coco.lmdb") as store:
        ids = store.ids()
    assert len(ids) == 10
    data = [
        {
            "img_id": img_id,
            "sentf": {"mscoco": ["a photo of something"], "vqa": ["what color is it?"]},
            "labelf": {"vqa": [{"White.": 0.6, "the grey": 1.0}]},
        }
        for img_id in ids
    ]
    (tmp_path / "p.json").write_text(json.dumps(data))
    config = load_config(
        TrainConfig,
        ROOT / "tasks" / "configs" / "pretrain_tiny.yaml",
        [
            f"data.train=[{tmp_path / 'p.json'}]",
            f"data.valid={tmp_path / 'p.json'}",
            f"data.features=[{tmp_path / 'coco.lmdb'}]",
            f"data.answers={answers}",
            "data.batch_size=8",
            "train.epochs=1",
            "train.amp=none",
            "train.device=cpu",
        ],
    )
    task = build(config)
    assert task.train_corpus.label(1)[0].size == 2  # "white" and "gray" are in the table
    summary = trainer.train(config, task, tmp_path / "run", max_steps=1)
    assert summary["step"] == 1
    features = json.loads((tmp_path / "run" / "final" / "features.json").read_text())
    assert features["feature_dim"] == 2048 and features["stores"][0]["extractor"]["source"] == "tsv"
