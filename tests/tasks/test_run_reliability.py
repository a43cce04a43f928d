"""lxmert-train against what an adversarial user does (issue 24): out-of-range settings and a file as --output,
a rerun of a finished run, two runs on one RUN_DIR, a full disk, bad records."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.cli import main as cli_main

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
