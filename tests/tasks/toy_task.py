"""A small real task for the trainer's tests: a tiny LxmertForPreTraining on a tiny generated feature store.

Items are (image id, sentence of token ids); each item's MLM masks, region masks and matched flag are drawn
from ``(seed, epoch, index)``, as the Task contract requires, so runs are exactly reproducible across worker
counts, process counts and resumes. ``ToyTask(..., nan_at_calls={3, 4})`` returns a NaN loss at those
``step`` calls; ``kill_at_call=n`` SIGKILLs the process at its n-th ``step`` call (1-based); ``pause_at_call=n``
writes ``RUN_DIR.paused`` there and sleeps until killed (a run that holds its RUN_DIR for as long as a test needs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from region_labels import random_labels

from extract.store import FeatureWriter
from model import LxmertConfig, LxmertForPreTraining
from tasks.config import TrainConfig
from tasks.data.regions import RegionFeatures, collate_regions
from tasks.engine.task import StepOutput

DIM = 24  # feature size of the tiny store
REGIONS = 6
VOCAB = 120
SEQ = 10

TINY_MODEL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=64,
    l_layers=1,
    r_layers=1,
    x_layers=1,
    visual_feat_dim=DIM,
    num_qa_labels=9,
    num_object_labels=1600,
    num_attr_labels=400,
    max_position_embeddings=SEQ,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)


def write_tiny_store(path: Path, n_images: int = 8, seed: int = 0) -> list[str]:
    """A feature store of ``n_images`` images (``REGIONS`` regions of ``DIM`` floats); returns the ids."""
    rng = np.random.default_rng(seed)
    ids = [f"img{i:03d}" for i in range(n_images)]
    with FeatureWriter(path, extractor={"source": "test", "file": path.name}) as writer:
        for img_id in ids:
            x1 = rng.uniform(0, 200, REGIONS)
            y1 = rng.uniform(0, 100, REGIONS)
            writer.put(
                img_id,
                {
                    "features": rng.normal(0, 1, (REGIONS, DIM)).astype(np.float32),
                    "boxes": np.stack([x1, y1, x1 + 200, y1 + 100], 1).astype(np.float32),
                    **random_labels(rng, REGIONS),
                    "img_h": 200,
                    "img_w": 400,
                },
            )
    return ids


def write_tiny_items(path: Path, img_ids: list[str], per_image: int = 4, seed: int = 0) -> Path:
    """A JSON list of ``{"img_id", "tokens"}`` (sentences of 4..SEQ-2 token ids)."""
    rng = np.random.default_rng(seed)
    items = [
        {"img_id": img_id, "tokens": rng.integers(5, VOCAB, int(rng.integers(4, SEQ - 1))).tolist()}
        for img_id in img_ids
        for _ in range(per_image)
    ]
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict], features: RegionFeatures, seed: int, fixed: bool = False) -> None:
        self.items, self.features, self.seed, self.fixed = items, features, seed, fixed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, 0 if self.fixed else self.epoch, index])
        item = self.items[index]
        tokens = np.array([1] + item["tokens"] + [2], dtype=np.int64)  # [CLS]=1, [SEP]=2 here
        mask = rng.random(len(tokens)) < 0.3
        mask[0] = mask[-1] = False
        labels = np.where(mask, tokens, -100)
        tokens = np.where(mask, 3, tokens)  # [MASK]=3
        regions = self.features[item["img_id"]]
        region_mask = (rng.random(regions.num_boxes) < 0.3).astype(np.float32)
        return {
            "uid": f"{item['img_id']}_{index}",
            "tokens": tokens,
            "labels": labels,
            "regions": regions,
            "region_mask": region_mask,
            "matched": int(rng.random() < 0.7),
        }


class ToyTask:
    """Tiny masked-LM + masked-region + matching pretraining, enough to exercise the trainer for real."""

    name = "toy"

    def __init__(
        self,
        config: TrainConfig,
        nan_at_calls: set[int] | None = None,
        kill_at_call: int | None = None,
        dropout: float = 0.1,
        pause_at_call: int | None = None,
        pause_marker: Path | None = None,
    ) -> None:
        self.config = config
        self.features = RegionFeatures(config.data.features)
        self.nan_at_calls = nan_at_calls or set()
        self.kill_at_call = kill_at_call
        self.pause_at_call, self.pause_marker = pause_at_call, pause_marker
        self.dropout = dropout
        self.calls = 0

    def build_model(self, load: str | None) -> LxmertForPreTraining:
        if load:
            return LxmertForPreTraining.from_pretrained(load)
        cfg = {
            **TINY_MODEL,
            "hidden_dropout_prob": self.dropout,
            "attention_probs_dropout_prob": self.dropout,
        }
        return LxmertForPreTraining(LxmertConfig(**cfg, task_qa=False))

    def _items(self, path: str) -> list[dict]:
        return json.loads(Path(path).read_text(encoding="utf-8"))

    def train_dataset(self) -> ToyDataset:
        items = [it for path in self.config.data.train for it in self._items(path)]
        return ToyDataset(items, self.features, self.config.train.seed)

    def valid_dataset(self) -> ToyDataset | None:
        if not self.config.data.valid:
            return None
        return ToyDataset(self._items(self.config.data.valid), self.features, 12345, fixed=True)

    def collate(self, items: list[dict]) -> dict[str, Any]:
        b = len(items)
        ids = torch.zeros(b, SEQ, dtype=torch.long)
        labels = torch.full((b, SEQ), -100, dtype=torch.long)
        attn = torch.zeros(b, SEQ, dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["tokens"])
            ids[i, :n] = torch.from_numpy(it["tokens"])
            labels[i, :n] = torch.from_numpy(it["labels"])
            attn[i, :n] = 1
        regions = collate_regions([it["regions"] for it in items])
        feats = regions["visual_feats"]
        v = feats.shape[1]
        mask = torch.zeros(b, v)
        obj = torch.zeros(b, v, dtype=torch.long)
        obj_conf = torch.zeros(b, v)
        attr = torch.zeros(b, v, dtype=torch.long)
        attr_conf = torch.zeros(b, v)
        for i, it in enumerate(items):
            r, n = it["regions"], it["regions"].num_boxes
            mask[i, :n] = torch.from_numpy(it["region_mask"])
            obj[i, :n], obj_conf[i, :n] = torch.from_numpy(r.obj_ids), torch.from_numpy(r.obj_conf)
            attr[i, :n], attr_conf[i, :n] = torch.from_numpy(r.attr_ids), torch.from_numpy(r.attr_conf)
        batch = {
            "uids": [it["uid"] for it in items],
            "input_ids": ids,
            "attention_mask": attn,
            "labels": labels,
            "visual_feats": feats * (1 - mask[..., None]),
            "visual_pos": regions["visual_pos"],
            "matched_label": torch.tensor([it["matched"] for it in items]),
            "obj_labels": {"obj": (obj, obj_conf), "attr": (attr, attr_conf), "feat": (feats, mask)},
        }
        if "visual_attention_mask" in regions:
            batch["visual_attention_mask"] = regions["visual_attention_mask"]
        return batch

    def step(self, model: torch.nn.Module, batch: dict[str, Any], epoch: int) -> StepOutput:
        self.calls += 1
        if self.kill_at_call is not None and self.calls == self.kill_at_call:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.pause_at_call is not None and self.calls == self.pause_at_call:
            Path(self.pause_marker).write_text(str(os.getpid()))
            time.sleep(600)
        inputs = {k: v for k, v in batch.items() if k != "uids"}
        out = model(**inputs)
        loss = out.loss
        if self.calls in self.nan_at_calls:
            loss = loss * float("nan")
        parts = {k: v.detach() for k, v in (out.losses or {}).items()}
        return StepOutput(loss=loss, parts=parts)

    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        total, n = 0.0, 0
        for batch in loader:
            batch = {k: v for k, v in batch.items() if k != "uids"}
            batch = {
                k: (
                    v.to(device)
                    if torch.is_tensor(v)
                    else {kk: tuple(t.to(device) for t in vv) for kk, vv in v.items()}
                )
                for k, v in batch.items()
            }
            total += float(model(**batch).loss) * len(batch["input_ids"])
            n += len(batch["input_ids"])
        return {"loss": total / n, "score": -total / n}

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"features.json": self.features.describe()}


def toy_config(
    tmp: Path, store: Path, train_json: Path, valid_json: Path | None = None, **train: Any
) -> TrainConfig:
    """A TrainConfig for :class:`ToyTask` (amp none, 0 workers unless given, short epochs)."""
    from common.config import config_from_dict

    data = {"train": [str(train_json)], "features": [str(store)], "batch_size": 4, "workers": 0}
    if valid_json is not None:
        data["valid"] = str(valid_json)
    loop = {"epochs": 2, "amp": "none", "device": "cpu", "log_every": 1, "save_every": 0, "keep": 2, **train}
    data.update(loop.pop("data", {}))
    optim = {"lr": 1e-3, "warmup": 0.1, **loop.pop("optim", {})}
    return config_from_dict(TrainConfig, {"task": "pretrain", "data": data, "train": loop, "optim": optim})


def train_on_two_processes(config: TrainConfig, tmp: Path) -> subprocess.CompletedProcess:
    """``config`` (saved as ``tmp/two.yaml``) trained by this module under ``torchrun --nproc_per_node 2`` into
    ``tmp/ddp``, dropout 0; the finished process (stdout / stderr captured)."""
    from common.config import save_config

    save_config(config, tmp / "two.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(Path(__file__).resolve()), str(tmp / "two.yaml"), str(tmp / "ddp"), "--dropout", "0"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def main(argv: list[str] | None = None) -> None:
    """``python toy_task.py CONFIG.yaml RUN_DIR [--resume] [--kill-at-call N] [--pause-at-call N] [--dropout P]
    [--max-steps N]``:
    the trainer on :class:`ToyTask` in a process of its own (for kill -9 and torchrun tests)."""
    import argparse
    import logging

    from common.config import load_config
    from tasks.engine.trainer import train

    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-call", type=int)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--pause-at-call", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    config = load_config(TrainConfig, args.config)
    marker = Path(str(args.run_dir).rstrip("/") + ".paused")
    task = ToyTask(
        config, kill_at_call=args.kill_at_call, dropout=args.dropout, pause_at_call=args.pause_at_call,
        pause_marker=marker,
    )  # fmt: skip
    summary = train(config, task, args.run_dir, resume=args.resume, max_steps=args.max_steps)
    print("SUMMARY " + json.dumps({k: summary[k] for k in ("step", "completed", "bad_steps")}), flush=True)


if __name__ == "__main__":
    main()
