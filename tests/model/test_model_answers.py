"""The pretraining-QA-head -> task-head surgery (real answer tables)."""

from __future__ import annotations

import torch

from model import LxmertConfig, LxmertForPreTraining, LxmertForQuestionAnswering
from model.answers import answer_index_map, qa_model_from_pretraining, transfer_answer_head
from tasks.data.answer_table import load_answer_table, normalize_answer


def _tables(shared_data):
    base = shared_data / "lxmert_answers"
    return (
        load_answer_table(base / "all_ans.json"),
        [normalize_answer(a) for a in load_answer_table(base / "vqa_trainval_label2ans.json")],
        [normalize_answer(a) for a in load_answer_table(base / "gqa_trainval_label2ans.json")],
    )


def test_answer_index_map(shared_data):
    pretrain, vqa, gqa = _tables(shared_data)
    for target, want in ((vqa, 3124), (gqa, 1736)):
        mapping = answer_index_map(pretrain, target)
        matched = [i for i, j in enumerate(mapping) if j is not None]
        assert all(target[i] == pretrain[mapping[i]] for i in matched)
        assert len(matched) == want
    assert answer_index_map(["a", "b", "a"], ["a", "c", "b"]) == [0, None, 1]


def test_transfer_copies_rows(shared_data):
    pretrain, vqa, _ = _tables(shared_data)
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
    target_answers = [normalize_answer(a) for a in ["no", "Grey", "the dog", "two", "yes"]]
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
