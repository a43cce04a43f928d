"""Training-mode pieces that have no Hugging Face twin to compare against: fast dropout, train step, bf16."""

from __future__ import annotations

import torch

from model import LxmertForPreTraining
from model.modeling import LanguagePacking, fast_dropout

LABEL_KEYS = ("labels", "matched_label", "ans", "obj_labels")


def test_fast_dropout_distribution_and_gradient():
    torch.manual_seed(0)
    x = torch.randn(200, 1000, requires_grad=True)
    y = fast_dropout(x, 0.1, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    assert torch.allclose(y[kept], x[kept] / 0.9)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.9)
    assert fast_dropout(x, 0.1, training=False) is x
    torch.manual_seed(3)
    a = fast_dropout(x.detach(), 0.3, True)
    torch.manual_seed(3)
    assert torch.equal(a, fast_dropout(x.detach(), 0.3, True))  # reproducible under manual_seed
    assert abs((a != 0).float().mean().item() - 0.7) < 0.005
    odd = fast_dropout(torch.ones(7, 3), 0.5, True)  # numel not a multiple of 4
    assert odd.shape == (7, 3) and set(odd.unique().tolist()) <= {0.0, 2.0}


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
        losses = model(**tiny_batch).losses
        sum(losses[k] for k in names).backward()
        assert weight.grad is not None and not weight.grad.is_sparse, names
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()  # fused AdamW rejects sparse gradients
    # With only the decoder-free losses, the word-embedding rows of the input tokens still get their gradient.
    optimizer.zero_grad(set_to_none=True)
    model(**tiny_batch).losses["qa"].backward()
    used = tiny_batch["input_ids"].unique()
    assert weight.grad[used].abs().sum() > 0
    unused = torch.ones(weight.shape[0], dtype=torch.bool)
    unused[used] = False
    assert weight.grad[unused].abs().sum() == 0


def test_linear_small_rows_run_in_float32_under_cpu_autocast():
    """Under CPU bf16 autocast, few rows go through float32 (same numbers as fp32), many rows through bf16."""
    from model.modeling import CPU_FP32_MAX_ROWS, LxmertLinear

    torch.manual_seed(0)
    layer = LxmertLinear(16, 8)
    few = torch.randn(CPU_FP32_MAX_ROWS, 16, requires_grad=True)
    many = torch.randn(CPU_FP32_MAX_ROWS + 1, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_few, y_many = layer(few), layer(many)
    assert y_few.dtype == torch.float32 and y_many.dtype == torch.bfloat16
    torch.testing.assert_close(y_few, torch.nn.functional.linear(few, layer.weight, layer.bias))
    y_few.sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and few.grad.dtype == torch.float32
    assert layer(few).dtype == torch.float32  # no autocast: plain float32


def _grads_and_loss(model, inputs) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


_COVERS = LanguagePacking.covers


def _packing_spy(monkeypatch, enabled: bool = True) -> list[int]:
    """Counts the forwards that ran packed; ``enabled=False`` makes every forward run unpacked."""
    used: list[int] = []

    def spy(self, flat):
        ok = enabled and _COVERS(self, flat)
        if ok:
            used.append(self.index.numel())
        return ok

    monkeypatch.setattr(LanguagePacking, "covers", spy)
    return used


def test_packed_language_side_gives_the_same_loss_and_gradients(tiny_config, tiny_batch, monkeypatch):
    """Skipping padded tokens (CPU pretraining / task heads) changes no loss, score or gradient."""
    from model import LxmertForNLVR2, LxmertForQuestionAnswering

    torch.manual_seed(0)
    model = LxmertForPreTraining(tiny_config).eval()  # eval: no dropout, so both runs see the same math
    real = int(tiny_batch["attention_mask"].sum())
    assert real < tiny_batch["attention_mask"].numel()  # the batch has padding

    packed = _packing_spy(monkeypatch)
    loss_p, grads_p = _grads_and_loss(model, tiny_batch)
    assert packed == [real]
    assert not _packing_spy(monkeypatch, enabled=False)
    loss_u, grads_u = _grads_and_loss(model, tiny_batch)
    assert abs(loss_p - loss_u) < 1e-5
    assert grads_p.keys() == grads_u.keys()
    for name, grad in grads_u.items():
        assert (grads_p[name] - grad).abs().max().item() < 1e-5, name

    # An MLM label on a padded position: that token must be computed, so the forward runs unpacked.
    labels = tiny_batch["labels"].clone()
    labels[0, 8] = 5  # row 0 has 6 real tokens
    packed = _packing_spy(monkeypatch)
    model(**{**tiny_batch, "labels": labels})
    assert packed == []

    # Task heads read [CLS] only: packed too, same scores / loss / gradients.
    inputs = {k: tiny_batch[k] for k in ("input_ids", "attention_mask", "visual_feats", "visual_pos")}
    qa = LxmertForQuestionAnswering(tiny_config).eval()
    qa_inputs = {**inputs, "labels": tiny_batch["ans"].clamp(min=0)}
    nlvr2 = LxmertForNLVR2(tiny_config).eval()
    pair_inputs = {
        **inputs,
        "visual_feats": torch.stack([inputs["visual_feats"], inputs["visual_feats"].flip(0)], 1),
        "visual_pos": torch.stack([inputs["visual_pos"], inputs["visual_pos"].flip(0)], 1),
        "labels": torch.tensor([0, 1, 1]),
    }
    for head, head_inputs in ((qa, qa_inputs), (nlvr2, pair_inputs)):
        packed = _packing_spy(monkeypatch)
        loss_p, grads_p = _grads_and_loss(head, head_inputs)
        assert len(packed) == 1, type(head).__name__
        _packing_spy(monkeypatch, enabled=False)
        loss_u, grads_u = _grads_and_loss(head, head_inputs)
        assert abs(loss_p - loss_u) < 1e-5
        for name, grad in grads_u.items():
            assert (grads_p[name] - grad).abs().max().item() < 1e-5, (type(head).__name__, name)


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
    assert (lean.pooled_output - full.pooled_output).abs().max().item() < 1e-5


def test_slow_cpu_autocast_warns_once_and_names_the_remedy(tiny_config, tiny_batch, monkeypatch) -> None:
    import warnings

    import torch

    from common import cpu as runtime
    from model import LxmertForPreTraining, modeling

    monkeypatch.setattr(modeling, "_WARNED_SLOW_AUTOCAST", set())
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
    monkeypatch.setattr(modeling, "_WARNED_SLOW_AUTOCAST", set())
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
