"""GQA fine-tuning: LXMERT's recipe on the feature stores (see :mod:`tasks.finetune.qa` for the data, loss and metric).

Data: LXMERT's ``{"img_id", "label": {answer: 1.0}, "question_id": str, "sent"}`` files (``lxmert-data gqa``
writes them from the official balanced questions), the 1842-answer table ``trainval_label2ans.json``. The
original recipe (``tasks/configs/gqa.yaml``): train + valid (val_balanced), valid testdev, batch 32, lr 1e-5,
4 epochs, BERT-Adam with 10% warmup, clip 5, BCE on the scores times 1842 (``finetune.loss: ce``: the
original's ``--mceLoss``, cross-entropy on the answer).

LXMERT's training-time metric on GQA (one answer of score 1.0 per question) is top-1 accuracy; the official
``eval.py`` compares exact strings, which the answers of the table are, so on a balanced split both agree.

Official result file: ``[{"questionId": str, "prediction": str}, ...]`` (the GQA server's submission format and
what :func:`tasks.metrics.gqa.evaluate_gqa` scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.config import TrainConfig
from tasks.data.jsonio import DataFormatError, read_json
from tasks.finetune.qa import Prediction, QATask
from tasks.metrics.gqa import evaluate_gqa


class GQATask(QATask):
    """GQA: QA over the 1842 answers; official metric = GQA's ``eval.py`` (accuracy, binary / open, ...)."""

    name = "gqa"
    question_id_type = str

    def submission(self, preds: Sequence[Prediction]) -> list[dict[str, Any]]:
        return [{"questionId": str(p.question_id), "prediction": p.answer} for p in preds]

    def official_summary(self, official: dict[str, Any]) -> str:
        return (
            f"official GQA accuracy: {official['accuracy']:.2f}%  binary {official['binary']:.2f}%  "
            f"open {official['open']:.2f}%"
        )

    def official_metric(self, preds: Sequence[Prediction], annotations: str) -> dict[str, Any]:
        """The official GQA scores of ``preds`` against the official questions file (e.g.
        ``testdev_balanced_questions.json``) restricted to the predicted questions, without choices (validity /
        plausibility 0, as the official without its choices file) and without consistency (no ``consistency`` key)."""
        if annotations not in self._official_docs:  # read once per run
            self._official_docs[annotations] = read_json(
                annotations, "the official GQA questions ({questionId: {question, answer, ...}})"
            )
        doc = self._official_docs[annotations]
        if not isinstance(doc, dict):
            raise DataFormatError(
                f"{annotations}: not an official GQA questions file ({{questionId: question}}, e.g. "
                "testdev_balanced_questions.json)"
            )
        wanted = {str(p.question_id) for p in preds}
        questions = {qid: q for qid, q in doc.items() if qid in wanted}
        if len(questions) != len(wanted):
            missing = sorted(wanted - set(questions))
            raise DataFormatError(
                f"{annotations}: {len(missing)} of the {len(wanted)} predicted questions are not in it "
                f"(e.g. {missing[:5]}); give the questions file of the split evaluated"
            )
        scores = evaluate_gqa(
            questions,
            self.submission(preds),
            questions_source=str(annotations),
            predictions_source="gqa predictions",
        )
        del scores[
            "consistency"
        ]  # not scored here (lxmert-eval gqa --consistency): absent rather than a false 0
        return scores


def build(config: TrainConfig, load: str | Path | None = None) -> GQATask:
    """The GQA task of ``config``; ``load``: the starting model folder, whose ``label2ans.json`` / ``features.json``
    stand in for ``data.answers`` / ``data.features`` when those are empty."""
    return GQATask(config, None if load is None else str(load))
