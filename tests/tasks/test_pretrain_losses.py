"""tasks.pretrain.task: each loss against a hand computation, QA schedule, overfitting, validation, warnings."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from region_labels import random_labels
from torch.utils.data import DataLoader

from common.config import load_config
from extract.store import FeatureWriter
from tasks.config import TrainConfig
from tasks.data.regions import RegionFeatures
from tasks.pretrain.task import build

ROOT = Path(__file__).resolve().parents[2]
DIM = 8
ANSWERS = ["yes", "no", "2", "cat", "dog", "red", "man", "gray"]
SENTENCES = [
    "a cat sitting on a red mat next to the window",
    "two dogs are playing with a frisbee in the park",
    "a man riding a bicycle down a busy city street",
    "a plate of food with broccoli and rice",
]
RANDOM_DETECTOR = {
    "weights": None,
    "weights_sha256": None,
    "random_weights": True,
    "seed": 0,
    "selection": "caffe",
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tasks/conftest.py


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    ids = [f"img{i}" for i in range(6)]
    rng = np.random.default_rng(0)
    with FeatureWriter(tmp_path / "f.lmdb", extractor={"source": "tsv", "file": "x.tsv"}) as writer:
        for img_id in ids:
            xy = rng.uniform(0, 100, (6, 2))
            writer.put(
                img_id,
                {
                    "features": rng.normal(0.0, 1.0, (6, DIM)).astype(np.float32),
                    "boxes": np.concatenate([xy, xy + rng.uniform(10, 100, (6, 2))], 1).astype(np.float32),
                    **random_labels(rng, 6, conf_low=0.1),
                    "img_h": 200,
                    "img_w": 200,
                },
            )
    data = [
        {
            "img_id": img_id,
            "sentf": {"mscoco": [SENTENCES[k % 4]], "vqa": ["what animal is on the mat?", "how many dogs?"]},
            "labelf": {"vqa": [{"cat": 1.0, "dog": 0.3}, {ANSWERS[k % 8]: 1.0}]},
        }
        for k, img_id in enumerate(ids)
    ]
    (tmp_path / "p.json").write_text(json.dumps(data))
    return {"json": tmp_path / "p.json", "store": tmp_path / "f.lmdb"}


def make_config(files: dict[str, Path], *overrides: str) -> TrainConfig:
    answers = files["json"].parent / "answers.json"
    answers.write_text(json.dumps(ANSWERS))
    return load_config(
        TrainConfig,
        ROOT / "tasks" / "configs" / "pretrain_tiny.yaml",
        [
            f"data.train=[{files['json']}]",
            f"data.valid={files['json']}",
            f"data.features=[{files['store']}]",
            f"data.answers={answers}",
            f"model.visual_feat_dim={DIM}",
            "model.hidden_size=32",
            "model.intermediate_size=64",
            "model.l_layers=1",
            *overrides,
        ],
    )


def hand_losses(model, batch: dict, masked_only: bool = False) -> dict[str, torch.Tensor]:
    """The original's losses written out from the heads on the backbone's outputs (full logits everywhere)."""
    out = model.lxmert(
        input_ids=batch["input_ids"],
        visual_feats=batch["visual_feats"],
        visual_pos=batch["visual_pos"],
        attention_mask=batch["attention_mask"],
        token_type_ids=batch["token_type_ids"],
    )
    lang, visn, pooled = out.language_output, out.vision_output, out.pooled_output

    def ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # per row, target -100 -> 0
        logp = torch.log_softmax(logits.double(), -1)
        return -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (target != -100)

    labels = batch["mlm_labels"]
    mlm = ce(model.cls.predictions(lang), labels).sum() / (labels != -100).sum()
    matched = ce(model.cls.seq_relationship(pooled), batch["matched_label"]).mean()
    qa_target = batch["qa_target"]
    qa = ce(model.answer_head(pooled), qa_target).sum() / (qa_target != -100).sum()
    heads = model.obj_predict_head(visn)
    n_regions = visn.shape[0] * visn.shape[1]
    mask = batch["feat_mask"].double()
    obj_w = batch["obj_conf"].double() * (mask if masked_only else 1)
    attr_w = batch["attr_conf"].double() * (mask if masked_only else 1)
    obj = (ce(heads["obj"], batch["obj_ids"]) * obj_w).sum() / n_regions / 0.15
    attr = (ce(heads["attr"], batch["attr_ids"]) * attr_w).sum() / n_regions / 0.15
    diff = (heads["feat"].double() - batch["feat_target"].double()).abs()
    smooth_l1 = torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean(-1)
    feat = (smooth_l1 * mask).sum() / n_regions / 0.15
    return {"mlm": mlm, "matched": matched, "obj": obj, "attr": attr, "feat": feat, "qa": qa}


@pytest.mark.parametrize("masked_only", [False, True])
def test_each_loss_equals_hand_computation(files, masked_only):
    task = build(make_config(files, f"pretrain.visual_losses_masked_only={str(masked_only).lower()}"))
    torch.manual_seed(0)
    model = task.build_model(None).eval()
    ds = task.train_dataset()
    batch = task.collate([ds[i] for i in range(len(ds))])
    assert (
        (batch["qa_target"] != -100).any()
        and (batch["matched_label"] == 0).any()
        and batch["feat_mask"].any()
    )
    with torch.no_grad():
        out = task.step(model, batch, epoch=0)
        expected = hand_losses(model, batch, masked_only)
        raw = task.forward(model, batch)
    assert set(out.parts) == set(expected)
    for name, value in expected.items():
        assert float(out.parts[name]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), name
    assert float(out.loss) == pytest.approx(sum(float(v) for v in expected.values()), rel=1e-5)
    # the efficient path: vocabulary logits only at the masked tokens; same MLM loss as the model's own
    assert raw.prediction_logits.shape == (int((batch["mlm_labels"] != -100).sum()), 30522)
    assert float(raw.losses["mlm"]) == pytest.approx(float(out.parts["mlm"]), rel=1e-6)


def test_qa_schedule_two_stages(files):
    task = build(make_config(files, "pretrain.qa_start_epoch=2", "pretrain.qa_weight=2.0"))
    torch.manual_seed(0)
    model = task.build_model(None).eval()
    ds = task.train_dataset()
    batch = task.collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        early, late = task.step(model, batch, epoch=1), task.step(model, batch, epoch=2)
    parts = {k: float(v) for k, v in early.parts.items()}
    assert float(early.loss) == pytest.approx(sum(v for k, v in parts.items() if k != "qa"), rel=1e-6)
    assert float(late.loss) == pytest.approx(sum(parts.values()) + parts["qa"], rel=1e-6)


def test_disabled_objectives_are_not_computed(files):
    task = build(
        make_config(files, "pretrain.matched=false", "pretrain.qa=false", "pretrain.visual_losses=[feat]")
    )
    model = task.build_model(None)
    assert not hasattr(model, "answer_head") and list(model.obj_predict_head.decoder_dict) == ["feat"]
    ds = task.train_dataset()
    batch = task.collate([ds[i] for i in range(8)])
    assert batch["matched_label"].eq(1).all()  # no negatives drawn
    assert set(task.step(model, batch, 0).parts) == {"mlm", "feat"}


def test_every_objective_overfits_16_examples(files):
    task = build(make_config(files, "model.hidden_dropout_prob=0", "model.attention_probs_dropout_prob=0"))
    torch.manual_seed(0)
    model = task.build_model(None)
    ds = task.train_dataset()
    batch = task.collate([ds[i] for i in range(16)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    with torch.no_grad():
        before = {k: float(v) for k, v in task.step(model, batch, 0).parts.items()}
    for _ in range(60):
        out = task.step(model, batch, 0)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = {k: float(v) for k, v in task.step(model, batch, 0).parts.items()}
    assert set(before) == {"mlm", "matched", "obj", "attr", "feat", "qa"}
    for name in before:
        assert after[name] < 0.6 * before[name], (name, before[name], after[name])


def test_validation_is_fixed_and_counts_matched_pairs_only(files):
    task = build(make_config(files, "data.eval_batch_size=8"))
    torch.manual_seed(0)
    model = task.build_model(None).eval()
    valid = task.valid_dataset()
    loader = DataLoader(valid, batch_size=8, collate_fn=task.collate)
    with torch.no_grad():
        first = task.evaluate(model, loader, torch.device("cpu"))
        valid.set_epoch(5)
        second = task.evaluate(model, loader, torch.device("cpu"))
    assert first == second
    assert {
        "loss",
        "loss_mlm",
        "loss_matched",
        "loss_obj",
        "loss_attr",
        "loss_feat",
        "loss_qa",
        "qa_accuracy",
    } <= set(first)
    assert first["score"] == -first["loss"]
    assert first["loss"] == pytest.approx(sum(v for k, v in first.items() if k.startswith("loss_")))
    # QA accuracy by hand: soft score of the argmax answer, over matched items with a label
    score = count = 0.0
    for i in range(len(valid)):
        item = valid[i]
        answers, scores = task.valid_corpus.label(i)
        if not item["matched_label"] or len(answers) == 0:
            continue
        with torch.no_grad():
            out = task.forward(model, task.collate([item]))
        pred = int(out.question_answering_score.argmax())
        score += float(scores[list(answers).index(pred)]) if pred in answers else 0.0
        count += 1
    assert 0 < count < sum(len(task.valid_corpus.label(i)[0]) > 0 for i in range(len(valid)))
    assert first["qa_count"] == count and first["qa_accuracy"] == pytest.approx(score / count)


def test_random_weight_store_warns_for_label_losses(files, tmp_path: Path, caplog):
    with FeatureWriter(tmp_path / "rand.lmdb", extractor=RANDOM_DETECTOR) as writer:
        source = RegionFeatures([files["store"]])
        for i in range(6):
            r = source[f"img{i}"]
            rec = dict(features=r.features, boxes=r.boxes * 200, obj_ids=r.obj_ids, obj_conf=r.obj_conf)
            writer.put(
                f"img{i}",
                {**rec, "attr_ids": r.attr_ids, "attr_conf": r.attr_conf, "img_h": 200, "img_w": 200},
            )
    store = f"data.features=[{tmp_path / 'rand.lmdb'}]"
    with caplog.at_level(logging.WARNING, logger="tasks.pretrain.task"):
        build(make_config(files, store))
    assert "RANDOM weights" in caplog.text and str(tmp_path / "rand.lmdb") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tasks.pretrain.task"):
        task = build(make_config(files, store, "pretrain.visual_losses=[feat]"))
    assert "RANDOM" not in caplog.text
    assert task.checkpoint_extras()["features.json"]["stores"][0]["random_weights"] is True


def test_bad_settings_are_refused(files):
    for override, pattern in [
        ("pretrain.word_mask_rate=0", r"pretrain.word_mask_rate: must be in \(0, 1\], got 0.0"),
        ("pretrain.obj_mask_rate=1.5", r"pretrain.obj_mask_rate: must be in \(0, 1\], got 1.5"),
        ("data.max_seq_length=2", r"data.max_seq_length: must be in \[3, inf\), got 2"),
        ("pretrain.visual_losses=[obj,depth]", r"pretrain.visual_losses: unknown \['depth'\]"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            build(make_config(files, override))


def test_feature_size_mismatch_and_answers_in_extras(files):
    task = build(make_config(files, "model.visual_feat_dim=16"))
    with pytest.raises(
        ValueError, match=r"expects 16-d region features .* hold 8-d.*model.visual_feat_dim: 8"
    ):
        task.build_model(None)
    task = build(make_config(files))
    extras = task.checkpoint_extras()
    assert extras["label2ans.json"] == ANSWERS and extras["features.json"]["feature_dim"] == DIM
    assert extras["extractor.json"] == [{"source": "tsv", "file": "x.tsv"}]
    assert task.build_model(None).config.num_qa_labels == len(ANSWERS)


def test_loaded_checkpoint_keeps_the_heads(files, tmp_path: Path):
    task = build(make_config(files))
    torch.manual_seed(0)
    model = task.build_model(None)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = task.build_model(str(tmp_path / "ckpt"))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.config.visual_loss_normalizer == pytest.approx(1 / 0.15)
