"""tasks.engine.optim: BERT-Adam (multi-tensor) against a plain per-parameter reference; the warmup-linear schedule
against hand values; parameter groups; AdamW."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tasks.config import OptimConfig
from tasks.engine.optim import (
    BertAdam,
    FusedBertAdam,
    WarmupLinear,
    build_optimizer,
    param_groups,
    warmup_linear,
)

IMPLEMENTATIONS = pytest.mark.parametrize("impl", [BertAdam, FusedBertAdam], ids=["foreach", "fused"])


def reference_bert_adam_step(params, grads, state, lr, b1=0.9, b2=0.999, eps=1e-6, wd=0.01):
    """The original's BertAdam.step, one parameter at a time, plain tensor ops (src/lxrt/optimization.py)."""
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        if i not in state:
            state[i] = (torch.zeros_like(p), torch.zeros_like(p))
        m, v = state[i]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        update = m / (v.sqrt() + eps)
        if wd > 0.0:
            update += wd * p
        p.add_(-(lr * update))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.out = nn.Linear(7, 3)
        self.unused = nn.Linear(2, 2)  # never gets a gradient

    def forward(self, x):
        return self.out(self.norm(self.lin(x)))


@IMPLEMENTATIONS
def test_bert_adam_matches_per_parameter_reference(impl):
    torch.manual_seed(0)
    net = Net()
    ref_params = [p.detach().clone() for p in net.parameters()]
    opt = impl(net.parameters(), lr=1e-2, weight_decay=0.01)
    state: dict = {}
    for step in range(12):
        lr = 1e-2 * step / 12  # the first update with lr 0, as the schedule gives
        for group in opt.param_groups:
            group["lr"] = lr
        x = torch.randn(4, 5)
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        grads = [None if p.grad is None else p.grad.clone() for p in net.parameters()]
        opt.step()
        reference_bert_adam_step(ref_params, grads, state, lr)
    for (name, p), ref in zip(net.named_parameters(), ref_params):
        torch.testing.assert_close(p.detach(), ref, rtol=1e-6, atol=1e-7, msg=name)
    # a parameter without gradient is left alone: no moments, no weight decay
    assert not opt.state[net.unused.weight]


@IMPLEMENTATIONS
def test_no_bias_correction_and_eps_after_sqrt(impl):
    """First step from zero moments: m = 0.1 g, v = 0.001 g^2, update = 0.1 g / (sqrt(0.001) |g| + eps)."""
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.0]))
    opt = impl([p], lr=0.5, weight_decay=0.0)
    p.grad = torch.tensor([0.5, -3.0, 0.0])
    opt.step()
    g = torch.tensor([0.5, -3.0, 0.0])
    expected = torch.tensor([1.0, -2.0, 0.0]) - 0.5 * 0.1 * g / (math.sqrt(0.001) * g.abs() + 1e-6)
    torch.testing.assert_close(p.detach(), expected)
    # torch's Adam (bias-corrected) would move by ~lr * sign(g) instead
    assert abs(p[0].item() - 1.0) > 1.5 * 0.5


@IMPLEMENTATIONS
def test_decoupled_weight_decay_with_zero_gradient(impl):
    p = nn.Parameter(torch.full((3,), 2.0))
    opt = impl([p], lr=0.1, weight_decay=0.01)
    p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 2.0 - 0.1 * 0.01 * 2.0))


def test_warmup_linear_hand_values():
    # x < w: x / w; then (1 - x) / (1 - w), floored at 0
    assert warmup_linear(0.0, 0.1) == 0.0
    assert warmup_linear(0.05, 0.1) == pytest.approx(0.5)
    assert warmup_linear(0.1, 0.1) == pytest.approx(1.0)
    assert warmup_linear(0.55, 0.1) == pytest.approx(0.5)
    assert warmup_linear(1.0, 0.1) == 0.0
    assert warmup_linear(1.5, 0.1) == 0.0


def test_schedule_first_update_has_lr_zero_and_follows_step_before_increment():
    p = nn.Parameter(torch.zeros(1))
    opt = BertAdam([p], lr=1e-4)
    sched = WarmupLinear(opt, warmup=0.25, t_total=8)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(1)
        opt.step()
        sched.step()
    # update k uses x = k / 8: warmup over 2 steps (0, 0.5), then (1 - x) / 0.75
    expected = [0.0, 0.5, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    assert seen == pytest.approx([1e-4 * e for e in expected])
    assert sched.get_last_lr()[0] == 0.0  # after t_total steps


def test_schedule_state_round_trip_and_refuses_other_length():
    p = nn.Parameter(torch.zeros(1))
    opt = BertAdam([p], lr=1.0)
    sched = WarmupLinear(opt, warmup=0.1, t_total=20)
    for _ in range(7):
        sched.step()
    state = sched.state_dict()
    opt2 = BertAdam([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = WarmupLinear(opt2, warmup=0.1, t_total=20)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()
    with pytest.raises(ValueError, match="t_total=20"):
        WarmupLinear(BertAdam([nn.Parameter(torch.zeros(1))], lr=1.0), 0.1, 30).load_state_dict(state)


def test_param_groups_original_decays_everything_flag_exempts_bias_and_norm():
    net = Net()
    (only,) = param_groups(net, 0.01, exempt_bias_and_norm=False)
    assert len(only["params"]) == len(list(net.parameters()))
    decay, no_decay = param_groups(net, 0.01, exempt_bias_and_norm=True)
    assert {id(p) for p in decay["params"]} == {id(net.lin.weight), id(net.out.weight), id(net.unused.weight)}
    assert no_decay["weight_decay"] == 0.0
    assert {id(net.norm.weight), id(net.norm.bias), id(net.lin.bias)} <= {id(p) for p in no_decay["params"]}


def test_build_optimizer_adamw_and_bert_adam():
    net = Net()
    opt, sched = build_optimizer(net, OptimConfig(name="adamw", lr=3e-4, warmup=0.5), t_total=4)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["lr"] == 0.0  # schedule applied from the first update
    opt, sched = build_optimizer(copy.deepcopy(net), OptimConfig(), t_total=4)
    assert isinstance(opt, FusedBertAdam) and opt.param_groups[0]["weight_decay"] == 0.01
    opt, sched = build_optimizer(copy.deepcopy(net), OptimConfig(fused=False), t_total=4)
    assert isinstance(opt, BertAdam)


def test_fused_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(0)
    net, twin = Net(), Net()
    twin.load_state_dict(net.state_dict())
    opt = FusedBertAdam(net.parameters(), lr=1e-2)
    x = torch.randn(4, 5)
    for _ in range(3):
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    twin.load_state_dict(net.state_dict())
    opt2 = FusedBertAdam(twin.parameters(), lr=1e-2)
    opt2.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    for model, o in ((net, opt), (twin, opt2)):
        o.zero_grad()
        model(x).sum().backward()
        o.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("saved, resumed", [(BertAdam, FusedBertAdam), (FusedBertAdam, BertAdam)])
def test_a_checkpoint_of_one_implementation_resumes_with_the_other(saved, resumed, tmp_path):
    """optim.fused switched between runs (or a checkpoint written before the fused default) resumes the
    same BERT-Adam: the continued updates agree with the uninterrupted ones to float rounding."""
    torch.manual_seed(0)
    net, twin = Net(), Net()
    opt = saved(net.parameters(), lr=1e-2)
    x = torch.randn(4, 5)
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    twin.load_state_dict(net.state_dict())
    opt2 = resumed(twin.parameters(), lr=1e-2)
    opt2.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    if resumed is FusedBertAdam:
        assert opt2.param_groups[0]["fused"] is True  # still the fused kernel
    for _ in range(3):
        for model, o in ((net, opt), (twin, opt2)):
            o.zero_grad()
            model(x).pow(2).sum().backward()
            o.step()
    for (name, a), b in zip(net.named_parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
