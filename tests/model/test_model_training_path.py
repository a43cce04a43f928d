"""Training-mode pieces that have no Hugging Face twin to compare against: train step, bf16, tied gradient."""

from __future__ import annotations

import torch

from model import LxmertForPreTraining

LABEL_KEYS = ("labels", "matched_label", "ans", "obj_labels")


def test_train_step_fp32_and_bf16_reduce_loss(tiny_config, tiny_batch):
    """A few AdamW steps on one batch lower the loss, in fp32 and under bf16 autocast (dropout on)."""
    for autocast in (False, True):
        torch.manual_seed(0)
        model = LxmertForPreTraining(tiny_config).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        inputs = {k: v for k, v in tiny_batch.items()}
        losses = []
        for _ in range(6):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model(**inputs)
            out.loss.backward()
            assert model.lxmert.embeddings.word_embeddings.weight.grad is not None
            optimizer.step()
            losses.append(out.loss.item())
        assert all(torch.isfinite(torch.tensor(losses)))
        assert losses[-1] < losses[0]
        assert model.cls.predictions.decoder.weight is model.lxmert.embeddings.word_embeddings.weight


def test_partial_losses_give_dense_grads_for_fused_adamw(tiny_config, tiny_batch):
    """Back-propagating only losses that skip the tied MLM decoder still leaves a dense word-embedding grad."""
    torch.manual_seed(0)
    model = LxmertForPreTraining(tiny_config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    weight = model.lxmert.embeddings.word_embeddings.weight
    for names in (("qa",), ("matched", "obj"), ("mlm",), ("mlm", "qa")):
        optimizer.zero_grad(set_to_none=True)
        losses = model(**tiny_batch, mlm_logits_at_labels_only=True).losses
        sum(losses[k] for k in names).backward()
        assert weight.grad is not None and not weight.grad.is_sparse, names
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()  # fused AdamW rejects sparse gradients
    # With only the decoder-free losses, the word-embedding rows of the input tokens still get their gradient.
    optimizer.zero_grad(set_to_none=True)
    model(**tiny_batch, mlm_logits_at_labels_only=True).losses["qa"].backward()
    used = tiny_batch["input_ids"].unique()
    assert weight.grad[used].abs().sum() > 0
    unused = torch.ones(weight.shape[0], dtype=torch.bool)
    unused[used] = False
    assert weight.grad[unused].abs().sum() == 0


def test_task_heads_skip_the_unread_vision_side_of_the_last_layer(tiny_config, tiny_batch):
    """QA / NLVR2 read only the pooled output: the last cross-modality layer's vision side is not run, and
    LxmertModel(vision_output=False) gives the same pooled output with vision_output None."""
    from model import LxmertForQuestionAnswering, LxmertModel

    torch.manual_seed(0)
    qa = LxmertForQuestionAnswering(tiny_config).eval()
    calls: list[str] = []
    for i, layer in enumerate(qa.lxmert.encoder.x_layers):
        layer.visn_self_att.register_forward_hook(lambda *a, i=i: calls.append(f"x{i}"))
    inputs = {k: tiny_batch[k] for k in ("input_ids", "attention_mask", "visual_feats", "visual_pos")}
    qa(**inputs)
    last = len(qa.lxmert.encoder.x_layers) - 1
    assert calls == [f"x{i}" for i in range(last)]
    calls.clear()
    qa(**inputs, output_hidden_states=True)  # hidden states asked for: every layer whole
    assert calls == [f"x{i}" for i in range(last + 1)]

    model = LxmertModel(tiny_config).eval()
    full = model(**inputs)
    rows = torch.empty(0, dtype=torch.long)
    lean = model(**inputs, language_rows=rows, vision_output=False)
    assert lean.vision_output is None and full.vision_output is not None
    assert lean.language_output is None and lean.language_rows_output.shape == (0, tiny_config.hidden_size)
    assert (lean.pooled_output - full.pooled_output).abs().max().item() < 1e-5


def test_slow_cpu_autocast_warns_once_and_names_the_remedy(tiny_config, tiny_batch, monkeypatch) -> None:
    import warnings

    import torch

    from common import cpu as runtime
    from model import LxmertForPreTraining, execution

    monkeypatch.setattr(execution, "_WARNED_SLOW_AUTOCAST", set())
    model = LxmertForPreTraining(tiny_config).eval()
    batch = {k: v for k, v in tiny_batch.items() if k in ("input_ids", "visual_feats", "visual_pos")}

    # float32 never warns; nor does bf16 autocast on a CPU that has native bf16.
    monkeypatch.setattr(runtime, "cpu_autocast_is_fast", lambda dtype: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch)

    # Without native bf16: one warning per process, however many forwards.
    monkeypatch.setattr(execution, "_WARNED_SLOW_AUTOCAST", set())
    monkeypatch.setattr(runtime, "cpu_autocast_is_fast", lambda dtype: dtype == torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch)
            model(**batch)
        model(**batch)
    slow = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(slow) == 1, [str(w.message) for w in caught]
    text = str(slow[0].message)
    assert "bf16" in text and "float32" in text and torch.backends.cpu.get_cpu_capability() in text
