"""``lxmert-eval``: files in the official formats in, report out, scores JSON, clear refusals."""

from __future__ import annotations

import json

import pytest

from tasks.metrics.cli import main


def write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def vqa_annotation(qid, texts, qtype, atype):
    return {
        "question_id": qid,
        "image_id": 1,
        "question_type": qtype,
        "answer_type": atype,
        "multiple_choice_answer": texts[0],
        "answers": [
            {"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)
        ],
    }


@pytest.fixture
def vqa_files(tmp_path):
    anns = {
        "annotations": [
            vqa_annotation(1, ["two"] * 5 + ["2"] * 5, "how many", "number"),  # "2" -> 100 (normalised)
            vqa_annotation(
                2, ["yes"] * 10, "is the", "yes/no"
            ),  # "Yes" -> 0 (all identical: no lower-casing)
            vqa_annotation(3, ["red"] + [f"c{i}" for i in range(9)], "what color", "other"),  # 30
        ]
    }
    questions = {
        "task_type": "Open-Ended",
        "questions": [{"question_id": i, "image_id": 1, "question": "?"} for i in (1, 2, 3)],
    }
    preds = [
        {"question_id": 1, "answer": "2"},
        {"question_id": 2, "answer": "Yes"},
        {"question_id": 3, "answer": "red"},
    ]
    return (
        write(tmp_path / "a.json", anns),
        write(tmp_path / "q.json", questions),
        write(tmp_path / "p.json", preds),
    )


def test_vqa(vqa_files, tmp_path, capsys):
    a, q, p = vqa_files
    out = tmp_path / "scores" / "vqa.json"
    assert main(["vqa", "--annotations", a, "--predictions", p, "--questions", q, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Overall Accuracy is: 43.33" in printed  # (1 + 0 + 0.3) / 3
    assert "number : 100.00" in printed and "yes/no : 0.00" in printed and "other : 30.00" in printed
    scores = json.loads(out.read_text())
    assert scores == {
        "overall": 43.33,
        "perAnswerType": {"number": 100.0, "yes/no": 0.0, "other": 30.0},
        "perQuestionType": {"how many": 100.0, "is the": 0.0, "what color": 30.0},
        "perQuestion": {"1": 100.0, "2": 0.0, "3": 30.0},
    }


def test_vqa_missing_predictions_exit_2(vqa_files, tmp_path, capsys):
    a, _, _ = vqa_files
    p = write(tmp_path / "few.json", [{"question_id": 1, "answer": "2"}])
    out = tmp_path / "s.json"
    assert main(["vqa", "--annotations", a, "--predictions", p, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "lxmert-eval vqa: error:" in err and "2 missing: 2, 3" in err
    assert not out.exists()
    assert main(["vqa", "--annotations", a, "--predictions", p, "--only-predicted", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["perQuestion"] == {"1": 100.0}
    assert main(["vqa", "--annotations", str(tmp_path / "nope.json"), "--predictions", p]) == 2
    assert "nope.json does not exist" in capsys.readouterr().err


def gqa_question(question, answer, structural, group, balanced=True, entailed=()):
    return {
        "question": question,
        "imageId": "1",
        "answer": answer,
        "isBalanced": balanced,
        "groups": {"global": group, "local": None},
        "entailed": list(entailed),
        "types": {"structural": structural, "semantic": "attr", "detailed": "x"},
        "semantic": [{"operation": "select", "argument": "cup", "dependencies": []}],
    }


def test_gqa(tmp_path, capsys):
    questions = {
        "01": gqa_question("Is the cup red?", "yes", "verify", "yn", entailed=["02"]),
        "02": gqa_question("Is the cup blue?", "no", "verify", "yn", balanced=False),
        "03": gqa_question("What color is the cup?", "red", "query", "color"),
    }
    preds = [
        {"questionId": "01", "prediction": "yes"},
        {"questionId": "02", "prediction": "yes"},
        {"questionId": "03", "prediction": "red"},
    ]
    choices = {
        "01": {"valid": ["yes", "no"], "plausible": ["yes"]},
        "03": {"valid": ["blue"], "plausible": ["red"]},
    }
    q, p, c = (
        write(tmp_path / "q.json", questions),
        write(tmp_path / "p.json", preds),
        write(tmp_path / "c.json", choices),
    )
    out = tmp_path / "gqa.json"
    argv = ["gqa", "--questions", q, "--predictions", p, "--choices", c, "--consistency", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:7] == [
        "Binary: 100.00%",
        "Open: 100.00%",
        "Accuracy: 100.00%",
        "Consistency: 0.00%",  # 01 is right, its entailed 02 is wrong
        "Validity: 50.00%",
        "Plausibility: 100.00%",
        "Distribution: 0.00 (lower is better)",
    ]
    scores = json.loads(out.read_text())
    assert scores["accuracy"] == 100.0 and scores["consistency"] == 0.0 and scores["distribution"] == 0.0
    assert scores["accuracyPerLength"] == {"4": [100.0, 1], "5": [100.0, 1]}
    assert scores["accuracyPerSteps"] == {"1": [100.0, 2]}
    assert set(scores) == {
        "accuracy", "binary", "open", "validity", "plausibility", "consistency", "distribution",
        "accuracyPerStructuralType", "accuracyPerSemanticType", "accuracyPerLength", "accuracyPerSteps",
    }  # fmt: skip

    p2 = write(tmp_path / "p2.json", preds[:1])
    assert main(["gqa", "--questions", q, "--predictions", p2]) == 2
    assert "missing predictions for 1 balanced questions" in capsys.readouterr().err


def test_nlvr2(tmp_path, capsys):
    data = "\n".join(
        json.dumps({"identifier": i, "sentence": "s", "label": lab})
        for i, lab in (("dev-1-0-0", "True"), ("dev-1-1-0", "False"), ("dev-2-0-0", "True"))
    )
    d = write(tmp_path / "dev.json", data + "\n")
    p = write(tmp_path / "p.csv", "dev-1-0-0,True\ndev-1-1-0,True\ndev-2-0-0,true\n")
    out = tmp_path / "nlvr2.json"
    assert main(["nlvr2", "--data", d, "--predictions", p, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy=0.6666666666666666" in printed and "consistency=0.5" in printed
    assert json.loads(out.read_text()) == {
        "accuracy": pytest.approx(2 / 3),
        "consistency": 0.5,
        "examples": 3,
        "sentences": 2,
    }
    p = write(tmp_path / "few.csv", "dev-1-0-0,True\n")
    assert main(["nlvr2", "--data", d, "--predictions", p]) == 2
    assert "missing 2: 'dev-1-1-0', 'dev-2-0-0'" in capsys.readouterr().err


def test_duplicate_prediction_ids_are_refused_by_each_benchmark(vqa_files, tmp_path, capsys):
    """The official evaluators keep the last of two predictions for one id, silently changing the score."""
    a, _, _ = vqa_files
    preds = [{"question_id": 1, "answer": "2"}, {"question_id": 2, "answer": "yes"}]
    preds += [{"question_id": 3, "answer": "red"}, {"question_id": 1, "answer": "3"}]
    p = write(tmp_path / "dup.json", preds)
    assert main(["vqa", "--annotations", a, "--predictions", p]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "question_id 1 is predicted twice" in err, err
    questions = {"q1": {"question": "?", "answer": "yes", "isBalanced": True}}
    q = write(tmp_path / "gqa_q.json", questions)
    gp = write(tmp_path / "gqa_p.json", [{"questionId": "q1", "prediction": "yes"}] * 2)
    assert main(["gqa", "--questions", q, "--predictions", gp]) == 2
    assert "questionId 'q1' is predicted twice" in capsys.readouterr().err
    dev = write(tmp_path / "dev.json", '{"identifier": "dev-1-0-0", "label": "True"}\n')
    csv = write(tmp_path / "p.csv", "dev-1-0-0,True\ndev-1-0-0,False\n")
    assert main(["nlvr2", "--data", dev, "--predictions", csv]) == 2
    assert "identifier 'dev-1-0-0' is predicted twice (first on line 1)" in capsys.readouterr().err
