"""Feature-store benchmark: LMDB reader vs. an in-memory TSV loader written the way the original LXMERT loads.

For N synthetic images (36 regions x 2048-d float32 each, default N=2000) and a smaller N (default 500) it writes
an obj36 TSV, imports it into an LMDB store (`extract.tsv.import_tsv`), then measures, each side in its OWN
subprocess (so peak RSS is honest):

* time to the first batch of a torch DataLoader (batch 32), from nothing loaded;
* peak RSS (ru_maxrss, includes file pages mapped from the LMDB file) and peak private/anonymous RSS
  (psutil rss - shared, sampled after every batch) over one full epoch;
* epoch throughput and random-access records/s (single process).

The TSV side reads the whole file with csv.DictReader and decodes every base64 field into a list of dicts
of numpy arrays before the first batch, as LXMERT's loader does. Usage:

    python bench/store.py [--n 2000] [--small-n 500] [--workers 0] [--dir /tmp/store_bench] [--keep]

Prints a table and ratios; never asserts on time. With --workers > 0 the memory columns sum the processes,
so pages a worker shares copy-on-write with its parent are counted once per process.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# `bench/` holds scripts named like the packages (bench/extract.py): import the project's packages, not them
_HERE, _ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

NUM_BOXES = 36
DIM = 2048
from extract.tsv import TSV_FIELDS  # noqa: E402  (after the sys.path fix above)


# ------------------------------------------------------------------------------------------------ data
def write_tsv(path: Path, n: int, seed: int = 0) -> None:
    """N synthetic images in LXMERT's obj36 TSV format."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)

    def b64(arr: np.ndarray) -> str:
        return base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode()

    with open(path, "w") as fh:
        for i in tqdm(range(n), desc=f"write {path.name}", unit="img", leave=False):
            h, w = 480, 640
            x1 = rng.uniform(0, w / 2, NUM_BOXES).astype(np.float32)
            y1 = rng.uniform(0, h / 2, NUM_BOXES).astype(np.float32)
            boxes = np.stack([x1, y1, x1 + w / 4, y1 + h / 4], 1).astype(np.float32)
            fields = [
                f"img{i:07d}",
                str(h),
                str(w),
                b64(rng.integers(0, 1600, NUM_BOXES)),
                b64(rng.random(NUM_BOXES, dtype=np.float32)),
                b64(rng.integers(0, 400, NUM_BOXES)),
                b64(rng.random(NUM_BOXES, dtype=np.float32)),
                str(NUM_BOXES),
                b64(boxes),
                b64(rng.random((NUM_BOXES, DIM), dtype=np.float32)),
            ]
            fh.write("\t".join(fields) + "\n")


# ------------------------------------------------------------------------------------------------ memory
def _mem_sample() -> tuple[int, int]:
    """(rss, private rss = rss - shared file/shmem pages) of this process and its children, bytes."""
    import psutil

    me = psutil.Process()
    rss = anon = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            info = p.memory_info()
        except psutil.Error:
            continue
        rss += info.rss
        anon += info.rss - getattr(info, "shared", 0)
    return rss, anon


def _reset_peak() -> bool:
    """Reset this process's peak-RSS mark (Linux: VmHWM via /proc/self/clear_refs); False when impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """Peak RSS of this process since :func:`_reset_peak` (VmHWM), or ru_maxrss where /proc is missing.

    ru_maxrss alone would be misleading here: Linux carries it across exec, so a child started by a big
    parent starts with the parent's peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------------ children
def child(kind: str, path: str, n: int, batch: int, workers: int, random_reads: int) -> dict:
    import torch

    from extract.store import FeatureStore

    # torch.stack with several threads is pathologically slow on small VMs: one thread, for both sides
    torch.set_num_threads(1)
    warm = [{"features": torch.zeros(NUM_BOXES, DIM), "boxes": torch.zeros(NUM_BOXES, 4)}] * batch
    for _ in torch.utils.data.DataLoader(warm, batch_size=batch):  # load torch's lazy parts before measuring
        pass
    base_rss, base_anon = _mem_sample()  # interpreter + torch + numpy, before any data
    _reset_peak()
    base_peak = _peak_rss_bytes()
    t0 = time.perf_counter()
    if kind == "lmdb":
        store = FeatureStore(path, normalize_boxes=True)
        ids = list(store)[:n]

        def get(i: int) -> dict:
            rec = store[ids[i]]
            return {"features": torch.from_numpy(rec["features"]), "boxes": torch.from_numpy(rec["boxes"])}

    else:  # the original LXMERT way: whole TSV -> list of dicts of decoded arrays, in RAM
        csv.field_size_limit(sys.maxsize)
        data = []
        with open(path) as fh:
            for i, item in enumerate(csv.DictReader(fh, TSV_FIELDS, delimiter="\t")):
                if i >= n:
                    break
                for key in ("img_h", "img_w", "num_boxes"):
                    item[key] = int(item[key])
                boxes = item["num_boxes"]
                decode = [
                    ("objects_id", (boxes,), np.int64),
                    ("objects_conf", (boxes,), np.float32),
                    ("attrs_id", (boxes,), np.int64),
                    ("attrs_conf", (boxes,), np.float32),
                    ("boxes", (boxes, 4), np.float32),
                    ("features", (boxes, -1), np.float32),
                ]
                for key, shape, dtype in decode:
                    item[key] = np.frombuffer(base64.b64decode(item[key]), dtype=dtype).reshape(shape)
                    item[key].setflags(write=False)
                data.append(item)

        def get(i: int) -> dict:
            item = data[i]
            scale = np.array([item["img_w"], item["img_h"]] * 2, dtype=np.float32)
            boxes = np.clip(item["boxes"] / scale, 0, 1)
            return {"features": torch.from_numpy(item["features"].copy()), "boxes": torch.from_numpy(boxes)}

    class DS(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> dict:
            return get(i)

    loader = torch.utils.data.DataLoader(
        DS(),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        multiprocessing_context="fork" if workers else None,
    )
    first_batch_s = None
    peak_rss, peak_anon = _mem_sample()
    seen = 0
    t_epoch = time.perf_counter()
    for b in loader:
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - t0
            t_epoch = time.perf_counter()
        seen += b["features"].shape[0]
        rss, anon = _mem_sample()
        peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
    epoch_s = time.perf_counter() - t_epoch
    del loader

    order = [random.randrange(n) for _ in range(random_reads)]
    t1 = time.perf_counter()
    for i in order:
        get(i)
    random_rps = random_reads / (time.perf_counter() - t1)
    return {
        "kind": kind,
        "n": n,
        "seen": seen,
        "first_batch_s": first_batch_s,
        "epoch_rps": max(seen - batch, 1) / max(epoch_s, 1e-9),
        "random_rps": random_rps,
        "peak_rss": max(peak_rss, _peak_rss_bytes()),
        "rss_growth": max(_peak_rss_bytes() - base_peak, peak_rss - base_rss),
        "peak_private": peak_anon,
        "base_rss": base_rss,
        "base_private": base_anon,
    }


def run_child(kind: str, path: Path, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--path", str(path), "--n", str(n)]
    cmd += [
        "--batch",
        str(args.batch),
        "--workers",
        str(args.workers),
        "--random-reads",
        str(args.random_reads),
    ]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{kind} loader, N={n} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images (default 2000)")
    parser.add_argument("--small-n", type=int, default=500, help="second, smaller N for the RSS comparison")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0: one process)")
    parser.add_argument("--random-reads", type=int, default=2000)
    parser.add_argument("--dir", default=None, help="work folder (default: a temp folder, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the generated TSV and stores")
    parser.add_argument("--child", choices=["lmdb", "tsv"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(args.child, args.path, args.n, args.batch, args.workers, args.random_reads)))
        return

    from extract.tsv import import_tsv

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="store_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for n in sorted({args.small_n, args.n}):
            tsv, store = work / f"synthetic_{n}.tsv", work / f"synthetic_{n}.lmdb"
            if not tsv.exists():
                write_tsv(tsv, n)
            if not store.exists():
                t = time.perf_counter()
                rep = import_tsv(tsv, store, progress=True)
                dt = time.perf_counter() - t
                print(
                    f"import-tsv N={n}: {rep.imported} records in {dt:.1f} s ({rep.imported / dt:.0f} img/s)"
                )
            sizes = (tsv.stat().st_size, (store / "data.mdb").stat().st_size)
            for kind, path in (("lmdb", store), ("tsv", tsv)):
                res = run_child(kind, path, n, args)
                res["file_bytes"] = sizes[0] if kind == "tsv" else sizes[1]
                results.append(res)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    mib = 1 << 20
    print()
    print(
        f"feature store benchmark: 36 x {DIM} float32 per image, batch {args.batch}, workers {args.workers}"
    )
    head = (
        f"{'loader':<6} {'N':>6} {'file MiB':>9} {'1st batch s':>11} {'RSS base':>9} {'peak RSS':>9} "
        f"{'RSS growth':>10} {'private-base':>12} {'epoch img/s':>11} {'random img/s':>12}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['kind']:<6} {r['n']:>6} {r['file_bytes'] / mib:>9.0f} {r['first_batch_s']:>11.3f} "
            f"{r['base_rss'] / mib:>9.0f} {r['peak_rss'] / mib:>9.0f} {r['rss_growth'] / mib:>10.0f} "
            f"{(r['peak_private'] - r['base_private']) / mib:>12.0f} {r['epoch_rps']:>11.0f} {r['random_rps']:>12.0f}"
        )
    print(
        "(memory in MiB; base = the process after importing torch/numpy/extract.store and one warm-up batch; "
        "RSS growth = peak RSS (VmHWM, workers sampled per batch) above base; private = rss - shared, sampled per batch)"
    )
    by = {(r["kind"], r["n"]): r for r in results}
    print()
    for n in sorted({args.small_n, args.n}):
        lm, ts = by[("lmdb", n)], by[("tsv", n)]
        print(
            f"N={n}: time to first batch TSV/LMDB = {ts['first_batch_s'] / lm['first_batch_s']:.0f}x; "
            f"RSS growth TSV/LMDB = {ts['rss_growth'] / max(lm['rss_growth'], 1):.1f}x"
        )
    if args.small_n != args.n:
        small, big = args.small_n, args.n
        for kind in ("lmdb", "tsv"):
            a, b = by[(kind, small)], by[(kind, big)]
            print(
                f"{kind}: RSS growth N={big} vs N={small}: {b['rss_growth'] / mib:.0f} MiB vs "
                f"{a['rss_growth'] / mib:.0f} MiB (ratio {b['rss_growth'] / max(a['rss_growth'], 1):.2f})"
            )
    print(
        "LMDB reader: RSS growth = file pages mapped (re-mapped every 8 MiB read; random reads map ~1 MiB around each record) + one batch; "
        "TSV loader: every decoded array of the file."
    )


if __name__ == "__main__":
    main()
