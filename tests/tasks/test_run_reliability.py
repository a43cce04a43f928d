"""lxmert-train against what an adversarial user does (issue 24): out-of-range settings and a file as --output,
a rerun of a finished run, two runs on one RUN_DIR, a full disk, bad records."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from finetune_data import qa_setup
from safetensors.torch import load_file
from toy_task import ToyTask, toy_config, write_tiny_store

from common import diskspace
from common.config import save_config
from common.lock import FolderLock
from extract.store import FeatureStore
from tasks.cli import main as cli_main
from tasks.engine import TrainingStopped, checkpointing, train

TOY = Path(__file__).resolve().parent / "toy_task.py"
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 1\n")
    return path


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.save_every=-3", "train.save_every"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("train.epochs=-1", "train.epochs"),
        ("data.workers=-1", "data.workers"),
    ],
)
def test_out_of_range_settings_are_one_line_and_exit_2(tmp_path, capsys, override, key):
    out = tmp_path / "r"
    config = str(_config_file(tmp_path))
    assert cli_main(["pretrain", "--config", config, "--output", str(out), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{key}: must be" in err, err
    assert not out.exists()


def test_output_naming_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    assert cli_main(["pretrain", "--config", str(_config_file(tmp_path)), "--output", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--output {target} is a file" in err, err
    assert target.read_text() == "mine\n"
    argv = ["vqa", "--eval-only", "--load", str(tmp_path), "--data", "x.json", "--output", str(target)]
    assert cli_main(argv) == 2
    assert f"--output {target} is a file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ a finished run, again
def _vqa_config_file(tmp_path: Path, **loop) -> Path:
    cfg = qa_setup(tmp_path / "data", n_train=32, n_valid=8)
    cfg.train.epochs = 1
    for key, value in loop.items():
        setattr(cfg.train, key, value)
    return save_config(cfg, tmp_path / "vqa.yaml")


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in [*run.glob(".tmp-*"), *run.glob("checkpoints/.tmp-*"), *run.glob(".old-*")])


def test_resume_of_a_finished_run_says_so_and_exits_0(tmp_path, capsys):
    config, run = str(_vqa_config_file(tmp_path)), tmp_path / "run"
    assert cli_main(["vqa", "--config", config, "--output", str(run)]) == 0
    capsys.readouterr()
    final = (run / "final" / "model.safetensors").read_bytes()
    metrics = (run / "metrics.jsonl").read_text()
    # the pipeline adds --resume whenever a checkpoint exists: a rerun of the finished stage must pass
    assert cli_main(["vqa", "--config", config, "--output", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "already finished at step 2/2" in out and "nothing to do" in out, out
    assert (run / "final" / "model.safetensors").read_bytes() == final
    assert (run / "metrics.jsonl").read_text() == metrics
    assert _leftovers(run) == []


def test_resume_of_a_run_killed_while_writing_final(tmp_path, capsys):
    config, run = str(_vqa_config_file(tmp_path)), tmp_path / "run"
    assert cli_main(["vqa", "--config", config, "--output", str(run)]) == 0
    final = (run / "final" / "model.safetensors").read_bytes()
    # killed while writing final/: the last checkpoint is complete, final/ is a half-written temporary folder
    (run / "final").rename(run / ".tmp-final-99999")
    (run / ".tmp-final-99999" / "model.safetensors").write_bytes(final[:100])
    (run / "checkpoints" / ".tmp-step_00000003-99999").mkdir()
    capsys.readouterr()
    assert cli_main(["vqa", "--config", config, "--output", str(run), "--resume"]) == 0
    assert "already finished at step 2/2" in capsys.readouterr().out
    assert (run / "final" / "model.safetensors").read_bytes() == final  # the last checkpoint's weights
    assert _leftovers(run) == []


# ------------------------------------------------------------------------------------ two runs, one RUN_DIR
def test_cli_refuses_a_run_dir_held_by_another_run(tmp_path, capsys):
    config, run = str(_vqa_config_file(tmp_path)), tmp_path / "run"
    with FolderLock(run, "lxmert-train vqa"):
        assert cli_main(["vqa", "--config", config, "--output", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"in use by lxmert-train vqa (pid {os.getpid()} on" in err, err
    assert sorted(p.name for p in run.iterdir()) == []  # nothing written by the refused run


@pytest.mark.slow
def test_two_processes_on_one_run_dir_then_kill_9(tmp_path, tiny_store, tiny_items):
    """A holds RUN_DIR (paused mid-run); B is refused naming A and touches nothing; A is killed with SIGKILL; C
    (--resume) finds A's lock stale, takes it over and finishes the run."""
    train_json, _ = tiny_items
    config = toy_config(tmp_path, tiny_store, train_json, epochs=2, save_every=2)
    save_config(config, tmp_path / "config.yaml")
    run, marker = tmp_path / "run", tmp_path / "run.paused"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(TOY), str(tmp_path / "config.yaml"), str(run)]
    a = subprocess.Popen(
        [*cmd, "--pause-at-call", "6"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        for _ in range(1200):  # until A pauses at its 6th step (checkpoints at steps 2 and 4 written)
            if marker.exists() or a.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.read_text() == str(a.pid)
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
        b = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=240)
        assert b.returncode != 0 and f"in use by lxmert-train toy (pid {a.pid} on" in b.stderr, b.stderr[
            -2000:
        ]
        after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
        assert after == before  # B wrote nothing: A's logs and checkpoints are intact
        a.kill()
        a.wait(timeout=30)
    finally:
        if a.poll() is None:
            a.kill()
    c = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=240)
    assert c.returncode == 0, c.stderr[-3000:]
    assert f"stale lock of lxmert-train toy (pid {a.pid} on" in c.stderr and "taken over" in c.stderr
    assert json.loads(c.stdout.split("SUMMARY ", 1)[1])["step"] == 16
    assert not (run / ".lock").exists()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))  # one line per step, none lost or doubled


# ------------------------------------------------------------------------------------------------ a full disk
def _disk_full_at_save(monkeypatch, nth: int, error: Exception) -> None:
    """The ``nth`` torch.save of a trainer state (a checkpoint) fails as on a full disk, after writing a part."""
    real, calls = checkpointing.torch.save, [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            Path(f).write_bytes(b"partial")
            raise error
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", save)


@pytest.mark.parametrize("how", ["ENOSPC", "torch"])
def test_full_disk_at_a_checkpoint_stops_in_one_line_and_resumes_exactly(
    tmp_path, tiny_store, tiny_items, monkeypatch, how
):
    if how == "ENOSPC":
        error: Exception = OSError(errno.ENOSPC, "No space left on device")
    else:  # what torch.save says on a full disk: nothing about space (the free space tells)
        error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        monkeypatch.setattr(diskspace, "free_bytes", lambda path: 4096)
    train_json, _ = tiny_items
    config = toy_config(tmp_path, tiny_store, train_json, epochs=2, save_every=3)
    _disk_full_at_save(monkeypatch, nth=2, error=error)  # step 3 saved, step 6 meets the full disk
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped) as info:
        train(config, ToyTask(config), run)
    msg = str(info.value)
    assert "\n" not in msg and f"disk full: cannot write {run / 'checkpoints' / 'step_00000006'}" in msg
    assert "free on that file system" in msg and "step_00000003" in msg and "--resume" in msg, msg
    assert _leftovers(run) == [] and not (run / "checkpoints" / "step_00000006").exists()
    if how != "ENOSPC":
        return  # the resume below does not depend on how the disk said it
    monkeypatch.undo()  # space freed
    train(config, ToyTask(config), run, resume=True)
    train(config, ToyTask(config), tmp_path / "plain")
    a = load_file(str(run / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_full_disk_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    config, run = str(_vqa_config_file(tmp_path)), tmp_path / "run"
    _disk_full_at_save(monkeypatch, nth=1, error=OSError(errno.ENOSPC, "No space left on device"))
    assert cli_main(["vqa", "--config", config, "--output", str(run)]) == 1
    err = [
        line
        for line in re.split(r"[\r\n]", capsys.readouterr().err)
        if line.strip() and not line.startswith(("train:", "INFO"))  # the progress bar, the log
    ]
    assert len(err) == 1 and "disk full: cannot write" in err[0] and "no checkpoint was written yet" in err[0]


# ------------------------------------------------------------------------------------------------ bad records
def _damaged_toy(tmp_path, tiny_items, damage, **loop):
    store = tmp_path / "store.lmdb"
    write_tiny_store(store, n_images=8)
    damage(store)
    return toy_config(tmp_path, store, tiny_items[0], **loop)


@pytest.mark.parametrize(
    ("how", "workers", "message"),
    [
        # the damaged page holds img005 and its neighbours: the first of them read is named
        ("page", 0, r"image '(img00\d)' cannot be used: .*store.lmdb: damaged LMDB pages reading image '\1'"),
        ("page", 2, r"image '(img00\d)' cannot be used: .*store.lmdb: damaged LMDB pages reading image '\1'"),
        ("bit", 2, r"image 'img003' cannot be used: .*store.lmdb: record 'img003': CRC32 mismatch"),
    ],
)
def test_damaged_records_stop_training_naming_image_and_store(
    tmp_path, tiny_items, store_damage, how, workers, message
):
    def damage(store):
        if how == "page":
            store_damage.break_page_of(store, "img005")
        else:
            store_damage.flip_feature_bit(store, "img003")

    config = _damaged_toy(tmp_path, tiny_items, damage, data={"workers": workers})
    with pytest.raises(TrainingStopped) as info:
        train(config, ToyTask(config), tmp_path / "run")
    msg = str(info.value)
    assert re.search(message, msg) and "\n" not in msg and "Traceback" not in msg, msg
    assert "lxmert-features verify" in msg and "no checkpoint was written yet" in msg


def test_nan_features_are_named_not_blamed_on_the_learning_rate(tmp_path, tiny_items):
    import numpy as np

    from extract.store import FeatureWriter

    store = tmp_path / "store.lmdb"
    write_tiny_store(store, n_images=8)
    with FeatureStore(store) as reader:
        record = dict(reader["img006"])
    record["features"] = record["features"].copy()
    record["features"][0, 0] = np.nan
    with FeatureWriter(store, {"source": "test", "file": "store.lmdb"}, overwrite=True) as writer:
        writer.put("img006", record)  # written so by its extractor: the CRC matches
    config = toy_config(tmp_path, store, tiny_items[0], save_every=2)
    with pytest.raises(TrainingStopped) as info:
        train(config, ToyTask(config), tmp_path / "run")
    msg = str(info.value)
    assert "image 'img006' cannot be used" in msg and "NaN or infinite values in features" in msg, msg
    assert "optim.lr" not in msg and "latest" not in msg
    named = re.search(r"the last checkpoint is (\S+) \(step \d+\)", msg)
    assert named is None or Path(named.group(1)).is_dir()  # a checkpoint named exists


def test_non_finite_losses_name_a_checkpoint_that_exists(tmp_path, tiny_store, tiny_items):
    config = toy_config(tmp_path, tiny_store, tiny_items[0], epochs=1, max_bad_steps=2)
    with pytest.raises(TrainingStopped) as info:
        train(config, ToyTask(config, nan_at_calls={1, 2}), tmp_path / "first")
    msg = str(info.value)
    assert "no checkpoint was written yet" in msg and "latest" not in msg, msg
    config = toy_config(tmp_path, tiny_store, tiny_items[0], epochs=1, max_bad_steps=2, save_every=2)
    with pytest.raises(TrainingStopped) as info:
        train(config, ToyTask(config, nan_at_calls={5, 6}), tmp_path / "second")
    msg = str(info.value)
    assert (
        f"--resume to continue from {tmp_path / 'second' / 'checkpoints' / 'step_00000004'} (step 4)" in msg
    )


def test_cli_damaged_store_is_one_line_exit_1(tmp_path, capsys, store_damage):
    cfg = qa_setup(tmp_path / "data", n_train=32, n_valid=8, workers=2)
    cfg.train.epochs = 1
    store_damage.break_page_of(Path(cfg.data.features[0]), "img0010")
    config = str(save_config(cfg, tmp_path / "vqa.yaml"))
    assert cli_main(["vqa", "--config", config, "--output", str(tmp_path / "run")]) == 1
    err = [
        line
        for line in re.split(r"[\r\n]", capsys.readouterr().err)
        if line.strip() and not line.startswith(("train:", "INFO", "\x1b"))
    ]
    assert (
        len(err) == 1 and "image 'img0010' cannot be used" in err[0] and "lxmert-features verify" in err[0]
    ), err
