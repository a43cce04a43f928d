"""NLVR2 accuracy and consistency as lil-lab/nlvr's metrics.py: case-insensitive labels, grouping by the
identifier with the pair id blanked, missing predictions."""

from __future__ import annotations

import json

import pytest

from tasks.metrics import MetricInputError, evaluate_nlvr2, parse_examples, parse_predictions_csv
from tasks.metrics.nlvr2 import consistency_key


def jsonl(*rows: tuple[str, str]) -> str:
    return "\n".join(json.dumps({"identifier": i, "sentence": "s", "label": lab}) for i, lab in rows) + "\n"


DEV = jsonl(
    ("dev-1-0-0", "True"),  # group dev-1--0
    ("dev-1-1-0", "False"),
    ("dev-1-2-0", "True"),
    ("dev-1-0-1", "False"),  # group dev-1--1 (another sentence of the same set)
    ("dev-2-0-3", "True"),  # group dev-2--3
    ("dev-2-1-3", "True"),
)


def test_accuracy_and_consistency():
    preds = parse_predictions_csv(
        [
            "dev-1-0-0,True",
            "dev-1-1-0,false",  # case-insensitive
            "dev-1-2-0,TRUE",
            "dev-1-0-1,False,0.93",  # further fields ignored
            "",  # blank line skipped
            "dev-2-0-3,True",
            "dev-2-1-3, True",  # " True" != "true": wrong (only the line is stripped)
            "test1-9-9-9,True",  # not in the data: ignored
        ]
    )
    s = evaluate_nlvr2(parse_examples(DEV), preds)
    assert s["accuracy"] == pytest.approx(5 / 6)
    # dev-1--0 all right, dev-1--1 right, dev-2--3 has a wrong one
    assert s["consistency"] == pytest.approx(2 / 3)
    assert (s["examples"], s["sentences"]) == (6, 3)


def test_repeated_prediction_is_refused_and_keys():
    # the official dict silently keeps the last line: we refuse
    with pytest.raises(
        MetricInputError, match=r"p.csv:3: identifier 'dev-1-0-0' is predicted twice \(first on line 1\)"
    ):
        parse_predictions_csv(["dev-1-0-0,False", "", "dev-1-0-0,True"], source="p.csv")
    assert consistency_key("dev-850-0-0") == "dev-850--0"
    assert consistency_key("test1-12-3-2") == "test1-12--2"
    with pytest.raises(MetricInputError, match="not 'split-set_id-pair_id-sentence_id'"):
        consistency_key("dev-850")


def test_missing_predictions_are_listed():
    preds = {"dev-1-0-0": "True", "dev-1-1-0": "False", "other-1-1-1": "True"}
    with pytest.raises(MetricInputError) as e:
        evaluate_nlvr2(parse_examples(DEV), preds, predictions_source="p.csv")
    msg = str(e.value)
    assert "p.csv: some predictions are missing: got 3 predictions, 6 examples" in msg
    assert "missing 4: 'dev-1-2-0', 'dev-1-0-1', 'dev-2-0-3', 'dev-2-1-3'" in msg


def test_bad_lines_are_named():
    with pytest.raises(MetricInputError, match=r"p.csv:2: expected 'identifier,prediction'"):
        parse_predictions_csv(["dev-1-0-0,True", "dev-1-1-0"], source="p.csv")
    with pytest.raises(MetricInputError, match=r"dev.json:2: not a JSON object"):
        parse_examples('{"identifier": "dev-1-0-0", "label": "True"}\n{oops\n', source="dev.json")
    with pytest.raises(MetricInputError, match=r"dev.json:1: example dev-1-0-0 has no 'label'"):
        parse_examples('{"identifier": "dev-1-0-0"}\n', source="dev.json")


def test_lxmert_converted_file_is_read_too():
    items = [{"identifier": "dev-1-0-0", "label": 1, "sent": "s"}, {"identifier": "dev-1-1-0", "label": 0}]
    examples = parse_examples(json.dumps(items))
    assert [e["label"] for e in examples] == ["True", "False"]
    s = evaluate_nlvr2(examples, {"dev-1-0-0": "true", "dev-1-1-0": "True"})
    assert (s["accuracy"], s["consistency"]) == (0.5, 0.0)
