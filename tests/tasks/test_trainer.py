"""tasks.engine.trainer on a tiny real task (tests/tasks/toy_task.py): RUN_DIR layout and logs, checkpoints that load in
transformers, stop + resume == uninterrupted, damaged-checkpoint fallback, non-finite losses, batching rules,
the sampler, and the CLI's config errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from toy_task import ToyTask, toy_config

from common.config import ConfigError
from tasks.cli import main as cli_main
from tasks.config import TrainLoopConfig
from tasks.engine import GlobalBatchSampler, TrainingStopped, micro_batching, resolve_amp, train
from tasks.engine import checkpointing as ckpt
from tasks.engine.precision import set_tf32

pytestmark = pytest.mark.usefixtures("one_thread")


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def cfg_factory(tmp_path, tiny_store, tiny_items):
    train_json, valid_json = tiny_items

    def make(valid: bool = False, **loop):
        return toy_config(tmp_path, tiny_store, train_json, valid_json if valid else None, **loop)

    return make


def test_run_dir_layout_logs_and_transformers_load(tmp_path, cfg_factory):
    config = cfg_factory(valid=True, epochs=2, save_every=3, keep=2)
    run = tmp_path / "run"
    summary = train(config, ToyTask(config), run)
    assert summary["completed"] and summary["step"] == 16 and summary["bad_steps"] == 0
    assert (run / "config.yaml").is_file() and (run / "curves.png").stat().st_size > 1000
    assert any((run / "tb").iterdir())
    # checkpoints: every 3 steps and at each epoch end (8, 16); the last 2 kept; latest -> the newest
    steps = [s for s, _ in ckpt.list_step_dirs(run / "checkpoints")]
    assert steps == [16, 15]
    assert (run / "checkpoints" / "latest").resolve().name == "step_00000016"
    state = torch.load(run / "checkpoints" / "latest" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 16 and state["epoch"] == 2 and state["step_in_epoch"] == 0
    assert set(state["rng"][0]) == {"torch", "cuda", "numpy", "python"}
    assert ckpt.verify_checkpoint(run / "checkpoints" / "latest") is None
    # metrics.jsonl: train lines every step, valid lines per epoch with the task's metrics
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if r["split"] == "train"]
    valid_lines = [r for r in records if r["split"] == "valid"]
    assert [r["step"] for r in train_lines] == list(range(1, 17))
    assert [(r["step"], r["epoch"]) for r in valid_lines] == [(8, 1), (16, 2)]
    for key in ("lr", "loss", "loss_mlm", "loss_matched", "loss_obj", "loss_attr", "loss_feat", "grad_norm"):
        assert math.isfinite(train_lines[-1][key]), key
    assert train_lines[0]["lr"] == 0.0  # the original schedule: the first update has lr 0
    assert "score" in valid_lines[-1] and "loss" in valid_lines[-1]
    assert summary["best_score"] == max(r["score"] for r in valid_lines)
    assert (run / "best" / "model.safetensors").is_file() and (run / "final" / "features.json").is_file()
    # final == the last checkpoint's weights; both load in transformers with nothing missing
    assert_bitwise_equal(weights(run / "final"), weights(run / "checkpoints" / "latest"))
    transformers = pytest.importorskip("transformers")
    for directory in (run / "final", run / "checkpoints" / "latest"):
        hf, info = transformers.LxmertForPreTraining.from_pretrained(str(directory), output_loading_info=True)
        assert set(info["missing_keys"]) <= {"cls.predictions.decoder.weight"}
        assert not info["unexpected_keys"] and not info["mismatched_keys"]
        ours = weights(directory)
        torch.testing.assert_close(hf.state_dict()["lxmert.embeddings.word_embeddings.weight"],
                                   ours["lxmert.embeddings.word_embeddings.weight"], rtol=0, atol=0)  # fmt: skip


def test_max_steps_then_resume_equals_uninterrupted(tmp_path, cfg_factory):
    """Dropout on, two epochs, a stop in the middle of the first: the same weights bit for bit."""
    config = cfg_factory(epochs=2)
    train(config, ToyTask(config), tmp_path / "a")
    first = train(config, ToyTask(config), tmp_path / "b", max_steps=5)
    assert first["step"] == 5 and not first["completed"]
    state = torch.load(tmp_path / "b" / "checkpoints" / "latest" / "trainer_state.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (0, 5)
    second = train(config, ToyTask(config), tmp_path / "b", resume=True)
    assert second["step"] == 16 and second["completed"]
    assert_bitwise_equal(weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final"))
    # the resumed run's log reads as the uninterrupted one's
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))


def test_resume_refuses_changed_run_defining_settings(tmp_path, cfg_factory):
    config = cfg_factory(epochs=2)
    train(config, ToyTask(config), tmp_path / "run", max_steps=2)
    changed = dataclasses.replace(
        config, data=dataclasses.replace(config.data, batch_size=config.data.batch_size * 2)
    )
    with pytest.raises(ConfigError, match=r"started with data\.batch_size=.*--resume with data\.batch_size="):
        train(changed, ToyTask(changed), tmp_path / "run", resume=True)
    # a setting that does not define the run (how often to log) may change
    relogged = dataclasses.replace(config, train=dataclasses.replace(config.train, log_every=3))
    assert train(relogged, ToyTask(relogged), tmp_path / "run", resume=True)["completed"]


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, cfg_factory, caplog):
    config = cfg_factory(epochs=1, save_every=2, keep=3)
    run = tmp_path / "run"
    train(config, ToyTask(config), run, max_steps=6)
    latest = run / "checkpoints" / "latest"
    blob = latest / "model.safetensors"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert "sha256" in ckpt.verify_checkpoint(latest.resolve())
    with caplog.at_level(logging.WARNING):
        found = ckpt.find_resume_checkpoint(run)
    assert found.name == "step_00000004"
    assert "damaged checkpoint skipped" in caplog.text and "step_00000006" in caplog.text
    # a truncated trainer state is caught by its size
    (found / "trainer_state.pt").write_bytes((found / "trainer_state.pt").read_bytes()[:100])
    assert "bytes, the manifest says" in ckpt.verify_checkpoint(found)
    summary = train(config, ToyTask(config), run, resume=True)  # falls back to step 2
    assert summary["step"] == 8 and summary["completed"]
    train(config, ToyTask(config), tmp_path / "ref")
    assert_bitwise_equal(weights(run / "final"), weights(tmp_path / "ref" / "final"))


def test_resume_without_any_checkpoint_is_refused(tmp_path, cfg_factory):
    config = cfg_factory()
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in .*start the run without --resume"):
        train(config, ToyTask(config), tmp_path / "empty", resume=True)


def test_non_finite_loss_is_skipped_and_counted(tmp_path, cfg_factory, caplog):
    config = cfg_factory(epochs=1)
    with caplog.at_level(logging.WARNING):
        summary = train(config, ToyTask(config, nan_at_calls={3}), tmp_path / "run")
    assert summary["bad_steps"] == 1 and summary["completed"]
    assert "step 3: non-finite loss; update skipped (1 in a row, 1 in all)" in caplog.text
    for name, value in weights(tmp_path / "run" / "final").items():
        assert torch.isfinite(value).all(), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 3 not in steps and 4 in steps


def test_too_many_non_finite_losses_in_a_row_stop_the_run(tmp_path, cfg_factory):
    config = cfg_factory(epochs=1, max_bad_steps=3)
    with pytest.raises(TrainingStopped, match=r"stopped at step 4 \(epoch 1\): 3 non-finite losses in a row"):
        train(config, ToyTask(config, nan_at_calls={2, 3, 4, 5}), tmp_path / "run")


def test_micro_batching_rules():
    loop = TrainLoopConfig()
    assert micro_batching(256, 1, loop) == (256, 1)
    assert micro_batching(256, 4, loop) == (64, 1)
    assert micro_batching(256, 4, TrainLoopConfig(micro_batch_size=16)) == (16, 4)
    assert micro_batching(256, 2, TrainLoopConfig(grad_accumulation=4)) == (32, 4)
    with pytest.raises(ConfigError, match=r"data.batch_size=10 over 4 process\(es\): not divisible"):
        micro_batching(10, 4, loop)
    with pytest.raises(ConfigError, match="train.micro_batch_size=12 does not divide it evenly"):
        micro_batching(256, 2, TrainLoopConfig(micro_batch_size=12))


@pytest.mark.parametrize("world,accum", [(1, 4), (2, 2), (4, 1)])
def test_sampler_gives_each_step_the_same_items_whatever_the_processes(world, accum):
    n, batch, micro = 37, 8, 2
    per_rank = [
        list(GlobalBatchSampler(n, batch, micro, accum, r, world, seed=3, epoch=1)) for r in range(world)
    ]
    steps = n // batch
    for s in range(steps):
        got = []
        for a in range(accum):
            for r in range(world):
                got += per_rank[r][(s * accum + a) * micro : (s * accum + a + 1) * micro]
        order = np.random.default_rng([3, 1]).permutation(n)
        assert got == order[s * batch : (s + 1) * batch].tolist()
    resumed = list(GlobalBatchSampler(n, batch, micro, accum, 0, world, seed=3, epoch=1, start_step=2))
    assert resumed == per_rank[0][2 * accum * micro :]


def test_cli_config_errors_are_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: fast\n")
    assert cli_main(["pretrain", "--config", str(bad), "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optim.lr: expected float" in err
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  epochs: 1\n")
    assert cli_main(["pretrain", "--config", str(good), "--output", str(tmp_path / "r"), "optim.nope=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown key optim.nope" in err
    assert (
        cli_main(["pretrain", "--config", str(tmp_path / "missing.yaml"), "--output", str(tmp_path / "r")])
        == 2
    )
    assert "cannot read the config file" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r" / "checkpoints")


def test_cli_amp_flag_sets_train_amp_and_refuses_other_values(tmp_path, capsys):
    from tasks.cli import build_parser, resolve_config

    good = tmp_path / "good.yaml"
    good.write_text("train:\n  amp: none\n")
    args = build_parser().parse_intermixed_args(
        ["pretrain", "--config", str(good), "--output", str(tmp_path / "r"), "--amp", "bf16", "optim.lr=1e-5"]
    )
    config = resolve_config(args)
    assert config.train.amp == "bf16" and config.optim.lr == 1e-5
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_intermixed_args(["pretrain", "--output", "r", "--amp", "fp8"])
    assert exc.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


def test_eval_only_without_config_keeps_amp_over_the_runs_own_config(tmp_path):
    """--eval-only without --config takes RUN_DIR/config.yaml beside --load; --amp still applies on top."""
    from tasks.cli import build_parser, resolve_config

    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "config.yaml").write_text("task: vqa\ntrain:\n  amp: none\ndata:\n  eval_batch_size: 7\n")
    args = build_parser().parse_intermixed_args(
        [
            "vqa",
            "--eval-only",
            "--load",
            str(run / "best"),
            "--data",
            "x.json",
            "--output",
            "o",
            "--amp",
            "bf16",
        ]
    )
    config = resolve_config(args)
    assert config.train.amp == "bf16"  # before: the run's config reloaded and --amp dropped
    assert config.data.eval_batch_size == 7  # the run's own config is the base


def test_fp16_runs_with_a_grad_scaler_saved_and_resumed(tmp_path, cfg_factory):
    config = cfg_factory(epochs=1, amp="fp16")
    train(config, ToyTask(config), tmp_path / "run", max_steps=3)
    state = ckpt.load_trainer_state(tmp_path / "run" / "checkpoints" / "latest")
    assert state["scaler"]["scale"] > 0
    summary = train(config, ToyTask(config), tmp_path / "run", resume=True)
    assert summary["completed"]
    for name, value in weights(tmp_path / "run" / "final").items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), name


def test_amp_auto_follows_the_device(monkeypatch):
    import tasks.engine.precision as precision_module

    assert resolve_amp("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_amp("none", torch.device("cuda", 0)) is None
    assert resolve_amp("fp16", torch.device("cpu")) == torch.float16
    monkeypatch.setattr(precision_module, "cpu_autocast_is_fast", lambda dtype: False)
    assert resolve_amp("auto", torch.device("cpu")) is None
    monkeypatch.setattr(precision_module, "cpu_autocast_is_fast", lambda dtype: True)
    assert resolve_amp("auto", torch.device("cpu")) == torch.bfloat16


def test_tf32_setting_makes_float32_mean_ieee_float32_on_cuda():
    """train.tf32 false (every recipe): float32 matmuls and cuDNN convolutions in IEEE float32 on CUDA."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.fp32_precision, cudnn.fp32_precision)
    try:
        set_tf32(torch.device("cuda", 0), True)
        assert (matmul.fp32_precision, cudnn.conv.fp32_precision) == ("tf32", "tf32")
        set_tf32(torch.device("cpu"), True)  # other devices: untouched
        set_tf32(torch.device("cuda", 0), False)
        assert (matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision) == ("ieee",) * 3
        set_tf32(torch.device("cpu"), True)
        assert matmul.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision, cudnn.fp32_precision = before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_float32_matmul_is_ieee_on_cuda_unless_tf32_is_allowed():
    """On the GPU itself: train.tf32 false gives float32 products within float32 rounding of float64; true
    (Ampere and later) lets them drop to TF32's 10-bit mantissa."""
    device = torch.device("cuda")
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.fp32_precision, cudnn.fp32_precision)
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    exact = a.double() @ b.double()

    def error() -> float:
        return ((a @ b).double() - exact).abs().max().item() / exact.abs().max().item()

    try:
        set_tf32(device, False)
        assert error() < 1e-5
        set_tf32(device, True)
        if torch.cuda.get_device_capability()[0] >= 8:
            assert error() > 1e-4
    finally:
        matmul.fp32_precision, cudnn.fp32_precision = before


def test_a_new_run_refuses_a_run_dir_with_checkpoints(tmp_path, cfg_factory):
    config = cfg_factory(epochs=1)
    train(config, ToyTask(config), tmp_path / "run", max_steps=1)
    with pytest.raises(ConfigError, match="already holds the checkpoints of a run: add --resume"):
        train(config, ToyTask(config), tmp_path / "run")
