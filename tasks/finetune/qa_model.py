"""The VQA / GQA model: from scratch, from a fine-tuned model folder, or from a pretraining checkpoint whose QA head
is carried over answer by answer."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from torch import nn

from model import LxmertConfig, LxmertForQuestionAnswering, read_checkpoint
from model.answers import qa_model_from_pretraining
from model.bert_init import is_bert_checkpoint
from tasks.config import TrainConfig
from tasks.data.answer_table import load_answer_table, normalize_answer
from tasks.data.jsonio import DataFormatError
from tasks.data.model_folder import LABEL2ANS_FILE, read_answers, reading_model

logger = logging.getLogger(__name__)

__all__ = ["build_qa_model", "head_rows", "scratch_config"]


def head_rows(load: str) -> int | None:
    """Outputs of the checkpoint's answer head (``answer_head.logit_fc.3``), None without one."""
    raw, _, container = read_checkpoint(load)
    for key, value in raw.items():
        if key.endswith("logit_fc.3.bias"):
            return int(value.shape[0])
    return None


def scratch_config(config: TrainConfig, **fields: Any) -> LxmertConfig:
    """The network's config from ``config.model`` (sizes for a run without ``--load``) plus ``fields``."""
    return LxmertConfig(**dataclasses.asdict(config.model), **fields)


def build_qa_model(config: TrainConfig, answers: list[str], load: str | None) -> nn.Module:
    """The QA model for ``answers`` (label order), from ``load`` or from scratch.

    - ``load`` already has a head over these very answers (our fine-tuned model folder, whose
      ``label2ans.json`` equals them): loaded as is (evaluation, or fine-tuning further).
    - ``load`` has another QA head (pretraining's 9500 answers): the head is built from it, answer by answer
      (:func:`model.answers.qa_model_from_pretraining`: rows of answers found in the pretraining table are
      copied, the others start at zero, as the original). The pretraining table is ``finetune.pretrain_answers``
      (LXMERT's ``all_ans.json``) or the ``label2ans.json`` beside the checkpoint.
    - ``load`` with a head of the task's size but no table naming its answers (``unc-nlp/lxmert-vqa-uncased``):
      loaded as is, with a warning that the answer order is assumed.
    - ``load`` without a QA head: backbone loaded, head initialised (logged).
    - ``load`` is BERT (``bert-base-uncased``): ``config.model``'s network, its embeddings, language layers
      and pooler from BERT, the rest (and the head) initialised, as the original without LXMERT weights.
    - no ``load``: the whole network from scratch with ``config.model``'s sizes.
    """
    num = len(answers)
    if not load:
        logger.info("QA model from scratch (%d answers): no --load given", num)
        return LxmertForQuestionAnswering(scratch_config(config, num_qa_labels=num))
    with reading_model(load):
        return _load_qa_model(config, answers, load)


def _load_qa_model(config: TrainConfig, answers: list[str], load: str) -> LxmertForQuestionAnswering:
    num = len(answers)
    if is_bert_checkpoint(load):
        model = LxmertForQuestionAnswering.from_pretrained(
            load, config=scratch_config(config, num_qa_labels=num)
        )
        logger.info("QA model from BERT (%s): the %d-answer head starts from N(0, 0.02)", load, num)
        return model
    beside = read_answers(load)
    if beside == answers:
        model = LxmertForQuestionAnswering.from_pretrained(load, num_qa_labels=num)
        logger.info("%s: loaded with its own %d-answer head (same answer table)", load, num)
        return model
    rows = head_rows(load)
    if rows is None:
        model = LxmertForQuestionAnswering.from_pretrained(load, num_qa_labels=num)
        logger.warning(
            "%s has no QA head: the %d-answer head starts from its random initialisation", load, num
        )
        return model
    tables = []
    if config.finetune.pretrain_answers:
        tables.append((config.finetune.pretrain_answers, load_answer_table(config.finetune.pretrain_answers)))
    if beside is not None:
        tables.append((str(Path(load) / LABEL2ANS_FILE), beside))
    source = next((table for _, table in tables if len(table) == rows), None)
    if source is None and rows == num:
        # e.g. unc-nlp/lxmert-vqa-uncased: a fine-tuned head of the task's size that carries no answer table
        model = LxmertForQuestionAnswering.from_pretrained(load, num_qa_labels=num)
        logger.warning(
            "%s: its %d-answer head is taken as is, assuming it was trained on this answer table in this order "
            "(the checkpoint names no answers)",
            load,
            num,
        )
        return model
    if source is None:
        given = ", ".join(f"{path} ({len(table)} answers)" for path, table in tables) or "none"
        raise DataFormatError(
            f"{load}: its QA head has {rows} answers, and no answer table of that size names them (given: {given}); "
            "set finetune.pretrain_answers to the table of that head (LXMERT's all_ans.json for the 9500-answer "
            "pretraining head) so the answer rows can be copied"
        )
    model, report = qa_model_from_pretraining(load, [normalize_answer(a) for a in answers], source)
    logger.info("%s (%d of %d answers start at zero)", report.summary(), report.total - report.matched, num)
    model.head_transfer = report
    return model
