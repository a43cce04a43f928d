"""Reading weight files safely, and the one report of what a load did.

One reader, :func:`read_weights`, chosen by the file's suffix:

- ``.safetensors``: ``safetensors`` (no code can run).
- ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``: ``torch.load(weights_only=True)``: tensors, containers and
  numbers only; a pickle that names anything else is refused (:class:`UnsafePickleError`).
- ``.pkl``: :class:`SafeUnpickler`, which builds only dicts, lists, tuples, strings, bytes, numbers and
  numpy arrays (Detectron2 / Caffe2 weight pickles such as ``faster_rcnn_from_caffe_attr.pkl``); a pickle
  that would import or call anything else is refused before any of it runs.

:func:`unwrap_state_dict` takes the ``{name: tensor}`` dict out of the usual wrappers (``{"model": ...}``,
``{"state_dict": ...}``); :class:`LoadReport` says what a load into a model did. Errors are
:class:`StateDictError` (a ``ValueError``) naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SUFFIXES = (".safetensors", ".pkl", *TORCH_SUFFIXES)
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")


class StateDictError(ValueError):
    """A weight file is missing, unreadable, corrupt, unsafe, or not a state dict."""


class UnsafePickleError(StateDictError):
    """A pickle asked for something other than plain containers, numbers, strings, arrays and tensors."""


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
    allowed: dict[tuple[str, str], object] = {}
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


def read_pickle(path: str | os.PathLike) -> object:
    """Unpickle ``path`` with :class:`SafeUnpickler` (``encoding="latin1"`` for Python 2 pickles)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise StateDictError(f"cannot read weight file {path}: {e}") from e
    try:
        obj = SafeUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except Exception as e:  # truncated / corrupt pickles raise many different types
        raise StateDictError(
            f"{path} is not a readable pickle ({type(e).__name__}: {e}); the file is truncated or "
            "corrupted: download it again"
        ) from e
    try:
        _check_plain(obj)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    return obj


def read_torch(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: only tensors, containers and numbers are rebuilt."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch names the refused global ("... unsupported GLOBAL posix.system ..."); other unpickling
        # errors (bad opcodes) mean a corrupt file
        unsafe = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line]
        if unsafe:
            raise UnsafePickleError(
                f"{path}: torch.load(weights_only=True) refused it ({unsafe[0]}): it holds pickled objects "
                "other than tensors; re-save it as a plain state dict"
            ) from err
        raise StateDictError(
            f"{path}: cannot read as a PyTorch checkpoint with weights_only=True (not a torch.save file, or a "
            "truncated/corrupted one): re-download it"
        ) from err
    except Exception as err:
        raise StateDictError(
            f"{path}: cannot read as a PyTorch checkpoint with weights_only=True ({type(err).__name__}: {err}). "
            "The file is truncated/corrupted (re-download it) or holds pickled objects other than tensors "
            "(re-save it as a plain state dict)."
        ) from err


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file."""
    path = Path(path)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise StateDictError(
            f"{path}: cannot read as safetensors ({type(err).__name__}: {err}); the file is truncated or "
            "corrupted: re-download or re-save it"
        ) from err


def read_weights(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """The object stored in a weight file, read safely according to its suffix (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        StateDictError: unknown suffix, unreadable or corrupt file; :class:`UnsafePickleError` for a pickle
            that would run code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weight file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return read_safetensors(path, map_location)
    if suffix == ".pkl":
        return read_pickle(path)
    if suffix in TORCH_SUFFIXES:
        return read_torch(path, map_location)
    raise StateDictError(f"{path}: unknown weight format {suffix!r}; use one of {', '.join(SUFFIXES)}")


def _is_tensor_dict(obj: object) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(v, (torch.Tensor, np.ndarray, np.generic)) for v in obj.values())
    )


def unwrap_state_dict(obj: object, path: str | os.PathLike, what: str = "a state dict") -> dict[str, Any]:
    """The ``{name: tensor or array}`` dict in ``obj``: ``obj`` itself, or under ``"model"`` / ``"state_dict"``
    / ``"model_state_dict"``.

    Raises:
        StateDictError: ``obj`` holds no such dict; the message names ``path``, what was found and ``what``
            was expected.
    """
    if _is_tensor_dict(obj):
        return dict(obj)  # type: ignore[arg-type]
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if _is_tensor_dict(obj.get(key)):
                return dict(obj[key])
    kind = type(obj).__name__
    keys = list(obj)[:8] if isinstance(obj, dict) else []
    raise StateDictError(
        f"{path}: holds a {kind} (keys {keys}), not a state dict of tensors; expected {what} (a dict "
        "name -> tensor, optionally under 'model' or 'state_dict')"
    )


def to_tensor(value: object, key: str, path: str | os.PathLike) -> torch.Tensor:
    """A numeric numpy array (or tensor) as a CPU tensor; anything else is a :class:`StateDictError`."""
    if isinstance(value, torch.Tensor):
        return value
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise StateDictError(f"{path}: entry {key!r} is not numeric (dtype {arr.dtype})")
    return torch.from_numpy(np.ascontiguousarray(arr))


# ---------------------------------------------------------------------------------------------- report
def _short(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


@dataclass
class LoadReport:
    """What loading a weight file into a model did.

    ``source``: what was asked for (a path, a Hub id, or the files read); ``layout``: the file's detected
    layout (e.g. ``"hf"`` or ``"original"`` for LXMERT, ``"detectron2-pkl"`` for the detector); ``path``:
    the local weight file read; ``sha256``: its hex digest, when computed (hash a file once: use this);
    ``loaded``: tensors copied; ``missing``: model tensors the file lacks; ``unexpected``: file entries the
    model has no place for; ``mismatched``: ``(key, file shape, model shape)`` not loaded; ``defaulted``:
    model tensors deliberately left at their defaults (e.g. identity frozen-BN statistics).
    """

    source: str
    layout: str
    path: str = ""
    sha256: str = ""
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    defaulted: list[str] = field(default_factory=list)

    @property
    def format(self) -> str:
        """The layout (the name ``model.load_report.format`` has always used)."""
        return self.layout

    @property
    def complete(self) -> bool:
        """True when every model tensor came from the file (or was deliberately defaulted)."""
        return not self.missing and not self.mismatched

    def missing_by_module(self) -> dict[str, list[str]]:
        """Missing keys grouped by their first name component (``backbone``, ``roi_heads``, ``lxmert``...)."""
        out: dict[str, list[str]] = {}
        for key in self.missing:
            out.setdefault(key.split(".", 1)[0], []).append(key)
        return out

    def summary(self) -> str:
        """One line for logs: what was read, how much loaded, and everything that did not."""
        head = f"{self.source} ({self.layout}"
        if self.sha256:
            head += f", sha256 {self.sha256[:12]}"
        parts = [f"{head}): loaded {self.loaded} tensors"]
        if self.defaulted:
            parts.append(f"{len(self.defaulted)} left at their defaults: {_short(self.defaulted, 3)}")
        if self.missing:
            parts.append(f"{len(self.missing)} missing: {_short(self.missing)}")
        if self.mismatched:
            shown = [f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched[:5]]
            parts.append(f"{len(self.mismatched)} shape-mismatched: {shown}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unused: {_short(self.unexpected)}")
        return "; ".join(parts)
