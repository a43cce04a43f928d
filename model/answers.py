"""Answer-head surgery: the pretraining 9500-way QA head -> a task's answer head.

Fine-tuning VQA / GQA starts from the pretrained QA head: for each answer of the task table the row of the
9500-way head is copied when the answer is in the pretraining table; other rows start at zero (as the original
code does), and the hidden layers of the head are copied whole. Answers are matched exactly, so pass the task's
answers normalised the way the pretraining table was built (``tasks.data.answer_table.normalize_answer``): the
original matches ``convert_ans(label2ans[i])`` against the (already normalised) 9500 answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import build_from_state_dict, read_checkpoint, to_hf_state_dict
from .modeling import LxmertForQuestionAnswering


@dataclass
class AnswerHeadTransfer:
    """Outcome of :func:`transfer_answer_head`: ``matched`` of ``total`` target answers found in the source."""

    matched: int
    total: int
    unmatched: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"answer head: {self.matched}/{self.total} answers copied from the pretraining QA head"


def answer_index_map(source_answers: list[str], target_answers: list[str]) -> list[int | None]:
    """For each target answer, the index of the same string in ``source_answers`` (first occurrence), or ``None``."""
    index: dict[str, int] = {}
    for i, ans in enumerate(source_answers):
        index.setdefault(ans, i)
    return [index.get(ans) for ans in target_answers]


@torch.no_grad()
def transfer_answer_head(
    source_head: torch.nn.Module | dict[str, Tensor],
    target_head: torch.nn.Module,
    source_answers: list[str],
    target_answers: list[str],
    zero_unmatched: bool = True,
) -> AnswerHeadTransfer:
    """Fill ``target_head`` (an answer head, ``logit_fc.{0,2,3}``) from the pretraining QA head.

    ``source_answers``: the pretraining table in label order (``all_ans.json``); ``target_answers``: the task's
    answers in label order, normalised like the source (see the module docstring); matched exactly.

    ``source_head``: the pretraining ``answer_head`` module or its state dict (``logit_fc.0.weight`` ...,
    last layer ``(len(source_answers), 2H)``). Layers 0 and 2 are copied; row ``i`` of the last layer
    (weight and bias) is the source row of target answer ``i`` when it exists, zero otherwise
    (``zero_unmatched=False`` keeps the target's initialisation there).
    """
    src = source_head.state_dict() if isinstance(source_head, torch.nn.Module) else dict(source_head)
    src = {k[len("answer_head.") :] if k.startswith("answer_head.") else k: v for k, v in src.items()}
    tgt = target_head.state_dict()
    last_w, last_b = "logit_fc.3.weight", "logit_fc.3.bias"
    if last_w not in src or src[last_w].shape[0] != len(source_answers):
        shape = tuple(src[last_w].shape) if last_w in src else None
        raise ValueError(
            f"source answer head: last layer {last_w} has shape {shape}, expected {len(source_answers)} rows "
            "(one per source answer); pass the pretraining head and its answer table (all_ans.json)"
        )
    if tgt[last_w].shape[0] != len(target_answers):
        raise ValueError(
            f"target answer head has {tgt[last_w].shape[0]} outputs for {len(target_answers)} answers; build the "
            "task model with num_qa_labels=len(answers)"
        )
    for key in tgt:
        if key in (last_w, last_b):
            continue
        if key not in src or src[key].shape != tgt[key].shape:
            raise ValueError(
                f"source answer head: {key} missing or of another shape than the target's {tuple(tgt[key].shape)}"
            )
        tgt[key].copy_(src[key])
    mapping = answer_index_map(source_answers, target_answers)
    weight, bias = tgt[last_w], tgt[last_b]
    unmatched = []
    for row, j in enumerate(mapping):
        if j is None:
            unmatched.append(target_answers[row])
            if zero_unmatched:
                weight[row].zero_()
                bias[row].zero_()
        else:
            weight[row].copy_(src[last_w][j])
            bias[row].copy_(src[last_b][j])
    return AnswerHeadTransfer(
        matched=len(target_answers) - len(unmatched), total=len(target_answers), unmatched=unmatched
    )


def qa_model_from_pretraining(
    path: str | Path,
    target_answers: list[str],
    source_answers: list[str],
    model_class: type | None = None,
    **config_overrides: Any,
) -> tuple[torch.nn.Module, AnswerHeadTransfer]:
    """A QA model for ``target_answers`` from a pretraining checkpoint (any format), head rows transferred.

    Answers as for :func:`transfer_answer_head` (target answers normalised, matched exactly).
    Returns ``(model, report)``; ``model.load_report`` tells how the backbone loaded.
    """
    cls = model_class or LxmertForQuestionAnswering
    raw, file_config, container = read_checkpoint(path)
    state, fmt = to_hf_state_dict(raw, container)
    head_state = {k: v for k, v in state.items() if k.startswith("answer_head.")}
    if not head_state:
        raise ValueError(
            f"{container}: no answer_head.* weights; a pretraining checkpoint with its QA head is needed"
        )
    config_overrides["num_qa_labels"] = len(target_answers)
    model = build_from_state_dict(cls, state, fmt, container, file_config, **config_overrides)
    report = transfer_answer_head(head_state, model.answer_head, source_answers, target_answers)
    return model, report
