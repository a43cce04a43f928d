"""``extract-features``: images -> an LMDB store of LXMERT's region features (36 boxes x 2048-d per image).

Examples::

    extract-features images/ features.lmdb --weights faster_rcnn_from_caffe_attr.pkl
    extract-features --list todo.txt features.lmdb --weights faster_rcnn_from_caffe_attr.pkl
    torchrun --nproc_per_node 4 -m extract.cli images/ features.lmdb --weights faster_rcnn_from_caffe_attr.pkl

Run the same command again after an interruption: it resumes. Exit codes: 0 done (failed images are listed
in ``OUT.failures.jsonl``), 1 not everything was extracted: some images failed and ``--strict`` was given, or the
disk filled up (one line names the store and the free space; run again once there is room), 2 refused before any
work (bad arguments, weights, store or settings), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from common.config import field_choices, field_default
from common.diskspace import DiskFullError
from extract.config import ExtractConfig, default_batch_size
from extract.runner import ExtractionInterrupted, SetupError, collect_images, run_extraction
from extract.selection import BoxSelection

__all__ = ["build_parser", "config_from_args", "default_batch_size", "main"]

EXIT_OK, EXIT_FAILURES, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _device(text: str) -> str:
    if text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected cuda, cuda:N or cpu, got {text!r}")


def _default(name: str):
    return field_default(ExtractConfig, name)


def _boxes_default() -> str:
    lo, hi = field_default(BoxSelection, "min_boxes"), field_default(BoxSelection, "max_boxes")
    return str(lo) if lo == hi else f"{lo}-{hi}"


def add_detector_arguments(detector: argparse._ArgumentGroup, images: argparse._ArgumentGroup) -> None:
    """The detector's flags (``--weights``, ``--random-weights``, ``--config``, ``--opts``, the box selection)
    and the image-size flags, shared by ``extract-features`` and ``lxmert-answer``; read back with
    :func:`detector_config_from_args`."""
    g = detector
    g.add_argument(
        "--weights",
        metavar="FILE",
        help="detector weights: a file (.pkl, .pth, .bin, .safetensors), a folder holding one, or a Hugging Face "
        "Hub id (unc-nlp/frcnn-vg-finetuned: the local cache first; HF_HUB_OFFLINE=1: the cache only)",
    )
    g.add_argument(
        "--random-weights",
        action="store_true",
        help="skip loading weights: a deterministic random detector (tests, demos; recorded in the store)",
    )
    g.add_argument("--config", default=_default("config"), help="vg_r101_c4 | vg_tiny | path/to/config.yaml")
    g.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE", help="Detectron2 config overrides")
    g.add_argument(
        "--selection",
        choices=field_choices(BoxSelection, "rule"),
        default=field_default(BoxSelection, "rule"),
        help="box selection rule",
    )
    g.add_argument("--boxes", default=_boxes_default(), help="regions per image: N, or MIN-MAX (e.g. 10-100)")
    g.add_argument(
        "--conf-thresh",
        type=float,
        default=field_default(BoxSelection, "conf_thresh"),
        help="confidence threshold of the caffe rule",
    )
    g.add_argument(
        "--nms-thresh",
        type=float,
        default=field_default(BoxSelection, "nms_thresh"),
        help="NMS IoU threshold of the selection",
    )
    g = images
    g.add_argument(
        "--min-size",
        type=_positive_int,
        default=_default("min_size"),
        help="shortest side after resizing (pixels)",
    )
    g.add_argument(
        "--max-size",
        type=_positive_int,
        default=_default("max_size"),
        help="cap on the longest side (pixels)",
    )
    g.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=_default("max_pixels"),
        help="refuse images with more pixels (w*h)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for ``--help``); choices and defaults come from :class:`ExtractConfig`
    (and :class:`BoxSelection`), never restated here."""
    p = argparse.ArgumentParser(
        prog="extract-features",
        usage="extract-features IMAGES_DIR OUT.lmdb (--weights FILE | --random-weights) [options]\n"
        "       extract-features --list FILE [IMAGES_DIR] OUT.lmdb (--weights FILE | --random-weights) [options]",
        description="Extract LXMERT's Visual Genome Faster R-CNN region features from images into an LMDB store. "
        "Resumable (run the same command again), shardable with torchrun (all ranks write the same store).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="images folder (walked recursively; jpg/jpeg/png/bmp/webp) and the output store; with --list, "
        "IMAGES_DIR is optional and is the base of relative entries",
    )
    p.add_argument("--list", dest="list_file", metavar="FILE", help="text file of image paths, one per line")
    p.add_argument(
        "--id-from",
        choices=field_choices(ExtractConfig, "id_from"),
        default=_default("id_from"),
        help="image id: file name without extension, or the path relative to IMAGES_DIR without extension",
    )
    add_detector_arguments(p.add_argument_group("detector"), p.add_argument_group("images"))
    g = p.add_argument_group("execution")
    g.add_argument(
        "--workers",
        type=int,
        default=_default("workers"),
        help="DataLoader worker processes (one per CPU core, at most 4)",
    )
    g.add_argument(
        "--batch-size",
        type=_positive_int,
        default=_default("batch_size"),
        help="images per detector forward (default: 4 on CUDA; 1 on CPU, where batching gains nothing)",
    )
    g.add_argument(
        "--device", type=_device, default=_default("device"), help="cuda | cpu (default: cuda when available)"
    )
    g.add_argument(
        "--amp", choices=field_choices(ExtractConfig, "amp"), default=_default("amp"), help="autocast dtype"
    )
    g.add_argument(
        "--features-dtype",
        choices=field_choices(ExtractConfig, "features_dtype"),
        default=_default("features_dtype"),
        help="stored dtype",
    )
    g.add_argument("--overwrite", action="store_true", help="re-extract images already in the store")
    g.add_argument("--strict", action="store_true", help="exit 1 when any image failed")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def detector_config_from_args(args: argparse.Namespace, **settings: Any) -> ExtractConfig:
    """An :class:`ExtractConfig` from the flags of :func:`add_detector_arguments`, plus ``settings`` (the other
    fields, e.g. ``out``, ``device``)."""
    selection = BoxSelection.from_spec(
        args.boxes, rule=args.selection, conf_thresh=args.conf_thresh, nms_thresh=args.nms_thresh
    )
    return ExtractConfig(
        weights=None if args.random_weights else args.weights,
        random_weights=args.random_weights,
        config=args.config,
        opts=list(args.opts),
        selection=selection,
        min_size=args.min_size,
        max_size=args.max_size,
        max_pixels=args.max_pixels,
        **settings,
    )


def config_from_args(args: argparse.Namespace) -> tuple[ExtractConfig, str | None]:
    """(ExtractConfig, images_dir or None) from parsed arguments; ValueError with a message when invalid."""
    if args.list_file is not None:
        if len(args.paths) > 2:
            raise ValueError("with --list give at most [IMAGES_DIR] OUT.lmdb")
        images_dir = args.paths[0] if len(args.paths) == 2 else None
    else:
        if len(args.paths) != 2:
            raise ValueError("give IMAGES_DIR and OUT.lmdb (or --list FILE OUT.lmdb)")
        images_dir = args.paths[0]
    out = args.paths[-1]
    if not args.random_weights and not args.weights:
        raise ValueError(
            "--weights FILE is required (e.g. faster_rcnn_from_caffe_attr.pkl), or --random-weights"
        )
    config = detector_config_from_args(
        args,
        out=out,
        id_from=args.id_from,
        workers=args.workers,
        batch_size=args.batch_size,
        device=args.device,
        amp=args.amp,
        features_dtype=args.features_dtype,
        overwrite=args.overwrite,
        strict=args.strict,
        progress=not args.no_progress,
    )
    return config, images_dir


class _StderrFormatter(logging.Formatter):
    """``extract-features: message``, with ``warning:`` / ``error:`` before messages of those levels."""

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"extract-features: {level}{record.getMessage()}"


def _log_to_stderr() -> logging.Handler:
    """Show the ``extract`` package's INFO and above on stderr (the library logs; the CLI shows it)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_StderrFormatter())
    logger = logging.getLogger("extract")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def main(argv: list[str] | None = None) -> int:
    """Run ``extract-features``; returns the exit code (0, 1 with --strict and failures, 2 refused, 130)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.random_weights and args.weights:
        print("extract-features: --random-weights given: --weights is ignored", file=sys.stderr)
    try:
        config, images_dir = config_from_args(args)
    except ValueError as e:
        parser.print_usage(sys.stderr)
        print(f"extract-features: error: {e}", file=sys.stderr)
        return EXIT_REFUSED

    rank0 = int(os.environ.get("RANK", "0")) == 0
    bold = not os.environ.get("NO_COLOR")
    handler = _log_to_stderr()
    try:
        items = collect_images(images_dir, args.list_file, config.id_from)
        if not items:
            where = args.list_file or images_dir
            print(f"extract-features: no images found in {where} (jpg/jpeg/png/bmp/webp)", file=sys.stderr)
        summary = run_extraction(config, items)
    except SetupError as e:
        print(f"extract-features: refused: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except DiskFullError as e:
        print(
            f"extract-features: {e}; the records written so far are kept: free some space and run the same "
            "command again to resume",
            file=sys.stderr,
        )
        return EXIT_FAILURES
    except KeyboardInterrupt as e:
        if rank0 and isinstance(e, ExtractionInterrupted):
            print(e.summary.format(bold=bold), flush=True)
        print("extract-features: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        logging.getLogger("extract").removeHandler(handler)
    if rank0:
        print(summary.format(bold=bold), flush=True)
    return EXIT_FAILURES if (config.strict and summary.failed) else EXIT_OK


if __name__ == "__main__":  # python -m extract.cli (e.g. under torchrun)
    sys.exit(main())
