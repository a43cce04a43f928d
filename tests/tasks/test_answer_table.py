"""LXMERT's answer normalisation and answer files (real tables from ../shared/data)."""

from __future__ import annotations

import json

import pytest

from tasks.data.answer_table import load_answer_table, normalize_answer
from tasks.data.jsonio import DataFormatError


@pytest.mark.parametrize(
    "raw, want",
    [
        ("The Dog.", "dog"),
        ("a man", "man"),
        ("the man", "man"),
        ("an apple", "apple"),
        ("A the dog", "dog"),  # the original's three article checks run one after the other
        ("a an apple.", "apple"),
        ("dog .", "dog"),
        ("dog..", "dog."),  # one trailing "." only
        ("Two", "2"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("grey", "gray"),
        ("the Grey.", "gray"),
        ("grey cat", "grey cat"),  # conversions are whole answers
        ("the woman", "woman"),
        ("yes", "yes"),
        ("", ""),
        ("them", "them"),
        ("another", "another"),
        ("a", "a"),
    ],
)
def test_normalize_answer(raw: str, want: str) -> None:
    assert normalize_answer(raw) == want


def test_real_tables(shared_data) -> None:
    base = shared_data / "lxmert_answers"
    pretrain = load_answer_table(base / "all_ans.json")
    vqa = load_answer_table(base / "vqa_trainval_label2ans.json")
    gqa = load_answer_table(base / "gqa_trainval_label2ans.json")
    assert (len(pretrain), len(vqa), len(gqa)) == (9500, 3129, 1842)
    assert load_answer_table(base / "vqa_trainval_ans2label.json") == vqa
    assert load_answer_table(base / "gqa_trainval_ans2label.json") == gqa
    # the pretraining table was built from normalised answers
    assert all(normalize_answer(a) == a for a in pretrain)
    # fine-tuning matches convert_ans(task answer) against it: VQA 3124 of 3129, GQA 1736 of 1842
    table = set(pretrain)
    unmatched_vqa = [a for a in vqa if normalize_answer(a) not in table]
    assert unmatched_vqa == ["", "visilab", "5 star", "1 4", "1 world"]
    assert sum(normalize_answer(a) in table for a in gqa) == 1736
    # --qaSets: answers used by the named datasets, in file order
    sizes = [len(load_answer_table(base / "all_ans.json", datasets={d})) for d in ("vqa", "gqa", "visual7w")]
    assert sizes == [3124, 1735, 9409]
    both = load_answer_table(base / "all_ans.json", datasets=["vqa", "gqa"])
    assert both == [a for a in pretrain if a in set(both)] and len(both) < 3124 + 1735


def test_small_tables_round_trip(tmp_path) -> None:
    answers = ["yes", "no", "2"]
    (tmp_path / "label2ans.json").write_text(json.dumps(answers))
    (tmp_path / "ans2label.json").write_text(json.dumps({"no": 1, "2": 2, "yes": 0}))
    (tmp_path / "all_ans.json").write_text(
        json.dumps(
            [{"ans": "yes", "dsets": ["vqa"]}, {"ans": "no", "dsets": ["gqa"]}, {"ans": "2", "dsets": []}]
        )
    )
    assert load_answer_table(tmp_path / "label2ans.json") == answers
    assert load_answer_table(tmp_path / "ans2label.json") == answers
    assert load_answer_table(tmp_path / "all_ans.json") == answers
    assert load_answer_table(tmp_path / "all_ans.json", datasets=["gqa"]) == ["no"]


def test_bad_tables_rejected(tmp_path) -> None:
    (tmp_path / "x.json").write_text('{"a": 5}')
    with pytest.raises(ValueError, match=r"x.json: label 5 of answer 'a' is not in 0..0"):
        load_answer_table(tmp_path / "x.json")
    (tmp_path / "d.json").write_text('{"a": 0, "b": 0}')
    with pytest.raises(ValueError, match=r"d.json: label 0 is given to 'a' and to 'b'"):
        load_answer_table(tmp_path / "d.json")
    (tmp_path / "y.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="y.json: not an answer table"):
        load_answer_table(tmp_path / "y.json")
    (tmp_path / "z.json").write_text("[1, 2")
    with pytest.raises(DataFormatError, match=r"z.json:1:6: answer table is not valid JSON"):
        load_answer_table(tmp_path / "z.json")
    with pytest.raises(DataFormatError, match=r"answer table .*missing.json does not exist"):
        load_answer_table(tmp_path / "missing.json")
    (tmp_path / "l.json").write_text('["yes"]')
    with pytest.raises(ValueError, match="l.json: selecting answers by dataset.*needs all_ans.json"):
        load_answer_table(tmp_path / "l.json", datasets=["vqa"])
