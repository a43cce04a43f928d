"""NLVR2 fine-tuning: is the sentence true of the image pair? (LXMERT's recipe on the feature stores.)

Data: LXMERT's ``{"identifier", "img0", "img1", "label": 0|1, "sent", "uid"}`` files (``lxmert-data nlvr2``
writes them from the official JSON lines); ``label`` is optional (hidden test). Each image is encoded with the
sentence (text ``[CLS] pieces[:max_seq_length - 2] [SEP]``); the two pooled outputs, concatenated, go through
the pair head (:class:`model.LxmertForNLVR2`), trained with 2-way cross-entropy. The original recipe
(``tasks/configs/nlvr2.yaml``): batch 32, lr 5e-5, 4 epochs, BERT-Adam with 10% warmup, clip 5; the pair head
starts from BERT's initialisation (N(0, 0.02)), whatever head the loaded checkpoint has.

Training-time metric: accuracy (LXMERT's, = the official accuracy). With ``finetune.annotations`` (the official
JSON-lines file of the valid split, or the converted file itself) the official accuracy and consistency too.

Official result file: CSV lines ``identifier,True|False`` (the original's ``<split>_predict.csv``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model import LxmertForNLVR2
from model.bert_init import is_bert_checkpoint
from model.losses import masked_mean_cross_entropy
from tasks.config import TrainConfig
from tasks.data.jsonio import DataFormatError, read_json_list, read_text
from tasks.data.model_folder import (
    check_resume_extractor,
    feature_extras,
    loaded_extractor_record,
    reading_model,
)
from tasks.data.regions import RegionFeatures, collate_regions
from tasks.data.stores import keep_found_images, open_features
from tasks.data.text import TextItemsDataset
from tasks.engine.batching import to_device
from tasks.engine.task import StepOutput
from tasks.finetune.qa import check_annotations
from tasks.finetune.qa_data import model_inputs
from tasks.finetune.qa_model import scratch_config
from tasks.metrics.nlvr2 import evaluate_nlvr2, parse_examples

logger = logging.getLogger(__name__)

NLVR2_FORMAT = 'LXMERT\'s NLVR2 list [{"identifier", "img0", "img1", "sent", "label": 0|1, "uid"}, ...]'


@dataclass
class PairItem:
    """One sentence about an image pair; ``label`` 1 = true, 0 = false, None = unknown (hidden test)."""

    identifier: str
    img0: str
    img1: str
    sent: str
    label: int | None
    uid: str


def load_pair_items(paths: Sequence[str | Path]) -> list[PairItem]:
    """The examples of one or more LXMERT NLVR2 JSON files, in file order.

    Raises :class:`tasks.finetune.qa.DataFormatError` naming the file, the entry and the identifier for a malformed entry,
    and both places for an identifier (or uid) given twice.
    """
    items: list[PairItem] = []
    seen: dict[str, str] = {}
    for path in paths:
        for i, entry in enumerate(read_json_list(path, NLVR2_FORMAT)):
            where = f"{path}: entry {i}"
            if not isinstance(entry, dict):
                raise DataFormatError(
                    f"{where} is a {type(entry).__name__}, expected an object ({NLVR2_FORMAT})"
                )
            missing = [k for k in ("identifier", "img0", "img1", "sent") if k not in entry]
            if missing:
                raise DataFormatError(
                    f"{where} (keys {sorted(entry)}) lacks {missing}; expected {NLVR2_FORMAT}"
                )
            ident = entry["identifier"]
            where = f"{where} (identifier {ident!r})"
            if not all(isinstance(entry[k], str) for k in ("identifier", "img0", "img1", "sent")):
                raise DataFormatError(f"{where}: identifier, img0, img1 and sent must be strings")
            if not entry["sent"].strip():
                raise DataFormatError(
                    f"{where}: the sentence (sent) is empty; give its text or drop the entry"
                )
            if not entry["img0"] or not entry["img1"]:
                raise DataFormatError(f"{where}: img0 and img1 must name images (one is empty)")
            if not ident:
                raise DataFormatError(f"{where}: the identifier is empty")
            label = entry.get("label")
            if label is not None and (label not in (0, 1) or isinstance(label, bool)):
                raise DataFormatError(
                    f"{where}: label must be 0 or 1 (1 = the sentence is true), got {label!r}"
                )
            uid = str(entry.get("uid", ident))
            for key in {ident, uid}:
                if key in seen:
                    raise DataFormatError(
                        f"{where}: {key!r} is given twice (first at {seen[key]}); identifiers must be unique: "
                        "remove the duplicate or do not list a split twice"
                    )
                seen[key] = f"{path}: entry {i}"
            items.append(PairItem(ident, entry["img0"], entry["img1"], entry["sent"], label, uid))
    return items


class PairDataset(TextItemsDataset):
    """NLVR2 examples over the feature stores. Item ``i``: text ``(L,)`` tensors, ``regions`` (the two images'
    :class:`tasks.data.regions.Regions`), ``label`` (int, -100 when unknown), ``index``. Deterministic."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        out = self.encode(index)
        out.update(
            regions=(self.features[item.img0], self.features[item.img1]),
            label=-100 if item.label is None else item.label,
            index=index,
        )
        return out


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch: ``visual_feats`` ``(B, 2, V, D)``, ``visual_pos`` ``(B, 2, V, 4)``, ``visual_attention_mask``
    ``(B, 2, V)`` (only with uneven region counts), text ``(B, L)``, ``labels`` ``(B,)`` (-100 = unknown),
    ``index`` ``(B,)``."""
    b = len(items)
    regions = collate_regions([r for it in items for r in it["regions"]])  # (2B, V, ...), img0 then img1
    batch: dict[str, Any] = {k: v.reshape(b, 2, *v.shape[1:]) for k, v in regions.items()}
    batch.update(
        input_ids=torch.stack([it["input_ids"] for it in items]),
        attention_mask=torch.stack([it["attention_mask"] for it in items]),
        token_type_ids=torch.stack([it["token_type_ids"] for it in items]),
        labels=torch.tensor([it["label"] for it in items], dtype=torch.long),
        index=torch.tensor([it["index"] for it in items], dtype=torch.long),
    )
    return batch


def build_nlvr2_model(config: TrainConfig, load: str | None) -> nn.Module:
    """:class:`model.LxmertForNLVR2` from ``load`` (any checkpoint ``from_pretrained`` reads) or from scratch.

    ``from_pretrained`` loads a head whole or not at all: a fine-tuned NLVR2 model loads with its pair head;
    any other checkpoint (pretraining's MLM / matching / object / 9500-answer QA heads) gives the encoder only,
    and the pair head starts from BERT's initialisation, as the original (which loads the encoder only). A BERT
    checkpoint gives ``config.model``'s network its embeddings, language layers and pooler.
    """
    if not load:
        logger.info("NLVR2 model from scratch: no --load given")
        return LxmertForNLVR2(scratch_config(config))
    with reading_model(load):
        if is_bert_checkpoint(load):  # the language side from BERT: config.model's network
            return LxmertForNLVR2.from_pretrained(load, config=scratch_config(config))
        model = LxmertForNLVR2.from_pretrained(load)
    report = model.load_report
    if any(k.startswith("answer_head.") for k in report.missing + report.defaulted):
        logger.info(
            "%s: encoder loaded; the pair head starts from N(0, 0.02) (the checkpoint has none)", load
        )
    else:
        logger.info("%s: loaded with its NLVR2 pair head", load)
    return model


@dataclass
class PairPrediction:
    identifier: str
    prediction: bool
    prob: float  # softmax probability of "True"
    correct: bool | None


class NLVR2Task:
    """NLVR2 fine-tuning (see the module doc)."""

    name = "nlvr2"

    def __init__(self, config: TrainConfig, model_folder: str | None = None) -> None:
        self.config = config
        self.model_folder = model_folder
        self._load: str | None = None  # the starting model of training, and its extractor.json
        self._loaded_extractors: Any = None
        self._features: RegionFeatures | None = None
        self._items: dict[tuple[str, ...], list[PairItem]] = {}
        self.dropped_items: dict[str, int] = {}  # split -> examples left out (an image in no store)

    def items(self, paths: Sequence[str | Path]) -> list[PairItem]:
        key = tuple(map(str, paths))
        if key not in self._items:
            self._items[key] = load_pair_items(paths)
        return self._items[key]

    @property
    def features(self) -> RegionFeatures:
        if self._features is None:

            def train_ids() -> list[str]:
                return [i for it in self.items(self.config.data.train) for i in (it.img0, it.img1)]

            self._features = open_features(self.config, self.model_folder, train_ids)
        return self._features

    def dataset(self, paths: Sequence[str | Path], split: str) -> PairDataset:
        items = self.items(paths)
        if not items:
            raise DataFormatError(f"nlvr2 {split}: no examples in {list(map(str, paths))}")
        items = keep_found_images(
            self.features, self.config, items, lambda it: (it.img0, it.img1), split, paths, self.dropped_items
        )
        labelled = sum(it.label is not None for it in items)
        logger.info(
            "nlvr2 %s: %d examples, %d labelled (%d true)",
            split,
            len(items),
            labelled,
            sum(it.label == 1 for it in items),
        )
        return PairDataset(items, self.features, self.config.data.max_seq_length)

    # -- the trainer's contract ---------------------------------------------------------------------------
    def build_model(self, load: str | None) -> nn.Module:
        self.model_folder = self.model_folder or load
        model = build_nlvr2_model(self.config, load)
        self._loaded_extractors = loaded_extractor_record(load, self.features) if load else None
        self._load = load
        return model

    def check_resume(self, checkpoint: Path) -> None:
        """Refuse to continue a run on features of another extractor than its checkpoint records."""
        check_resume_extractor(checkpoint, self.features)

    def train_dataset(self) -> PairDataset:
        if not self.config.data.train:
            raise DataFormatError("nlvr2: data.train is empty; list the training JSON files")
        ds = self.dataset(self.config.data.train, "train")
        unlabelled = [it.identifier for it in ds.items if it.label is None]
        if unlabelled:
            raise DataFormatError(
                f"nlvr2 train ({', '.join(self.config.data.train)}): {len(unlabelled)} examples have no label "
                f"(e.g. {unlabelled[:3]}); training needs labelled splits (train, dev)"
            )
        return ds

    def valid_dataset(self) -> PairDataset | None:
        check_annotations(self.config)
        return self.dataset([self.config.data.valid], "valid") if self.config.data.valid else None

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_pairs(items)

    def step(self, model: nn.Module, batch: dict[str, Any], epoch: int) -> StepOutput:
        loss = model(**model_inputs(batch), labels=batch["labels"]).loss
        return StepOutput(loss=loss, parts={"nlvr2": loss.detach()})

    @torch.no_grad()
    def predict(
        self, model: nn.Module, loader: Any, device: torch.device
    ) -> tuple[list[PairPrediction], float]:
        """Predictions for every example of ``loader`` (in order) and the mean loss over the labelled ones."""
        dataset: PairDataset = loader.dataset
        out: list[PairPrediction] = []
        loss_sum, labelled = 0.0, 0
        for batch in loader:
            batch = to_device(batch, device, non_blocking=device.type == "cuda")
            logits = model(**model_inputs(batch)).logits.float()
            labels = batch["labels"]
            n = int((labels != -100).sum())
            if n:
                loss_sum += float(masked_mean_cross_entropy(logits, labels)) * n
                labelled += n
            prob_true = torch.softmax(logits, -1)[:, 1]
            for j, i in enumerate(batch["index"].tolist()):
                item = dataset.items[i]
                pred = bool(logits[j].argmax() == 1)
                out.append(
                    PairPrediction(
                        item.identifier,
                        pred,
                        float(prob_true[j]),
                        None if item.label is None else pred == bool(item.label),
                    )
                )
        return out, (loss_sum / labelled if labelled else float("nan"))

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """``loss``, ``accuracy`` (= ``score``) over the labelled examples; with ``finetune.annotations`` the
        official accuracy and consistency (``official_accuracy``, ``official_consistency``)."""
        preds, loss = self.predict(model, loader, device)
        scored = [p.correct for p in preds if p.correct is not None]
        accuracy = sum(scored) / max(len(scored), 1)
        metrics = {"loss": loss, "loss_nlvr2": loss, "accuracy": accuracy, "score": accuracy}
        if self.config.finetune.annotations:
            official = self.official_metric(preds, self.config.finetune.annotations)
            metrics.update({f"official_{k}": official[k] for k in ("accuracy", "consistency")})
        return metrics

    def checkpoint_extras(self) -> dict[str, Any]:
        return feature_extras(self.features, self._loaded_extractors, self._load)

    # -- predictions (lxmert-train --eval-only) -------------------------------------------------------------
    prediction_file = "predictions.csv"
    lxmert_metric = "accuracy"

    @staticmethod
    def submission_text(preds: Sequence[PairPrediction]) -> str:
        """The official result file: ``identifier,True|False`` per line."""
        return "".join(f"{p.identifier},{p.prediction}\n" for p in preds)

    @staticmethod
    def lxmert_scores(preds: Sequence[PairPrediction]) -> list[float]:
        """1.0 / 0.0 per labelled prediction (its mean is the accuracy)."""
        return [float(p.correct) for p in preds if p.correct is not None]

    @staticmethod
    def official_summary(official: dict[str, Any]) -> str:
        return (
            f"official NLVR2 accuracy: {100 * official['accuracy']:.2f}%  "
            f"consistency {100 * official['consistency']:.2f}%"
        )

    def official_metric(self, preds: Sequence[PairPrediction], annotations: str) -> dict[str, Any]:
        """Official accuracy / consistency over the examples of ``annotations`` (the official JSON lines, e.g.
        ``dev.json``, or LXMERT's converted list) that were predicted."""
        path = Path(annotations)
        text = read_text(path, "the NLVR2 annotations")
        predicted = {p.identifier: str(p.prediction) for p in preds}
        examples = [ex for ex in parse_examples(text, str(path)) if ex["identifier"] in predicted]
        return evaluate_nlvr2(
            examples, predicted, data_source=str(path), predictions_source="nlvr2 predictions"
        )


def build(config: TrainConfig, load: str | Path | None = None) -> NLVR2Task:
    """The NLVR2 task of ``config``; ``load``: the starting model folder, whose ``label2ans.json`` / ``features.json``
    stand in for ``data.answers`` / ``data.features`` when those are empty."""
    return NLVR2Task(config, None if load is None else str(load))
