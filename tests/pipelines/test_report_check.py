"""The demo's pass rules (pipelines.report.check): the overall margin over the better baseline, and colour and
shape each within the allowed gap of the linear probe of the features."""

from __future__ import annotations

from pipelines.report import check, question_only_answers

PROBE = {"color": {"accuracy": 83.5}, "shape": {"accuracy": 73.0}}


def _types(color: float, shape: float) -> dict:
    return {"color": {"model": color}, "shape": {"model": shape}, "yes/no": {"model": 90.0}}


def test_a_model_blind_to_shape_fails_even_with_a_good_overall_margin() -> None:
    # the run: overall 8.7 points above the question-only baseline, shape at the question-only level
    failures = check(74.30, 65.61, _types(71.21, 36.47), PROBE, margin=5.0, probe_gap=5.0)
    assert len(failures) == 2
    assert failures[0].startswith("color: LXMERT 71.21 is more than 5.0 points below the linear probe")
    assert failures[1].startswith("shape: LXMERT 36.47") and "(73.00)" in failures[1]


def test_within_the_gap_and_above_the_margin_passes() -> None:
    assert check(84.0, 65.61, _types(79.0, 68.5), PROBE, margin=15.0, probe_gap=5.0) == []
    assert check(84.0, 65.61, _types(90.0, 80.0), PROBE, margin=15.0, probe_gap=5.0) == []  # above the probe


def test_overall_margin_and_switches() -> None:
    failures = check(79.0, 65.61, _types(80.0, 70.0), PROBE, margin=15.0, probe_gap=5.0)
    assert failures == ["overall 79.00 is not 15.0 points above the better baseline 65.61"]
    assert check(79.0, 65.61, _types(10.0, 10.0), PROBE, margin=-1.0, probe_gap=-1.0) == []
    assert check(90.0, 65.61, _types(10.0, 10.0), {}, margin=15.0, probe_gap=5.0) == []  # no probe: no rule
    assert check(90.0, 65.61, {"color": {"model": None}}, PROBE, margin=15.0, probe_gap=5.0)[0].startswith(
        "color: LXMERT -"
    )


def test_question_only_baseline_answers_each_text_with_its_most_frequent_train_answer() -> None:
    def item(qid: int, sent: str, qtype: str, answer: str) -> dict:
        return {"question_id": qid, "sent": sent, "question_type": qtype, "label": {answer: 1.0}}

    train = [
        item(1, "is there a circle?", "yes/no", "no"),
        item(2, "is there a circle?", "yes/no", "no"),
        item(3, "is there a circle?", "yes/no", "yes"),
        item(4, "what color is the shape?", "color", "red"),
        item(5, "what color is the shape?", "color", "blue"),
        item(6, "what is the color of the shape?", "color", "blue"),
    ]
    test = [
        item(10, "is there a circle?", "yes/no", "yes"),
        item(11, "what is the color of the shape?", "color", "red"),
        item(12, "which color does the shape have?", "color", "red"),  # never seen: its type's answer
        item(13, "how many shapes?", "count", "1"),  # neither text nor type seen: the overall answer
    ]
    answers = {a["question_id"]: a["answer"] for a in question_only_answers(train, test)}
    assert answers == {10: "no", 11: "blue", 12: "blue", 13: "no"}
