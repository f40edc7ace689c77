"""`alignkit quickstart`: a short SFT + reward-model run on the embedded default model that shows both
learned something (held-out SFT loss falls; held-out RM pairwise accuracy rises above chance).
Data: first exchanges of ShareGPT conversations (training split only). Preference pairs take the real
reply as chosen and the reply to a different conversation as rejected, so the RM must learn relevance."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .. import config as cfglib
from ..data import write_atomic, write_jsonl
from ..sources import sharegpt_pairs
from . import rm, sft


@dataclass
class QuickstartConfig:
    """A short SFT + RM run that shows learning."""

    output_dir: str = "runs/quickstart"
    """Where data/, sft/, rm/ and summary.json go."""
    model: str = "default"
    """Starting model."""
    examples: int = 400
    """ShareGPT exchanges to use (15% are held out for evaluation)."""
    max_length: int = 160
    """Token length cap for both jobs."""
    sft_steps: int = 30
    """SFT optimiser steps (batch 8)."""
    rm_steps: int = 30
    """Reward-model optimiser steps (batch 8 pairs)."""
    seed: int = 0
    """Seed for both jobs."""


def write_data(out: Path, n: int) -> tuple[Path, Path]:
    exchanges = sharegpt_pairs("train", max_chars=800, limit=n)
    out.mkdir(parents=True, exist_ok=True)
    sft_rows = [
        {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
        for q, a in exchanges
    ]
    half = len(exchanges) // 2
    pairs = [
        {"prompt": q, "chosen": a, "rejected": exchanges[(i + half) % len(exchanges)][1]}
        for i, (q, a) in enumerate(exchanges)
    ]
    # every process may write: same bytes, each through its own temp file and an atomic rename
    write_jsonl(out / "sft.jsonl", sft_rows)
    write_jsonl(out / "pairs.jsonl", pairs)
    return out / "sft.jsonl", out / "pairs.jsonl"


def run(cfg: QuickstartConfig) -> dict:
    out = Path(cfg.output_dir)
    sft_data, pair_data = write_data(out / "data", cfg.examples)
    common = [f"max_length={cfg.max_length}", f"train.seed={cfg.seed}", "train.eval_fraction=0.15"]
    sft_keys = [f"data={sft_data}", f"model={cfg.model}", f"train.max_steps={cfg.sft_steps}"]
    sft_out = sft.run(cfglib.load(sft.SFTConfig, None, [*sft_keys, f"output_dir={out / 'sft'}", *common]))
    # LoRA + a fresh scalar head: lr 1e-4 barely moves it in 30 steps
    rm_keys = [f"data={pair_data}", f"model={out / 'sft'}", f"output_dir={out / 'rm'}", "train.lr=1.0e-3"]
    rm_out = rm.run(cfglib.load(rm.RMConfig, None, [*rm_keys, f"train.max_steps={cfg.rm_steps}", *common]))
    summary = {
        "sft/eval_loss_before": sft_out.get("before/loss"),
        "sft/eval_loss_after": sft_out["eval/loss"],
        "sft/tokens_per_s": sft_out["perf/tokens_per_s"],
        "rm/eval_accuracy_before": rm_out.get("before/accuracy"),
        "rm/eval_accuracy_after": rm_out["eval/accuracy"],
        "rm/eval_loss_before": rm_out.get("before/loss"),
        "rm/eval_loss_after": rm_out["eval/loss"],
        "rm/eval_pairs": rm_out["data/eval/examples"],
        "rm/eval_margin_after": rm_out["eval/margin"],
        "rm/tokens_per_s": rm_out["perf/tokens_per_s"],
    }
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    print(
        f"\nquickstart: SFT held-out loss {summary['sft/eval_loss_before']:.3f} → {summary['sft/eval_loss_after']:.3f}; "
        f"RM held-out accuracy {summary['rm/eval_accuracy_before']:.1%} → {summary['rm/eval_accuracy_after']:.1%} "
        f"on {summary['rm/eval_pairs']} pairs, loss {summary['rm/eval_loss_before']:.3f} → {summary['rm/eval_loss_after']:.3f}\n"
        f"models: {out / 'sft'} (SFT), {out / 'rm'} (reward model)"
    )
    return summary
