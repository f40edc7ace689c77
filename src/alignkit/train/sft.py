"""`alignkit sft`: supervised fine-tuning on (prompt, completion) or message data, loss on completions."""

from dataclasses import dataclass, field
from pathlib import Path

from ..data import encode_sft, parse_sft, read_records
from ..models import LoraSettings, apply_lora, load_causal_lm, load_tokenizer, save_model
from . import loop
from .batching import attention_mask, pad
from .loop import Task, TrainSettings, end_job, fit_model, start_job, train_eval_rows
from .losses import IGNORE, selected_sft_loss_sum, sft_loss_sum, target_positions


@dataclass
class SFTConfig:
    """Supervised fine-tuning."""

    data: str
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
        if self.max_length < 2:
            raise ValueError("max_length must be ≥ 2")


def sft_loss(pad_id: int):
    """Summed next-token cross-entropy over the completion tokens of a batch of rows {input_ids, labels},
    projecting onto the vocabulary only the positions that predict a target (`logits_to_keep`)."""

    def loss_sum(model, batch):
        seqs = [r["input_ids"] for r in batch]
        device = next(model.parameters()).device
        labels = pad([r["labels"] for r in batch], IGNORE).to(device)
        ids, mask = pad(seqs, pad_id).to(device), attention_mask(seqs).to(device)
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=target_positions(labels)).logits
        # (N, V): the model projected the target positions only; (B, T, V): it ignores logits_to_keep
        loss, _ = (selected_sft_loss_sum if logits.dim() == 2 else sft_loss_sum)(logits, labels)
        return loss, {}

    return loss_sum


def build_task(cfg: SFTConfig, tok) -> tuple[Task, dict]:
    """Read, validate and tokenise the data (raises DataError before anything is written)."""

    def encode(src: str):
        return encode_sft(parse_sft(read_records(src), src), tok, cfg.max_length, src)

    rows, eval_rows, report = train_eval_rows(cfg.data, cfg.eval_data, encode, cfg.train)
    return Task(
        train_rows=rows,
        eval_rows=eval_rows,
        lengths=[len(r["input_ids"]) for r in rows],
        eval_lengths=[len(r["input_ids"]) for r in eval_rows],
        loss_sum=sft_loss(tok.pad_token_id),
        count=lambda batch: sum(sum(t != IGNORE for t in r["labels"][1:]) for r in batch),
        tokens=lambda batch: sum(len(r["input_ids"]) for r in batch),
        name="sft",
    ), report


def run(cfg: SFTConfig) -> dict:
    out = Path(cfg.output_dir)
    tok = load_tokenizer(cfg.model)
    task, report = build_task(cfg, tok)  # bad data fails here, before output_dir exists
    acc = start_job(cfg, cfg.train.run, out, "sft", cfg.train.batch_size, cfg.train.grad_accum)

    def build(checkpointing: bool):
        return apply_lora(load_causal_lm(cfg.model, checkpointing), cfg.lora, "CAUSAL_LM")

    metrics, model = fit_model(acc, build, task, cfg.train, out)
    if acc.is_main_process:
        save_model(model, tok, out, cfg.lora)
    end_job(acc)
    return {**metrics, **report}


def heldout_loss(model: str, data: str, max_length: int = 512, batch_size: int = 8) -> float:
    """Mean NLL per completion token of `model` on `data` ({prompt, completion}), nothing trained."""
    cfg = SFTConfig(data=data, eval_data=data, model=model, max_length=max_length)
    task, _ = build_task(cfg, load_tokenizer(model))
    acc = loop.make_accelerator(loop.RunSettings(), Path(cfg.output_dir), batch_size)
    return loop.evaluate(load_causal_lm(model).to(acc.device), task, acc, batch_size)["eval/loss"]
