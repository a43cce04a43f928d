"""Rank 0's training logs: a tqdm bar, ``metrics.jsonl``, TensorBoard (``tb/``) and ``curves.png``."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

__all__ = ["RunLog", "plot_curves"]


class RunLog:
    """Rank 0's logs. Train lines every ``log_every`` steps and at the last step (means over the window), valid
    lines per epoch.

    On resume ``metrics.jsonl`` is cut back to the checkpoint's step, so a resumed run's log reads as the
    uninterrupted run's would.
    """

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        t_total: int,
        step: int,
        global_batch: int,
        log_every: int,
        resumed: bool,
    ) -> None:
        self.enabled = enabled
        self.global_batch = global_batch
        self.log_every = max(1, log_every)
        self.t_total = t_total
        self.last_train_loss: float | None = None
        self._window: dict[str, list[float]] = {}
        self._t = time.perf_counter()
        self._window_steps = 0
        self._tb = None
        self._bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists() and resumed:
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
            kept = [line for line in kept if json.loads(line).get("step", 0) <= step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter  # heavy; only rank 0 pays for it

        self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=step if resumed else None)
        self._bar = tqdm(total=t_total, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def train_step(
        self, step: int, epoch: float, lr: float, loss: float, parts: dict[str, float], grad_norm: float
    ) -> None:
        self.last_train_loss = loss
        if not self.enabled:
            return
        self._window_steps += 1
        values = {"loss": loss, **{f"loss_{k}": v for k, v in parts.items()}, "grad_norm": grad_norm}
        for k, v in values.items():
            self._window.setdefault(k, []).append(v)
        self._bar.update(1)
        if step % self.log_every and step != self.t_total:  # the last step is always logged
            return
        elapsed = time.perf_counter() - self._t
        samples_per_s = self._window_steps * self.global_batch / max(elapsed, 1e-9)
        means = {k: sum(v) / len(v) for k, v in self._window.items()}
        record = {"step": step, "epoch": round(epoch, 4), "split": "train", "lr": lr, **means}
        record["samples_per_s"] = samples_per_s
        self._write(record)
        for k, v in means.items():
            self._tb.add_scalar(f"train/{k}", v, step)
        self._tb.add_scalar("train/lr", lr, step)
        self._tb.add_scalar("train/samples_per_s", samples_per_s, step)
        self._bar.set_postfix(loss=f"{means['loss']:.4f}", samples_s=f"{samples_per_s:.1f}", lr=f"{lr:.2e}")
        self._window, self._window_steps, self._t = {}, 0, time.perf_counter()

    def skipped_step(self) -> None:
        if self.enabled:
            self._bar.update(1)

    def valid(self, step: int, epoch: int, lr: float, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write({"step": step, "epoch": epoch, "split": "valid", "lr": lr, **metrics})
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self._tb.add_scalar(f"valid/{k}", v, step)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
        tqdm.write(f"epoch {epoch} valid: {shown}")

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self.enabled or self._bar is None:
            return
        self._bar.close()
        self._tb.close()
        self._file.close()
        self._bar = None


def plot_curves(metrics_path: Path, out_path: Path) -> Path | None:
    """``curves.png``: one panel per loss (``loss``, ``loss_<part>``), train and valid against the step."""
    from matplotlib.figure import Figure  # only at the end of a run, on rank 0

    if not metrics_path.exists():
        return None
    records = [
        json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    keys = sorted(
        {k for r in records for k in r if k == "loss" or k.startswith("loss_")},
        key=lambda k: (k != "loss", k),
    )
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        for split, style in (("train", "-"), ("valid", "o-")):
            points = [(r["step"], r[key]) for r in records if r.get("split") == split and key in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, label=split, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    return out_path
