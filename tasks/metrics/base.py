"""What the three official metrics share: their input error and the official rounding."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Any


class MetricInputError(ValueError):
    """Predictions or ground truth that the official evaluator would refuse (or crash on).

    The message names the file / question id and what to do.
    """


def round_half_away(value: float, ndigits: int = 2) -> float:
    """Python 2's ``round(value, ndigits)``, which the official VQA ``vqaEval.py`` (Python 2) uses.

    The exact binary value of ``value`` is rounded; an exact tie goes away from zero (``3.125 -> 3.13``),
    where Python 3's ``round`` goes to the even digit (``3.12``). Everything else is the same.
    """
    quantum = Decimal(1).scaleb(-ndigits)
    return float(Decimal(value).quantize(quantum, rounding=ROUND_HALF_UP))


def preview(ids: list, limit: int = 10) -> str:
    """``'1, 2, 3 ... and 7 more'``: a short list of ids for an error message."""
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" ... and {len(ids) - limit} more" if len(ids) > limit else "")


def refuse_repeated(qid: Any, index: int, first: dict[Any, int], source: str, key: str) -> None:
    """Record that prediction #``index`` is for ``qid``; :class:`MetricInputError` naming the id and both
    predictions when ``first`` already holds it (the official evaluators keep the last one silently)."""
    if qid in first:
        raise MetricInputError(
            f"{source}: {key} {qid!r} is predicted twice (predictions #{first[qid]} and #{index}); remove one "
            "(the official evaluator would silently keep the last one)"
        )
    first[qid] = index
