"""Converters (``lxmert-data``) on small fixtures written in the official raw formats."""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import pytest
from PIL import Image

from extract.runner import collect_images
from tasks.convert import (
    DataFormatError,
    convert_easy_vqa,
    convert_gqa,
    convert_nlvr2,
    convert_vqa,
    soft_score,
)
from tasks.convert.cli import build_parser as data_parser
from tasks.convert.cli import main as data_main
from tasks.convert.easy_vqa import TEST_QUESTION_ID_OFFSET, installed_easy_vqa_data, question_type
from tasks.convert.vqa import build_answer_table, read_image_id_list, select_minival_images
from tasks.metrics import evaluate_vqa


# ------------------------------------------------------------------------------------------------- VQA
def vqa_answers(*texts: str) -> list[dict]:
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]


def vqa_files(subtype: str = "val2014") -> tuple[dict, dict]:
    questions = {
        "info": {},
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "data_subtype": subtype,
        "license": {},
        "questions": [
            {"image_id": 42, "question": "Is it raining?", "question_id": 42000},
            {"image_id": 42, "question": "How many cats?", "question_id": 42001},
            {"image_id": 7, "question": "What is this?", "question_id": 7000},
        ],
    }
    annotations = {
        "info": {},
        "license": {},
        "data_subtype": subtype,
        "annotations": [
            {
                "question_id": 42000,
                "image_id": 42,
                "question_type": "is it",
                "answer_type": "yes/no",
                "multiple_choice_answer": "Yes.",
                # yes x4 -> 1.0, no x3 -> 0.9, maybe x2 -> 0.6, "Yes" x1: raw string not in the table
                "answers": vqa_answers(*["yes"] * 4, *["no"] * 3, "maybe", "maybe", "Yes"),
            },
            {
                "question_id": 42001,
                "image_id": 42,
                "question_type": "how many",
                "answer_type": "number",
                "multiple_choice_answer": "Two",
                # "2" x1 -> 0.3; "two" is not in the table (raw answers are not normalised)
                "answers": vqa_answers(*["two"] * 9, "2"),
            },
            {
                "question_id": 7000,
                "image_id": 7,
                "question_type": "what is this",
                "answer_type": "other",
                "multiple_choice_answer": "1,000 cats",
                "answers": vqa_answers(*["zebra"] * 10),  # nothing in the table: empty label
            },
        ],
    }
    return questions, annotations


TABLE = {"yes": 0, "no": 1, "maybe": 2, "2": 3}


def test_soft_scores():
    assert [soft_score(n) for n in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]


def test_vqa_items():
    questions, annotations = vqa_files()
    items, stats = convert_vqa(questions, annotations, TABLE)
    assert items == [
        {
            "answer_type": "yes/no",
            "img_id": "COCO_val2014_000000000042",
            "label": {"yes": 1.0, "no": 0.9, "maybe": 0.6},
            "question_id": 42000,
            "question_type": "is it",
            "sent": "Is it raining?",
        },
        {
            "answer_type": "number",
            "img_id": "COCO_val2014_000000000042",
            "label": {"2": 0.3},
            "question_id": 42001,
            "question_type": "how many",
            "sent": "How many cats?",
        },
        {
            "answer_type": "other",
            "img_id": "COCO_val2014_000000000007",
            "label": {},
            "question_id": 7000,
            "question_type": "what is this",
            "sent": "What is this?",
        },
    ]
    # outside the table: "Yes"; "two"; "zebra"
    assert stats == {"questions": 3, "items": 3, "empty_labels": 1, "answers_outside_table": 3}


def test_vqa_test_split_has_no_labels_and_test_dev_uses_test2015_images():
    questions, _ = vqa_files("test-dev2015")
    items, _ = convert_vqa(questions, None, None)
    assert items[0] == {
        "img_id": "COCO_test2015_000000000042",
        "question_id": 42000,
        "sent": "Is it raining?",
    }
    assert all("label" not in it and "answer_type" not in it for it in items)


def test_built_answer_table_normalises_and_counts_questions():
    _, annotations = vqa_files()
    # "Yes." -> "yes", "Two" -> "2", "1,000 cats" -> "1000 cats" (digit comma: marks deleted; commas dropped)
    table, counts = build_answer_table([(annotations, "a.json")], min_count=1)
    assert counts == {"yes": 1, "2": 1, "1000 cats": 1}
    assert table == ["1000 cats", "2", "yes"]  # equal counts: alphabetical
    more = {"annotations": [dict(annotations["annotations"][0], question_id=1)]}
    table, counts = build_answer_table([(annotations, "a.json"), (more, "b.json")], min_count=2)
    assert table == ["yes"] and counts["yes"] == 2  # distinct questions over both files
    # the original's threshold (9), stated once: lxmert-data's default is build_answer_table's
    args = data_parser().parse_args(
        ["vqa", "--annotations", "a.json", "--questions", "q.json", "--out", "o.json"]
    )
    assert args.min_answer_count == inspect.signature(build_answer_table).parameters["min_count"].default == 9


def test_minival_selection_is_reproducible_and_partitions(tmp_path):
    ids = list(range(100, 130))
    chosen = select_minival_images(ids, size=5, seed=3)

    def key(i):
        return hashlib.sha256(f"3:{i}".encode()).hexdigest()

    assert chosen == set(sorted(ids, key=key)[:5])
    assert select_minival_images(reversed(ids), size=5, seed=3) == chosen  # order-free
    assert select_minival_images(ids, size=5, seed=4) != chosen

    questions, annotations = vqa_files()
    mini, _ = convert_vqa(questions, annotations, TABLE, keep_images={42})
    nomini, _ = convert_vqa(questions, annotations, TABLE, drop_images={42})
    assert [it["question_id"] for it in mini] == [42000, 42001]
    assert [it["question_id"] for it in nomini] == [7000]

    lst = tmp_path / "minival.txt"
    lst.write_text("# LXMERT minival\nCOCO_val2014_000000000042\n7\nval2014/COCO_val2014_000000000099.jpg\n")
    assert read_image_id_list(lst) == {42, 7, 99}
    js = tmp_path / "minival.json"
    js.write_text(json.dumps([{"img_id": "COCO_val2014_000000000042", "sent": "?"}]))
    assert read_image_id_list(js) == {42}
    lst.write_text("not-an-id\n")
    with pytest.raises(DataFormatError, match="minival.txt:1: 'not-an-id' is not a COCO image id"):
        read_image_id_list(lst)


def test_vqa_mismatches_are_named():
    questions, annotations = vqa_files()
    annotations["annotations"].pop()
    with pytest.raises(DataFormatError, match="1 questions have no annotation: 7000"):
        convert_vqa(questions, annotations, TABLE, questions_source="q.json", annotations_source="a.json")
    questions, annotations = vqa_files()
    del annotations["annotations"][1]["answers"]
    with pytest.raises(DataFormatError, match="a.json: question 42001: the annotation has no 'answers'"):
        convert_vqa(questions, annotations, TABLE, annotations_source="a.json")
    questions, annotations = vqa_files()
    questions["questions"][2]["image_id"] = "7"
    with pytest.raises(DataFormatError, match="q.json: question 7000: 'image_id' must be an integer"):
        convert_vqa(questions, annotations, TABLE, questions_source="q.json")


def test_vqa_cli(tmp_path, capsys):
    questions, annotations = vqa_files()
    q, a = tmp_path / "q.json", tmp_path / "a.json"
    q.write_text(json.dumps(questions))
    a.write_text(json.dumps(annotations))
    table = tmp_path / "ans2label.json"
    table.write_text(json.dumps(TABLE))
    out = tmp_path / "out" / "minival.json"
    mini = tmp_path / "mini.txt"
    mini.write_text("42\n")
    argv = ["vqa", "--questions", str(q), "--annotations", str(a), "--out", str(out), "--answers", str(table)]
    assert data_main([*argv, "--subset", "minival", "--minival-images", str(mini)]) == 0
    items = json.loads(out.read_text())
    assert [it["question_id"] for it in items] == [42000, 42001]
    assert items[0]["label"] == {"yes": 1.0, "no": 0.9, "maybe": 0.6}
    assert "wrote 2 items (minival of 3 questions)" in capsys.readouterr().out

    # --non-lxmert-minival: the --minival-size images with the smallest sha256("<seed>:<image_id>")
    first = min((42, 7), key=lambda i: hashlib.sha256(f"11:{i}".encode()).hexdigest())
    names = tmp_path / "minival_images.txt"
    nomini = tmp_path / "nominival.json"
    split = [
        "--subset",
        "nominival",
        "--non-lxmert-minival",
        "--minival-size",
        "1",
        "--seed",
        "11",
        "--write-minival-images",
        str(names),
    ]
    argv = [
        "vqa",
        "--questions",
        str(q),
        "--annotations",
        str(a),
        "--out",
        str(nomini),
        "--answers",
        str(table),
    ]
    assert data_main([*argv, *split]) == 0
    assert names.read_text() == f"COCO_val2014_{first:012d}\n"
    other = ({42, 7} - {first}).pop()
    assert {it["img_id"] for it in json.loads(nomini.read_text())} == {f"COCO_val2014_{other:012d}"}
    capsys.readouterr()

    # no table given: built from the annotations and written beside the output
    built = tmp_path / "train.json"
    argv = [
        "vqa",
        "--questions",
        str(q),
        "--annotations",
        str(a),
        "--out",
        str(built),
        "--min-answer-count",
        "1",
    ]
    assert data_main(argv) == 0
    assert json.loads((tmp_path / "train_label2ans.json").read_text()) == ["1000 cats", "2", "yes"]
    assert json.loads((tmp_path / "train_ans2label.json").read_text()) == {"1000 cats": 0, "2": 1, "yes": 2}
    assert json.loads(built.read_text())[0]["label"] == {"yes": 1.0}
    capsys.readouterr()

    # a table that would be empty (no answer reaches the count): refused, nothing written
    empty = tmp_path / "empty" / "train.json"
    argv = ["vqa", "--questions", str(q), "--annotations", str(a), "--out", str(empty)]
    assert data_main([*argv, "--min-answer-count", "9"]) == 2
    err = capsys.readouterr().err
    assert "no answer is the multiple-choice answer of >= 9 questions" in err and "--answers" in err
    assert not empty.parent.exists() or not list(empty.parent.iterdir())

    # a malformed file: exit 2, named, and nothing written
    a.write_text('{"annotations": [}')
    bad_out = tmp_path / "bad.json"
    assert data_main(["vqa", "--questions", str(q), "--annotations", str(a), "--out", str(bad_out)]) == 2
    err = capsys.readouterr().err
    assert f"{a}:1:18: VQA annotations file is not valid JSON" in err
    assert not bad_out.exists() and not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------------- GQA
def test_minival_needs_lxmerts_list_or_an_explicit_other_split(tmp_path, capsys):
    """No silent hash minival (most of it would be in LXMERT's pretraining data); a list naming no val2014
    image of the questions file is refused in one line naming the file."""
    questions, annotations = vqa_files()
    q, a, table = tmp_path / "q.json", tmp_path / "a.json", tmp_path / "ans2label.json"
    q.write_text(json.dumps(questions))
    a.write_text(json.dumps(annotations))
    table.write_text(json.dumps(TABLE))
    out = tmp_path / "minival.json"
    argv = ["vqa", "--questions", str(q), "--annotations", str(a), "--answers", str(table), "--out", str(out)]
    for subset in ("minival", "nominival"):
        assert data_main([*argv, "--subset", subset]) == 2
        err = capsys.readouterr().err
        assert (
            f"--subset {subset} needs LXMERT's minival image list" in err
            and len(err.strip().splitlines()) == 1
        )
        assert "mscoco_minival.json" in err and "--non-lxmert-minival" in err
    assert not out.exists()
    # a list of other images (e.g. train2014's): refused, naming the file
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("COCO_train2014_000000000009\n13\n")
    assert data_main([*argv, "--subset", "minival", "--minival-images", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert f"{wrong}: none of its 2 images" in err and "val2014" in err and len(err.strip().splitlines()) == 1
    # both ways at once: refused
    mini = tmp_path / "mini.txt"
    mini.write_text("42\n99\n")
    assert (
        data_main([*argv, "--subset", "minival", "--minival-images", str(mini), "--non-lxmert-minival"]) == 2
    )
    assert "not both" in capsys.readouterr().err
    # LXMERT's list with an image the file lacks: converted, with a warning
    assert data_main([*argv, "--subset", "minival", "--minival-images", str(mini)]) == 0
    captured = capsys.readouterr()
    assert "1 of the 2 images" in captured.err and "LXMERT's list" in captured.out
    assert {it["question_id"] for it in json.loads(out.read_text())} == {42000, 42001}
    # the deliberate other split says what it is
    assert data_main([*argv, "--subset", "minival", "--non-lxmert-minival", "--minival-size", "1"]) == 0
    assert "NOT LXMERT's minival" in capsys.readouterr().out


def test_gqa_items_and_cli(tmp_path):
    questions = {
        "02930152": {
            "imageId": "2354786",
            "question": "Is the sky dark?",
            "answer": "yes",
            "isBalanced": True,
        },
        "07333408": {"imageId": "n161313", "question": "What is on the table?", "isBalanced": True},
    }
    items = convert_gqa(questions)
    assert items == [
        {"img_id": "2354786", "label": {"yes": 1.0}, "question_id": "02930152", "sent": "Is the sky dark?"},
        {"img_id": "n161313", "question_id": "07333408", "sent": "What is on the table?"},
    ]
    with pytest.raises(DataFormatError, match="q.json: question 1: 'imageId' must be a string"):
        convert_gqa({"1": {"question": "?"}}, source="q.json")
    f1, f2 = tmp_path / "a.json", tmp_path / "b.json"
    f1.write_text(json.dumps(questions))
    f2.write_text(json.dumps({"1": {"imageId": "1", "question": "?", "answer": "no"}}))
    out = tmp_path / "gqa.json"
    assert data_main(["gqa", "--questions", str(f1), str(f2), "--out", str(out)]) == 0
    assert [it["question_id"] for it in json.loads(out.read_text())] == ["02930152", "07333408", "1"]
    assert data_main(["gqa", "--questions", str(f1), str(f1), "--out", str(out)]) == 2


# ----------------------------------------------------------------------------------------------- NLVR2
def test_nlvr2_items():
    text = (
        json.dumps({"identifier": "dev-850-0-0", "sentence": "Two dogs.", "label": "True", "writer": 1}) + "\n"
        + json.dumps({"identifier": "dev-850-1-0", "sentence": "Two dogs.", "label": "False"}) + "\n"
    )  # fmt: skip
    assert convert_nlvr2(text) == [
        {
            "identifier": "dev-850-0-0",
            "img0": "dev-850-0-img0",
            "img1": "dev-850-0-img1",
            "label": 1,
            "sent": "Two dogs.",
            "uid": "nlvr2_valid_0",  # LXMERT's name for dev
        },
        {
            "identifier": "dev-850-1-0",
            "img0": "dev-850-1-img0",
            "img1": "dev-850-1-img1",
            "label": 0,
            "sent": "Two dogs.",
            "uid": "nlvr2_valid_1",
        },
    ]
    assert convert_nlvr2(text, split="dev")[1]["uid"] == "nlvr2_dev_1"
    unlabelled = json.dumps({"identifier": "test2-1-2-3", "sentence": "s"})
    assert convert_nlvr2(unlabelled) == [
        {
            "identifier": "test2-1-2-3",
            "img0": "test2-1-2-img0",
            "img1": "test2-1-2-img1",
            "sent": "s",
            "uid": "nlvr2_hidden_0",
        }
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "dev.json:2: not a JSON object"),
        (
            json.dumps({"identifier": "dev-1-0", "sentence": "s", "label": "True"}),
            "dev.json:2: identifier 'dev-1-0'",
        ),
        (
            json.dumps({"identifier": "dev-1-0-0", "label": "True"}),
            "dev.json:2: example dev-1-0-0 has no string 'sentence'",
        ),
        (
            json.dumps({"identifier": "dev-1-0-0", "sentence": "s", "label": "true"}),
            'label must be "True" or "False"',
        ),
    ],
)
def test_nlvr2_bad_lines(line, message):
    good = json.dumps({"identifier": "dev-1-0-0", "sentence": "s", "label": "True"})
    with pytest.raises(DataFormatError, match=message):
        convert_nlvr2(good + "\n" + line + "\n", source="dev.json")


def test_nlvr2_cli(tmp_path):
    src = tmp_path / "dev.json"
    src.write_text(json.dumps({"identifier": "dev-1-0-0", "sentence": "s", "label": "False"}) + "\n")
    out = tmp_path / "valid.json"
    assert data_main(["nlvr2", "--jsonl", str(src), "--out", str(out)]) == 0
    assert json.loads(out.read_text())[0]["label"] == 0


# -------------------------------------------------------------------------------------------- easy-VQA
def make_easy_vqa(root: Path) -> Path:
    """A tiny folder in the easy-vqa package's data layout: 3 train and 2 test images."""
    root.mkdir(parents=True)
    (root / "answers.txt").write_text("circle\nred\nyes\nno\nblue\nrectangle\n")
    train = [
        ["what is the red shape?", "circle", 0],
        ["what color is the shape?", "red", 0],
        ["is there a blue shape?", "no", 0],
        ["does the image contain a rectangle?", "yes", 1],
        ["what is the color of the shape?", "blue", 1],
        ["what shape is present?", "circle", 2],
    ]
    test = [["what color is the circle?", "red", 0], ["is no red shape present?", "yes", 1]]
    for split, rows, n in (("train", train, 3), ("test", test, 2)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "questions.json").write_text(json.dumps(rows))
        for i in range(n):
            Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(root / split / "images" / f"{i}.png")
    return root


@pytest.mark.parametrize(
    "question, qtype",
    [
        ("what color is the shape?", "color"),
        ("what is the color of the triangle?", "color"),
        ("what is the blue shape?", "shape"),
        ("what shape does the image contain?", "shape"),
        ("does the image not contain a gray shape?", "yes/no"),
        ("is no red shape present?", "yes/no"),
    ],
)
def test_easy_vqa_question_types(question, qtype):
    assert question_type(question) == qtype


def test_easy_vqa_conversion(tmp_path):
    src = make_easy_vqa(tmp_path / "src")
    out = tmp_path / "out"
    manifest = convert_easy_vqa(out, source=src, train_images=2)
    assert manifest["splits"]["train"] == {
        "images": 2,
        "questions": 5,
        "types": {"color": 2, "shape": 1, "yes/no": 2},
    }
    assert manifest["splits"]["test"]["images"] == 2
    assert sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png")) == [
        "images/test/0.png", "images/test/1.png", "images/train/0.png", "images/train/1.png",
    ]  # fmt: skip

    train = json.loads((out / "train.json").read_text())
    assert train[0] == {
        "answer_type": "other",
        "img_id": "train/0",
        "label": {"circle": 1.0},
        "question_id": 0,
        "question_type": "shape",
        "sent": "what is the red shape?",
    }
    assert [it["question_id"] for it in train] == [0, 1, 2, 3, 4]  # the question of image 2 is left out
    assert train[2]["answer_type"] == "yes/no" and train[2]["question_type"] == "yes/no"
    test = json.loads((out / "test.json").read_text())
    assert [(it["img_id"], it["question_id"]) for it in test] == [
        ("test/0", TEST_QUESTION_ID_OFFSET),
        ("test/1", TEST_QUESTION_ID_OFFSET + 1),
    ]

    # the image ids are what `extract-features OUT/images --id-from relpath` assigns
    extracted = {it.img_id for it in collect_images(out / "images", None, "relpath")}
    assert {it["img_id"] for it in train + test} <= extracted
    assert extracted == {"train/0", "train/1", "test/0", "test/1"}

    # the official-format test files score with the official metric: gold answers -> 100, "yes" -> 50
    annotations = json.loads((out / "test_annotations.json").read_text())
    questions = json.loads((out / "test_questions.json").read_text())
    assert annotations["annotations"][0]["answers"] == [
        {"answer": "red", "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)
    ]
    gold = [{"question_id": it["question_id"], "answer": next(iter(it["label"]))} for it in test]
    assert evaluate_vqa(annotations, gold, questions)["overall"] == 100.0
    yes = [{"question_id": it["question_id"], "answer": "yes"} for it in test]
    s = evaluate_vqa(annotations, yes, questions)
    assert s["overall"] == 50.0 and s["perQuestionType"] == {"color": 0.0, "yes/no": 100.0}

    pretrain = json.loads((out / "pretrain.json").read_text())
    assert pretrain == [
        {
            "img_id": "train/0",
            "labelf": {"easy_vqa": [{"circle": 1.0}, {"red": 1.0}, {"no": 1.0}]},
            "sentf": {
                "easy_vqa": ["what is the red shape?", "what color is the shape?", "is there a blue shape?"]
            },
        },
        {
            "img_id": "train/1",
            "labelf": {"easy_vqa": [{"yes": 1.0}, {"blue": 1.0}]},
            "sentf": {"easy_vqa": ["does the image contain a rectangle?", "what is the color of the shape?"]},
        },
    ]
    answers = ["circle", "red", "yes", "no", "blue", "rectangle"]
    assert json.loads((out / "label2ans.json").read_text()) == answers
    assert json.loads((out / "ans2label.json").read_text()) == {a: i for i, a in enumerate(answers)}
    assert json.loads((out / "all_ans.json").read_text())[0] == {"ans": "circle", "dsets": ["easy_vqa"]}

    # a rerun with fewer images removes the extra ones (extract-features would pick them up)
    convert_easy_vqa(out, source=src, train_images=1, test_images=1)
    assert sorted(p.name for p in (out / "images" / "train").iterdir()) == ["0.png"]


def test_easy_vqa_valid_split_holds_out_the_next_train_images(tmp_path):
    src = make_easy_vqa(tmp_path / "src")
    out = tmp_path / "out"
    manifest = convert_easy_vqa(out, source=src, train_images=1, valid_images=1)
    train = json.loads((out / "train.json").read_text())
    valid = json.loads((out / "valid.json").read_text())
    assert {it["img_id"] for it in train} == {"train/0"} and {it["img_id"] for it in valid} == {"train/1"}
    assert [it["img_id"] for it in json.loads((out / "pretrain.json").read_text())] == ["train/0"]
    assert sorted(p.name for p in (out / "images" / "train").iterdir()) == ["0.png", "1.png"]
    assert manifest["splits"]["valid"]["questions"] == len(valid) == 2
    assert manifest["splits"]["train"]["images"] == 1 and manifest["files"]["valid"] == "valid.json"
    with pytest.raises(ValueError, match="3 train images .* 2 for training and 2 held out"):
        convert_easy_vqa(out, source=src, train_images=2, valid_images=2)
    convert_easy_vqa(out, source=src, train_images=1)  # no validation split: no stale valid.json
    assert not (out / "valid.json").exists()


def test_easy_vqa_bad_input(tmp_path, capsys):
    src = make_easy_vqa(tmp_path / "src")
    rows = json.loads((src / "train" / "questions.json").read_text())
    rows[3] = ["is it?", "purple", 1]
    (src / "train" / "questions.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    assert data_main(["easy-vqa", "--out", str(out), "--source", str(src)]) == 2
    assert "train/questions.json: entry #3: answer 'purple' is not in answers.txt" in capsys.readouterr().err
    rows[3] = ["is it?", "yes"]
    (src / "train" / "questions.json").write_text(json.dumps(rows))
    with pytest.raises(DataFormatError, match=r"entry #3 is not \[question, answer, image_id >= 0\]"):
        convert_easy_vqa(out, source=src)
    rows[3] = ["does the image contain a rectangle?", "yes", 1]
    (src / "train" / "questions.json").write_text(json.dumps(rows))
    (src / "train" / "images" / "1.png").unlink()
    with pytest.raises(DataFormatError, match="questions refer to images missing from .*: 1.png"):
        convert_easy_vqa(out, source=src)


def test_easy_vqa_installed_package(tmp_path):
    try:
        data = installed_easy_vqa_data()
    except DataFormatError:
        pytest.skip("the easy-vqa package is not installed")
    assert (data / "train" / "questions.json").is_file()
    manifest = convert_easy_vqa(tmp_path / "out", train_images=3, test_images=2)
    assert manifest["answers"] == 13
    assert manifest["splits"]["train"]["images"] == 3
    assert manifest["easy_vqa_version"] == "1.0"
    test = json.loads((tmp_path / "out" / "test.json").read_text())
    assert {it["img_id"] for it in test} == {"test/0", "test/1"}
