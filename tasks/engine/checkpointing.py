"""Training checkpoints: atomic directories, a size/sha256 manifest, ``latest``, pruning, RNG states.

A checkpoint is one directory ``RUN_DIR/checkpoints/step_NNNNNNNN/``::

    model.safetensors, config.json   model.save_pretrained(): what transformers' from_pretrained loads
    trainer_state.pt                 optimizer, schedule, grad scaler, every rank's RNG states, position
    <task extras>.json               task.checkpoint_extras() (answer tables, extractor settings, ...)
    manifest.json                    size and sha256 of every file above (written last)

It is written into a temporary directory that is renamed into place once complete, so a crash never leaves
a half-written ``step_*`` directory; a write that fails removes it (a full disk raises
:class:`common.diskspace.DiskFullError`, the previous checkpoints stay as they were). ``checkpoints/latest`` is a relative symbolic link to the newest one
(replaced atomically; a copy where the file system has no links). On resume the manifest is checked; a
damaged or missing checkpoint is reported and the previous one is used. ``trainer_state.pt`` holds only
tensors, numbers, strings, lists and dicts, so it is read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from common.diskspace import DiskFullError, as_disk_full, free_bytes
from common.state_dict import file_sha256
from tasks.data.model_folder import WEIGHTS_NAME, write_model_files

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "MANIFEST_NAME",
    "STATE_NAME",
    "find_resume_checkpoint",
    "get_rng_state",
    "load_model_weights",
    "load_trainer_state",
    "remove_leftovers",
    "save_checkpoint",
    "save_model_dir",
    "set_rng_state",
    "step_dir_name",
    "verify_checkpoint",
    "verify_model_dir",
]

STATE_NAME = "trainer_state.pt"
MANIFEST_NAME = "manifest.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """No usable checkpoint (all damaged or none written), or weights that do not fit the model."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_manifest(directory: Path, step: int | None) -> None:
    files = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name != MANIFEST_NAME:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files[path.name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"step": step, "files": files}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete ``tmp`` to ``final`` (an existing ``final`` is moved aside first, then deleted)."""
    _fsync_dir(tmp)
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _writing(tmp: Path, final: Path) -> Iterator[None]:
    """Write into ``tmp`` (created empty) on the way to ``final``: on any failure ``tmp`` is removed, and a full
    disk raises :class:`common.diskspace.DiskFullError` naming ``final`` and the space free once ``tmp`` is
    gone."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield
    except Exception as exc:
        full = as_disk_full(exc, tmp)  # measured before the partial files are removed
        shutil.rmtree(tmp, ignore_errors=True)
        if full is None:
            raise
        raise DiskFullError(final, free_bytes(final.parent)) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model_dir(directory: str | os.PathLike, model: nn.Module, extras: dict[str, Any]) -> Path:
    """A model-only directory (``RUN_DIR/final``, ``RUN_DIR/best``): weights, config, extras, manifest; atomic."""
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    with _writing(tmp, directory):
        write_model_files(tmp, model, extras)
        _write_manifest(tmp, None)
        _replace_dir(tmp, directory)
    return directory


def _point_latest(checkpoints: Path, name: str) -> None:
    latest = checkpoints / LATEST
    tmp = checkpoints / f".tmp-{LATEST}-{os.getpid()}"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(name, tmp)
        os.replace(tmp, latest)  # atomic swap of the link
    except OSError:  # no symbolic links here (some network / Windows file systems): a full copy
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoints / name, tmp)
        _replace_dir(tmp, latest)


def list_step_dirs(checkpoints: Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every complete-looking ``step_*`` directory, newest first."""
    if not checkpoints.is_dir():
        return []
    found = []
    for path in checkpoints.iterdir():
        m = _STEP_RE.match(path.name)
        if m and path.is_dir() and not path.is_symlink():
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    trainer_state: dict[str, Any],
    extras: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``checkpoints/step_NNNNNNNN`` atomically, point ``latest`` at it, keep the newest ``keep``."""
    checkpoints = Path(run_dir) / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    tmp = checkpoints / f".tmp-{name}-{os.getpid()}"
    final = checkpoints / name
    with _writing(tmp, final):
        write_model_files(tmp, model, extras)
        torch.save(trainer_state, tmp / STATE_NAME)
        _write_manifest(tmp, step)
        _replace_dir(tmp, final)
        _point_latest(checkpoints, name)
    for _, old in list_step_dirs(checkpoints)[max(keep, 1) :]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in checkpoints.glob(".tmp-*"):  # from a run killed while writing
        if leftover.name != tmp.name:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def remove_leftovers(run_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporaries a run killed while writing left in ``run_dir`` and ``run_dir/checkpoints``
    (``.tmp-*`` folders and links, ``.old-*`` folders); returns what was removed. Call it only while holding the
    run directory (no other writer)."""
    removed = []
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if not folder.is_dir():
            continue
        for path in sorted([*folder.glob(".tmp-*"), *folder.glob(".old-*")]):
            if path.is_symlink() or path.is_file():
                path.unlink(missing_ok=True)
            else:
                shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        logger.info(
            "removed %d leftover temporary folder(s) of an interrupted run: %s", len(removed), removed
        )
    return removed


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------
def verify_checkpoint(directory: Path) -> str | None:
    """None when every file in the manifest is present with its size and sha256 and the trainer state is among
    them; else what is wrong."""
    problem = verify_model_dir(directory)
    if problem is None and not (directory / STATE_NAME).is_file():
        return f"{directory}: no {STATE_NAME} (a model-only directory, not a training checkpoint)"
    return problem


def verify_model_dir(directory: Path) -> str | None:
    """None when every file in ``directory``'s manifest is present with its size and sha256; else what is wrong
    (a model folder such as ``final/`` or a checkpoint)."""
    if not directory.is_dir():
        return f"{directory}: missing"
    manifest_path = directory / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{manifest_path}: missing or unreadable manifest ({e})"
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{path}: {size} bytes, the manifest says {entry['size']} (truncated or overwritten)"
        if file_sha256(path) != entry["sha256"]:
            return f"{path}: sha256 differs from the manifest (corrupted)"
    return None


def find_resume_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The newest intact checkpoint of ``run_dir``: ``checkpoints/latest`` first, then the ``step_*``
    directories newest first. Damaged ones are reported (logging.warning) and skipped."""
    checkpoints = Path(run_dir) / "checkpoints"
    candidates: list[Path] = []
    latest = checkpoints / LATEST
    if latest.exists():
        candidates.append(latest.resolve())
    elif latest.is_symlink():
        logger.warning("%s points to a missing directory (%s)", latest, os.readlink(latest))
    for _, path in list_step_dirs(checkpoints):
        if path.resolve() not in candidates:
            candidates.append(path.resolve())
    if not candidates:
        raise CheckpointError(
            f"--resume: no checkpoint in {checkpoints} (nothing to resume; start the run without --resume)"
        )
    problems = []
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            if problems:
                logger.warning("resuming from %s instead", path)
            return path
        logger.warning("damaged checkpoint skipped: %s", problem)
        problems.append(problem)
    raise CheckpointError(
        f"--resume: every checkpoint in {checkpoints} is damaged ({'; '.join(problems)}); "
        "start a new run (optionally with --load on a model directory)"
    )


def load_trainer_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / STATE_NAME, map_location="cpu", weights_only=True)


def load_model_weights(model: nn.Module, directory: Path) -> None:
    """Load ``directory/model.safetensors`` into ``model`` exactly (tied weights may be absent)."""
    tensors = load_file(str(directory / WEIGHTS_NAME))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    state = model.state_dict()
    loaded_ptrs = {state[k].data_ptr() for k in tensors if k in state}
    missing = [k for k in missing if state[k].data_ptr() not in loaded_ptrs]  # tied to a loaded tensor: fine
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / WEIGHTS_NAME} does not fit the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]} (was it written by a run of another task or model config?)"
        )


# ----------------------------------------------------------------------------------------------------------
# RNG states (as tensors / lists: weights_only-safe)
# ----------------------------------------------------------------------------------------------------------
def get_rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / numpy / python RNG states."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
