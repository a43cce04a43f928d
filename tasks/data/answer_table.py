"""LXMERT's answer tables: reading the answer files and the pretraining answer normalisation.

The pretraining QA table (``all_ans.json``, 9500 answers) was built from answers normalised by
:func:`normalize_answer`; every QA label of the pretraining data goes through it (out-of-table labels are
dropped), and fine-tuning VQA / GQA matches its own answers to the 9500-way head through it too.

>>> normalize_answer("The Dog.")
'dog'
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tasks.data.jsonio import DataFormatError, read_json

# Applied last (the original's ANS_CONVERT). The "a man" / "the man" entries never fire once the articles are
# stripped; they are kept as the original has them.
_ANSWER_CONVERSIONS = {
    "a man": "man",
    "the man": "man",
    "a woman": "woman",
    "the woman": "woman",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "grey": "gray",
}


def normalize_answer(answer: str) -> str:
    """LXMERT's pretraining answer normalisation (the original ``AnswerTable.convert_ans``).

    Lower-case; drop one trailing ``"."``; then strip a leading ``"a "``, then ``"an "``, then ``"the "``
    (three checks in that order, each applied to what the previous one left: ``"a the dog"`` -> ``"dog"``);
    then map number words one..ten to digits and ``"grey"`` to ``"gray"``.
    ``"The Dog."`` -> ``"dog"``, ``"two"`` -> ``"2"``, ``"a man"`` -> ``"man"``.
    """
    if not answer:
        return ""
    ans = answer.lower()
    if ans.endswith("."):
        ans = ans[:-1].strip()
    for article in ("a ", "an ", "the "):
        if ans.startswith(article):
            ans = ans[len(article) :].strip()
    return _ANSWER_CONVERSIONS.get(ans, ans)


def load_answer_table(path: str | Path, datasets: Iterable[str] | None = None) -> list[str]:
    """Answers in label order from any of LXMERT's answer files.

    Accepts ``all_ans.json`` (list of ``{"ans": str, "dsets": [str, ...]}``), ``*_label2ans.json`` (list of
    str) and ``*_ans2label.json`` (``{answer: label}``, labels ``0..N-1``). ``datasets`` (``all_ans.json``
    only; the original's ``--qaSets``) keeps the answers used by at least one of the named datasets, in file
    order: ``{"vqa"}`` -> 3124 answers, ``{"gqa"}`` -> 1735, ``{"visual7w"}`` -> 9409; ``None`` keeps all 9500.

    Raises :class:`tasks.data.jsonio.DataFormatError` (a ``ValueError``) naming the file when it is unreadable or not an answer table.
    """
    path = Path(path)
    data: Any = read_json(path, "answer table")
    if datasets is not None:
        wanted = set(datasets)
        if not (
            isinstance(data, list) and all(isinstance(a, dict) and "dsets" in a and "ans" in a for a in data)
        ):
            raise DataFormatError(
                f"{path}: selecting answers by dataset ({sorted(wanted)}) needs all_ans.json "
                "(entries {'ans': ..., 'dsets': [...]}); pass datasets=None for other tables"
            )
        return [a["ans"] for a in data if wanted & set(a["dsets"])]
    if isinstance(data, dict):
        answers = [""] * len(data)
        seen = [False] * len(data)
        for ans, label in data.items():
            if not isinstance(label, int) or not 0 <= label < len(data):
                raise DataFormatError(
                    f"{path}: label {label!r} of answer {ans!r} is not in 0..{len(data) - 1}"
                )
            if seen[label]:
                raise DataFormatError(f"{path}: label {label} is given to {answers[label]!r} and to {ans!r}")
            answers[label], seen[label] = ans, True
        return answers
    if isinstance(data, list) and all(isinstance(a, str) for a in data):
        return data
    if isinstance(data, list) and all(isinstance(a, dict) and "ans" in a for a in data):
        return [a["ans"] for a in data]
    raise DataFormatError(
        f"{path}: not an answer table; expected a list of answers, a list of {{'ans': ...}} or {{answer: label}}"
    )
