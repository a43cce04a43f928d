"""The official VQA v2 accuracy, as GT-Vision-Lab's ``vqaEval.py`` (Python 2) computes it, quirks included.

For each question (official order of operations):

1. every human answer and the prediction: ``"\\n"`` and ``"\\t"`` replaced by a space, then ``strip()``;
2. only if the ten human answers are then NOT all identical, the human answers and the prediction go through
   :func:`process_punctuation` then :func:`process_digit_article` (so a prediction ``"Yes"`` scores 0 against
   ten ``"yes"``, but 100 against nine ``"yes"`` and one ``"no"``);
3. accuracy = mean over the ten leave-one-out subsets (each human answer left out in turn) of
   ``min(1, matches / 3)``. "Left out" is the official's dict comparison: every answer entry *equal* to the
   left-out one (same answer, answer_confidence and answer_id) is removed, which is exactly one entry in real
   data where answer ids are 1..10.

Scores are percentages rounded to 2 decimals with Python 2's ``round`` (ties away from zero:
:func:`tasks.metrics.base.round_half_away`): ``overall``, ``perAnswerType``, ``perQuestionType`` from the
unrounded per-question values, ``perQuestion`` each rounded.

Predictions must cover exactly the annotations' question ids (the official ``loadRes`` asserts it). A question id
predicted twice is refused, naming it: the official's index silently keeps the last entry, which changes the score
without a word.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

from tasks.metrics.base import MetricInputError, preview, refuse_repeated, round_half_away

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "MANUAL_MAP",
    "PUNCTUATION",
    "clean_whitespace",
    "evaluate_vqa",
    "official_normalize",
    "process_digit_article",
    "process_punctuation",
    "question_accuracy",
]

# Facts of vqaEval.py: the contraction map (keys with capitals never match: words are lower-cased first).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES: tuple[str, ...] = ("a", "an", "the")
# Not in the list: "." (periods have their own rule), "'", ":", "*", "#", "$", "%", "&", "^", "|", "~".
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
# The official "(?!<=\d)(\.)(?!\d)": the first group is a look-AHEAD for the text "<=" + digit (a typo for a
# look-behind) and never matches before a ".", so a period is removed unless a digit follows it ("1.5" stays,
# "5." -> "5", "a.m." -> "am"). Python 2 compiled it without re.UNICODE: \d is ASCII only.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)", re.ASCII)
# The official passes re.UNICODE as the third positional argument of Pattern.sub, i.e. count=re.UNICODE=32:
# at most the first 32 periods are removed.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def clean_whitespace(text: str) -> str:
    """Step 1, for every answer: newlines and tabs become spaces, then surrounding whitespace goes."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``.

    Each punctuation mark is deleted when it touches a space somewhere in the ORIGINAL text (``"p "`` or
    ``" p"``) or when the original text has a digit-comma-digit anywhere, else replaced by a space; then
    periods not followed by a digit are deleted (at most 32 of them).
    """
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, split on whitespace, number words -> digits
    (``none`` -> ``0`` too), drop the articles a / an / the, expand contractions (``dont`` -> ``don't``),
    join with single spaces."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


@functools.lru_cache(maxsize=1 << 16)
def official_normalize(text: str) -> str:
    """:func:`process_punctuation` then :func:`process_digit_article` (what step 2 applies; cached: the
    same few answers recur across a split)."""
    return process_digit_article(process_punctuation(text))


def question_accuracy(answers: list[Mapping[str, Any]], prediction: str) -> float:
    """One question's official accuracy in [0, 1] (unrounded).

    Args:
        answers: the human answer entries (``{"answer", "answer_confidence", "answer_id"}``; ten in VQA v2).
        prediction: the predicted answer string.
    """
    entries = [dict(a, answer=clean_whitespace(a["answer"])) for a in answers]
    pred = clean_whitespace(prediction)
    if len({e["answer"] for e in entries}) > 1:
        for e in entries:
            e["answer"] = official_normalize(e["answer"])
        pred = official_normalize(pred)
    matching = [e for e in entries if e["answer"] == pred]
    accs = []
    for left_out in entries:
        # matches among the entries not equal to the left-out one
        matches = len(matching) - sum(1 for e in matching if e == left_out)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


def _annotation_list(annotations: Any, source: str) -> list[dict[str, Any]]:
    if isinstance(annotations, Mapping):
        if "annotations" not in annotations:
            raise MetricInputError(
                f"{source}: no 'annotations' key; give the official VQA annotations file "
                "(e.g. v2_mscoco_val2014_annotations.json), not the questions file"
            )
        annotations = annotations["annotations"]
    if not isinstance(annotations, list):
        raise MetricInputError(f"{source}: 'annotations' must be a list of annotation objects")
    for i, ann in enumerate(annotations):
        if not isinstance(ann, Mapping):
            raise MetricInputError(f"{source}: annotation #{i} is not an object")
        qid = ann.get("question_id", f"<annotation #{i}>")
        for key in ("question_id", "answers", "question_type", "answer_type"):
            if key not in ann:
                raise MetricInputError(f"{source}: question {qid}: annotation has no {key!r}")
        answers = ann["answers"]
        if not isinstance(answers, list) or not answers:
            raise MetricInputError(f"{source}: question {qid}: 'answers' must be a non-empty list")
        for a in answers:
            if not isinstance(a, Mapping) or not isinstance(a.get("answer"), str):
                raise MetricInputError(
                    f"{source}: question {qid}: every entry of 'answers' needs a string 'answer' (got {a!r})"
                )
    return annotations


def _prediction_map(predictions: Any, source: str) -> dict[Any, str]:
    if not isinstance(predictions, list):
        raise MetricInputError(
            f'{source}: predictions must be a list of {{"question_id": int, "answer": str}} '
            "(the official 'results is not an array of objects')"
        )
    out: dict[Any, str] = {}
    first: dict[Any, int] = {}
    for i, p in enumerate(predictions):
        if not isinstance(p, Mapping) or "question_id" not in p or "answer" not in p:
            raise MetricInputError(
                f"{source}: prediction #{i} must be an object with 'question_id' and 'answer' (got {p!r:.200})"
            )
        if not isinstance(p["answer"], str):
            raise MetricInputError(
                f"{source}: question {p['question_id']!r}: 'answer' must be a string (got {p['answer']!r})"
            )
        refuse_repeated(p["question_id"], i, first, source, "question_id")
        out[p["question_id"]] = p["answer"]
    return out


def _check_coverage(qids: list[Any], pred: Mapping[Any, str], source: str) -> None:
    want = set(qids)
    missing = [q for q in qids if q not in pred]
    extra = [q for q in pred if q not in want]
    if not missing and not extra:
        return
    lines = [
        f"{source}: the predictions must cover exactly the annotations' {len(want)} question ids "
        "(as the official loadRes asserts)"
    ]
    if missing:
        lines.append(f"  {len(missing)} missing: {preview(missing)}")
        lines.append(
            "  (to score a subset, e.g. minival against the val2014 annotations: lxmert-eval vqa --only-predicted)"
        )
    if extra:
        lines.append(f"  {len(extra)} not in the annotations: {preview(extra)}")
        as_str = {str(q) for q in want}
        if any(not isinstance(q, int) and str(q) in as_str for q in extra):
            lines.append("  question ids must be integers as in the annotations (not strings)")
    raise MetricInputError("\n".join(lines))


def evaluate_vqa(
    annotations: Any,
    predictions: Any,
    questions: Any = None,
    *,
    only_predicted: bool = False,
    annotations_source: str = "annotations",
    predictions_source: str = "predictions",
    questions_source: str = "questions",
) -> dict[str, Any]:
    """Score predictions with the official VQA v2 metric.

    Args:
        annotations: the official annotations document (``{"annotations": [...]}``) or its list.
        predictions: ``[{"question_id": int, "answer": str}, ...]`` covering exactly the annotated questions.
        questions: optional official questions document; when given, every annotated question must be in
            it, and for ``task_type == "Multiple Choice"`` (VQA v1) the prediction must be one of the
            question's ``multiple_choices`` (both as the official ``loadRes``).
        only_predicted: score only the annotated questions that have a prediction (e.g. minival predictions
            against the whole val2014 file); not the official's behaviour, which needs exact coverage.
        *_source: names (file paths) used in error messages.

    Returns:
        ``{"overall": float, "perAnswerType": {type: float}, "perQuestionType": {type: float},
        "perQuestion": {question_id: float}}``, percentages rounded to 2 decimals.

    Raises:
        MetricInputError: malformed entries, duplicated annotated question ids, predictions that do not
            cover exactly the annotated ids (how many and which are listed).
    """
    anns = _annotation_list(annotations, annotations_source)
    qids = [a["question_id"] for a in anns]
    if len(set(qids)) != len(qids):
        seen: set[Any] = set()
        dups = [q for q in qids if q in seen or seen.add(q)]
        raise MetricInputError(f"{annotations_source}: repeated question ids: {preview(sorted(set(dups)))}")
    pred = _prediction_map(predictions, predictions_source)
    if only_predicted:
        anns = [a for a in anns if a["question_id"] in pred]
        qids = [a["question_id"] for a in anns]
    _check_coverage(qids, pred, predictions_source)
    if questions is not None:
        _check_questions(questions, qids, pred, questions_source)

    per_question: dict[Any, float] = {}
    by_ans: dict[str, list[float]] = {}
    by_ques: dict[str, list[float]] = {}
    all_acc: list[float] = []
    for ann in anns:
        acc = question_accuracy(ann["answers"], pred[ann["question_id"]])
        all_acc.append(acc)
        by_ques.setdefault(ann["question_type"], []).append(acc)
        by_ans.setdefault(ann["answer_type"], []).append(acc)
        per_question[ann["question_id"]] = round_half_away(100 * acc)
    if not all_acc:
        raise MetricInputError(f"{annotations_source}: no annotations to score")
    return {
        "overall": _percent(all_acc),
        "perAnswerType": {k: _percent(v) for k, v in by_ans.items()},
        "perQuestionType": {k: _percent(v) for k, v in by_ques.items()},
        "perQuestion": per_question,
    }


def _percent(values: Iterable[float]) -> float:
    values = list(values)
    return round_half_away(100 * float(sum(values)) / len(values))


def _check_questions(questions: Any, qids: list[Any], pred: Mapping[Any, str], source: str) -> None:
    if not isinstance(questions, Mapping) or not isinstance(questions.get("questions"), list):
        raise MetricInputError(f"{source}: not an official VQA questions file (no 'questions' list)")
    by_id = {q.get("question_id"): q for q in questions["questions"] if isinstance(q, Mapping)}
    missing = [q for q in qids if q not in by_id]
    if missing:
        raise MetricInputError(
            f"{source}: {len(missing)} annotated question ids are not in the questions file "
            f"(wrong split?): {preview(missing)}"
        )
    if questions.get("task_type") == "Multiple Choice":
        for qid in qids:
            choices = by_id[qid].get("multiple_choices", [])
            if pred[qid] not in choices:
                raise MetricInputError(
                    f"question {qid}: predicted answer {pred[qid]!r} is not one of the multiple choices"
                )
