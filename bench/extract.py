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
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
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
from extract.store import FeatureWriter  # noqa: E402

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
        cfg = ExtractConfig(
            out=str(tmp / "out.lmdb"),
            random_weights=True,
            config=args.config,
            min_size=args.min_size,
            max_size=args.max_size,
            device=str(device),
            workers=args.workers,
            progress=False,
            overwrite=True,
            amp=amp,
            batch_size=batch,
        )
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
    p.add_argument("--worker", nargs=3, metavar=("MODE", "BATCH", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
        loops = ["loop", "loop+malloc"] if device.type == "cpu" else ["loop"]
        plan = [(mode, 1, d) for d in dtypes for mode in loops]
        plan += [("runner", b, d) for d in dtypes for b in batch_sizes]
        plan.sort(key=lambda x: dtypes.index(x[2]))
        rows: list[Row] = []
        for mode, batch, dtype in plan:
            cmd = [sys.executable, __file__, "--worker", mode, str(batch), dtype, "--device", str(device)]
            cmd += ["--images", str(folder), "--n-images", str(n), "--config", args.config]
            cmd += ["--min-size", str(args.min_size), "--max-size", str(args.max_size)]
            cmd += ["--workers", str(workers), "--threads", str(threads)]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(
                    f"  {mode} batch {batch} {dtype}: failed (exit {proc.returncode})\n{proc.stdout[-2000:]}"
                )
                continue
            row = Row(**json.loads(line[len("RESULT ") :]))
            rows.append(row)
            print(f"  {dtype} {row.mode} batch {batch}: {row.images_per_s:.3f} images/s", flush=True)
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
    if device.type == "cpu":
        print(
            "(on CPU the runner keeps freed memory in the process (common.cpu.tune_cpu_allocator, after forking its"
            "\n loader workers); 'per-image loop + malloc' is the loop with that same setting)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
