"""Hugging Face Hub ids -> local snapshot folders (the cache first; ``HF_HUB_OFFLINE`` honoured).

Used wherever a command accepts either a local path or a Hub id such as ``unc-nlp/lxmert-base-uncased``
(LXMERT checkpoints) or ``unc-nlp/frcnn-vg-finetuned`` (the detector's weights). A local path of that name
always wins: :func:`is_hub_id` is only consulted when no such path exists.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

#: ``owner/name``: a Hugging Face Hub repository id.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_TRUE = ("1", "true", "yes", "on")


def is_hub_id(text: str | os.PathLike) -> bool:
    """True when ``text`` names no existing local path and looks like ``owner/name``."""
    return not Path(text).exists() and HUB_ID.match(str(text)) is not None


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for the cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in _TRUE


def hub_snapshot(repo_id: str, allow_patterns: Sequence[str] | None = None, what: str = "checkpoint") -> Path:
    """The local folder of Hugging Face Hub model ``repo_id``.

    Through ``huggingface_hub``: from its cache (``HF_HOME`` / ``HF_HUB_CACHE``), downloading only the files
    matching ``allow_patterns`` (all when ``None``) when they are missing and the network allows; with
    ``HF_HUB_OFFLINE=1`` from the cache only.

    Raises:
        FileNotFoundError: neither the cache nor the Hub gives it; the message names ``repo_id``, where it
            looked, and what to do (``what`` says what a local alternative would be, e.g. ``"weights file"``).
    """
    try:
        from huggingface_hub import snapshot_download  # optional dependency: only Hub ids need it
    except ImportError as e:  # pragma: no cover - transformers brings it
        raise FileNotFoundError(
            f"{repo_id}: no such local path, and huggingface_hub is not installed to look it up on the Hub "
            f"(pip install huggingface_hub, or pass a local {what})"
        ) from e
    offline = hub_offline()
    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=list(allow_patterns) if allow_patterns is not None else None,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            local_files_only=offline,
        )
    except Exception as e:  # offline and not cached, no network, no such repository, ...
        where = (
            "the Hugging Face cache (HF_HUB_OFFLINE is set)"
            if offline
            else "the Hugging Face Hub nor its cache"
        )
        detail = str(e).splitlines()[0] if str(e) else ""
        raise FileNotFoundError(
            f"{repo_id}: no such local file or directory, and not found in {where} ({type(e).__name__}: "
            f"{detail}); pass a local {what}, or fetch it first with `hf download {repo_id}` where the "
            "network allows"
        ) from e
    logger.info("%s: Hugging Face Hub snapshot at %s", repo_id, folder)
    return Path(folder)
