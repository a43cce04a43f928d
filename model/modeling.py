"""The LXMERT network: embeddings, encoders, cross-modality layers, heads and the model classes.

Module and parameter names follow Hugging Face's ``transformers`` LXMERT (``lxmert.embeddings.*``,
``lxmert.encoder.{visn_fc,layer.i,r_layers.i,x_layers.i}.*``, ``cls.predictions.*``,
``obj_predict_head.decoder_dict.*``, ``answer_head.logit_fc.{0,2,3}.*``) so state dicts move between the
two without renaming; the math is the same (fp32 outputs agree within 1e-5), the work is not:

- attention runs through ``torch.nn.functional.scaled_dot_product_attention`` where that is the fast
  kernel (CUDA; CPU fp32 inference), otherwise through an explicit softmax with a cheaper CPU dropout
  (:func:`fast_dropout`: one 64-bit random draw per four elements instead of one per element);
- the cross-modality layer uses ONE cross-attention module in both directions (as the original): its
  query / key / value / output projections run once over the concatenated language + vision tokens;
- with MLM labels, the vocabulary projection (the largest matmul) runs only at the labelled positions;
  the feature-regression head runs only on regions with a non-zero loss weight;
- where only some language outputs are read (pretraining with MLM labels: [CLS] and the labelled tokens;
  the QA / NLVR2 heads: [CLS]), the last cross-modality layer computes its language side only there,
  and on CPU the padded tokens are skipped in every row-wise op of every layer (:class:`LanguagePacking`;
  ~30% of the language work at LXMERT's sentence lengths);
- on CPU the word-embedding lookup of a pretraining step adds its gradient rows in place into the tied
  decoder's dense gradient (no second zero-filled vocab x hidden buffer);
- under CPU bf16 autocast, linear layers applied to few rows (the heads, the pruned last layer) run in
  float32: cheaper there than autocast's fresh bf16 copy of the weight and float32 copy of its gradient;
- nothing is copied for the two directions of the cross-attention (tokens are stacked as rows, split
  as contiguous blocks).

Use a fused optimizer (``torch.optim.AdamW(..., fused=True)``) with it; ``torch.compile(model)`` works too.

Shapes: ``B`` batch, ``L`` tokens, ``V`` regions (36), ``H`` hidden (768), ``F`` region feature size
(2048). Boxes (``visual_pos``) are ``(B, V, 4)`` x1, y1, x2, y2 divided by the image width / height
(values in [0, 1]). Masks are 1 = attend, 0 = padding.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.cpu import cpu_autocast_warning

from .config import LxmertConfig

logger = logging.getLogger(__name__)

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------
class _Output:
    """Dataclass outputs that also index like Hugging Face's ``ModelOutput`` (``out[0]``, ``out["loss"]``)."""

    def to_tuple(self) -> tuple[Any, ...]:
        """The non-``None`` fields in declaration order (Hugging Face's ``return_dict=False`` tuple)."""
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


@dataclass
class LxmertModelOutput(_Output):
    """Backbone outputs.

    - ``language_output`` ``(B, L, H)``, ``vision_output`` ``(B, V, H)``: last cross-modality layer.
    - ``pooled_output`` ``(B, H)``: tanh(Linear(first language token)).
    - ``language_hidden_states``: output of each language layer then each cross-modality layer (lang side);
      ``vision_hidden_states``: each relationship layer then each cross-modality layer (vision side).
    - ``language_attentions`` / ``vision_attentions`` / ``cross_encoder_attentions``: softmax probabilities
      ``(B, heads, Lq, Lk)`` per layer (cross: language queries over regions), when asked for.
    """

    language_output: Tensor | None = None
    vision_output: Tensor | None = None
    pooled_output: Tensor | None = None
    language_hidden_states: tuple[Tensor, ...] | None = None
    vision_hidden_states: tuple[Tensor, ...] | None = None
    language_attentions: tuple[Tensor, ...] | None = None
    vision_attentions: tuple[Tensor, ...] | None = None
    cross_encoder_attentions: tuple[Tensor, ...] | None = None


@dataclass
class LxmertForPreTrainingOutput(_Output):
    """Pretraining outputs (Hugging Face field names, plus ``masked_lm_index`` and ``losses``).

    - ``loss``: scalar, sum of the enabled task losses (``None`` without any labels).
    - ``prediction_logits``: ``(B, L, vocab)`` over all tokens, or, when MLM ran only at labelled
      positions, ``(N, vocab)`` at the flat token indices ``masked_lm_index`` ``(N,)`` into ``B * L``.
    - ``cross_relationship_score`` ``(B, 2)``: matching logits (1 = sentence matches the image).
    - ``question_answering_score`` ``(B, num_qa_labels)``.
    - ``losses``: the individual (undetached) task losses by name: ``mlm``, ``matched``, ``obj``, ``attr``,
      ``feat``, ``qa``.
    """

    loss: Tensor | None = None
    prediction_logits: Tensor | None = None
    cross_relationship_score: Tensor | None = None
    question_answering_score: Tensor | None = None
    language_hidden_states: tuple[Tensor, ...] | None = None
    vision_hidden_states: tuple[Tensor, ...] | None = None
    language_attentions: tuple[Tensor, ...] | None = None
    vision_attentions: tuple[Tensor, ...] | None = None
    cross_encoder_attentions: tuple[Tensor, ...] | None = None
    masked_lm_index: Tensor | None = None
    losses: dict[str, Tensor] | None = None


@dataclass
class LxmertForQuestionAnsweringOutput(_Output):
    """QA outputs: ``question_answering_score`` ``(B, num_qa_labels)`` and the optional loss / states."""

    loss: Tensor | None = None
    question_answering_score: Tensor | None = None
    language_hidden_states: tuple[Tensor, ...] | None = None
    vision_hidden_states: tuple[Tensor, ...] | None = None
    language_attentions: tuple[Tensor, ...] | None = None
    vision_attentions: tuple[Tensor, ...] | None = None
    cross_encoder_attentions: tuple[Tensor, ...] | None = None


@dataclass
class LxmertForNLVR2Output(_Output):
    """NLVR2 outputs: ``logits`` ``(B, 2)`` (1 = the sentence is true of the image pair) and the loss."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    pooled_output: Tensor | None = None


# --------------------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------------------
def compute_dtype(reference: Tensor) -> torch.dtype:
    """The dtype activations take: the autocast dtype when autocast is on for ``reference``'s device."""
    device_type = reference.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return reference.dtype


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


def additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``(B, S)`` 1/0 mask -> ``(B, 1, 1, S)`` additive mask (0 / most negative finite ``dtype`` value).

    Returns ``None`` for ``None`` or an all-ones mask (no masking: the faster attention path).
    """
    if mask is None:
        return None
    if not torch.compiler.is_compiling() and bool(mask.all()):
        return None
    return ((1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min).to(dtype)


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


def fast_dropout(x: Tensor, p: float, training: bool) -> Tensor:
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


class LxmertDropout(nn.Module):
    """``nn.Dropout`` with :func:`fast_dropout` (no parameters; state dicts are unaffected)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return fast_dropout(x, self.p, self.training)

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


class LxmertLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same names) computed by :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


# --------------------------------------------------------------------------------------------------------------
# Tied word embeddings / MLM decoder with one dense gradient
# --------------------------------------------------------------------------------------------------------------
class _TiedGradient:
    """Carries the MLM decoder's dense weight gradient to the word-embedding lookup's backward (one graph)."""

    def __init__(self) -> None:
        self.grad: Tensor | None = None


class _TiedLookup(torch.autograd.Function):
    """Word-embedding lookup (``padding_idx`` 0) whose backward adds its rows into the decoder's dense gradient.

    The lookup's backward runs after the decoder's (the decoder depends on it), so the tied matrix gets ONE
    dense, contiguous gradient: no sparse rows, no second vocab x H buffer, no copy when the two are summed.
    Without a decoder gradient (only other losses back-propagated) the rows go into a zero matrix.
    """

    @staticmethod
    def forward(ctx: Any, input_ids: Tensor, weight: Tensor, tied: _TiedGradient) -> Tensor:
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
    """``h @ W.T + b`` for the tied decoder; ``W``'s gradient goes to the :class:`_TiedLookup` of the same step.

    Computes in ``dtype`` (float32, or bf16 under autocast for many rows); the weight gradient is float32.
    """

    @staticmethod
    def forward(
        ctx: Any, h: Tensor, weight: Tensor, bias: Tensor, tied: _TiedGradient, dtype: torch.dtype
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
# Packed language tokens
# --------------------------------------------------------------------------------------------------------------
class LanguagePacking:
    """The real (unpadded) tokens of a ``(B, L)`` batch stored as rows ``(T, H)``, T = number of real tokens.

    Row-wise work (projections, feed-forward, LayerNorm, dropout) then skips the padding; attention pads
    its queries / keys / values back to ``(B, L, H)`` (zeros at padding, which the additive mask hides
    exactly as before: a padded key gets weight 0, and nothing else reads a padded position). Used when the
    caller only needs language outputs at real tokens (pretraining with MLM labels, task heads on [CLS]).
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
        """Packed rows of flat ``B * L`` indices (which must be real tokens)."""
        return self._row.index_select(0, flat)

    def covers(self, flat: Tensor) -> bool:
        """Whether every flat index is a real token."""
        return bool((self.rows(flat) >= 0).all())


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------
class LxmertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout: ``(B, L)`` ids -> ``(B, L, H)``."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(
            config.max_position_embeddings, config.hidden_size, padding_idx=0
        )
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = LxmertDropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: Tensor | None,
        token_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        seq_len = inputs_embeds.shape[1]
        position_ids = torch.arange(seq_len, device=inputs_embeds.device)
        x = inputs_embeds + self.position_embeddings(position_ids)[None]
        if token_type_ids is None:
            token_type_ids = torch.zeros(
                inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device
            )
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class LxmertAttention(nn.Module):
    """Multi-head attention projections (``query`` from one side, ``key``/``value`` from the context).

    ``forward(hidden_states (B, Lq, H), context (B, Lk, H), mask (B, 1, 1, Lk) additive or None)``
    returns ``(B, Lq, H)`` and the ``(B, heads, Lq, Lk)`` probabilities when ``output_attentions``.
    """

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_dim
        self.query = LxmertLinear(config.hidden_size, config.hidden_size)
        self.key = LxmertLinear(config.hidden_size, config.hidden_size)
        self.value = LxmertLinear(config.hidden_size, config.hidden_size)
        self.dropout_prob = config.attention_probs_dropout_prob

    def _heads(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, output_attentions: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Attention over projected ``(B, S, H)`` q / k / v; returns ``(B, Sq, H)`` and optional probs.

        Fused ``scaled_dot_product_attention`` where it is the fast kernel (CUDA; CPU fp32 without dropout);
        on CPU with dropout or in bf16 the explicit softmax path with :func:`fast_dropout` is faster for
        LXMERT's short sequences. Same math either way.
        """
        ctx, probs = self.core(self._heads(q), self._heads(k), self._heads(v), mask, output_attentions)
        b, _, s, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, s, -1), probs

    def core(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, output_attentions: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Head-split ``(B, heads, S, d)`` q / k / v -> context ``(B, heads, Sq, d)`` and optional probs."""
        if mask is not None and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        dropout = self.dropout_prob if self.training else 0.0
        fused = q.device.type != "cpu" or (dropout == 0.0 and q.dtype == torch.float32)
        if output_attentions or not fused:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
            if mask is not None:
                scores = scores + mask
            probs = scores.softmax(dim=-1)
            ctx = torch.matmul(fast_dropout(probs, dropout, self.training).to(v.dtype), v)
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
            probs = None
        return ctx, probs if output_attentions else None

    def forward(
        self,
        hidden_states: Tensor,
        context: Tensor,
        attention_mask: Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        return self.attend(
            self.query(hidden_states),
            self.key(context),
            self.value(context),
            attention_mask,
            output_attentions,
        )


class LxmertResidualOutput(nn.Module):
    """Projection to the hidden size, dropout, residual LayerNorm: ``LN(dropout(dense(x)) + input)``."""

    def __init__(self, config: LxmertConfig, in_features: int) -> None:
        super().__init__()
        self.dense = LxmertLinear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = LxmertDropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class LxmertAttentionOutput(LxmertResidualOutput):
    """Attention output projection (hidden -> hidden) with residual LayerNorm."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__(config, config.hidden_size)


class LxmertSelfAttentionLayer(nn.Module):
    """Self-attention block: ``(B, S, H)`` -> ``(B, S, H)`` (+ probabilities when asked)."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.self = LxmertAttention(config)
        self.output = LxmertAttentionOutput(config)

    def forward(
        self,
        input_tensor: Tensor,
        attention_mask: Tensor | None,
        output_attentions: bool = False,
        packing: LanguagePacking | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``(B, S, H)`` -> ``(B, S, H)``; with ``packing``, ``(T, H)`` packed rows -> ``(T, H)``."""
        if packing is None:
            ctx, probs = self.self(input_tensor, input_tensor, attention_mask, output_attentions)
            return self.output(ctx, input_tensor), probs
        att = self.self
        q, k, v = (packing.pad(proj(input_tensor)) for proj in (att.query, att.key, att.value))
        ctx, _ = att.attend(q, k, v, attention_mask)
        return self.output(packing.pack(ctx), input_tensor), None

    def forward_rows(
        self,
        input_tensor: Tensor,
        attention_mask: Tensor | None,
        rows: Tensor,
        packing: LanguagePacking | None = None,
    ) -> Tensor:
        """Only the outputs at flat ``rows`` (N,) of ``input_tensor`` (B, S, H) (or its packed ``(T, H)``
        rows, with ``packing``; ``rows`` are flat ``B * S`` indices either way): ``(N, H)``.

        Keys and values still come from every token of each row's sequence; queries, the output projection
        and the residual only from the requested rows.
        """
        att = self.self
        if packing is None:
            n, hidden = input_tensor.shape[1:]
            picked = input_tensor.reshape(-1, hidden).index_select(0, rows)
            k, v = att._heads(att.key(input_tensor)), att._heads(att.value(input_tensor))
        else:
            n, hidden = packing.length, input_tensor.shape[-1]
            picked = input_tensor.index_select(0, packing.rows(rows))
            k = att._heads(packing.pad(att.key(input_tensor)))
            v = att._heads(packing.pad(att.value(input_tensor)))
        sample = torch.div(rows, n, rounding_mode="floor")
        q = att.query(picked).view(-1, 1, att.num_attention_heads, att.attention_head_size).transpose(1, 2)
        k, v = k.index_select(0, sample), v.index_select(0, sample)
        mask = None if attention_mask is None else attention_mask.index_select(0, sample)
        ctx, _ = att.core(q, k, v, mask)
        return self.output(ctx.reshape(-1, hidden), picked)


class LxmertCrossAttentionLayer(nn.Module):
    """Cross-attention block, applied in both directions with the same weights (``XLayer.visual_attention``)."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.att = LxmertAttention(config)
        self.output = LxmertAttentionOutput(config)

    def forward(
        self,
        input_tensor: Tensor,
        ctx_tensor: Tensor,
        ctx_att_mask: Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """One direction: ``input_tensor`` (B, Sq, H) attends over ``ctx_tensor`` (B, Sk, H)."""
        ctx, probs = self.att(input_tensor, ctx_tensor, ctx_att_mask, output_attentions)
        return self.output(ctx, input_tensor), probs

    def language_only(
        self, lang: Tensor, visn: Tensor, visn_mask: Tensor | None, packing: LanguagePacking | None = None
    ) -> Tensor:
        """Only the language side of :meth:`both_directions` (for a last layer whose vision side is unread):
        queries from ``lang`` (B, L, H) (or packed ``(T, H)``), keys / values from ``visn`` (B, V, H)."""
        att = self.att
        hidden = visn.shape[-1]
        lang_rows = lang.reshape(-1, hidden)
        q = att.query(lang_rows)
        q = q.view(lang.shape) if packing is None else packing.pad(q)
        ctx, _ = att.attend(q, att.key(visn), att.value(visn), visn_mask)
        ctx = ctx.reshape(-1, hidden) if packing is None else packing.pack(ctx)
        return self.output(ctx, lang_rows).view(lang.shape)

    def both_directions(
        self,
        lang: Tensor,
        lang_mask: Tensor | None,
        visn: Tensor,
        visn_mask: Tensor | None,
        output_attentions: bool = False,
        packing: LanguagePacking | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Language attends to vision and vision to language, sharing every projection.

        ``lang`` (B, L, H) (or packed ``(T, H)`` rows with ``packing``), ``visn`` (B, V, H); masks additive
        ``(B, 1, 1, S)`` or None. The projections run once over all language + vision tokens stacked as rows
        (so every split is a contiguous block, with no copies). Returns the new ``lang`` (same layout as
        given), ``visn`` and the language->vision probabilities when asked.
        """
        b, n_visn, hidden = visn.shape
        lang_rows = lang.reshape(-1, hidden)
        sizes = [lang_rows.shape[0], b * n_visn]
        both = torch.cat([lang_rows, visn.reshape(-1, hidden)])
        att = self.att
        q_l, q_v = att.query(both).split(sizes)
        k_l, k_v = att.key(both).split(sizes)
        v_l, v_v = att.value(both).split(sizes)

        def visn_seq(x: Tensor) -> Tensor:
            return x.view(b, n_visn, -1)

        def lang_seq(x: Tensor) -> Tensor:
            return x.view(lang.shape) if packing is None else packing.pad(x)

        lang_ctx, probs = att.attend(
            lang_seq(q_l), visn_seq(k_v), visn_seq(v_v), visn_mask, output_attentions
        )
        visn_ctx, _ = att.attend(visn_seq(q_v), lang_seq(k_l), lang_seq(v_l), lang_mask)
        lang_ctx = lang_ctx.reshape(-1, hidden) if packing is None else packing.pack(lang_ctx)
        ctx = torch.cat([lang_ctx, visn_ctx.reshape(-1, hidden)])
        lang_out, visn_out = self.output(ctx, both).split(sizes)
        return lang_out.view(lang.shape), visn_seq(visn_out), probs


class LxmertIntermediate(nn.Module):
    """Feed-forward expansion: ``act(dense(x))``, ``(B, S, H)`` -> ``(B, S, intermediate_size)``."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.dense = LxmertLinear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = _ACTIVATIONS[config.hidden_act]

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class LxmertOutput(LxmertResidualOutput):
    """Feed-forward contraction (intermediate -> hidden) with residual LayerNorm."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__(config, config.intermediate_size)


class LxmertLayer(nn.Module):
    """A BERT layer (language or object-relationship encoder): self-attention then feed-forward."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.attention = LxmertSelfAttentionLayer(config)
        self.intermediate = LxmertIntermediate(config)
        self.output = LxmertOutput(config)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        output_attentions: bool = False,
        packing: LanguagePacking | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        x, probs = self.attention(hidden_states, attention_mask, output_attentions, packing)
        return self.output(self.intermediate(x), x), probs


class LxmertXLayer(nn.Module):
    """Cross-modality layer: shared cross-attention (both directions), self-attention and FFN per modality."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.visual_attention = LxmertCrossAttentionLayer(config)
        self.lang_self_att = LxmertSelfAttentionLayer(config)
        self.visn_self_att = LxmertSelfAttentionLayer(config)
        self.lang_inter = LxmertIntermediate(config)
        self.lang_output = LxmertOutput(config)
        self.visn_inter = LxmertIntermediate(config)
        self.visn_output = LxmertOutput(config)

    def forward(
        self,
        lang_feats: Tensor,
        lang_attention_mask: Tensor | None,
        visual_feats: Tensor,
        visual_attention_mask: Tensor | None,
        output_attentions: bool = False,
        lang_rows: Tensor | None = None,
        packing: LanguagePacking | None = None,
        vision: bool = True,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(B, L, H)``, ``(B, V, H)`` -> same shapes, plus the language->vision probabilities when asked.

        ``lang_rows`` (N,) flat indices into ``B * L``: compute the language side after the cross-attention
        only there; the language output is then ``(N, H)``. ``packing``: the language side is given (and
        returned) as packed ``(T, H)`` rows. ``vision=False``: the vision side is not computed (returned as
        None; the language side needs only the incoming vision states).
        """
        if vision:
            lang, visn, probs = self.visual_attention.both_directions(
                lang_feats,
                lang_attention_mask,
                visual_feats,
                visual_attention_mask,
                output_attentions,
                packing,
            )
        else:
            lang = self.visual_attention.language_only(
                lang_feats, visual_feats, visual_attention_mask, packing
            )
            visn = probs = None
        if lang_rows is None:
            lang, _ = self.lang_self_att(lang, lang_attention_mask, packing=packing)
        else:
            lang = self.lang_self_att.forward_rows(lang, lang_attention_mask, lang_rows, packing)
        lang = self.lang_output(self.lang_inter(lang), lang)
        if visn is not None:
            visn, _ = self.visn_self_att(visn, visual_attention_mask)
            visn = self.visn_output(self.visn_inter(visn), visn)
        return lang, visn, probs


class LxmertVisualFeatureEncoder(nn.Module):
    """Regions to hidden size: ``(LN(fc(feats)) + LN(fc(boxes))) / 2``, dropout.

    ``visual_feats`` (B, V, F), ``visual_pos`` (B, V, 4) boxes x1,y1,x2,y2 in [0, 1] -> ``(B, V, H)``.
    """

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.visn_fc = LxmertLinear(config.visual_feat_dim, config.hidden_size)
        self.visn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.box_fc = LxmertLinear(config.visual_pos_dim, config.hidden_size)
        self.box_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = LxmertDropout(config.hidden_dropout_prob)

    def forward(self, visual_feats: Tensor, visual_pos: Tensor) -> Tensor:
        x = self.visn_layer_norm(self.visn_fc(visual_feats))
        y = self.box_layer_norm(self.box_fc(visual_pos))
        return self.dropout((x + y) / 2)


class LxmertEncoder(nn.Module):
    """Language layers (``layer``), relationship layers (``r_layers``), then cross-modality (``x_layers``)."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.visn_fc = LxmertVisualFeatureEncoder(config)
        self.layer = nn.ModuleList([LxmertLayer(config) for _ in range(config.l_layers)])
        self.x_layers = nn.ModuleList([LxmertXLayer(config) for _ in range(config.x_layers)])
        self.r_layers = nn.ModuleList([LxmertLayer(config) for _ in range(config.r_layers)])

    def forward(
        self,
        lang_feats: Tensor,
        lang_attention_mask: Tensor | None,
        visual_feats: Tensor,
        visual_pos: Tensor,
        visual_attention_mask: Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        lang_rows: Tensor | None = None,
        packing: LanguagePacking | None = None,
        vision_output: bool = True,
    ) -> LxmertModelOutput:
        """Embedded tokens ``(B, L, H)`` and raw regions ``(B, V, F)``, ``(B, V, 4)``; additive masks.

        ``lang_rows``: see :meth:`LxmertXLayer.forward` (applies to the last cross-modality layer).
        ``packing``: ``lang_feats`` are packed ``(T, H)`` rows, and so are the language states.
        ``vision_output=False``: the last cross-modality layer skips its vision side (``vision_output`` None).
        """
        lang_states: list[Tensor] = []
        visn_states: list[Tensor] = []
        lang_atts: list[Tensor] = []
        visn_atts: list[Tensor] = []
        cross_atts: list[Tensor] = []
        lang = lang_feats
        visn = self.visn_fc(visual_feats, visual_pos)
        for layer in self.layer:
            lang, probs = layer(lang, lang_attention_mask, output_attentions, packing)
            lang_states.append(lang)
            lang_atts.append(probs)
        for layer in self.r_layers:
            visn, probs = layer(visn, visual_attention_mask, output_attentions)
            visn_states.append(visn)
            visn_atts.append(probs)
        last = len(self.x_layers) - 1
        for i, layer in enumerate(self.x_layers):
            rows = lang_rows if i == last else None
            lang, visn, probs = layer(
                lang,
                lang_attention_mask,
                visn,
                visual_attention_mask,
                output_attentions,
                rows,
                packing,
                vision=vision_output or i != last,
            )
            lang_states.append(lang)
            visn_states.append(visn)
            cross_atts.append(probs)
        return LxmertModelOutput(
            language_output=lang,
            vision_output=visn,
            language_hidden_states=tuple(lang_states) if output_hidden_states else None,
            vision_hidden_states=tuple(visn_states) if output_hidden_states else None,
            language_attentions=tuple(lang_atts) if output_attentions else None,
            vision_attentions=tuple(visn_atts) if output_attentions else None,
            cross_encoder_attentions=tuple(cross_atts) if output_attentions else None,
        )


class LxmertPooler(nn.Module):
    """``tanh(dense(first token))``: ``(B, L, H)`` -> ``(B, H)``."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.dense = LxmertLinear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class LxmertPredictionHeadTransform(nn.Module):
    """``LN(act(dense(x)))`` on the last dimension (``H`` -> ``H``)."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.dense = LxmertLinear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = _ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class LxmertLMPredictionHead(nn.Module):
    """MLM head: transform then ``decoder`` (tied to the word embeddings) plus a per-token ``bias``."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.transform = LxmertPredictionHeadTransform(config)
        self.decoder = LxmertLinear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: Tensor, tied: _TiedGradient | None = None) -> Tensor:
        """``(..., H)`` -> ``(..., vocab)`` logits. ``tied``: the decoder's weight gradient goes to the
        word-embedding lookup of the same step (:class:`_TiedLookup`)."""
        h = self.transform(hidden_states)
        if tied is None:
            return linear(h, self.decoder.weight, self.bias)
        dtype = torch.float32
        if torch.is_autocast_enabled(h.device.type) and h.numel() > CPU_FP32_MAX_ROWS * h.shape[-1]:
            dtype = torch.get_autocast_dtype(h.device.type)
        return _TiedDecoder.apply(h, self.decoder.weight, self.bias, tied, dtype)


class LxmertPreTrainingHeads(nn.Module):
    """``predictions`` (MLM) and ``seq_relationship`` (2-way matching on the pooled output)."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.predictions = LxmertLMPredictionHead(config)
        self.seq_relationship = LxmertLinear(config.hidden_size, 2)

    def forward(self, sequence_output: Tensor, pooled_output: Tensor) -> tuple[Tensor, Tensor]:
        return self.predictions(sequence_output), self.seq_relationship(pooled_output)


class GeLU(nn.Module):
    """Exact (erf) GeLU as a module, so ``logit_fc`` keeps the original indices 0, 2, 3."""

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x)


class LxmertVisualAnswerHead(nn.Module):
    """Answer head ``logit_fc``: Linear(in, 2H) -> GeLU -> LayerNorm -> Linear(2H, num_labels).

    ``in_dim`` is ``H`` for QA (pooled output) and ``2H`` for NLVR2 (two pooled outputs concatenated).
    """

    def __init__(self, config: LxmertConfig, num_labels: int, in_dim: int | None = None) -> None:
        super().__init__()
        hid = config.hidden_size * 2
        self.logit_fc = nn.Sequential(
            LxmertLinear(in_dim or config.hidden_size, hid),
            GeLU(),
            nn.LayerNorm(hid, eps=config.layer_norm_eps),
            LxmertLinear(hid, num_labels),
        )

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.logit_fc(hidden_states)


class LxmertVisualObjHead(nn.Module):
    """Masked-object heads on the vision output: ``decoder_dict`` ``obj`` (1600), ``attr`` (400), ``feat`` (F)."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.transform = LxmertPredictionHeadTransform(config)
        sizes = {}
        if config.visual_obj_loss:
            sizes["obj"] = config.num_object_labels
        if config.visual_attr_loss:
            sizes["attr"] = config.num_attr_labels
        if config.visual_feat_loss:
            sizes["feat"] = config.visual_feat_dim
        self.decoder_dict = nn.ModuleDict({k: LxmertLinear(config.hidden_size, n) for k, n in sizes.items()})

    def forward(self, hidden_states: Tensor) -> dict[str, Tensor]:
        """``(B, V, H)`` -> ``{"obj": (B, V, 1600), "attr": (B, V, 400), "feat": (B, V, F)}``."""
        h = self.transform(hidden_states)
        return {k: dec(h) for k, dec in self.decoder_dict.items()}


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------
class LxmertPreTrainedModel(nn.Module):
    """Shared plumbing: config, weight initialisation, ``from_pretrained`` / ``save_pretrained``."""

    #: The Hugging Face class name written to ``config.json`` ``architectures``.
    hf_architecture = "LxmertModel"
    #: Prefix of the backbone inside this model's state dict ("" for the bare backbone).
    backbone_prefix = "lxmert."

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.config = config
        self.load_report = None

    def init_weights(self) -> None:
        """BERT initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorm, zero pad rows."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LxmertLMPredictionHead):
                nn.init.zeros_(module.bias)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Tie output and input embeddings where the model has both (no-op otherwise)."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: LxmertConfig | None = None,
        map_location: str | torch.device = "cpu",
        **config_overrides: Any,
    ) -> LxmertPreTrainedModel:
        """Load any LXMERT checkpoint (format detected; see :mod:`model.checkpoint`).

        ``path``: a directory (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``: ours or Hugging
        Face's) or one file (original ``model_LXRT.pth`` / ``EpochNN_LXRT.pth`` / fine-tuned ``BEST.pth``, a
        ``.safetensors`` or ``.bin``). ``config``: overrides the checkpoint's config; ``config_overrides``:
        single fields (e.g. ``num_qa_labels=3129``). The load report is kept in ``model.load_report`` and
        logged; a backbone that does not load completely raises ``ValueError``.
        """
        from .checkpoint import load_pretrained

        return load_pretrained(cls, path, config=config, map_location=map_location, **config_overrides)

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` in Hugging Face's layout; returns the directory."""
        from .checkpoint import save_pretrained

        return save_pretrained(self, save_directory)


class LxmertModel(LxmertPreTrainedModel):
    """The LXMERT backbone: embeddings, encoders and pooler (keys without prefix, as Hugging Face's)."""

    hf_architecture = "LxmertModel"
    backbone_prefix = ""

    def __init__(self, config: LxmertConfig | None = None) -> None:
        super().__init__(config or LxmertConfig())
        self.embeddings = LxmertEmbeddings(self.config)
        self.encoder = LxmertEncoder(self.config)
        self.pooler = LxmertPooler(self.config)
        self.init_weights()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def forward(
        self,
        input_ids: Tensor | None = None,
        visual_feats: Tensor | None = None,
        visual_pos: Tensor | None = None,
        attention_mask: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        language_rows: Tensor | None = None,
        vision_output: bool = True,
    ) -> LxmertModelOutput | tuple[Tensor, ...]:
        """``input_ids`` (B, L) WordPiece ids (or ``inputs_embeds`` (B, L, H)); ``visual_feats`` (B, V, F);
        ``visual_pos`` (B, V, 4) boxes in [0, 1]; ``attention_mask`` (B, L) and ``visual_attention_mask``
        (B, V) with 1 = keep; ``token_type_ids`` (B, L). Returns :class:`LxmertModelOutput`.

        ``language_rows`` (N,) (advanced, used by pretraining): flat indices into ``B * L`` of the only
        language positions needed; the last cross-modality layer then computes its language side only at
        the B [CLS] rows and these, and ``language_output`` is ``(B + N, H)``: the [CLS] rows, then these.
        On CPU, with padding in ``attention_mask`` and all these rows real tokens, the language side then also
        skips the padded tokens throughout (:class:`LanguagePacking`); the outputs are the same.

        ``vision_output=False`` (advanced, used by the QA / NLVR2 heads, which read only the pooled output):
        the last cross-modality layer skips its vision side and ``vision_output`` is None. Ignored when
        hidden states or attentions are asked for.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LxmertModel: give exactly one of input_ids (B, L) or inputs_embeds (B, L, H)")
        if visual_feats is None or visual_pos is None:
            raise ValueError("LxmertModel: visual_feats (B, V, F) and visual_pos (B, V, 4) are required")
        if visual_feats.shape[:2] != visual_pos.shape[:2]:
            raise ValueError(
                f"LxmertModel: visual_feats {tuple(visual_feats.shape)} and visual_pos {tuple(visual_pos.shape)} "
                "disagree on (batch, regions)"
            )
        warn_if_slow_cpu_autocast(visual_feats.device)
        embedding = self.embeddings(input_ids, token_type_ids, inputs_embeds)
        dtype = compute_dtype(embedding)
        lang_mask = additive_mask(attention_mask, dtype)
        visn_mask = additive_mask(visual_attention_mask, dtype)
        rows = None
        if language_rows is not None and self.config.x_layers > 0:
            b, seq = embedding.shape[:2]
            cls_rows = torch.arange(b, device=embedding.device) * seq
            rows = torch.cat([cls_rows, language_rows.to(cls_rows.device)])
        elif language_rows is not None:
            raise ValueError(
                "LxmertModel: language_rows needs at least one cross-modality layer (x_layers > 0)"
            )
        packing = None
        if (
            rows is not None
            and lang_mask is not None
            and embedding.device.type == "cpu"
            and not output_hidden_states
            and not output_attentions
            and not torch.compiler.is_compiling()
        ):
            # Only real tokens are read at the end: skip the padding in every row-wise op (CPU: there the
            # work is the time; on a GPU the extra index ops would cost more launches than they save).
            packing = LanguagePacking(attention_mask)
            if packing.covers(rows):
                embedding = packing.pack(embedding)
            else:
                packing = None
        out = self.encoder(
            embedding,
            lang_mask,
            visual_feats,
            visual_pos,
            visn_mask,
            output_attentions=bool(output_attentions),
            output_hidden_states=bool(output_hidden_states),
            lang_rows=rows,
            packing=packing,
            vision_output=vision_output or bool(output_hidden_states) or bool(output_attentions),
        )
        if rows is None:
            out.pooled_output = self.pooler(out.language_output)
        else:
            out.pooled_output = self.pooler.activation(
                self.pooler.dense(out.language_output[: visual_feats.shape[0]])
            )
        return out.to_tuple() if return_dict is False else out


def _cls_only_rows(config: LxmertConfig, output_hidden_states: Any, output_attentions: Any) -> Tensor | None:
    """``language_rows`` for a head that reads only [CLS] (none beyond it), or None when all outputs are wanted."""
    if config.x_layers == 0 or output_hidden_states or output_attentions:
        return None
    return torch.empty(0, dtype=torch.long)  # LxmertModel moves it to the inputs' device


def _masked_mean_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over targets != -100 (0 when there are none, where torch gives NaN)."""
    total = F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="sum")
    count = (target != -100).sum().clamp(min=1)
    return total / count


class LxmertForPreTraining(LxmertPreTrainedModel):
    """LXMERT with its pretraining heads: MLM, cross-modality matching, masked-object (obj / attr / feat), QA."""

    hf_architecture = "LxmertForPreTraining"

    def __init__(self, config: LxmertConfig | None = None) -> None:
        super().__init__(config or LxmertConfig())
        config = self.config
        self.lxmert = LxmertModel(config)
        self.cls = LxmertPreTrainingHeads(config)
        if config.task_obj_predict:
            self.obj_predict_head = LxmertVisualObjHead(config)
        if config.task_qa:
            self.answer_head = LxmertVisualAnswerHead(config, config.num_qa_labels)
        self.init_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.cls.predictions.decoder.weight = self.lxmert.embeddings.word_embeddings.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.lxmert.embeddings.word_embeddings

    def forward(
        self,
        input_ids: Tensor | None = None,
        visual_feats: Tensor | None = None,
        visual_pos: Tensor | None = None,
        attention_mask: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        obj_labels: dict[str, tuple[Tensor, Tensor]] | None = None,
        matched_label: Tensor | None = None,
        ans: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        full_mlm_logits: bool | None = None,
    ) -> LxmertForPreTrainingOutput | tuple[Tensor, ...]:
        """Backbone inputs as :meth:`LxmertModel.forward`, plus the pretraining labels (Hugging Face's):

        - ``labels`` (B, L): MLM targets, -100 = not predicted.
        - ``obj_labels``: ``{"obj": (ids (B, V), weight (B, V)), "attr": (ids, weight),
          "feat": (features (B, V, F), weight (B, V))}``; each loss is the weighted mean over all B * V
          regions times ``visual_loss_normalizer`` (the original weights obj / attr by detector confidence).
        - ``matched_label`` (B,): 1 = sentence matches the image. ``ans`` (B,): answer index, -100 = none.
        - ``full_mlm_logits``: ``None`` (default) computes vocabulary logits at every token without
          ``labels`` and only at labelled tokens with them (``prediction_logits`` (N, vocab) then, with
          ``masked_lm_index``); ``True`` forces full ``(B, L, vocab)`` logits.

        With MLM labels (and no hidden states / attentions asked for) the last cross-modality layer computes
        its language side only at [CLS] and the labelled tokens, which is all the losses use. On CPU the
        tied word-embedding / decoder matrix gets one dense gradient (the lookup's rows added into the decoder's),
        whichever losses are back-propagated.
        """
        config = self.config
        use_labels = labels is not None and config.task_mask_lm
        word_embeddings = self.lxmert.embeddings.word_embeddings
        tied = None
        if (
            use_labels
            and not full_mlm_logits
            and input_ids is not None
            and inputs_embeds is None
            and input_ids.device.type == "cpu"
            and self.cls.predictions.decoder.weight is word_embeddings.weight
            and torch.is_grad_enabled()
            and word_embeddings.weight.requires_grad
            and not torch.compiler.is_compiling()
        ):
            # One dense gradient for the tied matrix: the decoder's, with the lookup's rows added in place (see
            # _TiedLookup), instead of two vocab x H gradients summed (costly on CPU).
            tied = _TiedGradient()
            inputs_embeds = _TiedLookup.apply(input_ids, word_embeddings.weight, tied)
            input_ids = None
        masked_index = None
        prune = False
        if use_labels and not full_mlm_logits:
            flat_labels = labels.reshape(-1)
            masked_index = (flat_labels != -100).nonzero().squeeze(1)
            # Only [CLS] (pooler) and the labelled tokens (MLM) of the last layer's language side are used.
            prune = config.x_layers > 0 and not output_hidden_states and not output_attentions
        out = self.lxmert(
            input_ids=input_ids,
            visual_feats=visual_feats,
            visual_pos=visual_pos,
            attention_mask=attention_mask,
            visual_attention_mask=visual_attention_mask,
            token_type_ids=token_type_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            language_rows=masked_index if prune else None,
        )
        lang, visn, pooled = out.language_output, out.vision_output, out.pooled_output
        losses: dict[str, Tensor] = {}

        # Masked LM: the vocabulary projection only where a label asks for it, unless full logits are wanted.
        mlm_head = self.cls.predictions
        if masked_index is not None:
            if prune:
                masked_states = lang[pooled.shape[0] :]
            else:
                masked_states = lang.reshape(-1, lang.shape[-1]).index_select(0, masked_index)
            prediction_logits = mlm_head(masked_states, tied)
            losses["mlm"] = _masked_mean_ce(prediction_logits, flat_labels.index_select(0, masked_index))
        else:
            prediction_logits = mlm_head(lang)
            if use_labels:
                losses["mlm"] = _masked_mean_ce(
                    prediction_logits.reshape(-1, config.vocab_size), labels.reshape(-1)
                )

        match_score = self.cls.seq_relationship(pooled)
        if matched_label is not None and config.task_matched:
            losses["matched"] = _masked_mean_ce(match_score.view(-1, 2), matched_label.reshape(-1))

        if obj_labels is not None and config.task_obj_predict:
            losses.update(self._visual_losses(visn, obj_labels))

        if config.task_qa:
            answer_score = self.answer_head(pooled)
            if ans is not None:
                losses["qa"] = _masked_mean_ce(answer_score.view(-1, config.num_qa_labels), ans.reshape(-1))
        else:
            answer_score = pooled[0][0]

        total = None
        if labels is not None or matched_label is not None or obj_labels is not None or ans is not None:
            total = torch.zeros((), device=pooled.device)
            for value in losses.values():
                total = total + value
        result = LxmertForPreTrainingOutput(
            loss=total,
            prediction_logits=prediction_logits,
            cross_relationship_score=match_score,
            question_answering_score=answer_score,
            language_hidden_states=out.language_hidden_states,
            vision_hidden_states=out.vision_hidden_states,
            language_attentions=out.language_attentions,
            vision_attentions=out.vision_attentions,
            cross_encoder_attentions=out.cross_encoder_attentions,
            masked_lm_index=masked_index,
            losses=losses or None,
        )
        return result.to_tuple() if return_dict is False else result

    def _visual_losses(self, visn: Tensor, obj_labels: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """Weighted obj / attr CE and feature SmoothL1 on ``visn`` (B, V, H); see :meth:`forward`."""
        head = self.obj_predict_head
        missing = [k for k in head.decoder_dict if k not in obj_labels]
        if missing:
            raise ValueError(
                f"LxmertForPreTraining: obj_labels lacks {missing}; give (labels, weights) for each of "
                f"{list(head.decoder_dict)} or disable them in the config (visual_*_loss)"
            )
        h = head.transform(visn.reshape(-1, visn.shape[-1]))
        n = h.shape[0]
        weight = self.config.visual_loss_normalizer
        out = {}
        for key, decoder in head.decoder_dict.items():
            label, conf = obj_labels[key]
            conf = conf.reshape(-1)
            if key == "feat":
                # Regression only where the weight is non-zero (the masked regions); the mean stays over all n.
                keep = (conf != 0).nonzero().squeeze(1)
                pred = decoder(h.index_select(0, keep)).float()
                target = label.reshape(n, -1).index_select(0, keep).to(pred.dtype)
                per_region = F.smooth_l1_loss(pred, target, reduction="none").mean(1)
                out[key] = (per_region * conf.index_select(0, keep)).sum() / n * weight
            else:
                logits = decoder(h).float()
                per_region = F.cross_entropy(logits, label.reshape(-1), ignore_index=-100, reduction="none")
                out[key] = (per_region * conf).mean() * weight
        return out


class LxmertForQuestionAnswering(LxmertPreTrainedModel):
    """LXMERT with an answer head on the pooled output (VQA: 3129 answers, GQA: 1842)."""

    hf_architecture = "LxmertForQuestionAnswering"

    def __init__(self, config: LxmertConfig | None = None) -> None:
        super().__init__(config or LxmertConfig())
        self.lxmert = LxmertModel(self.config)
        self.answer_head = LxmertVisualAnswerHead(self.config, self.config.num_qa_labels)
        self.init_weights()

    def forward(
        self,
        input_ids: Tensor | None = None,
        visual_feats: Tensor | None = None,
        visual_pos: Tensor | None = None,
        attention_mask: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> LxmertForQuestionAnsweringOutput | tuple[Tensor, ...]:
        """Backbone inputs as :meth:`LxmertModel.forward`; ``labels`` either answer indices (B,) (cross-entropy,
        as Hugging Face) or soft scores (B, num_qa_labels) float (LXMERT's VQA / GQA loss: mean
        BCE-with-logits times ``num_qa_labels``).

        Only [CLS] is read from the language side: the last cross-modality layer computes its language side
        there alone (and on CPU padded tokens are skipped), unless hidden states / attentions are asked for.
        """
        out = self.lxmert(
            input_ids=input_ids,
            visual_feats=visual_feats,
            visual_pos=visual_pos,
            attention_mask=attention_mask,
            visual_attention_mask=visual_attention_mask,
            token_type_ids=token_type_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            language_rows=_cls_only_rows(self.config, output_hidden_states, output_attentions),
            vision_output=False,
        )
        score = self.answer_head(out.pooled_output)
        loss = None
        if labels is not None:
            num = self.config.num_qa_labels
            if labels.is_floating_point():
                if labels.shape != score.shape:
                    raise ValueError(
                        f"LxmertForQuestionAnswering: soft labels {tuple(labels.shape)} do not match the scores "
                        f"{tuple(score.shape)}; give (B, num_qa_labels={num}) scores or (B,) indices"
                    )
                loss = F.binary_cross_entropy_with_logits(score.float(), labels.float()) * num
            else:
                loss = F.cross_entropy(score.view(-1, num).float(), labels.reshape(-1))
        result = LxmertForQuestionAnsweringOutput(
            loss=loss,
            question_answering_score=score,
            language_hidden_states=out.language_hidden_states,
            vision_hidden_states=out.vision_hidden_states,
            language_attentions=out.language_attentions,
            vision_attentions=out.vision_attentions,
            cross_encoder_attentions=out.cross_encoder_attentions,
        )
        return result.to_tuple() if return_dict is False else result


class LxmertForNLVR2(LxmertPreTrainedModel):
    """NLVR2: the sentence is encoded with each of two images; the two pooled outputs, concatenated
    ``(B, 2H)``, go through ``answer_head`` (2H -> 2H -> GeLU -> LayerNorm -> 2)."""

    hf_architecture = "LxmertForNLVR2"

    def __init__(self, config: LxmertConfig | None = None) -> None:
        super().__init__(config or LxmertConfig())
        self.lxmert = LxmertModel(self.config)
        self.answer_head = LxmertVisualAnswerHead(self.config, 2, in_dim=2 * self.config.hidden_size)
        self.init_weights()

    def forward(
        self,
        input_ids: Tensor | None = None,
        visual_feats: Tensor | None = None,
        visual_pos: Tensor | None = None,
        attention_mask: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        return_dict: bool | None = None,
    ) -> LxmertForNLVR2Output | tuple[Tensor, ...]:
        """``input_ids`` (B, L) one sentence per pair; ``visual_feats`` (B, 2, V, F); ``visual_pos``
        (B, 2, V, 4); ``visual_attention_mask`` (B, 2, V) optional; ``labels`` (B,) 0/1."""
        if visual_feats is None or visual_feats.dim() != 4 or visual_feats.shape[1] != 2:
            shape = None if visual_feats is None else tuple(visual_feats.shape)
            raise ValueError(
                f"LxmertForNLVR2: visual_feats must be (B, 2, V, F) for the image pair, got {shape}"
            )
        b = visual_feats.shape[0]

        def pair(x: Tensor | None) -> Tensor | None:  # (B, ...) -> (2B, ...): each sentence twice
            return None if x is None else x.repeat_interleave(2, dim=0)

        out = self.lxmert(
            input_ids=pair(input_ids),
            visual_feats=visual_feats.flatten(0, 1),
            visual_pos=visual_pos.flatten(0, 1),
            attention_mask=pair(attention_mask),
            visual_attention_mask=None
            if visual_attention_mask is None
            else visual_attention_mask.flatten(0, 1),
            token_type_ids=pair(token_type_ids),
            language_rows=_cls_only_rows(self.config, False, False),
            vision_output=False,
        )
        pooled = out.pooled_output.reshape(b, -1)
        logits = self.answer_head(pooled)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.reshape(-1))
        result = LxmertForNLVR2Output(loss=loss, logits=logits, pooled_output=pooled)
        return result.to_tuple() if return_dict is False else result
