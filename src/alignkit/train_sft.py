"""`alignkit sft`: supervised fine-tuning on (prompt, completion) or message data, loss on completions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import config as cfglib
from .data import encode_sft, pad, parse_sft, read_records, split_eval
from .losses import IGNORE, selected_sft_loss_sum, sft_loss_sum, target_positions
from .models import (
    LoraSettings,
    apply_lora,
    count_parameters,
    final_model,
    load_causal_lm,
    load_tokenizer,
    save_model,
)
from .training import Task, TrainSettings, make_accelerator, train


@dataclass
class SFTConfig:
    """Supervised fine-tuning."""

    data: str = ""
    """Training data: a JSONL file ({prompt, completion} or {messages}), a save_to_disk folder or an HF dataset."""
    output_dir: str = "runs/sft"
    """Where the model (a plain HF folder), job_config.yaml, metrics.jsonl and checkpoints go."""
    model: str = "default"
    """HF causal LM: hub id, local folder, or 'default' (the embedded SmolLM2-135M-Instruct)."""
    eval_data: str | None = None
    """Held-out data in the same schema; when unset, train.eval_fraction of data is held out."""
    max_length: int = 512
    """Truncate token sequences to this length (counts are reported)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings; lora.enabled=false for a full fine-tune."""
    train: TrainSettings = field(default_factory=lambda: TrainSettings(lr=2.0e-4))
    """Optimisation, precision, evaluation and checkpoint settings."""

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("data is required (data=path/to/train.jsonl)")
        if self.max_length < 2:
            raise ValueError("max_length must be ≥ 2")


def build_task(cfg: SFTConfig, tok) -> tuple[Task, dict]:
    """Read, validate and tokenise the data (raises DataError before anything is written)."""
    rows, rep = encode_sft(parse_sft(read_records(cfg.data), cfg.data), tok, cfg.max_length, cfg.data)
    if cfg.eval_data:
        eval_rows, erep = encode_sft(
            parse_sft(read_records(cfg.eval_data), cfg.eval_data), tok, cfg.max_length, cfg.eval_data
        )
        report = {**rep.as_metrics("data/train"), **erep.as_metrics("data/eval")}
    else:
        tr, ev = split_eval(len(rows), cfg.train.eval_fraction, cfg.train.seed)
        rows, eval_rows = [rows[i] for i in tr], [rows[i] for i in ev]
        report = {**rep.as_metrics("data/train"), "data/eval/examples": len(eval_rows)}
    pad_id = tok.pad_token_id

    def loss_sum(model, batch):
        ids = pad([r["input_ids"] for r in batch], pad_id)
        labels = pad([r["labels"] for r in batch], IGNORE)
        mask = (
            torch.arange(ids.size(1))[None] < torch.tensor([len(r["input_ids"]) for r in batch])[:, None]
        ).long()
        device = next(model.parameters()).device
        labels = labels.to(device)
        keep = target_positions(labels)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep).logits
        if logits.dim() == 2:  # (N, V): the model projected the target positions only
            loss, _ = selected_sft_loss_sum(logits, labels)
        else:  # a model that ignores logits_to_keep: (B, T, V)
            loss, _ = sft_loss_sum(logits, labels)
        return loss, {}

    task = Task(
        train_rows=rows,
        eval_rows=eval_rows,
        lengths=[len(r["input_ids"]) for r in rows],
        eval_lengths=[len(r["input_ids"]) for r in eval_rows],
        loss_sum=loss_sum,
        count=lambda batch: sum(sum(t != IGNORE for t in r["labels"][1:]) for r in batch),
        tokens=lambda batch: sum(len(r["input_ids"]) for r in batch),
        name="sft",
    )
    return task, report


def run(cfg: SFTConfig) -> dict:
    out = Path(cfg.output_dir)
    tok = load_tokenizer(cfg.model)
    task, report = build_task(cfg, tok)  # bad data fails here, before output_dir exists
    acc = make_accelerator(cfg.train, out)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfglib.save(cfg, out / "job_config.yaml")
    if cfg.train.tracker != "none":
        acc.init_trackers("alignkit-sft", config=cfglib.to_dict(cfg))
    model = load_causal_lm(cfg.model, cfg.train.gradient_checkpointing)
    model = apply_lora(model, cfg.lora, "CAUSAL_LM")
    trainable, total = count_parameters(model)
    acc.print(
        f"sft: {len(task.train_rows)} train / {len(task.eval_rows)} eval examples, "
        f"{trainable:,} of {total:,} parameters trainable, data: {report}"
    )
    metrics = train(model, task, cfg.train, out, acc)
    metrics.update(report)
    acc.wait_for_everyone()
    final = final_model(acc, model, lambda: apply_lora(load_causal_lm(cfg.model), cfg.lora, "CAUSAL_LM"))
    if acc.is_main_process:
        save_model(final, tok, out, cfg.lora)
    acc.end_training()
    return metrics
