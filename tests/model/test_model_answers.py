"""LXMERT answer normalisation and the pretraining-QA-head -> task-head surgery (real answer tables)."""

from __future__ import annotations

import pytest
import torch

from model import (
    LxmertConfig,
    LxmertForPreTraining,
    LxmertForQuestionAnswering,
    load_answer_table,
    normalize_answer,
)
from model.answers import answer_index_map, qa_model_from_pretraining, transfer_answer_head


@pytest.mark.parametrize(
    "raw, want",
    [
        ("The Dog.", "dog"),
        ("a man", "man"),
        ("an apple", "apple"),
        ("Two", "2"),
        ("ten", "10"),
        ("grey", "gray"),
        ("the woman", "woman"),
        ("yes", "yes"),
        ("", ""),
        ("them", "them"),
    ],
)
def test_normalize_answer(raw, want):
    assert normalize_answer(raw) == want


def _tables(shared_data):
    base = shared_data / "lxmert_answers"
    return (
        load_answer_table(base / "all_ans.json"),
        load_answer_table(base / "vqa_trainval_label2ans.json"),
        load_answer_table(base / "gqa_trainval_label2ans.json"),
        load_answer_table(base / "vqa_trainval_ans2label.json"),
    )


def test_answer_tables_and_matches(shared_data):
    pretrain, vqa, gqa, vqa_from_ans2label = _tables(shared_data)
    assert (len(pretrain), len(vqa), len(gqa)) == (9500, 3129, 1842)
    assert vqa_from_ans2label == vqa
    for target, want in ((vqa, 3124), (gqa, 1736)):
        mapping = answer_index_map(pretrain, target)
        matched = [i for i, j in enumerate(mapping) if j is not None]
        # every matched pair really is the same answer after normalisation
        assert all(
            normalize_answer(target[i]) in (pretrain[mapping[i]], normalize_answer(pretrain[mapping[i]]))
            for i in matched
        )
        assert len(matched) == want


def test_transfer_copies_rows(shared_data):
    pretrain, vqa, _, _ = _tables(shared_data)
    torch.manual_seed(0)
    source = LxmertForPreTraining(_small_config(num_qa_labels=9500))
    target = LxmertForQuestionAnswering(_small_config(num_qa_labels=len(vqa)))
    report = transfer_answer_head(source.answer_head, target.answer_head, pretrain, vqa)
    assert report.total == 3129 and report.matched == 3129 - len(report.unmatched)
    mapping = answer_index_map(pretrain, vqa)
    w_src, w_tgt = source.answer_head.logit_fc[3].weight, target.answer_head.logit_fc[3].weight
    for row in (0, 1, 2, 100, 3128):
        j = mapping[row]
        if j is None:
            assert w_tgt[row].abs().sum() == 0 and target.answer_head.logit_fc[3].bias[row] == 0
        else:
            assert torch.equal(w_tgt[row], w_src[j])
    assert torch.equal(target.answer_head.logit_fc[0].weight, source.answer_head.logit_fc[0].weight)
    assert "3129" in report.summary()


def _small_config(**overrides) -> LxmertConfig:
    fields = dict(
        hidden_size=16, num_attention_heads=2, intermediate_size=32, l_layers=1, r_layers=1, x_layers=1
    )
    return LxmertConfig(**{**fields, "vocab_size": 50, **overrides})


def test_qa_model_from_pretraining_checkpoint(tmp_path):
    config = _small_config(num_qa_labels=4)
    torch.manual_seed(0)
    pretrained = LxmertForPreTraining(config)
    pretrained.save_pretrained(tmp_path)
    source_answers = ["dog", "2", "gray", "yes"]
    target_answers = ["no", "Grey", "the dog", "two", "yes"]
    model, report = qa_model_from_pretraining(tmp_path, target_answers, source_answers)
    assert (report.matched, report.total, report.unmatched) == (4, 5, ["no"])
    assert model.config.num_qa_labels == 5
    w = model.answer_head.logit_fc[3].weight
    src = pretrained.answer_head.logit_fc[3].weight
    assert (
        torch.equal(w[1], src[2])
        and torch.equal(w[2], src[0])
        and torch.equal(w[3], src[1])
        and torch.equal(w[4], src[3])
    )
    assert w[0].abs().sum() == 0
    assert torch.equal(model.lxmert.pooler.dense.weight, pretrained.lxmert.pooler.dense.weight)


def test_bad_tables_rejected(tmp_path):
    (tmp_path / "x.json").write_text('{"a": 5}')
    with pytest.raises(ValueError, match=r"x.json: label 5"):
        load_answer_table(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an answer table"):
        load_answer_table(tmp_path / "y.json")
