"""The Visual Genome names of the detector's classes: 1600 objects and 400 attributes.

The files in ``extract/data/`` are bottom-up-attention's "1600-400-20" vocabularies (MIT licence, see
``extract/data/VG_VOCAB_LICENSE.txt``): line ``i`` names class id ``i`` (the ids a store's ``obj_ids`` /
``attr_ids`` hold), as comma-separated synonyms (``"stop sign,stopsign"``); :meth:`VGVocab.object_name`
gives the first.

>>> load_vg_vocab().object_name(0), load_vg_vocab().attribute_name(0)
('yolk', 'gray')
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

__all__ = ["VOCAB_DIR", "VGVocab", "load_vg_vocab"]

VOCAB_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class VGVocab:
    """``objects`` (1600) and ``attributes`` (400): each a tuple of synonym tuples, index = class id."""

    objects: tuple[tuple[str, ...], ...]
    attributes: tuple[tuple[str, ...], ...]

    def object_name(self, class_id: int) -> str:
        """The first name of object class ``class_id`` (``"object #N"`` outside the vocabulary)."""
        return _first(self.objects, class_id, "object")

    def attribute_name(self, attr_id: int) -> str:
        """The first name of attribute ``attr_id`` (``"attribute #N"`` outside the vocabulary)."""
        return _first(self.attributes, attr_id, "attribute")


def _first(names: tuple[tuple[str, ...], ...], index: int, kind: str) -> str:
    index = int(index)
    return names[index][0] if 0 <= index < len(names) else f"{kind} #{index}"


def _read(path: Path, expected: int) -> tuple[tuple[str, ...], ...]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise FileNotFoundError(
            f"{path}: cannot read the Visual Genome vocabulary ({e}); reinstall the package"
        ) from e
    if len(lines) != expected:
        raise ValueError(f"{path}: {len(lines)} names, expected {expected}; reinstall the package")
    return tuple(tuple(s.strip() for s in line.split(",")) for line in lines)


@functools.lru_cache(maxsize=1)
def load_vg_vocab() -> VGVocab:
    """The shipped vocabularies (read once per process)."""
    return VGVocab(
        objects=_read(VOCAB_DIR / "objects_vocab.txt", 1600),
        attributes=_read(VOCAB_DIR / "attributes_vocab.txt", 400),
    )
