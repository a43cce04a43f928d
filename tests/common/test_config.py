"""common.config: nested dataclasses from YAML + KEY=VALUE overrides, errors that name the key, round trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from common.config import (
    ConfigError,
    check_choices,
    config_to_dict,
    field_choices,
    field_default,
    load_config,
    save_config,
)


@dataclass
class Optim:
    lr: float = 1e-4
    kind: Literal["adamw", "sgd"] = "adamw"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class Head:
    hidden: int = 8


@dataclass
class Data:
    features: list[str] = field(default_factory=list)
    max_len: int | None = None
    split: str = "train"
    dtype: Literal["float32", "float16"] | None = None


@dataclass
class Root:
    optim: Optim = field(default_factory=Optim)
    data: Data = field(default_factory=Data)
    head: Head | None = None
    seed: int = 0
    fast: bool = False
    weights: dict[str, float] = field(default_factory=dict)
    steps_done: int = field(default=0, init=False, compare=False)  # derived: not a setting

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_file_then_overrides(tmp_path: Path) -> None:
    assert load_config(Root) == Root()
    path = _write(tmp_path, "optim:\n  lr: 1e-3\n  kind: sgd\ndata:\n  features: [a.lmdb]\nseed: 3\n")
    cfg = load_config(Root, path, ["optim.lr=5e-5", "data.features=[b.lmdb, c.lmdb]", "fast=true"])
    assert cfg.optim == Optim(lr=5e-5, kind="sgd")  # the override wins over the file, betas stay default
    assert cfg.data.features == ["b.lmdb", "c.lmdb"] and cfg.seed == 3 and cfg.fast is True


@pytest.mark.parametrize(
    ("override", "attr", "want"),
    [
        ("optim.lr=1e-4", ("optim", "lr"), 1e-4),  # YAML 1.1 reads 1e-4 as a string: still a float
        ("optim.lr=2", ("optim", "lr"), 2.0),
        ("data.max_len=null", ("data", "max_len"), None),
        ("data.max_len=20", ("data", "max_len"), 20),
        ("data.features=coco.lmdb", ("data", "features"), ["coco.lmdb"]),  # one path where a list goes
        ("data.dtype=float16", ("data", "dtype"), "float16"),
        ("data.split=2014", ("data", "split"), "2014"),
        ("weights.vqa=0.5", ("weights",), {"vqa": 0.5}),
        ("head.hidden=4", ("head",), Head(hidden=4)),  # an optional section filled from its defaults
        ("data.split=", ("data", "split"), ""),
    ],
)
def test_override_values_read_as_yaml(override: str, attr: tuple[str, ...], want: object) -> None:
    got: object = load_config(Root, None, [override])
    for name in attr:
        got = getattr(got, name)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("nope=1", "override 'nope=1': unknown key nope (known keys under the top level: optim, data, head,"),
        ("optim.nope=1", "unknown key optim.nope (known keys under optim: lr, kind, betas)"),
        ("head.depth=2", "unknown key head.depth (known keys under head: hidden)"),
        (
            "optim.kind=adam",
            "override 'optim.kind=adam': optim.kind: expected one of 'adamw', 'sgd', got 'adam'",
        ),
        ("seed=1.5", "override 'seed=1.5': seed: expected int, got 1.5 (float)"),
        ("seed=true", "seed: expected int, got True (bool)"),
        ("fast=1", "fast: expected bool, got 1 (int)"),
        ("data.max_len=abc", "data.max_len: expected int or null, got 'abc'"),
        ("optim.betas=[0.9, x]", "optim.betas[1]: expected float, got 'x'"),
        ("data.dtype=int8", "data.dtype: expected one of 'float32', 'float16' or null, got 'int8'"),
        ("optim.lr.x=1", "optim.lr is float, not a section"),
        ("seed", "override 'seed': expected KEY=VALUE"),
        ("seed=[1", "override 'seed=[1': the value is not valid YAML"),
        ("seed=-1", "seed must be >= 0, got -1"),  # the dataclass's own check, with where it came from
    ],
)
def test_override_errors_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Root, None, [override])
    assert message in str(info.value)


def test_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    cases = [
        ("optim:\n  lr: 1\n  foo: 2\n", "unknown key optim.foo (known keys under optim: lr, kind, betas)"),
        ("optim: 3\n", "optim: expected a mapping of its keys, got 3"),
        ("data:\n  features: {a: 1}\n", "data.features: expected a list of str, got {'a': 1}"),
        ("head:\n  hidden: big\n", "head.hidden: expected int, got 'big'"),
        ("- a\n", "the top level must be a mapping of keys, got list"),
        ("optim: [unclosed\n", "not valid YAML"),
    ]
    for text, message in cases:
        path = _write(tmp_path, text)
        with pytest.raises(ConfigError) as info:
            load_config(Root, path)
        assert str(path) in str(info.value) and message in str(info.value), (text, str(info.value))
    with pytest.raises(ConfigError, match="cannot read the config file .*missing.yaml"):
        load_config(Root, tmp_path / "missing.yaml")


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(Root, _write(tmp_path, "# nothing set\n")) == Root()


def test_save_config_round_trip(tmp_path: Path) -> None:
    overrides = [
        "optim.kind=sgd",
        "data.features=[a, b]",
        "data.dtype=float16",
        "head.hidden=3",
        "weights.x=2",
    ]
    cfg = load_config(Root, None, overrides)
    cfg.steps_done = 7
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    written = yaml.safe_load(path.read_text())
    assert "steps_done" not in written  # init=False fields are derived, not settings
    assert written["optim"] == {"lr": 1e-4, "kind": "sgd", "betas": [0.9, 0.999]}
    assert load_config(Root, path) == cfg and config_to_dict(load_config(Root, path)) == written
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary file left


def test_field_choices_and_defaults() -> None:
    assert field_choices(Optim, "kind") == ("adamw", "sgd")
    assert field_choices(Data, "dtype") == ("float32", "float16")
    with pytest.raises(TypeError, match="not a Literal"):
        field_choices(Optim, "lr")
    assert field_default(Optim, "lr") == 1e-4
    assert field_default(Optim, "betas") == [0.9, 0.999]
    assert field_default(Optim, "betas") is not field_default(Optim, "betas")  # a fresh default each time
    assert field_default(Root, "optim") == Optim()


def test_check_choices_for_configs_built_by_hand() -> None:
    check_choices(Optim())
    check_choices(Data(dtype=None))
    with pytest.raises(ValueError, match=r"Optim\.kind must be one of 'adamw', 'sgd', got 'adam'"):
        check_choices(Optim(kind="adam"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Data\.dtype must be one of 'float32', 'float16', None"):
        check_choices(Data(dtype="int8"))  # type: ignore[arg-type]
