"""``lxmert-answer``: ask a fine-tuned LXMERT a question about your own photo.

Examples::

    lxmert-answer photo.jpg "What is the man holding?" --model runs/vqa/best
    lxmert-answer photo.jpg "What is the man holding?" --model runs/vqa/best --weights faster_rcnn_from_caffe_attr.pkl
    lxmert-answer photo.jpg "What color is the bus?" --model runs/vqa/best --weights W.pkl --json --draw seen.png
    lxmert-answer --questions questions.jsonl --model unc-nlp/lxmert-vqa-uncased --answers label2ans.json \\
        --weights W.pkl --out answers.jsonl

The detector runs in memory exactly as ``extract-features`` would (same preprocessing, box selection and
settings flags), then the model. A detector flag left out takes the model folder's recorded extractor
(``extractor.json``: config, image sizes, box selection, weights file or random weights and seed; see
:mod:`tasks.answer.recorded`), so ``lxmert-answer IMAGE QUESTION --model RUN/best`` answers as the model was
trained; a flag given overrides the record (and a warning names the difference). ``--questions`` reads JSON lines ``{"image": PATH, "question": TEXT}``
(relative paths against the file's folder); questions about one image share one extraction; bad lines are
reported (file:line) and skipped. Exit codes: 0 every question answered, 1 some input could not be answered
(unreadable image, empty question, bad line), 2 refused before answering (model, weights, answer table,
arguments, extractor mismatch with ``--strict``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from common.config import field_choices, field_default
from common.cpu import cpu_autocast_warning, tune_cpu_allocator
from extract.cli import add_detector_arguments, detector_config_from_args
from extract.config import AMP_DTYPES, ExtractConfig
from tasks.answer.answerer import (
    Answerer,
    AnswerInputError,
    AnswerResult,
    AnswerSetupError,
)
from tasks.answer.drawing import draw_result
from tasks.answer.recorded import RECORDED_FLAGS, flags_from_record, recorded_extractor

__all__ = [
    "QuestionLine",
    "add_answerer_arguments",
    "build_parser",
    "describe_extractor",
    "extract_config_from_args",
    "main",
    "read_questions",
    "unset_namespace",
]

PROG = "lxmert-answer"
EXIT_OK, EXIT_BAD_INPUT, EXIT_REFUSED = 0, 1, 2
_UNSET = object()  # a detector flag not given: taken from the model's extractor record, else its default


def _default(name: str) -> Any:
    """A detector setting's default: :class:`extract.config.ExtractConfig`'s (one place, as extract-features)."""
    return field_default(ExtractConfig, name)


@dataclass
class QuestionLine:
    """One valid line of a ``--questions`` file: where it is, the image path (resolved) and the question."""

    line: int
    image: str
    question: str
    extra: dict[str, Any]


def read_questions(path: str | Path) -> tuple[list[QuestionLine], list[str]]:
    """Parse a JSON-lines questions file.

    Returns ``(questions, problems)``: valid lines, and one ``"FILE:LINE: what is wrong"`` message per bad
    line (invalid JSON, not an object, missing or empty ``image`` / ``question``). Blank lines are ignored.
    Relative image paths are taken against the file's folder. Keys besides ``image`` and ``question`` (e.g.
    ``question_id``) are kept in ``extra`` and copied to the output.

    Raises:
        OSError: the file cannot be read.
    """
    path = Path(path)
    base = path.parent
    good: list[QuestionLine] = []
    bad: list[str] = []
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            text = raw.strip()
            if not text:
                continue
            where = f"{path}:{number}"
            try:
                item = json.loads(text)
            except json.JSONDecodeError as e:
                bad.append(f"{where}: not valid JSON ({e.msg} at column {e.colno}); skipped")
                continue
            if not isinstance(item, dict):
                bad.append(f'{where}: expected an object {{"image": ..., "question": ...}}; skipped')
                continue
            problems = [
                f"{key!r} is missing" if key not in item else f"{key!r} must be a non-empty string"
                for key in ("image", "question")
                if not (isinstance(item.get(key), str) and item[key].strip())
            ]
            if problems:
                bad.append(f"{where}: {' and '.join(problems)}; skipped")
                continue
            image = Path(item["image"])
            image = image if image.is_absolute() else base / image
            extra = {k: v for k, v in item.items() if k not in ("image", "question")}
            good.append(QuestionLine(number, str(image), item["question"], extra))
    return good, bad


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for ``--help``)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} IMAGE QUESTION --model DIR [--weights FILE | --random-weights] [options]\n"
        f"       {PROG} --questions FILE.jsonl --model DIR [--weights FILE | --random-weights] [--out FILE] [options]",
        description="Answer questions about your own images with a fine-tuned LXMERT: the project's VG detector runs "
        "in memory (as extract-features would), then the model; prints the top answers with probabilities. "
        "Detector and image flags left out are taken from the model folder's extractor.json (the settings of its "
        "training features); the defaults shown apply to a model without one.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("image", nargs="?", help="image file (jpg/png/...)")
    p.add_argument("question", nargs="?", help="the question, quoted")
    p.add_argument(
        "--questions", metavar="FILE", help='JSON lines {"image": PATH, "question": TEXT}, one per line'
    )
    p.add_argument("--out", metavar="FILE", help="--questions: write the JSON lines here instead of stdout")
    add_answerer_arguments(p)
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="one JSON object per question instead of text")
    g.add_argument("--draw", metavar="OUT.png", help="write the image shaded by the model's attention")
    g.add_argument("--top-k", type=int, default=5, help="answers shown per question")
    g.add_argument("--verbose", action="store_true", help="library logs and per-question times")
    return p


def add_answerer_arguments(p: argparse.ArgumentParser) -> None:
    """The model, detector, image and execution flags shared by ``lxmert-answer`` and ``lxmert-serve``; read back
    with :func:`extract_config_from_args`."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", required=True, help="fine-tuned model folder (RUN_DIR/best), checkpoint file or Hub id"
    )
    g.add_argument(
        "--answers", metavar="FILE", help="answer table (label2ans.json) for a model that carries none"
    )
    g.add_argument(
        "--strict", action="store_true", help="refuse a model trained on features from another extractor"
    )
    add_detector_arguments(
        p.add_argument_group(
            "detector (as extract-features; left out: as the model's extractor.json records)"
        ),
        p.add_argument_group("images (as extract-features; left out: as the model's extractor.json records)"),
    )
    g = p.add_argument_group("execution")
    g.add_argument(
        "--device", default=_default("device"), help="cuda | cuda:N | cpu (None: cuda when available)"
    )
    g.add_argument(
        "--amp",
        choices=field_choices(ExtractConfig, "amp"),
        default=_default("amp"),
        help="autocast for detector and model",
    )


def unset_namespace() -> argparse.Namespace:
    """A namespace in which the detector flags read ``_UNSET`` until given (argparse keeps a value already there)."""
    return argparse.Namespace(**{dest: _UNSET for dest in RECORDED_FLAGS})


def extract_config_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[ExtractConfig, list[str]]:
    """The detector settings: each flag given, else the model's recorded extractor, else the flag's default.
    Also returns the flags whose value the record changed from the default. ``args`` is completed in place.

    Raises:
        ValueError: no weights given and none recorded; a setting the selection refuses.
        AnswerSetupError: an unreadable record, or recorded weights that cannot be found.
    """
    given = {dest for dest in RECORDED_FLAGS if getattr(args, dest) is not _UNSET}
    entry = recorded_extractor(args.model)
    weights_given = bool({"weights", "random_weights"} & given)
    recorded = flags_from_record(entry, args.model, weights=not weights_given) if entry else {}
    seed = recorded.pop("seed", None)
    taken = []
    for dest in RECORDED_FLAGS:
        if dest in given:
            continue
        if dest in recorded and (dest not in ("weights", "random_weights") or not weights_given):
            setattr(args, dest, recorded[dest])
            if recorded[dest] != parser.get_default(dest):
                taken.append(dest)
        else:
            setattr(args, dest, parser.get_default(dest))
    if not args.random_weights and not args.weights:
        raise ValueError(
            f"{args.model} records no extractor (extractor.json) to take the detector from: give --weights FILE "
            "(e.g. faster_rcnn_from_caffe_attr.pkl) or --random-weights"
        )
    settings: dict[str, Any] = {"out": "", "device": args.device, "amp": args.amp}
    if seed is not None and args.random_weights:
        settings["seed"] = seed
    return detector_config_from_args(args, **settings), taken


def describe_extractor(config: ExtractConfig) -> str:
    """One line: the detector settings in force."""
    weights = f"random weights (seed {config.seed})" if config.random_weights else f"weights {config.weights}"
    sel = config.selection
    boxes = str(sel.min_boxes) if sel.min_boxes == sel.max_boxes else f"{sel.min_boxes}-{sel.max_boxes}"
    opts = f", --opts {' '.join(config.opts)}" if config.opts else ""
    return (
        f"{config.config}, {weights}, images {config.min_size}-{config.max_size} px, {sel.rule} selection of "
        f"{boxes} boxes{opts}"
    )


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _format_text(result: AnswerResult, regions: int = 3) -> str:
    lines = [f"{result.image}: {result.question}"]
    width = max((len(a.answer) for a in result.answers), default=0)
    for rank, a in enumerate(result.answers, start=1):
        lines.append(f"  {rank}. {a.answer:<{width}}  {a.prob:.3f}")
    seen = sorted(result.regions, key=lambda r: -r.attention)[:regions]
    if seen:
        lines.append(
            "  looked at: " + ", ".join(f"{r.attribute} {r.object} ({r.attention:.2f})" for r in seen)
        )
    return "\n".join(lines)


def _check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, or None."""
    if args.questions is not None:
        if args.image is not None:
            return "give either IMAGE QUESTION or --questions FILE, not both"
        if args.draw is not None:
            return "--draw draws one question's picture; use it with IMAGE QUESTION, not --questions"
    else:
        if args.image is None or args.question is None:
            return "give IMAGE and QUESTION (or --questions FILE.jsonl)"
        if args.out is not None:
            return "--out goes with --questions; with IMAGE QUESTION the answer is printed"
    for name in ("out", "draw"):
        target = getattr(args, name)
        if target is not None and not Path(target).resolve().parent.is_dir():
            return f"--{name} {target}: the folder {Path(target).resolve().parent} does not exist"
    if args.top_k < 1:
        return f"--top-k must be >= 1, got {args.top_k}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run ``lxmert-answer``; returns the exit code (0 answered, 1 bad input, 2 refused)."""
    parser = build_parser()
    args = parser.parse_args(argv, namespace=unset_namespace())
    problem = _check_args(args)
    if problem is None:
        try:
            config, taken = extract_config_from_args(parser, args)
        except ValueError as e:
            problem = str(e)
        except AnswerSetupError as e:
            _error(str(e))
            return EXIT_REFUSED
    if problem is not None:
        parser.print_usage(sys.stderr)
        _error(problem)
        return EXIT_REFUSED
    if taken:
        print(
            f"{PROG}: detector from {args.model}'s extractor.json: {describe_extractor(config)}",
            file=sys.stderr,
        )
    # What the libraries log (checkpoint load reports, ...) only with --verbose: every problem that stops an
    # answer is printed here as one line.
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR, format=f"{PROG}: %(levelname)s: %(message)s"
    )
    questions: list[QuestionLine] = []
    bad_lines: list[str] = []
    if args.questions is not None:
        try:
            questions, bad_lines = read_questions(args.questions)
        except OSError as e:
            _error(f"cannot read the questions file {args.questions}: {e}")
            return EXIT_REFUSED
        for message in bad_lines:
            print(f"{PROG}: {message}", file=sys.stderr)
        if not questions:
            _error(f"no question to answer in {args.questions}")
            return EXIT_BAD_INPUT
    elif not args.question.strip():  # before the (slow) loading
        _error(f"empty question about {args.image}; give the question as text")
        return EXIT_BAD_INPUT
    elif not Path(args.image).is_file():
        _error(
            f"image {args.image}: " + ("is a directory" if Path(args.image).is_dir() else "file not found")
        )
        return EXIT_BAD_INPUT

    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the extractor check is printed below
            answerer = Answerer.load(args.model, config, answers=args.answers, strict=args.strict)
    except AnswerSetupError as e:
        _error(str(e))
        return EXIT_REFUSED
    load_s = time.perf_counter() - start
    check = answerer.extractor_check
    if check.note:
        print(f"{PROG}: note: {check.note}", file=sys.stderr)
    for line in check.differences:
        print(f"{PROG}: warning: the model's features came from another extractor: {line}", file=sys.stderr)
    if answerer.device.type == "cpu":
        slow = cpu_autocast_warning(AMP_DTYPES[args.amp])
        if slow is not None:
            print(f"{PROG}: warning: --amp {args.amp}: {slow}", file=sys.stderr)
        tune_cpu_allocator()  # forwards of one size repeat: keep freed memory in the process

    if args.questions is None:
        questions = [QuestionLine(0, args.image, args.question, {})]
    results, failed = _answer_all(answerer, args, questions)
    failed += len(bad_lines)
    if results or args.verbose or args.questions is not None:
        _print_timings(args, answerer, load_s, results, failed)
    return EXIT_BAD_INPUT if failed else EXIT_OK


def _answer_all(
    answerer: Answerer, args: argparse.Namespace, questions: list[QuestionLine]
) -> tuple[list[AnswerResult], int]:
    """Answer every question (grouped by image, first-seen order) and print / write each result."""
    order: dict[str, list[QuestionLine]] = {}
    for q in questions:
        order.setdefault(q.image, []).append(q)
    batch_mode = args.questions is not None
    sink = open(args.out, "w", encoding="utf-8") if (batch_mode and args.out) else sys.stdout
    results: list[AnswerResult] = []
    failed = 0
    bar = tqdm(
        total=len(questions),
        unit="q",
        desc="answer",
        disable=not (batch_mode and args.out),
        dynamic_ncols=True,
    )
    try:
        for group in order.values():
            for q in group:
                try:
                    result = answerer.answer(q.image, q.question, top_k=args.top_k)
                except AnswerInputError as e:
                    failed += 1
                    where = f"{args.questions}:{q.line}: " if batch_mode else ""
                    print(f"{PROG}: {where}{e}" + ("; skipped" if batch_mode else ""), file=sys.stderr)
                    bar.update(1)
                    continue
                results.append(result)
                if batch_mode:
                    sink.write(
                        json.dumps({**q.extra, "line": q.line, **result.to_dict()}, ensure_ascii=False) + "\n"
                    )
                    sink.flush()
                elif args.json:
                    print(json.dumps(result.to_dict(), ensure_ascii=False))
                else:
                    print(_format_text(result))
                if args.draw:
                    try:
                        draw_result(result, args.draw, max_pixels=args.max_pixels)
                        print(f"{PROG}: picture written to {args.draw}", file=sys.stderr)
                    except (AnswerInputError, OSError) as e:
                        _error(str(e))
                        failed += 1
                if args.verbose:
                    print(
                        f"{PROG}: {q.image}: extraction {result.extract_s:.2f} s, model {result.model_s:.3f} s",
                        file=sys.stderr,
                    )
                bar.update(1)
    finally:
        bar.close()
        if sink is not sys.stdout:
            sink.close()
    return results, failed


def _print_timings(
    args: argparse.Namespace, answerer: Answerer, load_s: float, results: list[AnswerResult], failed: int
) -> None:
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in answerer.load_s.items())
    extracted = [r.extract_s for r in results if r.extract_s > 0]
    model_s = sum(r.model_s for r in results)
    lines = [f"{PROG}: loaded in {load_s:.1f} s ({parts}) on {answerer.device}"]
    if results:
        lines.append(
            f"  {len(results)} question(s) answered: {len(extracted)} image(s) extracted, "
            f"{sum(extracted) / max(1, len(extracted)):.2f} s per image; model {model_s / len(results):.3f} s "
            "per question"
        )
    if failed:
        lines.append(f"  {failed} question(s) not answered (see the messages above)")
    if args.questions is not None and args.out:
        lines.append(f"  answers written to {args.out}")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
