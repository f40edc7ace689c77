"""`alignkit rm train|score|combine`: Bradley–Terry reward models, ensembles, and priority pairs."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from .. import config as cfglib
from ..data import (
    conversation,
    encode_pairs,
    parse_pairs,
    parse_scoring,
    read_records,
    template_ids,
    write_atomic,
    write_jsonl,
)
from ..models import LoraSettings, apply_lora, load_reward_model, load_tokenizer, resolve, save_model
from .batching import attention_mask, pad
from .loop import Task, TrainSettings, end_job, fit_model, start_job, train_eval_rows
from .losses import pairwise_loss, soft_pairwise_loss
from .reward import Aggregation, load_reward


@dataclass
class EnsembleSettings:
    """Reward-model ensembles (Coste et al. 2023)."""

    size: int = 1
    """Members to train (1: a single reward model). Members differ by seed."""
    bootstrap: bool = False
    """Also give each member its own bootstrap resample of the training pairs."""
    aggregation: Aggregation = "mean"
    """How scores combine: mean, min (worst case) or uwo (mean − λ·variance)."""
    uwo_lambda: float = 1.0
    """λ of uwo."""

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError("ensemble.size must be ≥ 1")


@dataclass
class RMConfig:
    """Reward-model training."""

    data: str
    """Preference pairs: JSONL {prompt, chosen, rejected, label?, margin?}, a save_to_disk folder or an HF dataset."""
    output_dir: str = "runs/rm"
    """Where the reward model (or ensemble folder), job_config.yaml and metrics go."""
    model: str = "default"
    """Backbone: hub id, local folder (an SFT output, say) or 'default'."""
    eval_data: str | None = None
    """Held-out pairs; when unset, train.eval_fraction of data is held out."""
    max_length: int = 512
    """Truncate each chosen/rejected sequence to this many tokens (counts are reported)."""
    loss: Literal["auto", "bt", "soft"] = "auto"
    """bt: −log σ(r_c − r_r − margin); soft: cross-entropy on soft labels; auto: soft if any label < 1."""
    use_margin: bool = False
    """Subtract each pair's `margin` field inside the Bradley–Terry loss."""
    ensemble: EnsembleSettings = field(default_factory=EnsembleSettings)
    """Ensemble settings."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings; lora.enabled=false trains full models (ensemble members then are full models)."""
    train: TrainSettings = field(default_factory=lambda: TrainSettings(lr=1.0e-4))
    """Optimisation, precision, evaluation and checkpoint settings."""


def rm_loss(pad_id: int, soft: bool, use_margin: bool):
    """Summed Bradley–Terry (or soft-label cross-entropy) loss of a batch of pairs; accuracy, margin sums."""

    def loss_sum(model, batch):
        seqs = [r["chosen_ids"] for r in batch] + [r["rejected_ids"] for r in batch]
        device = next(model.parameters()).device
        out = model(input_ids=pad(seqs, pad_id).to(device), attention_mask=attention_mask(seqs).to(device))
        rewards = out.logits[:, 0].float()
        chosen, rejected = rewards[: len(batch)], rewards[len(batch) :]  # (B,), (B,)
        if soft:
            labels = torch.tensor([r["label"] for r in batch], device=device)
            losses = soft_pairwise_loss(chosen, rejected, labels)
        else:
            margin = torch.tensor([r["margin"] for r in batch], device=device) if use_margin else None
            losses = pairwise_loss(chosen, rejected, margin)
        diff = (chosen - rejected).detach()
        return losses.sum(), {"accuracy": (diff > 0).float().sum(), "margin": diff.sum()}

    return loss_sum


def build_task(cfg: RMConfig, tok) -> tuple[Task, dict, bool]:
    """Read, validate and tokenise the pairs (DataError before any write), and whether the labels are soft."""

    def encode(src: str):
        return encode_pairs(parse_pairs(read_records(src), src), tok, cfg.max_length, src)

    rows, eval_rows, report = train_eval_rows(cfg.data, cfg.eval_data, encode, cfg.train)
    soft = cfg.loss == "soft" or (cfg.loss == "auto" and any(r["label"] < 1 for r in rows))
    longest = lambda r: 2 * max(len(r["chosen_ids"]), len(r["rejected_ids"]))  # noqa: E731
    task = Task(
        train_rows=rows,
        eval_rows=eval_rows,
        lengths=[longest(r) for r in rows],
        eval_lengths=[longest(r) for r in eval_rows],
        loss_sum=rm_loss(tok.pad_token_id, soft, cfg.use_margin),
        count=len,
        tokens=lambda batch: sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in batch),
        name="rm",
    )
    return task, report, soft


def bootstrap(task: Task, seed: int) -> Task:
    """The task on a bootstrap resample of its training rows (same size, drawn with replacement)."""
    g = torch.Generator().manual_seed(10_007 + seed)
    idx = torch.randint(len(task.train_rows), (len(task.train_rows),), generator=g).tolist()
    return replace(task, train_rows=[task.train_rows[i] for i in idx], lengths=[task.lengths[i] for i in idx])


def train_member(cfg: RMConfig, task: Task, tok, out: Path, seed: int, name: str, save: bool):
    """One reward model with seed `seed` into `out`: (metrics, accelerator, the model on the main process)."""
    settings = replace(cfg.train, run=replace(cfg.train.run, seed=seed))
    acc = start_job(cfg, settings.run, out, name, settings.batch_size, settings.grad_accum, save=save)

    def build(checkpointing: bool):
        return apply_lora(load_reward_model(cfg.model, tok.pad_token_id, checkpointing), cfg.lora, "SEQ_CLS")

    metrics, model = fit_model(acc, build, task, settings, out)
    return metrics, acc, model


def train_ensemble(cfg: RMConfig, task: Task, tok, out: Path, is_main: bool) -> dict:
    """K members into out/members/member-k (finished ones are kept on resume) and ensemble.json."""
    names, results = [f"member-{k}" for k in range(cfg.ensemble.size)], {}
    for k, name in enumerate(names):
        member_dir = out / "members" / name
        if (member_dir / "done.json").exists():  # resume: finished members are kept
            results[name] = json.loads((member_dir / "done.json").read_text())
            continue
        seed = cfg.train.run.seed + k
        member_task = bootstrap(task, seed) if cfg.ensemble.bootstrap else task
        metrics, acc, model = train_member(cfg, member_task, tok, member_dir, seed, f"rm-{name}", save=False)
        if acc.is_main_process:
            save_model(model, tok, member_dir, replace(cfg.lora, save_adapter_only=True))
            write_atomic(member_dir / "done.json", json.dumps(metrics))
            shutil.rmtree(member_dir / "checkpoints", ignore_errors=True)
        for tracker in acc.trackers:  # this member's; the process group stays for the next one
            tracker.finish()
        acc.wait_for_everyone()
        acc.free_memory()  # the member's prepared model goes while the process group is alive
        results[name] = metrics
    if is_main:
        lora = cfg.lora.enabled
        spec = {"members": [f"members/{n}" for n in names], "kind": "lora" if lora else "full"}
        spec |= {"base": resolve(cfg.model) if lora else None, "pad_token_id": tok.pad_token_id}
        spec |= {"aggregation": cfg.ensemble.aggregation, "uwo_lambda": cfg.ensemble.uwo_lambda}
        tok.save_pretrained(out)
        write_atomic(out / "ensemble.json", json.dumps(spec, indent=2))
    return results


def run(cfg: RMConfig) -> dict:
    out = Path(cfg.output_dir)
    tok = load_tokenizer(cfg.model)
    task, report, soft = build_task(cfg, tok)  # bad data fails here, before output_dir exists
    if cfg.ensemble.size == 1:
        metrics, acc, model = train_member(cfg, task, tok, out, cfg.train.run.seed, "rm", save=True)
        if acc.is_main_process:
            save_model(model, tok, out, cfg.lora)
        end_job(acc)
        return {**metrics, **report, "rm/soft_labels": soft}
    top = replace(cfg.train.run, tracker="none")  # each member logs to its own tracker
    acc = start_job(cfg, top, out, "rm", cfg.train.batch_size, cfg.train.grad_accum)
    results = train_ensemble(cfg, task, tok, out, acc.is_main_process)
    end_job(acc)
    keys = [k for k in next(iter(results.values())) if k.startswith("eval/")]
    summary = {f"{k}_mean": sum(r[k] for r in results.values()) / len(results) for k in keys}
    return {**summary, **report, "members": results}


@dataclass
class ScoreConfig:
    """Score {prompt, response} records with a reward model, ensemble or priority pair."""

    model: str
    """Reward folder written by `alignkit rm train` (or `rm combine`)."""
    input: str
    """JSONL of {prompt, response} records (strings or message lists)."""
    output: str
    """JSONL written with each record plus `score` (and `scores`, `std` for an ensemble). The resolved
    config goes next to it as <name>.job_config.yaml."""
    batch_size: int = 16
    """Sequences per forward pass."""
    max_length: int = 1024
    """Truncate each sequence to this many tokens."""


def score(cfg: ScoreConfig) -> dict:
    records = read_records(cfg.input)
    pairs = parse_scoring(records, cfg.input)
    reward = load_reward(cfg.model, batch_size=cfg.batch_size)
    seqs = [template_ids(reward.tokenizer, conversation(p, r))[: cfg.max_length] for p, r in pairs]
    result = reward.score_ids(seqs)
    rows = []
    for i, (_, rec) in enumerate(records):
        rec = dict(rec, score=result.reward[i])
        if result.parts is not None:
            rec["scores"] = [part[i] for part in result.parts.values()]
        if result.std is not None:
            rec["std"] = result.std[i]
        rows.append(rec)
    out = Path(cfg.output)
    write_jsonl(out, rows)
    cfglib.save(cfg, out.with_name(out.stem + ".job_config.yaml"))
    return {"records": len(records), "score/mean": sum(result.reward) / len(result.reward)}


@dataclass
class CombineConfig:
    """Combine reward folders by priority: a harmlessness RM gating a helpfulness RM, or N tiers."""

    output_dir: str
    """Folder to write priority.json (and job_config.yaml) into; it loads with `rm score` and `ppo`."""
    helpful: str | None = None
    """Helpfulness reward folder (single or ensemble); the two-tier form, with `harmless`."""
    harmless: str | None = None
    """Harmlessness reward folder (single or ensemble)."""
    threshold: float = 0.0
    """τ of the two-tier form: a harmlessness score below τ marks a response harmful."""
    tiers: list[str] = field(default_factory=list)
    """N reward folders, highest priority first (e.g. the safety, ethics and helpfulness RMs of
    `cai label tiers=...`); instead of helpful/harmless. See train.reward.tiered_combine."""
    thresholds: list[float] = field(default_factory=list)
    """τ of every tier but the last (empty: 0 for each)."""

    def __post_init__(self) -> None:
        if bool(self.tiers) == bool(self.helpful or self.harmless):
            raise ValueError("give either helpful and harmless, or tiers (two or more folders)")
        if self.tiers and len(self.tiers) < 2 or not self.tiers and not (self.helpful and self.harmless):
            raise ValueError("tiers needs two or more folders; the two-tier form needs helpful and harmless")
        if self.thresholds and len(self.thresholds) != len(self.tiers) - 1:
            raise ValueError(f"thresholds: one per tier but the last ({len(self.tiers) - 1})")


def combine(cfg: CombineConfig) -> dict:
    out = Path(cfg.output_dir)
    rel = lambda p: os.path.relpath(Path(p).resolve(), out.resolve())  # noqa: E731
    if cfg.tiers:
        thresholds = cfg.thresholds or [0.0] * (len(cfg.tiers) - 1)
        spec = {"tiers": [rel(t) for t in cfg.tiers], "thresholds": thresholds}
    else:
        spec = {"helpful": rel(cfg.helpful), "harmless": rel(cfg.harmless), "threshold": cfg.threshold}
    write_atomic(out / "priority.json", json.dumps(spec, indent=2))
    cfglib.save(cfg, out / "job_config.yaml")
    return spec
