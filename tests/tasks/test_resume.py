"""kill -9 in the middle of a run, then --resume: bitwise the same weights as a run never interrupted (CPU,
fp32, one process, DataLoader workers, dropout on, stopped mid-epoch)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy_task import ToyTask, toy_config

from common.config import save_config
from tasks.engine import checkpointing as ckpt
from tasks.engine.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = Path(__file__).resolve().parent / "toy_task.py"
ROOT = Path(__file__).resolve().parents[2]


def run_toy(config_path: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(TOY), str(config_path), str(run_dir), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_kill_9_then_resume_is_bitwise_equal_to_uninterrupted(tmp_path, tiny_store, tiny_items):
    train_json, valid_json = tiny_items
    # 8 steps per epoch, 2 epochs, a checkpoint every 3 steps; 2 loader workers in the killed / resumed run
    config = toy_config(
        tmp_path, tiny_store, train_json, valid_json, epochs=2, save_every=3, data={"workers": 2}
    )
    save_config(config, tmp_path / "config.yaml")
    killed = run_toy(tmp_path / "config.yaml", tmp_path / "run", "--kill-at-call", "11")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # killed during step 11: the last checkpoint is step 9 (second epoch, step 1 of 8 done)
    assert (tmp_path / "run" / "checkpoints" / "latest").resolve().name == "step_00000009"
    state = ckpt.load_trainer_state(tmp_path / "run" / "checkpoints" / "latest")
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (9, 1, 1)

    resumed = run_toy(tmp_path / "config.yaml", tmp_path / "run", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "step 9" in resumed.stderr
    assert json.loads(resumed.stdout.split("SUMMARY ", 1)[1])["step"] == 16

    # the uninterrupted run, here in this process and without workers
    plain = toy_config(tmp_path, tiny_store, train_json, valid_json, epochs=2, save_every=3)
    train(plain, ToyTask(plain), tmp_path / "plain")
    a = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the optimizer moments too
    sa = ckpt.load_trainer_state(tmp_path / "run" / "checkpoints" / "latest")["optimizer"]["state"]
    sb = ckpt.load_trainer_state(tmp_path / "plain" / "checkpoints" / "latest")["optimizer"]["state"]
    for i in sa:
        assert torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])

    # and the logs: the valid lines of both epochs, identical
    def valid_lines(run):
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in lines if r["split"] == "valid"]

    assert valid_lines(tmp_path / "run") == valid_lines(tmp_path / "plain")
