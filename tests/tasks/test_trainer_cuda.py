"""The trainer's CUDA paths on the toy task: pinned-memory loader workers, fp16 with the grad scaler, bf16 autocast,
CUDA equal to CPU in fp32, and two nccl processes equal to one (with two GPUs). Skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy_task import ToyTask, toy_config, train_on_two_processes

from tasks.engine import checkpointing as ckpt
from tasks.engine.trainer import train

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("one_thread"),
]


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def test_cuda_fp32_with_pinned_workers_equals_cpu(tmp_path, tiny_store, tiny_items):
    """Two loader workers with pinned memory on CUDA reach the weights of the CPU run (dropout off; Adam's
    normalised steps let float rounding move a weight by up to ~lr over the run, hence 1e-3)."""
    train_json, _ = tiny_items
    runs = {}
    for device, workers in (("cpu", 0), ("cuda", 2)):
        config = toy_config(
            tmp_path, tiny_store, train_json, epochs=1, device=device, data={"workers": workers}
        )
        summary = train(config, ToyTask(config, dropout=0.0), tmp_path / device)
        assert summary["completed"] and summary["bad_steps"] == 0
        runs[device] = _final(tmp_path / device)
    for name, value in runs["cpu"].items():
        torch.testing.assert_close(runs["cuda"][name], value, rtol=1e-3, atol=1e-3, msg=name)


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_cuda_mixed_precision_trains_and_resumes(tmp_path, tiny_store, tiny_items, amp):
    """fp16 runs with an active grad scaler (saved and resumed), bf16 without one; weights stay float32."""
    train_json, _ = tiny_items
    config = toy_config(tmp_path, tiny_store, train_json, epochs=2, device="cuda", amp=amp)
    run = tmp_path / "run"
    train(config, ToyTask(config), run, max_steps=3)
    state = ckpt.load_trainer_state(run / "checkpoints" / "latest")
    assert (state["scaler"].get("scale", 0) > 0) == (amp == "fp16")
    summary = train(config, ToyTask(config), run, resume=True)
    assert summary["completed"] and summary["bad_steps"] == 0
    for name, value in _final(run).items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_nccl_processes_equal_one_process_with_accumulation(tmp_path, tiny_store, tiny_items):
    train_json, _ = tiny_items
    two = toy_config(tmp_path, tiny_store, train_json, epochs=1, log_every=4, device="cuda")
    proc = train_on_two_processes(two, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) x 1 accumulation x 2" in proc.stderr

    one = toy_config(
        tmp_path, tiny_store, train_json, epochs=1, log_every=4, grad_accumulation=2, device="cuda"
    )
    train(one, ToyTask(one, dropout=0.0), tmp_path / "single")
    ddp, single = _final(tmp_path / "ddp"), _final(tmp_path / "single")
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-5, msg=name)
