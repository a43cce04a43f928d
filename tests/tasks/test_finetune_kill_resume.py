"""Fine-tuning killed with SIGKILL in the middle of an epoch, then ``lxmert-train TASK ... --resume``: bitwise the
weights, best model and validation log of a run never interrupted (VQA and NLVR2, CPU, fp32, dropout on).

The killed and resumed runs are real ``lxmert-train`` processes (:func:`tasks.cli.main`); the killed one registers
a builder whose task sends itself SIGKILL at its n-th training step, so the kill lands at a known step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from finetune_data import TINY_MODEL, nlvr2_setup, qa_setup, write_json
from safetensors.torch import load_file

from common.config import save_config
from model import LxmertConfig, LxmertForPreTraining
from tasks.engine import checkpointing as ckpt
from tasks.engine.trainer import train
from tasks.finetune import nlvr2, vqa

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]

# argv: TASK KILL_AT_CALL CLI-ARGS...; KILL_AT_CALL 0 = no kill (the resumed run)
DRIVER = """
import os, signal, sys
from tasks import cli, registry

task_name, kill_at = sys.argv[1], int(sys.argv[2])
build = registry.TASKS[task_name]

def killing_build(config, load=None):
    task = build(config, load)
    step, calls = task.step, [0]

    def step_then_die(model, batch, epoch):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(model, batch, epoch)

    task.step = step_then_die
    return task

if kill_at:
    registry.TASKS[task_name] = killing_build
sys.exit(cli.main(sys.argv[3:]))
"""


def lxmert_train(task: str, kill_at: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", DRIVER, task, str(kill_at), task, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def pretrained(folder: Path) -> str:
    """A tiny pretraining folder (QA head over 6 answers, 3 of them colours; label2ans.json beside)."""
    torch.manual_seed(0)
    answers = ["blue", "dog", "red", "2", "green", "cat"]
    cfg = LxmertConfig(**TINY_MODEL, num_qa_labels=len(answers), num_object_labels=5, num_attr_labels=3)
    LxmertForPreTraining(cfg).save_pretrained(folder)
    write_json(folder / "label2ans.json", answers)
    return str(folder)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_kill_9_mid_epoch_then_resume_equals_uninterrupted(tmp_path: Path, task: str):
    if task == "vqa":
        cfg = qa_setup(tmp_path / "data", n_train=48, n_valid=8)  # 3 steps per epoch
    else:
        cfg = nlvr2_setup(tmp_path / "data", n_images=48)  # 48 pairs: 3 steps per epoch
    cfg.train.epochs = 3
    cfg.train.save_every = 2
    cfg.model.hidden_dropout_prob = 0.1  # the dropout draws must resume too
    config = tmp_path / "config.yaml"
    save_config(cfg, config)
    run = tmp_path / "run"
    load = pretrained(tmp_path / "pre")  # the issue's `--load PRETRAINED [--resume]`

    # killed during step 6 (the last step of epoch 2): checkpoints at 2, 3 (epoch end), 4 -> latest is step 4
    killed = lxmert_train(task, 6, "--config", str(config), "--output", str(run), "--load", load)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    if task == "vqa":
        assert "3/4 answers copied" in killed.stderr  # the head started from the pretraining QA head
    assert (run / "checkpoints" / "latest").resolve().name == "step_00000004"
    assert not (run / "final").exists()
    state = ckpt.load_trainer_state(run / "checkpoints" / "latest")
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (4, 1, 1)

    resumed = lxmert_train(task, 0, "--config", str(config), "--output", str(run), "--load", load, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "(step 4)" in resumed.stderr
    assert "done at step 9/9" in resumed.stdout

    plain = tmp_path / "plain"
    build = vqa.build if task == "vqa" else nlvr2.build
    train(cfg, build(cfg), plain, load=load)
    for folder in ("final", "best"):
        a = load_file(str(run / folder / "model.safetensors"))
        b = load_file(str(plain / folder / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (folder, k)
    sa = ckpt.load_trainer_state(run / "checkpoints" / "latest")["optimizer"]["state"]
    sb = ckpt.load_trainer_state(plain / "checkpoints" / "latest")["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) and torch.equal(
            sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]
        )

    def valid_lines(folder: Path) -> list[tuple]:
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["accuracy"]) for r in lines if r["split"] == "valid"]

    assert valid_lines(run) == valid_lines(plain)
    assert len(valid_lines(run)) == 3
    # the resumed model folder still says which answers and features it expects
    assert (run / "final" / "extractor.json").is_file() and (run / "final" / "features.json").is_file()
    if task == "vqa":
        assert json.loads((run / "final" / "label2ans.json").read_text()) == json.loads(
            Path(cfg.data.answers).read_text()
        )
