"""``lxmert-serve``: load a fine-tuned model once, then answer questions about images in the browser and over HTTP.

::

    lxmert-serve --model runs/demo/vqa/best         # the detector as the model folder's extractor.json records
    lxmert-serve --model runs/vqa/best --weights faster_rcnn_from_caffe_attr.pkl --port 7860 --max-batch 16

Then open http://127.0.0.1:7860/ (the page) or script against ``POST /api/answer`` (see :mod:`tasks.serve.app`).
The detector flags are ``lxmert-answer``'s: left out, they come from the model folder's ``extractor.json``. Binds to 127.0.0.1 unless ``--host`` says otherwise. Exit codes: 0
stopped cleanly, 2 refused before serving (model, weights, answer table, arguments).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import uvicorn

from tasks.answer.answerer import Answerer
from tasks.answer.cli import (
    add_answerer_arguments,
    describe_extractor,
    extract_config_from_args,
    unset_namespace,
)
from tasks.answer.results import AnswerSetupError
from tasks.serve.app import create_app
from tasks.serve.uploads import ImageStore, UploadLimits, find_examples
from tasks.serve.worker import AnswerWorker

__all__ = ["build_parser", "main", "model_info"]

PROG = "lxmert-serve"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Serve a fine-tuned LXMERT: a web page to upload an image and ask about it, and an HTTP API "
        "(POST /api/answer, GET /api/health, GET /api/model).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_answerer_arguments(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=7860, help="port")
    g.add_argument("--max-batch", type=int, default=8, help="questions answered together in one forward")
    g.add_argument(
        "--examples",
        metavar="DIR",
        help="images offered on the page (default: the demo's test images if present)",
    )
    g.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted")
    g.add_argument("--max-megapixels", type=float, default=50.0, help="largest image accepted")
    return p


def model_info(answerer: Answerer, model: str) -> dict[str, Any]:
    """What ``GET /api/model`` says: the model, its answers, the extractor answering and how it compares."""
    check = answerer.extractor_check
    return {
        "model": str(model),
        "answers": len(answerer.answers),
        "device": str(answerer.device),
        "extractor": answerer.settings,
        "extractor_differences": list(check.differences),
        "extractor_note": check.note,
    }


def default_examples(model: str) -> Path | None:
    """The demo's test images beside a demo model (``RUN/vqa/final`` -> ``RUN/data/images/test``), or None."""
    for parent in Path(model).resolve().parents[:3]:
        candidate = parent / "data" / "images" / "test"
        if candidate.is_dir():
            return candidate
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv, namespace=unset_namespace())
    problems = [
        f"--{k.replace('_', '-')} must be > 0"
        for k in ("max_batch", "max_upload_mb", "max_megapixels")
        if getattr(args, k) <= 0
    ]
    if not 0 < args.port < 65536:
        problems.append(f"--port {args.port} is not a port number")
    try:
        config, _ = extract_config_from_args(parser, args)
    except (ValueError, AnswerSetupError) as e:
        problems.append(str(e))
    if problems:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {problems[0]}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format=f"{PROG}: %(message)s")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the extractor check is printed below
            answerer = Answerer.load(args.model, config, answers=args.answers, strict=args.strict)
    except AnswerSetupError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    for line in answerer.extractor_check.differences:
        print(f"{PROG}: warning: the model's features came from another extractor: {line}", file=sys.stderr)

    limits = UploadLimits(
        max_bytes=int(args.max_upload_mb * 2**20), max_pixels=int(args.max_megapixels * 1e6)
    )
    examples = find_examples(args.examples or default_examples(args.model))
    worker = AnswerWorker(answerer, max_batch=args.max_batch)
    store = ImageStore(limits)
    app = create_app(worker, store, model_info(answerer, args.model), examples)
    print(f"{PROG}: detector: {describe_extractor(config)}")
    print(f"{PROG}: serving {args.model} on http://{args.host}:{args.port}/ ({len(examples)} example images)")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        worker.close()
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
