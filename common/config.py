"""One config system: nested dataclasses, filled from a YAML file and ``key=value`` command-line overrides.

A config is a tree of dataclasses with typed fields and defaults (the only place a default lives). A YAML
file gives any subset of the keys; ``section.key=value`` overrides (value read as YAML, so ``1e-4``,
``[a.lmdb, b.lmdb]``, ``true`` and ``null`` mean what they look like) are applied on top. Unknown keys and
values of the wrong type are refused with a :class:`ConfigError` naming the key, where it came from and what
was expected.

>>> @dataclass
... class Optim:
...     lr: float = 1e-4
>>> @dataclass
... class Root:
...     optim: Optim = field(default_factory=Optim)
>>> load_config(Root, None, ["optim.lr=5e-5"]).optim.lr
5e-05

Supported field types: ``bool``, ``int``, ``float`` (an int is accepted), ``str``, ``Literal[...]`` (the
allowed values; :func:`field_choices` gives them to argparse), ``X | None``, ``list[X]``,
``dict[str, X]`` and nested dataclasses.

Ranges: a config dataclass declares the interval of each numeric key beside its fields, as a class variable
``RANGES: ClassVar[dict[str, str]] = {"lr": "[0, inf)", "warmup": "[0, 1]", ...}`` (``[`` / ``]`` closed,
``(`` / ``)`` open, ``inf`` / ``-inf`` unbounded). The loader refuses a value outside its interval, and NaN for
every float key, naming the key, where it came from, the interval and the value (:func:`check_ranges` does
the same for a config built by hand). ``None`` (an optional key left unset) is not checked.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from common.files import write_text_atomic

__all__ = [
    "ConfigError",
    "apply_overrides",
    "check_choices",
    "check_ranges",
    "config_from_dict",
    "config_to_dict",
    "field_choices",
    "field_default",
    "load_config",
    "save_config",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config's dataclasses."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping of its keys"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    """``value`` (from YAML) checked / converted to the annotated type ``tp``; ConfigError otherwise."""
    bad = ConfigError(f"{where}: {key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for arg in options:
            try:
                return _convert(value, arg, key, where)
            except ConfigError as e:
                errors.append(e)
        if len(options) == 1 and _is_container(options[0]):
            raise errors[0]  # `Section | None` given a mapping: the error inside it says more
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and inner is str:
            return [str(value)]  # a single path where a list is expected: `data.features=coco.lmdb`
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_convert(v, inner, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        _, inner = typing.get_args(tp) or (str, Any)
        return {str(k): _convert(v, inner, f"{key}.{k}", where) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return config_from_dict(tp, value, where=where, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise ConfigError(f"{where}: {key}: unsupported field type {tp!r}")


def _is_container(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) or typing.get_origin(tp) in (list, dict)


def _without_none(tp: Any) -> Any:
    """``X`` for ``X | None`` (``tp`` itself otherwise)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def config_from_dict(cls: type[T], data: dict[str, Any], where: str = "<dict>", prefix: str = "") -> T:
    """Build ``cls`` from a (possibly partial) nested dict; defaults fill what is missing."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'the config'} must be a mapping, got {data!r}")
    fields = _fields(cls)
    hints = _hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {prefix}{unknown[0]!s}"
            f" (known keys under {prefix.rstrip('.') or 'the top level'}: {', '.join(fields)})"
        )
    kwargs = {name: _convert(value, hints[name], prefix + name, where) for name, value in data.items()}
    for name, value in kwargs.items():
        _check_range(cls, name, value, prefix + name, where)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a __post_init__ check
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'}: {e}") from None


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The plain nested dict of a config (what :func:`save_config` writes): the fields a config is built
    from (``init=False`` fields are derived, so left out), tuples as lists."""
    return _plain(cfg)


def _set_dotted(data: dict[str, Any], cls: type, dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    node, node_cls = data, cls
    for i, part in enumerate(parts):
        fields = _fields(node_cls) if node_cls is not None and dataclasses.is_dataclass(node_cls) else None
        if fields is not None and part not in fields:
            prefix = ".".join(parts[:i])
            raise ConfigError(
                f"{where}: unknown key {dotted} (known keys under {prefix or 'the top level'}: {', '.join(fields)})"
            )
        if i == len(parts) - 1:
            if (
                fields is not None
            ):  # a wrong type or range is refused here, where the message names the override
                converted = _convert(value, _hints(node_cls)[part], dotted, where)
                _check_range(node_cls, part, converted, dotted, where)
            node[part] = value
            return
        child_tp = _without_none(_hints(node_cls)[part]) if fields is not None else None
        if (
            fields is not None
            and not dataclasses.is_dataclass(child_tp)
            and typing.get_origin(child_tp) is not dict
        ):
            raise ConfigError(
                f"{where}: {'.'.join(parts[: i + 1])} is {_type_name(child_tp)}, not a section; cannot set {dotted}"
            )
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
        node_cls = child_tp if dataclasses.is_dataclass(child_tp) else None


def apply_overrides(cls: type, data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``data`` (a nested dict) with every ``key.sub=VALUE`` of ``overrides`` set (VALUE read as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. optim.lr=1e-4)")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
        _set_dotted(data, cls, key.strip(), value, f"override {item!r}")
    return data


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """``cls`` from the YAML file ``path`` (optional) with ``overrides`` applied, fully type-checked."""
    data: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read the config file {path}: {e.strerror or e}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        data = apply_overrides(cls, data, list(overrides))
        where = f"{where} + overrides"
    return config_from_dict(cls, data, where=where)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically: temporary file, then rename)."""
    return write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def field_choices(cls: type, name: str) -> tuple[Any, ...]:
    """The allowed values of a ``Literal[...]`` field (for argparse ``choices=``)."""
    tp = _hints(cls)[name]
    if typing.get_origin(tp) in (Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is not Literal:
        raise TypeError(f"{cls.__name__}.{name} is not a Literal field")
    return typing.get_args(tp)


def field_default(cls: type, name: str) -> Any:
    """The default of a dataclass field (for argparse ``default=`` / help texts): one source of truth."""
    f = _fields(cls)[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"{cls.__name__}.{name} has no default")


def _literal_args(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of ``Literal[...]`` or ``Literal[...] | None`` (None included), else None."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        literals = [a for a in args if typing.get_origin(a) is Literal]
        if len(literals) == 1 and all(a is type(None) or a is literals[0] for a in args):
            return (*typing.get_args(literals[0]), None)
    return None


def check_choices(cfg: Any) -> None:
    """Refuse a dataclass instance whose ``Literal`` fields hold a value outside their choices (for
    ``__post_init__`` of configs built by hand); ValueError naming the field, the value and the choices."""
    cls = type(cfg)
    for name, tp in _hints(cls).items():
        allowed = _literal_args(tp)
        if allowed is not None and name in _fields(cls) and getattr(cfg, name) not in allowed:
            raise ValueError(
                f"{cls.__name__}.{name} must be one of {', '.join(repr(a) for a in allowed)}, "
                f"got {getattr(cfg, name)!r}"
            )


# --------------------------------------------------------------------------------------------------------------
# Ranges of numeric keys
# --------------------------------------------------------------------------------------------------------------
_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])$")


def _interval(cls: type, name: str) -> tuple[str, float, bool, float, bool] | None:
    """``(spec, low, low_closed, high, high_closed)`` of ``cls.RANGES[name]``, or None when it declares none.
    A malformed interval is a programming error (TypeError)."""
    spec = getattr(cls, "RANGES", {}).get(name)
    if spec is None:
        return None
    m = _INTERVAL.match(spec.strip())
    try:
        low, high = float(m.group(2)), float(m.group(3))  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        raise TypeError(
            f"{cls.__name__}.RANGES[{name!r}] = {spec!r} is not an interval such as '[0, 1)' or '(0, inf)'"
        ) from None
    return spec.strip(), low, m.group(1) == "[", high, m.group(4) == "]"  # type: ignore[union-attr]


def _check_range(cls: type, name: str, value: Any, key: str, where: str) -> None:
    """ConfigError when the number ``value`` of field ``name`` of ``cls`` is NaN or outside its interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    head = f"{where}: {key}" if where else key
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{head}: must be a number, got nan")
    bounds = _interval(cls, name)
    if bounds is None:
        return
    spec, low, low_closed, high, high_closed = bounds
    above = value >= low if low_closed else value > low
    below = value <= high if high_closed else value < high
    if not (above and below):
        raise ConfigError(f"{head}: must be in {spec}, got {value!r}")


def check_ranges(
    cfg: Any, prefix: str = "", where: str = "", *, key_name: Any = None, recurse: bool = True
) -> None:
    """Refuse a config (a dataclass instance, e.g. built by hand) with a numeric key outside its declared interval
    (``RANGES``) or a NaN float: :class:`ConfigError` naming the key. ``key_name``: how a field is named in the
    message (e.g. as a command-line flag), default ``prefix + name``; ``recurse``: check nested sections too."""
    cls = type(cfg)
    for name in getattr(cls, "RANGES", {}):
        if name not in _fields(cls):
            raise TypeError(f"{cls.__name__}.RANGES names {name!r}, but {cls.__name__} has no field {name}")
    for name in _fields(cls):
        value = getattr(cfg, name)
        if recurse and dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_ranges(value, f"{prefix}{name}.", where, key_name=key_name)
            continue
        _check_range(cls, name, value, key_name(name) if key_name else prefix + name, where)
