"""Benchmark: lxmert-serve under N concurrent clients on this machine: requests/s, p50 / p95 latency, the first
question about an image (its regions extracted) against further ones (regions reused), and the micro batches formed.

By default a self-contained setup (no download): the ``vg_tiny`` detector with random weights and a randomly
initialised QA model of the demo's size (hidden 128, layers 2/1/1, 13 answers) on 224-px images; ``--model DIR``
serves a real model folder instead (detector flags as ``lxmert-serve``: give them after ``--``). The server is a
real uvicorn on 127.0.0.1; the clients are threads with their own HTTP connection. Never asserts on time.

    python bench/serve.py                                   # 1, 4, 16 clients, 64 requests each round
    python bench/serve.py --clients 1 8 --requests 96 --max-batch 16
    python bench/serve.py --model runs/demo/vqa/final        # its recorded extractor; detector flags after --
"""

from __future__ import annotations

import argparse
import io
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extract.config import ExtractConfig  # noqa: E402
from model import LxmertConfig, LxmertForQuestionAnswering  # noqa: E402
from tasks.answer.answerer import Answerer  # noqa: E402
from tasks.answer.cli import add_answerer_arguments, extract_config_from_args, unset_namespace  # noqa: E402
from tasks.data.model_folder import write_model_files  # noqa: E402
from tasks.serve.app import create_app  # noqa: E402
from tasks.serve.cli import model_info  # noqa: E402
from tasks.serve.uploads import ImageStore, UploadLimits  # noqa: E402
from tasks.serve.worker import AnswerWorker  # noqa: E402

QUESTIONS = ["what color is the shape?", "what shape is in the image?", "is there a circle?", "is it red?"]


def self_contained_model(folder: Path) -> tuple[Path, ExtractConfig]:
    """A random demo-sized QA model folder and the random vg_tiny detector config."""
    torch.manual_seed(0)
    config = LxmertConfig(hidden_size=128, num_attention_heads=4, intermediate_size=512, l_layers=2, r_layers=1,
                          x_layers=1, visual_feat_dim=128, num_qa_labels=13)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    write_model_files(
        folder, LxmertForQuestionAnswering(config), {"label2ans.json": [f"a{i}" for i in range(13)]}
    )
    return folder, ExtractConfig(
        out="", random_weights=True, config="vg_tiny", min_size=224, max_size=224, device="cpu"
    )


def images(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct 64x64 PNGs (one coloured square each, like easy-VQA's)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.full((64, 64, 3), 255, np.uint8)
        x, y, s = rng.integers(4, 30, 3)
        img[y : y + s + 10, x : x + s + 10] = rng.integers(0, 256, 3)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_round(url: str, clients: int, requests: int, pictures: list[bytes]) -> dict:
    """``requests`` requests from ``clients`` threads: each client uploads its own new image (first question), then
    asks further questions about it by ``image_id`` (regions reused)."""
    per_client = max(1, requests // clients)
    first, further, failed = [], [], 0

    def client(k: int) -> None:
        nonlocal failed
        with httpx.Client(base_url=url, timeout=300) as http:
            start = time.perf_counter()
            r = http.post("/api/answer", data={"question": QUESTIONS[0]},
                          files={"image": (f"img{k}.png", pictures[k], "image/png")})  # fmt: skip
            first.append(time.perf_counter() - start)
            if r.status_code != 200:
                failed += 1
                return
            image_id = r.json()["image_id"]
            for j in range(1, per_client):
                start = time.perf_counter()
                r = http.post("/api/answer", data={"question": QUESTIONS[j % 4], "image_id": image_id})
                further.append(time.perf_counter() - start)
                failed += r.status_code != 200

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    all_ = first + further

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(xs, q)) * 1000 if xs else float("nan")

    return {
        "clients": clients,
        "requests": len(all_),
        "failed": failed,
        "req_s": len(all_) / wall,
        "p50_ms": pct(all_, 50),
        "p95_ms": pct(all_, 95),
        "first_p50_ms": pct(first, 50),
        "further_p50_ms": pct(further, 50),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=64, help="requests per round")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument(
        "--model", help="a model folder (detector flags after --); default: a self-contained random one"
    )
    args, rest = p.parse_known_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            ap = argparse.ArgumentParser()
            add_answerer_arguments(ap)
            answer_args = ap.parse_args(
                ["--model", args.model, *[a for a in rest if a != "--"]], unset_namespace()
            )
            model_dir, (config, _) = args.model, extract_config_from_args(ap, answer_args)
        else:
            model_dir, config = self_contained_model(Path(tmp) / "model")
        answerer = Answerer.load(model_dir, config)
        worker = AnswerWorker(answerer, max_batch=args.max_batch)
        store = ImageStore(UploadLimits())
        app = create_app(worker, store, model_info(answerer, str(model_dir)), {})
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        print(f"# lxmert-serve bench: {cpu_name()}, {torch.get_num_threads()} torch "
              f"threads, device {answerer.device}, max batch {args.max_batch}, model {model_dir}")  # fmt: skip
        print(
            "| clients | requests | failed | req/s | p50 ms | p95 ms | first question p50 ms | further p50 ms | mean batch |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        seed = 0
        for clients in args.clients:
            batches_before = len(worker.batches)
            row = run_round(url, clients, args.requests, images(clients, seed))
            seed += 1
            formed = worker.batches[batches_before:]
            print(f"| {row['clients']} | {row['requests']} | {row['failed']} | {row['req_s']:.1f} | {row['p50_ms']:.0f} "
                  f"| {row['p95_ms']:.0f} | {row['first_p50_ms']:.0f} | {row['further_p50_ms']:.0f} "
                  f"| {statistics.mean(formed):.2f} |")  # fmt: skip
        server.should_exit = True
        thread.join(timeout=10)
        worker.close()
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
