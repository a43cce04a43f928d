"""NLVR2 fine-tuning: pair batches, the pair head from a pretraining checkpoint, bad input, a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from finetune_data import TINY_MODEL, image_colours, nlvr2_items, nlvr2_setup, write_json, write_store

from model import LxmertConfig, LxmertForNLVR2, LxmertForPreTraining
from model.losses import masked_mean_cross_entropy
from tasks.data.jsonio import DataFormatError
from tasks.engine.trainer import train
from tasks.finetune import nlvr2
from tasks.finetune.nlvr2 import build_nlvr2_model, load_pair_items


def test_pair_batches_and_loss(tmp_path: Path):
    colours = image_colours(8, seed=3)
    store = write_store(tmp_path / "uneven.lmdb", colours, uneven=True)  # 4 or 3 regions per image
    cfg = nlvr2_setup(tmp_path / "data", n_images=20)
    cfg.data.features = [str(store)]
    cfg.data.train = [write_json(tmp_path / "pairs.json", nlvr2_items(colours))]
    task = nlvr2.build(cfg)
    ds = task.train_dataset()
    batch = task.collate([ds[i] for i in range(5)])
    assert batch["visual_feats"].shape == (5, 2, 4, 8) and batch["visual_pos"].shape == (5, 2, 4, 4)
    mask = batch["visual_attention_mask"]
    assert mask.shape == (5, 2, 4)
    for j, i in enumerate(range(5)):  # the mask follows each image's own region count
        item = ds.items[i]
        assert mask[j, 0].sum() == ds.features[item.img0].num_boxes
        assert mask[j, 1].sum() == ds.features[item.img1].num_boxes
    assert torch.equal(
        batch["visual_feats"][1, 1, :3], torch.from_numpy(ds.features[ds.items[1].img1].features[:3])
    )
    assert batch["labels"].tolist() == [it.label for it in ds.items[:5]]
    out = task.step(task.build_model(None), batch, 0)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0], [1.0, 1.0]])
    ce = torch.nn.functional.cross_entropy(logits[:2], torch.tensor([0, 1]))
    assert masked_mean_cross_entropy(logits, torch.tensor([0, 1, -100])).item() == pytest.approx(ce.item())


def test_pair_head_starts_fresh_from_a_pretraining_checkpoint(tmp_path: Path):
    torch.manual_seed(0)
    cfg_model = LxmertConfig(**TINY_MODEL, num_qa_labels=6, num_object_labels=5, num_attr_labels=3)
    pre = LxmertForPreTraining(cfg_model)
    with torch.no_grad():  # shapes that would fit the pair head (bias, LayerNorm): must not be copied
        pre.answer_head.logit_fc[0].bias.fill_(0.7)
        pre.answer_head.logit_fc[2].weight.fill_(0.3)
    pre.save_pretrained(tmp_path / "pre")
    cfg = nlvr2_setup(tmp_path / "data", n_images=10)
    # one rule, in from_pretrained: the task and a direct call give the same model
    for model in (
        build_nlvr2_model(cfg, str(tmp_path / "pre")),
        LxmertForNLVR2.from_pretrained(tmp_path / "pre"),
    ):
        mine, theirs = model.state_dict(), pre.state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine if k.startswith("lxmert."))
        assert not model.answer_head.logit_fc[0].bias.any()  # BERT initialisation: zero bias, unit LayerNorm
        assert torch.equal(model.answer_head.logit_fc[2].weight, torch.ones(2 * cfg_model.hidden_size))
        assert "answer_head.logit_fc.2.weight" in model.load_report.defaulted
    # a fine-tuned NLVR2 model loads whole, its pair head included
    model.answer_head.logit_fc[3].bias.data.fill_(0.25)
    model.save_pretrained(tmp_path / "nlvr2")
    again = build_nlvr2_model(cfg, str(tmp_path / "nlvr2"))
    assert isinstance(again, LxmertForNLVR2)
    assert torch.equal(again.answer_head.logit_fc[3].bias, torch.full((2,), 0.25))


@pytest.mark.parametrize(
    "entries, message",
    [
        (
            [{"identifier": "a", "img0": "x", "img1": "y", "sent": "s", "label": 2}],
            r"entry 0 \(identifier 'a'\).*0 or 1",
        ),
        ([{"identifier": "a", "img0": "x", "sent": "s"}], r"lacks \['img1'\]"),
        (
            [
                {"identifier": "a", "img0": "x", "img1": "y", "sent": "s", "label": 1},
                {"identifier": "a", "img0": "x", "img1": "y", "sent": "t", "label": 0},
            ],
            r"entry 1 \(identifier 'a'\): 'a' is given twice \(first at .*entry 0\)",
        ),
    ],
)
def test_bad_entries_are_named(tmp_path: Path, entries, message):
    path = write_json(tmp_path / "bad.json", entries)
    with pytest.raises(DataFormatError, match=message):
        load_pair_items([path])


def test_training_refuses_unlabelled_examples(tmp_path: Path):
    cfg = nlvr2_setup(tmp_path, n_images=10)
    items = json.loads(Path(cfg.data.train[0]).read_text())
    del items[3]["label"]
    write_json(Path(cfg.data.train[0]), items)
    with pytest.raises(DataFormatError, match=r"1 examples have no label.*train-3-0-0"):
        nlvr2.build(cfg).train_dataset()


def test_recipe_drops_examples_with_missing_images_and_counts_them(tmp_path: Path, caplog, capsys):
    """nlvr2.yaml, as the original: examples whose images are in no store are dropped, counted in the log and in
    the run summary (printed by lxmert-train); the strict error stays the default elsewhere."""
    from common.config import load_config
    from tasks.cli import _summary_text
    from tasks.config import TrainConfig

    recipe = Path(__file__).resolve().parents[2] / "tasks" / "configs" / "nlvr2.yaml"
    assert load_config(TrainConfig, recipe).data.allow_missing_images is True
    assert TrainConfig().data.allow_missing_images is False
    assert not any(
        load_config(TrainConfig, recipe.with_name(f"{name}.yaml")).data.allow_missing_images
        for name in ("vqa", "gqa", "pretrain_lxmert")
    )
    cfg = nlvr2_setup(tmp_path, n_images=24)
    items = json.loads(Path(cfg.data.train[0]).read_text())
    items[2]["img1"] = items[5]["img0"] = "nlvr2-lost-img1"  # two examples name an image no store has
    write_json(Path(cfg.data.train[0]), items)
    with pytest.raises(
        ValueError, match="1 of .* images .* \\(2 nlvr2 train items\\) are in none of the feature"
    ):
        nlvr2.build(cfg).train_dataset()
    cfg.data.allow_missing_images = True
    cfg.train.epochs = 1
    summary = train(cfg, nlvr2.build(cfg), tmp_path / "run")
    assert summary["dropped_items"] == {"train": 2}
    assert "(2 nlvr2 train items) are in none of the feature stores" in caplog.text
    assert "items left out (an image in no feature store): train 2" in _summary_text("nlvr2", summary)


def test_tiny_finetune_beats_the_majority_answer(tmp_path: Path):
    cfg = nlvr2_setup(tmp_path, n_images=96)
    cfg.train.epochs = 6
    cfg.optim.lr = 3e-3
    cfg.finetune.annotations = cfg.data.valid  # the official metrics read LXMERT's converted file too
    summary = train(cfg, nlvr2.build(cfg), tmp_path / "run")
    official = {k for k in summary["valid"] if k.startswith("official_")}
    assert official == {"official_accuracy", "official_consistency"}  # metrics only, no counts
    assert summary["valid"]["official_accuracy"] == pytest.approx(summary["valid"]["accuracy"])
    labels = [it["label"] for it in json.loads(Path(cfg.data.valid).read_text())]
    majority = max(sum(labels), len(labels) - sum(labels)) / len(labels)
    assert summary["best_score"] >= majority + 0.15
    assert sorted(p.name for p in (tmp_path / "run" / "best").iterdir() if p.suffix == ".json") == [
        "config.json",
        "extractor.json",
        "features.json",
        "manifest.json",
    ]
