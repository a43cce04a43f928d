"""``lxmert-train vqa|gqa|nlvr2 --load <BERT>``: the original's start without LXMERT weights (its "train + BERT"
baselines): embeddings, language layers and pooler from BERT, the rest and the task head initialised; after the
first optimizer step (lr 0 under the warmup) the language weights still equal BERT's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from finetune_data import TINY_MODEL, nlvr2_setup, qa_setup
from safetensors.torch import load_file
from tiny_bert import LANGUAGE_PREFIXES, bert_name, save_tiny_bert

from tasks.engine.trainer import train
from tasks.registry import build_task


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_finetuning_from_bert(tmp_path: Path, task: str):
    sizes = {k: TINY_MODEL[k] for k in ("hidden_size", "num_attention_heads", "intermediate_size")}
    bert = save_tiny_bert(tmp_path / "bert", layers=2, **sizes)  # one layer more than l_layers: left out
    cfg = (
        nlvr2_setup(tmp_path / "data", n_images=32)
        if task == "nlvr2"
        else qa_setup(tmp_path / "data", n_train=32)
    )
    cfg.train.epochs = 2
    load = str(tmp_path / "bert")
    summary = train(cfg, build_task(cfg, load), tmp_path / "run", load=load, max_steps=1)
    assert summary["step"] == 1
    step = load_file(tmp_path / "run" / "checkpoints" / "step_00000001" / "model.safetensors")
    from_bert = [k for k in step if k.startswith(LANGUAGE_PREFIXES)]
    assert len(from_bert) == 5 + 16 + 2  # embeddings (3 + LayerNorm), one layer, pooler
    for key in from_bert:
        assert torch.equal(step[key], bert[bert_name(key)]), key
    assert not step["answer_head.logit_fc.0.bias"].any()  # the head starts from N(0, 0.02) / zero biases
    assert not step["lxmert.encoder.x_layers.0.lang_output.dense.bias"].any()
