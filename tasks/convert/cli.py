"""``lxmert-data``: convert the official VQA v2 / GQA / NLVR2 downloads and the easy-VQA demo data to LXMERT's
JSON files.

    lxmert-data vqa      --questions Q.json [--annotations A.json] --out OUT.json [--answers ans2label.json]
    lxmert-data gqa      --questions X_balanced_questions.json --out OUT.json
    lxmert-data nlvr2    --jsonl dev.json --out OUT.json
    lxmert-data easy-vqa --out DIR [--train-images N] [--test-images N]

Every output is written to a temporary file and renamed; a malformed input is reported with its file, line or
id. Exit status: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tasks.convert.easy_vqa import TEST_QUESTION_ID_OFFSET, convert_easy_vqa
from tasks.convert.gqa import convert_gqa
from tasks.convert.nlvr2 import LXMERT_SPLIT_NAMES, convert_nlvr2
from tasks.convert.vqa import (
    DEFAULT_MIN_ANSWER_COUNT,
    DEFAULT_MINIVAL_SIZE,
    DEFAULT_SEED,
    build_answer_table,
    convert_vqa,
    image_prefix,
    read_image_id_list,
    select_minival_images,
)
from tasks.data.answer_table import load_answer_table
from tasks.data.jsonio import DataFormatError, read_json, read_text, write_items, write_json, write_text

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _HelpFormatter(argparse.HelpFormatter):
    """Shows a default only when there is one (not None / False) and the help does not state it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lxmert-data",
        description="Convert official VQA v2 / GQA / NLVR2 files and the easy-VQA demo data to LXMERT's JSON.",
    )
    sub = p.add_subparsers(dest="dataset", required=True, metavar="{vqa,gqa,nlvr2,easy-vqa}")
    fmt = _HelpFormatter

    v = sub.add_parser(
        "vqa",
        formatter_class=fmt,
        help="VQA v2 questions (+ annotations) -> LXMERT VQA items with soft scores",
        description="VQA v2 official questions (+ annotations) -> LXMERT items {answer_type, img_id, label, "
        "question_id, question_type, sent}; label = soft scores 0.3/0.6/0.9/1.0 for 1/2/3/>=4 of the ten human "
        "answers (raw strings) that are in the answer table. Without --annotations (test2015, test-dev2015) "
        "items have no label. LXMERT's split: train = train2014; minival = 5000 val2014 images, nominival = "
        "the rest (train + nominival for training, minival for validation).",
    )
    v.add_argument("--questions", required=True, metavar="Q.json", help="official questions file")
    v.add_argument("--annotations", metavar="A.json", help="official annotations file of the same split")
    v.add_argument("--out", required=True, metavar="OUT.json", help="LXMERT items to write")
    g = v.add_argument_group("answer table")
    g.add_argument(
        "--answers",
        metavar="TABLE",
        help="LXMERT's answer table (trainval_ans2label.json / trainval_label2ans.json: 3129 answers); "
        "without it a table is built from --vocab-annotations and written beside OUT",
    )
    g.add_argument(
        "--vocab-annotations",
        nargs="+",
        metavar="A.json",
        help="annotations to build the table from (the original: train2014 + val2014) [default: --annotations]",
    )
    g.add_argument(
        "--min-answer-count",
        type=_positive_int,
        metavar="N",
        default=DEFAULT_MIN_ANSWER_COUNT,
        help="a built table keeps normalised multiple-choice answers of at least this many questions",
    )
    g.add_argument(
        "--answers-out",
        metavar="PREFIX",
        help="a built table goes to PREFIX + ans2label.json / label2ans.json [default: OUT without .json + '_']",
    )
    g = v.add_argument_group(
        "minival / nominival (val2014)",
        "LXMERT's minival is 5000 val2014 images; it pretrains on every other val2014 image (mscoco_nominival) "
        "with their VQA answers. --subset minival / nominival need its image list (--minival-images); any other "
        "choice of images overlaps LXMERT's pretraining data, so it takes --non-lxmert-minival.",
    )
    g.add_argument(
        "--subset",
        choices=("all", "minival", "nominival"),
        default="all",
        help="keep all questions, or only those of the minival images, or only the others",
    )
    g.add_argument(
        "--minival-images",
        metavar="FILE",
        help="LXMERT's minival images: its data/vqa/minival.json or data/lxmert/mscoco_minival.json (the "
        "img_id of each entry), or a text file of image ids / COCO names (one per line)",
    )
    g.add_argument(
        "--non-lxmert-minival",
        action="store_true",
        help="no list: take the --minival-size val2014 images with the smallest sha256('<seed>:<image_id>') "
        "instead. NOT LXMERT's minival: most of those images are in LXMERT's pretraining data (questions and "
        "answers included), so a model pretrained by LXMERT scores higher on them than on its minival",
    )
    g.add_argument(
        "--minival-size",
        type=_positive_int,
        default=DEFAULT_MINIVAL_SIZE,
        metavar="N",
        help="minival images with --non-lxmert-minival",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        metavar="S",
        help="seed of the image choice with --non-lxmert-minival",
    )
    g.add_argument(
        "--write-minival-images", metavar="FILE", help="also write the minival image names, one per line"
    )
    v.add_argument(
        "--image-prefix",
        metavar="PREFIX",
        help="img_id prefix before the 12-digit image id [default: COCO_<data_subtype>_ from the questions file]",
    )

    g = sub.add_parser(
        "gqa",
        formatter_class=fmt,
        help="GQA questions -> LXMERT GQA items",
        description="GQA questions ({split}_balanced_questions.json, *_all_questions*.json, "
        "submission_all_questions.json) -> LXMERT items {img_id, label: {answer: 1.0}, question_id (str), sent}; "
        "files without answers give items without label. Several files (train_all_questions_*.json) are joined.",
    )
    g.add_argument("--questions", required=True, nargs="+", metavar="Q.json", help="GQA questions file(s)")
    g.add_argument("--out", required=True, metavar="OUT.json", help="LXMERT items to write")

    n = sub.add_parser(
        "nlvr2",
        formatter_class=fmt,
        help="NLVR2 JSON-lines -> LXMERT NLVR2 items",
        description="NLVR2 JSON-lines (train.json, dev.json, test1.json, test2.json) -> LXMERT items {identifier, "
        "img0, img1, label: 1 (True) / 0 (False), sent, uid: nlvr2_<split>_<line>}.",
    )
    n.add_argument(
        "--jsonl", required=True, metavar="FILE", help="official NLVR2 file (one JSON object per line)"
    )
    n.add_argument("--out", required=True, metavar="OUT.json", help="LXMERT items to write")
    n.add_argument(
        "--split",
        help="split name in the uids [default: from the identifiers, as LXMERT: "
        + ", ".join(f"{k}->{v}" for k, v in LXMERT_SPLIT_NAMES.items())
        + "]",
    )

    e = sub.add_parser(
        "easy-vqa",
        formatter_class=fmt,
        help="the easy-VQA demo data -> images + LXMERT files",
        description="The easy-VQA demo data (PyPI easy-vqa) -> OUT/images/{train,test}/<n>.png (ids 'train/<n>', "
        "'test/<n>' with `extract-features OUT/images STORE --id-from relpath`), train.json / test.json "
        "(VQA items), test_questions.json + test_annotations.json (official VQA formats), pretrain.json, "
        "label2ans.json / ans2label.json / all_ans.json, manifest.json. Test question ids are offset by "
        f"{TEST_QUESTION_ID_OFFSET}.",
    )
    e.add_argument("--out", required=True, metavar="DIR", help="output folder")
    e.add_argument(
        "--train-images", type=_positive_int, metavar="N", help="keep train images 0..N-1 [all 4000]"
    )
    e.add_argument(
        "--test-images", type=_positive_int, metavar="N", help="keep test images 0..N-1 [all 1000]"
    )
    e.add_argument(
        "--valid-images",
        type=int,
        default=0,
        metavar="V",
        help="hold out train images N..N+V-1 (after --train-images N) as valid.json [none]",
    )
    e.add_argument("--source", metavar="DIR", help="easy-VQA data folder [the installed package's]")
    return p


def _answers_prefix(args: argparse.Namespace) -> str:
    if args.answers_out:
        return args.answers_out
    out = Path(args.out)
    stem = out.name[: -len(".json")] if out.name.endswith(".json") else out.name
    return str(out.with_name(stem + "_"))


def run_vqa(args: argparse.Namespace) -> None:
    questions = read_json(args.questions, "VQA questions file")
    annotations = read_json(args.annotations, "VQA annotations file") if args.annotations else None
    ans2label = None
    if annotations is not None:
        if args.answers:
            try:
                label2ans = load_answer_table(args.answers)
            except ValueError as e:
                raise DataFormatError(str(e)) from None
            print(f"answer table: {len(label2ans)} answers from {args.answers}")
        else:
            sources = args.vocab_annotations or [args.annotations]
            docs = [
                (annotations, args.annotations)
                if s == args.annotations
                else (read_json(s, "VQA annotations file"), s)
                for s in sources
            ]
            label2ans, counts = build_answer_table(docs, args.min_answer_count)
            if not label2ans:
                raise DataFormatError(
                    f"no answer is the multiple-choice answer of >= {args.min_answer_count} questions in "
                    f"{', '.join(sources)} ({len(counts)} distinct answers): give LXMERT's table with --answers, "
                    "build it from more annotations (--vocab-annotations train + val) or lower --min-answer-count"
                )
            prefix = _answers_prefix(args)
            write_json(prefix + "label2ans.json", label2ans)
            write_json(prefix + "ans2label.json", {a: i for i, a in enumerate(label2ans)})
            print(
                f"answer table: {len(label2ans)} of {len(counts)} normalised answers occur in >= "
                f"{args.min_answer_count} questions of {', '.join(sources)}; written to {prefix}label2ans.json "
                f"and {prefix}ans2label.json (use the same table for every split)"
            )
        ans2label = {a: i for i, a in enumerate(label2ans)}
    elif args.answers or args.vocab_annotations:
        print("no --annotations: items get no label; the answer table options are ignored", file=sys.stderr)

    keep = drop = None
    if args.subset != "all" or args.write_minival_images:
        minival = minival_images(args, questions)
        if args.subset == "minival":
            keep = minival
        elif args.subset == "nominival":
            drop = minival
        if args.write_minival_images:
            prefix = args.image_prefix or image_prefix(questions)
            write_text(args.write_minival_images, "".join(f"{prefix}{i:012d}\n" for i in sorted(minival)))
            print(f"wrote the minival image list to {args.write_minival_images}")

    items, stats = convert_vqa(
        questions,
        annotations,
        ans2label,
        prefix=args.image_prefix,
        keep_images=keep,
        drop_images=drop,
        questions_source=args.questions,
        annotations_source=args.annotations or "annotations",
    )
    write_items(args.out, items)
    line = f"wrote {stats['items']} items ({args.subset} of {stats['questions']} questions) to {args.out}"
    if annotations is not None:
        line += (
            f"; {stats['empty_labels']} with no answer in the table (kept, empty label), "
            f"{stats['answers_outside_table']} distinct human answers outside the table left out"
        )
    print(line)


def minival_images(args: argparse.Namespace, questions: Any) -> set[int]:
    """The minival image ids: LXMERT's list (``--minival-images``), checked against the questions file's images,
    or with ``--non-lxmert-minival`` a choice by hash. Raises ``DataFormatError`` (one line) without either,
    with both, or when the list names none of the file's images."""
    qlist = questions.get("questions") if isinstance(questions, dict) else None
    image_ids = {q.get("image_id") for q in qlist or [] if isinstance(q, dict)}
    subtype = questions.get("data_subtype") if isinstance(questions, dict) else None
    if args.minival_images and args.non_lxmert_minival:
        raise DataFormatError(
            "give either --minival-images (LXMERT's minival) or --non-lxmert-minival (a choice by hash), not both"
        )
    if not args.minival_images and not args.non_lxmert_minival:
        raise DataFormatError(
            f"--subset {args.subset} needs LXMERT's minival image list: --minival-images FILE with its "
            "data/vqa/minival.json or data/lxmert/mscoco_minival.json (from LXMERT's README downloads), or a text "
            "file of its image ids. LXMERT pretrains on every other val2014 image (mscoco_nominival) with their "
            "VQA answers, so any other minival overlaps its pretraining data; --non-lxmert-minival takes such a "
            "split deliberately (5000 images by hash, scores not comparable with LXMERT's)"
        )
    if subtype not in (None, "val2014"):
        print(
            f"note: minival / nominival are splits of val2014; {args.questions} is {subtype}", file=sys.stderr
        )
    if args.non_lxmert_minival:
        minival = select_minival_images(image_ids, args.minival_size, args.seed)
        print(
            f"minival: {len(minival)} images chosen by sha256('{args.seed}:<image_id>') -- NOT LXMERT's minival "
            "(most of them are in LXMERT's pretraining data)"
        )
        return minival
    minival = read_image_id_list(args.minival_images)
    found = minival & image_ids
    if not found:
        raise DataFormatError(
            f"{args.minival_images}: none of its {len(minival)} images (e.g. {sorted(minival)[:3]}) is among the "
            f"{len(image_ids)} images of {args.questions} ({subtype or 'unknown split'}); give LXMERT's minival "
            "list of val2014 images with the val2014 questions file"
        )
    if len(found) < len(minival):
        print(
            f"warning: {len(minival) - len(found)} of the {len(minival)} images of {args.minival_images} have no "
            f"question in {args.questions} (e.g. {sorted(minival - found)[:3]})",
            file=sys.stderr,
        )
    print(f"minival: the {len(minival)} images of {args.minival_images} (LXMERT's list)")
    return minival


def run_gqa(args: argparse.Namespace) -> None:
    items = []
    seen: dict[str, str] = {}
    for path in args.questions:
        for item in convert_gqa(read_json(path, "GQA questions file"), source=path):
            if item["question_id"] in seen:
                raise DataFormatError(
                    f"{path}: question {item['question_id']} is also in {seen[item['question_id']]}"
                )
            seen[item["question_id"]] = path
            items.append(item)
    write_items(args.out, items)
    labelled = sum("label" in it for it in items)
    print(f"wrote {len(items)} items ({labelled} with an answer) to {args.out}")


def run_nlvr2(args: argparse.Namespace) -> None:
    items = convert_nlvr2(read_text(args.jsonl, "NLVR2 file"), source=args.jsonl, split=args.split)
    write_items(args.out, items)
    labelled = sum("label" in it for it in items)
    print(f"wrote {len(items)} items ({labelled} labelled) to {args.out}")


def run_easy_vqa(args: argparse.Namespace) -> None:
    manifest = convert_easy_vqa(
        args.out, args.source, args.train_images, args.test_images, valid_images=args.valid_images
    )
    version = manifest["easy_vqa_version"]
    print(f"easy-VQA{f' {version}' if version else ''} from {manifest['source']} -> {args.out}")
    for split, s in manifest["splits"].items():
        types = ", ".join(f"{k} {v}" for k, v in s["types"].items())
        print(f"  {split}: {s['images']} images, {s['questions']} questions ({types})")
    print(
        f"  next: extract-features {Path(args.out) / 'images'} STORE.lmdb --id-from relpath ... "
        "(ids 'train/<n>', 'test/<n>')"
    )


def main(argv: list[str] | None = None) -> int:
    """Run ``lxmert-data``; returns the exit status."""
    args = build_parser().parse_args(argv)
    run = {"vqa": run_vqa, "gqa": run_gqa, "nlvr2": run_nlvr2, "easy-vqa": run_easy_vqa}[args.dataset]
    try:
        run(args)
    except (DataFormatError, ValueError) as e:
        print(f"lxmert-data {args.dataset}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
