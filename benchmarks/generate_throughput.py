"""Generation throughput: alignkit's HF backend against a plain fp32 `model.generate` loop, same batch size.

Both sides get the same prompts (shipped probe packs, chat template applied), the same sampling
(temperature 0.7, max_new_tokens) and the same number of concurrent sequences. The plain loop takes
prompts in file order, batch by batch, as a user script would; alignkit sorts prompts by length and
refills finished slots (continuous batching). Rounds alternate the sides so drift hits both; ratios
are computed within a round. For information (not like-for-like), alignkit at a larger batch too: on a
CPU, decoding a small model is bound by reading the weights, so more rows per step come almost free.

    HF_HUB_OFFLINE=1 python benchmarks/generate_throughput.py [--prompts 48 --max-new-tokens 192 --rounds 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from alignkit.generate import HFBackend, Request, Sampling, as_messages
from alignkit.probes import load_pack


def prompts(count: int, seed: int = 0) -> list[str]:
    pool = [p.prompt for name in ("harmful", "benign", "edgy") for p in load_pack(name)]
    random.Random(seed).shuffle(pool)
    return pool[:count]


def plain_loop(model, tok, eos: set[int], texts: list[str], batch: int, max_new: int, seed: int):
    """What a user writes: left-padded batches in input order through model.generate."""
    torch.manual_seed(seed)
    tok.padding_side = "left"
    n = 0
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        chat = [
            tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            for q in texts[i : i + batch]
        ]
        enc = tok(chat, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=max_new,
                do_sample=True,
                temperature=0.7,
                top_p=1.0,
                top_k=0,
                pad_token_id=tok.pad_token_id,
            )
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            n += next((j for j, t in enumerate(row) if t in eos), len(row))
    return n, time.perf_counter() - t0


def engine(backend: HFBackend, texts: list[str], max_new: int, seed: int):
    reqs = [Request(str(i), as_messages(q)) for i, q in enumerate(texts)]
    t0 = time.perf_counter()
    comps = list(backend.generate(reqs, Sampling(1, 0.7, 1.0, max_new, seed)))
    return sum(c.tokens[0] for c in comps), time.perf_counter() - t0, comps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--wide-batch", type=int, default=32, help="the larger batch shown for information")
    ap.add_argument("--out", default="benchmarks/results/generate_throughput")
    a = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    texts = prompts(a.prompts)
    fp32 = HFBackend("default", "fp32", a.batch)
    wide = HFBackend("default", "fp32", a.wide_batch, model_obj=fp32.model, tok=fp32.tok)
    rows = []
    for r in range(a.rounds):
        seed = 1000 + r
        n0, t0 = plain_loop(fp32.model, fp32.tok, fp32.eos, texts, a.batch, a.max_new_tokens, seed)
        n1, t1, _ = engine(fp32, texts, a.max_new_tokens, seed)
        n2, t2, _ = engine(wide, texts, a.max_new_tokens, seed)
        row = {
            "round": r,
            "plain_fp32": n0 / t0,
            "alignkit_fp32": n1 / t1,
            "alignkit_wide": n2 / t2,
            "tokens": [n0, n1, n2],
            "seconds": [t0, t1, t2],
        }
        row["ratio_fp32"] = row["alignkit_fp32"] / row["plain_fp32"]
        row["ratio_wide"] = row["alignkit_wide"] / row["plain_fp32"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    med = {
        k: statistics.median(r[k] for r in rows)
        for k in ("plain_fp32", "alignkit_fp32", "alignkit_wide", "ratio_fp32", "ratio_wide")
    }
    result = {
        "config": vars(a),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "rounds": rows,
        "median": med,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = [
        "# Generation throughput (default model, CPU)",
        "",
        f"{a.prompts} prompts from the shipped packs, batch {a.batch}, temperature 0.7, max_new_tokens {a.max_new_tokens}, {a.rounds} alternating rounds; generated tokens per second (EOS and padding not counted).",
        "",
        "| side | tokens/s (median) | vs plain fp32 |",
        "| --- | --- | --- |",
        f"| plain `model.generate` loop, fp32 | {med['plain_fp32']:.1f} | 1.00× |",
        f"| alignkit HF backend, fp32 | {med['alignkit_fp32']:.1f} | {med['ratio_fp32']:.2f}× |",
        f"| alignkit HF backend, fp32, batch {a.wide_batch} (not like-for-like) | {med['alignkit_wide']:.1f} | {med['ratio_wide']:.2f}× |",
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
