"""Our LXMERT vs the installed Hugging Face LXMERT (the reference): same weights -> same numbers (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch
import transformers

from model import LxmertConfig, LxmertForNLVR2, LxmertForPreTraining, LxmertForQuestionAnswering, LxmertModel

TOL = 1e-5
BACKBONE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "visual_feats", "visual_pos")
LABEL_KEYS = ("labels", "matched_label", "ans", "obj_labels")


def _max_diff(a, b) -> float:
    if isinstance(a, tuple | list):
        assert len(a) == len(b)
        return max(_max_diff(x, y) for x, y in zip(a, b))
    return (a.float() - b.float()).abs().max().item()


def _pair(ours_cls, hf_cls, config: LxmertConfig, tmp_path, direction: str):
    """Ours and HF's with the same weights, converted through save_pretrained in ``direction``."""
    torch.manual_seed(0)
    if direction == "ours->hf":
        ours = ours_cls(config)
        ours.save_pretrained(tmp_path)
        hf, info = hf_cls.from_pretrained(tmp_path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    else:
        hf = hf_cls(config)
        hf.save_pretrained(tmp_path)
        ours = ours_cls.from_pretrained(tmp_path)
        assert ours.load_report.complete, ours.load_report.summary()
    return ours.eval(), hf.eval()


def _inputs(batch: dict, visual_mask: bool) -> dict:
    out = {k: batch[k] for k in BACKBONE_KEYS}
    out["visual_attention_mask"] = batch["visual_attention_mask"] if visual_mask else None
    return out


@pytest.mark.parametrize("visual_mask", [False, True])
@pytest.mark.parametrize("output_attentions", [False, True])
def test_backbone_matches_hf(tiny_config, tiny_batch, tmp_path, visual_mask, output_attentions):
    ours, hf = _pair(LxmertModel, transformers.LxmertModel, tiny_config, tmp_path, "ours->hf")
    kwargs = _inputs(tiny_batch, visual_mask)
    with torch.no_grad():
        a = ours(**kwargs, output_hidden_states=True, output_attentions=output_attentions)
        b = hf(**kwargs, output_hidden_states=True, output_attentions=output_attentions)
    for name in (
        "language_output",
        "vision_output",
        "pooled_output",
        "language_hidden_states",
        "vision_hidden_states",
    ):
        assert _max_diff(getattr(a, name), getattr(b, name)) < TOL, name
    assert len(a.language_hidden_states) == tiny_config.l_layers + tiny_config.x_layers
    if output_attentions:
        for name in ("language_attentions", "vision_attentions", "cross_encoder_attentions"):
            assert _max_diff(getattr(a, name), getattr(b, name)) < TOL, name
    else:
        assert a.language_attentions is None
    # tuple access like Hugging Face's ModelOutput
    assert torch.equal(a[0], a.language_output) and torch.equal(a["pooled_output"], a.pooled_output)


@pytest.mark.parametrize("visual_mask", [False, True])
def test_pretraining_logits_and_loss_match_hf(tiny_config, tiny_batch, tmp_path, visual_mask):
    ours, hf = _pair(
        LxmertForPreTraining, transformers.LxmertForPreTraining, tiny_config, tmp_path, "hf->ours"
    )
    kwargs = _inputs(tiny_batch, visual_mask)
    labels = {k: tiny_batch[k] for k in LABEL_KEYS}
    with torch.no_grad():
        a, b = ours(**kwargs), hf(**kwargs)
        assert a.prediction_logits.shape == b.prediction_logits.shape == (3, 10, tiny_config.vocab_size)
        for name in ("prediction_logits", "cross_relationship_score", "question_answering_score"):
            assert _max_diff(getattr(a, name), getattr(b, name)) < TOL, name
        assert a.loss is None
        a, b = ours(**kwargs, **labels, mlm_logits_at_labels_only=True), hf(**kwargs, **labels)
    assert abs(a.loss.item() - b.loss.item()) < TOL * max(1.0, abs(b.loss.item()))
    assert set(a.losses) == {"mlm", "matched", "obj", "attr", "feat", "qa"}
    # the opt-in fast MLM path: logits only at the 4 labelled tokens, equal to the full logits there
    assert a.prediction_logits.shape == (4, tiny_config.vocab_size)
    flat = b.prediction_logits.reshape(-1, tiny_config.vocab_size)[a.masked_lm_index]
    assert _max_diff(a.prediction_logits, flat) < TOL
    with torch.no_grad():
        full = ours(**kwargs, **labels)  # the default: transformers' shapes and tuple layout
    assert full.prediction_logits.shape == b.prediction_logits.shape
    assert full.masked_lm_index is None and len(full.to_tuple()) == len(b.to_tuple())
    assert [type(x) for x in ours(**kwargs, **labels, return_dict=False)] == [type(x) for x in b.to_tuple()]
    assert abs(full.loss.item() - b.loss.item()) < TOL * max(1.0, abs(b.loss.item()))


def test_pretraining_gradients_match_hf(tiny_config, tiny_batch, tmp_path):
    """Backward through the masked-only MLM / feat heads and the tied embeddings equals HF's (eval: no dropout)."""
    ours, hf = _pair(
        LxmertForPreTraining, transformers.LxmertForPreTraining, tiny_config, tmp_path, "ours->hf"
    )
    kwargs = _inputs(tiny_batch, True)
    labels = {k: tiny_batch[k] for k in LABEL_KEYS}
    ours(**kwargs, **labels, mlm_logits_at_labels_only=True).loss.backward()
    hf(**kwargs, **labels).loss.backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    checked = 0
    for name, p in ours.named_parameters():
        g_ref = hf_grads[name]
        if g_ref is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        assert _max_diff(p.grad, g_ref) < 1e-5, name
        checked += 1
    assert checked > 100


@pytest.mark.parametrize("visual_mask", [False, True])
def test_question_answering_matches_hf(tiny_config, tiny_batch, tmp_path, visual_mask):
    ours, hf = _pair(
        LxmertForQuestionAnswering, transformers.LxmertForQuestionAnswering, tiny_config, tmp_path, "ours->hf"
    )
    kwargs = _inputs(tiny_batch, visual_mask)
    labels = torch.tensor([1, 4, 8])
    with torch.no_grad():
        a, b = ours(**kwargs, labels=labels), hf(**kwargs, labels=labels)
    assert _max_diff(a.question_answering_score, b.question_answering_score) < TOL
    assert abs(a.loss.item() - b.loss.item()) < TOL
    # LXMERT's VQA loss on soft scores: mean BCE-with-logits x number of answers
    soft = torch.zeros(3, tiny_config.num_qa_labels)
    soft[0, 1], soft[1, 4], soft[1, 5] = 1.0, 0.6, 0.3
    with torch.no_grad():
        loss = ours(**kwargs, labels=soft).loss
    ref = (
        torch.nn.functional.binary_cross_entropy_with_logits(b.question_answering_score, soft) * soft.shape[1]
    )
    assert abs(loss.item() - ref.item()) < TOL


def test_nlvr2_pairs_each_image_with_the_sentence(tiny_config, tiny_batch, tmp_path):
    torch.manual_seed(0)
    model = LxmertForNLVR2(tiny_config).eval()
    b = tiny_batch
    feats = torch.stack([b["visual_feats"], b["visual_feats"].flip(0)], dim=1)  # (B, 2, V, F)
    pos = torch.stack([b["visual_pos"], b["visual_pos"].flip(0)], dim=1)
    with torch.no_grad():
        out = model(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            visual_feats=feats,
            visual_pos=pos,
            labels=torch.tensor([0, 1, 1]),
        )
        pooled = [
            model.lxmert(
                input_ids=b["input_ids"],
                attention_mask=b["attention_mask"],
                visual_feats=feats[:, i],
                visual_pos=pos[:, i],
            ).pooled_output
            for i in range(2)
        ]
        ref = model.answer_head(torch.cat(pooled, dim=1))
    assert out.logits.shape == (3, 2)
    assert _max_diff(out.logits, ref) < TOL
    assert abs(out.loss.item() - torch.nn.functional.cross_entropy(ref, torch.tensor([0, 1, 1])).item()) < TOL
    with pytest.raises(ValueError, match=r"\(B, 2, V, F\)"):
        model(input_ids=b["input_ids"], visual_feats=b["visual_feats"], visual_pos=b["visual_pos"])


def test_bf16_autocast_runs_and_stays_close(tiny_config, tiny_batch):
    torch.manual_seed(0)
    model = LxmertForPreTraining(tiny_config).eval()
    kwargs = _inputs(tiny_batch, True)
    labels = {k: tiny_batch[k] for k in LABEL_KEYS}
    with torch.no_grad():
        ref = model(**kwargs, **labels).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(**kwargs, **labels).loss
    assert torch.isfinite(low)
    assert abs(low.item() - ref.item()) < 0.05 * abs(ref.item())


@pytest.mark.slow
def test_full_size_955_forward_matches_hf(tmp_path):
    """The released size (9/5/5, hidden 768, 9500 answers): one forward, ours vs HF, same weights."""
    config = LxmertConfig()
    torch.manual_seed(0)
    hf = transformers.LxmertForPreTraining(transformers.LxmertConfig()).eval()
    ours = LxmertForPreTraining(config).eval()
    report = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not report.missing_keys and not report.unexpected_keys
    ours.tie_weights()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30522, (2, 20), generator=g)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 12:] = 0
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        visual_feats=torch.rand(2, 36, 2048, generator=g),
        visual_pos=torch.rand(2, 36, 4, generator=g),
    )
    with torch.no_grad():
        a, b = ours(**kwargs), hf(**kwargs)
    assert a.question_answering_score.shape == (2, 9500)
    for name in ("prediction_logits", "cross_relationship_score", "question_answering_score"):
        assert _max_diff(getattr(a, name), getattr(b, name)) < TOL, name


def test_language_rows_equal_full_output_at_those_rows(tiny_config, tiny_batch):
    """The pruned last layer (pretraining's fast path) gives exactly the full model's rows."""
    torch.manual_seed(0)
    model = LxmertModel(tiny_config).eval()
    kwargs = _inputs(tiny_batch, True)
    rows = torch.tensor([2, 15, 21, 29])
    with torch.no_grad():
        full = model(**kwargs)
        part = model(**kwargs, language_rows=rows)
    flat = full.language_output.reshape(-1, tiny_config.hidden_size)
    # the pruned rows come in their own field; language_output (B, L, H) was not computed
    assert part.language_output is None and full.language_rows_output is None
    assert part.language_rows_output.shape == (4, tiny_config.hidden_size)
    assert _max_diff(part.language_rows_output, flat[rows]) < TOL
    assert _max_diff(part.pooled_output, full.pooled_output) < TOL
    assert _max_diff(part.vision_output, full.vision_output) < TOL
