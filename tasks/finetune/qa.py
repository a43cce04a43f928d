"""VQA / GQA fine-tuning: what both share (the items and dataset are in :mod:`tasks.finetune.qa_data`, the model
in :mod:`tasks.finetune.qa_model`); :mod:`tasks.finetune.vqa` and :mod:`tasks.finetune.gqa` set the differences.

Losses (on the answer logits ``(B, A)``; defined once, in :mod:`model.losses`):

- ``bce`` (VQA, GQA; the original): the model's own loss on soft-score labels,
  ``BCEWithLogits(logits, soft_targets)`` (mean over ``B * A``) ``* A``;
- ``ce`` (GQA's ``--mceLoss``): cross-entropy on the argmax answer of each item (mean) ``* A``, as the original;
  items with no answer in the table are left out (the original would train them towards answer 0).

Training-time metric (LXMERT's, printed as "Valid" by the original): the soft score of the argmax answer,
summed and divided by the number of questions. It equals the official VQA accuracy up to the official
answer normalisation; for GQA (scores 1.0 on the single answer) it is top-1 accuracy. The official metrics
live in :mod:`tasks.metrics`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.losses import argmax_answer_cross_entropy, soft_score_bce
from tasks.config import TrainConfig
from tasks.data.answer_table import load_answer_table
from tasks.data.jsonio import DataFormatError
from tasks.data.model_folder import (
    LABEL2ANS_FILE,
    check_resume_extractor,
    feature_extras,
    loaded_extractor_record,
    read_answers,
)
from tasks.data.regions import RegionFeatures
from tasks.data.stores import keep_found_images, open_features
from tasks.engine.batching import to_device
from tasks.engine.task import StepOutput
from tasks.finetune.qa_data import QADataset, QAItem, collate_qa, label_stats, load_qa_items, model_inputs
from tasks.finetune.qa_model import build_qa_model

logger = logging.getLogger(__name__)

__all__ = ["Prediction", "QATask", "check_annotations", "qa_loss"]


def qa_loss(logits: Tensor, target: Tensor, loss: str) -> Tensor:
    """``finetune.loss`` of ``logits`` ``(B, A)`` against soft ``target`` ``(B, A)`` (see the module doc)."""
    if loss == "bce":
        return soft_score_bce(logits, target)
    if loss == "ce":
        return argmax_answer_cross_entropy(logits, target)
    raise ValueError(f"finetune.loss must be 'bce' or 'ce', got {loss!r}")


def check_annotations(config: TrainConfig) -> None:
    """Fail at the start, not after the first epoch, when ``finetune.annotations`` names no file."""
    path = config.finetune.annotations
    if path and not Path(path).is_file():
        raise DataFormatError(
            f"finetune.annotations: {path} is not a file; give the raw official file of the valid split (VQA "
            "annotations, GQA questions, NLVR2 JSON lines) or leave it empty"
        )


@dataclass
class Prediction:
    """One answered question: the argmax answer, its probability (sigmoid of the logit) and the soft score it
    earns (None without a label)."""

    question_id: int | str
    answer: str
    prob: float
    score: float | None


class QATask:
    """VQA / GQA fine-tuning (see the module doc); :mod:`tasks.finetune.vqa` and :mod:`tasks.finetune.gqa` set the differences:
    the name, the submission format and the official metric."""

    name = "qa"
    question_id_type: type | None = None  # what the official ids are: int (VQA), str (GQA)

    def __init__(self, config: TrainConfig, load: str | None = None) -> None:
        self.config = config
        self._features: RegionFeatures | None = None
        self._answers: list[str] | None = None
        self._items: dict[tuple[str, ...], list[QAItem]] = {}
        self._official_docs: dict[str, Any] = {}  # raw official files, read once
        self.model_folder = load  # where label2ans.json may be found when data.answers is empty (evaluation)
        self.dropped_items: dict[str, int] = {}  # split -> questions left out (image in no store)
        self._load: str | None = None  # the starting model of training, and its extractor.json
        self._loaded_extractors: Any = None

    # -- parts --------------------------------------------------------------------------------------------
    @property
    def answers(self) -> list[str]:
        """The answer table in label order: ``data.answers``, else the ``label2ans.json`` of the loaded model."""
        if self._answers is None:
            if self.config.data.answers:
                self._answers = load_answer_table(self.config.data.answers)
            else:
                beside = read_answers(self.model_folder)
                if beside is None and self.model_folder and not Path(self.model_folder).exists():
                    raise DataFormatError(
                        f"{self.name}: {self.model_folder} is no local folder or file (a typo? a Hub id carries no "
                        "answer table: then set data.answers to the table its head was trained on)"
                    )
                if beside is None:
                    raise DataFormatError(
                        f"{self.name}: no answer table; set data.answers to trainval_label2ans.json (or "
                        f"trainval_ans2label.json), or load a model folder that carries {LABEL2ANS_FILE}"
                    )
                self._answers = beside
            if len(set(self._answers)) != len(self._answers):
                dup = sorted({a for a in self._answers if self._answers.count(a) > 1})[:5]
                raise DataFormatError(f"{self.config.data.answers}: answers listed twice: {dup}")
        return self._answers

    @property
    def ans2label(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.answers)}

    @property
    def features(self) -> RegionFeatures:
        if self._features is None:
            self._features = open_features(
                self.config,
                self.model_folder,
                lambda: [it.img_id for it in self.items(self.config.data.train)],
            )
        return self._features

    def items(self, paths: Sequence[str | Path]) -> list[QAItem]:
        """The questions of ``paths`` (read once per list of paths)."""
        key = tuple(map(str, paths))
        if key not in self._items:
            self._items[key] = load_qa_items(paths, self.question_id_type, self.name)
        return self._items[key]

    def dataset(self, paths: Sequence[str | Path], split: str) -> QADataset:
        """The items of ``paths`` whose images are in the stores (missing images: an error naming them, or
        dropped and counted with ``data.allow_missing_images``); label statistics logged."""
        items = self.items(paths)
        if not items:
            raise DataFormatError(f"{self.name} {split}: no questions in {list(map(str, paths))}")
        items = keep_found_images(
            self.features, self.config, items, lambda it: (it.img_id,), split, paths, self.dropped_items
        )
        ans2label = self.ans2label
        logger.info("%s", label_stats(items, ans2label).summary(f"{self.name} {split}"))
        return QADataset(items, self.features, ans2label, len(self.answers), self.config.data.max_seq_length)

    # -- the trainer's contract ---------------------------------------------------------------------------
    def build_model(self, load: str | None) -> nn.Module:
        self.model_folder = self.model_folder or load
        model = build_qa_model(self.config, self.answers, load)
        self._loaded_extractors = loaded_extractor_record(load, self.features) if load else None
        self._load = load
        return model

    def check_resume(self, checkpoint: Path) -> None:
        """Refuse to continue a run on features of another extractor than its checkpoint records."""
        check_resume_extractor(checkpoint, self.features)

    def train_dataset(self) -> QADataset:
        if not self.config.data.train:
            raise DataFormatError(f"{self.name}: data.train is empty; list the training JSON files")
        return self.dataset(self.config.data.train, "train")

    def valid_dataset(self) -> QADataset | None:
        check_annotations(self.config)
        return self.dataset([self.config.data.valid], "valid") if self.config.data.valid else None

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_qa(items)

    def step(self, model: nn.Module, batch: dict[str, Any], epoch: int) -> StepOutput:
        if self.config.finetune.loss == "bce":  # the model's own loss on soft-score labels
            loss = model(**model_inputs(batch), labels=batch["target"]).loss
        else:
            logits = model(**model_inputs(batch)).question_answering_score
            loss = qa_loss(logits, batch["target"], self.config.finetune.loss)
        return StepOutput(loss=loss, parts={"qa": loss.detach()})

    @torch.no_grad()
    def predict(self, model: nn.Module, loader: Any, device: torch.device) -> tuple[list[Prediction], float]:
        """Argmax answers of every question of ``loader`` (a loader over a :class:`QADataset`, in order) and the
        mean loss over the labelled ones (NaN when none is labelled)."""
        dataset: QADataset = loader.dataset
        answers = self.answers
        out: list[Prediction] = []
        loss_sum, labelled = 0.0, 0
        for batch in loader:
            batch = to_device(batch, device, non_blocking=device.type == "cuda")
            logits = model(**model_inputs(batch)).question_answering_score.float()
            target = batch["target"]
            best = logits.argmax(1)
            prob = torch.sigmoid(logits.gather(1, best[:, None]))[:, 0]
            earned = target.gather(1, best[:, None])[:, 0]
            has_label = torch.tensor(
                [dataset.items[i].label is not None for i in batch["index"].tolist()], device=logits.device
            )
            if has_label.any():
                rows = has_label.nonzero()[:, 0]
                n = int(rows.numel())
                loss_sum += float(qa_loss(logits[rows], target[rows], self.config.finetune.loss)) * n
                labelled += n
            for j, i in enumerate(batch["index"].tolist()):
                item = dataset.items[i]
                out.append(
                    Prediction(
                        item.question_id,
                        answers[int(best[j])],
                        float(prob[j]),
                        float(earned[j]) if item.label is not None else None,
                    )
                )
        return out, (loss_sum / labelled if labelled else float("nan"))

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """``loss``, ``accuracy`` (LXMERT's soft score of the argmax answer / N: see the module doc) = ``score``,
        ``oracle`` (the best reachable: max soft score per question / N), and the official metric under
        ``official_*`` when ``finetune.annotations`` is set."""
        preds, loss = self.predict(model, loader, device)
        scored = [p.score for p in preds if p.score is not None]
        accuracy = sum(scored) / max(len(scored), 1)
        dataset: QADataset = loader.dataset
        oracle = sum(
            max((s for a, s in it.label.items() if a in dataset.ans2label), default=0.0)
            for it in dataset.items
            if it.label is not None
        ) / max(len(scored), 1)
        metrics = {"loss": loss, "loss_qa": loss, "accuracy": accuracy, "score": accuracy, "oracle": oracle}
        if self.config.finetune.annotations:
            official = self.official_metric(preds, self.config.finetune.annotations)
            metrics.update({f"official_{k}": v for k, v in official.items() if isinstance(v, int | float)})
        return metrics

    def checkpoint_extras(self) -> dict[str, Any]:
        extras = feature_extras(self.features, self._loaded_extractors, self._load)
        return {LABEL2ANS_FILE: list(self.answers), **extras}

    # -- predictions (lxmert-train --eval-only) -------------------------------------------------------------
    prediction_file = "predictions.json"
    lxmert_metric = "soft score of the argmax answer / number of questions"

    def submission_text(self, preds: Sequence[Prediction]) -> str:
        """The official result file (:attr:`prediction_file`)."""
        return json.dumps(self.submission(preds), indent=1) + "\n"

    @staticmethod
    def lxmert_scores(preds: Sequence[Prediction]) -> list[float]:
        """LXMERT's per-question score of every labelled prediction (its mean is LXMERT's accuracy)."""
        return [p.score for p in preds if p.score is not None]

    # -- task specifics (vqa / gqa) ------------------------------------------------------------------------
    def submission(self, preds: Sequence[Prediction]) -> list[dict[str, Any]]:
        """The official result file's rows."""
        raise NotImplementedError

    def official_metric(self, preds: Sequence[Prediction], annotations: str) -> dict[str, Any]:
        """The official metric of ``preds`` against the raw annotations file."""
        raise NotImplementedError

    def official_summary(self, official: dict[str, Any]) -> str:
        """One line of the official metric's headline numbers."""
        raise NotImplementedError
