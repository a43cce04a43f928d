"""Checkpoint formats: round trips ours <-> HF, original LXMERT files, detection, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from model import (
    LxmertConfig,
    LxmertForNLVR2,
    LxmertForPreTraining,
    LxmertForQuestionAnswering,
    LxmertModel,
    to_original_state_dict,
)
from model.config import layer_norm_eps, load_config, replace_config


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_round_trip_ours_hf_ours(tiny_config, tmp_path):
    torch.manual_seed(0)
    ours = LxmertForPreTraining(tiny_config)
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "lxmert" and saved["architectures"] == ["LxmertForPreTraining"]
    hf, info = transformers.LxmertForPreTraining.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf.save_pretrained(tmp_path / "hf")
    back = LxmertForPreTraining.from_pretrained(tmp_path / "hf")
    assert back.load_report.format == "hf" and back.load_report.complete
    _assert_same_weights(ours, back)
    assert back.cls.predictions.decoder.weight is back.lxmert.embeddings.word_embeddings.weight
    saved = {
        k: v for k, v in back.config.to_diff_dict().items() if k != "dtype"
    }  # transformers writes the dtype
    assert saved == {**tiny_config.to_diff_dict(), "architectures": ["LxmertForPreTraining"]}


@pytest.mark.parametrize("hf_cls_name", ["LxmertModel", "LxmertForQuestionAnswering"])
def test_hf_loads_our_backbone_and_qa(tiny_config, tmp_path, hf_cls_name):
    torch.manual_seed(0)
    ours = LxmertForQuestionAnswering(tiny_config)
    ours.save_pretrained(tmp_path)
    hf, info = getattr(transformers, hf_cls_name).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"], info
    hf_state = hf.state_dict()
    prefix = "" if hf_cls_name == "LxmertForQuestionAnswering" else "lxmert."
    for key, value in hf_state.items():
        assert torch.equal(value, ours.state_dict()[prefix + key]), key


def test_bare_backbone_round_trip_and_pytorch_bin(tiny_config, tmp_path):
    torch.manual_seed(0)
    hf = transformers.LxmertModel(tiny_config)
    hf.save_pretrained(tmp_path / "st")
    ours = LxmertModel.from_pretrained(tmp_path / "st")
    assert ours.load_report.complete
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in hf.state_dict().items())
    # pytorch_model.bin + config.json directory
    (tmp_path / "bin").mkdir()
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    _assert_same_weights(ours, LxmertModel.from_pretrained(tmp_path / "bin"))
    # a bare backbone checkpoint inside a task model: backbone loads, heads reported missing
    qa = LxmertForQuestionAnswering.from_pretrained(tmp_path / "st")
    assert any(k.startswith("answer_head.") for k in qa.load_report.missing)
    assert torch.equal(qa.lxmert.pooler.dense.weight, ours.pooler.dense.weight)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_original_pretraining_file(tiny_config, tmp_path, prefix):
    """model_LXRT.pth-style: keys under bert.*, optionally DataParallel's module.*, tied decoder stored."""
    torch.manual_seed(0)
    ours = LxmertForPreTraining(tiny_config)
    original = to_original_state_dict(ours.state_dict())
    assert "bert.encoder.x_layers.0.visual_attention.att.query.weight" in original
    assert "cls.predictions.decoder.weight" in original
    path = tmp_path / "Epoch20_LXRT.pth"
    torch.save({prefix + k: v for k, v in original.items()}, path)
    loaded = LxmertForPreTraining.from_pretrained(path, num_attention_heads=tiny_config.num_attention_heads)
    assert loaded.load_report.format == "original" and loaded.load_report.complete
    assert loaded.load_report.unexpected == []
    assert loaded.config.l_layers == 2 and loaded.config.num_qa_labels == tiny_config.num_qa_labels
    assert loaded.config.num_object_labels == tiny_config.num_object_labels
    _assert_same_weights(ours, loaded)


def test_original_finetuned_best_pth(tiny_config, tmp_path):
    """BEST.pth of the original VQA code: lxrt_encoder.model.bert.* + logit_fc.*, module.-prefixed."""
    torch.manual_seed(0)
    qa = LxmertForQuestionAnswering(tiny_config)
    state = {}
    for key, value in qa.state_dict().items():
        if key.startswith("lxmert."):
            state["module.lxrt_encoder.model.bert." + key[len("lxmert.") :]] = value
        else:
            state["module." + key[len("answer_head.") :]] = value
    path = tmp_path / "BEST.pth"
    torch.save(state, path)
    loaded = LxmertForQuestionAnswering.from_pretrained(path, num_attention_heads=4)
    assert loaded.load_report.format == "original-finetuned" and loaded.load_report.complete
    _assert_same_weights(qa, loaded)
    # NLVR2's BEST.pth: logit_fc takes the two pooled outputs (2H)
    nlvr = LxmertForNLVR2(tiny_config)
    state = {
        ("lxrt_encoder.model.bert." + k[7:] if k.startswith("lxmert.") else k[len("answer_head.") :]): v
        for k, v in nlvr.state_dict().items()
    }
    torch.save(state, path)
    _assert_same_weights(nlvr, LxmertForNLVR2.from_pretrained(path, num_attention_heads=4))


def test_wrapped_training_checkpoint_and_compile_prefix(tiny_config, tmp_path):
    torch.manual_seed(0)
    ours = LxmertForQuestionAnswering(tiny_config)
    path = tmp_path / "last.pt"
    torch.save(
        {"model": {"_orig_mod." + k: v for k, v in ours.state_dict().items()}, "step": torch.tensor(3)}, path
    )
    _assert_same_weights(ours, LxmertForQuestionAnswering.from_pretrained(path, num_attention_heads=4))


def test_head_shape_mismatch_is_reported_not_fatal(tiny_config, tmp_path):
    torch.manual_seed(0)
    pre = LxmertForPreTraining(tiny_config)
    pre.answer_head.logit_fc[0].bias.data.fill_(0.5)  # fits the QA head's shape: still not copied
    pre.save_pretrained(tmp_path)
    qa = LxmertForQuestionAnswering.from_pretrained(tmp_path, num_qa_labels=5)
    mismatched = {k for k, _, _ in qa.load_report.mismatched}
    assert mismatched == {"answer_head.logit_fc.3.weight", "answer_head.logit_fc.3.bias"}
    assert qa.answer_head.logit_fc[3].weight.shape == (5, 64)
    # the answer MLP loads whole or not at all: the layers that would fit keep their initialisation
    assert set(qa.load_report.defaulted) == {
        f"answer_head.logit_fc.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")
    }
    assert not qa.answer_head.logit_fc[0].bias.any()
    assert "cls.seq_relationship.weight" in qa.load_report.unexpected
    assert "shape-mismatched" in qa.load_report.summary()


def test_backbone_mismatch_refused(tiny_config, tmp_path):
    torch.manual_seed(0)
    LxmertForPreTraining(tiny_config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"backbone does not load.*hidden|backbone does not load") as err:
        LxmertForPreTraining.from_pretrained(tmp_path, hidden_size=48, num_attention_heads=4)
    assert str(tmp_path) in str(err.value) and "of another shape" in str(err.value)
    with pytest.raises(ValueError, match="backbone weights missing"):
        LxmertForPreTraining.from_pretrained(tmp_path, l_layers=3)


def test_truncated_backbone_file_refused(tiny_config, tmp_path):
    torch.manual_seed(0)
    state = to_original_state_dict(LxmertForPreTraining(tiny_config).state_dict())
    state = {k: v for k, v in state.items() if "x_layers.1." not in k}
    path = tmp_path / "model_LXRT.pth"
    torch.save(state, path)
    with pytest.raises(
        ValueError, match=r"model_LXRT.pth \(original\): the LXMERT backbone does not load"
    ) as err:
        LxmertForPreTraining.from_pretrained(path, config=tiny_config)
    assert "x_layers.1." in str(err.value)


def test_corrupted_files_give_clear_errors(tiny_config, tmp_path):
    torch.manual_seed(0)
    LxmertForPreTraining(tiny_config).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model.safetensors: cannot read as safetensors.*corrupted"):
        LxmertForPreTraining.from_pretrained(tmp_path)
    pth = tmp_path / "model_LXRT.pth"
    torch.save(to_original_state_dict(LxmertForPreTraining(tiny_config).state_dict()), pth)
    pth.write_bytes(pth.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"model_LXRT.pth: cannot read as a PyTorch checkpoint.*re-download"):
        LxmertForPreTraining.from_pretrained(pth)


def test_not_lxmert_and_unsafe_pickles_refused(tmp_path):
    bert_like = tmp_path / "bert.pth"
    torch.save(
        {
            "bert.encoder.layer.0.attention.self.query.weight": torch.zeros(2, 2),
            "classifier.weight": torch.zeros(2),
        },
        bert_like,
    )
    with pytest.raises(ValueError, match="not an LXMERT checkpoint"):
        LxmertModel.from_pretrained(bert_like)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse_namespace()}, unsafe)
    with pytest.raises(ValueError, match="weights_only=True"):
        LxmertModel.from_pretrained(unsafe)
    with pytest.raises(ValueError, match="needs model.safetensors"):
        LxmertModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        LxmertModel.from_pretrained(tmp_path / "nope.pth")


def argparse_namespace():
    import argparse

    return argparse.Namespace(lr=1e-4)


def test_config_json_both_ways(tmp_path):
    """One config class (transformers'): our extra setting (layer_norm_eps) survives both ways, defaults are
    transformers', and a bad config.json gets one error naming the file."""
    assert LxmertConfig is transformers.LxmertConfig
    config = LxmertConfig(l_layers=3, num_qa_labels=3129, layer_norm_eps=1e-6)
    config.save_pretrained(tmp_path)
    hf = transformers.LxmertConfig.from_pretrained(tmp_path)
    assert (hf.l_layers, hf.num_qa_labels, hf.x_layers, hf.layer_norm_eps) == (3, 3129, 5, 1e-6)
    hf.save_pretrained(tmp_path / "hf")
    back = load_config(tmp_path / "hf" / "config.json")
    assert back.to_diff_dict() == config.to_diff_dict() and layer_norm_eps(back) == 1e-6
    assert layer_norm_eps(LxmertConfig()) == 1e-12 and LxmertConfig().visual_loss_normalizer == 6.67
    assert replace_config(config, x_layers=2).layer_norm_eps == 1e-6
    with pytest.raises(TypeError, match="unknown LxmertConfig field"):
        replace_config(config, x_layer=2)
    (tmp_path / "bad.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="bad.json: model_type is 'bert'"):
        load_config(tmp_path / "bad.json")


def test_hub_id_resolves_from_the_hugging_face_cache(tiny_config, tmp_path, monkeypatch):
    """``from_pretrained("owner/name")`` with no such local path: the Hub cache's snapshot (offline here)."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--unc-nlp--lxmert-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    torch.manual_seed(0)
    saved = LxmertForPreTraining(tiny_config)
    saved.save_pretrained(repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no local folder of that name

    ours = LxmertForPreTraining.from_pretrained("unc-nlp/lxmert-tiny")
    _assert_same_weights(ours, saved)

    with pytest.raises(FileNotFoundError, match=r"unc-nlp/lxmert-missing: .*Hugging Face cache.*hf download"):
        LxmertModel.from_pretrained("unc-nlp/lxmert-missing")
    # A local folder of that name wins over the Hub.
    local = tmp_path / "unc-nlp" / "lxmert-missing"
    ours.save_pretrained(local)
    assert LxmertModel.from_pretrained("unc-nlp/lxmert-missing").config.hidden_size == tiny_config.hidden_size
