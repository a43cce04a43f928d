"""Benchmark: one full LXMERT pretraining step (forward, backward, grad clip, AdamW) for ours vs Hugging Face.

Full-size model (9/5/5, hidden 768, 9500 QA answers), batch 32, 20 tokens, 36 regions, realistic label
masks (15% MLM tokens of real length 8..20, 15% masked regions, obj/attr weights on all regions, half the
pairs matched, a third with a QA answer). Each (model, dtype) runs in its own subprocess so the peak RSS is
honest; rounds alternate the models (other processes on the machine hit both alike) and the best counts; on CUDA ``torch.cuda.max_memory_allocated`` is reported instead. Prints samples/s, the ratio
ours / HF per dtype, peak memory and achieved GFLOP/s (HF's counted FLOPs per sample x samples/s, the useful
work) against the measured matmul peak of the machine. Never asserts on time.

``--graph`` (CUDA) adds ``ours+graph``: the whole step (forward, backward, clipping, fused AdamW with
``capturable=True``) captured once in a CUDA graph and replayed, which removes the per-kernel launch cost that
dominates a step of this size at batch 32; the model takes its fixed-shape path there
(:func:`model.execution.static_shapes`: MLM logits at every token, so slightly more arithmetic).
``--batches 32,max``: ``max`` is the largest multiple of 32 whose step fits in the free GPU memory, estimated
per dtype from batch 32's peak and resident memory (the smaller over the models, so both run the same batch).

On CPU, ours runs with ``model.tune_cpu_allocator()`` (freed memory stays in the process instead of being
page-faulted in again every step; the recommended first line of a CPU training script), and a third row,
``hf+malloc``, gives Hugging Face the same setting, so the table separates what the allocator buys from
what the model does. ``x HF`` is always against stock ``hf``.

    python bench/model_step.py                     # CPU, fp32 and bf16 autocast, 2 rounds x (2 warm-up + 3 steps)
    python bench/model_step.py --device cuda --steps 20 --warmup 5
    python bench/model_step.py --compile           # also time torch.compile'd ours
    python bench/model_step.py --device cuda --graph --batches 32,max   # + ours as one CUDA graph; + the
                                                   # largest batch that fits (estimated from batch 32's memory)
    python bench/model_step.py --task vqa          # a VQA fine-tuning step (LxmertForQuestionAnswering) instead
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DTYPES = "fp32,bf16"
SIZES = dict(l_layers=9, x_layers=5, r_layers=5, hidden_size=768, num_qa_labels=9500)
VQA_ANSWERS = 3129


def make_batch(
    batch: int, tokens: int, regions: int, device: str, seed: int = 0, task: str = "pretrain"
) -> dict:
    """Random inputs and labels (same for every model): pretraining labels with LXMERT's masking rates, or
    for ``task="vqa"`` question-length sentences (6..14 tokens with [CLS] / [SEP]) and answer indices."""
    g = torch.Generator().manual_seed(seed)
    if task == "vqa":
        lengths = torch.randint(6, min(14, tokens) + 1, (batch,), generator=g)
        attention_mask = (torch.arange(tokens)[None] < lengths[:, None]).long()
        input_ids = torch.randint(1000, 30522, (batch, tokens), generator=g) * attention_mask
        input_ids[:, 0] = 101
        input_ids[torch.arange(batch), lengths - 1] = 102
        out = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            visual_feats=torch.rand(batch, regions, 2048, generator=g) * 2,
            visual_pos=torch.rand(batch, regions, 4, generator=g),
            labels=torch.randint(0, VQA_ANSWERS, (batch,), generator=g),
        )
        return {k: v.to(device) for k, v in out.items()}
    lengths = torch.randint(8, tokens + 1, (batch,), generator=g)
    attention_mask = (torch.arange(tokens)[None] < lengths[:, None]).long()
    input_ids = torch.randint(1000, 30522, (batch, tokens), generator=g) * attention_mask
    input_ids[:, 0] = 101
    input_ids[torch.arange(batch), lengths - 1] = 102
    maskable = attention_mask.bool() & (input_ids != 101) & (input_ids != 102)
    mlm = maskable & (torch.rand(batch, tokens, generator=g) < 0.15)
    mlm[torch.arange(batch), 1] |= ~mlm.any(1)  # at least one per sentence
    labels = torch.where(mlm, input_ids, torch.full_like(input_ids, -100))
    input_ids = torch.where(mlm, torch.full_like(input_ids, 103), input_ids)
    feats = torch.rand(batch, regions, 2048, generator=g) * 2
    boxes = torch.rand(batch, regions, 4, generator=g)
    region_mask = (torch.rand(batch, regions, generator=g) < 0.15).float()
    obj_labels = {
        "obj": (
            torch.randint(0, 1600, (batch, regions), generator=g),
            torch.rand(batch, regions, generator=g),
        ),
        "attr": (
            torch.randint(0, 400, (batch, regions), generator=g),
            torch.rand(batch, regions, generator=g),
        ),
        "feat": (feats.clone(), region_mask),
    }
    feats = feats * (1 - region_mask[..., None])
    matched = (torch.rand(batch, generator=g) < 0.5).long()
    ans = torch.randint(0, 9500, (batch,), generator=g)
    ans = torch.where(
        matched.bool() & (torch.rand(batch, generator=g) < 0.67), ans, torch.full_like(ans, -100)
    )
    out = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        visual_feats=feats,
        visual_pos=boxes,
        labels=labels,
        matched_label=matched,
        ans=ans,
        obj_labels=obj_labels,
    )

    def move(x):
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        if isinstance(x, tuple):
            return tuple(move(v) for v in x)
        return x.to(device)

    return move(out)


def build(impl: str, device: str, compile_model: bool, task: str = "pretrain", graph: bool = False):
    torch.manual_seed(0)
    sizes = SIZES if task == "pretrain" else {**SIZES, "num_qa_labels": VQA_ANSWERS}
    name = "LxmertForPreTraining" if task == "pretrain" else "LxmertForQuestionAnswering"
    # on a GPU the weights are initialised there (seconds less per worker; the same for both models)
    where = torch.device(device) if device.startswith("cuda") else nullcontext()
    if impl.startswith("hf"):
        import transformers

        with where:
            model = getattr(transformers, name)(transformers.LxmertConfig(**sizes))
        opt_kwargs = {}
    else:
        import model as ours

        with where:
            model = getattr(ours, name)(ours.LxmertConfig(**sizes))
        opt_kwargs = {"fused": True, "capturable": graph}
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, eps=1e-6, **opt_kwargs)
    if compile_model:
        model = torch.compile(model)
    return model, optimizer


def worker(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    device = args.device
    if device == "cpu" and args.impl in ("ours", "hf+malloc"):
        # What lxmert-train does on CPU (common/cpu.py); "hf+malloc" gives Hugging Face the same setting.
        from common.cpu import tune_cpu_allocator

        tune_cpu_allocator()
    model, optimizer = build(args.impl, device, args.compile, args.task, args.graph)
    batch = make_batch(args.batch, args.tokens, args.regions, device, task=args.task)
    if args.impl.startswith("ours") and args.task == "pretrain":
        # What our pretraining passes (tasks/pretrain/task.py): MLM logits at the labelled tokens only.
        batch = {**batch, "mlm_logits_at_labels_only": True}
    autocast = (
        # a captured graph replays its casts: autocast's weight-cast cache must stay off there
        torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, cache_enabled=not args.graph)
        if args.dtype == "bf16"
        else nullcontext()
    )
    params = list(model.parameters())

    def body() -> torch.Tensor:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        return loss

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        return body().item()

    if args.graph:
        # warm-up on a side stream, then capture one whole step; the captured backward allocates the gradients
        # (zeroed to None first) and every replay overwrites them in place
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = body()

        def step() -> float:  # noqa: F811 (the graphed step replaces the eager one)
            graph.replay()
            return static_loss.item()

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    flops = None
    if args.count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops = counter.get_total_flops() / args.batch
    for _ in tqdm(range(args.warmup), desc=f"{args.impl} {args.dtype} warm-up", file=sys.stderr):
        step()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync()
    times = []
    losses = []
    for _ in tqdm(range(args.steps), desc=f"{args.impl} {args.dtype} timed", file=sys.stderr):
        t0 = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    resident = None
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
        peak_kind = "cuda_max_allocated"
        resident = torch.cuda.memory_allocated() / 2**30  # weights, gradients, optimizer state, the batch
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        peak_kind = "peak_rss"
    print(
        "RESULT "
        + json.dumps(
            {
                "impl": args.impl + ("+graph" if args.graph else ""),
                "dtype": args.dtype,
                "batch": args.batch,
                "resident_gib": resident,
                "samples_per_s": args.batch / median,
                "step_s": median,
                "peak_gib": peak,
                "peak_kind": peak_kind,
                "flops_per_sample": flops,
                "loss": losses[-1],
            }
        ),
        flush=True,
    )


def matmul_peak(device: str, dtype: torch.dtype, n: int) -> float:
    """Measured GFLOP/s of an n x n x n matmul (best of a few)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def estimate_max_batch(results: list[dict], free_gib: float, multiple: int = 32) -> int | None:
    """The largest multiple of ``multiple`` whose step fits ``free_gib``, from batch rows of one dtype:
    per model, resident (weights, gradients, optimizer state) + batch x (peak - resident) / batch; the smallest
    over the models. None without CUDA memory figures."""
    fits = []
    for r in results:
        if r.get("resident_gib") is None or r["batch"] <= 0:
            continue
        per_sample = max(r["peak_gib"] - r["resident_gib"], 1e-6) / r["batch"]
        # batch 32's peak underestimates a big batch's per-sample memory (seen on an H200: 21 MB estimated,
        # 39 MB measured at batch 3392, fp32), so only half the free memory is planned for
        fits.append((0.5 * free_gib - r["resident_gib"]) / per_sample)
    if not fits:
        return None
    return max(multiple, int(min(fits)) // multiple * multiple)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--task",
        choices=("pretrain", "vqa"),
        default="pretrain",
        help="pretrain: LxmertForPreTraining, all losses; vqa: LxmertForQuestionAnswering (3129 answers, "
        "questions of 6..14 tokens)",
    )
    parser.add_argument("--batch", type=int, default=32, help="the batch (or use --batches)")
    parser.add_argument(
        "--batches",
        default=None,
        help="comma list of batches; 'max': the largest that fits (CUDA; estimated from the first batch's memory)",
    )
    parser.add_argument("--big-steps", type=int, default=3, help="timed steps at batches above the first")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best counts")
    parser.add_argument("--dtypes", default=DEFAULT_DTYPES, help="on CPU, bf16 only where it is native")
    parser.add_argument(
        "--impls",
        default=None,
        help="comma list of hf, hf+malloc, ours (default: all three on CPU, hf,ours on CUDA)",
    )
    parser.add_argument("--compile", action="store_true", help="also run torch.compile'd ours")
    parser.add_argument(
        "--graph",
        action="store_true",
        help="CUDA: also run ours as one captured CUDA graph (first batch only)",
    )
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting step")
    parser.add_argument("--json", help="also write the results (rows, peaks) to this JSON file")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.impl, args.dtype = args.worker
        args.compile = args.impl == "ours+compile"
        args.graph = args.impl == "ours+graph"
        args.impl = "ours" if args.compile or args.graph else args.impl
        args.count_flops = not args.no_flops
        worker(args)
        return

    cuda = args.device.startswith("cuda")
    if args.graph and not cuda:
        parser.error("--graph needs --device cuda")
    if args.impls is None:
        args.impls = "hf,hf+malloc,ours" if args.device == "cpu" else "hf,ours"
    impls = args.impls.split(",") + (["ours+compile"] if args.compile else [])
    graph_impls = ["ours+graph"] if args.graph else []
    dtypes = args.dtypes.split(",")
    batches = (args.batches or str(args.batch)).split(",")
    if batches[0] == "max" or ("max" in batches and not cuda):
        parser.error("--batches: 'max' needs CUDA and a numeric first batch to estimate from (e.g. 32,max)")
    print(
        f"{args.task} step, device {args.device}"
        + (f" ({torch.cuda.get_device_name(args.device)})" if cuda else "")
        + f", torch {torch.__version__}"
        + (f" (CUDA {torch.version.cuda})" if cuda else "")
        + f", threads {torch.get_num_threads()}, batches {','.join(batches)}, {args.tokens} tokens, "
        f"{args.regions} regions"
        + (f", CPU capability {torch.backends.cpu.get_cpu_capability()}" if args.device == "cpu" else "")
    )
    if args.device == "cpu" and "bf16" in dtypes:
        from common.cpu import cpu_autocast_warning

        slow = cpu_autocast_warning(torch.bfloat16)
        if slow is not None and args.dtypes == DEFAULT_DTYPES:
            print(f"bf16 left out: {slow} (ask for it with --dtypes bf16 to time it anyway)")
            dtypes.remove("bf16")
        elif slow is not None:
            print(f"warning: {slow}")
    n = 8192 if cuda else 2048
    peaks = {"fp32": matmul_peak(args.device, torch.float32, n), "bf16": float("nan")}
    if "bf16" in dtypes or cuda:
        peaks["bf16"] = matmul_peak(args.device, torch.bfloat16, n)
    print(
        f"matmul peak ({n}^3): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s", flush=True
    )
    free_gib = None
    if cuda:
        torch.cuda.empty_cache()
        free_gib = torch.cuda.mem_get_info(args.device)[0] / 2**30

    results: dict[tuple[str, str, int], dict] = {}
    failures: list[str] = []

    def run_worker(impl: str, dtype: str, batch: int, round_index: int, first: bool) -> dict | None:
        steps = args.steps if first else args.big_steps
        warmup = args.warmup if first else 1
        cmd = [sys.executable, __file__, "--worker", impl, dtype, "--device", args.device]
        cmd += ["--steps", str(steps), "--warmup", str(warmup), "--batch", str(batch)]
        cmd += ["--tokens", str(args.tokens), "--regions", str(args.regions), "--task", args.task]
        if args.no_flops or impl != "hf" or round_index > 0 or not first:
            cmd.append("--no-flops")
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(
                f"{impl} {dtype} batch {batch}: worker failed (exit {proc.returncode})\n{proc.stdout[-2000:]}"
            )
            failures.append(f"{impl} {dtype} batch {batch}: exit {proc.returncode}")
            return None
        r = json.loads(line[len("RESULT ") :])
        print(
            f"  round {round_index + 1}: {r['impl']:>13} {dtype} batch {batch}: {r['samples_per_s']:.2f} samples/s, "
            f"peak {r['peak_gib']:.2f} GiB",
            flush=True,
        )
        best = results.get((r["impl"], dtype, batch))
        if best is None:
            results[(r["impl"], dtype, batch)] = r
        else:
            r["flops_per_sample"] = r["flops_per_sample"] or best["flops_per_sample"]
            r["peak_gib"] = min(r["peak_gib"], best["peak_gib"])
            if r["samples_per_s"] > best["samples_per_s"]:
                results[(r["impl"], dtype, batch)] = r
            else:
                best["peak_gib"] = r["peak_gib"]
        return r

    resolved: dict[str, list[int]] = {d: [] for d in dtypes}
    for dtype in dtypes:
        for bi, spec in enumerate(batches):
            first = bi == 0
            if spec == "max":
                rows = [r for (i, d, b), r in results.items() if d == dtype and b == resolved[dtype][0]]
                rows = [r for r in rows if not r["impl"].endswith("+graph")]
                batch = estimate_max_batch(rows, free_gib or 0.0)
                if batch is None:
                    print(
                        f"{dtype}: no batch-{resolved[dtype][0]} memory figures to size 'max' from; skipped"
                    )
                    continue
                print(f"{dtype}: largest batch estimated to fit {free_gib:.0f} GiB free: {batch}", flush=True)
            else:
                batch = int(spec)
            resolved[dtype].append(batch)
            for round_index in range(args.rounds if first else 1):
                # Rounds alternate the models so that load from other processes hits both alike; the best counts.
                for impl in impls + (graph_impls if first else []):
                    r = run_worker(impl, dtype, batch, round_index, first)
                    if r is None and spec == "max":
                        smaller = batch * 3 // 4 // 32 * 32
                        print(f"  retrying {impl} {dtype} at batch {smaller}", flush=True)
                        r = run_worker(impl, dtype, smaller, round_index, first)
                        if r is not None:
                            # keep the row under the 'max' batch for the table, with the batch it really ran
                            results[(r["impl"], dtype, batch)] = results.pop((r["impl"], dtype, smaller))

    hf_flops = next((r["flops_per_sample"] for r in results.values() if r.get("flops_per_sample")), None)
    print()
    if hf_flops:
        print(
            f"HF step: {hf_flops / 1e9:.1f} GFLOP per sample (forward + backward, torch.utils.flop_counter)"
        )
    header = (
        f"{'model':>13} {'dtype':>5} {'batch':>6} {'samples/s':>10} {'x HF':>6} {'peak GiB':>9} {'TFLOP/s':>8} "
        f"{'% peak':>7} {'% bf16 peak':>11}"
    )
    print(header)
    print("-" * len(header))
    rows_out = []
    for dtype in dtypes:
        for batch in resolved[dtype]:
            base = results.get(("hf", dtype, batch))
            for impl in impls + graph_impls:
                r = results.get((impl, dtype, batch))
                if r is None:
                    continue
                ratio = r["samples_per_s"] / base["samples_per_s"] if base else None
                tflops = hf_flops * r["samples_per_s"] / 1e12 if hf_flops else float("nan")
                pct = 100 * tflops * 1e3 / peaks[dtype]
                pct_bf16 = 100 * tflops * 1e3 / peaks["bf16"]
                print(
                    f"{impl:>13} {dtype:>5} {r['batch']:>6} {r['samples_per_s']:>10.2f} "
                    f"{(f'{ratio:.2f}' if ratio else '-'):>6} {r['peak_gib']:>9.2f} {tflops:>8.2f} {pct:>6.0f}% "
                    f"{pct_bf16:>10.1f}%"
                )
                rows_out.append(
                    {**r, "impl": impl, "x_hf": ratio, "tflops": tflops, "pct_bf16_peak": pct_bf16}
                )
    kind = next((r["peak_kind"] for r in results.values()), "peak_rss")
    print(f"(peak = {kind}; TFLOP/s = HF's FLOPs per sample x samples/s, i.e. useful work per second;")
    print(" % peak: of the measured matmul peak of the row's dtype; % bf16 peak: of the measured bf16 one)")
    if "hf+malloc" in impls:
        print(
            "(ours runs with model.tune_cpu_allocator(): freed memory stays in the process; hf+malloc is"
            "\n Hugging Face with that same setting; x HF is against stock hf)"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": torch.cuda.get_device_name(args.device) if cuda else "cpu",
                    "torch": torch.__version__,
                    "cuda": torch.version.cuda,
                    "matmul_peak_gflops": peaks,
                    "hf_flops_per_sample": hf_flops,
                    "rows": rows_out,
                    "failures": failures,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
