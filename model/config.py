"""LXMERT configuration: ``transformers.LxmertConfig`` itself, plus the few helpers our code needs around it.

There is one config class: :class:`transformers.LxmertConfig` (re-exported as ``model.LxmertConfig``). A
``config.json`` written by either side loads in the other. Our one extra setting lives on that config as an
attribute with the value ``transformers`` hard-codes:

- ``layer_norm_eps`` (1e-12, BERT's / LXMERT's): read with :func:`layer_norm_eps`; written to ``config.json``
  only when set.

Everything else we read (``l_layers`` / ``r_layers`` / ``x_layers``, ``visual_loss_normalizer``, ``task_*``,
``visual_*_loss``, ``num_*_labels``) is a ``transformers`` field with ``transformers``' default.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from transformers import LxmertConfig

__all__ = [
    "LAYER_NORM_EPS",
    "SUPPORTED_ACTIVATIONS",
    "LxmertConfig",
    "check_config",
    "config_fields",
    "head_dim",
    "layer_norm_eps",
    "load_config",
    "replace_config",
]

#: LayerNorm epsilon of BERT / LXMERT (``transformers`` hard-codes it in its LXMERT modules).
LAYER_NORM_EPS = 1e-12
#: Extra attributes we read from the config beside ``transformers``' fields (name -> default).
EXTRA_SETTINGS: dict[str, Any] = {"layer_norm_eps": LAYER_NORM_EPS}
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


def config_fields() -> set[str]:
    """Names a config may set: ``transformers.LxmertConfig``'s fields and our :data:`EXTRA_SETTINGS`."""
    return {f.name for f in dataclasses.fields(LxmertConfig)} | set(EXTRA_SETTINGS)


def layer_norm_eps(config: LxmertConfig) -> float:
    """The LayerNorm epsilon (``config.layer_norm_eps`` when set, else 1e-12 as ``transformers``)."""
    return float(getattr(config, "layer_norm_eps", LAYER_NORM_EPS))


def head_dim(config: LxmertConfig) -> int:
    """Size of one attention head (``hidden_size // num_attention_heads``)."""
    return config.hidden_size // config.num_attention_heads


def check_config(config: LxmertConfig, source: str = "LxmertConfig") -> None:
    """Raise ``ValueError`` naming ``source`` for sizes / activations our modules cannot build."""
    if config.hidden_size % config.num_attention_heads != 0:
        raise ValueError(
            f"{source}: hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
            f"{config.num_attention_heads}; choose sizes that divide"
        )
    if config.hidden_act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(
            f"{source}: hidden_act {config.hidden_act!r} is not supported; use 'gelu' (LXMERT's), "
            "'gelu_new', 'gelu_pytorch_tanh' or 'relu'"
        )


def replace_config(config: LxmertConfig, **changes: Any) -> LxmertConfig:
    """A copy of ``config`` with ``changes`` (config field names); extra attributes are kept.

    Raises ``TypeError`` for a name that is no config field (as ``dataclasses.replace`` did).
    """
    unknown = sorted(set(changes) - config_fields())
    if unknown:
        raise TypeError(
            f"unknown LxmertConfig field(s) {unknown}; valid names are transformers.LxmertConfig fields"
        )
    data = config.to_dict()
    data.pop("num_hidden_layers", None)  # derived from the layer counts
    data.update(changes)
    return LxmertConfig.from_dict(data)


def load_config(path: str | Path) -> LxmertConfig:
    """Read a ``config.json`` written by us or by ``transformers``; one clear error for a bad file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); re-download or re-save the checkpoint") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with LXMERT config fields")
    model_type = data.get("model_type", "lxmert")
    if model_type != "lxmert":
        raise ValueError(f"{path}: model_type is {model_type!r}, not 'lxmert'; this is not an LXMERT config")
    data.pop("num_hidden_layers", None)
    if data.get("pad_token_id") is None:
        data.pop("pad_token_id", None)
    try:
        config = LxmertConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a valid LXMERT config ({err}); fix or re-save it") from err
    check_config(config, str(path))
    return config
