"""pipelines/full_run.sh: --dry-run names every stage's real command; a reduced demo runs end to end, writes
its report, summary, plots and predictions, and a second run skips every finished stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = [
    "data",
    "extract",
    "probe",
    "pretrain",
    "finetune",
    "predict",
    "report",
]


def _needs_venv() -> None:
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("tests are not running from the clone's .venv")


def _run(args: list[str], tmp_path: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEVICE="cpu", OMP_NUM_THREADS="2")
    env.pop("WEIGHTS", None)
    env.pop("CONFIG", None)
    return subprocess.run(
        ["bash", str(ROOT / "pipelines" / "full_run.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=tmp_path,
    )


@pytest.mark.slow
def test_dry_run_prints_every_stage_command(tmp_path: Path) -> None:
    _needs_venv()
    out = _run(["--dry-run", "--run-dir", str(tmp_path / "demo")], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    for i, name in enumerate(STAGES, 1):
        assert f"stage {i}/{len(STAGES)} {name}:" in out.stdout
    for command in ("lxmert-data easy-vqa", "extract-features", "lxmert-train pretrain", "lxmert-train vqa"):
        assert command in out.stdout, command
    assert "--eval-only" in out.stdout and "--valid-images 100" in out.stdout and "valid.json" in out.stdout
    assert not (tmp_path / "demo").exists()  # nothing ran

    real = _run(
        ["--dry-run", "--config", str(ROOT / "pipelines/configs/lxmert.yaml"), "--gpus-per-node", "4"],
        tmp_path,
    )
    assert real.returncode == 0, real.stderr[-2000:]
    assert "torchrun --nproc_per_node=4 --no-python" in real.stdout
    for name in ("extract_train2014", "pretrain", "finetune_vqa", "finetune_gqa", "finetune_nlvr2",
                 "predict_vqa_test", "predict_gqa_submit", "predict_nlvr2_test"):  # fmt: skip
        assert f" {name}:" in real.stdout, name


@pytest.mark.slow
def test_reduced_demo_end_to_end(tmp_path: Path) -> None:
    _needs_venv()
    pytest.importorskip("easy_vqa")
    run = tmp_path / "demo"
    args = [
        "--run-dir", str(run),
        "demo.train_images=24", "demo.valid_images=6", "demo.test_images=12", "demo.check_margin=-1",
        "demo.probe_gap=-1", "demo.draw_examples=2",
        "demo.extract_batch_size=4", "demo.min_size=96", "demo.max_size=96",
        "demo.pretrain_overrides=[train.epochs=1,data.batch_size=16]",
        "demo.vqa_overrides=[train.epochs=1,data.batch_size=16]",
    ]  # fmt: skip
    first = _run(args, tmp_path)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-3000:]
    assert f"report: {run / 'REPORT.md'}" in first.stdout

    summary = json.loads((run / "summary.json").read_text())
    for key in ("accuracy", "majority_baseline", "question_only_baseline", "per_type", "stages", "detector"):
        assert key in summary, key
    assert 0.0 <= summary["accuracy"] <= 100.0
    assert set(summary["per_type"]) == {"color", "shape", "yes/no"}
    assert summary["detector"]["random_weights"] is True
    assert summary["stages"]["extract"]["images_per_s"] > 0
    report = (run / "REPORT.md").read_text()
    assert "RANDOM weights" in report and "| color |" in report and "linear probe of the features |" in report
    assert "What it shows:" in report and "What it cannot show:" in report
    assert f"lxmert-serve --model {run / 'vqa' / 'best'}" in report  # ends with how to ask the (tested) model
    for png in ("pretrain/curves.png", "vqa/curves.png"):
        assert (run / png).stat().st_size > 1000, png
    # the valid split: held-out train images, validated each epoch, the best model kept and used for the test
    valid = json.loads((run / "data" / "valid.json").read_text())
    train_images = {it["img_id"] for it in json.loads((run / "data" / "train.json").read_text())}
    assert {it["img_id"] for it in valid} == {f"train/{n}" for n in range(24, 30)}
    assert not train_images & {it["img_id"] for it in valid}
    splits = {json.loads(line)["split"] for line in (run / "vqa" / "metrics.jsonl").read_text().splitlines()}
    assert {"train", "valid"} <= splits and (run / "vqa" / "best" / "model.safetensors").exists()
    assert "vqa/best" in (run / "logs" / "predict.log").read_text()

    # the per-type rule is enforced on the run's own files: a probe that reads colour and shape perfectly
    probe = json.loads((run / "probe.json").read_text())
    assert set(probe) == {"color", "shape"}
    (run / "probe.json").write_text(json.dumps({k: dict(v, accuracy=100.0) for k, v in probe.items()}))
    check = subprocess.run(
        [sys.executable, "-m", "pipelines.report", "report", "--run", str(run), "--margin", "-1",
         "--probe-gap", "5", "--examples", "0"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert check.returncode == 1, check.stdout + check.stderr
    for qtype in ("color", "shape"):
        assert f"check failed: {qtype}: LXMERT" in check.stdout and "below the linear probe" in check.stdout
    assert json.loads((run / "summary.json").read_text())["passed"] is False
    (run / "probe.json").write_text(json.dumps(probe))
    preds = json.loads((run / "eval" / "predictions.json").read_text())
    test_qids = {
        q["question_id"] for q in json.loads((run / "data" / "test_questions.json").read_text())["questions"]
    }
    assert {p["question_id"] for p in preds} == test_qids
    assert all(isinstance(p["answer"], str) for p in preds)
    assert len(list((run / "examples").glob("*.png"))) == 2
    assert all((run / "logs" / f"{s}.log").exists() for s in STAGES)

    second = _run(args, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done before, skipped") == len(STAGES)
