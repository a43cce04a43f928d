"""model.bert_init: LXMERT's language side from a real (tiny) transformers BERT, by the original's name rule;
BERT's folder / file / Hub-cache forms; a BERT of another size refused in one line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from model import LxmertConfig, LxmertForNLVR2, LxmertForPreTraining, LxmertForQuestionAnswering
from model.bert_init import init_from_bert, is_bert_checkpoint

TINY = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128)


def tiny_bert(layers: int = 3, **sizes) -> transformers.BertForPreTraining:
    """A BertForPreTraining with random (non-default) weights everywhere, BERT's vocabulary and positions."""
    torch.manual_seed(7)
    config = transformers.BertConfig(**{**TINY, **sizes}, num_hidden_layers=layers, vocab_size=30522)
    bert = transformers.BertForPreTraining(config).eval()
    with torch.no_grad():  # LayerNorms and biases away from their initial 1 / 0, so a copy is visible
        for name, p in bert.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return bert


def lxmert_config(**kw) -> LxmertConfig:
    return LxmertConfig(**TINY, l_layers=2, r_layers=1, x_layers=1, visual_feat_dim=8, num_qa_labels=5, **kw)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bert")
    tiny_bert().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert(bert_dir: Path) -> dict[str, torch.Tensor]:
    """The saved BERT's tensors, as transformers reads them back."""
    return transformers.BertForPreTraining.from_pretrained(bert_dir).state_dict()


def test_pretraining_model_takes_the_original_rule(bert_dir: Path, bert: dict, caplog):
    assert is_bert_checkpoint(bert_dir) and not is_bert_checkpoint(bert_dir.parent / "nothing")
    with caplog.at_level(logging.INFO, logger="model.bert_init"):
        model = LxmertForPreTraining.from_pretrained(bert_dir, config=lxmert_config())
    ours = model.state_dict()
    copied = {k: k.replace("lxmert.", "bert.", 1) for k in ours if k.startswith("lxmert.")}
    copied = {k: b for k, b in copied.items() if b in bert}  # embeddings, layers 0-1, pooler
    copied.update({k: k for k in ours if k.startswith("cls.") and k != "cls.predictions.decoder.weight"})
    for key, bert_key in copied.items():
        assert torch.equal(ours[key], bert[bert_key]), key
    assert any(k.startswith("lxmert.encoder.layer.1.") for k in copied)
    assert torch.equal(ours["cls.predictions.bias"], bert["cls.predictions.bias"])  # not 0 as from scratch
    assert model.cls.predictions.decoder.weight is model.lxmert.embeddings.word_embeddings.weight
    # the rest keeps LXMERT's (the original's) initialisation
    x = model.lxmert.encoder.x_layers[0]
    assert torch.equal(x.visn_self_att.output.LayerNorm.weight, torch.ones(64))
    assert not x.visn_self_att.output.dense.bias.any()
    assert model.lxmert.encoder.visn_fc.visn_fc.weight.std().item() == pytest.approx(0.02, rel=0.2)
    report = model.load_report
    assert report.layout == "bert" and report.loaded == len(copied)
    assert any(k.startswith("bert.encoder.layer.2.") for k in report.unexpected)  # beyond l_layers: left out
    assert f"{report.loaded} tensors from BERT" in caplog.text and "matching head" in caplog.text


def test_task_models_and_bert_file_forms(bert_dir: Path, bert: dict, tmp_path: Path):
    """QA / NLVR2 models take embeddings, language layers and pooler; a bare BertModel (no ``bert.``) and an
    old torch file (``module.`` wrapper, LayerNorm gamma / beta) give the same."""
    qa = LxmertForQuestionAnswering.from_pretrained(bert_dir, config=lxmert_config())
    pair = LxmertForNLVR2.from_pretrained(bert_dir, config=lxmert_config())
    key = "lxmert.encoder.layer.1.output.LayerNorm.bias"
    for model in (qa, pair):
        assert torch.equal(model.state_dict()[key], bert["bert.encoder.layer.1.output.LayerNorm.bias"])
        assert torch.equal(model.state_dict()["lxmert.pooler.dense.weight"], bert["bert.pooler.dense.weight"])
        assert not model.answer_head.logit_fc[0].bias.any()  # the head: initialised
    bare = {k[len("bert.") :]: v for k, v in bert.items() if k.startswith("bert.")}
    save_file({k: v.contiguous() for k, v in bare.items()}, str(tmp_path / "bert_model.safetensors"))
    old = {
        "module."
        + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in bert.items()
    }
    torch.save(old, tmp_path / "pytorch_model.bin")
    for path in (tmp_path / "bert_model.safetensors", tmp_path / "pytorch_model.bin"):
        assert is_bert_checkpoint(path)
        model = LxmertForQuestionAnswering(lxmert_config())
        report = init_from_bert(model, path)
        assert torch.equal(model.state_dict()[key], bert["bert.encoder.layer.1.output.LayerNorm.bias"]), path
        assert report.loaded == sum(1 for k in model.state_dict() if k.startswith("lxmert.") and k in qa.state_dict()
                                    and k.replace("lxmert.", "bert.", 1) in bert)  # fmt: skip
    # an LXMERT checkpoint is not BERT
    LxmertForPreTraining(lxmert_config()).save_pretrained(tmp_path / "lxmert")
    assert not is_bert_checkpoint(tmp_path / "lxmert")
    assert not is_bert_checkpoint(tmp_path / "lxmert" / "model.safetensors")


@pytest.mark.parametrize(
    "bert_sizes, model_fields, message",
    [
        ({"hidden_size": 32, "intermediate_size": 128}, {}, r"BERT's bert\.embeddings\.word_embeddings\.weight has "
         r"shape \(30522, 32\), the model's lxmert\.embeddings\.word_embeddings\.weight \(30522, 64\)"),
        ({}, {"intermediate_size": 96}, r"BERT's bert\.encoder\.layer\.0\.intermediate\.dense\.weight has shape "
         r"\(128, 64\), the model's .* \(96, 64\)"),
        ({"num_attention_heads": 4}, {}, r"BERT's num_attention_heads is 4, the model's 2"),
    ],
)  # fmt: skip
def test_a_bert_of_another_size_is_refused_in_one_line(tmp_path: Path, bert_sizes, model_fields, message):
    tiny_bert(layers=2, **bert_sizes).save_pretrained(tmp_path)
    fields = {**TINY, **model_fields}
    config = LxmertConfig(**fields, l_layers=2, r_layers=1, x_layers=1, visual_feat_dim=8)
    with pytest.raises(ValueError, match=message) as err:
        LxmertForPreTraining.from_pretrained(tmp_path, config=config)
    assert str(tmp_path / "model.safetensors") in str(err.value) and "\n" not in str(err.value)


def test_fewer_bert_layers_than_the_language_encoder_is_refused(tmp_path: Path):
    tiny_bert(layers=1).save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"BERT has no tensor for lxmert\.encoder\.layer\.1\..* \(1 BERT layers"
    ):
        LxmertForQuestionAnswering.from_pretrained(tmp_path, config=lxmert_config())


def test_bare_bert_name_comes_from_the_hub_cache(bert_dir: Path, bert: dict, tmp_path: Path, monkeypatch):
    """``bert-base-uncased``: the Hub's google-bert/bert-base-uncased, from the local cache (offline here)."""
    snapshot = tmp_path / "models--google-bert--bert-base-uncased" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((bert_dir / name).read_bytes())
    (tmp_path / "models--google-bert--bert-base-uncased" / "refs").mkdir()
    (tmp_path / "models--google-bert--bert-base-uncased" / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    assert is_bert_checkpoint("bert-base-uncased")
    model = LxmertForPreTraining.from_pretrained("bert-base-uncased", config=lxmert_config())
    assert model.load_report.path == str(snapshot / "model.safetensors")
    assert torch.equal(model.cls.predictions.bias, bert["cls.predictions.bias"])
    with pytest.raises(FileNotFoundError, match="bert-large-cased"):
        LxmertForPreTraining.from_pretrained("bert-large-cased", config=lxmert_config())
