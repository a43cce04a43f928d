"""The LXMERT pretraining task (``lxmert-train pretrain``): data, model, the four objectives, validation.

Objectives (each switchable in ``pretrain``; the original's semantics, airsplay/lxmert):

- ``mlm``: cross-entropy over the vocabulary at the masked word pieces, mean over the batch's masked pieces;
- ``matched``: 2-way cross-entropy on the pooled output (1 = the sentence belongs to the image), mean over items;
- ``obj`` / ``attr`` (``pretrain.visual_losses``): cross-entropy against the detector's object / attribute id
  of every region, weighted by the detector's confidence, mean over ALL regions of the batch (as the original;
  ``visual_losses_masked_only: true`` weights only the masked regions); ``feat``: SmoothL1 (mean over the
  feature dimension) against the unmasked feature at the masked regions, summed and divided by all regions;
  each visual loss x 1 / 0.15 (the original's constant);
- ``qa``: cross-entropy over the answer table (9500 answers) for matched items with a label, mean over them;
  weighted by ``pretrain.qa_weight`` from epoch ``pretrain.qa_start_epoch`` on (0 before). The released code:
  weight 1 from epoch 0; the paper: no QA for 10 epochs, then weight 2.

The model computes every loss from the labels this task gives it (:class:`model.LxmertForPreTraining`; its
efficient path computes vocabulary logits only at the masked tokens); the total back-propagated is their sum
with QA times its weight (:func:`weighted_total`).

Validation draws the same masks and negatives every time (fixed seed), so its losses compare across epochs and
runs; its ``loss`` is the unweighted sum of the parts (QA weight 1 whatever the epoch); ``qa_accuracy`` is the
mean soft score of the argmax answer over MATCHED items with a label (the original also scored the swapped
sentences against the original question's label, which understates it).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from common.config import check_ranges
from model import LxmertConfig, LxmertForPreTraining, LxmertTokenizer
from model.bert_init import is_bert_checkpoint
from tasks.config import TrainConfig
from tasks.data.answer_table import load_answer_table
from tasks.data.model_folder import (
    check_resume_extractor,
    feature_extras,
    loaded_extractor_record,
    reading_model,
)
from tasks.data.regions import RegionFeatures
from tasks.engine.task import StepOutput
from tasks.pretrain.corpus import PretrainCorpus, PretrainDataError, build_corpus
from tasks.pretrain.data import MaskingOptions, PretrainDataset, collate_pretrain

log = logging.getLogger(__name__)

VISUAL_LOSS_WEIGHT = 1 / 0.15  # the original's factor on each visual loss (independent of the mask rate)
VISUAL_LOSSES = ("obj", "attr", "feat")
STATS_IMAGES = 2000  # train images sampled for the standardisation statistics


def weighted_total(parts: dict[str, Tensor], qa_weight: float) -> Tensor:
    """The loss back-propagated: the sum of the model's task losses ``parts``, QA times ``qa_weight``."""
    total = torch.zeros((), device=next(iter(parts.values())).device)
    for name, value in parts.items():
        total = total + (value * qa_weight if name == "qa" else value)
    return total


class PretrainTask:
    """LXMERT pretraining on LXMERT's JSON files and one or more feature stores (see the module docstring)."""

    name = "pretrain"

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        data, pre = config.data, config.pretrain
        unknown = sorted(set(pre.visual_losses) - set(VISUAL_LOSSES))
        if unknown:
            raise ValueError(f"pretrain.visual_losses: unknown {unknown}; choose among {list(VISUAL_LOSSES)}")
        check_ranges(
            config
        )  # the mask rates, max_seq_length, ...: tasks.config's RANGES (also for configs built by hand)
        self.enabled = {"mlm": pre.mlm, "matched": pre.matched, "qa": pre.qa}
        self.enabled.update({k: k in pre.visual_losses for k in VISUAL_LOSSES})
        if not any(self.enabled.values()):
            raise ValueError("every pretraining objective is off: enable at least one in pretrain.*")
        if not data.answers and pre.qa:
            raise ValueError(
                "data.answers is empty: give the answer table (all_ans.json) or set pretrain.qa: false"
            )
        self.answers = load_answer_table(data.answers, data.qa_sets or None) if data.answers else []
        if pre.qa and not self.answers:
            raise ValueError(f"{data.answers}: no answer left for data.qa_sets={data.qa_sets}")
        self.tokenizer = LxmertTokenizer(max_length=data.max_seq_length)
        self.features = RegionFeatures(data.features, zero_visual=data.zero_visual)
        self._load: str | None = None  # the starting model, and its extractor.json (the history kept)
        self._loaded_extractors: Any = None
        self.options = MaskingOptions.from_config(config)
        self.dropped_items: dict[
            str, int
        ] = {}  # data.train / data.valid -> sentences left out (image in no store)
        self.train_corpus = self._corpus(data.train, "data.train")
        self.valid_corpus = self._corpus([data.valid], "data.valid") if data.valid else None
        if data.standardize_features or data.whiten_features:
            self.features.stats = self.features.compute_stats(
                self.train_corpus.img_ids, STATS_IMAGES, whiten=data.whiten_features
            )
        random_stores = self.features.random_weight_stores
        label_losses = [k for k in ("obj", "attr") if self.enabled[k]]
        if random_stores and label_losses:
            log.warning(
                "pretrain.visual_losses has %s but the feature store(s) %s come from a detector with RANDOM weights: "
                "their object / attribute labels carry no information, so these losses teach nothing (fine for a "
                "demo; for real pretraining extract with the trained weights, or drop %s from pretrain.visual_losses)",
                label_losses,
                random_stores,
                label_losses,
            )
        self._train_set: PretrainDataset | None = None
        self._valid_set: PretrainDataset | None = None

    def _corpus(self, paths: list[str], key: str) -> PretrainCorpus:
        corpus = build_corpus(paths, self.answers, limit=self.config.data.limit)
        missing = self.features.check(
            corpus.img_ids,
            allow_missing=self.config.data.allow_missing_images,
            what="sentences",
            source=", ".join(paths),
            counts=corpus.items_per_image(),
        )
        if missing:
            kept = corpus.without_images(missing)
            self.dropped_items[key] = len(corpus) - len(kept)
            corpus = kept
        if len(corpus) == 0:
            raise PretrainDataError(f"{key}: no sentence left whose image is in the feature stores")
        labelled = int((np.diff(corpus.label_start) > 0).sum())
        log.info(
            "%s: %d sentences of %d images (%d with a QA label in the %d-answer table) from %s",
            key,
            len(corpus),
            corpus.num_images,
            labelled,
            len(self.answers),
            ", ".join(paths),
        )
        return corpus

    # -- the model ------------------------------------------------------------------------------------
    def model_config(self) -> LxmertConfig:
        """The network for training from scratch (``config.model``, the enabled heads, the data's sizes)."""
        # ModelConfig's fields are LxmertConfig fields of the same names (and defaults)
        return LxmertConfig(
            **dataclasses.asdict(self.config.model),
            vocab_size=self.tokenizer.vocab_size,
            **self._head_fields(),
        )

    def _head_fields(self) -> dict[str, Any]:
        e = self.enabled
        return {
            "num_qa_labels": max(1, len(self.answers)),
            "task_mask_lm": e["mlm"],
            "task_matched": e["matched"],
            "task_qa": e["qa"],
            "task_obj_predict": e["obj"] or e["attr"] or e["feat"],
            "visual_obj_loss": e["obj"],
            "visual_attr_loss": e["attr"],
            "visual_feat_loss": e["feat"],
            "visual_loss_normalizer": VISUAL_LOSS_WEIGHT,
        }

    def build_model(self, load: str | None) -> nn.Module:
        """From scratch (``config.model``) or from ``load`` (any checkpoint ``model.from_pretrained`` reads; the
        heads follow the enabled objectives and the answer table). A BERT checkpoint (``bert-base-uncased``)
        gives ``config.model``'s network its embeddings, language layers, pooler, MLM and matching heads, as
        the original without ``--fromScratch``."""
        if load and is_bert_checkpoint(load):
            with reading_model(load):
                model = LxmertForPreTraining.from_pretrained(load, config=self.model_config())
            log.info("pretraining from BERT (%s): %s", load, _describe(model.config))
        elif load:
            with reading_model(load):
                model = LxmertForPreTraining.from_pretrained(load, **self._head_fields())
            log.info("pretraining from %s", load)
        else:
            model = LxmertForPreTraining(self.model_config())
            log.info("pretraining from scratch: %s", _describe(model.config))
        self._loaded_extractors = loaded_extractor_record(load, self.features) if load else None
        self._load = load
        dim = self.features.feature_dim
        if dim is not None and model.config.visual_feat_dim != dim:
            raise ValueError(
                f"the model expects {model.config.visual_feat_dim}-d region features but the stores "
                f"{[str(p) for p in self.features.paths]} hold {dim}-d ones; set model.visual_feat_dim: {dim} "
                "(from scratch) or use stores from the model's extractor"
            )
        return model

    # -- data ------------------------------------------------------------------------------------------
    def train_dataset(self) -> PretrainDataset:
        if self._train_set is None:
            self._train_set = PretrainDataset(
                self.train_corpus, self.features, self.tokenizer, self.options, self.config.train.seed
            )
        return self._train_set

    def valid_dataset(self) -> PretrainDataset | None:
        if self.valid_corpus is None:
            return None
        if self._valid_set is None:
            self._valid_set = PretrainDataset(
                self.valid_corpus,
                self.features,
                self.tokenizer,
                self.options,
                self.config.train.seed,
                fixed=True,
            )
        return self._valid_set

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_pretrain(items)

    # -- forward and losses ----------------------------------------------------------------------------
    def qa_weight(self, epoch: int) -> float:
        """The QA loss weight at ``epoch`` (0-based): 0 before ``pretrain.qa_start_epoch``, then ``qa_weight``."""
        pre = self.config.pretrain
        return pre.qa_weight if epoch >= pre.qa_start_epoch else 0.0

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        """The model's forward on a batch: MLM labels (for the efficient path) and the visual (labels, weights)."""
        obj_labels = None
        if self.enabled["obj"] or self.enabled["attr"] or self.enabled["feat"]:
            feat_mask = batch["feat_mask"]
            masked_only = self.config.pretrain.visual_losses_masked_only
            obj_labels = {}
            if self.enabled["obj"]:
                conf = batch["obj_conf"] * feat_mask if masked_only else batch["obj_conf"]
                obj_labels["obj"] = (batch["obj_ids"], conf)
            if self.enabled["attr"]:
                conf = batch["attr_conf"] * feat_mask if masked_only else batch["attr_conf"]
                obj_labels["attr"] = (batch["attr_ids"], conf)
            if self.enabled["feat"]:
                obj_labels["feat"] = (batch["feat_target"], feat_mask)
        return model(
            input_ids=batch["input_ids"],
            visual_feats=batch["visual_feats"],
            visual_pos=batch["visual_pos"],
            attention_mask=batch["attention_mask"],
            visual_attention_mask=batch.get("visual_attention_mask"),
            token_type_ids=batch["token_type_ids"],
            labels=batch["mlm_labels"] if self.enabled["mlm"] else None,
            obj_labels=obj_labels,
            matched_label=batch["matched_label"] if self.enabled["matched"] else None,
            ans=batch["qa_target"] if self.enabled["qa"] else None,
            mlm_logits_at_labels_only=True,  # MLM logits at the masked tokens only: the same losses, less work
        )

    def step(self, model: nn.Module, batch: dict[str, Any], epoch: int) -> StepOutput:
        parts = self.forward(model, batch).losses
        loss = weighted_total(parts, self.qa_weight(epoch))
        return StepOutput(loss=loss, parts={k: v.detach() for k, v in parts.items()})

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """Valid losses (item-weighted means of the batch losses; ``loss`` = unweighted sum of the parts) and
        ``qa_accuracy`` over matched items with a label; ``score`` = -loss (the lower the valid loss, the better)."""
        sums: dict[str, float] = {}
        items = 0
        qa_score, qa_count = 0.0, 0
        for batch in loader:
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            out = self.forward(model, batch)
            parts = out.losses
            size = len(batch["uid"])
            items += size
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + float(value) * size
            if self.enabled["qa"]:
                pred = out.question_answering_score.argmax(-1, keepdim=True)
                hit = (batch["qa_answers"] == pred) & (batch["qa_answers"] >= 0)
                has_label = batch["qa_answers"][:, 0] >= 0
                qa_score += float((batch["qa_scores"] * hit).sum())
                qa_count += int(has_label.sum())
        metrics = {f"loss_{name}": total / max(items, 1) for name, total in sums.items()}
        metrics["loss"] = sum(metrics.values())
        if self.enabled["qa"]:
            metrics["qa_accuracy"] = qa_score / qa_count if qa_count else 0.0
            metrics["qa_count"] = float(qa_count)
        metrics["score"] = -metrics["loss"]
        return metrics

    def checkpoint_extras(self) -> dict[str, Any]:
        """Beside every model: the QA head's answers (``label2ans.json``), the stores' extractor settings
        (``extractor.json``) and the features it expects (``features.json``: stores, size, standardisation)."""
        return {
            "label2ans.json": list(self.answers),
            **feature_extras(self.features, self._loaded_extractors, self._load),
        }

    def check_resume(self, checkpoint: Path) -> None:
        """Refuse to continue a run on features of another extractor than its checkpoint records."""
        check_resume_extractor(checkpoint, self.features)


def _describe(config: LxmertConfig) -> str:
    return (
        f"hidden {config.hidden_size}, layers {config.l_layers}/{config.r_layers}/{config.x_layers}, "
        f"{config.num_qa_labels} answers, {config.visual_feat_dim}-d features"
    )


def build(config: TrainConfig, load: str | None = None) -> PretrainTask:
    """The pretraining task for ``config`` (reads the JSON files and opens the stores; ``load``, the starting
    checkpoint, is read by :meth:`PretrainTask.build_model`)."""
    return PretrainTask(config)


__all__ = ["PretrainTask", "build", "weighted_total"]
