"""NLVR2 accuracy and consistency as lil-lab/nlvr's ``nlvr2/eval/metrics.py``.

- Predictions: a CSV ``identifier,prediction`` (no header; LXMERT writes ``dev-850-0-0,True``). Each line is
  stripped and split on ``","``; the first field is the identifier, the second the prediction, further fields
  are ignored. A repeated identifier is refused, naming it and both lines (the official's dict silently keeps
  the last line). Blank lines are skipped (the official crashes on them).
- Correct when ``prediction.lower() == label.lower()`` (``"true"``, ``"TRUE"`` count; ``" True"`` does not).
- Consistency: examples are grouped by their identifier with the pair id (third ``-`` field) blanked
  (``dev-850-0-0`` -> ``dev-850--0``: one sentence over all its image pairs); the share of groups whose
  examples are all correct.
- Every labelled example needs a prediction (the official prints the missing ones and stops); predictions
  for other identifiers are ignored. Both scores are fractions in [0, 1], as the official prints them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from tasks.metrics.base import MetricInputError, preview

__all__ = ["consistency_key", "evaluate_nlvr2", "parse_examples", "parse_predictions_csv"]


def parse_predictions_csv(lines: Iterable[str], source: str = "predictions") -> dict[str, str]:
    """``{identifier: prediction}`` from the lines of a predictions CSV."""
    out: dict[str, str] = {}
    first: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        fields = text.split(",")
        if len(fields) < 2:
            raise MetricInputError(
                f"{source}:{lineno}: expected 'identifier,prediction' (e.g. dev-850-0-0,True), got {text!r:.200}"
            )
        if fields[0] in first:
            raise MetricInputError(
                f"{source}:{lineno}: identifier {fields[0]!r} is predicted twice (first on line {first[fields[0]]}); "
                "remove one (the official evaluator would silently keep the last one)"
            )
        first[fields[0]] = lineno
        out[fields[0]] = fields[1]
    return out


def parse_examples(text: str, source: str = "data") -> list[dict[str, Any]]:
    """Labelled examples from the official JSON-lines file (``dev.json``: one object per line with
    ``identifier`` and ``label`` "True"/"False"), or from LXMERT's converted list (``[{"identifier",
    "label": 0|1, ...}]``), whose 1 / 0 labels are read as "True" / "False"."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise MetricInputError(f"{source}: not valid JSON: {e}") from None
        examples = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or "identifier" not in item or item.get("label") not in (0, 1):
                raise MetricInputError(
                    f"{source}: item #{i} needs 'identifier' and a 0/1 'label' (LXMERT's NLVR2 format)"
                )
            examples.append(
                {"identifier": item["identifier"], "label": "True" if item["label"] == 1 else "False"}
            )
        return examples
    examples = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetricInputError(f"{source}:{lineno}: not a JSON object: {e}") from None
        if not isinstance(ex, Mapping) or not isinstance(ex.get("identifier"), str):
            raise MetricInputError(f"{source}:{lineno}: no string 'identifier'")
        if not isinstance(ex.get("label"), str):
            raise MetricInputError(
                f'{source}:{lineno}: example {ex["identifier"]} has no \'label\' ("True"/"False"); '
                "scoring needs a labelled split (train, dev, test1, test2)"
            )
        examples.append(ex)
    return examples


def consistency_key(identifier: str, source: str = "data") -> str:
    """The sentence group of an example: its identifier with the pair id blanked (``dev-850-0-0`` ->
    ``dev-850--0``)."""
    parts = identifier.split("-")
    if len(parts) < 3:
        raise MetricInputError(
            f"{source}: identifier {identifier!r} is not 'split-set_id-pair_id-sentence_id' (e.g. dev-850-0-0)"
        )
    parts[2] = ""
    return "-".join(parts)


def evaluate_nlvr2(
    examples: list[Mapping[str, Any]],
    predictions: Mapping[str, str],
    *,
    data_source: str = "data",
    predictions_source: str = "predictions",
) -> dict[str, Any]:
    """Score NLVR2 predictions.

    Args:
        examples: labelled examples (``identifier``, ``label`` "True"/"False"), see :func:`parse_examples`.
        predictions: ``{identifier: prediction}`` (see :func:`parse_predictions_csv`).

    Returns:
        ``{"accuracy": fraction, "consistency": fraction, "examples": int, "sentences": int}``.

    Raises:
        MetricInputError: no examples; examples without a prediction (how many and which).
    """
    if not examples:
        raise MetricInputError(f"{data_source}: no labelled examples")
    missing = [ex["identifier"] for ex in examples if ex["identifier"] not in predictions]
    if missing:
        raise MetricInputError(
            f"{predictions_source}: some predictions are missing: got {len(predictions)} predictions, "
            f"{len(examples)} examples in {data_source}; missing {len(missing)}: {preview(missing)}"
        )
    n_correct = 0
    groups: dict[str, bool] = {}
    for ex in examples:
        key = consistency_key(ex["identifier"], data_source)
        groups.setdefault(key, True)
        if predictions[ex["identifier"]].lower() == ex["label"].lower():
            n_correct += 1
        else:
            groups[key] = False
    return {
        "accuracy": n_correct / len(examples),
        "consistency": sum(groups.values()) / len(groups),
        "examples": len(examples),
        "sentences": len(groups),
    }
