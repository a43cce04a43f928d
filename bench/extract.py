"""Extraction throughput: the per-image loop of the reference scripts vs. the batched runner.

The per-image loop is how the reference extraction scripts run: decode + resize one image in the main
process, one detector forward for it, write its record, next image. The batched runner is
``extract.runner.run_extraction``: DataLoader workers decode and resize, batches of ``--batch-sizes`` images
per forward, a writer thread commits to LMDB. Both use the same detector (``--config``, random weights) and
default 600/1000 resizing, and write into a fresh store. Each measurement runs in a process of its own
(fresh allocator, honest peak memory). On CPU the runner keeps freed memory in the process
(``common.cpu.tune_cpu_allocator``, as ``extract-features`` does); the row ``per-image loop + malloc`` gives the
loop that same setting, so the table separates what the allocator buys from what batching does.

Prints a table of images/s, seconds per image, the speed-up over the loop at the same dtype, and peak memory
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: peak RSS of the measuring process, sampled). Never asserts
on time.

On CUDA all measurements of one dtype share a process (one detector, built once; the allocator's peak is reset
per measurement, so the peaks stay honest), and the table also says whether the runner's records at each batch
equal the per-image loop's (batch 1) records: object ids equal for every image, and the largest feature / box
difference relative to the largest value. A profile of one batch-1 pass and one batch-``max`` pass says where
the time goes (decode + resize, backbone, RPN, RoI pooling, res5 head, box predictor, the rest: selection,
NMS, copies to the host), each stage timed with the device synchronised around it.

    python bench/extract.py                                  # CPU: 4 synthetic COCO-sized images, fp32 + bf16
    python bench/extract.py --device cuda --n-images 64      # GPU: fp32 + fp16 + bf16
    python bench/extract.py --images /data/coco/val2014 --n-images 200 --batch-sizes 1,8,16
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
# first, also when PYTHONPATH names the checkout: run as a script, this file's folder comes first on the path and
# this file ("extract.py") would otherwise shadow the extract package
sys.path.insert(0, str(ROOT))

from common.cpu import cpu_autocast_warning, tune_cpu_allocator  # noqa: E402
from extract.config import default_workers  # noqa: E402
from extract.images import load_image  # noqa: E402
from extract.runner import (  # noqa: E402
    AMP_DTYPES,
    ExtractConfig,
    build_detector,
    collect_images,
    run_extraction,
)
from extract.store import FeatureStore, FeatureWriter  # noqa: E402

DTYPE_TO_AMP = {"fp32": "none", "fp16": "fp16", "bf16": "bf16"}
MODE_NAMES = {"loop": "per-image loop", "loop+malloc": "per-image loop + malloc", "runner": "batched runner"}
# (h, w) of typical COCO photos: 600x800 after resizing for most, some portrait, some other aspect ratios
COCO_SIZES = [(480, 640), (640, 480), (427, 640), (480, 640), (375, 500), (640, 427), (480, 640), (512, 640)]


@dataclass
class Row:
    mode: str
    batch: int
    dtype: str
    n: int
    seconds: float
    peak_mb: float

    @property
    def images_per_s(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("nan")


class PeakMemory:
    """Peak memory during a ``with`` block: CUDA allocator peak, or this process's RSS sampled every 20 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._proc = psutil.Process()
            self._stop = threading.Event()
            self.peak_bytes = self._proc.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()

    @property
    def mb(self) -> float:
        return self.peak_bytes / 2**20


def synthetic_images(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` JPEGs of COCO-like sizes with smooth random content (so JPEG decoding costs what photos cost)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = COCO_SIZES[i % len(COCO_SIZES)]
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        img.save(folder / f"bench_{i:05d}.jpg", quality=90)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_image_loop(
    detector, items, config: ExtractConfig, out: Path, device: torch.device
) -> tuple[float, float]:
    """The reference scripts' way: one image decoded, one forward, one record written, repeat."""
    with PeakMemory(device) as mem:
        writer = FeatureWriter(out, extractor={"bench": "loop"}, overwrite=True)
        start = time.perf_counter()
        for item in tqdm(items, desc=f"loop {config.amp}", unit="img", leave=False):
            loaded = load_image(item.path, config.min_size, config.max_size)
            image = loaded.image.to(device)
            (record,) = detector.extract(
                [image], [loaded.orig_size], config.selection, amp_dtype=config.amp_dtype
            )
            writer.put(item.img_id, record)
        writer.close()
        _sync(device)
        seconds = time.perf_counter() - start
    return seconds, mem.mb


def batched_runner(detector, items, config: ExtractConfig, device: torch.device) -> tuple[float, float]:
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        summary = run_extraction(config, items, detector=detector)
        _sync(device)
        seconds = time.perf_counter() - start
    if summary.failed or summary.done != len(items):
        raise RuntimeError(f"benchmark run incomplete: {summary.format(bold=False)}")
    return seconds, mem.mb


def _config(
    args: argparse.Namespace, device: torch.device, out: Path, dtype: str, batch: int
) -> ExtractConfig:
    return ExtractConfig(
        out=str(out),
        random_weights=True,
        config=args.config,
        min_size=args.min_size,
        max_size=args.max_size,
        device=str(device),
        workers=args.workers,
        progress=False,
        overwrite=True,
        amp=DTYPE_TO_AMP[dtype],
        batch_size=batch,
    )


def measure_all(args: argparse.Namespace, device: torch.device) -> None:
    """CUDA: every measurement of one dtype (``--worker all B1,B2,.. DTYPE``) in this process, one detector;
    prints a RESULT line per measurement and a PROFILE line. Stores are kept under ``--keep``."""
    dtype, batches = args.worker[2], [int(b) for b in args.worker[1].split(",")]
    items = collect_images(args.images)[: args.n_images]
    keep = Path(args.keep)
    detector = build_detector(_config(args, device, keep / "unused.lmdb", dtype, 1), device)
    amp_dtype = AMP_DTYPES[DTYPE_TO_AMP[dtype]]
    for batch in sorted(set(batches)):  # warm-up at every batch size (kernels chosen, memory mapped)
        warm = [load_image(it.path, args.min_size, args.max_size) for it in items[:batch]]
        cfg = _config(args, device, keep / "unused.lmdb", dtype, batch)
        detector.extract(
            [w.image.to(device) for w in warm], [w.orig_size for w in warm], cfg.selection, amp_dtype
        )
    _sync(device)
    out = keep / f"{dtype}_loop_1.lmdb"
    secs, mb = per_image_loop(detector, items, _config(args, device, out, dtype, 1), out, device)
    print(
        "RESULT " + json.dumps(Row(MODE_NAMES["loop"], 1, dtype, len(items), secs, mb).__dict__), flush=True
    )
    for batch in batches:
        out = keep / f"{dtype}_runner_{batch}.lmdb"
        secs, mb = batched_runner(detector, items, _config(args, device, out, dtype, batch), device)
        row = Row(MODE_NAMES["runner"], batch, dtype, len(items), secs, mb)
        print("RESULT " + json.dumps(row.__dict__), flush=True)
    profile = {
        f"batch {b}": profile_stages(detector, items, args, device, dtype, b) for b in (1, max(batches))
    }
    print("PROFILE " + json.dumps({"dtype": dtype, **profile}), flush=True)


def profile_stages(detector, items, args, device: torch.device, dtype: str, batch: int) -> dict[str, float]:
    """Milliseconds per image in each stage of ``detector.extract`` over ``items`` in batches of ``batch``
    (decode + resize in this process; each module timed with the device synchronised before and after)."""
    parts = {
        "backbone": detector.backbone,
        "rpn": detector.proposal_generator,
        "roi_pool": detector.roi_heads.pooler,
        "res5": detector.roi_heads.res5,
        "predictor": detector.roi_heads.box_predictor,
    }
    spent = {name: 0.0 for name in ["decode+resize", *parts, "rest"]}
    starts: dict[str, float] = {}
    handles = []
    for name, module in parts.items():

        def pre(_m, _i, name=name):
            _sync(device)
            starts[name] = time.perf_counter()

        def post(_m, _i, _o, name=name):
            _sync(device)
            spent[name] += time.perf_counter() - starts[name]

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    cfg = _config(args, device, Path("unused.lmdb"), dtype, batch)
    n = min(len(items), 4 * batch)
    total = 0.0
    try:
        for i in range(0, n, batch):
            t0 = time.perf_counter()
            loaded = [load_image(it.path, args.min_size, args.max_size) for it in items[i : i + batch]]
            t1 = time.perf_counter()
            spent["decode+resize"] += t1 - t0
            detector.extract(
                [x.image.to(device) for x in loaded],
                [x.orig_size for x in loaded],
                cfg.selection,
                cfg.amp_dtype,
            )
            _sync(device)
            total += time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    spent["rest"] = total - sum(spent.values())
    return {name: 1000 * value / n for name, value in spent.items()} | {"total": 1000 * total / n}


def compare_records(reference: Path, other: Path) -> dict[str, float]:
    """How far ``other``'s records are from ``reference``'s: share of images with equal object ids, largest
    feature / box difference relative to the largest reference value."""
    a, b = FeatureStore(reference), FeatureStore(other)
    try:
        ids = sorted(a.ids())
        same_ids, feat, box, fmax, bmax = 0, 0.0, 0.0, 1e-12, 1e-12
        for img_id in ids:
            ra, rb = a[img_id], b.get(img_id)
            if rb is None or len(ra["obj_ids"]) != len(rb["obj_ids"]):
                continue
            same_ids += int(np.array_equal(ra["obj_ids"], rb["obj_ids"]))
            feat = max(feat, float(np.abs(ra["features"] - rb["features"]).max(initial=0)))
            box = max(box, float(np.abs(ra["boxes"] - rb["boxes"]).max(initial=0)))
            fmax = max(fmax, float(np.abs(ra["features"]).max(initial=0)))
            bmax = max(bmax, float(np.abs(ra["boxes"]).max(initial=0)))
        return {"ids_equal": same_ids / max(1, len(ids)), "feature_rel": feat / fmax, "box_rel": box / bmax}
    finally:
        a.close()
        b.close()


def measure(args: argparse.Namespace, device: torch.device) -> Row:
    """One measurement (``--worker MODE BATCH DTYPE``), in a process of its own."""
    mode, batch, dtype = args.worker[0], int(args.worker[1]), args.worker[2]
    if args.threads:
        torch.set_num_threads(args.threads)
    if mode == "loop+malloc":
        tune_cpu_allocator()
    items = collect_images(args.images)[: args.n_images]
    amp = DTYPE_TO_AMP[dtype]
    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_run_"))
    try:
        cfg = _config(args, device, tmp / "out.lmdb", dtype, batch)
        detector = build_detector(cfg, device)
        # warm-up: one forward at the measured batch size (kernels picked, memory mapped), not timed
        warm = [load_image(it.path, args.min_size, args.max_size) for it in items[: max(1, batch)]]
        detector.extract(
            [w.image.to(device) for w in warm],
            [w.orig_size for w in warm],
            cfg.selection,
            amp_dtype=AMP_DTYPES[amp],
        )
        del warm
        _sync(device)
        if mode.startswith("loop"):
            secs, mb = per_image_loop(detector, items, cfg, tmp / "out.lmdb", device)
        else:
            secs, mb = batched_runner(detector, items, cfg, device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Row(MODE_NAMES[mode], batch, dtype, len(items), secs, mb)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument(
        "--n-images", type=int, default=None, help="images per measurement (default: 4 CPU, 64 CUDA)"
    )
    p.add_argument("--batch-sizes", default="1,4,8", help="comma-separated batch sizes of the runner")
    p.add_argument("--dtypes", default=None, help="fp32,bf16,fp16 subset (default: fp32,bf16 CPU; all CUDA)")
    p.add_argument("--config", default="vg_r101_c4", help="detector config (full R101 by default)")
    p.add_argument("--images", default=None, help="folder of images to use instead of synthetic ones")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="runner DataLoader workers (default: extract-features' default)",
    )
    p.add_argument("--min-size", type=int, default=600)
    p.add_argument("--max-size", type=int, default=1000)
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)"
    )
    p.add_argument("--json", help="also write the rows, record checks and profiles to this JSON file")
    p.add_argument(
        "--one-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="all measurements of a dtype in one process, records compared with the loop's (default: on CUDA)",
    )
    p.add_argument("--worker", nargs=3, metavar=("MODE", "BATCH", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--keep", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.worker and args.worker[0] == "all":
        measure_all(args, device)
        return 0
    if args.worker:
        row = measure(args, device)
        print("RESULT " + json.dumps(row.__dict__), flush=True)
        return 0

    n = args.n_images or (64 if device.type == "cuda" else 4)
    dtypes = (args.dtypes or ("fp32,fp16,bf16" if device.type == "cuda" else "fp32,bf16")).split(",")
    for d in dtypes:
        if d not in DTYPE_TO_AMP:
            p.error(f"unknown dtype {d!r}; choose from {', '.join(DTYPE_TO_AMP)}")
    if device.type == "cpu":
        for d in list(dtypes):
            slow = cpu_autocast_warning(AMP_DTYPES[DTYPE_TO_AMP[d]])
            if slow is not None and args.dtypes is None:
                print(f"{d} left out: {slow} (ask for it with --dtypes to time it anyway)")
                dtypes.remove(d)
            elif slow is not None:
                print(f"warning: {d}: {slow}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    workers = args.workers if args.workers is not None else default_workers()

    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        if args.images:
            folder = Path(args.images)
            n = len(collect_images(folder)[:n])
        else:
            folder = tmp / "images"
            synthetic_images(folder, n)
        threads = args.threads or torch.get_num_threads()
        print(
            f"extract bench: {n} images ({'given' if args.images else 'synthetic COCO-sized'}), config "
            f"{args.config}, random weights, {args.min_size}/{args.max_size} resize, device {device}"
            + (
                f" ({torch.cuda.get_device_name(device)})"
                if device.type == "cuda"
                else f", {threads} torch threads"
            )
            + f", runner workers {workers}; one process per measurement",
            flush=True,
        )
        one_process = device.type == "cuda" if args.one_process is None else args.one_process
        loops = ["loop", "loop+malloc"] if device.type == "cpu" else ["loop"]
        if one_process:
            plan = [("all", ",".join(map(str, batch_sizes)), d) for d in dtypes]
        else:
            plan = [(mode, 1, d) for d in dtypes for mode in loops]
            plan += [("runner", b, d) for d in dtypes for b in batch_sizes]
            plan.sort(key=lambda x: dtypes.index(x[2]))
        rows: list[Row] = []
        profiles: list[dict] = []
        failures: list[str] = []
        for mode, batch, dtype in plan:
            cmd = [sys.executable, __file__, "--worker", mode, str(batch), dtype, "--device", str(device)]
            cmd += ["--images", str(folder), "--n-images", str(n), "--config", args.config]
            cmd += ["--min-size", str(args.min_size), "--max-size", str(args.max_size)]
            cmd += ["--workers", str(workers), "--threads", str(threads), "--keep", str(tmp)]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            lines = proc.stdout.splitlines()
            results = [x for x in lines if x.startswith("RESULT ")]
            profiles += [json.loads(x[len("PROFILE ") :]) for x in lines if x.startswith("PROFILE ")]
            if proc.returncode != 0 or not results:
                print(
                    f"  {mode} batch {batch} {dtype}: failed (exit {proc.returncode})\n{proc.stdout[-2000:]}"
                )
                failures.append(f"{mode} batch {batch} {dtype}: exit {proc.returncode}")
            for line in results:
                row = Row(**json.loads(line[len("RESULT ") :]))
                rows.append(row)
                print(f"  {dtype} {row.mode} batch {row.batch}: {row.images_per_s:.3f} images/s", flush=True)
        checks = {}
        if one_process:
            for r in rows:
                ref = tmp / f"{r.dtype}_loop_1.lmdb"
                out = tmp / f"{r.dtype}_runner_{r.batch}.lmdb"
                if r.mode == MODE_NAMES["runner"] and ref.exists() and out.exists():
                    checks[(r.dtype, r.batch)] = compare_records(ref, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    loop_speed = {r.dtype: r.images_per_s for r in rows if r.mode == MODE_NAMES["loop"]}
    mem_label = "peak GPU MiB" if device.type == "cuda" else "peak RSS MiB"
    print()
    print(f"| mode                    | batch | dtype | images/s | s/image | vs loop | {mem_label} |")
    print("|-------------------------|------:|-------|---------:|--------:|--------:|-------------:|")
    for r in rows:
        ratio = r.images_per_s / loop_speed[r.dtype] if r.dtype in loop_speed else float("nan")
        print(
            f"| {r.mode:<23} | {r.batch:>5} | {r.dtype:<5} | {r.images_per_s:>8.3f} | {1 / r.images_per_s:>7.2f} "
            f"| {ratio:>6.2f}x | {r.peak_mb:>12.0f} |"
        )
    runs = [r for r in rows if r.mode == MODE_NAMES["runner"] and r.dtype in loop_speed]
    if runs:
        best = max(runs, key=lambda r: r.images_per_s / loop_speed[r.dtype])
        goal = 2.0 if device.type == "cuda" else 1.0
        print(
            f"\nbest runner / loop ratio: {best.images_per_s / loop_speed[best.dtype]:.2f}x (batch {best.batch}, "
            f"{best.dtype}); goal on {device.type}: >= {goal:.0f}x"
        )
    if checks:
        print("\nbatch-N records against the per-image loop's (batch 1), same dtype:")
        print("| dtype | batch | object ids equal | max feature diff (rel) | max box diff (rel) |")
        print("|-------|------:|-----------------:|-----------------------:|-------------------:|")
        for (dtype, batch), c in checks.items():
            print(
                f"| {dtype:<5} | {batch:>5} | {100 * c['ids_equal']:>15.1f}% | {c['feature_rel']:>22.2e} "
                f"| {c['box_rel']:>18.2e} |"
            )
    for prof in profiles:
        for setting, stages in prof.items():
            if setting == "dtype":
                continue
            shown = ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
            print(f"where time goes, {prof['dtype']} {setting} (ms per image): {shown}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "n_images": n,
                    "config": args.config,
                    "rows": [r.__dict__ | {"images_per_s": r.images_per_s} for r in rows],
                    "loop_images_per_s": loop_speed,
                    "checks": [{"dtype": d, "batch": b, **c} for (d, b), c in checks.items()],
                    "profiles": profiles,
                    "failures": failures,
                },
                indent=1,
            )
        )
    if device.type == "cpu":
        print(
            "(on CPU the runner keeps freed memory in the process (common.cpu.tune_cpu_allocator, after forking its"
            "\n loader workers); 'per-image loop + malloc' is the loop with that same setting)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
