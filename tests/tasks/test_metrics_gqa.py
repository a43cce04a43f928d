"""The official GQA eval.py semantics (../shared/TRAINING_FACTS.md §8) on a hand-made questions file.
Every expected number is worked out by hand in the comments."""

from __future__ import annotations

import copy

import pytest

from tasks.metrics import MetricInputError, evaluate_gqa, format_gqa_report
from tasks.metrics.gqa import count_steps


def op(operation: str, argument: str) -> dict:
    return {"operation": operation, "argument": argument, "dependencies": []}


def q(question, answer, structural, semantic, detailed, group, entailed=(), ops=(), balanced=True):
    return {
        "question": question,
        "imageId": "2354786",
        "answer": answer,
        "fullAnswer": answer,
        "isBalanced": balanced,
        "groups": {"global": group, "local": "10q-cup_color"},
        "entailed": list(entailed),
        "equivalent": [],
        "types": {"structural": structural, "semantic": semantic, "detailed": detailed},
        "semantic": list(ops),
    }


# file order matters for consistency; q5 is unbalanced
QUESTIONS = {
    "q1": q("Is the cup red?", "yes", "verify", "attr", "verifyAttr", None, ["q2", "q1", "q5", "q5"],
            [op("select", "cup (1)"), op("exist", "?"), op("verify color", "red")]),  # steps 2, 4 words
    "q2": q("What color is the cup?", "red", "query", "attr", "queryAttr", "color", ["q1", "q5"],
            [op("select", "cup (1)"), op("query", "color")]),  # steps 2, 5 words
    "q3": q("Which is bigger, the cup or the plate?", "plate", "choose", "obj", "chooseObj", "", [],
            [op("select", "cup"), op("select", "plate"), op("choose name", "cup|plate")]),  # steps 2, 8 words
    "q4": q("What do the cup and the plate have in common?", "color", "compare", "attr", "twoCommon", "common", [],
            [op("select", "cup"), op("select", "plate"), op("common", "")]),  # steps 3, 10 words
    "q5": q("Is there a cup?", "yes", "verify", "obj", "existObj", None, [],
            [op("select", "cup"), op("exist", "?")], balanced=False),
    "q6": q("What\tis the  plate made of ?", "wood", "query", "attr", "queryAttr", "color", ["q1"],
            [op("select", "plate (2)"), op("query", "material"), op("filter", "nonexistent"), op("query", "name")]),
    # steps 2 ("filter: nonexistent" contains "exist", "query: name"), 7 words (tab, double space, "?")
    "q7": q("What color is the plate?", "red", "query", "attr", "queryAttr", "color", [],
            [op("select", "plate"), op("choose", "name|cup"), op("query", "color")]),  # steps 3, 5 words
}  # fmt: skip

PREDICTIONS = [
    {"questionId": "q2", "prediction": "Red"},  # wrong: exact string equality
    {"questionId": "q3", "prediction": "cup"},  # wrong
    {"questionId": "q4", "prediction": "shape"},  # wrong, but valid and plausible ("Common")
    {"questionId": "q5", "prediction": "yes"},  # right (unbalanced)
    {"questionId": "q6", "prediction": "wood"},  # right
    {"questionId": "q7", "prediction": "red"},  # right
    {"questionId": "q1", "prediction": "yes"},  # right (last in the file: order does not matter)
    {"questionId": "not-in-file", "prediction": "x"},  # ignored
]

CHOICES = {
    "q1": {"valid": ["yes", "no"], "plausible": ["yes", "no"]},  # valid, plausible
    "q2": {"valid": ["red", "blue"], "plausible": ["Red", "red"]},  # not valid, plausible
    "q3": {"valid": ["cup", "plate"], "plausible": ["plate"]},  # valid, not plausible
    "q4": {"valid": [], "plausible": []},  # ignored: "Common" -> color / material / shape
    "q5": {"valid": [], "plausible": []},
    "q6": {"valid": ["wood"], "plausible": ["metal"]},  # valid, not plausible
    "q7": {"valid": ["red"], "plausible": ["red"]},  # valid, plausible
}


def test_all_scores_on_the_hand_made_file():
    s = evaluate_gqa(QUESTIONS, PREDICTIONS, CHOICES, consistency=True)
    # balanced: q1 q2 q3 q4 q6 q7; right: q1 q6 q7
    assert s["accuracy"] == pytest.approx(50.0)
    assert s["open"] == pytest.approx(200 / 3)  # query: q2 (wrong) q6 q7
    assert s["binary"] == pytest.approx(100 / 3)  # verify q1, choose q3, compare q4
    assert s["validity"] == pytest.approx(500 / 6)  # q1 q3 q4 q6 q7
    assert s["plausibility"] == pytest.approx(400 / 6)  # q1 q2 q4 q7
    # right balanced questions with entailed ones: q1 -> [q2, q5, q5] (itself removed) = [0, 1, 1] -> 2/3;
    # q6 -> [q1] = 1; q7 has none; q2 (wrong) contributes nothing -> (2/3 + 1) / 2
    assert s["consistency"] == pytest.approx(100 * 5 / 6)
    # groups: color gold {red: 2, wood: 1} pred {Red: 1, wood: 1, red: 1}: (1-2)^2/2 + 0 = 0.5, N 3;
    # "" gold {plate: 1} pred {cup: 1}: 1, N 1; common gold {color: 1} pred {shape: 1}: 1, N 1; q1 no group
    # (0.5 * 3 + 1 + 1) / 5 / 100
    assert s["distribution"] == pytest.approx(3.5 / 5 / 100)
    assert s["accuracyPerStructuralType"] == {
        "verify": [100.0, 1],
        "query": [pytest.approx(200 / 3), 3],
        "choose": [0.0, 1],
        "compare": [0.0, 1],
    }
    assert s["accuracyPerSemanticType"] == {"attr": [60.0, 5], "obj": [0.0, 1]}
    assert s["accuracyPerLength"] == {4: [100.0, 1], 5: [50.0, 2], 8: [0.0, 1], 10: [0.0, 1], 7: [100.0, 1]}
    assert s["accuracyPerSteps"] == {2: [50.0, 4], 3: [50.0, 2]}


def test_without_choices_or_consistency():
    preds = [p for p in PREDICTIONS if p["questionId"] != "q5"]  # unbalanced: not needed here
    s = evaluate_gqa(QUESTIONS, preds)
    assert s["validity"] == 0.0 and s["plausibility"] == 0.0
    assert s["consistency"] == 0.0
    assert s["accuracy"] == pytest.approx(50.0)
    assert evaluate_gqa(QUESTIONS, preds, choices={})["validity"] == 0.0  # an empty file counts as none


def test_common_rule_is_case_sensitive_and_needs_the_entry():
    questions = copy.deepcopy(QUESTIONS)
    questions["q4"]["types"]["detailed"] = "twocommon"  # lower case: the choices lists decide
    s = evaluate_gqa(questions, PREDICTIONS, CHOICES)
    assert s["validity"] == pytest.approx(400 / 6) and s["plausibility"] == pytest.approx(300 / 6)
    choices = {k: v for k, v in CHOICES.items() if k != "q4"}
    with pytest.raises(MetricInputError, match="no choices for balanced question q4"):
        evaluate_gqa(QUESTIONS, PREDICTIONS, choices)


def test_no_normalisation_of_any_kind():
    questions = {"a": q("Is it?", "yes", "verify", "attr", "x", "g", [], [])}
    for pred, right in (("yes", True), ("Yes", False), (" yes", False), ("yes.", False)):
        s = evaluate_gqa(questions, [{"questionId": "a", "prediction": pred}])
        assert s["accuracy"] == (100.0 if right else 0.0)
        assert s["open"] == 0.0  # no query question: the empty average is 0


def test_missing_predictions():
    preds = [p for p in PREDICTIONS if p["questionId"] != "q3"]
    with pytest.raises(MetricInputError, match=r"missing predictions for 1 balanced questions.*'q3'"):
        evaluate_gqa(QUESTIONS, preds)
    no_q5 = [p for p in PREDICTIONS if p["questionId"] != "q5"]
    evaluate_gqa(QUESTIONS, no_q5)  # an unbalanced question needs no prediction ...
    with pytest.raises(MetricInputError, match=r"--consistency needs predictions for every question.*'q5'"):
        evaluate_gqa(QUESTIONS, no_q5, consistency=True)  # ... unless consistency is scored


def test_entailed_question_not_in_file():
    questions = copy.deepcopy(QUESTIONS)
    questions["q7"]["entailed"] = ["q99"]
    with pytest.raises(MetricInputError, match="q7 entails q99"):
        evaluate_gqa(questions, PREDICTIONS, consistency=True)
    evaluate_gqa(questions, PREDICTIONS)  # not looked at without consistency


def test_no_global_group_is_an_error_and_missing_fields_are_named():
    questions = {"a": q("Is it?", "yes", "verify", "attr", "x", None, [], [])}
    with pytest.raises(MetricInputError, match="no balanced question has a groups.global"):
        evaluate_gqa(questions, [{"questionId": "a", "prediction": "yes"}])
    test_file = {"a": {"question": "Is it?", "imageId": "1", "isBalanced": True}}
    with pytest.raises(MetricInputError, match="question a: no 'answer'"):
        evaluate_gqa(test_file, [{"questionId": "a", "prediction": "yes"}])


@pytest.mark.parametrize(
    "ops, steps",
    [
        ([op("exist", "?")], 0),
        ([op("query", "name")], 0),
        ([op("query", "name (123)")], 0),
        ([op("choose name", "cup|plate")], 0),
        ([op("filter", "nonexistent")], 0),
        ([op("choose", "name|cup")], 1),
        ([op("query", "color"), op("verify color", "red"), op("select", "scene"), op("and", "")], 4),
        ([op("Exist", "?")], 1),  # case-sensitive
    ],
)
def test_count_steps(ops, steps):
    assert count_steps(ops) == steps


def test_report_like_the_official():
    s = evaluate_gqa(QUESTIONS, PREDICTIONS, CHOICES, consistency=True)
    text = format_gqa_report(s, consistency=True)
    head = text.splitlines()[:7]
    assert head == [
        "Binary: 33.33%",
        "Open: 66.67%",
        "Accuracy: 50.00%",
        "Consistency: 83.33%",
        "Validity: 83.33%",
        "Plausibility: 66.67%",
        "Distribution: 0.01 (lower is better)",
    ]
    words = text.split("Accuracy / words number:\n")[1].splitlines()
    assert [w.split(":")[0].strip() for w in words] == ["4", "5", "7", "8", "10"]  # numeric order
    assert "  attr: 60.00% (5 questions)" in text
    assert "Consistency" not in format_gqa_report(s)


def test_repeated_prediction_is_refused_naming_the_id():
    # the official dict silently keeps the last one: we refuse
    preds = [*PREDICTIONS, {"questionId": "q6", "prediction": "metal"}]
    with pytest.raises(MetricInputError) as e:
        evaluate_gqa(QUESTIONS, preds, predictions_source="p.json")
    assert "p.json: questionId 'q6' is predicted twice (predictions #4 and #8)" in str(e.value)
