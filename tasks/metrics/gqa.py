"""The official GQA evaluation (``eval.py`` distributed with the GQA data), its exact semantics.

Only *balanced* questions (``bool(q["isBalanced"])``) are scored; unbalanced ones matter only as entailed
questions inside consistency. Correctness is exact string equality, no normalisation. Scores:

- ``accuracy``, ``binary`` (structural type other than ``"query"``), ``open`` (``"query"``): percent;
- ``validity`` / ``plausibility``: percent of predictions in the question's ``valid`` / ``plausible`` choices
  list; ``0`` for all without a choices file; when ``"Common"`` occurs in the detailed type the prediction
  must be one of ``color`` / ``material`` / ``shape`` instead;
- ``consistency`` (only when asked): for each correctly answered balanced question with entailed questions
  (itself removed), the share of those answered correctly (balanced or not), averaged over source questions;
- ``distribution``: chi-square between predicted and gold answer counts per ``groups.global`` group,
  weighted by group size, divided by 100 (lower is better);
- ``accuracyPerStructuralType``, ``accuracyPerSemanticType``, ``accuracyPerLength`` (words by ``str.split()``),
  ``accuracyPerSteps`` (semantic operations other than exist / query name / choose name): ``[percent, count]``.

Values are unrounded (as the official JSON); :func:`format_gqa_report` prints them like the official script. A
``questionId`` predicted twice is refused, naming it (the official's dict silently keeps the last one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tasks.metrics.base import MetricInputError, preview, refuse_repeated

__all__ = ["COMMON_ANSWERS", "count_steps", "evaluate_gqa", "format_gqa_report"]

#: what a "Common" question (``twoCommon``: "what do X and Y have in common?") may validly answer.
COMMON_ANSWERS: tuple[str, ...] = ("color", "material", "shape")
_NOT_STEPS: tuple[str, ...] = ("exist", "query: name", "choose name")


def _mean(values: list[float]) -> float:
    """The official average: an empty list gives 0."""
    return float(sum(values)) / len(values) if values else 0.0


def count_steps(semantic: list[Mapping[str, Any]]) -> int:
    """Reasoning steps of a question: its ``semantic`` operations whose ``"operation: argument"`` text
    contains none of ``exist``, ``query: name``, ``choose name`` (case-sensitive substrings)."""
    n = 0
    for c in semantic:
        text = "{}: {}".format(c["operation"], c["argument"])
        if not any(s in text for s in _NOT_STEPS):
            n += 1
    return n


def _field(q: Mapping[str, Any], qid: str, *keys: str, source: str) -> Any:
    value: Any = q
    for k in keys:
        if not isinstance(value, Mapping) or k not in value:
            raise MetricInputError(
                f"{source}: question {qid}: no {'.'.join(keys)!r} (the official GQA questions with answers "
                "and annotations are needed: e.g. testdev_balanced_questions.json, not a test/submission file)"
            )
        value = value[k]
    return value


def _prediction_map(predictions: Any, source: str) -> dict[str, Any]:
    if not isinstance(predictions, list):
        raise MetricInputError(
            f'{source}: predictions must be a list of {{"questionId": str, "prediction": str}}'
        )
    out: dict[str, Any] = {}
    first: dict[Any, int] = {}
    for i, p in enumerate(predictions):
        if not isinstance(p, Mapping) or "questionId" not in p or "prediction" not in p:
            raise MetricInputError(
                f"{source}: prediction #{i} must be an object with 'questionId' and 'prediction' "
                f"(got {p!r:.200})"
            )
        refuse_repeated(p["questionId"], i, first, source, "questionId")
        out[p["questionId"]] = p["prediction"]
    return out


def evaluate_gqa(
    questions: Mapping[str, Mapping[str, Any]],
    predictions: Any,
    choices: Mapping[str, Mapping[str, Any]] | None = None,
    consistency: bool = False,
    *,
    questions_source: str = "questions",
    predictions_source: str = "predictions",
    choices_source: str = "choices",
) -> dict[str, Any]:
    """Score GQA predictions as the official ``eval.py``.

    Args:
        questions: the official questions dict ``{questionId: {question, answer, isBalanced, types, groups,
            entailed, semantic, ...}}`` (e.g. ``testdev_balanced_questions.json``), in file order.
        predictions: ``[{"questionId": str, "prediction": str}, ...]``; ids not in ``questions`` are ignored.
        choices: ``{questionId: {"valid": [...], "plausible": [...]}}`` or None (validity = plausibility = 0).
        consistency: also score consistency; then every question (balanced or not) needs a prediction.

    Returns:
        the official score dict (see the module docstring); ``consistency`` is 0 when not asked.

    Raises:
        MetricInputError: missing predictions (how many and which), fields missing from a balanced
            question, a balanced question absent from ``choices``, an entailed id not in ``questions``,
            no balanced question with a global group (the official dies there).
    """
    if not isinstance(questions, Mapping):
        raise MetricInputError(
            f"{questions_source}: the GQA questions file must be a {{questionId: question}} object"
        )
    pred = _prediction_map(predictions, predictions_source)
    balanced = [
        (qid, q)
        for qid, q in questions.items()
        if bool(_field(q, qid, "isBalanced", source=questions_source))
    ]
    needed = list(questions) if consistency else [qid for qid, _ in balanced]
    missing = [qid for qid in needed if qid not in pred]
    if missing:
        what = "question" if consistency else "balanced question"
        hint = " (--consistency needs predictions for every question of the file)" if consistency else ""
        raise MetricInputError(
            f"{predictions_source}: missing predictions for {len(missing)} {what}s of {questions_source}"
            f"{hint}: {preview(missing)}"
        )

    correct: list[float] = []
    binary: list[float] = []
    open_: list[float] = []
    valid: list[float] = []
    plausible: list[float] = []
    consistent: list[float] = []
    per_struct: dict[str, list[float]] = {}
    per_sem: dict[str, list[float]] = {}
    per_len: dict[int, list[float]] = {}
    per_steps: dict[int, list[float]] = {}
    gold_dist: dict[str, dict[str, int]] = {}
    pred_dist: dict[str, dict[str, int]] = {}

    for qid, q in balanced:
        src = questions_source
        answer = _field(q, qid, "answer", source=src)
        p = pred[qid]
        ok = float(p == answer)
        correct.append(ok)
        structural = _field(q, qid, "types", "structural", source=src)
        (open_ if structural == "query" else binary).append(ok)
        per_struct.setdefault(structural, []).append(ok)
        per_sem.setdefault(_field(q, qid, "types", "semantic", source=src), []).append(ok)
        per_len.setdefault(len(_field(q, qid, "question", source=src).split()), []).append(ok)
        per_steps.setdefault(count_steps(_field(q, qid, "semantic", source=src)), []).append(ok)

        if choices:
            if qid not in choices:
                raise MetricInputError(
                    f"{choices_source}: no choices for balanced question {qid} (wrong split's choices file?)"
                )
            if "Common" in _field(q, qid, "types", "detailed", source=src):
                is_valid = is_plausible = p in COMMON_ANSWERS
            else:
                entry = choices[qid]
                if not isinstance(entry, Mapping) or "valid" not in entry or "plausible" not in entry:
                    raise MetricInputError(
                        f"{choices_source}: question {qid}: the entry needs 'valid' and 'plausible' lists"
                    )
                is_valid, is_plausible = p in entry["valid"], p in entry["plausible"]
        else:
            is_valid = is_plausible = False
        valid.append(float(is_valid))
        plausible.append(float(is_plausible))

        group = _field(q, qid, "groups", "global", source=src)
        if group is not None:
            gold_dist.setdefault(group, {})
            pred_dist.setdefault(group, {})
            gold_dist[group][answer] = gold_dist[group].get(answer, 0) + 1
            pred_dist[group][p] = pred_dist[group].get(p, 0) + 1

        if consistency and ok:
            inferred = [e for e in _field(q, qid, "entailed", source=src) if e != qid]
            if inferred:
                scores = []
                for e in inferred:
                    if e not in questions:
                        raise MetricInputError(
                            f"{questions_source}: question {qid} entails {e}, which is not in the file"
                        )
                    scores.append(float(pred[e] == _field(questions[e], e, "answer", source=src)))
                consistent.append(_mean(scores))

    if not gold_dist:
        raise MetricInputError(
            f"{questions_source}: no balanced question has a groups.global value, so the distribution score "
            "is undefined (the official eval.py dies with ZeroDivisionError here)"
        )
    chi_total = 0.0
    n_total = 0
    for group, gold in gold_dist.items():
        chi = sum((pred_dist[group].get(a, 0) - n) ** 2 / n for a, n in gold.items())
        size = sum(gold.values())
        chi_total += chi * size
        n_total += size

    def per(d: Mapping[Any, list[float]]) -> dict[Any, list[float]]:
        return {k: [100 * _mean(v), len(v)] for k, v in d.items()}

    return {
        "accuracy": 100 * _mean(correct),
        "binary": 100 * _mean(binary),
        "open": 100 * _mean(open_),
        "validity": 100 * _mean(valid),
        "plausibility": 100 * _mean(plausible),
        "consistency": 100 * _mean(consistent) if consistency else 0.0,
        "distribution": chi_total / n_total / 100,
        "accuracyPerStructuralType": per(per_struct),
        "accuracyPerSemanticType": per(per_sem),
        "accuracyPerLength": per(per_len),
        "accuracyPerSteps": per(per_steps),
    }


def format_gqa_report(scores: Mapping[str, Any], consistency: bool = False) -> str:
    """The official script's printout: main lines, then per structural / semantic type, steps, words."""
    lines = []
    for name, key in (("Binary", "binary"), ("Open", "open"), ("Accuracy", "accuracy")):
        lines.append(f"{name}: {scores[key]:.2f}%")
    if consistency:
        lines.append(f"Consistency: {scores['consistency']:.2f}%")
    lines.append(f"Validity: {scores['validity']:.2f}%")
    lines.append(f"Plausibility: {scores['plausibility']:.2f}%")
    lines.append(f"Distribution: {scores['distribution']:.2f} (lower is better)")
    blocks = (
        ("structural type", "accuracyPerStructuralType", str),
        ("semantic type", "accuracyPerSemanticType", str),
        ("steps number", "accuracyPerSteps", int),
        ("words number", "accuracyPerLength", int),
    )
    for title, key, sort_key in blocks:
        lines.append("")
        lines.append(f"Accuracy / {title}:")
        for k in sorted(scores[key], key=sort_key):
            value, count = scores[key][k]
            lines.append(f"  {k}: {value:.2f}% ({count} questions)")
    return "\n".join(lines)
