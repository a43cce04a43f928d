"""The optimiser and learning-rate schedule of LXMERT (the original's ``BertAdam`` + warmup-linear).

``BertAdam`` (the original's ``src/lxrt/optimization.py`` semantics):

- Adam moments ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2`` with NO bias correction;
- ``update = m / (sqrt(v) + eps) + weight_decay * p`` (eps 1e-6 added after the square root; decoupled
  weight decay, applied by the original to every parameter, biases and LayerNorm included);
- ``p -= lr_t * update``.

:class:`BertAdam` runs as multi-tensor ``torch._foreach_*`` kernels (one launch per op for all the parameters
of one device and dtype), the way torch's own ``foreach`` Adam does. :class:`FusedBertAdam` (the default,
``optim.fused: true``, on CPU and CUDA) runs the same update in torch's fused AdamW kernel, one pass over each
tensor, with the bias corrections held at exactly 1. Parameters without a gradient are left alone (no
moment decay, no weight decay), as in the original.

:class:`WarmupLinear` is the original schedule: with ``x = step / t_total`` (``step`` = optimizer steps
taken BEFORE this one, so the first update has ``lr_t = 0``), ``lr_t = lr * x / w`` for ``x < w``, else
``lr * max(0, (1 - x) / (1 - w))``. It also drives ``optim.name: adamw`` (torch's AdamW, fused where the
device has it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tasks.config import OptimConfig

__all__ = ["BertAdam", "FusedBertAdam", "WarmupLinear", "build_optimizer", "param_groups", "warmup_linear"]


class BertAdam(torch.optim.Optimizer):
    """Adam without bias correction, eps after the square root, decoupled weight decay (see module doc).

    ``lr`` is the group's current learning rate (set by :class:`WarmupLinear` before each step).
    State per parameter: ``exp_avg`` and ``exp_avg_sq`` (same shape and dtype as the parameter).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
    ) -> None:
        if lr < 0:
            raise ValueError(f"BertAdam: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"BertAdam: betas must be in [0, 1), got {betas}")
        if eps < 0:
            raise ValueError(f"BertAdam: eps must be >= 0, got {eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            # Group by (device, dtype): one multi-tensor launch per op and bucket.
            buckets: dict[tuple[torch.device, torch.dtype], tuple[list, list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("BertAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params, grads, exp_avgs, exp_avg_sqs = buckets.setdefault(
                    (p.device, p.dtype), ([], [], [], [])
                )
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
            for params, grads, exp_avgs, exp_avg_sqs in buckets.values():
                # m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
                torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
                torch._foreach_mul_(exp_avg_sqs, beta2)
                torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
                if lr == 0.0:  # the schedule's first update: p -= 0 * update
                    continue
                # p -= lr * (m / (sqrt(v) + eps) + wd * p), as p *= 1 - lr * wd; p -= lr * m / (sqrt(v) + eps)
                denom = torch._foreach_sqrt(exp_avg_sqs)
                torch._foreach_add_(denom, eps)
                if weight_decay != 0.0:
                    torch._foreach_mul_(params, 1.0 - lr * weight_decay)
                torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr)
                del denom
        return loss


class FusedBertAdam(torch.optim.AdamW):
    """BERT-Adam on torch's fused AdamW kernel (one pass over each tensor; CPU and CUDA).

    AdamW divides by the bias corrections ``1 - beta^t``; with the step count ``t`` held at +inf they are
    exactly 1 (``+inf + 1`` stays +inf), and what remains is BERT-Adam's update: ``p *= 1 - lr * wd``, then
    ``p -= lr * m / (sqrt(v) + eps)``, the same as ``p -= lr * (m / (sqrt(v) + eps) + wd * p)`` up to float
    rounding (tested against the per-parameter reference). Parameters without a gradient are skipped.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not self.state[p]:
                    self.state[p].update(
                        step=torch.full((), math.inf, dtype=torch.float32, device=p.device),
                        exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                        exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format),
                    )
        return super().step(closure)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Also takes the state of :class:`BertAdam` (``optim.fused: false``, or a checkpoint written before
        the fused default): the same moments, given the step count this class holds at +inf, and this
        optimizer's own kernel settings (``fused``, ...) where the saved groups lack them."""
        state = {
            key: {**value, "step": torch.tensor(math.inf)}
            if "exp_avg" in value and "step" not in value
            else value
            for key, value in state_dict["state"].items()
        }
        groups = state_dict["param_groups"]
        if len(groups) == len(self.param_groups):  # otherwise torch refuses the groups, naming the mismatch
            groups = [
                {**{k: v for k, v in own.items() if k != "params"}, **saved}
                for own, saved in zip(self.param_groups, groups)
            ]
        super().load_state_dict({**state_dict, "state": state, "param_groups": groups})


def warmup_linear(x: float, warmup: float) -> float:
    """The original's factor at training progress ``x = step / t_total`` (0 at x=0, 1 at x=warmup, 0 at x=1)."""
    if x < warmup:
        return x / warmup
    return max((x - 1.0) / (warmup - 1.0), 0.0)


class WarmupLinear:
    """Sets every group's ``lr`` to ``base_lr * warmup_linear(step / t_total, warmup)``.

    Call :meth:`step` after each ``optimizer.step()``; the lr in effect for update ``k`` (0-based) is the
    factor at ``k / t_total``, so update 0 has lr 0, as in the original. ``state_dict`` holds plain ints and
    floats (readable with ``torch.load(weights_only=True)``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: float, t_total: int) -> None:
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"optim.warmup must be in [0, 1), got {warmup}")
        if t_total < 1:
            raise ValueError(f"the schedule needs at least one optimizer step, got t_total={t_total}")
        self.optimizer = optimizer
        self.warmup = float(warmup)
        self.t_total = int(t_total)
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def factor(self, step: int) -> float:
        return warmup_linear(step / self.t_total, self.warmup)

    def _apply(self) -> None:
        f = self.factor(self.last_step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self.last_step,
            "t_total": self.t_total,
            "warmup": self.warmup,
            "base_lrs": list(self.base_lrs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["t_total"]) != self.t_total:
            raise ValueError(
                f"the checkpoint's schedule has t_total={state['t_total']} optimizer steps, this run "
                f"{self.t_total}: train.epochs, data.batch_size or the training data changed; resume with the "
                "same settings (or start a new run with --load)"
            )
        self.last_step = int(state["last_step"])
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self._apply()


def param_groups(model: nn.Module, weight_decay: float, exempt_bias_and_norm: bool) -> list[dict[str, Any]]:
    """One group decayed with ``weight_decay`` (the original: every parameter), or, with
    ``exempt_bias_and_norm``, a second group without decay for biases and LayerNorm weights."""
    if not exempt_bias_and_norm:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    seen: set[int] = set()
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            exempt = name == "bias" or isinstance(module, (nn.LayerNorm, nn.GroupNorm))
            (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, t_total: int, device_type: str = "cpu"
) -> tuple[torch.optim.Optimizer, WarmupLinear]:
    """``optim.name`` -> (optimizer, schedule over ``t_total`` optimizer steps)."""
    groups = param_groups(model, cfg.weight_decay, cfg.exempt_bias_and_norm)
    betas = (cfg.beta1, cfg.beta2)
    fused = cfg.fused and device_type in ("cuda", "cpu")  # torch's fused AdamW kernels exist for both
    if cfg.name == "bert_adam":
        optimizer: torch.optim.Optimizer = (FusedBertAdam if fused else BertAdam)(
            groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    elif cfg.name == "adamw":
        optimizer = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused
        )
    else:  # the config loader only lets the Literal's names through
        raise ValueError(f"optim.name: unknown optimizer {cfg.name!r} (bert_adam or adamw)")
    return optimizer, WarmupLinear(optimizer, cfg.warmup, t_total)
