"""The training machinery every job shares: accelerator, optimiser and schedule, the step loop with
exact gradient accumulation, evaluation, metrics, checkpoints and exact resume.

Batches are a pure function of (seed, epoch), losses are sums normalised by the count of the whole
global batch, and RNG, optimiser and scheduler state go through `accelerator.save_state`. Together that
makes accumulation equal one big batch, N processes equal one, and resume equal an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

CKPT = "checkpoints"


@dataclass
class TrainSettings:
    """Optimisation, schedule, precision, evaluation and checkpointing, shared by every training job."""

    batch_size: int = 8
    """Examples per optimiser step, over all processes and accumulation micro-batches together."""
    grad_accum: int = 1
    """Micro-batches each process splits its share of a step into (saves memory, same result)."""
    lr: float = 1.0e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    warmup_ratio: float = 0.05
    """Fraction of the steps spent warming the learning rate up linearly from 0."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0 disables)."""
    epochs: float = 1.0
    """Passes over the training data (fractions allowed); max_steps wins when set."""
    max_steps: int = 0
    """Stop after this many optimiser steps (0: use epochs)."""
    seed: int = 0
    """Seed for data order, initialisation, dropout and the eval split."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """bf16 autocast or fp32. auto: bf16 on a GPU or a CPU with native bf16 (AVX-512 BF16/AMX)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    group_by_length: bool = True
    """Batch examples of similar length together so that padding wastes little compute."""
    eval_fraction: float = 0.05
    """Share of the data held out for evaluation when no eval_data is given."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0: none but the final model)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir with the same data order, optimiser and RNG."""
    log_every: int = 1
    """Write training metrics every N steps."""
    tracker: Literal["none", "tensorboard", "wandb"] = "none"
    """Also log metrics to this accelerate tracker."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be ≥ 1")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.eval_fraction < 1:
            raise ValueError("warmup_ratio and eval_fraction must be in [0, 1)")


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(precision: str) -> bool:
    if precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported() or cpu_has_bf16()
    return precision == "bf16"


def make_accelerator(settings: TrainSettings, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    acc = Accelerator(
        mixed_precision="bf16" if use_bf16(settings.precision) else "no",
        log_with=None if settings.tracker == "none" else settings.tracker,
        project_dir=str(output_dir),
        # without a GPU, processes started by torchrun / `accelerate launch --multi_gpu` join over gloo
        cpu=not torch.accelerator.is_available(),
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and acc.num_processes == 1:  # each would train alone and overwrite the others' output
        raise RuntimeError(f"launched as {world} processes but accelerate runs {acc.num_processes}")
    if settings.batch_size % (acc.num_processes * settings.grad_accum):
        from .config import ConfigError

        raise ConfigError(
            f"train.batch_size {settings.batch_size} is the global batch: it must be divisible by "
            f"processes × train.grad_accum = {acc.num_processes} × {settings.grad_accum}"
        )
    if acc.state.deepspeed_plugin is not None:  # no dataloader is prepared: DeepSpeed needs the sizes
        from .config import ConfigError

        if settings.grad_accum != 1:  # accelerator.backward steps the DeepSpeed engine every call
            raise ConfigError("train.grad_accum must be 1 under DeepSpeed (use FSDP to accumulate)")
        acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = (
            settings.batch_size // acc.num_processes
        )
    set_seed(settings.seed)
    return acc


def make_optimizer(model, settings: TrainSettings, total_steps: int, fused: bool = True):
    """AdamW (fused kernel unless sharded: ~3% faster a step on this CPU) and the LR schedule."""
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused)
    sched = get_scheduler(
        "constant_with_warmup" if settings.lr_scheduler == "constant" else settings.lr_scheduler,
        opt,
        num_warmup_steps=int(settings.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    return opt, sched


class MetricsLog:
    """`metrics.jsonl` in output_dir, one object per line with `step` and `group/name` keys."""

    def __init__(self, path: Path, accelerator, resume_step: int | None = None):
        self.path, self.acc = path, accelerator
        if accelerator.is_main_process and resume_step is not None and path.exists():
            kept = [
                ln for ln in path.read_text().splitlines() if json.loads(ln).get("step", 0) <= resume_step
            ]
            path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.acc.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.acc.trackers:
            self.acc.log(metrics, step=step)


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted((output_dir / CKPT).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def save_checkpoint(acc, output_dir: Path, step: int, keep: int) -> None:
    """accelerate state (model, optimiser, scheduler, RNG) + step, written to a temp dir then renamed."""
    root = output_dir / CKPT
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()


@dataclass
class Task:
    """What a job plugs into `train`: its rows, how to batch them and how to compute a loss.

    `loss_sum(model, rows)` returns (summed loss, metric sums) for a micro-batch; `count(rows)` gives the
    normaliser (tokens for SFT, pairs for RM), so the step loss is Σ loss / Σ count over the global batch.
    """

    train_rows: list[dict]
    eval_rows: list[dict]
    lengths: list[int]
    eval_lengths: list[int]
    loss_sum: Callable[[Any, list[dict]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    count: Callable[[list[dict]], int]
    tokens: Callable[[list[dict]], int]
    name: str
    """Shown on the progress bar."""


def _shard(batch: list[int], acc, grad_accum: int) -> list[list[int]]:
    """This process's share of a global batch, split into micro-batches."""
    mine = batch[acc.process_index :: acc.num_processes]
    size = math.ceil(len(mine) / grad_accum)
    return [mine[i : i + size] for i in range(0, len(mine), size)]


def total_steps(n: int, settings: TrainSettings) -> int:
    per_epoch = max(1, n // settings.batch_size)
    return settings.max_steps or max(1, math.ceil(per_epoch * settings.epochs))


def evaluate(model, task: Task, acc, batch_size: int) -> dict[str, float]:
    """Σ loss / Σ count over the eval rows, shared out over processes, plus any metric sums."""
    if not task.eval_rows:
        return {}
    model.eval()
    order = sorted(range(len(task.eval_rows)), key=lambda i: task.eval_lengths[i])
    loss = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        mine = order[acc.process_index :: acc.num_processes]
        # every process runs the same number of forward passes (DDP buffer broadcasts, FSDP/ZeRO-3
        # parameter gathers are collectives); a process short of rows runs a filler pass weighted 0
        n_batches = math.ceil(math.ceil(len(order) / acc.num_processes) / batch_size)
        for b in range(n_batches):
            idx = mine[b * batch_size : (b + 1) * batch_size]
            rows = [task.eval_rows[i] for i in idx or order[:1]]
            w = 1.0 if idx else 0.0
            with acc.autocast():
                ls, ms = task.loss_sum(model, rows)
            loss += w * ls.double().cpu()
            count += w * task.count(rows)
            for k, v in ms.items():
                sums[k] = sums.get(k, 0) + w * v.double().cpu()
    totals = acc.reduce(torch.stack([loss, count, *[sums[k] for k in sorted(sums)]]).to(acc.device), "sum")
    totals = totals.cpu()
    model.train()
    out = {"eval/loss": (totals[0] / totals[1]).item()}
    for i, k in enumerate(sorted(sums)):
        out[f"eval/{k}"] = (totals[2 + i] / totals[1]).item()
    return out


def train(model, task: Task, settings: TrainSettings, output_dir: Path, acc) -> dict:
    """Run the optimisation loop; return the last train and eval metrics.

    Steps: 1. global batch from the (seed, epoch) order; 2. this process's micro-batches, loss summed and
    normalised by the global count, backward without sync until the last; 3. clip, step, schedule;
    4. log, evaluate, checkpoint.
    """
    from tqdm.auto import tqdm

    steps = total_steps(len(task.train_rows), settings)
    sharded = acc.is_fsdp2 or acc.distributed_type.name in ("FSDP", "DEEPSPEED")
    opt, sched = make_optimizer(model, settings, steps, fused=not sharded)
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)
    start = 0
    if settings.resume and (ck := latest_checkpoint(output_dir)) is not None:
        acc.load_state(str(ck))
        start = json.loads((ck / "trainer_state.json").read_text())["step"]
    log = MetricsLog(output_dir / "metrics.jsonl", acc, resume_step=start if settings.resume else None)
    if not settings.resume and acc.is_main_process:
        (output_dir / "metrics.jsonl").write_text("")
    per_epoch = max(1, len(task.train_rows) // settings.batch_size)
    bar = tqdm(total=steps, initial=start, desc=task.name, disable=not acc.is_main_process)
    last: dict[str, float] = {}
    baseline: dict[str, float] = {}
    if start == 0 and task.eval_rows:  # the untrained baseline, so curves show what training changed
        before = evaluate(model, task, acc, max(1, settings.batch_size // settings.grad_accum))
        log.log(0, before)
        baseline = {k.replace("eval/", "before/"): v for k, v in before.items()}
    model.train()
    t0, tokens_done = time.perf_counter(), 0
    epoch_cache: tuple[int, list] = (-1, [])
    for step in range(start, steps):
        # 1. the global batch for this step
        epoch, offset = divmod(step, per_epoch)
        if epoch_cache[0] != epoch:
            epoch_cache = (epoch, _order(task, settings, epoch))
        batch = epoch_cache[1][offset % len(epoch_cache[1])]
        # 2. micro-batches; Σ loss / global count makes accumulation and N processes exact
        norm = task.count([task.train_rows[i] for i in batch]) / acc.num_processes
        micro = _shard(batch, acc, settings.grad_accum)
        loss_total, metric_sums = 0.0, {}
        for j, idx in enumerate(micro):
            rows = [task.train_rows[i] for i in idx]
            ctx = acc.no_sync(model) if j < len(micro) - 1 else contextlib.nullcontext()
            with ctx:
                with acc.autocast():
                    ls, ms = task.loss_sum(model, rows)
                acc.backward(ls / norm)
            loss_total += ls.item()
            for k, v in ms.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v.item()
            tokens_done += task.tokens(rows)
        # 3. clip, update, schedule
        grad_norm = (
            acc.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            if settings.max_grad_norm
            else None
        )
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
        # 4. log, evaluate, checkpoint
        done = step + 1
        sums = acc.reduce(torch.tensor([loss_total, *metric_sums.values()], device=acc.device), "sum").cpu()
        total_count = norm * acc.num_processes
        last = {"train/loss": sums[0].item() / total_count}
        for i, k in enumerate(metric_sums):
            last[f"train/{k}"] = sums[1 + i].item() / total_count
        if not math.isfinite(last["train/loss"]):
            raise FloatingPointError(
                f"loss is {last['train/loss']} at step {done}; last good checkpoint kept"
            )
        last["train/lr"] = sched.get_last_lr()[0]
        if grad_norm is not None:
            last["train/grad_norm"] = float(grad_norm)
        elapsed = time.perf_counter() - t0
        last["perf/tokens_per_s"] = tokens_done * acc.num_processes / max(elapsed, 1e-9)
        bar.set_postfix(loss=f"{last['train/loss']:.4f}")
        if done % settings.log_every == 0 or done == steps:
            log.log(done, last)
        if (settings.eval_every and done % settings.eval_every == 0) or done == steps:
            ev = evaluate(model, task, acc, max(1, settings.batch_size // settings.grad_accum))
            if ev:
                log.log(done, ev)
                last.update(ev)
        if settings.save_every and done % settings.save_every == 0 and done < steps:
            save_checkpoint(acc, output_dir, done, settings.keep_checkpoints)
    bar.close()
    return {**baseline, **last}


def _order(task: Task, settings: TrainSettings, epoch: int) -> list[list[int]]:
    from .data import batch_order

    return batch_order(task.lengths, settings.batch_size, settings.seed, epoch, settings.group_by_length)
