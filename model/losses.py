"""LXMERT's losses, one definition each: the model heads compute them from their labels, and the tasks
(validation losses over the labelled items of a batch) call the same functions.

All take logits in any float dtype and compute in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["IGNORE_INDEX", "argmax_answer_cross_entropy", "masked_mean_cross_entropy", "soft_score_bce"]

IGNORE_INDEX = -100


def masked_mean_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` ``(N, C)`` over the targets ``(N,)`` that are not -100; 0 (still in the
    graph) when every target is -100, where ``F.cross_entropy`` gives NaN."""
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp(min=1)


def soft_score_bce(logits: Tensor, target: Tensor) -> Tensor:
    """LXMERT's VQA / GQA loss: BCE-with-logits of ``logits`` ``(B, A)`` against soft scores ``(B, A)``, mean over
    ``B * A`` elements, times ``A`` (the number of answers)."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float()) * logits.shape[1]


def argmax_answer_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """The original's ``--mceLoss`` (GQA): cross-entropy on each item's best-scored answer of the soft ``target``
    ``(B, A)``, mean, times ``A``. Items with no answer in the table (all-zero target) are left out (the
    original would train them towards answer 0)."""
    best, labels = target.max(1)
    labels = torch.where(best > 0, labels, torch.full_like(labels, IGNORE_INDEX))
    return masked_mean_cross_entropy(logits, labels) * logits.shape[1]
