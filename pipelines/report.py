"""The demo's two analysis steps: a linear probe of the region features, and REPORT.md / summary.json.

``python -m pipelines.report probe --store S --data D --out probe.json``: can the features tell an image's
colour and shape? A logistic regression on the mean-pooled region features of the train images (each dimension
standardised with the train statistics), scored on the test images, against chance.

``python -m pipelines.report report --run RUN``: reads what the stages left in ``RUN`` (stage timings,
training logs and curves, test predictions of the model and of the question-only baseline) and writes
``RUN/REPORT.md`` and ``RUN/summary.json``. Accuracies are the official VQA metric (``tasks.metrics.vqa``) on
the converted test annotations, in percent. Exits 1 when the model does not beat the better baseline by
``--margin`` points (the demo's pass criterion), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.files import write_text_atomic
from extract.store import FeatureStore
from tasks.metrics.vqa import evaluate_vqa

TYPE_ORDER = ("color", "shape", "yes/no")


# ------------------------------------------------------------------------------------------------- probe
def _image_labels(items: list[dict]) -> dict[str, dict[str, str]]:
    """img_id -> {"color": answer, "shape": answer} from the colour / shape questions of the items."""
    out: dict[str, dict[str, str]] = {}
    for it in items:
        qtype = it.get("question_type")
        if qtype in ("color", "shape") and it.get("label"):
            answer = max(it["label"].items(), key=lambda kv: kv[1])[0]
            out.setdefault(it["img_id"], {})[qtype] = answer
    return out


def _pooled(store: FeatureStore, ids: list[str]) -> np.ndarray:
    return np.stack([store[i]["features"].astype(np.float32).mean(axis=0) for i in ids])


def _fit_probe(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, n: int
) -> float:
    """Test accuracy (percent) of a multinomial logistic regression (L2, full-batch L-BFGS)."""
    torch.manual_seed(0)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    layer = torch.nn.Linear(xt.shape[1], n)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(xt), yt) + 1e-3 * layer.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = layer(torch.from_numpy(x_test)).argmax(1).numpy()
    return float((pred == y_test).mean() * 100)


def run_probe(store_path: Path, data: Path) -> dict[str, Any]:
    train = _image_labels(json.loads((data / "train.json").read_text()))
    test = _image_labels(json.loads((data / "test.json").read_text()))
    store = FeatureStore(store_path)
    result: dict[str, Any] = {}
    for kind in ("color", "shape"):
        tr = sorted(i for i, lab in train.items() if kind in lab and i in store)
        te = sorted(i for i, lab in test.items() if kind in lab and i in store)
        classes = sorted({train[i][kind] for i in tr} | {test[i][kind] for i in te})
        index = {c: k for k, c in enumerate(classes)}
        x_tr, x_te = _pooled(store, tr), _pooled(store, te)
        mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
        acc = _fit_probe(
            (x_tr - mean) / std,
            np.array([index[train[i][kind]] for i in tr]),
            (x_te - mean) / std,
            np.array([index[test[i][kind]] for i in te]),
            len(classes),
        )
        result[kind] = {
            "accuracy": round(acc, 2),
            "chance": round(100.0 / len(classes), 2),
            "classes": len(classes),
            "train_images": len(tr),
            "test_images": len(te),
        }
    store.close()
    return result


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


def build_report(run: Path, margin: float, examples: int) -> tuple[dict, bool]:
    data = run / "data"
    annotations = _load(data / "test_annotations.json")
    questions = _load(data / "test_questions.json")
    test_items = _load(data / "test.json")
    train_items = _load(data / "train.json")

    model_preds = _predictions(run / "eval")
    qonly_preds = _predictions(run / "eval_question_only")
    model = evaluate_vqa(annotations, model_preds, questions)
    qonly = evaluate_vqa(annotations, qonly_preds, questions)
    majority_answer = Counter(
        max(it["label"].items(), key=lambda kv: kv[1])[0] for it in train_items if it.get("label")
    ).most_common(1)[0][0]
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
    for name, folder in (
        ("pretrain", "pretrain"),
        ("finetune", "vqa"),
        ("finetune_question_only", "vqa_question_only"),
    ):
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
    passed = margin < 0 or model["overall"] >= better + margin
    summary = {
        "accuracy": model["overall"],
        "majority_baseline": majority["overall"],
        "question_only_baseline": qonly["overall"],
        "majority_answer": majority_answer,
        "per_type": per_type,
        "margin_required": margin,
        "passed": passed,
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
    }
    write_text_atomic(run / "summary.json", json.dumps(summary, indent=2))

    preds = {p["question_id"]: p["answer"] for p in model_preds}
    drawn = _draw_examples(run, data, preds, test_items, examples)
    write_text_atomic(run / "REPORT.md", _markdown(summary, drawn, run))
    return summary, passed


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))


def _markdown(s: dict, drawn: list[str], run: Path) -> str:
    det = s["detector"]
    weights = (
        "RANDOM weights (no detector weights given: the features are a demonstration of the chain, "
        "not Visual Genome features)"
        if det.get("random_weights")
        else f"`{det.get('weights')}` (sha256 {str(det.get('weights_sha256'))[:12]}..., layout {det.get('weights_layout')})"
    )
    lines = [
        "# LXMERT demo on easy-VQA",
        "",
        f"Detector: `{det.get('config')}` with {weights}; box selection `{det.get('selection')}`, "
        f"images resized to {det.get('min_size')}-{det.get('max_size')} px; {det.get('images')} images.",
        "",
        "## Accuracy on the test questions (official VQA metric, percent)",
        "",
        "The question text alone answers many easy-VQA questions (yes/no especially): only the colour and shape "
        "rows show what the image contributed.",
        "",
        "| question type | LXMERT | question only | majority answer |",
        "|---|---|---|---|",
    ]
    for t, row in s["per_type"].items():
        lines.append(
            f"| {t} | {_fmt(row['model'])} | {_fmt(row['question_only'])} | {_fmt(row['majority'])} |"
        )
    lines.append(
        f"| **all** | **{_fmt(s['accuracy'])}** | {_fmt(s['question_only_baseline'])} | "
        f"{_fmt(s['majority_baseline'])} (`{s['majority_answer']}`) |"
    )
    verdict = "PASSED" if s["passed"] else "FAILED"
    lines += [
        "",
        f"Check: the model must beat the better baseline by {s['margin_required']:.1f} points: **{verdict}**.",
        "",
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
        f".venv/bin/lxmert-serve --model {run / 'vqa' / 'final'}",
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.report")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("probe", help="linear probe of the region features")
    pr.add_argument("--store", required=True, type=Path)
    pr.add_argument("--data", required=True, type=Path)
    pr.add_argument("--out", required=True, type=Path)
    rp = sub.add_parser("report", help="REPORT.md + summary.json")
    rp.add_argument("--run", required=True, type=Path)
    rp.add_argument("--margin", type=float, default=5.0)
    rp.add_argument("--examples", type=int, default=6)
    args = p.parse_args(argv)
    if args.cmd == "probe":
        result = run_probe(args.store, args.data)
        write_text_atomic(args.out, json.dumps(result, indent=2))
        for kind, row in result.items():
            print(f"probe {kind}: {row['accuracy']:.1f}% (chance {row['chance']:.1f}%)")
        return 0
    summary, passed = build_report(args.run, args.margin, args.examples)
    print(
        f"accuracy {summary['accuracy']:.2f} | question only {summary['question_only_baseline']:.2f} | "
        f"majority {summary['majority_baseline']:.2f} -> {'PASSED' if passed else 'FAILED'}"
    )
    print(f"report: {args.run / 'REPORT.md'}")
    print(f"ask the model in the browser: .venv/bin/lxmert-serve --model {args.run / 'vqa' / 'final'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
