"""NLVR2 JSON-lines (``train.json``, ``dev.json``, ``test1.json``, ``test2.json`` of lil-lab/nlvr) -> LXMERT's
NLVR2 items, as the original's ``process_dataset.py``::

    {"identifier": "dev-850-0-0", "img0": "dev-850-0-img0", "img1": "dev-850-0-img1", "label": 1,
     "sent": "...", "uid": "nlvr2_valid_0"}

``img0`` / ``img1`` are the identifier without its sentence id plus ``-img0`` / ``-img1`` (the image files'
stems, as ``extract-features --id-from stem`` names them). ``label`` is 1 for "True", 0 for "False"; a line
without a label gives an item without one. ``uid`` is ``nlvr2_<split>_<line index from 0>``; the split name
follows LXMERT (train -> train, dev -> valid, test1 -> test, test2 -> hidden) unless given.
"""

from __future__ import annotations

import json
from typing import Any

from tasks.data.jsonio import DataFormatError

__all__ = ["LXMERT_SPLIT_NAMES", "convert_nlvr2"]

#: the official file / identifier split -> the name in LXMERT's uids.
LXMERT_SPLIT_NAMES = {"train": "train", "dev": "valid", "test1": "test", "test2": "hidden"}


def convert_nlvr2(text: str, source: str = "data", split: str | None = None) -> list[dict[str, Any]]:
    """Convert the text of one NLVR2 JSON-lines file.

    Args:
        text: the file's content, one JSON object per line (blank lines are skipped; line numbers still count them).
        split: the uid's split name; default from the first identifier (``dev`` -> ``valid``, ...).

    Raises:
        DataFormatError: a line that is not a JSON object, lacks ``identifier`` / ``sentence``, has an
            identifier not shaped ``split-set-pair-sentence``, or a label other than "True" / "False"
            (naming file and line).
    """
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            ex = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(
                f"{where}: not a JSON object ({e.msg}); NLVR2 files have one object per line"
            ) from None
        if not isinstance(ex, dict):
            raise DataFormatError(f"{where}: not a JSON object")
        ident = ex.get("identifier")
        if not isinstance(ident, str) or len(ident.split("-")) != 4:
            raise DataFormatError(
                f"{where}: identifier {ident!r:.100} is not 'split-set_id-pair_id-sentence_id' (e.g. dev-850-0-0)"
            )
        if not isinstance(ex.get("sentence"), str):
            raise DataFormatError(f"{where}: example {ident} has no string 'sentence'")
        if split is None:
            first = ident.split("-")[0]
            split = LXMERT_SPLIT_NAMES.get(first, first)
        stem = ident.rsplit("-", 1)[0]
        item: dict[str, Any] = {
            "identifier": ident,
            "img0": f"{stem}-img0",
            "img1": f"{stem}-img1",
            "sent": ex["sentence"],
            "uid": f"nlvr2_{split}_{lineno - 1}",
        }
        if "label" in ex:
            if ex["label"] not in ("True", "False"):
                raise DataFormatError(
                    f'{where}: example {ident}: label must be "True" or "False", got {ex["label"]!r:.50}'
                )
            item["label"] = 1 if ex["label"] == "True" else 0
        items.append(item)
    return items
