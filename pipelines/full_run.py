"""The whole chain as a list of stages, each one real command: `pipelines/full_run.sh` runs this module.

Without ``--config`` it runs the demo on easy-VQA (a data set the package registry ships): convert ->
extract-features -> linear probe -> lxmert-train pretrain -> lxmert-train vqa (validated on held-out train
images) -> predictions of the best model + the official VQA metric -> ``REPORT.md`` / ``summary.json`` (with the
question-only baseline and the per-type check against the probe). With ``--config pipelines/configs/lxmert.yaml`` it runs the real recipe:
extraction of every image set, pretraining, fine-tuning and evaluation / submission files for VQA, GQA and
NLVR2, with torchrun over the local GPUs (and several machines with ``--nnodes/--node-rank/--master-addr``).

Every stage writes its log to ``RUN/logs/<stage>.log``; a finished stage leaves ``RUN/stages/<stage>.done``
and is skipped when the pipeline runs again; a partial one resumes (``extract-features`` continues its store,
``lxmert-train`` gets ``--resume`` when its run folder has a checkpoint). A failure names the stage and its
log and exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common.config import ConfigError, load_config
from common.files import write_text_atomic
from pipelines.config import ENVIRONMENT, PipelineConfig
from pipelines.stages import Stage, StageFailed, demo_stages, real_stages


def run_stages(stages: list[Stage], run: Path, dry_run: bool = False, only: list[str] | None = None) -> dict:
    """Run (or print) the stages in order; returns ``{stage: {"seconds", "skipped", "log"}}``."""
    logs, marks = run / "logs", run / "stages"
    timings: dict[str, dict] = {}
    if not dry_run:
        logs.mkdir(parents=True, exist_ok=True)
        marks.mkdir(parents=True, exist_ok=True)
    for i, stage in enumerate(stages, 1):
        if only and stage.name not in only:
            continue
        cmd = stage.command()
        head = f"[full_run] stage {i}/{len(stages)} {stage.name}: {stage.description}"
        if dry_run:
            print(head)
            print("  " + shlex.join(cmd))
            continue
        done = marks / f"{stage.name}.done"
        log = logs / f"{stage.name}.log"
        if done.exists():
            print(f"{head} -- done before, skipped ({done})")
            timings[stage.name] = json.loads(done.read_text() or "{}") | {"skipped": True}
            continue
        print(head, flush=True)
        print("  " + shlex.join(cmd), flush=True)
        start = time.time()
        with open(log, "ab") as fh:
            fh.write(f"\n$ {shlex.join(cmd)}\n".encode())
            fh.flush()
            # the command's output goes to its log and, unchanged, to the terminal (progress bars redraw in place)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert proc.stdout is not None
            while chunk := proc.stdout.read1(65536):
                fh.write(chunk)
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
            rc = proc.wait()
        seconds = time.time() - start
        if rc != 0:
            raise StageFailed(f"stage '{stage.name}' failed (exit {rc}); its log: {log}")
        info = {"seconds": round(seconds, 1), "log": str(log)}
        write_text_atomic(done, json.dumps(info))
        timings[stage.name] = info
        print(f"[full_run] stage {stage.name} done in {seconds:.1f} s", flush=True)
    if not dry_run:
        write_text_atomic(run / "stages.json", json.dumps(timings, indent=2))
    return timings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="full_run.sh",
        description="The whole LXMERT chain in one command: the easy-VQA demo by default, the real datasets "
        "with --config pipelines/configs/lxmert.yaml. Finished stages are skipped, partial ones resume.",
    )
    p.add_argument("--config", help="pipeline config (YAML); without it: the demo")
    p.add_argument("--run-dir", help="output folder [runs/demo, or run_dir of the config]")
    p.add_argument("--dry-run", action="store_true", help="print every stage's command, run nothing")
    p.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
    p.add_argument("--nnodes", type=int, help="machines (torchrun)")
    p.add_argument("--node-rank", type=int, help="this machine's rank (torchrun)")
    p.add_argument("--master-addr", help="rendezvous host (torchrun)")
    p.add_argument("--gpus-per-node", type=int, help="processes per machine [all visible GPUs]")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="pipeline config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = [f"{key}={os.environ[var]}" for var, key in ENVIRONMENT.items() if os.environ.get(var)]
    overrides += list(args.overrides)
    for flag, key in (
        ("nnodes", "launch.nnodes"),
        ("node_rank", "launch.node_rank"),
        ("master_addr", "launch.master_addr"),
        ("gpus_per_node", "launch.gpus_per_node"),
    ):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    try:
        cfg = load_config(PipelineConfig, args.config, overrides)
        run = Path(args.run_dir or cfg.run_dir)
        if not run.is_absolute():
            run = (Path.cwd() / run).resolve()
        stages = demo_stages(cfg, run) if cfg.mode == "demo" else real_stages(cfg, run)
        print(f"[full_run] {cfg.mode} run in {run}" + (" (dry run)" if args.dry_run else ""), flush=True)
        timings = run_stages(stages, run, dry_run=args.dry_run, only=args.only)
    except (ConfigError, StageFailed) as e:
        print(f"[full_run] {e}", file=sys.stderr)
        return 1
    if not args.dry_run:
        total = sum(t.get("seconds", 0) for t in timings.values() if not t.get("skipped"))
        print(f"[full_run] all stages done ({total:.0f} s this run)")
        report = run / "REPORT.md"
        if report.exists():
            print(f"[full_run] report: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
