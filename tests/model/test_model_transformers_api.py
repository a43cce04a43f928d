"""Our LXMERT classes are ``transformers`` models: PreTrainedModel API, dict-like outputs, config flags,
``from_pretrained`` keywords, gradient checkpointing, PEFT LoRA and ``transformers.Trainer``."""

from __future__ import annotations

import pytest
import torch
import transformers

from model import LxmertConfig, LxmertForNLVR2, LxmertForPreTraining, LxmertForQuestionAnswering, LxmertModel

BACKBONE_KEYS = ("input_ids", "visual_feats", "visual_pos", "attention_mask", "token_type_ids")


def _backbone(batch: dict) -> dict:
    return {k: batch[k] for k in BACKBONE_KEYS}


def test_classes_are_pretrained_models_with_transformers_config(tiny_config):
    for cls in (LxmertModel, LxmertForPreTraining, LxmertForQuestionAnswering):
        assert issubclass(cls, transformers.PreTrainedModel)
        assert cls.config_class is transformers.LxmertConfig and cls.base_model_prefix == "lxmert"
    model = LxmertForPreTraining(tiny_config)
    assert model.main_input_name == "input_ids" and model.supports_gradient_checkpointing
    assert isinstance(model.base_model, LxmertModel)
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())  # the tied matrix once
    assert model.get_input_embeddings() is model.lxmert.embeddings.word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with pytest.raises(ValueError, match="not a multiple of num_attention_heads"):
        LxmertModel(LxmertConfig(hidden_size=30, num_attention_heads=4))


def test_outputs_are_dict_like_and_tuples_match_transformers(tiny_config, tiny_batch):
    torch.manual_seed(0)
    model = LxmertForPreTraining(tiny_config).eval()
    with torch.no_grad():
        out = model(
            **_backbone(tiny_batch), labels=tiny_batch["labels"], matched_label=tiny_batch["matched_label"]
        )
        tup = model(
            **_backbone(tiny_batch),
            labels=tiny_batch["labels"],
            matched_label=tiny_batch["matched_label"],
            return_dict=False,
        )
    assert isinstance(out, transformers.models.lxmert.modeling_lxmert.LxmertForPreTrainingOutput)
    assert "loss" in out and list(out.keys())[:4] == [
        "loss",
        "prediction_logits",
        "cross_relationship_score",
        "question_answering_score",
    ]
    assert dict(out.items())["prediction_logits"] is out.prediction_logits
    assert out["prediction_logits"].shape == (3, 10, tiny_config.vocab_size)
    assert len(tup) == 4 and torch.equal(tup[1], out.prediction_logits)
    assert [k for k in out] == list(out.keys())  # iterating yields keys, as a dict


def test_config_flags_are_honoured(tiny_config, tiny_batch):
    config = LxmertConfig(
        **{**tiny_config.to_diff_dict(), "output_hidden_states": True, "return_dict": False}
    )
    config.output_attentions = True
    model = LxmertModel(config).eval()
    with torch.no_grad():
        out = model(**_backbone(tiny_batch))
        plain = model(
            **_backbone(tiny_batch), output_attentions=False, output_hidden_states=False, return_dict=True
        )
    assert isinstance(out, tuple) and len(out) == 8  # 3 outputs, 2 hidden-state and 3 attention tuples
    assert set(plain.keys()) == {"language_output", "vision_output", "pooled_output"}


def test_unknown_keywords_and_masked_lm_labels(tiny_config, tiny_batch):
    model = LxmertForPreTraining(tiny_config).eval()
    with torch.no_grad():
        a = model(**_backbone(tiny_batch), labels=tiny_batch["labels"], some_other_keyword=1)
        with pytest.warns(FutureWarning, match="masked_lm_labels"):
            b = model(**_backbone(tiny_batch), masked_lm_labels=tiny_batch["labels"])
    assert torch.equal(a.loss, b.loss)


def test_resize_token_embeddings_and_qa_labels(tiny_config):
    torch.manual_seed(0)
    vocab = tiny_config.vocab_size
    model = LxmertForPreTraining(tiny_config)
    old_qa = model.answer_head.logit_fc[-1].weight.detach().clone()
    model.resize_token_embeddings(vocab + 5, mean_resizing=False)
    assert model.cls.predictions.bias.shape == (vocab + 5,)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.config.vocab_size == vocab + 5
    layer = model.resize_num_qa_labels(4)
    assert layer.weight.shape[0] == 4 and model.config.num_qa_labels == 4
    assert torch.equal(layer.weight, old_qa[:4])
    qa = LxmertForQuestionAnswering(LxmertConfig(**{**tiny_config.to_diff_dict(), "num_qa_labels": 9}))
    assert qa.resize_num_qa_labels(20).weight.shape[0] == 20
    with torch.no_grad():
        b = {"input_ids": torch.ones(2, 4, dtype=torch.long)}
        score = qa(
            **b, visual_feats=torch.zeros(2, 3, 24), visual_pos=torch.zeros(2, 3, 4)
        ).question_answering_score
    assert score.shape == (2, 20)


def test_from_pretrained_keywords(tiny_config, tmp_path):
    torch.manual_seed(0)
    ours = LxmertForQuestionAnswering(tiny_config)
    ours.save_pretrained(tmp_path)
    for key in ("dtype", "torch_dtype"):
        loaded = LxmertForQuestionAnswering.from_pretrained(tmp_path, **{key: torch.bfloat16})
        assert loaded.dtype == torch.bfloat16
    model, info = LxmertForQuestionAnswering.from_pretrained(
        pretrained_model_name_or_path=tmp_path, output_loading_info=True
    )
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and not model.training
    state = {k: torch.zeros_like(v) for k, v in ours.state_dict().items()}
    zeros = LxmertForQuestionAnswering.from_pretrained(tmp_path, state_dict=state)
    assert all(torch.count_nonzero(v) == 0 for v in zeros.state_dict().values())
    with pytest.raises(TypeError, match="unknown keyword"):
        LxmertForQuestionAnswering.from_pretrained(tmp_path, num_qa_label=3)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config, tiny_batch):
    torch.manual_seed(0)
    model = LxmertForPreTraining(tiny_config).train()
    labels = {k: tiny_batch[k] for k in ("labels", "matched_label")}

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks both times
        model(**_backbone(tiny_batch), **labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    assert all(layer.gradient_checkpointing for layer in model.lxmert.encoder.layer)
    checkpointed = grads()
    for name in plain:
        assert (plain[name] - checkpointed[name]).abs().max() <= 1e-6, name
    # Under checkpointing every parameter has a gradient (DDP without find_unused_parameters): zero where the
    # losses do not read it (here the last layer's vision side and the QA head: no visual / QA labels).
    unread = set(dict(model.named_parameters())) - set(plain)
    assert set(checkpointed) == set(dict(model.named_parameters()))
    assert any(".x_layers." in n and "visn" in n for n in unread) and any("answer_head" in n for n in unread)
    assert all(checkpointed[n].abs().max() == 0 for n in unread)


@pytest.mark.parametrize("cls", [LxmertForQuestionAnswering, LxmertForNLVR2])
def test_gradient_checkpointing_reaches_every_parameter_of_the_answer_models(tiny_config, tiny_batch, cls):
    # no dropout: under checkpointing the vision side is computed too, and its dropout draws move the others'
    tiny_config.hidden_dropout_prob = tiny_config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    model = cls(tiny_config).train()
    inputs = _backbone(tiny_batch)
    if cls is LxmertForNLVR2:
        inputs["visual_feats"] = torch.stack([inputs["visual_feats"]] * 2, 1)
        inputs["visual_pos"] = torch.stack([inputs["visual_pos"]] * 2, 1)
        inputs.pop("visual_attention_mask", None)
    labels = torch.tensor([0, 1, 1])

    def grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = model(**inputs, labels=labels)
        out.loss.backward()
        return out.loss.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    loss, plain = grads()
    model.gradient_checkpointing_enable()
    loss_ckpt, checkpointed = grads()
    assert loss_ckpt == loss
    assert set(checkpointed) == set(dict(model.named_parameters())) != set(plain)
    for name, grad in checkpointed.items():
        expected = plain.get(name, torch.zeros_like(grad))
        assert (expected - grad).abs().max() <= 1e-6, name
    model.eval()  # the unread vision side is skipped again outside checkpointed training
    with torch.no_grad():
        assert model(**inputs).to_tuple()[0].shape[0] == len(inputs["input_ids"])


@pytest.mark.slow  # importing peft alone takes seconds
def test_peft_lora_trains_only_adapters_and_reloads(tiny_config, tiny_batch, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = LxmertForQuestionAnswering(tiny_config)
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["query", "value"], lora_dropout=0.0)
    )
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    inputs = _backbone(tiny_batch)
    target = torch.tensor([1, 2, 3])
    for _ in range(3):
        optimizer.zero_grad()
        lora(**inputs, labels=target).loss.backward()
        optimizer.step()
    changed = {n for n, p in lora.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    lora.eval()
    with torch.no_grad():
        expected = lora(**inputs).question_answering_score
    lora.save_pretrained(tmp_path)
    torch.manual_seed(0)
    again = peft.PeftModel.from_pretrained(LxmertForQuestionAnswering(tiny_config), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(again(**inputs).question_answering_score, expected, atol=1e-6)


@pytest.mark.slow  # transformers.Trainer's set-up takes seconds
def test_transformers_trainer_runs_on_our_qa_model(tiny_config, tiny_batch, tmp_path):
    torch.manual_seed(0)
    model = LxmertForQuestionAnswering(tiny_config)
    rows = [
        {
            **{k: tiny_batch[k][i] for k in BACKBONE_KEYS},
            "labels": torch.tensor(i % tiny_config.num_qa_labels),
        }
        for i in range(3)
    ] * 4
    before = model.answer_head.logit_fc[-1].weight.detach().clone()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.answer_head.logit_fc[-1].weight, before)


@pytest.mark.slow  # importing peft alone takes seconds
@pytest.mark.parametrize("reentrant", [True, False])
def test_peft_lora_with_gradient_checkpointing_gives_every_adapter_its_gradient(
    tiny_config, tiny_batch, reentrant
):
    """PEFT's recipe (checkpointing on the base, enable_input_require_grads, LoRA on query / value): the adapters of
    the language, vision and cross-modality layers get the gradients they get without checkpointing."""
    peft = pytest.importorskip("peft")
    tiny_config.hidden_dropout_prob = tiny_config.attention_probs_dropout_prob = 0.0
    inputs, target = _backbone(tiny_batch), torch.tensor([1, 2, 3])

    def adapter_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        base = LxmertForQuestionAnswering(tiny_config).train()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            base.enable_input_require_grads()
        config = peft.LoraConfig(
            r=4, target_modules=["query", "value"], lora_dropout=0.0, init_lora_weights=False
        )
        lora = peft.get_peft_model(base, config)
        lora(**inputs, labels=target).loss.backward()
        return {n: p.grad for n, p in lora.named_parameters() if p.requires_grad}

    plain, checkpointed = adapter_grads(False), adapter_grads(True)
    assert set(plain) == set(checkpointed)
    for part in (".layer.", ".r_layers.", ".x_layers."):
        assert any(part in n and plain[n] is not None and plain[n].abs().sum() > 0 for n in plain), part
    for name, grad in plain.items():
        if grad is not None and grad.abs().sum() > 0:
            assert checkpointed[name] is not None, name
            assert (checkpointed[name] - grad).abs().max() <= 1e-6, name
