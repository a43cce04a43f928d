"""The GPU paths of the model: fixed shapes (torch.compile / CUDA graphs) give the numbers of the pruned step, and
on CUDA the fused attention (no token packing), bf16 autocast and a whole training step captured in a CUDA graph
agree with the eager / Hugging Face references. The CUDA tests are skipped without a GPU; the fixed-shape test
runs on CPU too (it forces the path that capture / compile take)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import model.modeling as modeling
from model import LxmertForPreTraining, LxmertForQuestionAnswering
from model.execution import plan_execution, static_shapes

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BACKBONE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "visual_feats", "visual_pos")


def _to(x, device):
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    return x.to(device)


def _loss_and_grads(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(**inputs, mlm_logits_at_labels_only=True)  # our trainer's path (its opt-in)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fixed_shape_step_equals_the_pruned_one(tiny_config, tiny_batch, monkeypatch) -> None:
    """Under compile / graph capture the MLM logits cover every token and the feature regression every region;
    the losses and gradients are those of the pruned step (which selects rows by data)."""
    torch.manual_seed(0)
    model = LxmertForPreTraining(tiny_config).eval()
    pruned, grads_p = _loss_and_grads(model, tiny_batch)
    assert pruned.masked_lm_index is not None
    monkeypatch.setattr(modeling, "static_shapes", lambda reference: True)
    fixed, grads_f = _loss_and_grads(model, tiny_batch)
    assert fixed.masked_lm_index is None and fixed.prediction_logits.shape[:2] == tiny_batch["labels"].shape
    for name in pruned.losses:
        assert abs(pruned.losses[name].item() - fixed.losses[name].item()) < 1e-5, name
    assert grads_p.keys() == grads_f.keys()
    for name in grads_p:
        assert (grads_p[name] - grads_f[name]).abs().max().item() < 1e-5, name


def test_static_shapes_is_false_in_plain_eager_code() -> None:
    assert not static_shapes(torch.zeros(2))


@cuda
def test_cuda_plan_prunes_rows_without_packing(tiny_batch) -> None:
    mask = tiny_batch["attention_mask"].cuda()
    rows = (tiny_batch["labels"].reshape(-1) != -100).nonzero().squeeze(1).cuda()
    pack = mask.device.type == "cpu"  # what LxmertModel.forward asks for
    plan = plan_execution(
        *mask.shape, mask, rows, True, cross_layers=2, every_output=False, pack_padding=pack
    )
    assert plan.packing is None and plan.language_rows is not None


@cuda
@pytest.mark.parametrize("visual_mask", [False, True])
def test_cuda_fused_attention_matches_hf(tiny_config, tiny_batch, tmp_path, visual_mask) -> None:
    """Ours on CUDA (fused scaled_dot_product_attention, pruned last layer, no packing) against HF on CUDA."""
    torch.manual_seed(0)
    ours = LxmertForPreTraining(tiny_config)
    ours.save_pretrained(tmp_path)
    hf = transformers.LxmertForPreTraining.from_pretrained(tmp_path)
    ours, hf = ours.cuda().eval(), hf.cuda().eval()
    batch = _to(tiny_batch, "cuda")
    if not visual_mask:
        batch["visual_attention_mask"] = None
    a, grads_a = _loss_and_grads(ours, batch)
    b, grads_b = _loss_and_grads(hf, batch)
    assert abs(a.loss.item() - b.loss.item()) < 1e-4 * max(1.0, abs(b.loss.item()))
    index = a.masked_lm_index
    ref = b.prediction_logits.reshape(-1, b.prediction_logits.shape[-1]).index_select(0, index)
    assert (a.prediction_logits - ref).abs().max().item() < 1e-4
    for name, grad in grads_b.items():
        assert (grads_a[name] - grad).abs().max().item() < 1e-4, name


@cuda
def test_cuda_bf16_autocast_stays_close(tiny_config, tiny_batch) -> None:
    torch.manual_seed(0)
    model = LxmertForQuestionAnswering(tiny_config).cuda().eval()
    inputs = _to({k: tiny_batch[k] for k in BACKBONE_KEYS}, "cuda")
    with torch.no_grad():
        ref = model(**inputs).question_answering_score
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(**inputs).question_answering_score
    assert low.dtype == torch.float32 or low.dtype == torch.bfloat16
    assert ((low.float() - ref).norm() / ref.norm()).item() < 2e-2


@cuda
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_cuda_graph_training_step_equals_eager(tiny_config, tiny_batch, dtype) -> None:
    """A whole step (forward, backward, clipping, fused AdamW) captured once and replayed gives the weights of the
    same steps run eagerly (no dropout: eval mode; the captured forward takes the fixed-shape path)."""
    torch.manual_seed(0)
    eager = LxmertForPreTraining(tiny_config).cuda().eval()
    graphed = copy.deepcopy(eager)
    batch = _to(tiny_batch, "cuda")

    def make_step(model, capturable):
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True, capturable=capturable)
        autocast = torch.autocast(
            "cuda", dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False
        )

        def step():
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            return loss

        return opt, step

    opt_e, step_e = make_step(eager, False)
    for _ in range(4):
        opt_e.zero_grad(set_to_none=True)
        step_e()

    opt_g, step_g = make_step(graphed, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (one real step) outside the graph, as capture requires
        opt_g.zero_grad(set_to_none=True)
        step_g()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt_g.zero_grad(set_to_none=True)  # the captured backward allocates the gradients; replays overwrite them
    with torch.cuda.graph(graph):
        static_loss = step_g()
    for _ in range(3):
        graph.replay()  # capture ran no kernels: steps 2..4
    torch.cuda.synchronize()
    assert torch.isfinite(static_loss).item()
    tol = 1e-4 if dtype is None else 3e-2
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        assert (a - b).abs().max().item() <= tol * max(1.0, a.abs().max().item()), name
