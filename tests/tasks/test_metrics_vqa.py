"""The official VQA v2 accuracy (GT-Vision-Lab vqaEval.py): every normalisation rule, the all-identical rule,
leave-one-out, rounding, coverage. Expected values are worked out by hand in the comments."""

from __future__ import annotations

import pytest

from tasks.metrics import MetricInputError, evaluate_vqa, question_accuracy, round_half_away
from tasks.metrics.vqa import process_digit_article, process_punctuation


def answers(*texts: str) -> list[dict]:
    """Ten (or fewer) human answer entries with distinct answer ids, as the official files have them."""
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]


def ann(qid: int, texts: list[str], qtype: str = "what is", atype: str = "other") -> dict:
    return {
        "question_id": qid,
        "image_id": 1,
        "question_type": qtype,
        "answer_type": atype,
        "multiple_choice_answer": texts[0],
        "answers": answers(*texts),
    }


# ------------------------------------------------------------------------------------------- punctuation
@pytest.mark.parametrize(
    "text, want",
    [
        ("t-shirt", "t shirt"),  # no space next to '-' anywhere: replaced by a space
        ("t - shirt", "t  shirt"),  # ' -' occurs: deleted (the spaces stay)
        ("red, white", "red white"),  # ', ' occurs: comma deleted
        ("red,white", "red white"),  # comma replaced by a space
        ("1,000", "1000"),  # digit,digit anywhere: every mark deleted
        ("1,000 (approx)", "1000 approx"),  # ... including the brackets
        ("50/50", "50 50"),
        ("(red)", " red "),
        ("hello?", "hello "),
        ("what?!", "what  "),
        ("yes.", "yes"),  # a period not followed by a digit goes
        ("1.5", "1.5"),  # ... followed by a digit stays
        ("5.", "5"),
        ("a.m.", "am"),
        ("it's", "it's"),  # apostrophes are not in the list
        ("10:30", "10:30"),  # nor ':'
        ("100%", "100%"),  # nor '%'
        ("#1", "#1"),  # nor '#'
        ("a_b", "a b"),
        ("x\\y", "x y"),
        ("." * 40, "." * 8),  # the official's Pattern.sub(..., re.UNICODE) = count 32
        ("\u0661,\u0662", "\u0661 \u0662"),  # Python 2's \d is ASCII only: no digit-comma-digit here
        (".\u0661", "\u0661"),  # ... and a period before an Arabic-Indic digit goes
    ],
)
def test_process_punctuation(text, want):
    assert process_punctuation(text) == want


@pytest.mark.parametrize(
    "text, want",
    [
        ("Two Dogs", "2 dogs"),
        ("none", "0"),
        ("zero", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("the dog", "dog"),
        ("A Dog", "dog"),
        ("a an the", ""),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("Im", "im"),  # the map's capitalised keys never match (lower-cased first)
        ("ive", "ive"),
        ("  lots   of\tspace ", "lots of space"),
        ("the one", "1"),
    ],
)
def test_process_digit_article(text, want):
    assert process_digit_article(text) == want


# --------------------------------------------------------------------------------------- one question
def test_leave_one_out_scores_are_not_min_count_over_3():
    others = [f"other{i}" for i in range(9)]
    # 1 match: left out -> 0 matches (0), the 9 others -> 1 match (1/3): 9/3/10 = 0.3 (not 1/3)
    assert question_accuracy(answers("cat", *others), "cat") == pytest.approx(0.3)
    # 2 matches: 2 x 1/3 + 8 x 2/3 = 18/3 / 10 = 0.6
    assert question_accuracy(answers("cat", "cat", *others[:8]), "cat") == pytest.approx(0.6)
    # 3 matches: 3 x 2/3 + 7 x 1 = 9 / 10
    assert question_accuracy(answers("cat", "cat", "cat", *others[:7]), "cat") == pytest.approx(0.9)
    # 4 matches: 4 x 1 + 6 x 1
    assert question_accuracy(answers(*["cat"] * 4, *others[:6]), "cat") == pytest.approx(1.0)
    assert question_accuracy(answers(*others, "dog"), "cat") == 0.0


def test_leave_one_out_removes_every_equal_entry():
    # The official drops every entry EQUAL to the left-out one (dict comparison); two identical entries
    # (same answer, confidence and id) are left out together.
    dup = {"answer": "cat", "answer_confidence": "yes", "answer_id": 1}
    entries = [dict(dup), dict(dup)] + [
        {"answer": "dog", "answer_confidence": "yes", "answer_id": i} for i in range(3, 11)
    ]
    # leaving out a "cat": both go -> 0 matches; leaving out a "dog": 2 matches -> 2/3
    # (2 x 0 + 8 x 2/3) / 10 = 16/30 (0.6 if only one entry were removed)
    assert question_accuracy(entries, "cat") == pytest.approx(16 / 30)
    # the same answer with different ids is removed one at a time
    entries[1]["answer_id"] = 2
    assert question_accuracy(entries, "cat") == pytest.approx(0.6)


def test_all_identical_answers_skip_normalisation():
    ten_yes = answers(*["yes"] * 10)
    assert question_accuracy(ten_yes, "yes") == 1.0
    assert question_accuracy(ten_yes, "Yes") == 0.0  # not lower-cased: the ten answers are identical
    assert question_accuracy(ten_yes, "yes.") == 0.0
    assert question_accuracy(ten_yes, " yes\n") == 1.0  # but whitespace is always cleaned
    # one answer differs -> everything is normalised: "Yes." -> "yes", ten matches
    assert question_accuracy(answers(*["yes"] * 9, "Yes."), "YES!") == 1.0
    # identical AFTER the newline/tab cleaning counts as identical
    assert question_accuracy(answers(*["yes\n"] * 5, *["yes\t"] * 5), "Yes") == 0.0
    assert question_accuracy(answers(*["yes\n"] * 5, *["yes\t"] * 5), "yes") == 1.0


@pytest.mark.parametrize(
    "humans, pred",
    [
        (["two"] * 5 + ["2"] * 5, "2"),  # number words
        (["the dog"] * 5 + ["a dog"] * 5, "Dog"),  # articles and case
        (["dont know"] * 5 + ["don't know"] * 5, "dont know"),  # contractions
        (["t-shirt"] * 5 + ["t shirt"] * 5, "T-Shirt"),
        (["1,000"] * 5 + ["1000"] * 5, "1000"),
        (["none"] * 5 + ["0"] * 5, "zero"),
    ],
)
def test_normalisation_makes_variants_match(humans, pred):
    assert question_accuracy(answers(*humans), pred) == 1.0


# --------------------------------------------------------------------------------------- the whole file
def test_evaluate_aggregates_and_rounds():
    annotations = {
        "annotations": [
            ann(1, ["cat"] + [f"x{i}" for i in range(9)], "what animal is", "other"),  # pred cat: 0.3
            ann(2, ["yes"] * 9 + ["no"], "is the", "yes/no"),  # pred no: 1 match -> 0.3
            ann(3, ["2"] * 10, "how many", "number"),  # pred "two": identical answers -> 0
            ann(4, ["yes"] * 10, "is the", "yes/no"),  # pred yes: 1
        ]
    }
    preds = [
        {"question_id": 1, "answer": "cat"},
        {"question_id": 2, "answer": "No"},
        {"question_id": 3, "answer": "two"},
        {"question_id": 4, "answer": "yes"},
    ]
    s = evaluate_vqa(annotations, preds)
    assert s["perQuestion"] == {1: 30.0, 2: 30.0, 3: 0.0, 4: 100.0}
    assert s["overall"] == 40.0  # (0.3 + 0.3 + 0 + 1) / 4
    assert s["perAnswerType"] == {"other": 30.0, "yes/no": 65.0, "number": 0.0}
    assert s["perQuestionType"] == {"what animal is": 30.0, "is the": 65.0, "how many": 0.0}


def test_rounding_is_python2_half_away_from_zero():
    # 32 questions, one right: 100 / 32 = 3.125 exactly; Python 2's round (the official) -> 3.13
    anns = [ann(i, ["yes"] * 10, "is", "yes/no") for i in range(32)]
    preds = [{"question_id": i, "answer": "yes" if i == 0 else "no"} for i in range(32)]
    s = evaluate_vqa({"annotations": anns}, preds)
    assert s["overall"] == 3.13
    assert s["perAnswerType"] == {"yes/no": 3.13}
    assert round_half_away(2.675) == 2.67  # the binary value is below the tie
    assert round_half_away(0.125) == 0.13
    # three answers, two "cat": leaving a cat out -> 1 match (1/3), leaving cat2 out -> 2 (2/3):
    # (1/3 + 2/3 + 1/3) / 3 = 4/9 = 44.444..% -> 44.44
    three = {"annotations": [ann(7, ["cat", "cat2", "cat"])]}
    assert evaluate_vqa(three, [{"question_id": 7, "answer": "cat"}])["perQuestion"][7] == 44.44


def test_predictions_must_cover_exactly_the_annotations():
    anns = {"annotations": [ann(i, ["yes"] * 10) for i in (1, 2, 3)]}
    with pytest.raises(MetricInputError) as e:
        evaluate_vqa(anns, [{"question_id": 1, "answer": "yes"}, {"question_id": 9, "answer": "no"}])
    msg = str(e.value)
    assert "2 missing: 2, 3" in msg and "1 not in the annotations: 9" in msg
    with pytest.raises(MetricInputError, match="integers as in the annotations"):
        evaluate_vqa(anns, [{"question_id": str(i), "answer": "yes"} for i in (1, 2, 3)])


def test_repeated_prediction_is_refused_naming_the_id():
    # the official index silently keeps the last one (a score of 0 here instead of 100): we refuse
    anns = {"annotations": [ann(1, ["yes"] * 10), ann(2, ["no"] * 10)]}
    preds = [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "no"}]
    preds.append({"question_id": 1, "answer": "no"})
    with pytest.raises(MetricInputError) as e:
        evaluate_vqa(anns, preds, predictions_source="p.json")
    assert "p.json: question_id 1 is predicted twice (predictions #0 and #2)" in str(e.value)


def test_bad_inputs_are_named():
    with pytest.raises(MetricInputError, match="no 'annotations' key"):
        evaluate_vqa({"questions": []}, [])
    bad = ann(5, ["yes"] * 10)
    del bad["answer_type"]
    with pytest.raises(MetricInputError, match="question 5: annotation has no 'answer_type'"):
        evaluate_vqa({"annotations": [bad]}, [{"question_id": 5, "answer": "yes"}])
    with pytest.raises(MetricInputError, match="question 5: 'answer' must be a string"):
        evaluate_vqa({"annotations": [ann(5, ["yes"] * 10)]}, [{"question_id": 5, "answer": 3}])
    with pytest.raises(MetricInputError, match="repeated question ids: 5"):
        evaluate_vqa({"annotations": [ann(5, ["a"] * 10), ann(5, ["b"] * 10)]}, [])
    with pytest.raises(MetricInputError, match="must be a list"):
        evaluate_vqa({"annotations": [ann(5, ["a"] * 10)]}, {"5": "a"})


def test_questions_file_checks():
    anns = {"annotations": [ann(1, ["yes"] * 10)]}
    preds = [{"question_id": 1, "answer": "maybe"}]
    other_split = {"questions": [{"question_id": 2, "image_id": 1, "question": "?"}]}
    with pytest.raises(MetricInputError, match="not in the questions file"):
        evaluate_vqa(anns, preds, other_split)
    mc = {
        "task_type": "Multiple Choice",
        "questions": [{"question_id": 1, "image_id": 1, "question": "?", "multiple_choices": ["yes", "no"]}],
    }
    with pytest.raises(MetricInputError, match="not one of the multiple choices"):
        evaluate_vqa(anns, preds, mc)
    assert evaluate_vqa(anns, [{"question_id": 1, "answer": "yes"}], mc)["overall"] == 100.0
