"""The engine's loop: one for every task (pretrain, vqa, gqa, nlvr2), read top to bottom.

``train(config, task, run_dir)`` runs on one CPU, one GPU or N processes under ``torchrun`` (gloo on CPU,
nccl on CUDA) with the same command. What it does, in order:

1. processes and device (:class:`common.distributed.DistContext`), AMP dtype, CPU allocator tuning;
2. the model (``task.build_model(load)``), or the newest intact checkpoint's weights with ``resume``;
3. the data, cut into global batches and micro batches (:mod:`tasks.engine.batching`): the items in each step
   do not depend on the number of processes; datasets draw their masks / negatives from ``(seed, epoch, index)``;
4. the optimizer (BERT-Adam or AdamW) and the original warmup-linear schedule over ALL configured epochs
   (``max_steps`` only stops early, so stopping and resuming equals never stopping);
5. the loop: forward under autocast, backward, clipping, a step unless the loss (or, without a grad scaler,
   the gradient norm) is not finite; logs (:class:`tasks.engine.runlog.RunLog`); after each step the hooks
   (:mod:`tasks.engine.hooks`): validation at each epoch end with ``RUN_DIR/best``, checkpoints;
6. ``RUN_DIR/final``, ``curves.png`` and a summary.

One run per RUN_DIR at a time: rank 0 holds ``RUN_DIR/.lock`` (:func:`tasks.engine.resume.hold_run_dir`) for the
whole run and first removes what a run killed while writing left behind.

RUN_DIR: ``config.yaml``, ``metrics.jsonl``, ``tb/``, ``curves.png``, ``checkpoints/step_NNNNNNNN/``,
``checkpoints/latest``, ``best/``, ``final/`` (see :mod:`tasks.engine.checkpointing`).
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from common.config import ConfigError, check_ranges, save_config
from common.cpu import tune_cpu_allocator
from common.diskspace import as_disk_full
from common.distributed import DistContext, resolve_device
from tasks.config import TrainConfig
from tasks.data.regions import BadRecordError
from tasks.engine import checkpointing as ckpt
from tasks.engine.batching import GlobalBatchSampler, micro_batching, to_device
from tasks.engine.hooks import CheckpointHook, EvalHook, Hook, TrainLoop
from tasks.engine.optim import build_optimizer
from tasks.engine.precision import autocast, resolve_amp, set_tf32
from tasks.engine.resume import Progress, ResumePoint, find_resume_point, hold_run_dir, seed_everything
from tasks.engine.runlog import RunLog, plot_curves
from tasks.engine.task import Task

logger = logging.getLogger(__name__)

__all__ = ["TrainingStopped", "train"]


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
    own_dist = dist is None
    dist = dist or DistContext.from_env(_device_type(config.train.device))
    lock = hold_run_dir(run_dir, f"lxmert-train {task.name}", dist)  # one run per RUN_DIR at a time
    stop: TrainingStopped | None = None
    try:
        return _train(config, task, run_dir, load, resume, max_steps, model, dist, own_dist)
    except BadRecordError as exc:  # a damaged or non-finite record, named with its image and store
        stop = TrainingStopped(f"{exc}; {how_to_go_on(run_dir, 'once the store is fixed')}")
        # the DataLoader re-raises it from a frame that holds it (a reference cycle): free the frames now, so the
        # loader's workers are shut down here and not by a later garbage collection (where they wait 5 s each)
        traceback.clear_frames(exc.__traceback__)
    except (OSError, RuntimeError) as exc:  # a checkpoint, a log or the config meeting a full disk: one line
        full = as_disk_full(exc, run_dir, guess=False)
        if full is None:
            raise
        raise TrainingStopped(f"{full}; {how_to_go_on(run_dir, 'once there is room')}") from exc
    finally:
        if lock is not None:
            lock.release()
    # raised here, without the bad record's traceback: its frames (the DataLoader and its workers) go now
    assert stop is not None
    raise stop


def how_to_go_on(run_dir: Path, when: str) -> str:
    """Where a stopped run continues from ``when`` the cause is fixed: the newest checkpoint that exists (with
    ``--resume``), or a new start when none was written."""
    steps = ckpt.list_step_dirs(run_dir / "checkpoints")
    if not steps:
        return f"no checkpoint was written yet: run the same command again {when}"
    step, path = steps[0]
    return f"the last checkpoint is {path} (step {step}): run the same command with --resume {when}"


def _train(
    config: TrainConfig,
    task: Task,
    run_dir: Path,
    load: str | None,
    resume: bool,
    max_steps: int | None,
    model: nn.Module | None,
    dist: DistContext,
    own_dist: bool,
) -> dict[str, Any]:
    tc, dc = config.train, config.data
    t_start = time.perf_counter()
    check_ranges(config)  # a config built by hand gets the loader's range checks too

    # --- 1. processes, device, precision -------------------------------------------------------------
    if dist.is_main:
        ckpt.remove_leftovers(run_dir)  # temporaries of a run killed while writing (we hold RUN_DIR now)
    device, amp_dtype = _device_and_precision(config, dist)
    micro, accum = micro_batching(dc.batch_size, dist.world_size, tc)

    # --- 2. the model (fresh or from the checkpoint to resume) -------------------------------------------
    point = find_resume_point(config, run_dir, resume)
    if point is not None and hasattr(task, "check_resume"):
        task.check_resume(point.directory)  # e.g. features of another extractor than the run's: refused
    if point is not None and load is None:
        load = point.load
    if dist.is_main:
        save_config(config, run_dir / "config.yaml")
    torch.manual_seed(tc.seed)  # every rank builds the same initial weights
    model = model if model is not None else task.build_model(load)
    if point is not None:
        ckpt.load_model_weights(model, point.directory)
    model.to(device)

    # --- 3. data -----------------------------------------------------------------------------------------
    train_set, valid_set = task.train_dataset(), task.valid_dataset()
    steps_per_epoch = len(train_set) // dc.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"data.batch_size={dc.batch_size} is larger than the {len(train_set)} training items: "
            "lower data.batch_size or add data"
        )
    t_total = steps_per_epoch * tc.epochs
    stop_at = t_total if max_steps is None else min(t_total, max_steps)
    if point is not None and point.state["step"] >= stop_at:  # a finished run resumed: nothing left to do
        return _nothing_to_do(task, run_dir, model, point, t_total, dist, own_dist, t_start)
    cuda = device.type == "cuda"
    loader_kwargs = dict(
        collate_fn=task.collate, num_workers=dc.workers, pin_memory=cuda, persistent_workers=False
    )

    # --- 4. optimizer, schedule, scaler, DDP ----------------------------------------------------------------
    optimizer, schedule = build_optimizer(model, config.optim, t_total, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    net: nn.Module = model
    if dist.world_size > 1:
        net = DistributedDataParallel(
            model,
            device_ids=[device.index] if cuda else None,
            find_unused_parameters=tc.find_unused_parameters,
        )
    progress = Progress()
    if point is not None:
        progress = point.progress()
        _restore_state(point.state, optimizer, schedule, scaler, dist, tc.seed)
    else:
        seed_everything(tc.seed + dist.rank)  # dropout differs per rank, draws of the data do not
    log = RunLog(
        run_dir, dist.is_main, t_total, progress.step, dc.batch_size, tc.log_every, point is not None
    )
    loop = TrainLoop(
        config, task, run_dir, model, net, optimizer, schedule, scaler, dist, device,
        autocast(device, amp_dtype), log, progress, steps_per_epoch, stop_at, load, loader_kwargs,
    )  # fmt: skip
    hooks: list[Hook] = [EvalHook(valid_set), CheckpointHook()]
    if dist.is_main:
        logger.info(
            "%s: %d items, %d steps/epoch x %d epochs = %d steps; global batch %d = %d process(es) x %d "
            "accumulation x %d; device %s, amp %s%s, optimizer %s",
            task.name, len(train_set), steps_per_epoch, tc.epochs, t_total, dc.batch_size, dist.world_size,
            accum, micro, device, amp_dtype or "none", _tf32_note(device, tc.tf32), config.optim.name,
        )  # fmt: skip

    # --- 5. the loop ---------------------------------------------------------------------------------------
    p = progress
    try:
        while p.epoch < tc.epochs and p.step < stop_at:
            train_set.set_epoch(p.epoch)
            sampler = GlobalBatchSampler(
                len(train_set), dc.batch_size, micro, accum, dist.rank, dist.world_size, tc.seed, p.epoch,
                p.step_in_epoch,
            )  # fmt: skip
            # own generator: creating the iterator must not draw from the global RNG (exact resume)
            loader = DataLoader(
                train_set, batch_size=micro, sampler=sampler, generator=torch.Generator().manual_seed(p.epoch),
                **loader_kwargs,
            )  # fmt: skip
            batches = iter(loader)
            net.train()
            while p.step_in_epoch < steps_per_epoch and p.step < stop_at:
                loss, parts = forward_backward(loop, batches, accum)
                update(loop, loss, parts)
                for hook in hooks:
                    hook.after_step(loop)
            del batches, loader
            if p.step_in_epoch == steps_per_epoch:
                p.epoch, p.step_in_epoch = p.epoch + 1, 0

        # --- 6. the end ------------------------------------------------------------------------------------
        if dist.is_main:
            ckpt.save_model_dir(run_dir / "final", model, task.checkpoint_extras())
    finally:  # also when the run stops: the progress bar ends its line before any message
        log.close()
    if dist.is_main:
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    summary = _summary(task, run_dir, p, t_total, log.last_train_loss, loop.valid_metrics, t_start)
    dist.barrier()
    if own_dist:
        dist.close()
    return summary


def _device_and_precision(config: TrainConfig, dist: DistContext) -> tuple[torch.device, torch.dtype | None]:
    """This process's device (CUDA: set as current; CPU: allocator tuned), the autocast dtype, TF32 set."""
    tc = config.train
    device = resolve_device(tc.device or None, dist)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        tune_cpu_allocator()
    set_tf32(device, tc.tf32)
    return device, resolve_amp(tc.amp, device)


def _summary(
    task: Task,
    run_dir: Path,
    p: Progress,
    t_total: int,
    train_loss: float | None,
    valid: dict,
    t_start: float,
) -> dict[str, Any]:
    """What ``train`` returns (rank 0's view)."""
    return {
        "task": task.name,
        "step": p.step,
        "t_total": t_total,
        "epochs_done": p.epoch,
        "completed": p.step >= t_total,
        "train_loss": train_loss,
        "valid": valid,
        "best_score": p.best_score,
        "bad_steps": p.bad_total,
        "dropped_items": dict(
            getattr(task, "dropped_items", {})
        ),  # split -> items whose image is in no store
        "final": str(run_dir / "final"),
        "best": str(run_dir / "best") if p.best_score is not None else None,
        "seconds": time.perf_counter() - t_start,
    }


def _nothing_to_do(
    task: Task,
    run_dir: Path,
    model: nn.Module,
    point: ResumePoint,
    t_total: int,
    dist: DistContext,
    own_dist: bool,
    t_start: float,
) -> dict[str, Any]:
    """``--resume`` of a run whose last checkpoint is at (or past) the step it stops at: no step is taken, the logs
    are left as they are; ``final/`` is written from the checkpoint only when it is missing or damaged (a run
    killed while writing it). The summary says ``nothing_to_do``."""
    state = point.state
    final = run_dir / "final"
    if dist.is_main:
        problem = ckpt.verify_model_dir(final)
        if problem is not None:
            logger.info("%s: %s; written again from %s", final, problem, point.directory)
            ckpt.save_model_dir(final, model, task.checkpoint_extras())
    best = state.get("best_score")
    summary = {
        "task": task.name,
        "step": state["step"],
        "t_total": t_total,
        "epochs_done": state["epoch"],
        "completed": state["step"] >= t_total,
        "nothing_to_do": True,
        "train_loss": None,
        "valid": {},
        "best_score": best,
        "bad_steps": state.get("bad_steps_total", 0),
        "final": str(final),
        "best": str(run_dir / "best") if best is not None and (run_dir / "best").is_dir() else None,
        "seconds": time.perf_counter() - t_start,
    }
    dist.barrier()
    if own_dist:
        dist.close()
    return summary


# --------------------------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------------------------
def forward_backward(
    loop: TrainLoop, batches: Any, accum: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``accum`` micro batches: forward under autocast, backward (DDP syncing on the last one). Returns this
    rank's mean loss and loss parts (detached)."""
    device, world = loop.device, loop.dist.world_size
    loss_sum = torch.zeros((), device=device)
    parts_sum: dict[str, torch.Tensor] = {}
    for a in range(accum):
        batch = to_device(next(batches), device, non_blocking=device.type == "cuda")
        sync = loop.net.no_sync() if world > 1 and a < accum - 1 else nullcontext()
        with sync:
            with loop.autocast:
                out = loop.task.step(loop.net, batch, loop.progress.epoch)
            loop.scaler.scale(out.loss / accum).backward()
        loss_sum += out.loss.detach().float() / accum
        for name, value in out.parts.items():
            value = torch.as_tensor(value, device=device).detach().float() / accum
            parts_sum[name] = parts_sum[name] + value if name in parts_sum else value
    return loss_sum, parts_sum


def update(loop: TrainLoop, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
    """Clip, then the optimizer step unless the loss (any rank's) or the gradient norm is not finite; the
    schedule, the position and the log move on either way. Too many non-finite steps in a row stop the run."""
    p, scaler, tc = loop.progress, loop.scaler, loop.config.train
    if scaler.is_enabled():
        scaler.unscale_(loop.optimizer)
    clip = loop.config.optim.clip_grad_norm if loop.config.optim.clip_grad_norm > 0 else math.inf
    params = [q for q in loop.model.parameters() if q.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    # one small transfer per step: the global mean loss, the count of ranks with a non-finite loss, the norm,
    # this rank's loss parts
    names = sorted(parts)
    stats = torch.stack(
        [loss, (~torch.isfinite(loss)).float(), grad_norm.detach().float()] + [parts[k] for k in names]
    )
    if loop.dist.world_size > 1:
        torch_dist.all_reduce(stats[:2])
    loss_value, bad_ranks, norm_value, *part_values = stats.tolist()
    loss_value /= loop.dist.world_size
    lr = loop.schedule.get_last_lr()[0]
    bad = bad_ranks > 0 or (not math.isfinite(norm_value) and not scaler.is_enabled())
    if bad:
        p.bad_in_row += 1
        p.bad_total += 1
        logger.warning(
            "step %d: non-finite %s; update skipped (%d in a row, %d in all)",
            p.step + 1, "loss" if bad_ranks > 0 else "gradient norm", p.bad_in_row, p.bad_total,
        )  # fmt: skip
        if p.bad_in_row >= tc.max_bad_steps:
            raise TrainingStopped(
                f"stopped at step {p.step + 1} (epoch {p.epoch + 1}): {p.bad_in_row} non-finite losses in a row "
                f"(train.max_bad_steps={tc.max_bad_steps}); the region features read were finite (every record "
                f"is checked), so the training diverged: {_after_divergence(loop.run_dir)}"
            )
        if scaler.is_enabled():
            scaler.update()
    else:
        p.bad_in_row = 0
        scaler.step(loop.optimizer)
        scaler.update()
    loop.optimizer.zero_grad(set_to_none=True)
    loop.schedule.step()
    p.step += 1
    p.step_in_epoch += 1
    if bad:
        loop.log.skipped_step()
    else:
        epoch = p.epoch + p.step_in_epoch / loop.steps_per_epoch
        loop.log.train_step(p.step, epoch, lr, loss_value, dict(zip(names, part_values)), norm_value)


def _tf32_note(device: torch.device, tf32: bool) -> str:
    if device.type != "cuda":
        return ""
    return " (float32 matmuls: TF32)" if tf32 else " (float32 matmuls: IEEE, no TF32)"


def _after_divergence(run_dir: Path) -> str:
    """What to do after too many non-finite losses (optim.lr defines the run: a lower one is a new run)."""
    steps = ckpt.list_step_dirs(run_dir / "checkpoints")
    if not steps:
        return "no checkpoint was written yet; start again with train.amp=none (if it was fp16) or a lower optim.lr"
    step, path = steps[0]
    return (
        f"run the same command with train.amp=none (if it was fp16) and --resume to continue from {path} (step "
        f"{step}), or start a new run (another --output) with a lower optim.lr"
    )


def _device_type(device: str) -> str:
    return torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")


def _restore_state(
    state: dict[str, Any], optimizer: Any, schedule: Any, scaler: Any, dist: DistContext, seed: int
) -> None:
    """The optimizer, schedule, grad scaler and this rank's RNG states of a checkpoint."""
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if dist.rank < len(state["rng"]):
        ckpt.set_rng_state(state["rng"][dist.rank])
    else:
        logger.warning("rank %d: no RNG state in the checkpoint (fewer processes then); seeding", dist.rank)
        seed_everything(seed + dist.rank + 1000 * state["step"])
