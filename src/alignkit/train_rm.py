"""`alignkit rm train|score|combine`: Bradley–Terry reward models, ensembles, and priority pairs."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from . import config as cfglib
from .data import attention_mask, encode_pairs, pad, parse_pairs, parse_scoring, read_records, split_eval
from .ensemble import Aggregation, load_scorer
from .losses import pairwise_loss, soft_pairwise_loss
from .models import (
    LoraSettings,
    apply_lora,
    count_parameters,
    final_model,
    load_reward_model,
    load_tokenizer,
    resolve,
    save_model,
)
from .training import Task, TrainSettings, make_accelerator, train


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

    data: str = ""
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

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("data is required (data=path/to/pairs.jsonl)")


def build_task(cfg: RMConfig, tok) -> tuple[Task, dict, bool]:
    pairs = parse_pairs(read_records(cfg.data), cfg.data)
    rows, rep = encode_pairs(pairs, tok, cfg.max_length, cfg.data)
    if cfg.eval_data:
        eval_rows, erep = encode_pairs(
            parse_pairs(read_records(cfg.eval_data), cfg.eval_data), tok, cfg.max_length, cfg.eval_data
        )
        report = {**rep.as_metrics("data/train"), **erep.as_metrics("data/eval")}
    else:
        tr, ev = split_eval(len(rows), cfg.train.eval_fraction, cfg.train.seed)
        rows, eval_rows = [rows[i] for i in tr], [rows[i] for i in ev]
        report = {**rep.as_metrics("data/train"), "data/eval/examples": len(eval_rows)}
    soft = cfg.loss == "soft" or (cfg.loss == "auto" and any(r["label"] < 1 for r in rows))
    pad_id = tok.pad_token_id

    def loss_sum(model, batch):
        seqs = [r["chosen_ids"] for r in batch] + [r["rejected_ids"] for r in batch]
        device = next(model.parameters()).device
        rewards = (
            model(input_ids=pad(seqs, pad_id).to(device), attention_mask=attention_mask(seqs).to(device))
            .logits[:, 0]
            .float()
        )
        chosen, rejected = rewards[: len(batch)], rewards[len(batch) :]  # (B,), (B,)
        if soft:
            losses = soft_pairwise_loss(
                chosen, rejected, torch.tensor([r["label"] for r in batch], device=device)
            )
        else:
            margin = torch.tensor([r["margin"] for r in batch], device=device) if cfg.use_margin else None
            losses = pairwise_loss(chosen, rejected, margin)
        diff = (chosen - rejected).detach()
        return losses.sum(), {"accuracy": (diff > 0).float().sum(), "margin": diff.sum()}

    task = Task(
        train_rows=rows,
        eval_rows=eval_rows,
        lengths=[max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows],
        eval_lengths=[max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in eval_rows],
        loss_sum=loss_sum,
        count=len,
        tokens=lambda batch: sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in batch),
        name="rm",
    )
    return task, report, soft


def _bootstrap(task: Task, seed: int) -> Task:
    g = torch.Generator().manual_seed(10_007 + seed)
    idx = torch.randint(len(task.train_rows), (len(task.train_rows),), generator=g).tolist()
    return Task(
        **{
            **task.__dict__,
            "train_rows": [task.train_rows[i] for i in idx],
            "lengths": [task.lengths[i] for i in idx],
        }
    )


def _train_member(cfg: RMConfig, task: Task, tok, out: Path, seed: int) -> tuple[dict, object, object]:
    from dataclasses import replace

    settings = replace(cfg.train, seed=seed)
    acc = make_accelerator(settings, out)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    model = load_reward_model(cfg.model, tok.pad_token_id, settings.gradient_checkpointing)
    model = apply_lora(model, cfg.lora, "SEQ_CLS")
    trainable, total = count_parameters(model)
    acc.print(
        f"rm (seed {seed}): {len(task.train_rows)} train / {len(task.eval_rows)} eval pairs, {trainable:,} of {total:,} trainable"
    )
    metrics = train(model, task, settings, out, acc)
    acc.wait_for_everyone()

    def build():  # a fresh unsharded copy for the weights gathered under ZeRO-3 / FSDP
        return apply_lora(load_reward_model(cfg.model, tok.pad_token_id), cfg.lora, "SEQ_CLS")

    return metrics, acc, final_model(acc, model, build)  # None on all but the main process


def run(cfg: RMConfig) -> dict:
    out = Path(cfg.output_dir)
    tok = load_tokenizer(cfg.model)
    task, report, soft = build_task(cfg, tok)  # bad data fails here, before output_dir exists
    is_main = make_accelerator(cfg.train, out).is_main_process  # validates the batch layout first
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfglib.save(cfg, out / "job_config.yaml")
    if cfg.ensemble.size == 1:
        metrics, acc, model = _train_member(cfg, task, tok, out, cfg.train.seed)
        if acc.is_main_process:
            save_model(model, tok, out, cfg.lora)
        return {**metrics, **report, "rm/soft_labels": soft}
    names, results = [f"member-{k}" for k in range(cfg.ensemble.size)], {}
    for k, name in enumerate(names):
        member_dir = out / "members" / name
        if (member_dir / "done.json").exists():  # resume: finished members are kept
            results[name] = json.loads((member_dir / "done.json").read_text())
            continue
        seed = cfg.train.seed + k
        member_task = _bootstrap(task, seed) if cfg.ensemble.bootstrap else task
        metrics, acc, model = _train_member(cfg, member_task, tok, member_dir, seed)
        if acc.is_main_process:
            lora = LoraSettings(**{**cfg.lora.__dict__, "save_adapter_only": True})
            save_model(model, tok, member_dir, lora)
            (member_dir / "done.json").write_text(json.dumps(metrics))
            shutil.rmtree(member_dir / "checkpoints", ignore_errors=True)
        acc.wait_for_everyone()
        results[name] = metrics
    if is_main:
        spec = {
            "members": [f"members/{n}" for n in names],
            "kind": "lora" if cfg.lora.enabled else "full",
            "base": resolve(cfg.model) if cfg.lora.enabled else None,
            "pad_token_id": tok.pad_token_id,
            "aggregation": cfg.ensemble.aggregation,
            "uwo_lambda": cfg.ensemble.uwo_lambda,
        }
        tok.save_pretrained(out)
        (out / "ensemble.json").write_text(json.dumps(spec, indent=2))
    keys = [k for k in next(iter(results.values())) if k.startswith("eval/")]
    summary = {f"{k}_mean": sum(r[k] for r in results.values()) / len(results) for k in keys}
    return {**summary, **report, "members": results}


@dataclass
class ScoreConfig:
    """Score {prompt, response} records with a reward model, ensemble or priority pair."""

    model: str = ""
    """Reward folder written by `alignkit rm train` (or `rm combine`)."""
    input: str = ""
    """JSONL of {prompt, response} records (strings or message lists)."""
    output: str = ""
    """JSONL written with each record plus `score` (and `scores`, `std` for an ensemble)."""
    batch_size: int = 16
    """Sequences per forward pass."""
    max_length: int = 1024
    """Truncate each sequence to this many tokens."""

    def __post_init__(self) -> None:
        for k in ("model", "input", "output"):
            if not getattr(self, k):
                raise ValueError(f"{k} is required")


def score(cfg: ScoreConfig) -> dict:
    from .data import _template, conversation

    records = read_records(cfg.input)
    pairs = parse_scoring(records, cfg.input)
    scorer = load_scorer(cfg.model, batch_size=cfg.batch_size)
    seqs = [_template(scorer.tokenizer, conversation(p, r))[: cfg.max_length] for p, r in pairs]
    result = scorer.score_ids(seqs)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as f:
        for i, (_, rec) in enumerate(records):
            rec = dict(rec, score=result.score[i])
            if result.scores is not None:
                rec["scores"] = result.scores[i]
            if result.std is not None:
                rec["std"] = result.std[i]
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.rename(out)
    return {"records": len(records), "score/mean": sum(result.score) / len(result.score)}


@dataclass
class CombineConfig:
    """Combine a helpfulness and a harmlessness reward folder by priority (harmlessness gates)."""

    helpful: str = ""
    """Helpfulness reward folder (single or ensemble)."""
    harmless: str = ""
    """Harmlessness reward folder (single or ensemble)."""
    output_dir: str = ""
    """Folder to write priority.json into; it loads with `rm score` and the PPO job."""
    threshold: float = 0.0
    """τ: a harmlessness score below τ marks a response harmful; see ensemble.priority_combine."""

    def __post_init__(self) -> None:
        for k in ("helpful", "harmless", "output_dir"):
            if not getattr(self, k):
                raise ValueError(f"{k} is required")


def combine(cfg: CombineConfig) -> dict:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "helpful": os.path.relpath(Path(cfg.helpful).resolve(), out.resolve()),
        "harmless": os.path.relpath(Path(cfg.harmless).resolve(), out.resolve()),
        "threshold": cfg.threshold,
    }
    (out / "priority.json").write_text(json.dumps(spec, indent=2))
    return spec
