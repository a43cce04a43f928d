"""VQA v2 official questions + annotations -> LXMERT's VQA items.

An item (LXMERT's ``data/vqa/*.json``)::

    {"answer_type": "other", "img_id": "COCO_val2014_000000393225", "label": {"net": 1.0, "netting": 0.3},
     "question_id": 393225001, "question_type": "what is", "sent": "What is the fence made of?"}

``label`` holds soft scores over the answer table (bottom-up-attention-vqa's ``compute_softscore.py``, which
produced LXMERT's data): each distinct string among the ten human answers, counted as given (raw, not
normalised), scores 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / >= 4 occurrences if it is in the table; answers
outside the table are left out (an item may have an empty label). These scores equal the official
leave-one-out accuracy of that answer. Questions without annotations (test2015) give items with only
``img_id``, ``question_id`` and ``sent``.

The answer table is LXMERT's (3129 answers, ``trainval_ans2label.json``) when given, else built as the
original: every ``multiple_choice_answer`` normalised (official punctuation + digit/article processing, then
commas dropped), kept when it answers at least ``min_count`` distinct questions; ordered by that count
(descending), then alphabetically.

val2014 is split into LXMERT's minival / nominival by image: the images of LXMERT's own list
(``--minival-images``). ``lxmert-data vqa --non-lxmert-minival`` takes instead the ``size`` images whose
``sha256("<seed>:<image_id>")`` is smallest (reproducible anywhere), a split that is NOT LXMERT's: most of its
images are in LXMERT's pretraining data (``mscoco_nominival``, with their VQA answers).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tasks.data.jsonio import DataFormatError, read_text
from tasks.metrics.base import preview
from tasks.metrics.vqa import process_digit_article, process_punctuation

__all__ = [
    "build_answer_table",
    "convert_vqa",
    "image_prefix",
    "preprocess_answer",
    "read_image_id_list",
    "select_minival_images",
    "soft_score",
]

DEFAULT_MINIVAL_SIZE = 5000
DEFAULT_SEED = 9595
DEFAULT_MIN_ANSWER_COUNT = 9  # the original's filter_answers threshold


def soft_score(count: int) -> float:
    """The soft score of an answer given by ``count`` of the ten annotators: 0 / 0.3 / 0.6 / 0.9 / 1.0."""
    if count <= 0:
        return 0.0
    return (0.3, 0.6, 0.9)[count - 1] if count < 4 else 1.0


def preprocess_answer(answer: str) -> str:
    """An answer as it enters the built answer table: the official punctuation + digit/article processing,
    then every comma removed (bottom-up-attention-vqa's ``preprocess_answer``)."""
    return process_digit_article(process_punctuation(answer)).replace(",", "")


def _questions_list(doc: Any, source: str) -> list[Mapping[str, Any]]:
    if not isinstance(doc, Mapping) or not isinstance(doc.get("questions"), list):
        raise DataFormatError(
            f"{source}: not an official VQA questions file (an object with a 'questions' list, e.g. "
            "v2_OpenEnded_mscoco_val2014_questions.json)"
        )
    for i, q in enumerate(doc["questions"]):
        if not isinstance(q, Mapping):
            raise DataFormatError(f"{source}: questions[{i}] is not an object")
        for key, kind in (("question_id", int), ("image_id", int), ("question", str)):
            if not isinstance(q.get(key), kind) or isinstance(q.get(key), bool):
                qid = q.get("question_id", f"questions[{i}]")
                raise DataFormatError(
                    f"{source}: question {qid}: {key!r} must be {'an integer' if kind is int else 'a string'} "
                    f"(got {q.get(key)!r:.100})"
                )
    return doc["questions"]


def _annotations_list(doc: Any, source: str) -> list[Mapping[str, Any]]:
    if not isinstance(doc, Mapping) or not isinstance(doc.get("annotations"), list):
        raise DataFormatError(
            f"{source}: not an official VQA annotations file (an object with an 'annotations' list, e.g. "
            "v2_mscoco_val2014_annotations.json)"
        )
    for i, a in enumerate(doc["annotations"]):
        qid = a.get("question_id", f"annotations[{i}]") if isinstance(a, Mapping) else f"annotations[{i}]"
        if not isinstance(a, Mapping):
            raise DataFormatError(f"{source}: annotations[{i}] is not an object")
        for key in ("question_id", "answer_type", "question_type", "multiple_choice_answer", "answers"):
            if key not in a:
                raise DataFormatError(f"{source}: question {qid}: the annotation has no {key!r}")
        if not isinstance(a["answers"], list) or not all(
            isinstance(x, Mapping) and isinstance(x.get("answer"), str) for x in a["answers"]
        ):
            raise DataFormatError(
                f"{source}: question {qid}: 'answers' must be a list of {{\"answer\": str, ...}} objects"
            )
        if not isinstance(a["multiple_choice_answer"], str):
            raise DataFormatError(f"{source}: question {qid}: 'multiple_choice_answer' must be a string")
    return doc["annotations"]


def build_answer_table(
    annotation_docs: Iterable[tuple[Any, str]], min_count: int = DEFAULT_MIN_ANSWER_COUNT
) -> tuple[list[str], dict[str, int]]:
    """The answer table built from official annotations (the original's ``filter_answers``).

    Args:
        annotation_docs: ``(annotations document, its path for messages)`` pairs (LXMERT: train + val).
        min_count: keep answers that are the ``multiple_choice_answer`` of at least this many questions.

    Returns:
        ``(label2ans, counts)``: answers ordered by count (descending) then alphabetically, and every
        preprocessed answer's number of distinct questions (kept or not).
    """
    questions_per_answer: dict[str, set[Any]] = {}
    for doc, source in annotation_docs:
        for a in _annotations_list(doc, source):
            questions_per_answer.setdefault(preprocess_answer(a["multiple_choice_answer"]), set()).add(
                a["question_id"]
            )
    counts = {ans: len(qs) for ans, qs in questions_per_answer.items()}
    kept = [ans for ans, n in counts.items() if n >= min_count]
    kept.sort(key=lambda ans: (-counts[ans], ans))
    return kept, counts


def image_prefix(questions_doc: Any) -> str:
    """``COCO_<subtype>_`` from the questions file's ``data_subtype`` (``train2014``, ``val2014``,
    ``test2015``; ``test-dev2015`` images are in test2015, so ``COCO_test2015_``)."""
    subtype = questions_doc.get("data_subtype") if isinstance(questions_doc, Mapping) else None
    if not isinstance(subtype, str) or not subtype:
        raise DataFormatError(
            "the questions file has no 'data_subtype' (train2014, val2014, test2015, ...); "
            "give the image id prefix with --image-prefix, e.g. COCO_val2014_"
        )
    if subtype.startswith("test-dev"):
        subtype = "test" + subtype[len("test-dev") :]
    return f"COCO_{subtype}_"


_TRAILING_DIGITS = re.compile(r"(\d+)$")


def read_image_id_list(path: str | Path) -> set[int]:
    """COCO image ids from a list file: a JSON list (of LXMERT items with ``img_id``, of ids or of names)
    or a text file with one id per line (``42``, ``COCO_val2014_000000000042``, ``.../COCO_..._42.jpg``)."""
    text = read_text(path, "image list")
    entries: list[tuple[str, Any]]
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{e.lineno}: the image list is not valid JSON: {e.msg}") from None
        entries = [
            (f"{path}: entry #{i}", x.get("img_id") if isinstance(x, Mapping) else x)
            for i, x in enumerate(data)
        ]
    else:
        entries = [
            (f"{path}:{n}", line.strip())
            for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    ids: set[int] = set()
    for where, value in entries:
        if isinstance(value, int) and not isinstance(value, bool):
            ids.add(value)
            continue
        match = _TRAILING_DIGITS.search(Path(str(value)).stem) if isinstance(value, str) else None
        if match is None:
            raise DataFormatError(
                f"{where}: {value!r:.100} is not a COCO image id (42, COCO_val2014_000000000042 or its file name)"
            )
        ids.add(int(match.group(1)))
    if not ids:
        raise DataFormatError(f"{path}: the image list is empty")
    return ids


def select_minival_images(
    image_ids: Iterable[int], size: int = DEFAULT_MINIVAL_SIZE, seed: int = DEFAULT_SEED
) -> set[int]:
    """The ``size`` image ids with the smallest ``sha256("<seed>:<image_id>")`` (all when fewer)."""

    def key(image_id: int) -> str:
        return hashlib.sha256(f"{seed}:{image_id}".encode()).hexdigest()

    return set(sorted(set(image_ids), key=key)[:size])


def convert_vqa(
    questions_doc: Any,
    annotations_doc: Any | None,
    ans2label: Mapping[str, int] | None,
    *,
    prefix: str | None = None,
    keep_images: set[int] | None = None,
    drop_images: set[int] | None = None,
    questions_source: str = "questions",
    annotations_source: str = "annotations",
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Convert one split.

    Args:
        questions_doc: the official questions document.
        annotations_doc: the official annotations document of the same split, or None (test: no labels).
        ans2label: the answer table (needed with annotations).
        prefix: image id prefix; default from the questions file (:func:`image_prefix`).
        keep_images / drop_images: keep only the questions of these COCO image ids / drop those of these
            (minival / nominival).

    Returns:
        ``(items, stats)``; stats: ``questions``, ``items``, ``empty_labels`` (no answer in the table),
        ``answers_outside_table`` (distinct human answers per question not in the table, summed).

    Raises:
        DataFormatError: malformed entries, repeated question ids, questions without an annotation or
            annotations without a question (naming them).
    """
    questions = _questions_list(questions_doc, questions_source)
    if prefix is None:
        prefix = image_prefix(questions_doc)
    seen: set[int] = set()
    dups = [q["question_id"] for q in questions if q["question_id"] in seen or seen.add(q["question_id"])]
    if dups:
        raise DataFormatError(f"{questions_source}: repeated question ids: {preview(dups)}")
    by_qid: dict[int, Mapping[str, Any]] = {}
    if annotations_doc is not None:
        if ans2label is None:
            raise ValueError("an answer table is needed to convert annotated questions")
        for a in _annotations_list(annotations_doc, annotations_source):
            if a["question_id"] in by_qid:
                raise DataFormatError(f"{annotations_source}: question {a['question_id']} is annotated twice")
            by_qid[a["question_id"]] = a
        missing = [q["question_id"] for q in questions if q["question_id"] not in by_qid]
        extra = sorted(set(by_qid) - seen)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{len(missing)} questions have no annotation: {preview(missing)}")
            if extra:
                parts.append(f"{len(extra)} annotations have no question: {preview(extra)}")
            raise DataFormatError(
                f"{questions_source} and {annotations_source} do not match (different splits?): "
                + "; ".join(parts)
            )

    items: list[dict[str, Any]] = []
    stats = {"questions": len(questions), "items": 0, "empty_labels": 0, "answers_outside_table": 0}
    for q in questions:
        image_id = q["image_id"]
        if keep_images is not None and image_id not in keep_images:
            continue
        if drop_images is not None and image_id in drop_images:
            continue
        item: dict[str, Any] = {
            "img_id": f"{prefix}{image_id:012d}",
            "question_id": q["question_id"],
            "sent": q["question"],
        }
        ann = by_qid.get(q["question_id"])
        if ann is not None:
            if ann.get("image_id", image_id) != image_id:
                raise DataFormatError(
                    f"{annotations_source}: question {q['question_id']}: image_id {ann['image_id']} differs from "
                    f"the questions file's {image_id}"
                )
            counts: dict[str, int] = {}
            for x in ann["answers"]:
                counts[x["answer"]] = counts.get(x["answer"], 0) + 1
            label = {a: soft_score(n) for a, n in counts.items() if a in ans2label}
            stats["answers_outside_table"] += len(counts) - len(label)
            stats["empty_labels"] += not label
            item.update(answer_type=ann["answer_type"], question_type=ann["question_type"], label=label)
        items.append(item)
    stats["items"] = len(items)
    return items, stats
