r"""The images of a run: folders walked or list files read, each file given its image id (the store key).

File names are bytes on Linux and need not be UTF-8 (``printf 'caf\xe9'`` in Latin-1). Python hands such a name
over with its undecodable bytes as lone surrogates, which open the file but cannot be stored, printed or written
to JSON; the image id (and every path shown or logged) writes each of those bytes as the four characters
``\xNN`` instead (:func:`printable`): the file ``caf\xe9.jpg`` gets the id ``caf\xe9`` (backslash, ``x``, ``e``,
``9``), which is also how ``lxmert-features`` lists such a key.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from extract.images import is_image_file

__all__ = [
    "ID_MODES",
    "DuplicateIdError",
    "IdFrom",
    "ImageItem",
    "SetupError",
    "assign_ids",
    "check_unique_ids",
    "collect_images",
    "display_path",
    "find_images",
    "printable",
    "read_image_list",
]

#: How an image id is made from a file: its name without extension, or its path relative to the images
#: folder without extension.
IdFrom = Literal["stem", "relpath"]
ID_MODES: tuple[str, ...] = typing.get_args(IdFrom)


class SetupError(Exception):
    """The run is refused before any work (bad weights, not a store, mismatched settings, ...)."""


class DuplicateIdError(SetupError):
    """Two or more files map to one image id."""


def printable(text: str) -> str:
    r"""``text`` with each undecodable byte of a file name (a lone surrogate) written as ``\xNN``: valid UTF-8,
    printable and JSON-safe; unchanged for any proper text."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def display_path(path: str | os.PathLike) -> str:
    """A path as shown in messages, logs and ``failures.jsonl`` (see :func:`printable`)."""
    return printable(os.fspath(path))


@dataclass(frozen=True)
class ImageItem:
    """One image to extract: its store key and its file."""

    img_id: str
    path: str


def find_images(root: str | os.PathLike) -> list[Path]:
    """All image files under ``root`` (recursive; jpg/jpeg/png/bmp/webp in any case), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise SetupError(f"images folder {root} does not exist or is not a folder")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if is_image_file(name):
                found.append(Path(dirpath) / name)
    return sorted(found)


def read_image_list(list_file: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> list[Path]:
    """Image paths from a text file, one per line (blank lines and lines starting with ``#`` ignored).

    Relative entries are resolved against ``base_dir`` (default: the list file's folder). Entries are kept
    whatever their extension; a missing file becomes a failure of the run, not an error here.
    """
    list_file = Path(list_file)
    try:  # undecodable bytes kept (as file names keep them), so every listed file can be opened
        text = list_file.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise SetupError(f"cannot read the image list {list_file}: {e}") from None
    base = Path(base_dir) if base_dir is not None else list_file.parent
    paths = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        p = Path(entry)
        paths.append(p if p.is_absolute() else base / p)
    return paths


def _image_id(path: Path, root: Path | None, id_from: IdFrom) -> str:
    return printable(_raw_id(path, root, id_from))


def _raw_id(path: Path, root: Path | None, id_from: IdFrom) -> str:
    if id_from == "stem":
        return path.stem
    if id_from == "relpath":
        if root is None:
            raise SetupError("--id-from relpath needs a base folder (IMAGES_DIR)")
        try:
            rel = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root)))
        except ValueError:  # different drives on Windows
            rel = Path("..")
        if rel.parts and rel.parts[0] == "..":
            raise SetupError(
                f"{display_path(path)} is outside {display_path(root)}; --id-from relpath needs every image "
                "inside that folder"
            )
        return rel.with_suffix("").as_posix()
    raise SetupError(f"unknown --id-from {id_from!r}; choose one of {', '.join(ID_MODES)}")


def check_unique_ids(items: Iterable[ImageItem], hint: str = "") -> None:
    """Refuse two files with one image id (the one duplicate check of a run).

    Raises:
        DuplicateIdError: naming each such id and every file that maps to it (up to 10 ids shown), then
            ``hint``.
    """
    by_id: dict[str, list[str]] = {}
    for it in items:
        by_id.setdefault(it.img_id, []).append(it.path)
    dups = {k: v for k, v in by_id.items() if len(v) > 1}
    if dups:
        lines = [f"  {k!r}: {', '.join(map(display_path, v))}" for k, v in sorted(dups.items())[:10]]
        more = f"\n  ... and {len(dups) - 10} more" if len(dups) > 10 else ""
        raise DuplicateIdError(
            f"{len(dups)} image id(s) map to more than one file; rename them or choose other ids{hint}:\n"
            + "\n".join(lines)
            + more
        )


def assign_ids(
    paths: Iterable[str | os.PathLike], root: str | os.PathLike | None, id_from: IdFrom = "stem"
) -> list[ImageItem]:
    """Give every path its image id; refuse duplicates.

    Args:
        paths: image files.
        root: the folder relative paths are taken from (``id_from="relpath"``).
        id_from: ``"stem"``: the file name without extension (``COCO_train2014_000000458752``,
            ``train-10171-0-img0``, ``2375429``); ``"relpath"``: the path relative to ``root`` without
            extension, with ``/`` separators (``val2014/COCO_val2014_000000000042``).

    Returns:
        items sorted by id.

    Raises:
        DuplicateIdError: naming the id and every file that maps to it (up to 10 ids shown).
    """
    root_path = Path(root) if root is not None else None
    items = [ImageItem(_image_id(Path(p), root_path, id_from), str(p)) for p in paths]
    check_unique_ids(items, hint=" (try --id-from relpath)" if id_from == "stem" else "")
    return sorted(items, key=lambda it: it.img_id)


def collect_images(
    images_dir: str | os.PathLike | None,
    list_file: str | os.PathLike | None = None,
    id_from: IdFrom = "stem",
) -> list[ImageItem]:
    """The run's images: ``images_dir`` walked recursively, or the files named in ``list_file`` (relative
    entries against ``images_dir`` when given, else against the list's folder). Sorted by id."""
    if list_file is not None:
        paths = read_image_list(list_file, images_dir)
        root = Path(images_dir) if images_dir is not None else Path(list_file).parent
    elif images_dir is not None:
        paths = find_images(images_dir)
        root = Path(images_dir)
    else:
        raise SetupError("give an images folder or --list FILE")
    return assign_ids(paths, root, id_from)
