"""Sentences for the fine-tuning tasks: LXMERT's text encoding and the items-with-a-sentence dataset base."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from model import LxmertTokenizer
from tasks.data.regions import RegionFeatures

__all__ = ["TextItemsDataset", "encode_text"]


def encode_text(tokenizer: LxmertTokenizer, sent: str, max_seq_length: int) -> dict[str, Tensor]:
    """``[CLS] pieces[:max_seq_length - 2] [SEP]`` padded to ``max_seq_length`` (the original):
    ``input_ids``, ``attention_mask``, ``token_type_ids``, each ``(L,)`` int64."""
    enc = tokenizer(sent, max_length=max_seq_length, return_tensors=None)
    return {k: torch.tensor(v[0], dtype=torch.long) for k, v in enc.items()}


class TextItemsDataset(torch.utils.data.Dataset):
    """Items with a sentence over the feature stores (the fine-tuning datasets' shared part): ``items``
    (each with ``sent``), the stores, the tokenizer. Deterministic (no random draws): :meth:`set_epoch` is a
    no-op kept for the engine's contract."""

    def __init__(self, items: list[Any], features: RegionFeatures, max_seq_length: int) -> None:
        self.items = items
        self.features = features
        self.max_seq_length = max_seq_length
        self.tokenizer = LxmertTokenizer(max_length=max_seq_length)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        pass

    def encode(self, index: int) -> dict[str, Any]:
        """Item ``index``'s text: ``input_ids`` / ``attention_mask`` / ``token_type_ids`` ``(L,)``."""
        return encode_text(self.tokenizer, self.items[index].sent, self.max_seq_length)
