"""The demo's two analysis steps: a linear probe of the region features, and REPORT.md / summary.json.

``python -m pipelines.report probe --store S --data D --out probe.json``: can the features tell an image's
colour and shape? (:mod:`pipelines.probe`).

``python -m pipelines.report report --run RUN``: reads what the stages left in ``RUN`` (stage timings,
training logs and curves, the model's test predictions), scores the question-only baseline
(:func:`question_only_answers`) and the majority answer, and writes
``RUN/REPORT.md`` and ``RUN/summary.json``. Accuracies are the official VQA metric (``tasks.metrics.vqa``) on
the converted test annotations, in percent. The demo's pass criterion (:func:`check`): overall at least
``--margin`` points above the better baseline (question only, majority answer), and on the colour and shape
questions no more than ``--probe-gap`` points below the linear probe (what the features hold). Exits 1 when
it fails, naming each rule that failed; 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from common.files import write_text_atomic
from extract.store import FeatureStore
from pipelines.probe import run_probe
from tasks.metrics.vqa import evaluate_vqa

TYPE_ORDER = ("color", "shape", "yes/no")
PROBED = ("color", "shape")  # the question types whose answer is a property the probe reads from the features


# ------------------------------------------------------------------------------------------------ report
def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _predictions(eval_dir: Path) -> list[dict]:
    for name in ("predictions.json", "test_predict.json", "submission.json"):
        if (eval_dir / name).exists():
            return _load(eval_dir / name)
    raise FileNotFoundError(f"no predictions file in {eval_dir} (expected predictions.json)")


def _per_type(scores: dict) -> dict[str, float]:
    return {t: scores["perQuestionType"][t] for t in TYPE_ORDER if t in scores["perQuestionType"]}


def _read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _validation(run_dir: Path) -> dict[str, Any]:
    """The fine-tuning's validation: per epoch accuracy (percent) on the held-out train images, the best epoch,
    and which model the test predictions come from (``best`` when validated, else ``final``)."""
    rows = [r for r in _read_metrics(run_dir) if r.get("split") == "valid" and "accuracy" in r]
    if not rows:
        return {"model": "final"}
    best = max(rows, key=lambda r: r["accuracy"])  # the first of equal scores, as RUN_DIR/best keeps it
    return {
        "model": "best" if (run_dir / "best").exists() else "final",
        "best_epoch": best.get("epoch"),
        "best_accuracy": round(100 * best["accuracy"], 2),
        "accuracy_per_epoch": [round(100 * r["accuracy"], 2) for r in rows],
    }


def _throughput(run_dir: Path) -> float | None:
    rows = [r for r in _read_metrics(run_dir) if r.get("split") == "train"]
    rates = [r[k] for r in rows for k in ("samples_per_s", "samples/s") if k in r]
    return round(float(np.median(rates)), 1) if rates else None


def _draw_examples(run: Path, data: Path, preds: dict[int, str], items: list[dict], n: int) -> list[str]:
    """PNG files of a few test images with their regions and the predicted vs true answer."""
    if n <= 0:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    store = FeatureStore(run / "features.lmdb")
    out_dir = run / "examples"
    out_dir.mkdir(exist_ok=True)
    files = []
    seen: set[str] = set()
    picked = []
    for qtype in TYPE_ORDER * n:  # one question per image, types in turn
        it = next((i for i in items if i["question_type"] == qtype and i["img_id"] not in seen), None)
        if it is None:
            continue
        seen.add(it["img_id"])
        picked.append(it)
        if len(picked) == n:
            break
    for it in picked:
        img_path = data / "images" / f"{it['img_id']}.png"
        rec = store[it["img_id"]]
        fig, ax = plt.subplots(figsize=(3.2, 3.6), dpi=100)
        ax.imshow(Image.open(img_path).convert("RGB"))
        for x1, y1, x2, y2 in rec["boxes"][:10]:
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.0, color="red"))
        truth = max(it["label"].items(), key=lambda kv: kv[1])[0]
        pred = preds.get(it["question_id"], "?")
        ax.set_title(f"{it['sent']}\npred: {pred} | true: {truth}", fontsize=7)
        ax.axis("off")
        name = f"{it['img_id'].replace('/', '_')}_{it['question_id']}.png"
        fig.savefig(out_dir / name, bbox_inches="tight")
        plt.close(fig)
        files.append(f"examples/{name}")
    store.close()
    return files


def check(
    overall: float, baseline: float, per_type: dict[str, dict], probe: dict, margin: float, probe_gap: float
) -> list[str]:
    """The demo's pass rules; returns one line per rule broken (empty: passed).

    - ``overall >= baseline + margin`` (``margin < 0``: not checked);
    - for each of :data:`PROBED` with a probe result: the model's accuracy on those questions ``>= probe -
      probe_gap`` (``probe_gap < 0``: not checked). The probe reads the answer from the image's features
      alone, so a model below it loses on the way what its features hold.
    """
    failures = []
    if margin >= 0 and overall < baseline + margin:
        failures.append(
            f"overall {overall:.2f} is not {margin:.1f} points above the better baseline {baseline:.2f}"
        )
    for qtype in PROBED if probe_gap >= 0 else ():
        model, target = per_type.get(qtype, {}).get("model"), probe.get(qtype, {}).get("accuracy")
        if target is None:
            continue
        if model is None or model < target - probe_gap:
            failures.append(
                f"{qtype}: LXMERT {_fmt(model)} is more than {probe_gap:.1f} points below the linear probe of "
                f"the features ({target:.2f})"
            )
    return failures


def _top_answer(item: dict) -> str:
    return max(item["label"].items(), key=lambda kv: kv[1])[0]


def question_only_answers(train_items: list[dict], test_items: list[dict]) -> list[dict]:
    """The question-only baseline: each test question gets the train answer most frequent for that very
    question text (easy-VQA's questions come from ~100 templates, all seen in training); a text never seen gets
    its question type's most frequent answer. No answerer that reads only the question does better on the
    train distribution (it is the optimum a text-only model converges to).

    Returns ``[{"question_id", "answer"}]``, the official result format."""
    by_text: dict[str, Counter] = {}
    by_type: dict[str, Counter] = {}
    overall: Counter = Counter()
    for it in train_items:
        if not it.get("label"):
            continue
        answer = _top_answer(it)
        by_text.setdefault(it["sent"], Counter())[answer] += 1
        by_type.setdefault(it.get("question_type", ""), Counter())[answer] += 1
        overall[answer] += 1
    out = []
    for it in test_items:
        counts = by_text.get(it["sent"]) or by_type.get(it.get("question_type", "")) or overall
        out.append({"question_id": it["question_id"], "answer": counts.most_common(1)[0][0]})
    return out


def build_report(run: Path, margin: float, examples: int, probe_gap: float = -1.0) -> tuple[dict, bool]:
    data = run / "data"
    annotations = _load(data / "test_annotations.json")
    questions = _load(data / "test_questions.json")
    test_items = _load(data / "test.json")
    train_items = _load(data / "train.json")

    model_preds = _predictions(run / "eval")
    model = evaluate_vqa(annotations, model_preds, questions)
    qonly = evaluate_vqa(annotations, question_only_answers(train_items, test_items), questions)
    majority_answer = Counter(_top_answer(it) for it in train_items if it.get("label")).most_common(1)[0][0]
    qids = [a["question_id"] for a in annotations["annotations"]]
    majority = evaluate_vqa(
        annotations, [{"question_id": q, "answer": majority_answer} for q in qids], questions
    )

    stages = {}
    for mark in sorted((run / "stages").glob("*.done"), key=lambda p: p.stat().st_mtime):  # in run order
        stages[mark.stem] = {"seconds": _load(mark).get("seconds")}
    meta = FeatureStore(run / "features.lmdb").metadata
    n_images = meta.get("count", 0)
    if stages.get("extract", {}).get("seconds"):
        stages["extract"]["images_per_s"] = round(n_images / stages["extract"]["seconds"], 2)
    for name, folder in (("pretrain", "pretrain"), ("finetune", "vqa")):
        rate = _throughput(run / folder)
        if rate is not None and name in stages:
            stages[name]["samples_per_s"] = rate
    extractor = meta.get("extractor", {})
    probe = _load(run / "probe.json") if (run / "probe.json").exists() else {}

    per_type = {
        t: {
            "model": _per_type(model).get(t),
            "question_only": _per_type(qonly).get(t),
            "majority": _per_type(majority).get(t),
        }
        for t in TYPE_ORDER
    }
    better = max(qonly["overall"], majority["overall"])
    failures = check(model["overall"], better, per_type, probe, margin, probe_gap)
    passed = not failures
    summary = {
        "accuracy": model["overall"],
        "majority_baseline": majority["overall"],
        "question_only_baseline": qonly["overall"],
        "majority_answer": majority_answer,
        "per_type": per_type,
        "margin_required": margin,
        "probe_gap_allowed": probe_gap,
        "passed": passed,
        "failures": failures,
        "stages": stages,
        "detector": {
            "config": extractor.get("config"),
            "weights": extractor.get("weights"),
            "weights_sha256": extractor.get("weights_sha256"),
            "weights_layout": extractor.get("weights_layout"),
            "random_weights": extractor.get("random_weights"),
            "selection": extractor.get("selection"),
            "min_size": extractor.get("min_size"),
            "max_size": extractor.get("max_size"),
            "images": n_images,
        },
        "probe": probe,
        "validation": _validation(run / "vqa"),
        "features": _feature_preprocessing(run),
    }
    write_text_atomic(run / "summary.json", json.dumps(summary, indent=2))

    preds = {p["question_id"]: p["answer"] for p in model_preds}
    drawn = _draw_examples(run, data, preds, test_items, examples)
    write_text_atomic(run / "REPORT.md", _markdown(summary, drawn, run))
    return summary, passed


def _feature_preprocessing(run: Path) -> str:
    """How the fine-tuned model saw the region features (its ``features.json``): raw / standardised / whitened."""
    record = run / "vqa" / "final" / "features.json"
    stats = (_load(record).get("standardize") or {}) if record.exists() else {}
    return "whitened" if stats.get("whiten") else "standardised" if stats else "raw"


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))


def _settings_note(s: dict) -> list[str]:
    """Why the demo's features are whitened (when they are): what differs from LXMERT's recipe, and why."""
    if s.get("features") != "whitened":
        return [f"Region features as the model saw them: {s.get('features', 'raw')}.", ""]
    return [
        "Region features as the model saw them: **whitened** (`data.whiten_features`: centred and decorrelated "
        "with the train regions' covariance, near-constant directions kept down). LXMERT's recipe uses the raw "
        "features. A detector with random weights gives strongly correlated dimensions (after per-dimension "
        "standardisation one direction holds 58% of the variance); on them, standardised only, the model learnt "
        "the colour but answered shape and yes/no questions at the question-only level (measured on this demo: "
        "colour 62.5, shape 37.2, yes/no 81.2). The fine-tuning runs 16 epochs: at 10 the whitened model read the "
        "colour but not yet the shape (81.1 / 49.2).",
        "",
    ]


def _markdown(s: dict, drawn: list[str], run: Path) -> str:
    det = s["detector"]
    weights = (
        "RANDOM weights (no detector weights given: the features are a demonstration of the chain, "
        "not Visual Genome features)"
        if det.get("random_weights")
        else f"`{det.get('weights')}` (sha256 {str(det.get('weights_sha256'))[:12]}..., layout {det.get('weights_layout')})"
    )
    cannot = (
        "What it cannot show: the detector has random weights (no `WEIGHTS`), so its regions and features are "
        "not Visual Genome's and these numbers say nothing about LXMERT on real images."
        if det.get("random_weights")
        else "What it cannot show: easy-VQA's synthetic shapes are not VQA's photos; the numbers say nothing "
        "about LXMERT's accuracy on real questions."
    )
    lines = [
        "# LXMERT demo on easy-VQA",
        "",
        "What it shows: the whole chain (detector, feature store, LXMERT pretraining and fine-tuning, official "
        "metric) runs, and the model reads the colour and the shape from the region features about as well as a "
        "linear probe of those features does.",
        cannot,
        "",
        f"Detector: `{det.get('config')}` with {weights}; box selection `{det.get('selection')}`, "
        f"images resized to {det.get('min_size')}-{det.get('max_size')} px; {det.get('images')} images.",
        "",
        "## Accuracy on the test questions (official VQA metric, percent)",
        "",
        "The question text alone answers many easy-VQA questions (yes/no especially): only the colour and shape "
        "rows show what the image contributed. Question only: the most frequent train answer of each question "
        "text (the best any answerer blind to the image can do). The probe column: a logistic regression reading "
        "the answer from the image's features alone (below).",
        "",
        "| question type | LXMERT | question only | majority answer | linear probe of the features |",
        "|---|---|---|---|---|",
    ]
    probe = s.get("probe", {})
    for t, row in s["per_type"].items():
        lines.append(
            f"| {t} | {_fmt(row['model'])} | {_fmt(row['question_only'])} | {_fmt(row['majority'])} | "
            f"{_fmt(probe.get(t, {}).get('accuracy'))} |"
        )
    lines.append(
        f"| **all** | **{_fmt(s['accuracy'])}** | {_fmt(s['question_only_baseline'])} | "
        f"{_fmt(s['majority_baseline'])} (`{s['majority_answer']}`) | |"
    )
    verdict = "PASSED" if s["passed"] else "FAILED"
    rules = []
    if s["margin_required"] >= 0:
        rules.append(f"overall at least {s['margin_required']:.1f} points above the better baseline")
    if s.get("probe_gap_allowed", -1) >= 0:
        rules.append(
            f"colour and shape each at most {s['probe_gap_allowed']:.1f} points below the linear probe"
        )
    lines += [
        "",
        f"Check: {'; '.join(rules) or 'none asked for'}: **{verdict}**.",
        *[f"- {failure}" for failure in s.get("failures", [])],
        "",
        *_settings_note(s),
        "## Linear probe of the region features",
        "",
        "Logistic regression on the mean-pooled region features (standardised per dimension), train images -> "
        "test images.",
        "",
        "| target | accuracy | chance |",
        "|---|---|---|",
    ]
    for kind, row in s.get("probe", {}).items():
        lines.append(f"| {kind} | {_fmt(row['accuracy'])} | {_fmt(row['chance'])} |")
    lines += ["", "## Stages", "", "| stage | seconds | throughput |", "|---|---|---|"]
    for name, st in s["stages"].items():
        thr = ""
        if "images_per_s" in st:
            thr = f"{st['images_per_s']} images/s"
        elif "samples_per_s" in st:
            thr = f"{st['samples_per_s']} samples/s"
        lines.append(f"| {name} | {_fmt(st.get('seconds'))} | {thr} |")
    val = s.get("validation", {})
    if "best_epoch" in val:
        lines += [
            "",
            f"Fine-tuning validated each epoch on the held-out train images: best accuracy {val['best_accuracy']:.2f} "
            f"at epoch {val['best_epoch']} (per epoch: {', '.join(f'{a:.1f}' for a in val['accuracy_per_epoch'])}); "
            f"the test predictions come from `vqa/{val['model']}`.",
        ]
    lines += ["", "## Loss curves", ""]
    for title, rel in (("Pretraining", "pretrain/curves.png"), ("VQA fine-tuning", "vqa/curves.png")):
        if (run / rel).exists():
            lines += [f"{title}:", "", f"![{title}]({rel})", ""]
    if drawn:
        lines += ["## Test images (first regions drawn; predicted vs true answer)", ""]
        lines += [f"![example]({f})" for f in drawn]
        lines.append("")
    lines += [
        "## Ask the model yourself",
        "",
        "In the browser (and over HTTP), with the demo's test images as examples:",
        "",
        "```bash",
        f".venv/bin/lxmert-serve --model {served_model(run)}",
        "```",
        "",
    ]
    return "\n".join(lines)


def served_model(run: Path) -> Path:
    """The model the test predictions came from: ``vqa/best`` (by valid accuracy), else ``vqa/final``."""
    return run / "vqa" / ("best" if (run / "vqa" / "best").exists() else "final")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.report")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("probe", help="linear probe of the region features")
    pr.add_argument("--store", required=True, type=Path)
    pr.add_argument("--data", required=True, type=Path)
    pr.add_argument("--out", required=True, type=Path)
    rp = sub.add_parser("report", help="REPORT.md + summary.json")
    rp.add_argument("--run", required=True, type=Path)
    rp.add_argument("--margin", type=float, default=15.0, help="points above the better baseline (<0: none)")
    rp.add_argument(
        "--probe-gap", type=float, default=5.0, help="points colour / shape may be below the probe (<0: none)"
    )
    rp.add_argument("--examples", type=int, default=6)
    args = p.parse_args(argv)
    if args.cmd == "probe":
        result = run_probe(args.store, args.data)
        write_text_atomic(args.out, json.dumps(result, indent=2))
        for kind, row in result.items():
            print(f"probe {kind}: {row['accuracy']:.1f}% (chance {row['chance']:.1f}%)")
        return 0
    summary, passed = build_report(args.run, args.margin, args.examples, args.probe_gap)
    per_type = " | ".join(
        f"{t} {_fmt(summary['per_type'][t]['model'])} (probe {_fmt(summary['probe'].get(t, {}).get('accuracy'))})"
        for t in PROBED
    )
    print(
        f"accuracy {summary['accuracy']:.2f} | question only {summary['question_only_baseline']:.2f} | "
        f"majority {summary['majority_baseline']:.2f} | {per_type} -> {'PASSED' if passed else 'FAILED'}"
    )
    for failure in summary["failures"]:
        print(f"check failed: {failure}")
    print(f"report: {args.run / 'REPORT.md'}")
    print(f"ask the model in the browser: .venv/bin/lxmert-serve --model {served_model(args.run)}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
