"""A tiny BERT saved like Hugging Face's (``save_pretrained``), for the ``--load <BERT>`` tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

#: ``lxmert.*`` keys that come from BERT (under ``bert.*``) in every LXMERT model, beside ``cls.*`` in pretraining.
LANGUAGE_PREFIXES = ("lxmert.embeddings.", "lxmert.encoder.layer.", "lxmert.pooler.")


def save_tiny_bert(folder: Path, layers: int = 2, **sizes) -> dict[str, torch.Tensor]:
    """A ``BertForPreTraining`` (BERT's 30522-word vocabulary) with random weights, LayerNorms and biases
    moved off 1 / 0 so that a copy shows; saved to ``folder``; returns its state dict."""
    torch.manual_seed(11)
    config = transformers.BertConfig(num_hidden_layers=layers, vocab_size=30522, **sizes)
    bert = transformers.BertForPreTraining(config)
    with torch.no_grad():
        for name, p in bert.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    bert.save_pretrained(folder)
    return {k: v.detach().clone() for k, v in bert.state_dict().items()}


def bert_name(key: str) -> str:
    """The BERT tensor an LXMERT key takes (``lxmert.`` -> ``bert.``; ``cls.*`` keeps its name)."""
    return "bert." + key[len("lxmert.") :] if key.startswith("lxmert.") else key
