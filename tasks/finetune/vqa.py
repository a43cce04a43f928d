"""VQA v2 fine-tuning: LXMERT's recipe on the feature stores (see :mod:`tasks.finetune.qa` for the data, loss and metric).

Data: LXMERT's ``{"img_id", "label": {answer: score}, "question_id": int, "sent", ...}`` files (``lxmert-data vqa``
writes them from the official downloads), the 3129-answer table ``trainval_label2ans.json``. The original recipe
(``tasks/configs/vqa.yaml``): train + nominival, valid minival, batch 32, lr 5e-5, 4 epochs, BERT-Adam with 10%
warmup, clip 5, BCE on soft scores times 3129.

Official result file: ``[{"question_id": int, "answer": str}, ...]`` (what the evaluation server takes for
test-dev / test-std, and what :func:`tasks.metrics.vqa.evaluate_vqa` scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.config import TrainConfig
from tasks.data.jsonio import DataFormatError, read_json
from tasks.finetune.qa import Prediction, QATask
from tasks.metrics.vqa import evaluate_vqa


class VQATask(QATask):
    """VQA v2: soft-score QA over the 3129 answers; official metric = the VQA v2 accuracy."""

    name = "vqa"
    question_id_type = int

    def submission(self, preds: Sequence[Prediction]) -> list[dict[str, Any]]:
        rows = []
        for p in preds:
            try:
                qid = int(p.question_id)
            except ValueError:
                raise DataFormatError(
                    f"vqa: question_id {p.question_id!r} is not an integer; the VQA server needs integer ids"
                ) from None
            rows.append({"question_id": qid, "answer": p.answer})
        return rows

    def official_summary(self, official: dict[str, Any]) -> str:
        return (
            f"official VQA accuracy: {official['overall']:.2f}%  per answer type: {official['perAnswerType']}"
        )

    def official_metric(self, preds: Sequence[Prediction], annotations: str) -> dict[str, Any]:
        """The official VQA v2 accuracy of ``preds`` against the annotations file restricted to the predicted
        questions (a valid split such as minival is part of the official val2014 file)."""
        if annotations not in self._official_docs:  # read once per run (the val2014 file is large)
            self._official_docs[annotations] = read_json(
                annotations, "the official VQA annotations (v2_mscoco_*_annotations.json)"
            )
        doc = self._official_docs[annotations]
        if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
            raise DataFormatError(
                f"{annotations}: no 'annotations' list; give the official VQA annotations file "
                "(e.g. v2_mscoco_val2014_annotations.json)"
            )
        wanted = {int(p.question_id) for p in preds}
        anns = [a for a in doc["annotations"] if isinstance(a, dict) and a.get("question_id") in wanted]
        found = {a["question_id"] for a in anns}
        if found != wanted:
            missing = sorted(wanted - found)
            raise DataFormatError(
                f"{annotations}: {len(missing)} of the {len(wanted)} predicted questions have no annotation "
                f"(e.g. {missing[:5]}); give the annotations of the split evaluated"
            )
        return evaluate_vqa(
            anns,
            self.submission(preds),
            annotations_source=str(annotations),
            predictions_source="vqa predictions",
        )


def build(config: TrainConfig, load: str | Path | None = None) -> VQATask:
    """The VQA task of ``config``; ``load``: the starting model folder, whose ``label2ans.json`` / ``features.json``
    stand in for ``data.answers`` / ``data.features`` when those are empty."""
    return VQATask(config, None if load is None else str(load))
