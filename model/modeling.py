"""The LXMERT network (Tan & Bansal, 2019): embeddings, the three encoders, the pretraining and task heads.

Module and parameter names follow Hugging Face's ``transformers`` LXMERT (``lxmert.embeddings.*``,
``lxmert.encoder.{visn_fc,layer.i,r_layers.i,x_layers.i}.*``, ``cls.predictions.*``,
``obj_predict_head.decoder_dict.*``, ``answer_head.logit_fc.{0,2,3}.*``) so state dicts move between the
two without renaming, and the outputs agree (fp32, within 1e-5).

- language encoder (``encoder.layer``: ``l_layers`` = 9 BERT layers) over WordPiece tokens;
- object-relationship encoder (``encoder.r_layers``: ``r_layers`` = 5 :class:`LxmertLayer`) over the regions
  (:class:`LxmertVisualFeatureEncoder`: features and boxes);
- cross-modality encoder (``encoder.x_layers``: ``x_layers`` = 5 :class:`LxmertXLayer`): one cross-attention
  module shared by both directions (language -> vision, vision -> language; its projections run once over both
  sides' tokens stacked), then self-attention and feed-forward per modality;
- the pooled output (first language token) feeds the matching and QA heads.

How it runs cheaply lives in :mod:`model.execution`: ``Linear`` / ``Dropout`` are drop-in ``nn.Linear`` /
``nn.Dropout``; heads that read only some outputs (pretraining with MLM labels: [CLS] and the labelled tokens;
QA / NLVR2: [CLS]) say so to :meth:`LxmertModel.forward` (``language_rows``, ``vision_output``), which builds one
:class:`~model.execution.ExecutionPlan` that the layers follow. Use a fused optimizer
(``torch.optim.AdamW(..., fused=True)``) with it; ``torch.compile(model)`` works too.

Shapes: ``B`` batch, ``L`` tokens, ``V`` regions (36), ``H`` hidden (768), ``F`` region feature size
(2048). Boxes (``visual_pos``) are ``(B, V, 4)`` x1, y1, x2, y2 divided by the image width / height
(values in [0, 1]). Masks are 1 = attend, 0 = padding.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.models.lxmert import modeling_lxmert as hf_lxmert

from .config import LxmertConfig, check_config, head_dim, layer_norm_eps
from .execution import (
    FULL_PLAN,
    Dropout,
    ExecutionPlan,
    Linear,
    TiedEmbeddingGradient,
    cross_attention,
    dropout,
    linear,
    plan_execution,
    self_attention,
    static_shapes,
    warn_if_slow_cpu_autocast,
)
from .losses import masked_mean_cross_entropy, soft_score_bce

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------
@dataclass
class LxmertModelOutput(hf_lxmert.LxmertModelOutput):
    """Backbone outputs: ``transformers``' fields (a dict-like ``ModelOutput``), plus ``language_rows_output``.

    - ``language_output`` ``(B, L, H)``, ``vision_output`` ``(B, V, H)``: last cross-modality layer. ``None``
      where the call said it does not read them (``language_rows`` / ``vision_output=False`` of
      :meth:`LxmertModel.forward`) and they were not computed.
    - ``pooled_output`` ``(B, H)``: tanh(Linear(first language token)).
    - ``language_hidden_states``: output of each language layer then each cross-modality layer (lang side);
      ``vision_hidden_states``: each relationship layer then each cross-modality layer (vision side).
    - ``language_attentions`` / ``vision_attentions`` / ``cross_encoder_attentions``: softmax probabilities
      ``(B, heads, Lq, Lk)`` per layer (cross: language queries over regions), when asked for.
    - ``language_rows_output`` ``(N, H)`` (ours): the last layer's language output at the flat ``B * L`` indices
      ``language_rows`` ``(N,)`` given to :meth:`LxmertModel.forward`, in their order (None without them).

    ``to_tuple()`` (and ``return_dict=False``) gives ``transformers``' items only; our extras are keys.
    """

    language_rows_output: Tensor | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return _hf_tuple(self, hf_lxmert.LxmertModelOutput)


def _hf_tuple(output: ModelOutput, hf_class: type) -> tuple[Any, ...]:
    """The non-``None`` values of ``hf_class``'s fields in order: ``transformers``' ``return_dict=False`` tuple."""
    names = [f.name for f in dataclasses.fields(hf_class)]
    return tuple(output[k] for k in names if k in output.keys())


@dataclass
class LxmertEncoderOutput:
    """What :class:`LxmertEncoder` hands to :class:`LxmertModel`.

    - ``language``: the last layer's language states ``(B, L, H)``; under a plan with ``language_rows``
      ``(R,)``, only those rows ``(R, H)``.
    - ``vision``: ``(B, V, H)``; None under a plan without the last layer's vision side.
    - per-layer states / attentions as in :class:`LxmertModelOutput` (empty tuples when not asked for).
    """

    language: Tensor
    vision: Tensor | None
    language_states: tuple[Tensor, ...]
    vision_states: tuple[Tensor, ...]
    language_attentions: tuple[Tensor, ...]
    vision_attentions: tuple[Tensor, ...]
    cross_attentions: tuple[Tensor, ...]


@dataclass
class LxmertForPreTrainingOutput(hf_lxmert.LxmertForPreTrainingOutput):
    """Pretraining outputs: ``transformers``' fields, plus ``masked_lm_index`` and ``losses`` (ours).

    - ``loss``: scalar, sum of the enabled task losses (``None`` without any labels).
    - ``prediction_logits``: ``(B, L, vocab)`` over all tokens (the default), or, under
      ``mlm_logits_at_labels_only=True`` with MLM labels, ``(N, vocab)`` at the flat token indices
      ``masked_lm_index`` ``(N,)`` into ``B * L``.
    - ``cross_relationship_score`` ``(B, 2)``: matching logits (1 = sentence matches the image).
    - ``question_answering_score`` ``(B, num_qa_labels)``.
    - ``losses`` (ours): the individual (undetached) task losses by name: ``mlm``, ``matched``, ``obj``,
      ``attr``, ``feat``, ``qa`` (those with labels).

    ``to_tuple()`` (and ``return_dict=False``) gives ``transformers``' items only; our extras are keys.
    """

    masked_lm_index: Tensor | None = None
    losses: dict[str, Tensor] | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return _hf_tuple(self, hf_lxmert.LxmertForPreTrainingOutput)


@dataclass
class LxmertForQuestionAnsweringOutput(hf_lxmert.LxmertForQuestionAnsweringOutput):
    """QA outputs (``transformers``'): ``question_answering_score`` ``(B, num_qa_labels)``, optional loss / states."""


@dataclass
class LxmertForNLVR2Output(ModelOutput):
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


def additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``(B, S)`` 1/0 mask -> ``(B, 1, 1, S)`` additive mask (0 / most negative finite ``dtype`` value).

    Returns ``None`` for ``None``, and on CPU for an all-ones mask (no masking: the faster attention path). On a
    GPU that check would wait for the device at every forward, so the mask is always built there.
    """
    if mask is None:
        return None
    if mask.device.type == "cpu" and not torch.compiler.is_compiling() and bool(mask.all()):
        return None
    return ((1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min).to(dtype)


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
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=layer_norm_eps(config))
        self.dropout = Dropout(config.hidden_dropout_prob)

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
        self.attention_head_size = head_dim(config)
        self.query = Linear(config.hidden_size, config.hidden_size)
        self.key = Linear(config.hidden_size, config.hidden_size)
        self.value = Linear(config.hidden_size, config.hidden_size)
        self.dropout_prob = config.attention_probs_dropout_prob

    def split_heads(self, x: Tensor) -> Tensor:
        """``(B, S, H)`` -> ``(B, heads, S, head_dim)``."""
        b, s, _ = x.shape
        return x.view(b, s, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, output_attentions: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Attention over projected ``(B, S, H)`` q / k / v; returns ``(B, Sq, H)`` and optional probs."""
        ctx, probs = self.core(
            self.split_heads(q), self.split_heads(k), self.split_heads(v), mask, output_attentions
        )
        b, _, s, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, s, -1), probs

    def core(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, output_attentions: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Head-split ``(B, heads, S, d)`` q / k / v -> context ``(B, heads, Sq, d)`` and optional probs.

        ``softmax(q k^T / sqrt(d) + mask)``, dropout, times ``v``. Fused ``scaled_dot_product_attention`` where
        it is the fast kernel (CUDA; CPU fp32 without dropout); on CPU with dropout or in bf16 the explicit
        softmax with the cheaper CPU :func:`~model.execution.dropout` is faster for LXMERT's short sequences.
        """
        if mask is not None and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        p = self.dropout_prob if self.training else 0.0
        fused = q.device.type != "cpu" or (p == 0.0 and q.dtype == torch.float32)
        if output_attentions or not fused:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
            if mask is not None:
                scores = scores + mask
            probs = scores.softmax(dim=-1)
            ctx = torch.matmul(dropout(probs, p, self.training).to(v.dtype), v)
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
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
        self.dense = Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=layer_norm_eps(config))
        self.dropout = Dropout(config.hidden_dropout_prob)

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
        plan: ExecutionPlan | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        if plan is not None and (plan.packing is not None or plan.language_rows is not None):
            # Language side under a plan: packed tokens and / or only some output rows (model/execution.py).
            return self_attention(self, input_tensor, attention_mask, plan), None
        ctx, probs = self.self(input_tensor, input_tensor, attention_mask, output_attentions)
        return self.output(ctx, input_tensor), probs


class LxmertCrossAttentionLayer(nn.Module):
    """Cross-attention block, one set of weights for both directions (``XLayer.visual_attention``)."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.att = LxmertAttention(config)
        self.output = LxmertAttentionOutput(config)

    def forward(
        self,
        lang: Tensor,
        lang_mask: Tensor | None,
        visn: Tensor,
        visn_mask: Tensor | None,
        output_attentions: bool = False,
        plan: ExecutionPlan | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Language attends to vision and vision to language, sharing every projection.

        ``lang`` (B, L, H), ``visn`` (B, V, H); masks additive ``(B, 1, 1, S)`` or None. The projections run
        once over all language + vision tokens stacked as rows (every split is a contiguous block, no copies).
        Returns the new ``lang``, ``visn`` (None under a plan without the vision side) and the
        language->vision probabilities when asked.
        """
        if plan is not None and (plan.packing is not None or not plan.vision):
            # Packed language tokens and / or no vision side (model/execution.py).
            lang, visn = cross_attention(self, lang, lang_mask, visn, visn_mask, plan)
            return lang, visn, None
        b, n_lang, hidden = lang.shape
        n_visn = visn.shape[1]
        sizes = [b * n_lang, b * n_visn]
        both = torch.cat([lang.reshape(-1, hidden), visn.reshape(-1, hidden)])
        att = self.att
        q_l, q_v = att.query(both).split(sizes)
        k_l, k_v = att.key(both).split(sizes)
        v_l, v_v = att.value(both).split(sizes)
        lang_ctx, probs = att.attend(
            q_l.view(b, n_lang, -1),
            k_v.view(b, n_visn, -1),
            v_v.view(b, n_visn, -1),
            visn_mask,
            output_attentions,
        )
        visn_ctx, _ = att.attend(
            q_v.view(b, n_visn, -1), k_l.view(b, n_lang, -1), v_l.view(b, n_lang, -1), lang_mask
        )
        ctx = torch.cat([lang_ctx.reshape(-1, hidden), visn_ctx.reshape(-1, hidden)])
        lang_out, visn_out = self.output(ctx, both).split(sizes)
        return lang_out.view(b, n_lang, -1), visn_out.view(b, n_visn, -1), probs


class LxmertIntermediate(nn.Module):
    """Feed-forward expansion: ``act(dense(x))``, ``(B, S, H)`` -> ``(B, S, intermediate_size)``."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = _ACTIVATIONS[config.hidden_act]

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class LxmertOutput(LxmertResidualOutput):
    """Feed-forward contraction (intermediate -> hidden) with residual LayerNorm."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__(config, config.intermediate_size)


class LxmertLayer(GradientCheckpointingLayer):
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
        plan: ExecutionPlan | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        x, probs = self.attention(hidden_states, attention_mask, output_attentions, plan)
        return self.output(self.intermediate(x), x), probs


class LxmertXLayer(GradientCheckpointingLayer):
    """Cross-modality layer: shared cross-attention (both directions), then self-attention and FFN per modality."""

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
        plan: ExecutionPlan | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(B, L, H)``, ``(B, V, H)`` -> same shapes, plus the language->vision probabilities when asked.

        Under ``plan`` (see :class:`~model.execution.ExecutionPlan`) the language side may be packed rows and
        come out only at ``plan.language_rows``, and the vision side may be skipped (None).
        """
        lang, visn, probs = self.visual_attention(
            lang_feats,
            lang_attention_mask,
            visual_feats,
            visual_attention_mask,
            output_attentions,
            plan,
        )
        lang, _ = self.lang_self_att(lang, lang_attention_mask, plan=plan)
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
        self.visn_fc = Linear(config.visual_feat_dim, config.hidden_size)
        self.visn_layer_norm = nn.LayerNorm(config.hidden_size, eps=layer_norm_eps(config))
        self.box_fc = Linear(config.visual_pos_dim, config.hidden_size)
        self.box_layer_norm = nn.LayerNorm(config.hidden_size, eps=layer_norm_eps(config))
        self.dropout = Dropout(config.hidden_dropout_prob)

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
        plan: ExecutionPlan = FULL_PLAN,
    ) -> LxmertEncoderOutput:
        """Embedded tokens ``(B, L, H)`` (packed ``(T, H)`` under a plan with packing) and raw regions
        ``(B, V, F)``, ``(B, V, 4)``; additive masks. ``plan`` applies to the last cross-modality layer;
        the layers before it compute all their outputs (with the plan's packing)."""
        lang_states: list[Tensor] = []
        visn_states: list[Tensor] = []
        lang_atts: list[Tensor] = []
        visn_atts: list[Tensor] = []
        cross_atts: list[Tensor] = []
        inner = plan.inner()
        lang = lang_feats
        visn = self.visn_fc(visual_feats, visual_pos)
        for layer in self.layer:
            lang, probs = layer(lang, lang_attention_mask, output_attentions, inner)
            lang_states.append(lang)
            lang_atts.append(probs)
        for layer in self.r_layers:
            visn, probs = layer(visn, visual_attention_mask, output_attentions)
            visn_states.append(visn)
            visn_atts.append(probs)
        for i, layer in enumerate(self.x_layers):
            layer_plan = plan if i == len(self.x_layers) - 1 else inner
            lang, visn, probs = layer(
                lang, lang_attention_mask, visn, visual_attention_mask, output_attentions, layer_plan
            )
            lang_states.append(lang)
            visn_states.append(visn)
            cross_atts.append(probs)
        return LxmertEncoderOutput(
            language=lang,
            vision=visn,
            language_states=tuple(lang_states) if output_hidden_states else (),
            vision_states=tuple(visn_states) if output_hidden_states else (),
            language_attentions=tuple(lang_atts) if output_attentions else (),
            vision_attentions=tuple(visn_atts) if output_attentions else (),
            cross_attentions=tuple(cross_atts) if output_attentions else (),
        )


class LxmertPooler(nn.Module):
    """``tanh(dense(first token))``: ``(B, S, H)`` -> ``(B, H)``."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class LxmertPredictionHeadTransform(nn.Module):
    """``LN(act(dense(x)))`` on the last dimension (``H`` -> ``H``)."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = _ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=layer_norm_eps(config))

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class LxmertLMPredictionHead(nn.Module):
    """MLM head: transform then ``decoder`` (tied to the word embeddings) plus a per-token ``bias``."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.transform = LxmertPredictionHeadTransform(config)
        self.decoder = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: Tensor, tied: TiedEmbeddingGradient | None = None) -> Tensor:
        """``(..., H)`` -> ``(..., vocab)`` logits."""
        h = self.transform(hidden_states)
        if tied is not None:
            # The tied matrix's gradient shared with this step's word-embedding lookup (model/execution.py).
            return tied.decode(h, self.decoder.weight, self.bias)
        return linear(h, self.decoder.weight, self.bias)


class LxmertPreTrainingHeads(nn.Module):
    """``predictions`` (MLM) and ``seq_relationship`` (2-way matching on the pooled output)."""

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__()
        self.predictions = LxmertLMPredictionHead(config)
        self.seq_relationship = Linear(config.hidden_size, 2)

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
            Linear(in_dim or config.hidden_size, hid),
            GeLU(),
            nn.LayerNorm(hid, eps=layer_norm_eps(config)),
            Linear(hid, num_labels),
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
        self.decoder_dict = nn.ModuleDict({k: Linear(config.hidden_size, n) for k, n in sizes.items()})

    def forward(self, hidden_states: Tensor) -> dict[str, Tensor]:
        """``(B, V, H)`` -> ``{"obj": (B, V, 1600), "attr": (B, V, 400), "feat": (B, V, F)}``."""
        h = self.transform(hidden_states)
        return {k: dec(h) for k, dec in self.decoder_dict.items()}


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------
class LxmertPreTrainedModel(PreTrainedModel):
    """Shared plumbing: a ``transformers.PreTrainedModel`` on ``transformers.LxmertConfig`` (weight
    initialisation as ``transformers``' LXMERT, embeddings / QA-label resizing, gradient checkpointing of the
    encoder layers); ``from_pretrained`` also reads the original and BERT formats (:mod:`model.checkpoint`)."""

    config_class = LxmertConfig
    base_model_prefix = "lxmert"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LxmertLayer", "LxmertXLayer"]
    #: The Hugging Face class name written to ``config.json`` ``architectures``.
    hf_architecture = "LxmertModel"
    #: Prefix of the backbone inside this model's state dict ("" for the bare backbone).
    backbone_prefix = "lxmert."

    def __init__(self, config: LxmertConfig, *inputs: Any, **kwargs: Any) -> None:
        check_config(config, type(self).__name__)
        super().__init__(config, *inputs, **kwargs)
        self.load_report = None

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """BERT initialisation as ``transformers``' LXMERT: N(0, initializer_range) Linear / Embedding weights,
        zero biases and pad rows, unit LayerNorm, zero MLM bias."""
        super()._init_weights(module)
        if isinstance(module, LxmertLMPredictionHead):
            init.zeros_(module.bias)

    # -- adapters: inputs that require grad --------------------------------------------------------
    def enable_input_require_grads(self) -> None:
        """As ``transformers`` (the word embeddings' output requires grad, for adapters under reentrant gradient
        checkpointing), and the same for LXMERT's second input, the visual feature encoder's output: without it
        the vision-only layers' checkpointed inputs need no grad and their adapters get none."""
        super().enable_input_require_grads()

        def make_output_require_grad(module: nn.Module, args: Any, output: Tensor) -> None:
            output.requires_grad_(True)

        hooks = [
            m.register_forward_hook(make_output_require_grad)
            for m in self.modules()
            if isinstance(m, LxmertVisualFeatureEncoder)
        ]
        self._require_grads_hooks = [*getattr(self, "_require_grads_hooks", []), *hooks]

    # -- gradient checkpointing: a static graph -----------------------------------------------------
    @property
    def _loss_reads_every_parameter(self) -> bool:
        """True under gradient checkpointing in training (with autograd on): then the loss also reads, at zero
        weight, the outputs LXMERT's losses leave unread (the last cross-modality layer's vision side for QA /
        NLVR2 / language-only pretraining, the heads without labels), so every parameter gets a gradient (0
        where it does not affect the loss, instead of None). This is what DDP without ``find_unused_parameters``
        expects, which reentrant checkpointing requires; the loss and every other gradient are unchanged."""
        return self.is_activation_checkpointing and self.training and torch.is_grad_enabled()

    @staticmethod
    def _plus_zero_times(loss: Tensor, *unread: Tensor | None) -> Tensor:
        """``loss`` + 0 x each of ``unread`` (summed): the same value, a graph that reaches their parameters."""
        for t in unread:
            if t is not None:
                loss = loss + (t * 0).sum().to(loss.dtype)
        return loss

    # -- QA labels ---------------------------------------------------------------------------------
    def get_qa_logit_layer(self) -> nn.Module | None:
        """The answer head's last Linear (``answer_head.logit_fc.3``), or None without an answer head."""
        head = getattr(self, "answer_head", None)
        return None if head is None else head.logit_fc[-1]

    def resize_num_qa_labels(self, num_labels: int | None) -> nn.Module | None:
        """Resize the answer layer to ``num_labels`` outputs as ``transformers``: the first rows are kept, new
        rows initialised; ``config.num_qa_labels`` follows. Returns the (new) layer (None: no answer head)."""
        current = self.get_qa_logit_layer()
        if num_labels is None or current is None:
            return current
        old, hidden = current.weight.shape
        if old != num_labels:
            new = Linear(hidden, num_labels, bias=current.bias is not None).to(
                device=current.weight.device, dtype=current.weight.dtype
            )
            self._init_weights(new)
            keep = min(old, num_labels)
            with torch.no_grad():
                new.weight[:keep] = current.weight[:keep]
                if current.bias is not None:
                    new.bias[:keep] = current.bias[:keep]
            self.answer_head.logit_fc[-1] = new
        self.config.num_qa_labels = num_labels
        self.num_qa_labels = num_labels
        return self.get_qa_logit_layer()

    # -- loading / saving --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path | None,
        *model_args: Any,
        **kwargs: Any,
    ) -> Any:
        """Load any LXMERT checkpoint (format detected; see :mod:`model.checkpoint`), ``transformers``' keywords
        included.

        ``pretrained_model_name_or_path``: a Hub id (``unc-nlp/lxmert-base-uncased``), a directory
        (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``: ours or ``transformers``') or one file
        (original ``model_LXRT.pth`` / ``EpochNN_LXRT.pth`` / fine-tuned ``BEST.pth``, ``.safetensors``, ``.bin``,
        a BERT checkpoint). Keywords: ``config`` (a :class:`LxmertConfig` overriding the checkpoint's),
        ``state_dict`` (tensors to load instead of the files'), ``dtype`` / ``torch_dtype`` (a ``torch.dtype``,
        its name, or ``"auto"``), ``output_loading_info``, ``device_map`` (one device), ``map_location``, and
        single config fields (e.g. ``num_qa_labels=3129``). The load report is kept in ``model.load_report``; a
        backbone that does not load completely raises ``ValueError``.
        """
        from .checkpoint import load_pretrained

        return load_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Path:
        """``config.json`` + ``model.safetensors`` in ``transformers``' layout (tied decoder not stored; quietly,
        no progress bar); with ``transformers``' keywords (``safe_serialization``, ``max_shard_size`` ...)
        ``transformers``' own saving. Returns the directory."""
        if kwargs:
            super().save_pretrained(save_directory, **kwargs)
        else:
            from .checkpoint import save_pretrained

            save_pretrained(self, save_directory)
        return Path(save_directory)


class LxmertModel(LxmertPreTrainedModel):
    """The LXMERT backbone: embeddings, encoders and pooler (keys without prefix, as Hugging Face's)."""

    hf_architecture = "LxmertModel"
    backbone_prefix = ""

    def __init__(self, config: LxmertConfig | None = None) -> None:
        super().__init__(config or LxmertConfig())
        self.embeddings = LxmertEmbeddings(self.config)
        self.encoder = LxmertEncoder(self.config)
        self.pooler = LxmertPooler(self.config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.embeddings.word_embeddings = new_embeddings

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
        **kwargs: Any,
    ) -> LxmertModelOutput | tuple[Tensor, ...]:
        """``input_ids`` (B, L) WordPiece ids (or ``inputs_embeds`` (B, L, H)); ``visual_feats`` (B, V, F);
        ``visual_pos`` (B, V, 4) boxes in [0, 1]; ``attention_mask`` (B, L) and ``visual_attention_mask``
        (B, V) with 1 = keep; ``token_type_ids`` (B, L). Returns :class:`LxmertModelOutput`.

        What the caller reads (the heads say so; the numbers it reads are the same either way):

        - ``language_rows`` (N,): flat indices into ``B * L`` of the language outputs read, returned as
          ``language_rows_output`` (N, H). Then the last cross-modality layer computes its language side only at
          these rows and the first tokens (the pooler's input), and ``language_output`` is None; on CPU, when
          ``attention_mask`` has padding and these rows are all real tokens, every layer's language side also
          skips the padded tokens. An empty tensor: only the pooled output is read.
        - ``vision_output=False``: the last cross-modality layer skips its vision side; ``vision_output`` None.

        Both are ignored (everything is computed) when hidden states or attentions are asked for, or without
        cross-modality layers. ``output_attentions`` / ``output_hidden_states`` / ``return_dict`` default to the
        config's, and other keywords are accepted and ignored, as in ``transformers``.
        """
        output_attentions, output_hidden_states, return_dict = _flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
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
        batch, length, hidden = embedding.shape
        dtype = compute_dtype(embedding)
        lang_mask = additive_mask(attention_mask, dtype)
        visn_mask = additive_mask(visual_attention_mask, dtype)
        if language_rows is not None:
            language_rows = language_rows.to(embedding.device)
        plan = plan_execution(
            batch,
            length,
            attention_mask,
            language_rows,
            vision_output,
            cross_layers=self.config.x_layers,
            every_output=bool(output_hidden_states) or bool(output_attentions),
            pack_padding=embedding.device.type == "cpu" and not torch.compiler.is_compiling(),
        )
        if plan.packing is not None:
            embedding = plan.packing.pack(embedding)
        encoded = self.encoder(
            embedding,
            lang_mask,
            visual_feats,
            visual_pos,
            visn_mask,
            output_attentions=bool(output_attentions),
            output_hidden_states=bool(output_hidden_states),
            plan=plan,
        )
        if plan.language_rows is None:
            language_output = encoded.language
            pooled_output = self.pooler(language_output)
            rows_output = None
            if language_rows is not None:
                rows_output = language_output.reshape(-1, hidden).index_select(0, language_rows)
        else:
            language_output = None
            first_tokens, rows_output = encoded.language.split([batch, language_rows.shape[0]])
            pooled_output = self.pooler(first_tokens[:, None])  # (B, 1, H): each sequence's first token
        out = LxmertModelOutput(
            language_output=language_output,
            vision_output=encoded.vision,
            pooled_output=pooled_output,
            language_hidden_states=encoded.language_states if output_hidden_states else None,
            vision_hidden_states=encoded.vision_states if output_hidden_states else None,
            language_attentions=encoded.language_attentions if output_attentions else None,
            vision_attentions=encoded.vision_attentions if output_attentions else None,
            cross_encoder_attentions=encoded.cross_attentions if output_attentions else None,
            language_rows_output=rows_output,
        )
        return out if return_dict else out.to_tuple()


def _flags(
    config: LxmertConfig,
    output_attentions: bool | None,
    output_hidden_states: bool | None,
    return_dict: bool | None,
) -> tuple[bool, bool, bool]:
    """Forward arguments, or the config's values where ``None`` (as ``transformers``)."""
    return (
        bool(config.output_attentions if output_attentions is None else output_attentions),
        bool(config.output_hidden_states if output_hidden_states is None else output_hidden_states),
        bool(config.return_dict if return_dict is None else return_dict),
    )


#: ``language_rows`` of a head that reads only the pooled output (LxmertModel moves it to the inputs' device).
_POOLED_ONLY = torch.empty(0, dtype=torch.long)


class LxmertForPreTraining(LxmertPreTrainedModel):
    """LXMERT with its pretraining heads: MLM, cross-modality matching, masked-object (obj / attr / feat), QA."""

    hf_architecture = "LxmertForPreTraining"

    _tied_weights_keys = {"cls.predictions.decoder.weight": "lxmert.embeddings.word_embeddings.weight"}

    def __init__(self, config: LxmertConfig | None = None) -> None:
        super().__init__(config or LxmertConfig())
        config = self.config
        self.lxmert = LxmertModel(config)
        self.cls = LxmertPreTrainingHeads(config)
        if config.task_obj_predict:
            self.obj_predict_head = LxmertVisualObjHead(config)
        if config.task_qa:
            self.answer_head = LxmertVisualAnswerHead(config, config.num_qa_labels)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.lxmert.embeddings.word_embeddings

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.lxmert.embeddings.word_embeddings = new_embeddings

    def get_output_embeddings(self) -> nn.Module:
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.cls.predictions.decoder = new_embeddings

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        mean_resizing: bool = True,
    ) -> nn.Embedding:
        """``transformers``' resizing, plus the MLM bias (kept rows, zeros for new tokens)."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        n = embeddings.weight.shape[0]
        bias = self.cls.predictions.bias
        if bias.shape[0] != n:
            new_bias = torch.zeros(n, device=bias.device, dtype=bias.dtype)
            keep = min(n, bias.shape[0])
            new_bias[:keep] = bias.detach()[:keep]
            self.cls.predictions.bias = nn.Parameter(new_bias)
        return embeddings

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
        mlm_logits_at_labels_only: bool = False,
        **kwargs: Any,
    ) -> LxmertForPreTrainingOutput | tuple[Tensor, ...]:
        """Backbone inputs as :meth:`LxmertModel.forward`, plus the pretraining labels (Hugging Face's):

        - ``labels`` (B, L): MLM targets, -100 = not predicted.
        - ``obj_labels``: ``{"obj": (ids (B, V), weight (B, V)), "attr": (ids, weight),
          "feat": (features (B, V, F), weight (B, V))}``; each loss is the weighted mean over all B * V
          regions times ``visual_loss_normalizer`` (the original weights obj / attr by detector confidence).
        - ``matched_label`` (B,): 1 = sentence matches the image. ``ans`` (B,): answer index, -100 = none.
        - ``mlm_logits_at_labels_only`` (ours, opt-in; our pretraining passes it): with MLM ``labels``, the
          vocabulary logits only at the labelled tokens (``prediction_logits`` (N, vocab) then, with
          ``masked_lm_index`` (N,)), and the backbone is told that only [CLS] and those tokens are read (see
          :meth:`LxmertModel.forward`): the same losses, much less work. Default: ``(B, L, vocab)`` logits at
          every token, as ``transformers``. Under ``torch.compile`` or CUDA graph capture
          (:func:`~model.execution.static_shapes`) the logits are always full: fixed shapes.

        ``masked_lm_labels`` (``transformers``' old name of ``labels``) is accepted with a warning; other keywords
        are ignored, and ``output_*`` / ``return_dict`` default to the config's, as in ``transformers``. On CPU the tied word-embedding / decoder matrix gets one dense gradient
        (:class:`~model.execution.TiedEmbeddingGradient`), whichever losses are back-propagated.
        """
        config = self.config
        if "masked_lm_labels" in kwargs:
            warnings.warn(
                "LxmertForPreTraining: masked_lm_labels is deprecated, use labels",
                FutureWarning,
                stacklevel=2,
            )
            labels = kwargs.pop("masked_lm_labels")
        output_attentions, output_hidden_states, return_dict = _flags(
            config, output_attentions, output_hidden_states, return_dict
        )
        use_labels = labels is not None and config.task_mask_lm
        masked_index = None
        if use_labels and mlm_logits_at_labels_only and not static_shapes(labels):
            # (under torch.compile / CUDA graph capture the shapes stay fixed: logits at every token)
            flat_labels = labels.reshape(-1)
            masked_index = (flat_labels != -100).nonzero().squeeze(1)
        mlm_head = self.cls.predictions
        word_embeddings = self.lxmert.embeddings.word_embeddings
        tied = None
        if (
            masked_index is not None
            and inputs_embeds is None
            and TiedEmbeddingGradient.applies(input_ids, word_embeddings.weight, mlm_head.decoder.weight)
        ):
            # One dense gradient for the tied matrix instead of two vocab x H ones summed (model/execution.py).
            tied = TiedEmbeddingGradient()
            inputs_embeds, input_ids = tied.lookup(input_ids, word_embeddings.weight), None
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
            language_rows=masked_index,  # the losses read [CLS] (pooled) and the labelled tokens only
        )
        visn, pooled = out.vision_output, out.pooled_output
        losses: dict[str, Tensor] = {}

        # Masked LM: the vocabulary projection only where a label asks for it, unless full logits are wanted.
        if masked_index is not None:
            prediction_logits = mlm_head(out.language_rows_output, tied)
            losses["mlm"] = masked_mean_cross_entropy(
                prediction_logits, flat_labels.index_select(0, masked_index)
            )
        else:
            prediction_logits = mlm_head(out.language_output)
            if use_labels:
                losses["mlm"] = masked_mean_cross_entropy(
                    prediction_logits.reshape(-1, config.vocab_size), labels.reshape(-1)
                )

        match_score = self.cls.seq_relationship(pooled)
        if matched_label is not None and config.task_matched:
            losses["matched"] = masked_mean_cross_entropy(match_score.view(-1, 2), matched_label.reshape(-1))

        if obj_labels is not None and config.task_obj_predict:
            losses.update(self._visual_losses(visn, obj_labels))

        if config.task_qa:
            answer_score = self.answer_head(pooled)
            if ans is not None:
                losses["qa"] = masked_mean_cross_entropy(
                    answer_score.view(-1, config.num_qa_labels), ans.reshape(-1)
                )
        else:
            answer_score = pooled[0][0]

        total = None
        if labels is not None or matched_label is not None or obj_labels is not None or ans is not None:
            total = torch.zeros((), device=pooled.device)
            for value in losses.values():
                total = total + value
            if self._loss_reads_every_parameter:
                unread_obj = None
                if config.task_obj_predict and obj_labels is None:
                    unread_obj = torch.cat([v.flatten() for v in self.obj_predict_head(visn).values()])
                qa_score = answer_score if config.task_qa else None
                total = self._plus_zero_times(total, prediction_logits, match_score, qa_score, visn, unread_obj)
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
        return result if return_dict else result.to_tuple()

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
            if key == "feat" and h.device.type == "cpu" and not static_shapes(h):
                # Regression only where the weight is non-zero (the masked regions); the mean stays over all n.
                # (On a GPU the selection would wait for the device mid-step: there every region is regressed
                # and the zero weights drop the others, below.)
                keep = (conf != 0).nonzero().squeeze(1)
                pred = decoder(h.index_select(0, keep)).float()
                target = label.reshape(n, -1).index_select(0, keep).to(pred.dtype)
                per_region = F.smooth_l1_loss(pred, target, reduction="none").mean(1)
                out[key] = (per_region * conf.index_select(0, keep)).sum() / n * weight
            elif key == "feat":
                pred = decoder(h).float()
                per_region = F.smooth_l1_loss(
                    pred, label.reshape(n, -1).to(pred.dtype), reduction="none"
                ).mean(1)
                out[key] = (per_region * conf).sum() / n * weight
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
        self.post_init()

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
        **kwargs: Any,
    ) -> LxmertForQuestionAnsweringOutput | tuple[Tensor, ...]:
        """Backbone inputs as :meth:`LxmertModel.forward`; ``labels`` either answer indices (B,) (cross-entropy,
        as Hugging Face) or soft scores (B, num_qa_labels) float (LXMERT's VQA / GQA loss: mean
        BCE-with-logits times ``num_qa_labels``).

        Only [CLS] is read from the language side: the last cross-modality layer computes its language side
        there alone (and on CPU padded tokens are skipped), unless hidden states / attentions are asked for.
        Other keywords are ignored and ``output_*`` / ``return_dict`` default to the config's, as ``transformers``.
        """
        output_attentions, output_hidden_states, return_dict = _flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
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
            language_rows=_POOLED_ONLY,
            vision_output=self._loss_reads_every_parameter,  # else unread: skipped
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
                loss = soft_score_bce(score, labels)
            else:
                loss = F.cross_entropy(score.view(-1, num).float(), labels.reshape(-1))
            if self._loss_reads_every_parameter:
                loss = self._plus_zero_times(loss, out.vision_output)
        result = LxmertForQuestionAnsweringOutput(
            loss=loss,
            question_answering_score=score,
            language_hidden_states=out.language_hidden_states,
            vision_hidden_states=out.vision_hidden_states,
            language_attentions=out.language_attentions,
            vision_attentions=out.vision_attentions,
            cross_encoder_attentions=out.cross_encoder_attentions,
        )
        return result if return_dict else result.to_tuple()


class LxmertForNLVR2(LxmertPreTrainedModel):
    """NLVR2: the sentence is encoded with each of two images; the two pooled outputs, concatenated
    ``(B, 2H)``, go through ``answer_head`` (2H -> 2H -> GeLU -> LayerNorm -> 2)."""

    hf_architecture = "LxmertForNLVR2"

    def __init__(self, config: LxmertConfig | None = None) -> None:
        super().__init__(config or LxmertConfig())
        self.lxmert = LxmertModel(self.config)
        self.answer_head = LxmertVisualAnswerHead(self.config, 2, in_dim=2 * self.config.hidden_size)
        self.post_init()

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
        **kwargs: Any,
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
            language_rows=_POOLED_ONLY,
            vision_output=self._loss_reads_every_parameter,  # else unread: skipped
        )
        pooled = out.pooled_output.reshape(b, -1)
        logits = self.answer_head(pooled)
        loss = None if labels is None else masked_mean_cross_entropy(logits, labels.reshape(-1))
        if loss is not None and self._loss_reads_every_parameter:
            loss = self._plus_zero_times(loss, out.vision_output)
        result = LxmertForNLVR2Output(loss=loss, logits=logits, pooled_output=pooled)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return result if return_dict else result.to_tuple()
