"""Training-mode pieces that have no Hugging Face twin to compare against: fast dropout, train step, bf16."""

from __future__ import annotations

import torch

from model import LxmertForPreTraining
from model.modeling import fast_dropout

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
