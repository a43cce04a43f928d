"""VQA fine-tuning: soft-score targets and loss, bad input, answer-head transfer, a tiny run, stop and resume."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from finetune_data import COLOURS, TINY_MODEL, qa_setup, write_json
from safetensors.torch import load_file

from common.config import load_config
from extract.store import FeatureStore
from extract.tsv import import_tsv
from model import LxmertConfig, LxmertForPreTraining
from tasks.cli import main as cli_main
from tasks.config import TrainConfig
from tasks.data.answer_table import load_answer_table
from tasks.data.jsonio import DataFormatError
from tasks.data.regions import MissingImagesError
from tasks.engine.trainer import train
from tasks.finetune import vqa
from tasks.finetune.qa import qa_loss
from tasks.finetune.qa_data import QAItem, label_stats, load_qa_items, soft_target
from tasks.finetune.qa_model import build_qa_model

CONFIGS = Path(__file__).resolve().parents[2] / "tasks" / "configs"


# ------------------------------------------------------------------------------------------------ targets
def test_soft_target_keeps_table_answers_and_ignores_the_rest():
    ans2label = {"": 0, "red": 1, "blue": 2, "2": 3}
    target = soft_target({"red": 1.0, "blue": 0.3, "purple": 0.9}, ans2label, 4)
    assert target.tolist() == pytest.approx([0.0, 1.0, 0.3, 0.0])
    assert soft_target(None, ans2label, 4).tolist() == [0.0] * 4


def test_label_stats_count_answers_outside_the_table():
    items = [
        QAItem(1, "a", "q", {"red": 1.0, "purple": 0.3}),
        QAItem(2, "a", "q", {"purple": 1.0, "pink": 0.3}),
        QAItem(3, "a", "q", None),
    ]
    stats = label_stats(items, {"red": 0, "blue": 1})
    assert (stats.questions, stats.labelled, stats.answers_outside, stats.questions_without_answer) == (
        3,
        2,
        3,
        1,
    )


def test_bce_loss_is_lxmerts_mean_times_num_answers():
    torch.manual_seed(0)
    logits = torch.randn(3, 5)
    target = torch.tensor([[0, 1.0, 0.3, 0, 0], [0.9, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    by_hand = -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).mean() * 5
    assert qa_loss(logits, target, "bce").item() == pytest.approx(by_hand.item(), rel=1e-6)
    # CE on the argmax answer x the number of answers (the original's --mceLoss); the question with no
    # answer in the table is left out
    ce = F.cross_entropy(logits[:2], torch.tensor([1, 0])) * 5
    assert qa_loss(logits, target, "ce").item() == pytest.approx(ce.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------ bad input
def test_duplicate_question_ids_name_both_places(tmp_path: Path):
    a = write_json(tmp_path / "a.json", [{"img_id": "x", "sent": "q", "question_id": 7, "label": {}}])
    b = write_json(
        tmp_path / "b.json",
        [{"img_id": "y", "sent": "q", "question_id": 8}, {"img_id": "y", "sent": "q", "question_id": 7}],
    )
    with pytest.raises(
        DataFormatError,
        match=r"b\.json: entry 1 \(question_id 7\).*given twice \(first at .*a\.json: entry 0\)",
    ):
        load_qa_items([a, b])


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"img_id": "x", "sent": "q"', r"bad.json:1:29: .* is not valid JSON"),
        ('{"img_id": "x"}', r"top level is a dict, expected a list"),
        ('[{"img_id": "x", "sent": "q"}]', r"entry 0 .* lacks \['question_id'\]"),
        (
            '[{"img_id": "x", "sent": "q", "question_id": 1, "label": {"red": "high"}}]',
            r"question_id 1\).*numeric",
        ),
        ('[{"img_id": 3, "sent": "q", "question_id": 1}]', r"img_id and sent must be strings"),
    ],
)
def test_malformed_files_are_named(tmp_path: Path, content: str, message: str):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=message) as err:
        load_qa_items([path])
    assert "bad.json" in str(err.value)


def test_missing_images_are_an_error_or_dropped_and_counted(tmp_path: Path, caplog):
    cfg = qa_setup(tmp_path, n_train=20, n_valid=4)
    items = json.loads(Path(cfg.data.train[0]).read_text())
    items.append({"img_id": "COCO_nowhere_1", "sent": "q", "question_id": 99_999, "label": {"red": 1.0}})
    write_json(Path(cfg.data.train[0]), items)
    with pytest.raises(MissingImagesError, match=r"1 of 21 images.*COCO_nowhere_1.*allow_missing_images"):
        vqa.build(cfg).train_dataset()
    cfg.data.allow_missing_images = True
    with caplog.at_level(logging.WARNING):
        ds = vqa.build(cfg).train_dataset()
    assert len(ds) == 20 and "COCO_nowhere_1" in caplog.text


def test_no_answer_table_says_what_to_set(tmp_path: Path):
    cfg = qa_setup(tmp_path, n_train=20, n_valid=4)
    cfg.data.answers = ""
    with pytest.raises(DataFormatError, match="data.answers"):
        vqa.build(cfg).train_dataset()


def test_dataset_items_and_batches(tmp_path: Path):
    cfg = qa_setup(tmp_path, n_train=20, n_valid=4)
    task = vqa.build(cfg)
    ds = task.train_dataset()
    item = ds[0]
    assert item["input_ids"].shape == (cfg.data.max_seq_length,)
    assert item["input_ids"][0] == 101 and 102 in item["input_ids"].tolist()  # [CLS] ... [SEP]
    raw = json.loads(Path(cfg.data.train[0]).read_text())[0]
    assert item["target"].tolist() == pytest.approx([raw["label"].get(a, 0.0) for a in COLOURS])
    batch = task.collate([ds[i] for i in range(5)])
    assert batch["visual_feats"].shape == (5, 4, 8) and batch["visual_pos"].shape == (5, 4, 4)
    assert batch["target"].shape == (5, len(COLOURS)) and "visual_attention_mask" not in batch
    assert 0 <= batch["visual_pos"].min() and batch["visual_pos"].max() <= 1


# ------------------------------------------------------------------------------------------------ head transfer
def pretraining_checkpoint(path: Path, answers: list[str], **sizes) -> LxmertForPreTraining:
    """A tiny pretraining model with a QA head over ``answers``, saved at ``path`` (no answer table beside it)."""
    torch.manual_seed(0)
    sizes = {**TINY_MODEL, **sizes}
    cfg = LxmertConfig(**sizes, num_qa_labels=len(answers), num_object_labels=5, num_attr_labels=3)
    model = LxmertForPreTraining(cfg)
    with torch.no_grad():
        model.answer_head.logit_fc[3].bias.uniform_(0.5, 1.0)  # non-zero everywhere: zeroed rows are visible
    model.save_pretrained(path)
    return model


def test_head_transfer_copies_matching_rows_and_zeroes_the_rest(tmp_path: Path, caplog):
    source = ["blue", "red", "dog", "2", "green"]
    pre = pretraining_checkpoint(tmp_path / "pre", source)
    table = write_json(tmp_path / "all_ans.json", [{"ans": a, "dsets": ["vqa"]} for a in source])
    cfg = qa_setup(tmp_path, n_train=20, n_valid=4)
    answers = ["red", "Two", "yellow", "The Blue."]  # normalised like the pretraining table: 2, blue
    cfg.finetune.pretrain_answers = table
    with caplog.at_level(logging.INFO):
        model = build_qa_model(cfg, answers, str(tmp_path / "pre"))
    assert "3/4 answers copied" in caplog.text
    assert model.head_transfer.unmatched == ["yellow"]
    w, b = model.answer_head.logit_fc[3].weight, model.answer_head.logit_fc[3].bias
    src_w, src_b = pre.answer_head.logit_fc[3].weight, pre.answer_head.logit_fc[3].bias
    for row, j in [(0, 1), (1, 3), (3, 0)]:
        assert torch.equal(w[row], src_w[j]) and torch.equal(b[row], src_b[j])
    assert not w[2].any() and b[2] == 0  # unmatched: zero, as the original
    assert torch.equal(model.answer_head.logit_fc[0].weight, pre.answer_head.logit_fc[0].weight)
    mine, theirs = model.state_dict(), pre.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if k.startswith("lxmert."))  # backbone loaded
    # the table may also come from the label2ans.json beside the checkpoint
    write_json(tmp_path / "pre" / "label2ans.json", source)
    cfg.finetune.pretrain_answers = ""
    model2 = build_qa_model(cfg, answers, str(tmp_path / "pre"))
    assert torch.equal(model2.answer_head.logit_fc[3].weight, w)


def test_head_with_unknown_answers_asks_for_the_table(tmp_path: Path):
    pretraining_checkpoint(tmp_path / "pre", ["a", "b", "c"])
    cfg = qa_setup(tmp_path, n_train=20, n_valid=4)
    with pytest.raises(DataFormatError, match=r"3 answers, and no answer table.*finetune.pretrain_answers"):
        build_qa_model(cfg, COLOURS, str(tmp_path / "pre"))


def test_head_of_the_tasks_size_without_a_table_loads_as_is(tmp_path: Path, caplog):
    """e.g. unc-nlp/lxmert-vqa-uncased: 3129 outputs, no label2ans.json: taken as the task's table."""
    pre = pretraining_checkpoint(tmp_path / "hub_like", ["w", "x", "y", "z"])
    cfg = qa_setup(tmp_path, n_train=4, n_valid=2)
    with caplog.at_level(logging.WARNING):
        model = build_qa_model(cfg, COLOURS, str(tmp_path / "hub_like"))
    assert "assuming it was trained on this answer table" in caplog.text
    assert torch.equal(model.answer_head.logit_fc[3].weight, pre.answer_head.logit_fc[3].weight)


@pytest.mark.parametrize("task, copied, zeroed", [("vqa", 3124, 5), ("gqa", 1736, 106)])
def test_transfer_counts_with_lxmerts_tables(
    shared_data: Path, tmp_path: Path, task: str, copied: int, zeroed: int
):
    tables = shared_data / "lxmert_answers"
    if not (tables / "all_ans.json").is_file():
        pytest.skip(f"{tables}/all_ans.json is missing")
    source = load_answer_table(tables / "all_ans.json")
    answers = load_answer_table(tables / f"{task}_trainval_label2ans.json")
    pretraining_checkpoint(tmp_path / "pre", source)
    cfg = qa_setup(tmp_path, n_train=4, n_valid=2)
    cfg.finetune.pretrain_answers = str(tables / "all_ans.json")
    model = build_qa_model(cfg, answers, str(tmp_path / "pre"))
    report = model.head_transfer
    assert (report.matched, report.total - report.matched) == (copied, zeroed)
    if task == "vqa":
        assert report.unmatched == ["", "visilab", "5 star", "1 4", "1 world"]
    zero_rows = (model.answer_head.logit_fc[3].weight.abs().sum(1) == 0).sum().item()
    assert zero_rows == zeroed


# ------------------------------------------------------------------------------------------------ training
def majority_score(valid_json: str) -> float:
    """The soft score of always answering the most common valid answer."""
    items = json.loads(Path(valid_json).read_text())
    return max(sum(it["label"].get(a, 0.0) for it in items) / len(items) for a in COLOURS)


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory) -> tuple[Path, dict, object]:
    root = tmp_path_factory.mktemp("vqa_run")
    cfg = qa_setup(root, n_train=128, n_valid=40)
    cfg.train.epochs = 4
    cfg.optim.lr = 2e-3
    summary = train(cfg, vqa.build(cfg), root / "run")
    return root, summary, cfg


def test_tiny_finetune_beats_the_majority_answer(vqa_run):
    root, summary, cfg = vqa_run
    baseline = majority_score(cfg.data.valid)
    assert baseline < 0.5
    assert summary["best_score"] > baseline + 0.25
    lines = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in lines if r["split"] == "valid"]
    assert len(valid) == 4 and all("accuracy" in r and "oracle" in r for r in valid)


def test_model_folder_carries_answers_and_extractor(vqa_run):
    root, _, _ = vqa_run
    best = root / "run" / "best"
    assert json.loads((best / "label2ans.json").read_text()) == COLOURS
    extractor = json.loads((best / "extractor.json").read_text())
    assert extractor == [
        {"weights": "tiny.pkl", "weights_sha256": "ab" * 32, "selection": "top36", "min_size": 600}
    ]
    features = json.loads((best / "features.json").read_text())
    assert features["feature_dim"] == 8 and features["stores"][0]["path"].endswith("feats.lmdb")
    # and the folder loads back as the same model (its own head, no transfer)
    cfg = qa_setup(root / "again", n_train=4, n_valid=2)
    model = vqa.build(cfg).build_model(str(best))
    saved = load_file(str(best / "model.safetensors"))
    assert torch.equal(model.answer_head.logit_fc[3].weight, saved["answer_head.logit_fc.3.weight"])



def test_task_knows_its_model_folder_before_the_model_is_built(vqa_run):
    """A task built with --load reads the folder's answer table and stores whatever is called first (no hidden
    ordering: datasets before build_model)."""
    root, _, cfg = vqa_run
    best = root / "run" / "best"
    bare = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, answers="", features=[]))
    task = vqa.build(bare, str(best))
    valid = task.valid_dataset()  # before build_model: the folder's label2ans.json and features.json
    assert task.answers == COLOURS and len(valid) == 40
    assert [str(p) for p in task.features.paths] == cfg.data.features
    with pytest.raises(DataFormatError, match="no feature store"):
        vqa.build(bare).valid_dataset()

def test_stopped_and_resumed_equals_uninterrupted(tmp_path: Path):
    def run(run_dir: Path, max_steps: int | None = None, resume: bool = False) -> dict:
        cfg = qa_setup(tmp_path / "data", n_train=48, n_valid=8)
        cfg.train.epochs = 2
        cfg.model.hidden_dropout_prob = 0.1  # dropout draws must resume too
        return train(cfg, vqa.build(cfg), run_dir, max_steps=max_steps, resume=resume)

    run(tmp_path / "whole")
    run(tmp_path / "parts", max_steps=4)  # mid-epoch 2 (3 steps per epoch)
    run(tmp_path / "parts", resume=True)
    a = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "parts" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_real_features_and_tables_from_pretraining_to_predictions(
    coco_tsv: Path, shared_data: Path, tmp_path: Path
):
    """The original LXMERT TSV features (36 x 2048) and LXMERT's answer tables: a pretraining folder (as our
    pretraining runs leave it, label2ans.json beside) -> fine-tuning with the tiny config -> --eval-only."""
    tables = shared_data / "lxmert_answers"
    if not (tables / "vqa_trainval_label2ans.json").is_file():
        pytest.skip(f"{tables} lacks the answer tables")
    import_tsv(coco_tsv, tmp_path / "coco.lmdb")
    with FeatureStore(tmp_path / "coco.lmdb") as store:
        ids = store.ids()
    items = [
        {
            "img_id": img_id,
            "sent": "What color is the sky?",
            "question_id": 1000 + k,
            "label": {"blue": 1.0, "gray": 0.3},
        }
        for k, img_id in enumerate(ids)
    ]
    data = write_json(tmp_path / "vqa.json", items)
    source = load_answer_table(tables / "all_ans.json")
    pretraining_checkpoint(tmp_path / "pre", source, visual_feat_dim=2048)
    write_json(tmp_path / "pre" / "label2ans.json", source)
    config = load_config(
        TrainConfig,
        CONFIGS / "vqa_tiny.yaml",
        [
            f"data.train=[{data}]",
            f"data.valid={data}",
            f"data.features=[{tmp_path / 'coco.lmdb'}]",
            f"data.answers={tables / 'vqa_trainval_label2ans.json'}",
            "data.batch_size=5",
            "train.epochs=1",
            "train.amp=none",
            "train.device=cpu",
        ],
    )
    task = vqa.build(config)
    summary = train(config, task, tmp_path / "run", load=str(tmp_path / "pre"))
    assert summary["step"] == 2 and 0 <= summary["best_score"] <= 1
    best = tmp_path / "run" / "best"
    assert len(json.loads((best / "label2ans.json").read_text())) == 3129
    assert json.loads((best / "extractor.json").read_text())[0]["source"] == "tsv"
    out = tmp_path / "pred"
    assert cli_main(["vqa", "--eval-only", "--load", str(best), "--data", data, "--output", str(out)]) == 0
    preds = json.loads((out / "predictions.json").read_text())
    assert [p["question_id"] for p in preds] == [it["question_id"] for it in items]
    answers = set(load_answer_table(tables / "vqa_trainval_label2ans.json"))
    assert all(p["answer"] in answers for p in preds)
