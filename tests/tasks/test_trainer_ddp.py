"""Two gloo processes under torchrun reach the same weights as one process with the same global batch."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from toy_task import ToyTask, toy_config, train_on_two_processes

from tasks.engine.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation(tmp_path, tiny_store, tiny_items):
    train_json, _ = tiny_items
    # global batch 4: 2 processes x micro batch 2, against 1 process x 2 accumulation steps x micro batch 2
    two = toy_config(tmp_path, tiny_store, train_json, epochs=1, log_every=4)
    proc = train_on_two_processes(two, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 process(es)" not in proc.stderr and "2 process(es) x 1 accumulation x 2" in proc.stderr

    one = toy_config(tmp_path, tiny_store, train_json, epochs=1, log_every=4, grad_accumulation=2)
    summary = train(one, ToyTask(one, dropout=0.0), tmp_path / "single")
    assert summary["step"] == 8

    ddp = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    single = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    start = ToyTask(one, dropout=0.0)
    torch.manual_seed(one.train.seed)
    initial = start.build_model(None).state_dict()
    assert ddp.keys() == single.keys()
    moved = 0.0
    for k in ddp:
        torch.testing.assert_close(ddp[k], single[k], rtol=0, atol=1e-6, msg=k)
        moved = max(moved, (single[k] - initial[k]).abs().max().item())
    assert moved > 1e-3  # the runs trained: equal weights are not just the initial ones
