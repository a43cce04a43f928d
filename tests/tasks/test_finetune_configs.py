"""The shipped fine-tuning configs: the original recipes, and the tiny ones run end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from finetune_data import nlvr2_setup, qa_setup

from common.config import load_config
from tasks.cli import main as cli_main
from tasks.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "tasks" / "configs"


@pytest.mark.parametrize(
    "name, lr, train, valid",
    [
        ("vqa", 5e-5, ["data/vqa/train.json", "data/vqa/nominival.json"], "data/vqa/minival.json"),
        ("gqa", 1e-5, ["data/gqa/train.json", "data/gqa/valid.json"], "data/gqa/testdev.json"),
        ("nlvr2", 5e-5, ["data/nlvr2/train.json"], "data/nlvr2/valid.json"),
    ],
)
def test_original_recipes(name: str, lr: float, train: list[str], valid: str):
    cfg = load_config(TrainConfig, CONFIGS / f"{name}.yaml")
    assert cfg.task == name and cfg.data.train == train and cfg.data.valid == valid
    assert (cfg.data.batch_size, cfg.train.epochs, cfg.data.max_seq_length) == (32, 4, 20)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.warmup, cfg.optim.clip_grad_norm) == (
        "bert_adam",
        lr,
        0.1,
        5.0,
    )
    assert (
        cfg.finetune.loss == "bce" and cfg.model.l_layers == 9
    )  # the released 9/5/5 when training from scratch


@pytest.mark.parametrize("name", ["pretrain_lxmert", "vqa", "gqa", "nlvr2"])
def test_original_recipes_run_in_float32_without_tf32(name: str):
    """The original trains and evaluates in float32: the recipes presented as the original do too (no bf16
    autocast, no TF32 on CUDA); the tiny / demo configs keep the default auto."""
    cfg = load_config(TrainConfig, CONFIGS / f"{name}.yaml")
    assert (cfg.train.amp, cfg.train.tf32) == ("none", False)
    assert TrainConfig().train.amp == "auto" and TrainConfig().train.tf32 is False
    for small in ("pretrain_tiny", "pretrain_demo", "vqa_demo", "vqa_tiny"):
        assert load_config(TrainConfig, CONFIGS / f"{small}.yaml").train.amp == "auto"


@pytest.mark.parametrize("name", ["vqa", "gqa", "nlvr2"])
def test_tiny_configs_train_through_the_cli(tmp_path: Path, name: str, capsys):
    data = (
        nlvr2_setup(tmp_path, n_images=32)
        if name == "nlvr2"
        else qa_setup(tmp_path, task=name, n_train=32, n_valid=8)
    )
    overrides = [
        f"data.train=[{data.data.train[0]}]",
        f"data.valid={data.data.valid}",
        f"data.features=[{data.data.features[0]}]",
        "model.visual_feat_dim=8",
        "train.epochs=1",
        "train.device=cpu",
        "train.amp=none",
    ]
    if name != "nlvr2":
        overrides.append(f"data.answers={data.data.answers}")
    run = tmp_path / "run"
    assert (
        cli_main([name, "--config", str(CONFIGS / f"{name}_tiny.yaml"), "--output", str(run), *overrides])
        == 0
    )
    assert "done at step 2/2" in capsys.readouterr().out
    valid = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"valid"' in line
    ]
    assert len(valid) == 1 and 0 <= valid[0]["score"] <= 1
    assert (run / "best" / "extractor.json").is_file() and (run / "final" / "model.safetensors").is_file()
