"""The training machinery every job shares: run settings, accelerator, optimiser, the step loop, evaluation,
metrics, checkpoints, resume and gathering the model. Batches are a pure function of (seed, epoch), losses
are sums normalised by the whole global batch's count, and RNG, optimiser and scheduler state go through
`accelerator.save_state`: accumulation equals one big batch, N processes one, resume an uninterrupted run."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psutil
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from .. import config as cfglib
from ..config import ConfigError, high_water_mb, inline, peak_rss_mb
from ..data import write_atomic
from ..models import count_parameters, use_bf16
from .batching import batch_order, process_share, split_eval, token_split

CKPT = "checkpoints"


@dataclass
class RunSettings:
    """What every training job shares: seed, precision, gradient clipping, checkpoints and logging."""

    seed: int = 0
    """Seed of everything random: data or prompt order, initialisation, sampling, the eval split."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """bf16 autocast or fp32; auto: bf16 on GPUs and CPUs with native bf16 (ALIGNKIT_PRECISION overrides)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0 disables)."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0: none but the final model)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir; the result equals an uninterrupted run."""
    log_every: int = 1
    """Write training metrics every N steps."""
    tracker: Literal["none", "tensorboard", "wandb"] = "none"
    """Also log metrics to this accelerate tracker (under output_dir)."""


@dataclass
class TrainSettings:
    """Optimisation, schedule, evaluation and the run settings of the supervised training jobs."""

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
    epochs: float = 1.0
    """Passes over the training data (fractions allowed); max_steps wins when set."""
    max_steps: int = 0
    """Stop after this many optimiser steps (0: use epochs)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    micro_tokens: int = 768
    """Cap on the padded tokens of one forward/backward pass (an RM pair counts both sequences): micro-batches
    are split further until each fits. The result is the same; activation memory is bounded (0: no cap)."""
    group_by_length: bool = True
    """Batch examples of similar length together so that padding wastes little compute."""
    eval_fraction: float = 0.05
    """Share of the data held out for evaluation when no eval_data is given."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    run: RunSettings = inline(RunSettings)
    """Seed, precision, clipping, checkpoints and logging (their keys sit in this section: train.seed=...)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be ≥ 1")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.eval_fraction < 1:
            raise ValueError("warmup_ratio and eval_fraction must be in [0, 1)")


def make_accelerator(
    run: RunSettings,
    output_dir: Path,
    batch_size: int,
    grad_accum: int = 1,
    batch_key: str = "train.batch_size",
) -> Accelerator:
    """The accelerator of a job whose step takes `batch_size` (config key `batch_key`) over all processes."""
    mixed = "bf16" if use_bf16(run.precision) else "no"
    if AcceleratorState._shared_state.get("_mixed_precision", mixed) != mixed:
        # one process may run jobs of different precisions in turn (pipeline stages, tests); accelerate
        # refuses a change of its one state per process, so the last job's is cleared (the group stays)
        AcceleratorState._reset_state()
    acc = Accelerator(
        mixed_precision=mixed,
        log_with=None if run.tracker == "none" else run.tracker,
        project_dir=str(output_dir),
        cpu=not torch.accelerator.is_available(),  # no GPU: torchrun/accelerate launch processes use gloo
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and acc.num_processes == 1:  # each would train alone and overwrite the others' output
        raise RuntimeError(f"launched as {world} processes but accelerate runs {acc.num_processes}")
    if batch_size % (acc.num_processes * grad_accum):
        raise ConfigError(
            f"{batch_key} {batch_size} is the global batch: it must be divisible by "
            f"processes × train.grad_accum = {acc.num_processes} × {grad_accum}"
        )
    if (ds := acc.state.deepspeed_plugin) is not None:  # no dataloader is prepared: DeepSpeed needs the sizes
        if grad_accum != 1:  # accelerator.backward steps the DeepSpeed engine every call
            raise ConfigError("train.grad_accum must be 1 under DeepSpeed (use FSDP to accumulate)")
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size // acc.num_processes
    set_seed(run.seed)
    return acc


def start_job(
    cfg: Any, run: RunSettings, output_dir: Path, name: str, batch_size: int, grad_accum: int = 1, save=True
):
    acc = make_accelerator(run, output_dir, batch_size, grad_accum)
    record_job(acc, cfg, run, output_dir, name, save)
    return acc


def record_job(acc, cfg: Any, run: RunSettings, output_dir: Path, name: str, save: bool = True) -> None:
    """Job `name`'s resolved config into output_dir/job_config.yaml (if `save`), and its tracker started."""
    if acc.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if save:
            cfglib.save(cfg, output_dir / "job_config.yaml")
    if run.tracker != "none":
        acc.init_trackers(f"alignkit-{name}", config=cfglib.to_dict(cfg))


def make_optimizer(model, settings: TrainSettings, total_steps: int, fused: bool = True):
    """AdamW (fused kernel unless sharded: ~3% faster a step on this CPU) and the LR schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused)
    name = "constant_with_warmup" if settings.lr_scheduler == "constant" else settings.lr_scheduler
    warmup = int(settings.warmup_ratio * total_steps)
    return opt, get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total_steps)


class MetricsLog:
    """`metrics.jsonl` in output_dir, one object per line with `step` and `group/name` keys."""

    def __init__(self, path: Path, accelerator, resume_step: int | None = None):
        self.path, self.acc = path, accelerator
        if accelerator.is_main_process and resume_step is not None and path.exists():
            lines = path.read_text().splitlines()
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= resume_step]
            write_atomic(path, "".join(ln + "\n" for ln in kept))

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


def open_run(acc, output_dir: Path, resume: bool) -> tuple[int, MetricsLog]:
    """The step to start at (the newest checkpoint's, restored, on resume; else 0) and the metrics log."""
    start = 0
    if resume and (ck := latest_checkpoint(output_dir)) is not None:
        acc.load_state(str(ck))
        start = json.loads((ck / "trainer_state.json").read_text())["step"]
    log = MetricsLog(output_dir / "metrics.jsonl", acc, resume_step=start if resume else None)
    if not resume and acc.is_main_process:
        write_atomic(output_dir / "metrics.jsonl", "")
    return start, log


def end_job(acc) -> None:
    """Free accelerate's objects, then end trackers and group (a DDP reducer freed after it can deadlock)."""
    acc.wait_for_everyone()
    acc.free_memory()
    gc.collect()
    acc.end_training()


def final_model(acc, model, build):
    """The whole, unwrapped model on the main process (None elsewhere); a collective under ZeRO-3 or FSDP."""
    kind = acc.distributed_type
    zero3 = kind == DistributedType.DEEPSPEED and acc.deepspeed_config["zero_optimization"]["stage"] == 3
    if kind != DistributedType.FSDP and not zero3:  # each process holds all the weights
        return acc.unwrap_model(model) if acc.is_main_process else None
    state = acc.get_state_dict(acc._models[-1])  # the prepared model: DeepSpeed engine or FSDP module
    return load_full_state(build(), state) if acc.is_main_process else None


def load_full_state(model, state: dict):
    """Load a gathered state dict; a tied weight may come under one of its names only."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in missing if own[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise RuntimeError(
            f"gathered weights do not fit the model: missing {missing}, unexpected {unexpected}"
        )
    return model


@dataclass
class Task:
    """What `train` runs: `loss_sum(model, rows)` → (Σ loss, metric sums), the step loss Σ loss / Σ count."""

    train_rows: list[dict]
    eval_rows: list[dict]
    lengths: list[int]
    """Padded tokens of each row in a forward pass (an RM pair: twice its longer sequence)."""
    eval_lengths: list[int]
    loss_sum: Callable[[Any, list[dict]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    count: Callable[[list[dict]], int]
    tokens: Callable[[list[dict]], int]
    name: str
    """Shown on the progress bar."""


def total_steps(n: int, settings: TrainSettings) -> int:
    per_epoch = max(1, n // settings.batch_size)
    return settings.max_steps or max(1, math.ceil(per_epoch * settings.epochs))


def evaluate(model, task: Task, acc, batch_size: int) -> dict[str, float]:
    """Σ loss / Σ count over the eval rows, shared out over processes, plus any metric sums."""
    if not task.eval_rows:
        return {}
    model.eval()
    order = sorted(range(len(task.eval_rows)), key=lambda i: task.eval_lengths[i])
    loss, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
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
    names = sorted(sums)
    totals = acc.reduce(torch.stack([count, loss, *(sums[k] for k in names)]).to(acc.device), "sum").cpu()
    model.train()
    return {f"eval/{k}": (t / totals[0]).item() for k, t in zip(["loss", *names], totals[1:], strict=True)}


def step_batch(model, task: Task, batch: list[int], settings: TrainSettings, acc) -> tuple[dict, int]:
    """Steps 2–3 of `train`: micro-batch losses normalised by the global count → (metrics, tokens read)."""
    norm = task.count([task.train_rows[i] for i in batch]) / acc.num_processes
    micro = process_share(batch, acc.process_index, acc.num_processes, settings.grad_accum)
    if acc.distributed_type != DistributedType.DEEPSPEED:  # its engine steps at every backward
        micro = token_split(micro, task.lengths, settings.micro_tokens)
    loss_total, metric_sums, tokens = 0.0, {}, 0
    padded = max(len(idx) * max(task.lengths[i] for i in idx) for idx in micro)
    for j, idx in enumerate(micro):
        rows = [task.train_rows[i] for i in idx]
        with acc.no_sync(model) if j < len(micro) - 1 else contextlib.nullcontext():
            with acc.autocast():
                ls, ms = task.loss_sum(model, rows)
            acc.backward(ls / norm)
        loss_total += ls.item()
        for k, v in ms.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + v.item()
        tokens += task.tokens(rows)
    sums = acc.reduce(torch.tensor([loss_total, *metric_sums.values()], device=acc.device), "sum").cpu()
    total_count = norm * acc.num_processes
    keys = ["loss", *metric_sums]
    metrics = {f"train/{k}": s / total_count for k, s in zip(keys, sums.tolist(), strict=True)}
    return metrics | {"perf/micro_tokens": padded}, tokens


def check_memory(acc, task: Task, settings: TrainSettings, rss0: float | None, padded: int) -> None:
    """After a run's first step: stop with the settings to lower if the largest micro-batch of the run,
    scaled from this step's growth by its tokens, would need more memory than is free."""
    rows = math.ceil(settings.batch_size / acc.num_processes / settings.grad_accum)
    largest = rows * max(task.lengths)
    if settings.micro_tokens:
        largest = min(largest, max(settings.micro_tokens, max(task.lengths)))
    if rss0 is None or (now := high_water_mb()) is None:  # not Linux: no per-step high-water mark
        return
    grown = now - rss0
    need, free = grown * max(largest / padded - 1, 0), psutil.virtual_memory().available / 2**20
    if acc.reduce(torch.tensor(float(need > free), device=acc.device), "sum").item():
        raise ConfigError(
            f"not enough memory: the first step grew this process by {grown:,.0f} MB for {padded} padded "
            f"tokens, so the largest micro-batch ({largest:,} tokens) needs about {need:,.0f} MB more, and "
            f"{free:,.0f} MB are free. Lower train.micro_tokens (now {settings.micro_tokens}), "
            "train.batch_size or max_length, or set train.gradient_checkpointing=true"
        )


def global_batch(task: Task, settings: TrainSettings, step: int, cache: dict) -> list[int]:
    """The indices of step `step`'s global batch; each epoch's order is computed once (kept in `cache`)."""
    epoch, offset = divmod(step, max(1, len(task.train_rows) // settings.batch_size))
    if epoch not in cache:
        cache.clear()
        cache[epoch] = batch_order(
            task.lengths, settings.batch_size, settings.run.seed, epoch, settings.group_by_length
        )
    return cache[epoch][offset % len(cache[epoch])]


def train(model, task: Task, settings: TrainSettings, output_dir: Path, acc) -> dict:
    """The optimisation loop (steps below) → the untrained baseline (before/...) and the last metrics."""
    run, steps = settings.run, total_steps(len(task.train_rows), settings)
    sharded = acc.is_fsdp2 or acc.distributed_type.name in ("FSDP", "DEEPSPEED")
    opt, sched = make_optimizer(model, settings, steps, fused=not sharded)
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)
    start, log = open_run(acc, output_dir, run.resume)
    eval_batch = max(1, settings.batch_size // settings.grad_accum)
    bar = tqdm(total=steps, initial=start, desc=task.name, disable=not acc.is_main_process)
    last, baseline = {}, {}
    if start == 0 and task.eval_rows:  # the untrained baseline, so curves show what training changed
        before = evaluate(model, task, acc, eval_batch)
        log.log(0, before)
        baseline = {k.replace("eval/", "before/"): v for k, v in before.items()}
    model.train()
    t0, tokens_done, orders, rss0 = time.perf_counter(), 0, {}, high_water_mb(reset=True)
    for step in range(start, steps):
        # 1.–2. the global batch, this process's micro-batches, forward and backward
        last, tokens = step_batch(model, task, global_batch(task, settings, step, orders), settings, acc)
        tokens_done += tokens
        if step == start:
            check_memory(acc, task, settings, rss0, int(last["perf/micro_tokens"]))
        # 3. clip, update, schedule
        grad_norm = acc.clip_grad_norm_(model.parameters(), run.max_grad_norm) if run.max_grad_norm else None
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
        done = step + 1  # 4. log, evaluate, checkpoint
        if not math.isfinite(last["train/loss"]):
            raise FloatingPointError(
                f"loss is {last['train/loss']} at step {done}; last good checkpoint kept"
            )
        last["train/lr"] = sched.get_last_lr()[0]
        if grad_norm is not None:
            last["train/grad_norm"] = float(grad_norm)
        last["perf/tokens_per_s"] = tokens_done * acc.num_processes / max(time.perf_counter() - t0, 1e-9)
        last["perf/peak_rss_mb"] = peak_rss_mb()
        bar.set_postfix(loss=f"{last['train/loss']:.4f}")
        if done % run.log_every == 0 or done == steps:
            log.log(done, last)
        if (settings.eval_every and done % settings.eval_every == 0) or done == steps:
            if ev := evaluate(model, task, acc, eval_batch):
                log.log(done, ev)
                last.update(ev)
        if run.save_every and done % run.save_every == 0 and done < steps:
            save_checkpoint(acc, output_dir, done, run.keep_checkpoints)
    bar.close()
    return {**baseline, **last}


def train_eval_rows(data: str, eval_data: str | None, encode: Callable, settings: TrainSettings):
    """(train rows, eval rows, report) via `encode(source)`; no eval_data: a seeded eval_fraction held out."""
    rows, rep = encode(data)
    if eval_data:
        eval_rows, erep = encode(eval_data)
        return rows, eval_rows, {**rep.as_metrics("data/train"), **erep.as_metrics("data/eval")}
    tr, ev = split_eval(len(rows), settings.eval_fraction, settings.run.seed)
    report = {**rep.as_metrics("data/train"), "data/eval/examples": len(ev)}
    return [rows[i] for i in tr], [rows[i] for i in ev], report


def fit_model(acc, build: Callable[[bool], Any], task: Task, settings: TrainSettings, output_dir: Path):
    """`build(gradient_checkpointing)`, train and gather the model (see final_model) → (metrics, model)."""
    model = build(settings.gradient_checkpointing)
    trainable, total = count_parameters(model)
    acc.print(
        f"{task.name}: {len(task.train_rows)} train / {len(task.eval_rows)} eval rows, "
        f"{trainable:,} of {total:,} parameters trainable"
    )
    metrics = train(model, task, settings, output_dir, acc)
    acc.wait_for_everyone()
    return metrics, final_model(acc, model, lambda: build(False))
