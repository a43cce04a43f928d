"""BERT initialisation: LXMERT's language side from a BERT checkpoint (``bert-base-uncased``), as the original.

The original builds its models with BERT's ``from_pretrained("bert-base-uncased")`` unless ``--fromScratch``:
every tensor whose name LXMERT shares with BERT is copied, the others keep ``init_bert_weights`` (N(0, 0.02)
weights, zero biases, unit LayerNorm). With LXMERT's names that is:

- ``bert.embeddings.*``: the word / position / token-type embeddings and their LayerNorm;
- ``bert.encoder.layer.{i}.*`` for ``i < l_layers``: the language layers (BERT-base has 12: LXMERT's 9 take
  layers 0-8; 9-11 are left out);
- ``bert.pooler.*``: the pooler;
- pretraining only (:class:`model.LxmertForPreTraining`): ``cls.predictions.*``, the MLM head (transform,
  its LayerNorm, the output bias; the decoder is tied to the word embeddings), and ``cls.seq_relationship.*``,
  BERT's next-sentence head, which has the name and shape of LXMERT's cross-modality matching head.

Everything else (the visual feature encoder, the object-relationship and cross-modality layers, the object,
QA and task heads) keeps the model's own initialisation, the original's.

Accepted: a ``BertForPreTraining`` or ``BertModel`` state dict under BERT's names (``bert.*`` + ``cls.*``, or a
saved ``BertModel``'s bare ``embeddings.* / encoder.* / pooler.*``; the old ``gamma`` / ``beta`` LayerNorm
names too), as a folder (``config.json`` or the original archive's ``bert_config.json``, with
``model.safetensors`` or ``pytorch_model.bin``), one weights file, or a Hub id: ``owner/name``, or a bare
``bert-*`` name (``bert-base-uncased`` = the Hub's ``google-bert/bert-base-uncased``), from the local Hugging
Face cache first (:func:`common.hub.hub_snapshot`; ``HF_HUB_OFFLINE=1``: the cache only).

A BERT of another size than the model is refused in one line naming the file and the tensor (or config
field) that does not fit.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from common.hub import hub_snapshot, is_hub_id
from common.state_dict import LoadReport, read_safetensors, read_torch, unwrap_state_dict

from .checkpoint import TIED_DECODER_KEY, _layer_norm_names, _strip_wrappers
from .config import LxmertConfig, config_fields, replace_config

logger = logging.getLogger(__name__)

__all__ = ["BERT_LAYOUT", "init_from_bert", "is_bert_checkpoint", "lxmert_from_bert", "read_bert"]

BERT_LAYOUT = "bert"
#: A bare name such as ``bert-base-uncased``: the Hub's legacy id of ``google-bert/<name>``.
_BARE_BERT_NAME = re.compile(r"^bert-[\w.-]+$")
_CONFIG_NAMES = ("config.json", "bert_config.json")
_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
#: Keys only an LXMERT checkpoint has (after wrappers and ``bert.`` are stripped).
_LXMERT_MARKERS = ("encoder.x_layers.", "encoder.r_layers.", "encoder.visn_fc.", "lxmert.", "lxrt_encoder.")
#: BERT tensors that are not weights of their own: the position-id buffer, the tied decoder and its bias alias.
_NOT_WEIGHTS = ("embeddings.position_ids", TIED_DECODER_KEY, "cls.predictions.decoder.bias")
#: Model tensors that must all come from BERT (the language side), under the backbone prefix.
_LANGUAGE = ("embeddings.", "encoder.layer.")


# ----------------------------------------------------------------------------------------------- reading
def _config_model_type(folder: Path) -> str | None:
    """``"bert"`` for the original archive's ``bert_config.json``, else ``config.json``'s ``model_type``."""
    if (folder / "bert_config.json").is_file():
        return BERT_LAYOUT
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data.get("model_type") if isinstance(data, dict) else None


def _bert_names(keys: Any) -> list[str]:
    """Keys without wrappers (``module.``), old LayerNorm names mapped, a bare ``BertModel`` given ``bert.``."""
    out = []
    for key in keys:
        key = _layer_norm_names(_strip_wrappers(key))
        out.append("bert." + key if key.startswith(("embeddings.", "encoder.", "pooler.")) else key)
    return out


def _looks_like_bert(keys: list[str]) -> bool:
    names = _bert_names(keys)
    bare = [k[len("bert.") :] if k.startswith("bert.") else k for k in names]
    return (
        "bert.embeddings.word_embeddings.weight" in names
        and any(k.startswith("bert.encoder.layer.0.") for k in names)
        and not any(k.startswith(_LXMERT_MARKERS) for k in bare)
    )


def _weights_file(folder: Path) -> Path | None:
    return next((folder / n for n in _WEIGHT_NAMES if (folder / n).is_file()), None)


def _file_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    return list(unwrap_state_dict(read_torch(path), path, "a BERT or LXMERT checkpoint"))


def is_bert_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` (folder, file or Hub id) holds a BERT checkpoint rather than an LXMERT one.

    Cheap where it can be: a bare ``bert-*`` name, a folder's ``config.json`` (``model_type``), a safetensors
    header; a torch file is read. A path that does not exist and is no Hub id is not BERT (the LXMERT loader
    reports it)."""
    p = Path(path)
    if not p.exists():
        text = str(path)
        if _BARE_BERT_NAME.match(text):
            return True
        if not is_hub_id(text):
            return False
        try:
            folder = hub_snapshot(text, list(_CONFIG_NAMES), what="checkpoint folder or file")
        except FileNotFoundError:
            return False  # the LXMERT loader says what is wrong
        return _config_model_type(folder) == BERT_LAYOUT
    if p.is_dir():
        model_type = _config_model_type(p)
        if model_type is not None:
            return model_type == BERT_LAYOUT
        weights = _weights_file(p)
        return weights is not None and _looks_like_bert(_file_keys(weights))
    return _looks_like_bert(_file_keys(p))


def _resolve(path: str | Path) -> Path:
    """A local folder or file for ``path`` (a Hub id is looked up in the cache first, then downloaded)."""
    p = Path(path)
    if p.exists():
        return p
    text = str(path)
    repos = [f"google-bert/{text}", text] if _BARE_BERT_NAME.match(text) else [text]
    first_error: FileNotFoundError | None = None
    for repo in repos:
        try:
            folder = hub_snapshot(
                repo, [*_CONFIG_NAMES, "model.safetensors"], what="BERT folder or weights file"
            )
            if _weights_file(folder) is None:
                folder = hub_snapshot(
                    repo, [*_CONFIG_NAMES, "pytorch_model.bin"], what="BERT folder or weights file"
                )
            return folder
        except FileNotFoundError as err:
            first_error = first_error or err
    assert first_error is not None
    raise first_error


def read_bert(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any] | None, str]:
    """BERT's tensors under BERT's names (``bert.*``, ``cls.*``), its config dict (None without one) and the
    file read (for messages)."""
    p = _resolve(path)
    config: dict[str, Any] | None = None
    if p.is_dir():
        for name in _CONFIG_NAMES:
            if (p / name).is_file():
                config = json.loads((p / name).read_text())
                break
        weights = _weights_file(p)
        if weights is None:
            found = sorted(x.name for x in p.iterdir())[:20]
            raise ValueError(f"{p}: a BERT folder needs {' or '.join(_WEIGHT_NAMES)} (found {found})")
    else:
        weights = p
    if weights.suffix == ".safetensors":
        raw = read_safetensors(weights, map_location)
    else:
        raw = unwrap_state_dict(read_torch(weights, map_location), weights, "a BERT checkpoint")
    state = dict(zip(_bert_names(raw), raw.values()))
    if not _looks_like_bert(list(state)):
        raise ValueError(
            f"{weights}: not a BERT checkpoint (no bert.embeddings.word_embeddings.weight and "
            "bert.encoder.layer.0.*, or LXMERT's own layers); pass bert-base-uncased or a BertForPreTraining folder"
        )
    return state, config, str(weights)


# ----------------------------------------------------------------------------------------------- mapping
def _to_lxmert_names(state: dict[str, Tensor], prefix: str) -> dict[str, tuple[str, Tensor]]:
    """LXMERT name (under the model's backbone ``prefix``) -> (BERT name, tensor), without non-weights."""
    out: dict[str, tuple[str, Tensor]] = {}
    for key, value in state.items():
        if key.endswith(_NOT_WEIGHTS):
            continue
        target = prefix + key[len("bert.") :] if key.startswith("bert.") else key
        out[target] = (key, value)
    return out


def _check_config(bert: dict[str, Any] | None, config: LxmertConfig, source: str) -> None:
    """Fields the tensors cannot show: the number of attention heads and the activation."""
    if not bert:
        return
    for name in ("num_attention_heads", "hidden_act"):
        if name in bert and bert[name] != getattr(config, name):
            raise ValueError(
                f"{source}: BERT's {name} is {bert[name]!r}, the model's {getattr(config, name)!r}; a BERT of "
                "another size: use bert-base-uncased for the base model, or give the model BERT's sizes"
            )


@torch.no_grad()
def init_from_bert(
    model: nn.Module, path: str | Path, map_location: str | torch.device = "cpu"
) -> LoadReport:
    """Copy BERT's tensors at ``path`` into ``model`` (any LXMERT model class) by the original's rule (see
    the module docstring); the rest of ``model`` is left as it is. Returns the report (``loaded``: tensors
    from BERT; ``unexpected``: BERT tensors left out; ``defaulted``: model tensors left at their
    initialisation).

    Raises:
        ValueError: one line naming the file and the tensor or config field that does not fit the model
            (a BERT of another size), or the first language tensor BERT lacks (fewer layers than ``l_layers``).
    """
    return _load_bert(model, path, *read_bert(path, map_location))


def _load_bert(
    model: nn.Module,
    path: str | Path,
    state: dict[str, Tensor],
    bert_config: dict[str, Any] | None,
    source: str,
) -> LoadReport:
    prefix = getattr(model, "backbone_prefix", "lxmert.")
    _check_config(bert_config, model.config, source)
    mapped = _to_lxmert_names(state, prefix)
    own = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False) and TIED_DECODER_KEY in own
    for key in own:
        if key.startswith(tuple(prefix + p for p in _LANGUAGE)) and key not in mapped:
            layers = len({k.split(".")[3] for k in state if k.startswith("bert.encoder.layer.")})
            raise ValueError(
                f"{source}: BERT has no tensor for {key} ({layers} BERT layers, the model's language encoder "
                f"{model.config.l_layers}); use a BERT with at least l_layers layers"
            )
    unused = [bert_key for key, (bert_key, _) in mapped.items() if key not in own]
    to_load: dict[str, Tensor] = {}
    for key in own:  # the model's order: the first tensor that does not fit is named
        if key not in mapped or (tied and key == TIED_DECODER_KEY):
            continue
        bert_key, value = mapped[key]
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(
                f"{source}: BERT's {bert_key} has shape {tuple(value.shape)}, the model's {key} "
                f"{tuple(own[key].shape)}: a BERT of another size than the model (hidden {model.config.hidden_size}, "
                f"intermediate {model.config.intermediate_size}, vocabulary {model.config.vocab_size}); use "
                "bert-base-uncased for the base model, or give the model BERT's sizes"
            )
        to_load[key] = value
    model.load_state_dict(to_load, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    defaulted = [k for k in own if k not in to_load and not (tied and k == TIED_DECODER_KEY)]
    return LoadReport(
        source=str(path) if str(path) == source else f"{path} ({source})",
        layout=BERT_LAYOUT,
        path=source,
        loaded=len(to_load),
        unexpected=unused,
        defaulted=defaulted,
    )


def _config_from_bert(state: dict[str, Tensor], bert: dict[str, Any] | None) -> LxmertConfig:
    """LXMERT's config with BERT's sizes (the layer counts stay LXMERT's defaults, 9 / 5 / 5)."""
    vocab, hidden = state["bert.embeddings.word_embeddings.weight"].shape
    fields: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": state["bert.embeddings.position_embeddings.weight"].shape[0],
        "type_vocab_size": state["bert.embeddings.token_type_embeddings.weight"].shape[0],
        "intermediate_size": state["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
    }
    names = config_fields()
    for key in ("num_attention_heads", "hidden_act", "layer_norm_eps", "initializer_range"):
        if bert and key in bert and key in names:
            fields[key] = bert[key]
    return LxmertConfig(**fields)


def lxmert_from_bert(
    cls: type,
    path: str | Path,
    config: LxmertConfig | None = None,
    map_location: str | torch.device = "cpu",
    **config_overrides: Any,
) -> Any:
    """``cls`` (an LXMERT model class) built from ``config`` (default: BERT's sizes, LXMERT's 9 / 5 / 5
    layers) plus ``config_overrides``, its language side from BERT (:func:`init_from_bert`); logs how many
    tensors came from BERT. What ``from_pretrained`` does for a BERT checkpoint."""
    state, bert_config, source = read_bert(path, map_location)
    config = config or _config_from_bert(state, bert_config)
    if config_overrides:
        config = replace_config(config, **config_overrides)
    model = cls(config)
    report = _load_bert(model, path, state, bert_config, source)
    model.load_report = report
    prefix = getattr(model, "backbone_prefix", "lxmert.")
    heads = [
        name for name in ("cls.predictions.", "cls.seq_relationship.") if f"{name}bias" in model.state_dict()
    ]
    parts = ["embeddings", f"language layers 0-{config.l_layers - 1}"]
    parts += ["pooler"] if f"{prefix}pooler.dense.weight" in model.state_dict() else []
    parts += ["MLM head", "matching head (BERT's next-sentence head)"] if heads else []
    logger.info(
        "%s: %d tensors from BERT (%s); %d BERT tensors left out; the other %d tensors keep LXMERT's "
        "initialisation (N(0, 0.02), LayerNorm 1 / 0, biases 0), as the original",
        report.source, report.loaded, ", ".join(parts), len(report.unexpected), len(report.defaulted),
    )  # fmt: skip
    return model
