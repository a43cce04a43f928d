"""Reading and writing the project's JSON and text files: one reader, one error type.

Every input file (official downloads, LXMERT's JSON, answer tables, model-folder records) is read through
:func:`read_json` / :func:`read_text`, which raise :class:`DataFormatError` naming the file (and line / column for
JSON). Outputs are written atomically (a temporary file in the same folder, then ``os.replace``: nothing
half-written is left), through :func:`common.files.write_text_atomic`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.files import write_text_atomic

__all__ = [
    "DataFormatError",
    "read_json",
    "read_json_list",
    "read_text",
    "write_items",
    "write_json",
    "write_text",
]


class DataFormatError(ValueError):
    """A malformed or unreadable input file or entry; the message names the file, line or id, and what is wrong."""


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The text of ``path`` (UTF-8), or a :class:`DataFormatError` naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataFormatError(f"{what} {path} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataFormatError(f"cannot read {what} {path}: {e}") from None


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """The parsed JSON of ``path``; a parse error names the file, line and column."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}:{e.colno}: {what} is not valid JSON: {e.msg}") from None


def read_json_list(path: str | os.PathLike, what: str) -> list[Any]:
    """The top-level list of a JSON file; :class:`DataFormatError` naming the file otherwise."""
    data = read_json(path, what)
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: the top level is a {type(data).__name__}, expected a list ({what})")
    return data


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (parent folders created)."""
    return write_text_atomic(path, text)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_items(path: str | os.PathLike, items: Iterable[Any]) -> Path:
    """Write a JSON list atomically, one item per line with sorted keys (compact, diffable, and read by
    any JSON parser as LXMERT's own files)."""
    body = ",\n".join(json.dumps(item, sort_keys=True, ensure_ascii=False) for item in items)
    return write_text(path, "[\n" + body + "\n]\n" if body else "[]\n")
