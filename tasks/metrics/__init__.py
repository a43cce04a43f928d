"""The official evaluation metrics of VQA v2, GQA and NLVR2 (pure Python, no torch).

Each module reproduces its benchmark's official evaluator on in-memory data; ``lxmert-eval``
(:mod:`tasks.metrics.cli`) reads the files. LXMERT's own training-time accuracies live with the tasks.
"""

from tasks.metrics.base import MetricInputError, round_half_away
from tasks.metrics.gqa import evaluate_gqa, format_gqa_report
from tasks.metrics.nlvr2 import evaluate_nlvr2, parse_examples, parse_predictions_csv
from tasks.metrics.vqa import evaluate_vqa, official_normalize, question_accuracy

__all__ = [
    "MetricInputError",
    "evaluate_gqa",
    "evaluate_nlvr2",
    "evaluate_vqa",
    "format_gqa_report",
    "official_normalize",
    "parse_examples",
    "parse_predictions_csv",
    "question_accuracy",
    "round_half_away",
]
