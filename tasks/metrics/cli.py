"""``lxmert-eval``: the official VQA v2 / GQA / NLVR2 metrics on a predictions file.

    lxmert-eval vqa   --annotations A.json --predictions P.json [--questions Q.json] [--out SCORES.json]
    lxmert-eval gqa   --questions Q.json --predictions P.json [--choices C.json] [--consistency] [--out SCORES.json]
    lxmert-eval nlvr2 --data dev.json --predictions P.csv [--out SCORES.json]

Prints a report; ``--out`` writes the scores as JSON (atomically). Exit status: 0 scored, 2 bad input
(missing predictions, malformed files: the message names them).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from tasks.data.jsonio import DataFormatError, read_json, read_text, write_json
from tasks.metrics.base import MetricInputError
from tasks.metrics.gqa import evaluate_gqa, format_gqa_report
from tasks.metrics.nlvr2 import evaluate_nlvr2, parse_examples, parse_predictions_csv
from tasks.metrics.vqa import evaluate_vqa

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lxmert-eval", description="Score predictions with the official VQA v2 / GQA / NLVR2 metrics."
    )
    sub = p.add_subparsers(dest="benchmark", required=True)
    v = sub.add_parser(
        "vqa",
        help="official VQA v2 accuracy (vqaEval.py)",
        description="The official VQA v2 accuracy (GT-Vision-Lab vqaEval.py, quirks included): overall, per "
        "answer type, per question type, per question; percentages rounded to 2 decimals.",
    )
    v.add_argument("--annotations", required=True, metavar="A.json", help="official annotations file")
    v.add_argument(
        "--predictions", required=True, metavar="P.json", help='[{"question_id": int, "answer": str}, ...]'
    )
    v.add_argument(
        "--questions", metavar="Q.json", help="official questions file (checked against the annotations)"
    )
    v.add_argument(
        "--only-predicted",
        action="store_true",
        help="score only the annotated questions that have a prediction (e.g. minival predictions against the "
        "val2014 annotations); the official needs predictions for every annotated question",
    )
    v.add_argument("--out", metavar="SCORES.json", help="write the scores as JSON")

    g = sub.add_parser(
        "gqa",
        help="official GQA metrics (eval.py)",
        description="The official GQA metrics (eval.py) over balanced questions: accuracy, binary/open, "
        "validity/plausibility (0 without --choices), consistency (--consistency), distribution, accuracy per "
        "structural/semantic type, steps and length.",
    )
    g.add_argument(
        "--questions",
        required=True,
        metavar="Q.json",
        help="GQA questions with answers (e.g. testdev_balanced_questions.json)",
    )
    g.add_argument(
        "--predictions", required=True, metavar="P.json", help='[{"questionId": str, "prediction": str}, ...]'
    )
    g.add_argument("--choices", metavar="C.json", help="GQA choices file ({qid: {valid, plausible}})")
    g.add_argument(
        "--consistency",
        action="store_true",
        help="score consistency over entailed questions (needs predictions for every question of the file)",
    )
    g.add_argument("--out", metavar="SCORES.json", help="write the scores as JSON")

    n = sub.add_parser(
        "nlvr2",
        help="official NLVR2 accuracy and consistency (metrics.py)",
        description="The official NLVR2 accuracy and consistency (lil-lab/nlvr metrics.py), as fractions.",
    )
    n.add_argument(
        "--data",
        required=True,
        metavar="dev.json",
        help="official JSON-lines file (or LXMERT's converted list)",
    )
    n.add_argument("--predictions", required=True, metavar="P.csv", help="CSV lines identifier,True|False")
    n.add_argument("--out", metavar="SCORES.json", help="write the scores as JSON")
    return p


def format_vqa_report(scores: Mapping[str, Any]) -> str:
    """Overall, per answer type and per question type, as the official demo prints them (types sorted)."""
    lines = [
        f"Overall Accuracy is: {scores['overall']:.2f}",
        "",
        "Per Answer Type Accuracy is the following:",
    ]
    lines += [f"{k} : {v:.2f}" for k, v in sorted(scores["perAnswerType"].items())]
    lines += ["", "Per Question Type Accuracy is the following:"]
    lines += [f"{k} : {v:.2f}" for k, v in sorted(scores["perQuestionType"].items())]
    lines.append(f"({len(scores['perQuestion'])} questions)")
    return "\n".join(lines)


def run_vqa(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    scores = evaluate_vqa(
        read_json(args.annotations, "VQA annotations file"),
        read_json(args.predictions, "predictions file"),
        read_json(args.questions, "VQA questions file") if args.questions else None,
        only_predicted=args.only_predicted,
        annotations_source=args.annotations,
        predictions_source=args.predictions,
        questions_source=args.questions or "questions",
    )
    return scores, format_vqa_report(scores)


def run_gqa(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    scores = evaluate_gqa(
        read_json(args.questions, "GQA questions file"),
        read_json(args.predictions, "predictions file"),
        read_json(args.choices, "GQA choices file") if args.choices else None,
        consistency=args.consistency,
        questions_source=args.questions,
        predictions_source=args.predictions,
        choices_source=args.choices or "choices",
    )
    return scores, format_gqa_report(scores, consistency=args.consistency)


def run_nlvr2(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    examples = parse_examples(read_text(args.data, "NLVR2 data file"), source=args.data)
    predictions = parse_predictions_csv(
        read_text(args.predictions, "predictions file").splitlines(), source=args.predictions
    )
    scores = evaluate_nlvr2(examples, predictions, data_source=args.data, predictions_source=args.predictions)
    report = (
        f"accuracy={scores['accuracy']}\nconsistency={scores['consistency']}\n"
        f"({scores['examples']} examples, {scores['sentences']} sentences; "
        f"accuracy {100 * scores['accuracy']:.2f}%, consistency {100 * scores['consistency']:.2f}%)"
    )
    return scores, report


def main(argv: list[str] | None = None) -> int:
    """Run ``lxmert-eval``; returns the exit status."""
    args = build_parser().parse_args(argv)
    run = {"vqa": run_vqa, "gqa": run_gqa, "nlvr2": run_nlvr2}[args.benchmark]
    try:
        scores, report = run(args)
    except (DataFormatError, MetricInputError) as e:
        print(f"lxmert-eval {args.benchmark}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(report)
    if args.out:
        write_json(args.out, scores)
        print(f"scores written to {args.out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
