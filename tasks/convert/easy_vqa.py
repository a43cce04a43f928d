"""The easy-VQA demo data (PyPI ``easy-vqa``, MIT) -> images for ``extract-features`` and LXMERT's JSON files.

easy-VQA: 64x64 PNG images of one coloured shape each (4000 train, 1000 test, both numbered from 0) and
questions ``[question, answer, image_id]`` (38,575 train, 9,673 test) over 13 answers (3 shapes, 8 colours,
yes / no). The package's ``data`` folder (or any folder of the same layout: ``answers.txt``,
``{train,test}/questions.json``, ``{train,test}/images/<n>.png``) converts to ``OUT``::

    images/train/<n>.png, images/test/<n>.png  copies; `extract-features OUT/images STORE --id-from relpath`
                                               names them "train/<n>" and "test/<n>" (the ids used below)
    train.json, test.json                      VQA items {"answer_type", "img_id": "train/<n>",
                                               "label": {answer: 1.0}, "question_id", "question_type", "sent"}
    valid.json                                 with ``valid_images`` V: the questions of train images
                                               N..N+V-1 (N = train_images), held out of train.json and
                                               pretrain.json: the fine-tuning's validation split
    test_questions.json, test_annotations.json the test split in the official VQA formats (ten identical human
                                               answers each) for `lxmert-eval vqa` and the official metric
    pretrain.json                              train images as pretraining data: [{"img_id", "sentf":
                                               {"easy_vqa": [question, ...]}, "labelf": {"easy_vqa": [{answer: 1.0}, ...]}}]
    label2ans.json, ans2label.json, all_ans.json  the answer table (package order), and its pretraining form
                                               [{"ans", "dsets": ["easy_vqa"]}]
    manifest.json                              source, package version, counts, files

Question ids: a train question's index in ``train/questions.json``; a test question's index plus
:data:`TEST_QUESTION_ID_OFFSET` (ids stay distinct across splits and stable whatever subset is taken).
Question types come from the question's template: ``color`` ("what color ...", "what is the color of ..."),
``shape`` (other "what ..." questions, all about the shape), ``yes/no`` ("is ...", "does ...");
answer types are ``yes/no`` or ``other``, as VQA's.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.files import copy_file_atomic
from tasks.data.jsonio import DataFormatError, read_json, read_text, write_items, write_json

__all__ = [
    "DATASET_NAME",
    "SPLITS",
    "TEST_QUESTION_ID_OFFSET",
    "convert_easy_vqa",
    "easy_vqa_version",
    "installed_easy_vqa_data",
    "question_type",
]

DATASET_NAME = "easy_vqa"
SPLITS = ("train", "test")
TEST_QUESTION_ID_OFFSET = 1_000_000
_IMAGE_NAME = re.compile(r"^(\d+)\.png$")


def installed_easy_vqa_data() -> Path:
    """The ``data`` folder of the installed ``easy-vqa`` package (found without importing it)."""
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.origin:
        raise DataFormatError(
            "the easy-vqa package is not installed: `pip install easy-vqa` (see requirements.lock), "
            "or give its data folder with --source DIR"
        )
    return Path(spec.origin).parent / "data"


def easy_vqa_version() -> str | None:
    """The installed ``easy-vqa`` version, or None."""
    try:
        return importlib.metadata.version("easy-vqa")
    except importlib.metadata.PackageNotFoundError:
        return None


def question_type(question: str) -> str:
    """``color``, ``shape`` or ``yes/no`` from an easy-VQA question's template; ``ValueError`` for a question
    that fits none."""
    words = question.lower().rstrip("?").split()
    if not words:
        raise ValueError("empty question")
    if words[0] == "what":
        if "color" in words:
            return "color"
        if "shape" in words:
            return "shape"
    elif words[0] in ("is", "does", "are", "do"):
        return "yes/no"
    raise ValueError(f"{question!r} fits no easy-VQA template (what color/shape ..., is ..., does ...)")


def _read_answers(source: Path) -> list[str]:
    path = source / "answers.txt"
    answers = [line.strip() for line in read_text(path, "easy-VQA answer list").splitlines() if line.strip()]
    if len(set(answers)) != len(answers):
        raise DataFormatError(f"{path}: repeated answers")
    if not answers:
        raise DataFormatError(f"{path}: no answers")
    return answers


def _read_questions(path: Path, answers: set[str]) -> list[tuple[str, str, int]]:
    data = read_json(path, "easy-VQA questions file")
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a list of [question, answer, image_id]")
    out = []
    for i, entry in enumerate(data):
        ok = (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], str)
            and isinstance(entry[2], int)
            and not isinstance(entry[2], bool)
            and entry[2] >= 0
        )
        if not ok:
            raise DataFormatError(
                f"{path}: entry #{i} is not [question, answer, image_id >= 0]: {entry!r:.200}"
            )
        if entry[1] not in answers:
            raise DataFormatError(f"{path}: entry #{i}: answer {entry[1]!r} is not in answers.txt")
        out.append((entry[0], entry[1], entry[2]))
    return out


def _image_files(folder: Path) -> dict[int, Path]:
    if not folder.is_dir():
        raise DataFormatError(f"{folder} is not a folder (expected the easy-VQA images <n>.png)")
    files = {}
    for p in folder.iterdir():
        m = _IMAGE_NAME.match(p.name)
        if m:
            files[int(m.group(1))] = p
    return files


def _split(
    source: Path, out: Path, split: str, limit: int | None, answers: list[str], held_out: int = 0
) -> tuple[list[dict[str, Any]], list[tuple[int, str, str, int]], int]:
    """Copy one split's images; its items, its (question_id, question, answer, image) rows, images kept.
    ``held_out`` more images (``limit .. limit + held_out - 1``) are copied too, their items included."""
    qpath = source / split / "questions.json"
    rows = _read_questions(qpath, set(answers))
    images = _image_files(source / split / "images")
    n_images = len(images) if limit is None else min(limit, len(images))
    if held_out and n_images + held_out > len(images):
        raise ValueError(
            f"{len(images)} {split} images in {source / split / 'images'}: {n_images} for training and {held_out} "
            "held out for validation do not fit; ask for fewer"
        )
    keep = set(range(n_images + held_out))
    missing = sorted({img for _, _, img in rows if img in keep and img not in images})
    if missing:
        raise DataFormatError(
            f"{qpath}: questions refer to images missing from {source / split / 'images'}: "
            + ", ".join(f"{i}.png" for i in missing[:10])
        )
    dest = out / "images" / split
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.iterdir():  # a rerun with fewer images must not leave extra images for extract-features
        m = _IMAGE_NAME.match(old.name)
        if m and int(m.group(1)) not in keep:
            old.unlink()
    for n in sorted(keep):
        copy_file_atomic(images[n], dest / f"{n}.png")

    offset = 0 if split == "train" else TEST_QUESTION_ID_OFFSET
    items, kept_rows = [], []
    for i, (question, answer, img) in enumerate(rows):
        if img not in keep:
            continue
        try:
            qtype = question_type(question)
        except ValueError as e:
            raise DataFormatError(f"{qpath}: entry #{i}: {e}") from None
        atype = "yes/no" if answer in ("yes", "no") else "other"
        if (qtype == "yes/no") != (atype == "yes/no"):
            raise DataFormatError(f"{qpath}: entry #{i}: a {qtype} question {question!r} answered {answer!r}")
        qid = offset + i
        items.append(
            {
                "answer_type": atype,
                "img_id": f"{split}/{img}",
                "label": {answer: 1.0},
                "question_id": qid,
                "question_type": qtype,
                "sent": question,
            }
        )
        kept_rows.append((qid, question, answer, img))
    return items, kept_rows, n_images


def _official_files(
    items: list[dict[str, Any]], rows: list[tuple[int, str, str, int]], version: str | None
) -> tuple[dict, dict]:
    info = {
        "description": "easy-VQA test split in the VQA v2 formats, written by `lxmert-data easy-vqa`",
        "source": "https://pypi.org/project/easy-vqa/",
        "version": version or "unknown",
    }
    license_ = {"name": "MIT", "url": "https://github.com/vzhou842/easy-VQA/blob/master/LICENSE"}
    questions = {
        "info": info,
        "task_type": "Open-Ended",
        "data_type": DATASET_NAME,
        "data_subtype": "test",
        "license": license_,
        "questions": [{"image_id": img, "question": q, "question_id": qid} for qid, q, _, img in rows],
    }
    annotations = {
        "info": info,
        "license": license_,
        "data_subtype": "test",
        "annotations": [
            {
                "question_id": qid,
                "image_id": img,
                "question_type": item["question_type"],
                "answer_type": item["answer_type"],
                "multiple_choice_answer": answer,
                "answers": [
                    {"answer": answer, "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)
                ],
            }
            for (qid, _, answer, img), item in zip(rows, items)
        ],
    }
    return questions, annotations


def convert_easy_vqa(
    out: str | os.PathLike,
    source: str | os.PathLike | None = None,
    train_images: int | None = None,
    test_images: int | None = None,
    valid_images: int = 0,
) -> dict[str, Any]:
    """Write the demo data set (see the module docstring) to ``out``.

    Args:
        out: output folder (created; files replaced atomically; stale ``images/<split>/<n>.png`` beyond the
            requested counts removed).
        source: a folder in the package's ``data`` layout; default the installed package's.
        train_images / test_images: keep images ``0 .. N-1`` of the split and their questions (None: all).
        valid_images: hold out the next ``V`` train images (``N .. N+V-1``; needs ``train_images``) as
            ``valid.json``; 0: no validation split.

    Returns:
        the manifest (also written to ``out/manifest.json``): counts per split, files, package version.

    Raises:
        DataFormatError: a missing or malformed source file (naming it and the entry), a question whose image
            file is missing, an answer outside ``answers.txt``, a question that fits no template.
    """
    out = Path(out)
    src = Path(source) if source is not None else installed_easy_vqa_data()
    if not src.is_dir():
        raise DataFormatError(f"easy-VQA data folder {src} does not exist")
    for name, n in (("train_images", train_images), ("test_images", test_images)):
        if n is not None and n < 1:
            raise ValueError(f"{name} must be at least 1 (got {n})")
    if valid_images < 0 or (valid_images and train_images is None):
        raise ValueError(
            f"valid_images={valid_images}: give a count >= 0, held out after the first train_images train images"
        )
    answers = _read_answers(src)
    version = easy_vqa_version() if source is None else None
    out.mkdir(parents=True, exist_ok=True)

    all_train, _, n_train = _split(src, out, "train", train_images, answers, held_out=valid_images)
    held = {f"train/{n}" for n in range(n_train, n_train + valid_images)}
    train_items = [it for it in all_train if it["img_id"] not in held]
    valid_items = [it for it in all_train if it["img_id"] in held]
    test_items, test_rows, n_test = _split(src, out, "test", test_images, answers)
    write_items(out / "train.json", train_items)
    if valid_images:
        write_items(out / "valid.json", valid_items)
    elif (out / "valid.json").exists():  # a rerun without a validation split must not leave an old one
        (out / "valid.json").unlink()
    write_items(out / "test.json", test_items)
    questions, annotations = _official_files(test_items, test_rows, version)
    write_json(out / "test_questions.json", questions, indent=None)
    write_json(out / "test_annotations.json", annotations, indent=None)

    per_image: dict[str, dict[str, list]] = {}
    for item in train_items:
        entry = per_image.setdefault(item["img_id"], {"sent": [], "label": []})
        entry["sent"].append(item["sent"])
        entry["label"].append(item["label"])
    pretrain = [
        {"img_id": img, "labelf": {DATASET_NAME: e["label"]}, "sentf": {DATASET_NAME: e["sent"]}}
        for img, e in sorted(per_image.items(), key=lambda kv: int(kv[0].split("/")[1]))
    ]
    write_items(out / "pretrain.json", pretrain)
    write_json(out / "label2ans.json", answers)
    write_json(out / "ans2label.json", {a: i for i, a in enumerate(answers)})
    write_json(out / "all_ans.json", [{"ans": a, "dsets": [DATASET_NAME]} for a in answers])

    def count_types(items: list[Mapping[str, Any]]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for it in items:
            counts[it["question_type"]] = counts.get(it["question_type"], 0) + 1
        return dict(sorted(counts.items()))

    splits = {
        "train": {"images": n_train, "questions": len(train_items), "types": count_types(train_items)},
        "test": {"images": n_test, "questions": len(test_items), "types": count_types(test_items)},
    }
    files = {"train": "train.json", "test": "test.json"}
    if valid_images:
        splits["valid"] = {
            "images": valid_images,
            "questions": len(valid_items),
            "types": count_types(valid_items),
            "held_out": f"train images {n_train}..{n_train + valid_images - 1}",
        }
        files["valid"] = "valid.json"
    manifest = {
        "source": str(src),
        "easy_vqa_version": version,
        "images_dir": "images",
        "image_ids": "--id-from relpath: '<split>/<n>' for images/<split>/<n>.png",
        "answers": len(answers),
        "splits": splits,
        "test_question_id_offset": TEST_QUESTION_ID_OFFSET,
        "files": {
            **files,
            "test_questions": "test_questions.json",
            "test_annotations": "test_annotations.json",
            "pretrain": "pretrain.json",
            "label2ans": "label2ans.json",
            "ans2label": "ans2label.json",
            "all_ans": "all_ans.json",
        },
    }
    write_json(out / "manifest.json", manifest)
    return manifest
