"""Damaged model folders (issue 24, case 9): every CLI that reads a model says what is wrong in one line and exits
with its documented status: lxmert-answer 2 (refused before answering), lxmert-train --load and --eval-only 1."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from finetune_data import qa_setup
from PIL import Image

from common.config import save_config
from tasks.answer.cli import main as answer_main
from tasks.cli import main as train_main
from tasks.engine.checkpointing import save_model_dir
from tasks.finetune import vqa

pytestmark = pytest.mark.usefixtures("one_thread")


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


DAMAGE = {
    "truncated weights": lambda d: _truncate(d / "model.safetensors"),
    "empty weights": lambda d: (d / "model.safetensors").write_bytes(b""),
    "garbage weights": lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64),
    "no weights": lambda d: (d / "model.safetensors").unlink(),
    "broken config.json": lambda d: (d / "config.json").write_text("{oops"),
    "config.json of another model": lambda d: (d / "config.json").write_text('{"hidden_size": "big"}'),
    "broken label2ans.json": lambda d: (d / "label2ans.json").write_text("[1, 2"),
    "broken features.json": lambda d: (d / "features.json").write_text("{oops"),
    "broken extractor.json": lambda d: (d / "extractor.json").write_text("{oops"),
}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> tuple[Path, Path]:
    """(a fine-tuned tiny VQA model folder, the config it was trained with)."""
    root = tmp_path_factory.mktemp("damaged")
    cfg = qa_setup(root, n_train=16, n_valid=8)
    task = vqa.build(cfg)
    folder = save_model_dir(root / "model", task.build_model(None), task.checkpoint_extras())
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(root / "photo.jpg")
    return folder, save_config(cfg, root / "vqa.yaml")


def _damaged(model_folder: tuple[Path, Path], tmp_path: Path, kind: str) -> Path:
    folder = Path(shutil.copytree(model_folder[0], tmp_path / "model"))
    DAMAGE[kind](folder)
    return folder


def _message_lines(err: str) -> list[str]:
    """stderr without progress bars and log records."""
    return [
        line
        for line in re.split(r"[\r\n]", err)
        if line.strip() and not line.startswith(("train:", "INFO", "WARNING", "\x1b"))
    ]


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_lxmert_answer_refuses_with_exit_2(model_folder, tmp_path, capsys, kind):
    folder = _damaged(model_folder, tmp_path, kind)
    image = model_folder[0].parent / "photo.jpg"
    argv = [
        str(image),
        "What colour is it?",
        "--model",
        str(folder),
        "--random-weights",
        "--config",
        "vg_tiny",
    ]
    assert answer_main([*argv, "--min-size", "64", "--max-size", "112"]) == 2
    lines = _message_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(folder) in lines[0], lines


@pytest.mark.parametrize("kind", ["truncated weights", "empty weights", "no weights", "broken config.json"])
def test_lxmert_train_load_exits_1_in_one_line(model_folder, tmp_path, capsys, kind):
    folder = _damaged(model_folder, tmp_path, kind)
    argv = ["vqa", "--config", str(model_folder[1]), "--output", str(tmp_path / "run"), "--load", str(folder)]
    assert train_main(argv) == 1
    lines = _message_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(folder) in lines[0], lines


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_eval_only_exits_1_in_one_line(model_folder, tmp_path, capsys, kind):
    folder = _damaged(model_folder, tmp_path, kind)
    cfg = model_folder[1]
    data = str(cfg.parent / "valid.json")
    argv = ["vqa", "--eval-only", "--load", str(folder), "--data", data, "--output", str(tmp_path / "out")]
    code = train_main([*argv, "--config", str(cfg)])
    lines = _message_lines(capsys.readouterr().err)
    assert code == 1 and len(lines) == 1 and str(folder) in lines[0], lines


@pytest.mark.parametrize("kind", ["truncated weights", "broken config.json", "config.json of another model"])
def test_every_task_names_a_damaged_load(model_folder, tmp_path, kind):
    from finetune_data import nlvr2_setup

    from tasks.data.model_folder import ModelLoadError
    from tasks.finetune import nlvr2
    from tasks.pretrain.task import PretrainTask

    folder = _damaged(model_folder, tmp_path, kind)
    pre = qa_setup(tmp_path / "pre", n_train=4, n_valid=2)
    sentences = [{"img_id": "img0000", "sentf": {"mscoco": ["a red thing", "red"]}}]
    (tmp_path / "pre" / "pretrain.json").write_text(json.dumps(sentences))
    pre.task, pre.pretrain.qa, pre.data.valid = "pretrain", False, ""
    pre.data.train = [str(tmp_path / "pre" / "pretrain.json")]
    for task in (nlvr2.build(nlvr2_setup(tmp_path / "n", n_images=8)), PretrainTask(pre)):
        with pytest.raises(ModelLoadError, match=f"cannot load the model {folder}"):
            task.build_model(str(folder))
