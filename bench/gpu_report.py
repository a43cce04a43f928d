"""The one table of ``bench/gpu_check.sh``: reads its folder (parts.tsv, env.log, tests.xml, the benchmarks' JSON
files, demo_summary.json) and prints markdown. Every part appears, also one that failed or ran out of time
(exit 124); a missing result says so instead of stopping the report.

    python bench/gpu_report.py runs/gpu_check > runs/gpu_check/gpu_check.md
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _status(parts: dict[str, tuple[int, int, int]], name: str) -> str:
    if name not in parts:
        return "not run"
    rc, seconds, limit = parts[name]
    if rc == 0:
        return f"ok ({seconds} s)"
    if rc in (124, 137):
        return f"**timed out** after {seconds} s (limit {limit} s)"
    return f"**failed** (exit {rc}, {seconds} s)"


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def rows_env(out: Path, parts) -> list[tuple[str, ...]]:
    info = {}
    log = out / "env.log"
    if log.is_file():
        for line in log.read_text().splitlines():
            if line.startswith("ENV "):
                info = json.loads(line[4:])
    figure = (
        f"{info.get('gpu')} (x{info.get('gpus')}, sm {info.get('capability')}), torch {info.get('torch')}, "
        f"CUDA {info.get('cuda')}, cuDNN {info.get('cudnn')}, transformers {info.get('transformers')}, "
        f"Python {info.get('python')}"
        if info
        else "-"
    )
    return [("machine", "", figure, "", _status(parts, "env"))]


def rows_tests(out: Path, parts) -> list[tuple[str, ...]]:
    xml = out / "tests.xml"
    if not xml.is_file():
        return [("test suite", "", "no results", "all pass", _status(parts, "tests"))]
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    figure = f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
    if failed:
        figure += ": " + ", ".join(failed[:8]) + (" ..." if len(failed) > 8 else "")
    met = "met" if not failed and parts.get("tests", (1,))[0] == 0 else "**not met**"
    return [("test suite", "CUDA visible", figure, f"all pass: {met}", _status(parts, "tests"))]


def rows_model_step(out: Path, parts) -> list[tuple[str, ...]]:
    data = _load(out / "model_step.json")
    status = _status(parts, "model_step")
    if not data:
        return [("model step", "", "no results", ">= 2x HF in bf16", status)]
    peak = data["matmul_peak_gflops"]
    rows = [
        (
            "model step",
            "matmul peak",
            f"fp32 {peak['fp32'] / 1e3:.0f}, bf16 {peak['bf16'] / 1e3:.0f} TFLOP/s (8192^3, measured); "
            f"HF step {(data['hf_flops_per_sample'] or 0) / 1e9:.1f} GFLOP/sample",
            "",
            status,
        )
    ]
    for r in data["rows"]:
        goal = ""
        if r["impl"] != "hf" and r["dtype"] == "bf16":
            goal = ">= 2x HF: " + ("met" if (r["x_hf"] or 0) >= 2 else "**not met**")
        rows.append(
            (
                "model step",
                f"{r['impl']} {r['dtype']} batch {r['batch']}",
                f"{r['samples_per_s']:.1f} samples/s, {_fmt(r['x_hf'])}x HF, {r['tflops']:.1f} TFLOP/s = "
                f"{r['pct_bf16_peak']:.1f}% of bf16 peak, {r['peak_gib']:.1f} GiB",
                goal,
                "",
            )
        )
    rows += [("model step", "failed worker", f, "", "") for f in data.get("failures", [])]
    return rows


def rows_extract(out: Path, parts) -> list[tuple[str, ...]]:
    data = _load(out / "extract.json")
    status = _status(parts, "extract")
    if not data:
        return [("extraction", "", "no results", ">= 2x loop", status)]
    rows = [("extraction", f"{data['n_images']} images, {data['config']}", "", "", status)]
    loop = data["loop_images_per_s"]
    checks = {(c["dtype"], c["batch"]): c for c in data["checks"]}
    for r in data["rows"]:
        if r["mode"] != "batched runner":
            rows.append(("extraction", f"loop {r['dtype']}", f"{r['images_per_s']:.1f} images/s", "", ""))
            continue
        ratio = r["images_per_s"] / loop[r["dtype"]] if r["dtype"] in loop else None
        c = checks.get((r["dtype"], r["batch"]))
        same = (
            f"; vs batch 1: ids {100 * c['ids_equal']:.0f}% equal, features {c['feature_rel']:.1e}, "
            f"boxes {c['box_rel']:.1e} (max rel diff)"
            if c
            else ""
        )
        rows.append(
            (
                "extraction",
                f"runner {r['dtype']} batch {r['batch']}",
                f"{r['images_per_s']:.1f} images/s, {_fmt(ratio)}x loop, {r['peak_mb']:.0f} MiB{same}",
                ">= 2x loop: " + ("met" if (ratio or 0) >= 2 else "no") if r["batch"] > 1 else "",
                "",
            )
        )
    for prof in data.get("profiles", []):
        for setting, stages in prof.items():
            if setting != "dtype":
                shown = ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
                rows.append(("extraction", f"ms/image, {prof['dtype']} {setting}", shown, "", ""))
    rows += [("extraction", "failed worker", f, "", "") for f in data.get("failures", [])]
    return rows


def rows_train_loop(out: Path, parts) -> list[tuple[str, ...]]:
    data = _load(out / "train_loop.json")
    status = _status(parts, "train_loop")
    if not data:
        return [("train loop", "", "no results", ">= 0.9x bare step", status)]
    base = data.get("bare_step")
    rows = [
        (
            "train loop",
            f"{data['dtype']} batch {data['batch']}: bare step",
            f"{_fmt(base, '.1f')} samples/s",
            "",
            status,
        )
    ]
    for name, value in data["rows"].items():
        if name.startswith("bare step"):
            continue
        ratio = value / base if value and base else None
        goal = ""
        if name.startswith("trainer"):
            goal = ">= 0.9x bare: " + ("met" if (ratio or 0) >= 0.9 else "**not met**")
        rows.append(
            ("train loop", name, f"{_fmt(value, '.1f')} samples/s, {_fmt(ratio)}x bare step", goal, "")
        )
    for opt, ratio in data.get("same_process_ratio", {}).items():
        rows.append(("train loop", f"trainer / bare step, same process ({opt})", f"{ratio:.2f}", "", ""))
    return rows


def rows_demo(out: Path, parts) -> list[tuple[str, ...]]:
    summary = _load(out / "demo_summary.json")
    figure = "no summary"
    if summary:
        figure = (
            f"accuracy {summary.get('accuracy', 0):.1f}% (question only {summary.get('question_only_baseline', 0):.1f}, "
            f"majority {summary.get('majority_baseline', 0):.1f}); per type "
            + ", ".join(
                f"{k} {v.get('model') or 0:.0f} (q-only {v.get('question_only') or 0:.0f})"
                for k, v in (summary.get("per_type") or {}).items()
                if isinstance(v, dict)
            )
        )
    return [
        ("full_run demo", "tiny, on the machine's device", figure, "runs end to end", _status(parts, "demo"))
    ]


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else "runs/gpu_check")
    parts = {}
    if (out / "parts.tsv").is_file():
        for line in (out / "parts.tsv").read_text().splitlines():
            name, rc, seconds, limit = line.split("\t")
            parts[name] = (int(rc), int(seconds), int(limit))
    rows = []
    for make in (rows_env, rows_tests, rows_model_step, rows_extract, rows_train_loop, rows_demo):
        try:
            rows += make(out, parts)
        except Exception as e:  # a malformed result file must not hide the others
            rows.append((make.__name__[5:], "", f"report error: {type(e).__name__}: {e}", "", ""))
    print("| part | setting | figure | goal | status |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
