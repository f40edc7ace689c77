"""Fine-tune the shipped MiniLM encoder for the guard: a LoRA adapter trained on the four guard tasks at
once (jailbreak and harmful request on the prompt; refusal on the response; output harm on the prompt and
the response), one linear head per task over the shared mean-pooled embedding.

    python scripts/train_guard_encoder.py [--data runs/guard-data] [--out src/alignkit/detect/weights/encoder]

`--data` holds the labelled sets that `scripts/build_guard_classifiers.py` (or
`assemble` in `scripts/guard_data.py`) writes. Only their encoder split is read: the train split stays for
the classifiers' heads, the validation split for calibration and thresholds, the dev split for
`benchmarks/guard.py`.
`--leave-out FAMILY` drops that attack family's positives (the leave-one-family-out protocol). Each batch
is half positives, half negatives of one task, tasks in turn. Deterministic for a seed on one machine.
Then rebuild the classifiers with `encoder=default:encoder` (the build script's default).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer

from alignkit.data import read_records
from alignkit.detect.classifiers import SHIPPED_DIR
from alignkit.detect.features import minilm_path
from alignkit.models import use_bf16

TASKS = {  # task: (labelled set, fields embedded)
    "jailbreak": ("jailbreak", ["text"]),
    "harmful_request": ("harmful_request", ["text"]),
    "refusal": ("refusal", ["response"]),
    "output_harm": ("output_harm", ["prompt", "response"]),
}


def rows(data: Path, name: str, leave_out: str | None) -> tuple[list[dict], list[dict]]:
    """(positives, negatives) of the train split of one labelled set."""
    recs = [rec for _, rec in read_records(str(data / f"{name}.jsonl"))]
    recs = [
        r for r in recs if r.get("split") == "train" and not (r["label"] and r.get("family") == leave_out)
    ]
    return [r for r in recs if r["label"]], [r for r in recs if not r["label"]]


def embed(model, tok, texts: list[str], max_length: int) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings, as `alignkit.detect.features.Encoder` computes them."""
    enc = tok([t[: 8 * max_length] for t in texts], padding=True, truncation=True, max_length=max_length,
              return_tensors="pt")  # fmt: skip
    h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("runs/guard-data"), help="the assembled labelled sets")
    ap.add_argument("--out", type=Path, default=SHIPPED_DIR / "encoder", help="adapter folder written")
    ap.add_argument("--steps", type=int, default=700, help="optimizer steps (tasks in turn)")
    ap.add_argument("--batch-size", type=int, default=32, help="texts per step (half positive)")
    ap.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate of the adapter and heads")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--max-length", type=int, default=64, help="tokens read per text (as the classifiers)")
    ap.add_argument("--leave-out", default=None, help="an attack family whose positives are not trained on")
    ap.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch draws")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    base = AutoModel.from_pretrained(minilm_path(), dtype=torch.float32)
    lora = LoraConfig(
        r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.05, target_modules=["query", "key", "value", "dense"]
    )
    model = get_peft_model(base, lora)
    dim = base.config.hidden_size
    heads = torch.nn.ModuleDict({t: torch.nn.Linear(dim * len(f), 1) for t, (_, f) in TASKS.items()})
    data = {t: rows(a.data, name, a.leave_out) for t, (name, _) in TASKS.items()}
    params = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    # the heads start at zero over unit-length embeddings: they need a larger step than the adapter
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": a.lr},
              {"params": list(heads.parameters()), "lr": 20 * a.lr}]  # fmt: skip
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, [a.lr, 20 * a.lr], total_steps=a.steps, pct_start=0.06)
    bf16 = use_bf16("auto")  # autocast where the CPU has bf16 (about twice as fast there)
    model.train()
    bar = tqdm(range(a.steps), desc="guard encoder", unit="step")
    losses = {t: [] for t in TASKS}
    t0 = time.time()
    for step in bar:
        task = list(TASKS)[step % len(TASKS)]
        pos, neg = data[task]
        half = a.batch_size // 2
        batch = rng.sample(pos, min(half, len(pos))) + rng.sample(neg, min(half, len(neg)))
        y = torch.tensor([float(r["label"]) for r in batch])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            emb = torch.cat([embed(model, tok, [str(r.get(f) or "") for r in batch], a.max_length)
                             for f in TASKS[task][1]], dim=1)  # fmt: skip
            logits = heads[task](emb).squeeze(-1).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses[task].append(loss.item())
        bar.set_postfix({t: f"{sum(v[-20:]) / max(len(v[-20:]), 1):.3f}" for t, v in losses.items() if v})
    a.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(a.out))
    (a.out / "README.md").unlink(missing_ok=True)  # peft's generated model card
    info = {"steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "rank": a.rank, "max_length": a.max_length,
            "leave_out": a.leave_out, "seed": a.seed, "bf16": bf16, "seconds": round(time.time() - t0),
            "final_loss": {t: round(sum(v[-50:]) / len(v[-50:]), 4) for t, v in losses.items()}}  # fmt: skip
    (a.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
