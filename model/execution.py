"""How the LXMERT layers of :mod:`model.modeling` run with less work; the math is unchanged.

Nothing here has parameters of its own: state dicts, outputs and gradients are those of the plain layers (the
tests compare them with Hugging Face's LXMERT and with the plain path). What is here:

- :func:`warn_if_slow_cpu_autocast`: one warning where CPU autocast would run far slower than float32.
- :class:`Dropout` / :func:`dropout`: ``nn.Dropout`` with one 64-bit random draw per four elements on CPU.
- :class:`Linear` / :func:`linear`: ``nn.Linear`` that, under CPU bf16 autocast, runs few rows in float32.
- :class:`TiedEmbeddingGradient`: the tied word-embedding / MLM-decoder matrix gets ONE dense gradient on CPU.
- :func:`static_shapes`: whether a forward must keep its shapes data-independent and the host out of it
  (``torch.compile``, CUDA graph capture).
- :class:`ExecutionPlan`, built once per forward by :func:`plan_execution`: which language outputs of the
  last cross-modality layer are read, whether its vision side is, and whether the language tokens travel
  packed (padding skipped: :class:`TokenPacking`). The layers take it as one argument and hand the work to
  :func:`self_attention` / :func:`cross_attention` below when it asks for less than everything.

Shapes: ``B`` batch, ``L`` tokens, ``V`` regions, ``H`` hidden, ``T`` real (unpadded) tokens of a batch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.cpu import cpu_autocast_warning

_WARNED_SLOW_AUTOCAST: set[torch.dtype] = set()


def warn_if_slow_cpu_autocast(device: torch.device) -> None:
    """Warn once per dtype when CPU autocast is on to a dtype this CPU has no native matmul for."""
    if device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return
    dtype = torch.get_autocast_dtype("cpu")
    if dtype in _WARNED_SLOW_AUTOCAST:
        return
    _WARNED_SLOW_AUTOCAST.add(dtype)
    message = cpu_autocast_warning(dtype)
    if message is not None:
        warnings.warn(f"LXMERT: {message}", RuntimeWarning, stacklevel=3)


def static_shapes(reference: Tensor) -> bool:
    """Whether this forward must have data-independent shapes and no host sync: under ``torch.compile`` or while
    a CUDA graph is being captured (``reference``: any input tensor, for its device).

    Where it is True the layers take the paths of fixed shapes (every token, every region) that a graph can
    replay; elsewhere they may select rows by data (``nonzero``), which waits for the device.
    """
    if torch.compiler.is_compiling():
        return True
    return reference.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# --------------------------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------------------------
class _MaskedScale(torch.autograd.Function):
    """``x * keep / (1 - p)`` with the boolean ``keep`` mask saved for backward (1 byte per element)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout with the same distribution as ``F.dropout``, cheaper on CPU.

    On CPU, ``bernoulli_`` draws one random number per element (~5 ns each); here one 64-bit draw gives
    four 16-bit uniforms, each compared with ``p * 65536`` (keep probability exact to 1 / 65536). Uses
    torch's default generator, so ``torch.manual_seed`` makes it reproducible. Elsewhere (CUDA, under
    ``torch.compile``) it is ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, True)
    n = x.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    keep = (words.view(torch.int16)[:n] >= -32768 + round(p * 65536)).view(x.shape)
    return _MaskedScale.apply(x, keep, 1.0 / (1.0 - p))


class Dropout(nn.Module):
    """``nn.Dropout`` computed by :func:`dropout` (no parameters; state dicts are unaffected)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# --------------------------------------------------------------------------------------------------------------
# Linear layers
# --------------------------------------------------------------------------------------------------------------
#: Under CPU bf16 autocast, a linear layer applied to at most this many rows runs in float32 instead.
CPU_FP32_MAX_ROWS = 256


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, except under CPU bf16 autocast for few rows (at most :data:`CPU_FP32_MAX_ROWS`): float32.

    Autocast casts the float32 weight into a fresh bf16 tensor every step and its bf16 gradient into a fresh
    float32 one; on CPU these large fresh buffers are page-faulted in each time, which costs ~5 ns per weight
    element, while the float32 matmuls (forward and both backward ones) cost more than bf16 only in
    proportion to the rows. With LXMERT's heads (MLM vocabulary projection at the masked tokens, QA / matching
    heads and pooler on [CLS], the last layer's language side at [CLS] + masked tokens) float32 is faster and
    more accurate. The output is then float32 (later bf16 layers cast it as autocast does).
    """
    if (
        x.device.type == "cpu"
        and weight.dtype == torch.float32
        and x.numel() <= CPU_FP32_MAX_ROWS * x.shape[-1]
        and torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    ):
        with torch.autocast("cpu", enabled=False):
            return F.linear(x.float(), weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same names) computed by :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


# --------------------------------------------------------------------------------------------------------------
# Tied word embeddings / MLM decoder with one dense gradient
# --------------------------------------------------------------------------------------------------------------
class TiedEmbeddingGradient:
    """One pretraining step's tied word-embedding lookup and MLM decoder, sharing ONE dense weight gradient.

    The lookup's backward runs after the decoder's (the decoder depends on it), so the decoder's dense
    ``(vocab, H)`` gradient is handed to the lookup's backward, which adds its rows into it in place: no second
    zero-filled vocab x H buffer, no sparse rows, no copy when the two are summed. Without a decoder gradient
    (only other losses back-propagated) the rows go into a zero matrix. Use :meth:`lookup` and :meth:`decode`
    once each per step, with the same (tied) weight.
    """

    def __init__(self) -> None:
        self.grad: Tensor | None = None

    @staticmethod
    def applies(input_ids: Tensor | None, embedding_weight: Tensor, decoder_weight: Tensor) -> bool:
        """Whether it pays: CPU, token ids given, the decoder tied to the embedding, and that matrix trained."""
        return (
            input_ids is not None
            and input_ids.device.type == "cpu"
            and decoder_weight is embedding_weight
            and torch.is_grad_enabled()
            and embedding_weight.requires_grad
            and not torch.compiler.is_compiling()
        )

    def lookup(self, input_ids: Tensor, weight: Tensor) -> Tensor:
        """``F.embedding(input_ids, weight, padding_idx=0)``: ``(B, L)`` -> ``(B, L, H)``."""
        return _TiedLookup.apply(input_ids, weight, self)

    def decode(self, h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """``h @ weight.T + bias``: ``(..., H)`` -> ``(..., vocab)``; float32, or the autocast dtype for many rows."""
        dtype = torch.float32
        if torch.is_autocast_enabled(h.device.type) and h.numel() > CPU_FP32_MAX_ROWS * h.shape[-1]:
            dtype = torch.get_autocast_dtype(h.device.type)
        return _TiedDecoder.apply(h, weight, bias, self, dtype)


class _TiedLookup(torch.autograd.Function):
    """Word-embedding lookup (``padding_idx`` 0) whose backward adds its rows into the decoder's dense gradient."""

    @staticmethod
    def forward(ctx: Any, input_ids: Tensor, weight: Tensor, tied: TiedEmbeddingGradient) -> Tensor:
        ctx.save_for_backward(input_ids)
        ctx.tied, ctx.weight_shape, ctx.weight_dtype = tied, weight.shape, weight.dtype
        return F.embedding(input_ids, weight, padding_idx=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor | None, None]:
        if not ctx.needs_input_grad[1]:
            return None, None, None
        (input_ids,) = ctx.saved_tensors
        total, ctx.tied.grad = ctx.tied.grad, None
        if total is None:
            total = torch.zeros(ctx.weight_shape, dtype=ctx.weight_dtype, device=grad.device)
        ids = input_ids.reshape(-1)
        rows = grad.reshape(ids.shape[0], -1)
        keep = (ids != 0).nonzero().squeeze(1)
        total.index_add_(0, ids.index_select(0, keep), rows.index_select(0, keep).to(total.dtype))
        return None, total, None


class _TiedDecoder(torch.autograd.Function):
    """``h @ W.T + b`` in ``dtype``; ``W``'s (float32) gradient goes to the :class:`_TiedLookup` of the same step."""

    @staticmethod
    def forward(
        ctx: Any, h: Tensor, weight: Tensor, bias: Tensor, tied: TiedEmbeddingGradient, dtype: torch.dtype
    ) -> Tensor:
        x = h.reshape(-1, h.shape[-1]).to(dtype)
        w = weight.to(dtype)
        out = torch.addmm(bias.to(dtype), x, w.t())
        ctx.save_for_backward(x, w)
        ctx.tied, ctx.h_shape, ctx.h_dtype = tied, h.shape, h.dtype
        return out.view(*h.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None, None, None]:
        x, w = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(x.dtype)
        grad_h = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.mm(g, w).view(ctx.h_shape).to(ctx.h_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(g.t(), x).float()  # (vocab, H), contiguous like the weight
            ctx.tied.grad = grad_w if ctx.tied.grad is None else ctx.tied.grad + grad_w
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0, dtype=torch.float32)
        return grad_h, None, grad_b, None, None


# --------------------------------------------------------------------------------------------------------------
# The plan: what a forward computes
# --------------------------------------------------------------------------------------------------------------
class TokenPacking:
    """The real (unpadded) tokens of a ``(B, L)`` batch stored as rows ``(T, H)``.

    Row-wise work (projections, feed-forward, LayerNorm, dropout) then skips the padding; attention pads its
    queries / keys / values back to ``(B, L, H)`` (zeros at padding, which the additive mask hides exactly as
    before: a padded key gets weight 0, and nothing else reads a padded position).
    """

    def __init__(self, attention_mask: Tensor) -> None:
        self.batch, self.length = attention_mask.shape
        real = attention_mask.reshape(-1) != 0
        #: (T,) flat indices into B * L of the real tokens, in order.
        self.index = real.nonzero().squeeze(1)
        # flat index -> row in the packed layout (-1 at padding)
        self._row = torch.full_like(real, -1, dtype=torch.long)
        self._row[self.index] = torch.arange(self.index.numel(), device=real.device)

    def pack(self, x: Tensor) -> Tensor:
        """``(B, L, C)`` -> ``(T, C)``."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)

    def pad(self, x: Tensor) -> Tensor:
        """``(T, C)`` -> ``(B, L, C)``, zeros at padding."""
        full = x.new_zeros(self.batch * self.length, x.shape[-1]).index_copy(0, self.index, x)
        return full.view(self.batch, self.length, -1)

    def rows(self, flat: Tensor) -> Tensor:
        """Packed rows ``(N,)`` of flat ``B * L`` indices ``(N,)`` (which must be real tokens)."""
        return self._row.index_select(0, flat)

    def covers(self, flat: Tensor) -> bool:
        """Whether every flat index is a real token."""
        return bool((self.rows(flat) >= 0).all())


@dataclass(frozen=True)
class ExecutionPlan:
    """What the encoder computes; the default (``ExecutionPlan()``) is everything, the plain layers.

    - ``language_rows`` ``(B + N,)``: flat indices into ``B * L`` at which the last cross-modality layer computes
      its language side after the cross-attention: the first token of each sample (the pooler's input), then
      the N rows the caller reads. ``None``: every token.
    - ``vision``: whether the last cross-modality layer computes its vision side.
    - ``packing``: the language states of every layer travel as packed ``(T, H)`` rows (padding skipped).

    ``language_rows`` and ``vision`` apply to the layer that receives the plan: the encoder hands this plan to
    its last cross-modality layer and :meth:`inner` to the others.
    """

    language_rows: Tensor | None = None
    vision: bool = True
    packing: TokenPacking | None = None

    def inner(self) -> ExecutionPlan:
        """The plan of a layer whose outputs are all read (every layer but the last): the packing only."""
        return ExecutionPlan(packing=self.packing)


#: Compute everything: the plain layers.
FULL_PLAN = ExecutionPlan()


def plan_execution(
    batch: int,
    length: int,
    attention_mask: Tensor | None,
    read_language_rows: Tensor | None,
    read_vision: bool,
    *,
    cross_layers: int,
    every_output: bool,
    pack_padding: bool,
) -> ExecutionPlan:
    """The plan of one forward; reads its arguments only.

    ``batch``, ``length``: the language input's ``(B, L)``; ``attention_mask`` ``(B, L)`` 1 = token, or None.
    ``read_language_rows`` ``(N,)``: the flat ``B * L`` indices of the last layer's language outputs the caller
    reads besides the pooled output (``None``: all of them; empty: the pooled output only). ``read_vision``:
    whether the caller reads the vision output. ``cross_layers``: the number of cross-modality layers (none:
    nothing to prune). ``every_output``: hidden states or attentions are returned, so every layer runs whole.
    ``pack_padding``: whether skipping padded tokens pays (CPU outside ``torch.compile``: there the work is the
    time; on a GPU the extra index operations cost more launches than they save); it happens only when some
    rows are pruned (otherwise padded outputs are returned) and all read rows are real tokens.
    """
    if every_output or cross_layers == 0:
        return ExecutionPlan()
    if read_language_rows is None:
        return ExecutionPlan(vision=read_vision)
    device = read_language_rows.device if attention_mask is None else attention_mask.device
    first_tokens = torch.arange(batch, device=device) * length
    rows = torch.cat([first_tokens, read_language_rows.to(device)])
    packing = None
    if pack_padding and attention_mask is not None and not bool(attention_mask.all()):
        packing = TokenPacking(attention_mask)
        if not packing.covers(rows):
            packing = None
    return ExecutionPlan(language_rows=rows, vision=read_vision, packing=packing)


# --------------------------------------------------------------------------------------------------------------
# Attention blocks under a plan (the plain path is in model/modeling.py)
# --------------------------------------------------------------------------------------------------------------
def self_attention(
    block: nn.Module, hidden: Tensor, attention_mask: Tensor | None, plan: ExecutionPlan
) -> Tensor:
    """``LxmertSelfAttentionLayer`` (``block``: ``.self`` attention, ``.output``) on the language side under ``plan``.

    ``hidden``: ``(B, L, H)``, or packed ``(T, H)`` rows with ``plan.packing``. Returns the same layout, or with
    ``plan.language_rows`` only those rows ``(N, H)``: keys and values still come from every token of each
    row's sequence; queries, the output projection and the residual only from the requested rows.
    """
    att, packing = block.self, plan.packing
    if plan.language_rows is None:
        q, k, v = (packing.pad(proj(hidden)) for proj in (att.query, att.key, att.value))
        ctx, _ = att.attend(q, k, v, attention_mask)
        return block.output(packing.pack(ctx), hidden)
    rows = plan.language_rows
    if packing is None:
        n, width = hidden.shape[1:]
        picked = hidden.reshape(-1, width).index_select(0, rows)
        k, v = att.split_heads(att.key(hidden)), att.split_heads(att.value(hidden))
    else:
        n, width = packing.length, hidden.shape[-1]
        picked = hidden.index_select(0, packing.rows(rows))
        k = att.split_heads(packing.pad(att.key(hidden)))
        v = att.split_heads(packing.pad(att.value(hidden)))
    sample = torch.div(rows, n, rounding_mode="floor")
    q = att.query(picked).view(-1, 1, att.num_attention_heads, att.attention_head_size).transpose(1, 2)
    k, v = k.index_select(0, sample), v.index_select(0, sample)
    mask = None if attention_mask is None else attention_mask.index_select(0, sample)
    ctx, _ = att.core(q, k, v, mask)
    return block.output(ctx.reshape(-1, width), picked)


def cross_attention(
    block: nn.Module,
    lang: Tensor,
    lang_mask: Tensor | None,
    visn: Tensor,
    visn_mask: Tensor | None,
    plan: ExecutionPlan,
) -> tuple[Tensor, Tensor | None]:
    """``LxmertCrossAttentionLayer`` (``block``: ``.att``, ``.output``) under ``plan``, without probabilities.

    ``lang`` ``(B, L, H)`` or packed ``(T, H)`` rows (``plan.packing``), ``visn`` ``(B, V, H)``. Returns the new
    ``lang`` in the layout given and the new ``visn``, or ``None`` for it when ``plan.vision`` is False (then
    only the language queries are projected; keys / values from the incoming vision states).
    """
    att, packing = block.att, plan.packing
    b, n_visn, width = visn.shape
    lang_rows = lang.reshape(-1, width)

    def lang_seq(x: Tensor) -> Tensor:
        return x.view(lang.shape) if packing is None else packing.pad(x)

    def lang_flat(x: Tensor) -> Tensor:
        return x.reshape(-1, width) if packing is None else packing.pack(x)

    if not plan.vision:
        ctx, _ = att.attend(lang_seq(att.query(lang_rows)), att.key(visn), att.value(visn), visn_mask)
        return block.output(lang_flat(ctx), lang_rows).view(lang.shape), None
    sizes = [lang_rows.shape[0], b * n_visn]
    both = torch.cat([lang_rows, visn.reshape(-1, width)])
    q_l, q_v = att.query(both).split(sizes)
    k_l, k_v = att.key(both).split(sizes)
    v_l, v_v = att.value(both).split(sizes)
    lang_ctx, _ = att.attend(lang_seq(q_l), k_v.view(b, n_visn, -1), v_v.view(b, n_visn, -1), visn_mask)
    visn_ctx, _ = att.attend(q_v.view(b, n_visn, -1), lang_seq(k_l), lang_seq(v_l), lang_mask)
    ctx = torch.cat([lang_flat(lang_ctx), visn_ctx.reshape(-1, width)])
    lang_out, visn_out = block.output(ctx, both).split(sizes)
    return lang_out.view(lang.shape), visn_out.view(b, n_visn, -1)
