"""VQA / GQA items: LXMERT's question JSON, soft-score targets over the answer table, the dataset and its batches.

Items are LXMERT's JSON (one file or several, concatenated)::

    [{"img_id": "COCO_val2014_000000393267", "sent": "What is the man holding?",
      "question_id": 393267002, "label": {"frisbee": 1.0, "disc": 0.3}, ...}, ...]

``label`` is optional (test splits have none). The answer table (``trainval_label2ans.json``, a list, or
``trainval_ans2label.json``, a dict; see :func:`tasks.data.answer_table.load_answer_table`) gives the answer of
every output of the head. Each item's target is the dense vector of its soft scores over the table
``(num_answers,)``; label answers outside the table are counted, reported once, and ignored for training
(the original drops them too; at evaluation the item keeps its other answers, so predicting a dropped one
can never score).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tasks.data.jsonio import DataFormatError, read_json_list
from tasks.data.regions import RegionFeatures, collate_regions
from tasks.data.text import TextItemsDataset

__all__ = [
    "MODEL_INPUTS",
    "QADataset",
    "QAItem",
    "LabelStats",
    "collate_qa",
    "label_stats",
    "load_qa_items",
    "model_inputs",
    "soft_target",
]


@dataclass
class QAItem:
    """One question: ``label`` maps answers to soft scores in [0, 1], or is None (no annotation)."""

    question_id: int | str
    img_id: str
    sent: str
    label: dict[str, float] | None


QA_FORMAT = 'LXMERT\'s question list [{"img_id", "sent", "question_id", "label": {answer: score}}, ...]'


def load_qa_items(
    paths: Sequence[str | Path], question_id_type: type | None = None, task: str = "qa"
) -> list[QAItem]:
    """The questions of one or more LXMERT QA JSON files, in file order.

    ``question_id_type``: ``int`` (VQA: the official ids and result files are ints), ``str`` (GQA: the official ids
    are strings, some with leading zeros an int would lose), None (either); ``task`` names it in messages.

    Raises :class:`DataFormatError` naming the file, the entry index and the question id for a malformed entry
    (an id of another type, an empty question or image id, a label score outside [0, 1]), and both places for a
    question id given twice (within or across files). Training and ``--eval-only`` read items only through here.
    """
    items: list[QAItem] = []
    seen: dict[Any, str] = {}
    for path in paths:
        for i, entry in enumerate(read_json_list(path, QA_FORMAT)):
            where = f"{path}: entry {i}"
            if not isinstance(entry, dict):
                raise DataFormatError(
                    f"{where} is a {type(entry).__name__}, expected an object ({QA_FORMAT})"
                )
            missing = [k for k in ("img_id", "sent", "question_id") if k not in entry]
            if missing:
                raise DataFormatError(f"{where} (keys {sorted(entry)}) lacks {missing}; expected {QA_FORMAT}")
            qid = entry["question_id"]
            where = f"{where} (question_id {qid!r})"
            if not isinstance(qid, int | str) or isinstance(qid, bool):
                raise DataFormatError(f"{where}: question_id must be an int (VQA) or a str (GQA)")
            if question_id_type is int and not isinstance(qid, int):
                raise DataFormatError(
                    f"{where}: question_id must be an int for {task} (the official question ids and result "
                    "files are integers); fix the entry or convert the file again with lxmert-data"
                )
            if question_id_type is str and not isinstance(qid, str):
                raise DataFormatError(
                    f"{where}: question_id must be a string for {task} (the official ids are strings, some with "
                    "leading zeros); fix the entry or convert the file again with lxmert-data"
                )
            if not isinstance(entry["img_id"], str) or not isinstance(entry["sent"], str):
                raise DataFormatError(f"{where}: img_id and sent must be strings")
            if not entry["sent"].strip():
                raise DataFormatError(
                    f"{where}: the question (sent) is empty; give its text or drop the entry"
                )
            if not entry["img_id"]:
                raise DataFormatError(f"{where}: img_id is empty; name the image the question is about")
            label = entry.get("label")
            if label is not None:
                if not isinstance(label, dict) or not all(
                    isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
                    for k, v in label.items()
                ):
                    raise DataFormatError(
                        f"{where}: label must be {{answer: score}} with numeric scores, got {label!r}"
                    )
                if not all(0.0 <= v <= 1.0 for v in label.values()):  # NaN fails too
                    raise DataFormatError(
                        f"{where}: label scores must lie in [0, 1] (soft scores), got {label!r}"
                    )
                label = {k: float(v) for k, v in label.items()}
            if qid in seen:
                raise DataFormatError(
                    f"{where}: question_id {qid!r} is given twice (first at {seen[qid]}); question ids must be "
                    "unique: remove the duplicate or do not list a split twice in data.train"
                )
            seen[qid] = f"{path}: entry {i}"
            items.append(QAItem(qid, entry["img_id"], entry["sent"], label))
    return items


def soft_target(label: dict[str, float] | None, ans2label: dict[str, int], num_answers: int) -> Tensor:
    """``(num_answers,)`` float32: the item's soft scores at their answers' indices, 0 elsewhere; answers
    outside the table are ignored. ``None`` (no annotation) gives zeros."""
    target = torch.zeros(num_answers, dtype=torch.float32)
    for ans, score in (label or {}).items():
        index = ans2label.get(ans)
        if index is not None:
            target[index] = score
    return target


@dataclass
class LabelStats:
    """How many label answers (and whole questions) fall outside the answer table."""

    questions: int = 0
    labelled: int = 0
    answers_outside: int = 0
    questions_without_answer: int = 0  # labelled, but no answer of theirs is in the table

    def summary(self, name: str) -> str:
        return (
            f"{name}: {self.questions} questions, {self.labelled} labelled; {self.answers_outside} label answers "
            f"outside the answer table (ignored for training, scored as wrong), "
            f"{self.questions_without_answer} questions with no answer in the table"
        )


def label_stats(items: Sequence[QAItem], ans2label: dict[str, int]) -> LabelStats:
    stats = LabelStats(questions=len(items))
    for item in items:
        if item.label is None:
            continue
        stats.labelled += 1
        outside = sum(1 for a in item.label if a not in ans2label)
        stats.answers_outside += outside
        if outside == len(item.label) and item.label:
            stats.questions_without_answer += 1
    return stats


class QADataset(TextItemsDataset):
    """Questions over the feature stores. Item ``i``: ``input_ids`` / ``attention_mask`` / ``token_type_ids``
    ``(L,)``, ``regions`` (:class:`tasks.data.regions.Regions`: features ``(n, D)`` float32, boxes ``(n, 4)``
    x1, y1, x2, y2 divided by the image width / height), ``target`` ``(A,)`` soft scores, ``index`` (position in
    :attr:`items`).

    """

    def __init__(
        self,
        items: list[QAItem],
        features: RegionFeatures,
        ans2label: dict[str, int],
        num_answers: int,
        max_seq_length: int,
    ) -> None:
        super().__init__(items, features, max_seq_length)
        self.ans2label = ans2label
        self.num_answers = num_answers

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        out = self.encode(index)
        out.update(
            regions=self.features[item.img_id],
            target=soft_target(item.label, self.ans2label, self.num_answers),
            index=index,
        )
        return out


def collate_qa(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch of :class:`QADataset` items: ``visual_feats`` ``(B, V, D)``, ``visual_pos`` ``(B, V, 4)``,
    ``visual_attention_mask`` ``(B, V)`` (only with uneven region counts), text ``(B, L)``, ``target`` ``(B, A)``,
    ``index`` ``(B,)``."""
    batch: dict[str, Any] = collate_regions([it["regions"] for it in items])
    batch.update(
        input_ids=torch.stack([it["input_ids"] for it in items]),
        attention_mask=torch.stack([it["attention_mask"] for it in items]),
        token_type_ids=torch.stack([it["token_type_ids"] for it in items]),
        target=torch.stack([it["target"] for it in items]),
        index=torch.tensor([it["index"] for it in items], dtype=torch.long),
    )
    return batch


MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "visual_feats",
    "visual_pos",
    "visual_attention_mask",
)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}
