"""The pipeline's stages: the demo's and the real recipe's, each one real command line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError
from extract.store import open_metadata
from pipelines.config import ImageSet, LaunchConfig, PipelineConfig, VqaDataSpec

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

__all__ = ["Stage", "StageFailed", "demo_stages", "real_stages", "vqa_data_stages"]


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
    weights, device = d.weights, d.device
    detector = d.detector_config or ("vg_r101_c4" if weights else "vg_tiny")
    dev_args = ["train.device=" + device] if device else []

    def extract() -> list[str]:
        cmd = [
            str(BIN / "extract-features"), str(data / "images"), str(store), "--id-from", "relpath",
            "--config", detector, "--min-size", str(d.min_size), "--max-size", str(d.max_size),
            "--batch-size", str(d.extract_batch_size),
        ]  # fmt: skip
        cmd += ["--weights", weights] if weights else ["--random-weights"]
        return cmd + (["--device", device] if device else [])

    def finetune() -> list[str]:
        valid = [f"data.valid={data / 'valid.json'}"] if d.valid_images > 0 else []
        overrides = [
            f"data.train={_yaml_list([data / 'train.json'])}",
            *valid,
            f"data.features={_yaml_list([store])}",
            f"data.answers={data / 'label2ans.json'}",
            f"finetune.pretrain_answers={data / 'all_ans.json'}",
            *d.vqa_overrides,
            *dev_args,
        ]
        return _train_cmd("vqa", d.vqa_config, run / "vqa", overrides, load=str(run / "pretrain" / "final"))

    def predict() -> list[str]:
        """Test predictions of the best model (by valid accuracy), or the final one without a valid split."""
        model = run / "vqa" / ("best" if (run / "vqa" / "best").exists() else "final")
        return [
            str(BIN / "lxmert-train"), "vqa", "--eval-only", "--config", _project_file(d.vqa_config),
            "--load", str(model), "--data", str(data / "test.json"),
            "--annotations", str(data / "test_annotations.json"), "--output", str(run / "eval"),
            f"data.features={_yaml_list([store])}", f"data.answers={data / 'label2ans.json'}",
            *dev_args,
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
                "--valid-images",
                str(d.valid_images),
            ],  # fmt: skip
            "easy-VQA (from the registry package) -> images + LXMERT JSON + official test files",
        ),
        Stage("extract", extract, "region features of the train and test images"),
        Stage(
            "probe",
            lambda: [
                sys.executable,
                "-m",
                "pipelines.report",
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
        Stage("finetune", finetune, "VQA fine-tuning, validated on the held-out train images"),
        Stage("predict", predict, "test predictions of the best model + official metric"),
        Stage(
            "report",
            lambda: [
                sys.executable,
                "-m",
                "pipelines.report",
                "report",
                "--run",
                str(run),
                "--margin",
                str(d.check_margin),
                "--probe-gap",
                str(d.probe_gap),
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
    stages: list[Stage] = vqa_data_stages(r.vqa_data)  # the official files -> LXMERT's JSON (quick: first)

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


def vqa_data_stages(v: VqaDataSpec) -> list[Stage]:
    """``lxmert-data vqa`` per split given in ``real.vqa_data``: train, minival + nominival (LXMERT's minival list
    passed as ``--minival-images``; required), test."""
    out = Path(v.out_dir)
    answers = ["--answers", v.answers] if v.answers else []
    if v.val_questions and not v.minival_images:
        raise ConfigError(
            "real.vqa_data.minival_images is empty: give LXMERT's minival image list (its data/vqa/minival.json "
            "or data/lxmert/mscoco_minival.json); LXMERT pretrains on every other val2014 image, so another "
            "minival overlaps its pretraining data"
        )

    def convert(split: str, questions: str, annotations: str, extra: list[str]) -> Stage:
        cmd = [str(BIN / "lxmert-data"), "vqa", "--questions", questions]
        if annotations:
            cmd += ["--annotations", annotations, *answers]
        cmd += ["--out", str(out / f"{split}.json"), *extra]
        return Stage(f"data_vqa_{split}", lambda c=cmd: c, f"VQA {split} items (lxmert-data vqa)")

    stages = []
    if v.train_questions:
        stages.append(convert("train", v.train_questions, v.train_annotations, []))
    if v.val_questions:
        for subset in ("minival", "nominival"):
            extra = ["--subset", subset, "--minival-images", v.minival_images]
            stages.append(convert(subset, v.val_questions, v.val_annotations, extra))
    if v.test_questions:
        stages.append(convert("test", v.test_questions, "", []))
    return stages
