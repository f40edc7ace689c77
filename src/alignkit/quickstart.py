"""`alignkit quickstart`: a short SFT + reward-model run on the embedded default model that shows both
learned something (held-out SFT loss falls; held-out RM pairwise accuracy rises above chance).

Data: first exchanges of ShareGPT conversations (training split only). Preference pairs take the real
reply as chosen and the reply to a different conversation as rejected, so the RM must learn relevance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import config as cfglib
from .data import write_atomic
from .sources import sharegpt_pairs


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
    sft = [
        {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
        for q, a in exchanges
    ]
    half = len(exchanges) // 2
    pairs = [
        {"prompt": q, "chosen": a, "rejected": exchanges[(i + half) % len(exchanges)][1]}
        for i, (q, a) in enumerate(exchanges)
    ]
    for name, records in (("sft.jsonl", sft), ("pairs.jsonl", pairs)):
        # every process may write: same bytes, each through its own temp file and an atomic rename
        write_atomic(out / name, "".join(json.dumps(r) + "\n" for r in records))
    return out / "sft.jsonl", out / "pairs.jsonl"


def run(cfg: QuickstartConfig) -> dict:
    from .train_rm import RMConfig
    from .train_rm import run as run_rm
    from .train_sft import SFTConfig
    from .train_sft import run as run_sft

    out = Path(cfg.output_dir)
    sft_data, pair_data = write_data(out / "data", cfg.examples)
    common = [f"max_length={cfg.max_length}", f"train.seed={cfg.seed}", "train.eval_fraction=0.15"]
    sft = run_sft(
        cfglib.load(
            SFTConfig,
            None,
            [
                f"data={sft_data}",
                f"model={cfg.model}",
                f"output_dir={out / 'sft'}",
                f"train.max_steps={cfg.sft_steps}",
                *common,
            ],
        )
    )
    rm = run_rm(
        cfglib.load(
            RMConfig,
            None,
            [
                f"data={pair_data}",
                f"model={out / 'sft'}",
                f"output_dir={out / 'rm'}",
                f"train.max_steps={cfg.rm_steps}",
                "train.lr=1.0e-3",  # LoRA + a fresh scalar head: 1e-4 barely moves it in 30 steps
                *common,
            ],
        )
    )
    summary = {
        "sft/eval_loss_before": sft.get("before/loss"),
        "sft/eval_loss_after": sft["eval/loss"],
        "sft/tokens_per_s": sft["perf/tokens_per_s"],
        "rm/eval_accuracy_before": rm.get("before/accuracy"),
        "rm/eval_accuracy_after": rm["eval/accuracy"],
        "rm/eval_loss_before": rm.get("before/loss"),
        "rm/eval_loss_after": rm["eval/loss"],
        "rm/eval_pairs": rm["data/eval/examples"],
        "rm/eval_margin_after": rm["eval/margin"],
        "rm/tokens_per_s": rm["perf/tokens_per_s"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\nquickstart: SFT held-out loss {summary['sft/eval_loss_before']:.3f} → {summary['sft/eval_loss_after']:.3f}; "
        f"RM held-out accuracy {summary['rm/eval_accuracy_before']:.1%} → {summary['rm/eval_accuracy_after']:.1%} "
        f"on {summary['rm/eval_pairs']} pairs, loss {summary['rm/eval_loss_before']:.3f} → {summary['rm/eval_loss_after']:.3f}\n"
        f"models: {out / 'sft'} (SFT), {out / 'rm'} (reward model)"
    )
    return summary
