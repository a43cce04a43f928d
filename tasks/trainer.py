"""The shared trainer: one loop for every task (pretrain, vqa, gqa, nlvr2), read top to bottom.

``train(config, task, run_dir)`` runs on one CPU, one GPU or N processes under ``torchrun`` (gloo on CPU,
nccl on CUDA) with the same command. What it does, in order:

1. processes and device (:class:`common.distributed.DistContext`), AMP dtype, CPU allocator tuning;
2. the model (``task.build_model(load)``), or the newest intact checkpoint's weights with ``resume``;
3. the data: each epoch's order is a permutation seeded by ``(seed, epoch)``; global step ``s`` takes the
   items ``order[s*B:(s+1)*B]`` (``B = data.batch_size``, drop-last), cut into ``world_size x accumulation``
   micro batches, rank ``r`` running micro batches ``a*world_size + r`` one after the other (gradients
   accumulated, DDP synchronising on the last). So the global batch, and the items in each step, do not
   depend on the number of processes; datasets draw their masks / negatives from ``(seed, epoch, index)``;
4. the optimizer (BERT-Adam or AdamW) and the original warmup-linear schedule over ALL configured epochs
   (``max_steps`` only stops early, so stopping and resuming equals never stopping);
5. the loop: forward under autocast, backward, clipping, a step unless the loss (or, without a grad scaler,
   the gradient norm) is not finite; logs; checkpoints every ``train.save_every`` steps and at each epoch
   end; validation at each epoch end (rank 0), ``RUN_DIR/best`` on a better ``score``;
6. ``RUN_DIR/final``, ``curves.png`` and a summary.

RUN_DIR: ``config.yaml``, ``metrics.jsonl``, ``tb/``, ``curves.png``, ``checkpoints/step_NNNNNNNN/``,
``checkpoints/latest``, ``best/``, ``final/`` (see :mod:`tasks.checkpointing`).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from common.config import ConfigError, config_to_dict, load_config, save_config
from common.cpu import cpu_autocast_is_fast, cpu_autocast_warning, tune_cpu_allocator
from common.distributed import DistContext, resolve_device

from . import checkpointing as ckpt
from .config import TrainConfig, TrainLoopConfig
from .optim import build_optimizer
from .task import Task

logger = logging.getLogger(__name__)

__all__ = ["GlobalBatchSampler", "TrainingStopped", "micro_batching", "resolve_amp", "train"]


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row); the message names the step."""


def train(
    config: TrainConfig,
    task: Task,
    run_dir: str | Path,
    *,
    load: str | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    model: nn.Module | None = None,
    dist: DistContext | None = None,
) -> dict[str, Any]:
    """Train ``task`` as ``config`` says; write RUN_DIR; return a summary (rank 0's view).

    ``load``: starting weights (any checkpoint ``task.build_model`` reads); ``resume``: continue from
    ``RUN_DIR/checkpoints/latest`` (or the newest intact one); ``max_steps``: stop once the run has taken
    that many optimizer steps in all (a checkpoint is saved there); ``model`` / ``dist``: injected parts.
    """
    run_dir = Path(run_dir)
    tc, dc = config.train, config.data
    t_start = time.perf_counter()

    # --- 1. processes, device, precision -------------------------------------------------------------
    device_type = (
        torch.device(tc.device).type if tc.device else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    own_dist = dist is None
    dist = dist or DistContext.from_env(device_type)
    device = resolve_device(tc.device or None, dist)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        tune_cpu_allocator()
    amp_dtype = resolve_amp(tc.amp, device)
    micro, accum = micro_batching(dc.batch_size, dist.world_size, tc)
    is_main = dist.is_main

    # --- 2. the model (fresh or from the checkpoint to resume) -------------------------------------------
    resume_dir, state = None, None
    if not resume and ckpt.list_step_dirs(run_dir / "checkpoints"):
        raise ConfigError(
            f"{run_dir} already holds the checkpoints of a run: add --resume to continue it, or choose another "
            "--output (a new run would overwrite them)"
        )
    if resume:
        check_same_run(config, run_dir / "config.yaml")
        resume_dir = ckpt.find_resume_checkpoint(run_dir)
        state = ckpt.load_trainer_state(resume_dir)
        if load is None:
            load = state.get("load")
        logger.info("resuming from %s (step %d)", resume_dir, state["step"])
    if is_main:
        save_config(config, run_dir / "config.yaml")
    torch.manual_seed(tc.seed)  # every rank builds the same initial weights
    if model is None:
        model = task.build_model(load)
    if resume_dir is not None:
        ckpt.load_model_weights(model, resume_dir)
    model.to(device)

    # --- 3. data -----------------------------------------------------------------------------------------
    train_set = task.train_dataset()
    valid_set = task.valid_dataset()
    steps_per_epoch = len(train_set) // dc.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"data.batch_size={dc.batch_size} is larger than the {len(train_set)} training items: "
            "lower data.batch_size or add data"
        )
    t_total = steps_per_epoch * tc.epochs
    cuda = device.type == "cuda"
    loader_kwargs: dict[str, Any] = dict(
        collate_fn=task.collate, num_workers=dc.workers, pin_memory=cuda, persistent_workers=False
    )

    # --- 4. optimizer, schedule, scaler, DDP ----------------------------------------------------------------
    optimizer, schedule = build_optimizer(model, config.optim, t_total, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    params = [p for p in model.parameters() if p.requires_grad]
    net: nn.Module = model
    if dist.world_size > 1:
        net = DistributedDataParallel(
            model,
            device_ids=[device.index] if cuda else None,
            find_unused_parameters=tc.find_unused_parameters,
        )
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    )

    step, epoch, step_in_epoch, best_score, bad_total = 0, 0, 0, None, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, epoch, step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        best_score, bad_total = state.get("best_score"), state.get("bad_steps_total", 0)
        if dist.rank < len(state["rng"]):
            ckpt.set_rng_state(state["rng"][dist.rank])
        else:
            logger.warning(
                "rank %d: no RNG state in the checkpoint (fewer processes then); seeding", dist.rank
            )
            _seed_everything(tc.seed + dist.rank + 1000 * step)
    else:
        _seed_everything(tc.seed + dist.rank)  # dropout differs per rank, draws of the data do not

    log = RunLog(run_dir, is_main, t_total, step, dc.batch_size, tc.log_every, resumed=state is not None)
    if is_main:
        logger.info(
            "%s: %d items, %d steps/epoch x %d epochs = %d steps; global batch %d = %d process(es) x %d "
            "accumulation x %d; device %s, amp %s, optimizer %s",
            task.name, len(train_set), steps_per_epoch, tc.epochs, t_total, dc.batch_size, dist.world_size,
            accum, micro, device, amp_dtype or "none", config.optim.name,
        )  # fmt: skip
    stop_at = t_total if max_steps is None else min(t_total, max_steps)
    bad_in_row = 0
    valid_metrics: dict[str, float] = {}

    def save(at_epoch: int, at_step_in_epoch: int) -> None:
        rng = dist.all_gather(ckpt.get_rng_state())
        if not is_main:
            return
        trainer_state = {
            "step": step,
            "epoch": at_epoch,
            "step_in_epoch": at_step_in_epoch,
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "rng": rng,
            "best_score": best_score,
            "bad_steps_total": bad_total,
            "world_size": dist.world_size,
            "load": load,
        }
        path = ckpt.save_checkpoint(run_dir, step, model, trainer_state, task.checkpoint_extras(), tc.keep)
        logger.info("checkpoint %s", path)

    # --- 5. the loop ---------------------------------------------------------------------------------------
    while epoch < tc.epochs and step < stop_at:
        train_set.set_epoch(epoch)
        sampler = GlobalBatchSampler(
            len(train_set),
            dc.batch_size,
            micro,
            accum,
            dist.rank,
            dist.world_size,
            tc.seed,
            epoch,
            step_in_epoch,
        )
        # own generator: creating the iterator must not draw from the global RNG (exact resume)
        loader = DataLoader(
            train_set, batch_size=micro, sampler=sampler, generator=torch.Generator().manual_seed(epoch), **loader_kwargs
        )  # fmt: skip
        batches = iter(loader)
        net.train()
        while step_in_epoch < steps_per_epoch and step < stop_at:
            loss_sum = torch.zeros((), device=device)
            parts_sum: dict[str, torch.Tensor] = {}
            for a in range(accum):
                batch = to_device(next(batches), device, non_blocking=cuda)
                sync = net.no_sync() if dist.world_size > 1 and a < accum - 1 else nullcontext()
                with sync:
                    with autocast:
                        out = task.step(net, batch, epoch)
                    scaler.scale(out.loss / accum).backward()
                loss_sum += out.loss.detach().float() / accum
                for name, value in out.parts.items():
                    value = torch.as_tensor(value, device=device).detach().float() / accum
                    parts_sum[name] = parts_sum[name] + value if name in parts_sum else value

            if scaler.is_enabled():
                scaler.unscale_(optimizer)
            clip = config.optim.clip_grad_norm if config.optim.clip_grad_norm > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
            # one small transfer per step: the global mean loss, the count of ranks with a non-finite loss, the
            # norm, this rank's loss parts
            names = sorted(parts_sum)
            stats = torch.stack(
                [loss_sum, (~torch.isfinite(loss_sum)).float(), grad_norm.detach().float()]
                + [parts_sum[k] for k in names]
            )
            if dist.world_size > 1:
                torch_dist.all_reduce(stats[:2])
            loss_value, bad_ranks, norm_value, *part_values = stats.tolist()
            loss_value /= dist.world_size
            lr = schedule.get_last_lr()[0]
            bad = bad_ranks > 0 or (not math.isfinite(norm_value) and not scaler.is_enabled())
            if bad:
                bad_in_row += 1
                bad_total += 1
                logger.warning(
                    "step %d: non-finite %s; update skipped (%d in a row, %d in all)",
                    step + 1, "loss" if bad_ranks > 0 else "gradient norm", bad_in_row, bad_total,
                )  # fmt: skip
                if bad_in_row >= tc.max_bad_steps:
                    log.close()
                    raise TrainingStopped(
                        f"stopped at step {step + 1} (epoch {epoch + 1}): {bad_in_row} non-finite losses in a row "
                        f"(train.max_bad_steps={tc.max_bad_steps}); lower optim.lr, use train.amp=bf16 or none, "
                        f"or check the data; resume from {run_dir / 'checkpoints' / 'latest'} after fixing it"
                    )
                if scaler.is_enabled():
                    scaler.update()
            else:
                bad_in_row = 0
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            step += 1
            step_in_epoch += 1
            if bad:
                log.skipped_step()
            else:
                parts = dict(zip(names, part_values))
                log.train_step(
                    step, epoch + step_in_epoch / steps_per_epoch, lr, loss_value, parts, norm_value
                )

            end_of_epoch = step_in_epoch == steps_per_epoch
            if end_of_epoch and valid_set is not None and tc.eval_every_epoch:
                valid_metrics = _validate(
                    task, model, valid_set, dc.eval_batch_size, loader_kwargs, device, autocast, dist
                )
                score = valid_metrics.get("score")
                if is_main:
                    log.valid(step, epoch + 1, lr, valid_metrics)
                    if score is not None and (best_score is None or score > best_score):
                        best_score = float(score)
                        ckpt.save_model_dir(run_dir / "best", model, task.checkpoint_extras())
                        logger.info(
                            "best score %.4f at epoch %d: %s", best_score, epoch + 1, run_dir / "best"
                        )
                net.train()
            if end_of_epoch:
                save(epoch + 1, 0)
            elif step == stop_at or (tc.save_every > 0 and step % tc.save_every == 0):
                save(epoch, step_in_epoch)
        del batches, loader
        if step_in_epoch == steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0

    # --- 6. the end ----------------------------------------------------------------------------------------
    completed = step >= t_total
    if is_main:
        ckpt.save_model_dir(run_dir / "final", model, task.checkpoint_extras())
    log.close()
    if is_main:
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    summary = {
        "task": task.name,
        "step": step,
        "t_total": t_total,
        "epochs_done": epoch,
        "completed": completed,
        "train_loss": log.last_train_loss,
        "valid": valid_metrics,
        "best_score": best_score,
        "bad_steps": bad_total,
        "final": str(run_dir / "final"),
        "best": str(run_dir / "best") if best_score is not None else None,
        "seconds": time.perf_counter() - t_start,
    }
    dist.barrier()
    if own_dist:
        dist.close()
    return summary


# --------------------------------------------------------------------------------------------------------------
# Pieces of the loop
# --------------------------------------------------------------------------------------------------------------
def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """``train.amp`` -> autocast dtype (None = float32). ``auto``: bf16 on CUDA, on CPU bf16 where the CPU
    has native bf16 matmuls (:func:`common.cpu.cpu_autocast_is_fast`), else float32."""
    if amp == "none":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if device.type == "cpu" and cpu_autocast_is_fast(torch.bfloat16) else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if device.type == "cpu":
        warning = cpu_autocast_warning(dtype)
        if warning:
            logger.warning("train.amp=%s: %s", amp, warning)
    return dtype


def micro_batching(global_batch: int, world_size: int, tc: TrainLoopConfig) -> tuple[int, int]:
    """(micro batch per process per forward, accumulation steps) with world x accumulation x micro = global."""
    where = f"data.batch_size={global_batch} over {world_size} process(es)"
    if global_batch < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {global_batch}")
    if tc.grad_accumulation < 0 or tc.micro_batch_size < 0:
        raise ConfigError("train.grad_accumulation and train.micro_batch_size must be >= 0 (0 = automatic)")
    if tc.micro_batch_size > 0:
        micro = tc.micro_batch_size
        accum, rest = divmod(global_batch, world_size * micro)
        if rest or accum == 0 or (tc.grad_accumulation and tc.grad_accumulation != accum):
            raise ConfigError(
                f"{where}: train.micro_batch_size={micro}"
                + (f" with train.grad_accumulation={tc.grad_accumulation}" if tc.grad_accumulation else "")
                + " does not divide it evenly (need processes x accumulation x micro batch = data.batch_size)"
            )
        return micro, accum
    accum = tc.grad_accumulation or 1
    micro, rest = divmod(global_batch, world_size * accum)
    if rest or micro == 0:
        raise ConfigError(
            f"{where}: not divisible by processes x train.grad_accumulation={accum}; choose a batch size that "
            "is a multiple of it, or set train.micro_batch_size"
        )
    return micro, accum


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of ``range(n)``; a function of ``(seed, epoch)`` only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class GlobalBatchSampler(Sampler[int]):
    """This rank's item indices for one epoch, from global step ``start_step`` on (see the module doc).

    Yields ``steps x accum x micro`` indices: for each global step, micro batches ``a*world + rank`` of the
    step's ``global_batch`` items, ``a = 0..accum-1``. Feed it to a DataLoader with ``batch_size=micro``.
    """

    def __init__(
        self,
        n: int,
        global_batch: int,
        micro: int,
        accum: int,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        start_step: int = 0,
    ) -> None:
        assert micro * accum * world_size == global_batch
        self.n, self.global_batch, self.micro, self.accum = n, global_batch, micro, accum
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.start_step = start_step
        self.steps = n // global_batch

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accum * self.micro

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch)
        for s in range(self.start_step, self.steps):
            base = s * self.global_batch
            for a in range(self.accum):
                first = base + (a * self.world_size + self.rank) * self.micro
                yield from order[first : first + self.micro].tolist()


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Tensors in nested dicts / lists / tuples moved to ``device``; everything else as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _validate(
    task: Task,
    model: nn.Module,
    valid_set: Dataset,
    batch_size: int,
    loader_kwargs: dict[str, Any],
    device: torch.device,
    autocast: Any,
    dist: DistContext,
) -> dict[str, float]:
    """``task.evaluate`` on rank 0 with the bare model in eval mode; the other ranks wait."""
    metrics: dict[str, float] = {}
    if dist.is_main:
        loader = DataLoader(
            valid_set, batch_size=batch_size, shuffle=False, generator=torch.Generator().manual_seed(0), **loader_kwargs
        )  # fmt: skip
        model.eval()
        with torch.no_grad(), autocast:
            metrics = dict(task.evaluate(model, loader, device))
    dist.barrier()
    return metrics


# --------------------------------------------------------------------------------------------------------------
# Logs: tqdm, metrics.jsonl, TensorBoard, curves.png
#: Settings that define a run: ``--resume`` with other values would not continue the same run.
RUN_DEFINING = (
    "task",
    "data.train",
    "data.batch_size",
    "train.seed",
    "train.epochs",
    "optim.name",
    "optim.lr",
    "optim.warmup",
)


def check_same_run(config: Any, saved_path: Path) -> None:
    """Refuse ``--resume`` when a run-defining setting differs from the run's saved ``config.yaml``
    (ConfigError naming the key and both values); other settings (workers, log_every, ...) may change."""
    if not saved_path.exists():
        return
    saved = config_to_dict(load_config(type(config), saved_path))
    given = config_to_dict(config)
    for key in RUN_DEFINING:
        a, b = saved, given
        for part in key.split("."):
            a, b = a[part], b[part]
        if a != b:
            raise ConfigError(
                f"{saved_path}: the run was started with {key}={a!r}; --resume with {key}={b!r} would not continue "
                "the same run (drop that override, or start a new run with another --output)"
            )


# --------------------------------------------------------------------------------------------------------------
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
