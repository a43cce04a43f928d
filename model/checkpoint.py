"""Checkpoint formats: detection, key mapping (original LXMERT <-> Hugging Face <-> ours), load report, saving.

Formats recognised (the format is detected from the files and keys, never assumed):

- ``hf``: a directory with ``config.json`` and ``model.safetensors`` (or a sharded
  ``model.safetensors.index.json``) or ``pytorch_model.bin``: Hugging Face's (``unc-nlp/lxmert-base-uncased``,
  ``unc-nlp/lxmert-vqa-uncased``) and ours, which is the same layout. Keys ``lxmert.*`` + heads, or bare
  ``embeddings.* / encoder.* / pooler.*`` for a saved ``LxmertModel``.
- ``original``: the original LXMERT pretraining files (``model_LXRT.pth``, ``EpochNN_LXRT.pth``): keys under
  ``bert.`` (+ ``cls.*``, ``obj_predict_head.*``, ``answer_head.*``).
- ``original-finetuned``: the original VQA / GQA / NLVR2 code's ``BEST.pth``: ``lxrt_encoder.model.bert.*``
  and ``logit_fc.*`` (mapped to ``answer_head.logit_fc.*``).
- ``bert``: a BERT checkpoint (``bert-base-uncased``): the language side only, by the original's rule
  (:mod:`model.bert_init`).

A name like ``unc-nlp/lxmert-base-uncased`` that is no local path is looked up on the Hugging Face Hub
(its local cache first; see :func:`common.hub.hub_snapshot`). Any of them may carry a ``module.`` (DataParallel / DDP) or ``_orig_mod.`` (torch.compile) prefix, or be
wrapped as ``{"model": state_dict, ...}`` / ``{"state_dict": ...}``. Torch pickles are read with
``weights_only=True`` only.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.hub import hub_snapshot, is_hub_id
from common.state_dict import LoadReport, read_safetensors, read_torch, unwrap_state_dict

from .config import LxmertConfig, config_fields, load_config, replace_config

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TIED_DECODER_KEY = "cls.predictions.decoder.weight"
_BACKBONE_ROOTS = ("embeddings.", "encoder.", "pooler.")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_WHOLE_HEAD = "answer_head."  # an MLP: its layers load together or not at all


def _short(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------
#: What a Hub snapshot of an LXMERT checkpoint needs (nothing else is downloaded).
_HUB_FILES = [
    CONFIG_NAME,
    WEIGHTS_NAME,
    "model-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
]


def read_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], LxmertConfig | None, str]:
    """Read the tensors (raw keys) and the config (``None`` when there is no ``config.json``) at ``path``.

    Returns ``(state_dict, config, container)``; ``container`` says which files were read.
    """
    if is_hub_id(path):
        path = hub_snapshot(
            str(path), _HUB_FILES, what="checkpoint directory (config.json + model.safetensors) or file"
        )
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    if path.is_dir():
        config_path = path / CONFIG_NAME
        candidates = [path / WEIGHTS_NAME, path / "model.safetensors.index.json", path / "pytorch_model.bin"]
        weights = next((c for c in candidates if c.is_file()), None)
        if weights is None:
            found = sorted(p.name for p in path.iterdir())[:20]
            raise ValueError(
                f"{path}: a checkpoint directory needs {WEIGHTS_NAME}, model.safetensors.index.json or "
                f"pytorch_model.bin (found {found}); for an original LXMERT .pth file pass the file itself"
            )
        if not config_path.is_file():
            raise ValueError(
                f"{path}: {weights.name} without {CONFIG_NAME}; add the config.json that came with the weights "
                "or pass the weights file itself (sizes are then inferred from the tensors)"
            )
        config = load_config(config_path)
        return _read_weights_file(weights, map_location), config, f"{path}/{{{CONFIG_NAME},{weights.name}}}"
    sibling = path.parent / CONFIG_NAME
    config = load_config(sibling) if path.suffix in (".safetensors", ".bin") and sibling.is_file() else None
    return _read_weights_file(path, map_location), config, str(path)


def _read_weights_file(path: Path, map_location: str | torch.device) -> dict[str, Tensor]:
    if path.name.endswith(".index.json"):
        try:
            index = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a safetensors index (no 'weight_map'): {err}") from err
        state: dict[str, Tensor] = {}
        for shard in sorted(set(index.values())):
            state.update(read_safetensors(path.parent / shard, map_location))
        return state
    if path.suffix == ".safetensors":
        return read_safetensors(path, map_location)
    return unwrap_state_dict(read_torch(path, map_location), path, "an LXMERT checkpoint")


# --------------------------------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------------------------------
def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


def _layer_norm_names(key: str) -> str:
    """Old BERT names: LayerNorm ``gamma`` / ``beta`` -> ``weight`` / ``bias``."""
    return re.sub(
        r"(LayerNorm|layer_norm)\.gamma$",
        r"\1.weight",
        re.sub(r"(LayerNorm|layer_norm)\.beta$", r"\1.bias", key),
    )


def detect_format(keys: list[str]) -> str:
    """``"original-finetuned"``, ``"original"`` or ``"hf"`` from (wrapper-stripped) key names.

    Raises ``ValueError`` when no LXMERT backbone key is present.
    """
    if any(k.startswith("lxrt_encoder.model.bert.") for k in keys):
        return "original-finetuned"
    if any(k.startswith("bert.encoder.x_layers.") or k.startswith("bert.embeddings.") for k in keys):
        return "original"
    if any(k.startswith("lxmert.") for k in keys) or any(k.startswith(_BACKBONE_ROOTS) for k in keys):
        return "hf"
    raise ValueError(
        f"no LXMERT backbone keys (bert.*, lxrt_encoder.model.bert.*, lxmert.*, embeddings.*) among {keys[:8]}; "
        "this is not an LXMERT checkpoint"
    )


def to_hf_state_dict(state: dict[str, Tensor], source: str = "<state dict>") -> tuple[dict[str, Tensor], str]:
    """Map any recognised layout to Hugging Face's full-model names (``lxmert.*`` + heads).

    Returns ``(state_dict, format)``. Keys outside the known roots are kept (they end up as "unused").
    """
    stripped = {_layer_norm_names(_strip_wrappers(k)): v for k, v in state.items()}
    try:
        fmt = detect_format(list(stripped))
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    out: dict[str, Tensor] = {}
    for key, value in stripped.items():
        if fmt == "original-finetuned":
            if key.startswith("lxrt_encoder.model.bert."):
                key = "lxmert." + key[len("lxrt_encoder.model.bert.") :]
            elif key.startswith("logit_fc."):
                key = "answer_head." + key
        elif fmt == "original":
            if key.startswith("bert."):
                key = "lxmert." + key[len("bert.") :]
        elif key.startswith(_BACKBONE_ROOTS):
            key = "lxmert." + key
        out[key] = value
    return out, fmt


def to_original_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face / our names -> the original LXMERT pretraining names (``bert.*``); for export and tests."""
    hf, _ = to_hf_state_dict(state)
    return {("bert." + k[len("lxmert.") :] if k.startswith("lxmert.") else k): v for k, v in hf.items()}


# --------------------------------------------------------------------------------------------------------------
# Config inference (for single files without config.json)
# --------------------------------------------------------------------------------------------------------------
def infer_config(state: dict[str, Tensor], source: str = "<state dict>") -> LxmertConfig:
    """Sizes from the tensors of a Hugging Face-named state dict (``lxmert.*``).

    ``num_attention_heads`` cannot be seen in the weights: it is taken as ``hidden_size // 64`` (12 for 768);
    pass ``num_attention_heads=`` to ``from_pretrained`` for other models.
    """
    try:
        vocab, hidden = state["lxmert.embeddings.word_embeddings.weight"].shape
        max_pos = state["lxmert.embeddings.position_embeddings.weight"].shape[0]
        types = state["lxmert.embeddings.token_type_embeddings.weight"].shape[0]
        visn = state["lxmert.encoder.visn_fc.visn_fc.weight"]
        box = state["lxmert.encoder.visn_fc.box_fc.weight"]
    except KeyError as err:
        raise ValueError(
            f"{source}: cannot infer the model sizes, {err.args[0]} is missing; the backbone is incomplete "
            "(pass a config, or a complete checkpoint)"
        ) from None

    def count(prefix: str) -> int:
        pat = re.compile(re.escape(prefix) + r"(\d+)\.")
        return len({m.group(1) for k in state if (m := pat.match(k))})

    kwargs: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": max_pos,
        "type_vocab_size": types,
        "visual_feat_dim": visn.shape[1],
        "visual_pos_dim": box.shape[1],
        "l_layers": count("lxmert.encoder.layer."),
        "r_layers": count("lxmert.encoder.r_layers."),
        "x_layers": count("lxmert.encoder.x_layers."),
    }
    for key in (
        "lxmert.encoder.layer.0.intermediate.dense.weight",
        "lxmert.encoder.r_layers.0.intermediate.dense.weight",
        "lxmert.encoder.x_layers.0.lang_inter.dense.weight",
    ):
        if key in state:
            kwargs["intermediate_size"] = state[key].shape[0]
            break
    fc0, fc3 = state.get("answer_head.logit_fc.0.weight"), state.get("answer_head.logit_fc.3.weight")
    if fc3 is not None and fc0 is not None and fc0.shape[1] == hidden:
        kwargs["num_qa_labels"] = fc3.shape[0]
    for name, field_name in (("obj", "num_object_labels"), ("attr", "num_attr_labels")):
        w = state.get(f"obj_predict_head.decoder_dict.{name}.weight")
        if w is not None:
            kwargs[field_name] = w.shape[0]
    if any(k.startswith("obj_predict_head.") for k in state):
        for name in ("obj", "attr", "feat"):
            kwargs[f"visual_{name}_loss"] = f"obj_predict_head.decoder_dict.{name}.weight" in state
    return LxmertConfig(**kwargs)


# --------------------------------------------------------------------------------------------------------------
# Loading into a model
# --------------------------------------------------------------------------------------------------------------
def load_state_dict_into(
    model: torch.nn.Module,
    hf_state: dict[str, Tensor],
    fmt: str,
    source: str = "<state dict>",
    strict_backbone: bool = True,
) -> LoadReport:
    """Copy a Hugging Face-named state dict (see :func:`to_hf_state_dict`) into ``model``.

    Backbone weights must all be present with the right shapes, otherwise ``ValueError`` (nothing is half
    loaded silently; ``strict_backbone=False``: reported only, as ``transformers`` does); head weights that are missing or of another shape are reported and left initialised. The
    answer head (``answer_head.logit_fc``, one MLP) loads whole or not at all (the rest: ``report.defaulted``).
    """
    prefix = getattr(model, "backbone_prefix", "lxmert.")
    state = dict(hf_state)
    if prefix == "":  # the bare backbone: drop the "lxmert." prefix, heads become unused
        state = {(k[len("lxmert.") :] if k.startswith("lxmert.") else k): v for k, v in state.items()}
    own = model.state_dict()
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False) and TIED_DECODER_KEY in own
    if tied:
        state.pop(TIED_DECODER_KEY, None)
    report = LoadReport(source=source, layout=fmt)
    to_load: dict[str, Tensor] = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            to_load[key] = value
    report.missing = [k for k in own if k not in state and not (tied and k == TIED_DECODER_KEY)]

    def is_backbone(key: str) -> bool:
        return key.startswith(prefix) if prefix else key.startswith(_BACKBONE_ROOTS)

    # The answer MLP loads whole or not at all: one of another shape (e.g. a QA head offered to NLVR2's pair
    # head, whose LayerNorm and first bias happen to fit) keeps the model's initialisation, every layer of it.
    if any(k.startswith(_WHOLE_HEAD) for k, _, _ in report.mismatched):
        for key in [k for k in to_load if k.startswith(_WHOLE_HEAD)]:
            del to_load[key]
            report.defaulted.append(key)

    bad_missing = [k for k in report.missing if is_backbone(k)]
    bad_shape = [m for m in report.mismatched if is_backbone(m[0])]
    if (bad_missing or bad_shape) and strict_backbone:
        details = []
        if bad_missing:
            details.append(f"{len(bad_missing)} backbone weights missing: {_short(bad_missing)}")
        if bad_shape:
            details.append(
                f"{len(bad_shape)} backbone weights of another shape: "
                + ", ".join(f"{k} {a} vs model {b}" for k, a, b in bad_shape[:4])
            )
        raise ValueError(
            f"{source} ({fmt}): the LXMERT backbone does not load into {type(model).__name__}: "
            + "; ".join(details)
            + ". The checkpoint is truncated, from another model, or the config does not match it "
            "(check config.json / the sizes passed to from_pretrained)."
        )
    result = model.load_state_dict(to_load, strict=False)
    report.loaded = len(to_load)
    assert not result.unexpected_keys, result.unexpected_keys
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return report


#: ``transformers.from_pretrained`` keywords that only concern downloading / remote code: accepted, not needed.
_IGNORED_KEYWORDS = {
    "cache_dir",
    "force_download",
    "local_files_only",
    "token",
    "revision",
    "trust_remote_code",
}


def load_pretrained(
    cls: type,
    path: str | Path | None,
    *model_args: Any,
    config: LxmertConfig | None = None,
    map_location: str | torch.device = "cpu",
    state_dict: dict[str, Tensor] | None = None,
    dtype: torch.dtype | str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    output_loading_info: bool = False,
    device_map: str | torch.device | int | None = None,
    ignore_mismatched_sizes: bool = True,  # noqa: ARG001 (always: heads of another shape stay initialised)
    **kwargs: Any,
) -> Any:
    """Build ``cls`` from any recognised checkpoint at ``path`` (see the module docstring) or from
    ``state_dict``; a BERT checkpoint gives the language side only (:mod:`model.bert_init`). The keywords are
    ``transformers``' (see :meth:`model.LxmertPreTrainedModel.from_pretrained`); the others must be config
    fields (``TypeError`` naming them otherwise). With ``output_loading_info=True`` the caller reads what loaded:
    a backbone that does not load is then reported there (as ``transformers``), not raised."""
    from .bert_init import is_bert_checkpoint, lxmert_from_bert  # bert_init builds on this module's helpers

    if torch.get_default_device().type == "meta":
        raise RuntimeError(
            "You are using `from_pretrained` with a meta device context manager or "
            "`torch.set_default_device('meta')`; build the model on a real device (or use `device_map`)"
        )
    strict = not output_loading_info
    if model_args:
        raise TypeError(
            f"from_pretrained({path}): positional model arguments {model_args!r} are not supported"
        )
    if config is not None and not isinstance(config, LxmertConfig):
        raise TypeError(
            f"from_pretrained({path}): config must be a transformers.LxmertConfig, got {type(config).__name__}"
        )
    for name in _IGNORED_KEYWORDS & set(kwargs):
        kwargs.pop(name)
    kwargs.pop("attn_implementation", None)  # one attention implementation (model/execution.py picks kernels)
    unknown = sorted(set(kwargs) - config_fields())
    if unknown:
        raise TypeError(
            f"from_pretrained({path}): unknown keyword(s) {unknown}; give transformers.LxmertConfig fields, "
            "config=, state_dict=, dtype=, output_loading_info=, device_map= or map_location="
        )
    if state_dict is not None:
        file_config = None
        if path is not None:
            _, file_config, _ = read_checkpoint(path, map_location)
        state, fmt = _to_hf_or_raw(state_dict, "state_dict=", strict)
        model = build_from_state_dict(cls, state, fmt, "state_dict=", config or file_config, strict, **kwargs)
    elif path is None:
        raise ValueError("from_pretrained: give a checkpoint path / Hub id, or state_dict=")
    elif is_bert_checkpoint(path):
        model = lxmert_from_bert(cls, path, config, map_location, **kwargs)
    else:
        raw, file_config, container = read_checkpoint(path, map_location)
        state, fmt = _to_hf_or_raw(raw, container, strict)
        model = build_from_state_dict(cls, state, fmt, container, config or file_config, strict, **kwargs)
    _apply_dtype_and_device(model, dtype if dtype is not None else torch_dtype, device_map, path)
    model.eval()  # as transformers: a loaded model starts in evaluation mode
    if output_loading_info:
        report = model.load_report
        return model, {  # sets, as transformers
            "missing_keys": set(report.missing),
            "unexpected_keys": set(report.unexpected),
            "mismatched_keys": set(report.mismatched),
            "error_msgs": [],
        }
    return model


def _to_hf_or_raw(state: dict[str, Tensor], source: str, strict: bool) -> tuple[dict[str, Tensor], str]:
    """:func:`to_hf_state_dict`; not strict, tensors without any LXMERT key are kept as they are (all unused)."""
    try:
        return to_hf_state_dict(state, source)
    except ValueError:
        if strict:
            raise
        return dict(state), "unknown"


def _apply_dtype_and_device(model: Any, dtype: Any, device_map: Any, source: Any) -> None:
    """``dtype`` (``torch.dtype``, its name, or ``"auto"``: the config's ``dtype``, else float32) and one device
    (``device_map``: a device, its name or index, or ``"auto"`` = CUDA when available)."""
    if dtype == "auto":
        dtype = getattr(model.config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(
                f"from_pretrained({source}): dtype {dtype!r} is no torch dtype (e.g. 'bfloat16')"
            )
        dtype = resolved
    if dtype is not None:
        model.to(dtype)
        model.config.dtype = dtype
    if device_map is not None:
        if isinstance(device_map, dict):
            raise ValueError(
                f"from_pretrained({source}): a per-module device_map is not supported; give one device"
            )
        if device_map == "auto":
            device_map = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(torch.device(device_map))


def build_from_state_dict(
    cls: type,
    state: dict[str, Tensor],
    fmt: str,
    source: str,
    config: LxmertConfig | None = None,
    strict_backbone: bool = True,
    **config_overrides: Any,
) -> Any:
    """Build ``cls`` (config given or inferred from ``state``), load ``state``, attach and log the report."""
    config = config or infer_config(state, source)
    if config_overrides:
        try:
            config = replace_config(config, **config_overrides)
        except TypeError as err:
            raise TypeError(
                f"from_pretrained({source}): {err}; valid names are LxmertConfig fields"
            ) from None
    model = cls(config)
    report = load_state_dict_into(model, state, fmt, source, strict_backbone)
    model.load_report = report
    (logger.info if report.complete else logger.warning)("%s", report.summary())
    return model


# --------------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------------
def save_pretrained(model: Any, save_directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (``transformers``' layout and names) into the directory.

    The tied MLM decoder weight is not stored (``transformers`` ties it on load, as do we).
    """
    import copy

    from safetensors.torch import save_file

    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop(TIED_DECODER_KEY, None)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / WEIGHTS_NAME)
    config.to_json_file(directory / CONFIG_NAME)
    return directory
