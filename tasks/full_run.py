"""The whole chain as a list of stages, each one real command: `pipelines/full_run.sh` runs this module.

Without ``--config`` it runs the demo on easy-VQA (a data set the package registry ships): convert ->
extract-features -> linear probe -> lxmert-train pretrain -> lxmert-train vqa (and the question-only baseline:
the same fine-tuning with every region feature and box zeroed) -> predictions + the official VQA metric ->
``REPORT.md`` / ``summary.json``. With ``--config pipelines/configs/lxmert.yaml`` it runs the real recipe:
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.config import ConfigError, load_config
from common.files import write_text_atomic
from extract.store import open_metadata

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------------------------ configs
@dataclass
class DemoConfig:
    """The bundled demo (easy-VQA, 64x64 images of one coloured shape; random-weight detector unless
    ``WEIGHTS`` is set)."""

    train_images: int = 800
    test_images: int = 200
    detector_config: str = "vg_tiny"
    min_size: int = 224
    max_size: int = 224
    extract_batch_size: int = 8
    pretrain_config: str = "tasks/configs/pretrain_demo.yaml"
    vqa_config: str = "tasks/configs/vqa_demo.yaml"
    pretrain_overrides: list[str] = field(default_factory=list)
    vqa_overrides: list[str] = field(default_factory=list)
    check_margin: float = 5.0  # points above the better baseline the model must reach (<0: no check)
    draw_examples: int = 6


@dataclass
class ImageSet:
    """One image folder -> one feature store ``RUN/features/<name>.lmdb``."""

    name: str = ""
    images: str = ""
    list_file: str = ""  # optional: only these images (paths relative to ``images``)
    id_from: str = "stem"


@dataclass
class FinetuneSpec:
    """One fine-tuning task of the real recipe."""

    task: str = "vqa"  # vqa | gqa | nlvr2
    config: str = ""  # default: tasks/configs/<task>.yaml
    train: list[str] = field(default_factory=list)
    valid: str = ""
    answers: str = ""
    features: list[str] = field(default_factory=list)  # image-set names
    valid_annotations: str = ""  # raw official file of the valid split: the official metric
    test: dict[str, str] = field(default_factory=dict)  # split name -> LXMERT JSON (submission files)
    overrides: list[str] = field(default_factory=list)


@dataclass
class RealConfig:
    """The real datasets (``pipelines/configs/lxmert.yaml``)."""

    weights: str = ""  # detector weights (any of the three published layouts, or a Hub id)
    detector_config: str = "vg_r101_c4"
    extract_batch_size: int = 0  # 0: extract-features' default
    image_sets: list[ImageSet] = field(default_factory=list)
    pretrain: bool = True
    pretrain_config: str = "tasks/configs/pretrain_lxmert.yaml"
    pretrain_train: list[str] = field(default_factory=list)
    pretrain_valid: str = ""
    pretrain_answers: str = ""
    pretrain_features: list[str] = field(default_factory=list)  # image-set names
    pretrain_overrides: list[str] = field(default_factory=list)
    load: str = ""  # start fine-tuning from this checkpoint instead of our pretraining
    finetune: list[FinetuneSpec] = field(default_factory=list)


@dataclass
class LaunchConfig:
    """How commands are launched: processes per node and the torchrun rendezvous for several machines."""

    gpus_per_node: int = 0  # 0: all visible GPUs (1 process on CPU)
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29533


@dataclass
class PipelineConfig:
    run_dir: str = "runs/demo"
    mode: str = "demo"  # demo | real
    demo: DemoConfig = field(default_factory=DemoConfig)
    real: RealConfig = field(default_factory=RealConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


# ------------------------------------------------------------------------------------------------- stages
@dataclass
class Stage:
    """One step: ``command()`` builds its command line when the stage runs (so it can see partial outputs)."""

    name: str
    command: Callable[[], list[str]]
    description: str = ""
    distributed: bool = False  # launched with torchrun over the local GPUs


class StageFailed(RuntimeError):
    pass


def _gpus(launch: LaunchConfig) -> int:
    if launch.gpus_per_node > 0:
        return launch.gpus_per_node
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch / no driver: CPU
        return 0


def _launcher(launch: LaunchConfig) -> list[str]:
    """``torchrun ... --no-python`` when several processes are wanted, else nothing."""
    n = _gpus(launch)
    if n <= 1 and launch.nnodes <= 1:
        return []
    cmd = [str(BIN / "torchrun"), f"--nproc_per_node={max(n, 1)}"]
    if launch.nnodes > 1:
        cmd += [
            f"--nnodes={launch.nnodes}",
            f"--node_rank={launch.node_rank}",
            f"--master_addr={launch.master_addr}",
            f"--master_port={launch.master_port}",
        ]
    return [*cmd, "--no-python"]


def _project_file(path: str) -> str:
    """A config path as given when it exists from here, else the project's own (``tasks/configs/...``)."""
    p = Path(path)
    if p.is_absolute() or p.exists() or not (ROOT / p).exists():
        return path
    return str(ROOT / p)


def _train_cmd(task: str, config: str, out: Path, overrides: list[str], load: str | None = None) -> list[str]:
    cmd = [str(BIN / "lxmert-train"), task, "--config", _project_file(config), "--output", str(out)]
    if load:
        cmd += ["--load", load]
    if (out / "checkpoints" / "latest").exists():
        cmd.append("--resume")
    return cmd + overrides


def _feature_dim(store: Path) -> str:
    """The region-feature size of a store (``<store's>`` before it exists: in a dry run)."""
    if not store.exists():
        return "<feature size of the store>"
    return str(open_metadata(store).get("feature_dim") or 2048)


def _yaml_list(paths: list[str | Path]) -> str:
    return "[" + ",".join(str(p) for p in paths) + "]"


def demo_stages(cfg: PipelineConfig, run: Path) -> list[Stage]:
    d = cfg.demo
    data = run / "data"
    store = run / "features.lmdb"
    weights = os.environ.get("WEIGHTS", "")
    detector = os.environ.get("CONFIG", d.detector_config if not weights else "vg_r101_c4")
    device = os.environ.get("DEVICE", "")
    dev_args = ["train.device=" + device] if device else []

    def extract() -> list[str]:
        cmd = [
            str(BIN / "extract-features"), str(data / "images"), str(store), "--id-from", "relpath",
            "--config", detector, "--min-size", str(d.min_size), "--max-size", str(d.max_size),
            "--batch-size", str(d.extract_batch_size),
        ]  # fmt: skip
        cmd += ["--weights", weights] if weights else ["--random-weights"]
        return cmd + (["--device", device] if device else [])

    def finetune(out: Path, extra: list[str]) -> Callable[[], list[str]]:
        def build() -> list[str]:
            overrides = [
                f"data.train={_yaml_list([data / 'train.json'])}",
                f"data.features={_yaml_list([store])}",
                f"data.answers={data / 'label2ans.json'}",
                f"finetune.pretrain_answers={data / 'all_ans.json'}",
                *d.vqa_overrides,
                *dev_args,
                *extra,
            ]
            return _train_cmd("vqa", d.vqa_config, out, overrides, load=str(run / "pretrain" / "final"))

        return build

    def predict(model: Path, out: Path, extra: list[str]) -> Callable[[], list[str]]:
        return lambda: [
            str(BIN / "lxmert-train"), "vqa", "--eval-only", "--config", _project_file(d.vqa_config),
            "--load", str(model), "--data", str(data / "test.json"),
            "--annotations", str(data / "test_annotations.json"), "--output", str(out),
            f"data.features={_yaml_list([store])}", f"data.answers={data / 'label2ans.json'}",
            *dev_args, *extra,
        ]  # fmt: skip

    return [
        Stage(
            "data",
            lambda: [
                str(BIN / "lxmert-data"),
                "easy-vqa",
                "--out",
                str(data),
                "--train-images",
                str(d.train_images),
                "--test-images",
                str(d.test_images),
            ],  # fmt: skip
            "easy-VQA (from the registry package) -> images + LXMERT JSON + official test files",
        ),
        Stage("extract", extract, "region features of the train and test images"),
        Stage(
            "probe",
            lambda: [
                sys.executable,
                "-m",
                "tasks.demo_report",
                "probe",
                "--store",
                str(store),
                "--data",
                str(data),
                "--out",
                str(run / "probe.json"),
            ],  # fmt: skip
            "linear probe: colour / shape from mean-pooled region features",
        ),
        Stage(
            "pretrain",
            lambda: _train_cmd(
                "pretrain",
                d.pretrain_config,
                run / "pretrain",
                [
                    f"data.train={_yaml_list([data / 'pretrain.json'])}",
                    f"data.features={_yaml_list([store])}",
                    f"data.answers={data / 'all_ans.json'}",
                    # from scratch: the network takes the store's feature size (128 for vg_tiny, 2048 for VG R101)
                    f"model.visual_feat_dim={_feature_dim(store)}",
                    *d.pretrain_overrides,
                    *dev_args,
                ],
            ),
            "LXMERT pretraining (small model) on the train images and questions",
        ),
        Stage("finetune", finetune(run / "vqa", []), "VQA fine-tuning"),
        Stage(
            "finetune_question_only",
            finetune(run / "vqa_question_only", ["data.zero_visual=true"]),
            "the question-only baseline: the same fine-tuning with every region feature and box zeroed",
        ),
        Stage(
            "predict", predict(run / "vqa" / "final", run / "eval", []), "test predictions + official metric"
        ),
        Stage(
            "predict_question_only",
            predict(
                run / "vqa_question_only" / "final", run / "eval_question_only", ["data.zero_visual=true"]
            ),
            "the question-only baseline on the test questions",
        ),
        Stage(
            "report",
            lambda: [
                sys.executable,
                "-m",
                "tasks.demo_report",
                "report",
                "--run",
                str(run),
                "--margin",
                str(d.check_margin),
                "--examples",
                str(d.draw_examples),
            ],  # fmt: skip
            "REPORT.md + summary.json",
        ),
    ]


def real_stages(cfg: PipelineConfig, run: Path) -> list[Stage]:
    """The real recipe. On several machines (``launch.nnodes > 1``; ``run_dir`` on storage every machine sees)
    each machine extracts its shard of every image set into a store of its own
    (``features/<name>.node<R>.lmdb``: LMDB's writer locking is not safe across machines), training reads all
    machines' stores (an image id is looked up in each), and only machine 0 writes predictions."""
    r = cfg.real
    launch = _launcher(cfg.launch)
    nnodes, node = cfg.launch.nnodes, cfg.launch.node_rank

    def node_store(name: str, rank: int) -> Path:
        suffix = f".node{rank}" if nnodes > 1 else ""
        return run / "features" / f"{name}{suffix}.lmdb"

    stores = {s.name: [node_store(s.name, k) for k in range(nnodes)] for s in r.image_sets}
    stages: list[Stage] = []

    def store_paths(names: list[str]) -> list[Path]:
        unknown = [n for n in names if n not in stores]
        if unknown:
            raise ConfigError(
                f"image set(s) {unknown} are not defined under real.image_sets ({list(stores)})"
            )
        return [p for n in names for p in stores[n]]

    for s in r.image_sets:

        def extract(s: ImageSet = s) -> list[str]:
            cmd = [*launch, str(BIN / "extract-features")]
            if s.list_file:
                cmd += ["--list", s.list_file]
            cmd += [
                s.images,
                str(node_store(s.name, node)),
                "--config",
                r.detector_config,
                "--id-from",
                s.id_from,
            ]
            cmd += ["--weights", r.weights] if r.weights else ["--random-weights"]
            if r.extract_batch_size:
                cmd += ["--batch-size", str(r.extract_batch_size)]
            return cmd

        stages.append(Stage(f"extract_{s.name}", extract, f"region features of {s.images}", distributed=True))

    pretrained = r.load
    if r.pretrain:
        overrides = [
            f"data.train={_yaml_list(r.pretrain_train)}",
            f"data.valid={r.pretrain_valid}",
            f"data.features={_yaml_list(store_paths(r.pretrain_features))}",
            f"data.answers={r.pretrain_answers}",
            *r.pretrain_overrides,
        ]
        stages.append(
            Stage(
                "pretrain",
                lambda o=overrides: launch + _train_cmd("pretrain", r.pretrain_config, run / "pretrain", o),
                "LXMERT pretraining",
                distributed=True,
            )
        )
        pretrained = pretrained or str(run / "pretrain" / "final")

    for ft in r.finetune:
        config = ft.config or f"tasks/configs/{ft.task}.yaml"
        feats = f"data.features={_yaml_list(store_paths(ft.features))}"
        common = [feats] + ([f"data.answers={ft.answers}"] if ft.answers else [])
        overrides = [
            f"data.train={_yaml_list(ft.train)}",
            f"data.valid={ft.valid}",
            *common,
            *([f"finetune.annotations={ft.valid_annotations}"] if ft.valid_annotations else []),
            *ft.overrides,
        ]
        out = run / ft.task
        stages.append(
            Stage(
                f"finetune_{ft.task}",
                lambda ft=ft, config=config, out=out, o=overrides: (
                    launch + _train_cmd(ft.task, config, out, o, load=pretrained)
                ),
                f"{ft.task} fine-tuning",
                distributed=True,
            )
        )
        splits = dict(ft.test)
        if ft.valid:
            splits = {"valid": ft.valid, **splits}
        for split, path in splits.items() if node == 0 else ():
            ann = ["--annotations", ft.valid_annotations] if split == "valid" and ft.valid_annotations else []
            stages.append(
                Stage(
                    f"predict_{ft.task}_{split}",
                    lambda ft=ft, config=config, out=out, split=split, path=path, ann=ann, c=common: [
                        str(BIN / "lxmert-train"),
                        ft.task,
                        "--eval-only",
                        "--config",
                        _project_file(config),
                        "--load",
                        str(out / "best") if (out / "best").exists() else str(out / "final"),
                        "--data",
                        path,
                        *ann,
                        "--output",
                        str(out / f"predict_{split}"),
                        *c,
                    ],  # fmt: skip
                    f"{ft.task} predictions on {split}" + (" + official metric" if ann else ""),
                )
            )
    return stages


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
    overrides = list(args.overrides)
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
