"""Loading the VG detector's weights, safely.

Three formats are accepted, chosen by the file's suffix:

- ``.pkl``: a Detectron2 pickle such as py-bottom-up-attention's ``faster_rcnn_from_caffe_attr.pkl``
  (``{"model": {name: ndarray}, ...}``), or a Caffe2/Detectron1 one (``{"blobs": ...}`` or caffe-style
  names), whose names Detectron2's own ``align_and_update_state_dicts`` converts. It is read by
  :class:`SafeUnpickler`, which builds only dicts, lists, tuples, strings, bytes, numbers and numpy arrays:
  a pickle that would import or call anything else is refused before any of it runs.
- ``.safetensors``.
- ``.pth`` / ``.pt``: a ``torch.save`` state dict (optionally under ``"model"`` / ``"state_dict"``),
  read with ``torch.load(weights_only=True)``.

Every model tensor must be loaded (frozen-BN ``running_mean`` / ``running_var`` may be absent when the
same layer's ``weight`` and ``bias`` are present: Caffe folds BN into those, and the identity statistics
are then correct). Shape mismatches are errors naming the key and both shapes; keys the model lacks are
reported as unexpected. Nothing is copied into the model unless the whole file is acceptable.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

MODULE_PREFIXES = ("backbone.", "proposal_generator.", "roi_heads.")
_OPTIONAL_BN_STATS = (".norm.running_mean", ".norm.running_var")


class WeightsError(Exception):
    """A weight file is missing, unreadable, corrupt, or does not fit the detector."""


class UnsafePickleError(WeightsError):
    """A pickle asked for something other than plain containers, numbers, strings and numpy arrays."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (streamed in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ unpickling
def _numpy_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray as ma  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as ma
    allowed = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = ma._reconstruct
        allowed[(module, "scalar")] = ma.scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` (protocol-2 pickles store bytes that way); latin-1 only."""
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"pickle asks to encode bytes as {encoding!r}; only latin1 is expected")
    return text.encode("latin1")


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals needed for numpy arrays and ordered dicts.

    Any other global (``os.system``, ``builtins.eval``, a class with ``__reduce__``...) raises
    :class:`UnsafePickleError` at the moment the pickle names it, so nothing it would call ever runs.
    """

    _ALLOWED: dict[tuple[str, str], object] = {
        **_numpy_globals(),
        ("collections", "OrderedDict"): dict,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load {module}.{name}: this pickle would import or run code; weight pickles "
                "may hold only dicts, lists, strings, numbers and numpy arrays"
            ) from None

    def persistent_load(self, pid: object) -> object:
        raise UnsafePickleError("refusing a pickle with persistent ids (not a plain weight dict)")


def _check_plain(obj: object, where: str = "root") -> None:
    """Reject object-dtype arrays and other non-plain leaves that slipped through reconstruction."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int, bytes)):
                raise UnsafePickleError(f"non-plain key {type(key).__name__} at {where}")
            _check_plain(value, f"{where}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    elif isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise UnsafePickleError(f"object-dtype numpy array at {where}")
    elif not isinstance(obj, (str, bytes, int, float, bool, complex, np.generic, type(None))):
        raise UnsafePickleError(f"unexpected {type(obj).__name__} at {where}")


def safe_load_pickle(path: str | os.PathLike) -> object:
    """Unpickle ``path`` with :class:`SafeUnpickler` (``encoding="latin1"`` for Python 2 pickles)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise WeightsError(f"cannot read weight file {path}: {e}") from e
    try:
        obj = SafeUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except Exception as e:  # truncated / corrupt pickles raise many different types
        raise WeightsError(
            f"{path} is not a readable pickle ({type(e).__name__}: {e}); re-download it"
        ) from e
    try:
        _check_plain(obj)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    return obj


# --------------------------------------------------------------------------------------------- reading
def _to_tensor(value: object, key: str, path: Path) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise WeightsError(f"{path}: entry {key!r} is not numeric (dtype {arr.dtype})")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _looks_detectron2(keys: list[str]) -> bool:
    return any(k.startswith(MODULE_PREFIXES) for k in keys)


def read_state_dict(path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Read a weight file into ``{name: tensor}`` with Detectron2 module names.

    Caffe2-style pickles (``"blobs"``, ``"matching_heuristics"``, or names without Detectron2 prefixes) are
    renamed with Detectron2's ``align_and_update_state_dicts`` against ``model``'s state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file {path} does not exist (pass --random-weights to run without one)")
    suffix = path.suffix.lower()
    heuristics = c2_names = False
    if suffix == ".pkl":
        data = safe_load_pickle(path)
        if not isinstance(data, dict):
            raise WeightsError(f"{path}: expected a dict of weights, found {type(data).__name__}")
        if "model" in data and isinstance(data["model"], dict):
            state = data["model"]
            heuristics = bool(data.get("matching_heuristics", False))
            c2_names = data.get("__author__") == "Caffe2"
        else:
            state = data["blobs"] if isinstance(data.get("blobs"), dict) else data
            heuristics = c2_names = True
        state = {str(k): v for k, v in state.items() if not str(k).endswith("_momentum")}
        if not _looks_detectron2(list(state)):
            heuristics = c2_names = True
    elif suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path} is not a readable safetensors file ({e}); re-download it") from e
    elif suffix in (".pth", ".pt"):
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafePickleError(
                f"{path}: torch.load(weights_only=True) refused it ({str(e).splitlines()[0]}); only plain "
                "state dicts are accepted"
            ) from e
        except Exception as e:
            raise WeightsError(f"{path} is not a readable torch file ({type(e).__name__}: {e})") from e
        for wrapper in ("model", "state_dict"):
            if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
                data = data[wrapper]
        if not isinstance(data, dict):
            raise WeightsError(f"{path}: expected a state dict, found {type(data).__name__}")
        state = data
    else:
        raise WeightsError(f"{path}: unknown weight format {suffix!r}; use .pkl, .safetensors, .pth or .pt")

    tensors = {str(k): _to_tensor(v, str(k), path) for k, v in state.items()}
    if heuristics:
        if model is None:
            raise WeightsError(f"{path} uses Caffe2-style names; a model is needed to match them")
        from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

        tensors = align_and_update_state_dicts(model.state_dict(), tensors, c2_conversion=c2_names)
    return tensors


# --------------------------------------------------------------------------------------------- loading
@dataclass
class LoadReport:
    """What :func:`load_detector_weights` did.

    ``missing``: model tensors the file lacks; ``unexpected``: file entries the model lacks;
    ``defaulted``: frozen-BN statistics left at identity; ``loaded``: tensors copied; ``path``: the local
    file read; ``sha256``: its hex digest (hash it once: use this); ``layout``: the file's detected layout
    (e.g. ``"detectron2-pkl"``), to record next to the sha256.
    """

    path: str
    sha256: str
    layout: str = ""
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    defaulted: list[str] = field(default_factory=list)
    loaded: int = 0

    @property
    def complete(self) -> bool:
        """True when the backbone, the RPN and the box/attribute heads are all fully loaded."""
        return not self.missing

    def missing_by_module(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for key in self.missing:
            out.setdefault(key.split(".", 1)[0], []).append(key)
        return out

    def summary(self) -> str:
        head = f"{self.path} (sha256 {self.sha256[:12]}): loaded {self.loaded} tensors"
        parts = [head]
        if self.defaulted:
            parts.append(f"{len(self.defaulted)} frozen-BN statistics left at identity")
        if self.missing:
            groups = ", ".join(f"{m}: {len(v)} (e.g. {v[0]})" for m, v in self.missing_by_module().items())
            parts.append(f"MISSING {len(self.missing)} [{groups}]")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (e.g. {', '.join(self.unexpected[:3])})")
        return "; ".join(parts)


def load_detector_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> LoadReport:
    """Load a weight file into ``model`` (a :class:`extract.detector.VGDetector`).

    Raises:
        WeightsError: the file is missing / unreadable / corrupt, a tensor's shape differs from the model's
            (all mismatches are listed with both shapes), or (when ``strict``) any backbone, RPN or head
            tensor is missing; in those cases the model is left untouched.
        UnsafePickleError: a ``.pkl`` would run code.

    With ``strict=False`` an incomplete file is loaded as far as it goes and the report says what is
    missing (``report.complete`` is False); do not extract features with such a model.
    """
    path = Path(path)
    state = read_state_dict(path, model)
    own = model.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise WeightsError(
            f"{path}: {len(mismatched)} tensor(s) do not fit this detector config (wrong file or wrong "
            f"--config?): " + "; ".join(mismatched[:10]) + (" ..." if len(mismatched) > 10 else "")
        )
    layout = "detectron2-pkl" if path.suffix.lower() == ".pkl" else "detectron2"
    report = LoadReport(path=str(path), sha256=file_sha256(path), layout=layout)
    report.unexpected = sorted(k for k in state if k not in own)
    for key in own:
        if key in state:
            continue
        if key.endswith(_OPTIONAL_BN_STATS):
            base = key.rsplit(".", 1)[0]
            if f"{base}.weight" in state and f"{base}.bias" in state:
                report.defaulted.append(key)
                continue
        report.missing.append(key)
    if strict and not report.complete:
        raise WeightsError(
            f"refusing weights that do not cover the whole detector: {report.summary()}. Use the matching "
            "file for this --config, or --random-weights to run without weights."
        )
    with torch.no_grad():
        for key, tensor in own.items():
            if key in state:
                tensor.copy_(state[key].to(dtype=tensor.dtype))
                report.loaded += 1
    if hasattr(model, "weights_source"):
        model.weights_source = f"{path.name} sha256:{report.sha256}" if report.complete else "incomplete"
    if report.unexpected:
        logger.warning(
            "%s: %d unexpected entries ignored (%s ...)", path, len(report.unexpected), report.unexpected[:3]
        )
    logger.info(report.summary())
    return report
