"""Fixtures for the model tests: a tiny LXMERT config and matching random inputs / labels."""

from __future__ import annotations

import pytest
import torch

from model import LxmertConfig

TINY = dict(
    vocab_size=120,
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=64,
    l_layers=2,
    r_layers=2,
    x_layers=2,
    visual_feat_dim=24,
    num_qa_labels=9,
    num_object_labels=11,
    num_attr_labels=7,
    max_position_embeddings=40,
)


@pytest.fixture
def tiny_config() -> LxmertConfig:
    return LxmertConfig(**TINY)


@pytest.fixture
def tiny_batch() -> dict:
    """B=3, L=10 (rows padded to 6, 8, 10 tokens), V=6 regions; pretraining labels included."""
    g = torch.Generator().manual_seed(1)
    b, seq, v = 3, 10, 6
    lengths = torch.tensor([6, 8, 10])
    attention_mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    input_ids = torch.randint(5, TINY["vocab_size"], (b, seq), generator=g) * attention_mask
    labels = torch.full((b, seq), -100)
    labels[0, 2], labels[1, 5], labels[2, 1], labels[2, 9] = 7, 11, 13, 17
    visual_attention_mask = torch.ones(b, v, dtype=torch.long)
    visual_attention_mask[1, 4:] = 0
    feats = torch.randn(b, v, TINY["visual_feat_dim"], generator=g)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_type_ids=torch.zeros(b, seq, dtype=torch.long),
        visual_feats=feats,
        visual_pos=torch.rand(b, v, 4, generator=g),
        visual_attention_mask=visual_attention_mask,
        labels=labels,
        matched_label=torch.tensor([1, 0, 1]),
        ans=torch.tensor([3, -100, 8]),
        obj_labels={
            "obj": (torch.randint(0, 11, (b, v), generator=g), torch.rand(b, v, generator=g)),
            "attr": (torch.randint(0, 7, (b, v), generator=g), torch.rand(b, v, generator=g)),
            "feat": (
                torch.randn(b, v, TINY["visual_feat_dim"], generator=g),
                (torch.rand(b, v, generator=g) < 0.4).float(),
            ),
        },
    )
