"""model/execution.py: the cheaper ways the layers run give the numbers of the plain layers; the plan is right."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model import LxmertForNLVR2, LxmertForPreTraining, LxmertForQuestionAnswering, LxmertModel
from model.execution import (
    CPU_FP32_MAX_ROWS,
    ExecutionPlan,
    Linear,
    TokenPacking,
    dropout,
    plan_execution,
)

TOL = 1e-5
BACKBONE_KEYS = ("input_ids", "attention_mask", "visual_feats", "visual_pos")


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------
def test_dropout_distribution_and_gradient() -> None:
    torch.manual_seed(0)
    x = torch.randn(200, 1000, requires_grad=True)
    y = dropout(x, 0.1, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    assert torch.allclose(y[kept], x[kept] / 0.9)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.9)
    assert dropout(x, 0.1, training=False) is x
    torch.manual_seed(3)
    a = dropout(x.detach(), 0.3, True)
    torch.manual_seed(3)
    assert torch.equal(a, dropout(x.detach(), 0.3, True))  # reproducible under manual_seed
    assert abs((a != 0).float().mean().item() - 0.7) < 0.005
    odd = dropout(torch.ones(7, 3), 0.5, True)  # numel not a multiple of 4
    assert odd.shape == (7, 3) and set(odd.unique().tolist()) <= {0.0, 2.0}


def test_linear_small_rows_run_in_float32_under_cpu_autocast() -> None:
    """Under CPU bf16 autocast, few rows go through float32 (same numbers as fp32), many rows through bf16."""
    torch.manual_seed(0)
    layer = Linear(16, 8)
    assert set(layer.state_dict()) == {"weight", "bias"}
    few = torch.randn(CPU_FP32_MAX_ROWS, 16, requires_grad=True)
    many = torch.randn(CPU_FP32_MAX_ROWS + 1, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_few, y_many = layer(few), layer(many)
    assert y_few.dtype == torch.float32 and y_many.dtype == torch.bfloat16
    torch.testing.assert_close(y_few, torch.nn.functional.linear(few, layer.weight, layer.bias))
    y_few.sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and few.grad.dtype == torch.float32
    assert layer(few).dtype == torch.float32  # no autocast: plain float32


def test_token_packing_round_trip() -> None:
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    packing = TokenPacking(mask)
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    packed = packing.pack(x)
    assert packed.shape == (5, 3)
    assert torch.equal(packed, x[mask.bool()])
    padded = packing.pad(packed)
    assert torch.equal(padded, x * mask[..., None])  # zeros at padding
    assert packing.rows(torch.tensor([0, 4, 6])).tolist() == [0, 2, 4]
    assert packing.covers(torch.tensor([1, 5])) and not packing.covers(torch.tensor([1, 2]))


# ---------------------------------------------------------------------------------------------------------------
# The plan (a pure function of its arguments)
# ---------------------------------------------------------------------------------------------------------------
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])


def _plan(
    mask: torch.Tensor | None = MASK,
    rows: list[int] | None = None,
    vision: bool = True,
    cross_layers: int = 2,
    every_output: bool = False,
    pack_padding: bool = True,
) -> ExecutionPlan:
    read = None if rows is None else torch.tensor(rows, dtype=torch.long)
    return plan_execution(
        3,
        5,
        mask,
        read,
        vision,
        cross_layers=cross_layers,
        every_output=every_output,
        pack_padding=pack_padding,
    )


def _is_full(plan: ExecutionPlan) -> bool:
    return plan.language_rows is None and plan.vision and plan.packing is None


def test_plan_reading_everything_computes_everything() -> None:
    assert _is_full(_plan())
    assert _is_full(ExecutionPlan())


def test_plan_rows_start_with_each_first_token_and_pack_the_padding() -> None:
    plan = _plan(rows=[1, 7, 11])
    assert plan.language_rows.tolist() == [0, 5, 10, 1, 7, 11]
    assert plan.vision
    assert plan.packing is not None and plan.packing.index.tolist() == [0, 1, 2, 5, 6, 7, 8, 9, 10, 11]
    inner = plan.inner()  # the layers before the last: same packing, every row, vision side
    assert inner.packing is plan.packing and inner.language_rows is None and inner.vision
    pooled_only = _plan(rows=[], vision=False)
    assert pooled_only.language_rows.tolist() == [0, 5, 10] and not pooled_only.vision
    assert pooled_only.packing is not None


def test_plan_packs_only_when_it_pays_and_is_exact() -> None:
    # a read row on a padded token (row 0 has 3 tokens): that token is computed, so nothing is packed
    plan = _plan(rows=[1, 3])
    assert plan.language_rows.tolist() == [0, 5, 10, 1, 3] and plan.packing is None
    assert _plan(rows=[1], pack_padding=False).packing is None  # GPU / torch.compile
    assert _plan(mask=None, rows=[1]).packing is None  # no padding
    assert _plan(mask=torch.ones(3, 5, dtype=torch.long), rows=[1]).packing is None
    # everything read, only the vision side dropped: no pruned rows, so the padding is returned and not packed
    plan = _plan(vision=False)
    assert plan.language_rows is None and plan.packing is None and not plan.vision


def test_plan_computes_everything_where_every_output_is_returned() -> None:
    assert _is_full(_plan(rows=[1], vision=False, every_output=True))
    assert _is_full(_plan(rows=[1], vision=False, cross_layers=0))


# ---------------------------------------------------------------------------------------------------------------
# Models: the planned forward equals the plain one (loss, scores, gradients)
# ---------------------------------------------------------------------------------------------------------------
def _loss_and_grads(model: torch.nn.Module, inputs: dict, **kwargs) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(**inputs, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for name, grad in b.items():
        assert (a[name] - grad).abs().max().item() < TOL, (what, name)


def test_pretraining_planned_step_equals_the_plain_one(tiny_config, tiny_batch) -> None:
    """With MLM labels on real tokens the step is pruned and packed; asking for hidden states runs it plain."""
    torch.manual_seed(0)
    model = LxmertForPreTraining(tiny_config).eval()  # eval: no dropout, so both runs see the same math
    labels = tiny_batch["labels"].reshape(-1)
    read = (labels != -100).nonzero().squeeze(1)
    plan = _plan(mask=tiny_batch["attention_mask"], rows=read.tolist())
    assert plan.packing is not None and plan.language_rows is not None  # this batch takes the fast path
    planned, grads_p = _loss_and_grads(model, tiny_batch)
    plain, grads_u = _loss_and_grads(model, tiny_batch, output_hidden_states=True)
    assert abs(planned.loss.item() - plain.loss.item()) < TOL
    assert (planned.prediction_logits - plain.prediction_logits).abs().max().item() < TOL
    _assert_same(grads_p, grads_u, "pretraining")

    # An MLM label on a padded position: that token is computed too (not packed), same numbers.
    padded_label = tiny_batch["labels"].clone()
    padded_label[0, 8] = 5  # row 0 has 6 real tokens
    inputs = {**tiny_batch, "labels": padded_label}
    planned, grads_p = _loss_and_grads(model, inputs)
    plain, grads_u = _loss_and_grads(model, inputs, output_hidden_states=True)
    assert abs(planned.loss.item() - plain.loss.item()) < TOL
    _assert_same(grads_p, grads_u, "label on padding")


def test_question_answering_planned_step_equals_the_plain_one(tiny_config, tiny_batch) -> None:
    torch.manual_seed(0)
    qa = LxmertForQuestionAnswering(tiny_config).eval()
    inputs = {**{k: tiny_batch[k] for k in BACKBONE_KEYS}, "labels": tiny_batch["ans"].clamp(min=0)}
    planned, grads_p = _loss_and_grads(qa, inputs)
    plain, grads_u = _loss_and_grads(qa, inputs, output_hidden_states=True)
    assert (planned.question_answering_score - plain.question_answering_score).abs().max().item() < TOL
    _assert_same(grads_p, grads_u, "qa")


def test_nlvr2_planned_step_equals_the_plain_backbone(tiny_config, tiny_batch) -> None:
    torch.manual_seed(0)
    nlvr2 = LxmertForNLVR2(tiny_config).eval()
    b = tiny_batch
    feats = torch.stack([b["visual_feats"], b["visual_feats"].flip(0)], 1)
    pos = torch.stack([b["visual_pos"], b["visual_pos"].flip(0)], 1)
    labels = torch.tensor([0, 1, 1])
    inputs = dict(
        input_ids=b["input_ids"], attention_mask=b["attention_mask"], visual_feats=feats, visual_pos=pos
    )
    planned, grads_p = _loss_and_grads(nlvr2, {**inputs, "labels": labels})
    # plain: each image through the whole backbone (no plan), pooled outputs concatenated
    nlvr2.zero_grad(set_to_none=True)
    pooled = [
        nlvr2.lxmert(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            visual_feats=feats[:, i],
            visual_pos=pos[:, i],
        ).pooled_output
        for i in range(2)
    ]
    logits = nlvr2.answer_head(torch.stack(pooled, 1).reshape(3, -1))
    torch.nn.functional.cross_entropy(logits, labels).backward()
    grads_u = {n: p.grad.clone() for n, p in nlvr2.named_parameters() if p.grad is not None}
    assert (planned.logits - logits).abs().max().item() < TOL
    _assert_same(grads_p, grads_u, "nlvr2")


def test_language_rows_without_cross_layers_are_read_from_the_whole_output(tiny_config, tiny_batch) -> None:
    config = dataclasses.replace(tiny_config, x_layers=0)
    torch.manual_seed(0)
    model = LxmertModel(config).eval()
    inputs = {k: tiny_batch[k] for k in BACKBONE_KEYS}
    rows = torch.tensor([1, 12])
    out = model(**inputs, language_rows=rows, vision_output=False)
    assert out.vision_output is not None  # nothing to prune without cross-modality layers
    flat = out.language_output.reshape(-1, config.hidden_size)
    assert torch.equal(out.language_rows_output, flat[rows])


# ---------------------------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_class", [LxmertForPreTraining, LxmertForQuestionAnswering, LxmertForNLVR2])
def test_weights_are_initialised_once(tiny_config, head_class) -> None:
    """A head model's backbone is the backbone built alone from the same seed (not drawn a second time)."""
    torch.manual_seed(0)
    alone = LxmertModel(tiny_config).state_dict()
    torch.manual_seed(0)
    model = head_class(tiny_config)
    inside = model.lxmert.state_dict()
    assert alone.keys() == inside.keys()
    for key, value in alone.items():
        assert torch.equal(value, inside[key]), key
    # and the heads follow BERT's initialisation
    std = tiny_config.initializer_range
    head = model.answer_head.logit_fc
    assert torch.equal(head[2].weight, torch.ones_like(head[2].weight)) and not head[3].bias.any()
    assert abs(head[0].weight.std().item() - std) < 0.3 * std
