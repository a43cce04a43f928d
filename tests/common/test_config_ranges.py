"""Numeric config keys are range-checked by the loader (issue 24, case 10): a declared interval per key
(``RANGES`` beside the dataclass), NaN refused for every float; the message names the key, where it came from,
the interval and the value. Every numeric key of the training and extraction configs has an interval."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from common.config import ConfigError, check_ranges, load_config
from extract.config import ExtractConfig
from extract.selection import BoxSelection
from pipelines.config import PipelineConfig
from tasks.config import TrainConfig


@dataclass
class Loop:
    epochs: int = 3
    lr: float = 1e-3
    drop: float = 0.1
    clip: float = 1.0  # no interval: any number but NaN
    limit: int | None = None
    RANGES: ClassVar[dict[str, str]] = {
        "epochs": "[1, inf)",
        "lr": "(0, inf)",
        "drop": "[0, 1)",
        "limit": "[0, inf)",
    }


@dataclass
class Cfg:
    loop: Loop = field(default_factory=Loop)
    seed: int = 0
    RANGES: ClassVar[dict[str, str]] = {"seed": "[0, inf)"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loop.epochs=0", "loop.epochs: must be in [1, inf), got 0"),
        ("loop.epochs=-1", "loop.epochs: must be in [1, inf), got -1"),
        ("loop.lr=0", "loop.lr: must be in (0, inf), got 0.0"),
        ("loop.lr=-1e-4", "loop.lr: must be in (0, inf), got -0.0001"),
        ("loop.lr=.nan", "loop.lr: must be a number, got nan"),
        ("loop.lr=nan", "loop.lr: must be a number, got nan"),
        ("loop.drop=1", "loop.drop: must be in [0, 1), got 1.0"),
        ("loop.clip=.nan", "loop.clip: must be a number, got nan"),
        ("loop.limit=-2", "loop.limit: must be in [0, inf), got -2"),
        ("seed=-3", "seed: must be in [0, inf), got -3"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Cfg, None, [override])
    assert message in str(info.value) and f"override {override!r}" in str(info.value)


def test_values_inside_the_interval_and_null_pass() -> None:
    overrides = ["loop.epochs=1", "loop.drop=0", "loop.clip=-1", "loop.limit=null", "loop.lr=1e9"]
    loop = load_config(Cfg, None, overrides).loop
    assert (loop.epochs, loop.drop, loop.clip, loop.limit, loop.lr) == (1, 0.0, -1.0, None, 1e9)
    # no interval: infinity is a number
    assert math.isinf(load_config(Cfg, None, ["loop.clip=.inf"]).loop.clip)
    with pytest.raises(ConfigError, match=r"loop.lr: must be in \(0, inf\), got inf"):
        load_config(Cfg, None, ["loop.lr=.inf"])  # an open end excludes infinity


def test_file_values_name_the_file(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("loop:\n  epochs: -2\n")
    with pytest.raises(ConfigError, match=rf"{path}: loop.epochs: must be in \[1, inf\), got -2"):
        load_config(Cfg, path)


def test_configs_built_by_hand_are_checked_too() -> None:
    check_ranges(Cfg())
    with pytest.raises(ConfigError, match=r"loop.lr: must be in \(0, inf\), got -1"):
        check_ranges(Cfg(loop=Loop(lr=-1)))


def test_a_bad_interval_is_a_programming_error() -> None:
    @dataclass
    class Bad:
        x: int = 0
        RANGES: ClassVar[dict[str, str]] = {"x": "0..1"}

    @dataclass
    class Unknown:
        x: int = 0
        RANGES: ClassVar[dict[str, str]] = {"y": "[0, 1]"}

    with pytest.raises(TypeError, match="0..1"):
        check_ranges(Bad())
    with pytest.raises(TypeError, match="no field y"):
        check_ranges(Unknown())


def _numeric_keys(cls: type, prefix: str = "") -> list[tuple[str, type, str | None]]:
    """(dotted key, owning dataclass, its interval or None) of every int / float field under ``cls``."""
    out = []
    hints = typing.get_type_hints(cls)
    ranges = getattr(cls, "RANGES", {})
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        inner = args[0] if len(args) == 1 else tp
        if dataclasses.is_dataclass(inner):
            out += _numeric_keys(inner, f"{prefix}{f.name}.")
        elif inner in (int, float):
            out.append((prefix + f.name, cls, ranges.get(f.name)))
    return out


@pytest.mark.parametrize(
    "cls", [TrainConfig, ExtractConfig, BoxSelection, PipelineConfig], ids=lambda c: c.__name__
)
def test_every_numeric_key_has_an_interval(cls: type) -> None:
    missing = [key for key, _, spec in _numeric_keys(cls) if spec is None]
    assert not missing, f"numeric keys without an interval in RANGES: {missing}"


def test_the_defaults_lie_in_their_intervals() -> None:
    check_ranges(TrainConfig())
    check_ranges(ExtractConfig(out="x.lmdb"))
    check_ranges(BoxSelection())
    check_ranges(PipelineConfig())


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("train.epochs=-1", "train.epochs"),
        ("data.workers=-1", "data.workers"),
        ("train.save_every=-3", "train.save_every"),
        ("data.batch_size=0", "data.batch_size"),
        ("optim.warmup=1.5", "optim.warmup"),
        ("model.hidden_dropout_prob=1.2", "model.hidden_dropout_prob"),
    ],
)
def test_training_config_refuses_out_of_range_keys(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key}: must be"):
        load_config(TrainConfig, None, [override])


def test_extract_config_names_the_flag() -> None:
    with pytest.raises(ValueError, match=r"--batch-size: must be in \[1, inf\), got 0"):
        ExtractConfig(out="x.lmdb", batch_size=0)
    with pytest.raises(ValueError, match=r"--workers: must be in \[0, inf\), got -1"):
        ExtractConfig(out="x.lmdb", workers=-1)
