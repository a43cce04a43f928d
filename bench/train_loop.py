"""Benchmark: the full trainer (data loading, masking, step, logging) against the bare model step, and the
pretraining loader alone per number of workers.

A generated pretraining set (``--images`` images of 36 regions x 2048 features in an LMDB store, captions and
questions of 6..16 words, a third of the questions with an answer, a 9500-answer table) feeds
``lxmert-train pretrain``'s task through :func:`tasks.engine.trainer.train` at the full model size (9/5/5, hidden
768) and ``bench/model_step.py``'s batch. Rows:

- ``bare step``: ``bench/model_step.py --impls ours`` (random tensors already in memory, fused AdamW);
- ``trainer, W workers``: the whole ``train()`` loop with the same optimizer (``optim.name=adamw``), timed
  per step from its own ``metrics.jsonl`` (median of the steps after the warm-up): everything a run pays;
- ``trainer, bert_adam``: the same with the original BERT-Adam (the default optimizer; fused kernel);
- ``same process: bare step``: right after a trainer row, in its process and with its model, the bare step
  (forward, loss, backward, clipping, optimizer) on one batch already in memory: the ratio trainer / this row
  is the loop's overhead free of the noise between processes;
- ``loader, W workers``: the DataLoader alone (reading the store, tokenising, masking, collating).

The ratio trainer / bare step is the share of compute the loop keeps (goal on CPU: >= 0.9); the loader's
samples/s per worker say how many workers a GPU needs (its samples/s must exceed the bare step's). Each
measurement runs in its own process; the step rows alternate over ``--rounds`` and the best counts. Also the
optimizer step alone: BERT-Adam (fused and foreach) against torch's AdamW. Prints figures and ratios; never asserts
a time.

    python bench/train_loop.py                          # CPU, fp32, batch 32
    python bench/train_loop.py --device cuda --dtype bf16 --batch 64 --steps 20
    python bench/train_loop.py --small                  # a small model: seconds, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REGIONS = 36
FEATURE_DIM = 2048
ANSWERS = 9500
WORDS = (
    "a an the man woman dog cat red blue green sitting standing on in at near with two three small large "
    "table street car bus tree sky grass plate pizza person people white black yellow riding holding"
).split()


def generate_data(root: Path, images: int, items_per_image: int, seed: int = 0) -> dict[str, str]:
    """Write ``features.lmdb``, ``pretrain.json`` and ``answers.json`` under ``root``; return their paths."""
    from extract.store import FeatureWriter

    rng = np.random.default_rng(seed)
    ids = [f"COCO_train2014_{i:012d}" for i in range(images)]
    with FeatureWriter(root / "features.lmdb", extractor={"source": "bench", "file": "generated"}) as writer:
        for img_id in ids:
            xy = rng.uniform(0, 300, (REGIONS, 2))
            writer.put(
                img_id,
                {
                    "features": rng.gamma(0.5, 1.0, (REGIONS, FEATURE_DIM)).astype(np.float32),
                    "boxes": np.concatenate([xy, xy + rng.uniform(20, 200, (REGIONS, 2))], 1).astype(
                        np.float32
                    ),
                    "obj_ids": rng.integers(0, 1600, REGIONS),
                    "obj_conf": rng.uniform(0.2, 1, REGIONS).astype(np.float32),
                    "attr_ids": rng.integers(0, 400, REGIONS),
                    "attr_conf": rng.uniform(0.2, 1, REGIONS).astype(np.float32),
                    "img_h": 480,
                    "img_w": 640,
                },
            )
    answers = [f"answer{i}" for i in range(ANSWERS)]

    def sentence() -> str:
        return " ".join(rng.choice(WORDS, int(rng.integers(6, 17))))

    half = max(1, items_per_image // 2)
    data = []
    for img_id in ids:
        questions = [sentence() + "?" for _ in range(items_per_image - half)]
        labels = [
            {answers[int(rng.integers(ANSWERS))]: 1.0} if rng.random() < 1 / 3 else {} for _ in questions
        ]
        data.append(
            {
                "img_id": img_id,
                "sentf": {"mscoco": [sentence() for _ in range(half)], "vqa": questions},
                "labelf": {"vqa": labels},
            }
        )
    (root / "pretrain.json").write_text(json.dumps(data))
    (root / "answers.json").write_text(json.dumps(answers))
    return {
        "features": str(root / "features.lmdb"),
        "train": str(root / "pretrain.json"),
        "answers": str(root / "answers.json"),
    }


def make_config(args: argparse.Namespace, paths: dict[str, str], workers: int, optimizer: str):
    from common.config import load_config
    from tasks.config import TrainConfig

    sizes = (
        ["model.hidden_size=64", "model.num_attention_heads=2", "model.intermediate_size=128"]
        + ["model.l_layers=2", "model.r_layers=1", "model.x_layers=1"]
        if args.small
        else []
    )
    return load_config(
        TrainConfig,
        ROOT / "tasks" / "configs" / "pretrain_lxmert.yaml",
        [
            f"data.train=[{paths['train']}]",
            "data.valid=''",
            f"data.features=[{paths['features']}]",
            f"data.answers={paths['answers']}",
            f"data.batch_size={args.batch}",
            f"data.workers={workers}",
            f"train.device={args.device}",
            f"train.amp={'none' if args.dtype == 'fp32' else args.dtype}",
            "train.log_every=1",
            "train.save_every=0",
            "train.epochs=100",
            f"optim.name={optimizer}",
            *sizes,
        ],
    )


def run_trainer(args: argparse.Namespace, paths: dict[str, str], workers: int, optimizer: str) -> dict:
    """One ``train()`` run of warm-up + timed steps; samples/s from its metrics.jsonl (median per step). Then, in
    the same process with the same model, the bare step on one batch of the task already in memory (forward,
    loss, backward, clipping, the optimizer): the loop's overhead without the noise between processes."""
    import logging
    from contextlib import nullcontext

    from tasks import pretrain
    from tasks.engine.optim import build_optimizer
    from tasks.engine.trainer import resolve_amp, to_device, train

    logging.basicConfig(level=logging.WARNING)
    config = make_config(args, paths, workers, optimizer)
    task = pretrain.build(config)
    torch.manual_seed(config.train.seed)
    model = task.build_model(None)
    run_dir = Path(tempfile.mkdtemp(prefix="train_loop_"))
    try:
        t0 = time.perf_counter()
        train(config, task, run_dir, max_steps=args.warmup + args.steps, model=model)
        total = time.perf_counter() - t0
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    rates = sorted(r["samples_per_s"] for r in lines if r["split"] == "train" and r["step"] > args.warmup)

    device = torch.device(args.device)
    data = task.train_dataset()
    data.set_epoch(0)
    batch = to_device(task.collate([data[i] for i in range(args.batch)]), device)
    opt, _ = build_optimizer(model, config.optim, t_total=1000, device_type=device.type)
    amp = resolve_amp(config.train.amp, device)
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    times = []
    for _ in range(args.warmup + args.steps):
        t1 = time.perf_counter()
        with autocast:
            loss = task.step(model, batch, 0).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t1)
    bare = sorted(times[args.warmup :])[len(times[args.warmup :]) // 2]
    return {"samples_per_s": rates[len(rates) // 2], "bare_samples_per_s": args.batch / bare, "wall_s": total}


def run_loader(args: argparse.Namespace, paths: dict[str, str], workers: int) -> dict:
    """The trainer's DataLoader alone (same sampler, collate and batch), timed after its first batch."""
    from torch.utils.data import DataLoader

    from tasks import pretrain
    from tasks.engine.trainer import GlobalBatchSampler

    config = make_config(args, paths, workers, "adamw")
    task = pretrain.build(config)
    data = task.train_dataset()
    data.set_epoch(0)
    sampler = GlobalBatchSampler(len(data), args.batch, args.batch, 1, 0, 1, seed=0, epoch=0)
    loader = DataLoader(
        data, batch_size=args.batch, sampler=sampler, collate_fn=task.collate, num_workers=workers,
        pin_memory=args.device.startswith("cuda"),
    )  # fmt: skip
    batches = iter(loader)
    next(batches)
    n = min(args.loader_batches, len(sampler) // args.batch - 1)
    t0 = time.perf_counter()
    for _ in range(n):
        next(batches)
    return {"samples_per_s": n * args.batch / (time.perf_counter() - t0)}


def run_optimizers(args: argparse.Namespace) -> dict:
    """Milliseconds per optimizer step on the model's parameters (random gradients): BERT-Adam (multi-tensor)
    against torch's AdamW, fused and foreach."""
    from model import LxmertConfig, LxmertForPreTraining
    from tasks.engine.optim import BertAdam, FusedBertAdam

    sizes = dict(
        hidden_size=64, num_attention_heads=2, intermediate_size=128, l_layers=2, r_layers=1, x_layers=1
    )
    model = LxmertForPreTraining(LxmertConfig(**(sizes if args.small else {}))).to(args.device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    makers = {
        "bert_adam (fused)": lambda: FusedBertAdam(params, lr=1e-4),
        "bert_adam (foreach)": lambda: BertAdam(params, lr=1e-4),
        "torch AdamW fused": lambda: torch.optim.AdamW(params, lr=1e-4, eps=1e-6, fused=True),
        "torch AdamW foreach": lambda: torch.optim.AdamW(params, lr=1e-4, eps=1e-6, foreach=True),
    }
    out = {}
    for name, make in makers.items():
        opt = make()
        times = []
        for _ in range(args.steps + 1):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[name] = 1000 * sorted(times[1:])[len(times[1:]) // 2]
        del opt
    out["params"] = sum(p.numel() for p in params)
    return out


def run_bare_step(args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, str(ROOT / "bench" / "model_step.py"), "--impls", "ours", "--dtypes", args.dtype]
    cmd += ["--device", args.device, "--batch", str(args.batch), "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup), "--rounds", "1", "--no-flops"]
    if args.small:
        return None  # model_step only knows the full size
    with tempfile.TemporaryDirectory(prefix="train_loop_bare_") as tmp:
        cmd += ["--json", str(Path(tmp) / "step.json")]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy()).stdout
        result = Path(tmp) / "step.json"
        rows = json.loads(result.read_text())["rows"] if result.is_file() else []
    if not rows:
        print(f"bench/model_step.py failed:\n{out[-2000:]}")
        return None
    return {"samples_per_s": rows[0]["samples_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds of the step rows; the best counts"
    )
    parser.add_argument(
        "--trainer-workers", default="0,2", help="comma list of data.workers for trainer rows"
    )
    parser.add_argument("--loader-workers", default="0,1,2,4", help="comma list for the loader-alone rows")
    parser.add_argument("--loader-batches", type=int, default=10)
    parser.add_argument("--no-bert-adam", action="store_true", help="skip the BERT-Adam trainer row")
    parser.add_argument("--no-optimizers", action="store_true", help="skip the optimizer-step rows")
    parser.add_argument("--small", action="store_true", help="a small model (smoke run; no bare-step row)")
    parser.add_argument("--data", help="reuse a generated data directory")
    parser.add_argument("--json", help="also write the rows and ratios to this JSON file")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        paths = json.loads(args.worker[1])
        kind, rest = args.worker[0], args.worker[2:]
        if kind == "trainer":
            result = run_trainer(args, paths, int(rest[0]), rest[1])
        elif kind == "optimizers":
            result = run_optimizers(args)
        else:
            result = run_loader(args, paths, int(rest[0]))
        print("RESULT " + json.dumps(result), flush=True)
        return

    if args.device == "cpu":
        from common.cpu import cpu_autocast_warning

        if args.dtype != "fp32" and cpu_autocast_warning(
            getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[args.dtype])
        ):
            print(
                f"warning: {cpu_autocast_warning(torch.bfloat16 if args.dtype == 'bf16' else torch.float16)}"
            )
    print(
        f"train loop, device {args.device}, {args.dtype}, batch {args.batch}, threads {torch.get_num_threads()}, "
        f"{'small model' if args.small else 'full model 9/5/5 x 768'}"
        + (f", CPU capability {torch.backends.cpu.get_cpu_capability()}" if args.device == "cpu" else ""),
        flush=True,
    )
    tmp = None
    if args.data:
        root = Path(args.data)
        paths = {"features": str(root / "features.lmdb"), "train": str(root / "pretrain.json"),
                 "answers": str(root / "answers.json")}  # fmt: skip
    else:
        tmp = Path(tempfile.mkdtemp(prefix="train_loop_data_"))
        items_per_image = -(-args.batch * (args.warmup + args.steps + 1) // args.images) + 1
        paths = generate_data(tmp, args.images, max(4, items_per_image))
    rows: dict[str, float | None] = {}

    def record(name: str, value: float | None, round_index: int) -> None:
        # rounds alternate the rows, so that load from other processes hits them alike; the best counts
        best = rows.get(name)
        rows[name] = value if best is None or (value is not None and value > best) else best
        print(f"  round {round_index + 1}: {name}: {value if value is None else round(value, 3)}", flush=True)

    try:

        def worker(*spec: str) -> dict | None:
            cmd = [sys.executable, __file__, "--device", args.device, "--dtype", args.dtype]
            cmd += ["--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            cmd += ["--loader-batches", str(args.loader_batches)] + (["--small"] if args.small else [])
            cmd += ["--worker", spec[0], json.dumps(paths), *spec[1:]]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(f"{' '.join(spec)}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
                return None
            return json.loads(line[len("RESULT ") :])

        trainer_rows = [(w, "adamw") for w in [int(x) for x in args.trainer_workers.split(",") if x]]
        if not args.no_bert_adam:
            trainer_rows.append((trainer_rows[-1][0] if trainer_rows else 0, "bert_adam"))
        for round_index in range(args.rounds):
            bare = run_bare_step(args)
            record("bare step (bench/model_step.py)", bare["samples_per_s"] if bare else None, round_index)
            for w, optimizer in trainer_rows:
                r = worker("trainer", str(w), optimizer)
                record(f"trainer, {optimizer}, {w} workers", r["samples_per_s"] if r else None, round_index)
                name = f"  same process: bare step, {optimizer}"
                record(name, r["bare_samples_per_s"] if r else None, round_index)
        for w in [int(x) for x in args.loader_workers.split(",") if x]:
            r = worker("loader", str(w))
            record(f"loader alone, {w} workers", r["samples_per_s"] if r else None, 0)
        optimizers = worker("optimizers") if not args.no_optimizers else None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    base = rows.get("bare step (bench/model_step.py)")
    print()
    header = f"{'row':<36} {'samples/s':>10} {'x bare step':>12}"
    print(header)
    print("-" * len(header))
    for name, value in rows.items():
        shown = f"{value:>10.2f}" if value is not None else f"{'-':>10}"
        ratio = f"{value / base:>12.2f}" if value is not None and base else f"{'-':>12}"
        print(f"{name:<36} {shown} {ratio}")
    same_process = {}
    for name in [n for n in rows if n.startswith("  same process")]:
        trainer_name = next(n for n in rows if n.startswith("trainer, " + name.rsplit(", ", 1)[1]))
        if rows[name] and rows[trainer_name]:
            same_process[name.rsplit(", ", 1)[1]] = rows[trainer_name] / rows[name]
            print(f"trainer / bare step in the same process ({name.rsplit(', ', 1)[1]}): "
                  f"{rows[trainer_name] / rows[name]:.2f}")  # fmt: skip
    print(
        "(trainer rows: median per-step samples/s of the whole loop after the warm-up, from its metrics.jsonl,"
        "\n best of the rounds; bare step: bench/model_step.py's median, best of the rounds;"
        "\n loader rows: batches produced per second by the DataLoader alone; goal on CPU: trainer >= 0.9 x bare)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": args.device,
                    "dtype": args.dtype,
                    "batch": args.batch,
                    "rows": {name.strip(): value for name, value in rows.items()},
                    "bare_step": base,
                    "same_process_ratio": same_process,
                    "optimizer_ms": optimizers,
                },
                indent=1,
            )
        )
    if optimizers:
        print(f"\noptimizer step alone ({optimizers.pop('params') / 1e6:.1f} M parameters, median ms):")
        fused = optimizers.get("torch AdamW fused")
        for name, ms in optimizers.items():
            print(f"  {name:<22} {ms:>9.1f} ms" + (f"  ({ms / fused:.2f} x fused AdamW)" if fused else ""))


if __name__ == "__main__":
    main()
