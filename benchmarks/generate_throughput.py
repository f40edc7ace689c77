"""Generation throughput: alignkit's HF backend (length-sorted, continuous batching) against a plain fp32
`model.generate` loop at the same batch size, same prompts and sampling, in alternating rounds; and, for
information (not like-for-like), alignkit at a larger batch.

    HF_HUB_OFFLINE=1 python benchmarks/generate_throughput.py [--prompts 48 --max-new-tokens 192 --rounds 2]
"""

from __future__ import annotations

import json
import random
import statistics
import time
from functools import partial

import harness
import torch

from alignkit.data import as_messages
from alignkit.gen import Request, Sampling
from alignkit.gen.hf import HFBackend
from alignkit.packs import load_pack


def plain_loop(model, tok, eos: set[int], texts: list[str], batch: int, max_new: int, seed: int):
    """What a user writes: left-padded batches in input order through model.generate."""
    torch.manual_seed(seed)
    tok.padding_side, n, t0, pad = "left", 0, time.perf_counter(), tok.pad_token_id
    for i in range(0, len(texts), batch):
        template = partial(tok.apply_chat_template, tokenize=False, add_generation_prompt=True)
        chat = [template(as_messages(q)) for q in texts[i : i + batch]]
        enc = tok(chat, return_tensors="pt", padding=True)
        with torch.inference_mode():
            kw = {"do_sample": True, "temperature": 0.7, "top_p": 1.0, "top_k": 0, "pad_token_id": pad}
            out = model.generate(**enc, max_new_tokens=max_new, **kw)
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            n += next((j for j, t in enumerate(row) if t in eos), len(row))
    return n, time.perf_counter() - t0


def engine(backend: HFBackend, texts: list[str], max_new: int, seed: int):
    reqs, t0 = [Request(str(i), as_messages(q)) for i, q in enumerate(texts)], time.perf_counter()
    n = sum(c.tokens[0] for c in backend.generate(reqs, Sampling(1, 0.7, 1.0, max_new, seed)))
    return n, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(
        __doc__,
        ("--prompts", int, 48, "prompts from the shipped harmful, benign and edgy packs"),
        ("--batch", int, 8, "concurrent sequences, both sides"),
        ("--max-new-tokens", int, 192, "longest answer"),
        ("--rounds", int, 2, "alternating rounds; medians over them"),
        ("--wide-batch", int, 32, "the larger batch shown for information"),
    )
    a = p.parse_args(argv)
    pool = [x.prompt for name in ("harmful", "benign", "edgy") for x in load_pack(name)]
    random.Random(0).shuffle(pool)
    texts = pool[: a.prompts]
    fp32 = HFBackend("default", "fp32", a.batch)
    wide = HFBackend("default", "fp32", a.wide_batch, model_obj=fp32.model, tok=fp32.tok)
    rows = []
    for r in range(a.rounds):
        seed = 1000 + r
        n0, t0 = plain_loop(fp32.model, fp32.tok, fp32.eos, texts, a.batch, a.max_new_tokens, seed)
        (n1, t1), (n2, t2) = (engine(b, texts, a.max_new_tokens, seed) for b in (fp32, wide))
        row = {"round": r, "plain_fp32": n0 / t0, "alignkit_fp32": n1 / t1, "alignkit_wide": n2 / t2}
        row |= {"tokens": [n0, n1, n2], "seconds": [t0, t1, t2]}
        row |= {"ratio_fp32": n1 / t1 / row["plain_fp32"], "ratio_wide": n2 / t2 / row["plain_fp32"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    keys = ("plain_fp32", "alignkit_fp32", "alignkit_wide", "ratio_fp32", "ratio_wide")
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    report = harness.report_base(a, argv, __file__, "transformers")
    result = {"config": report["args"], "command": report["command"], "machine": report["machine"]}
    result |= {"cpu": report["machine"]["cpu"], "threads": torch.get_num_threads()}
    result |= {"rounds": rows, "median": med}
    table_rows = [["plain `model.generate` loop, fp32", f"{med['plain_fp32']:.1f}", "1.00×"]]
    ratio = f"{med['ratio_fp32']:.2f}×"
    table_rows.append(["alignkit HF backend, fp32", f"{med['alignkit_fp32']:.1f}", ratio])
    wide_label = f"alignkit HF backend, fp32, batch {a.wide_batch} (not like-for-like)"
    table_rows.append([wide_label, f"{med['alignkit_wide']:.1f}", f"{med['ratio_wide']:.2f}×"])
    lines = [
        "# Generation throughput (default model)",
        "",
        f"`{report['command']}`: {report['machine']['summary']}, {torch.get_num_threads()} threads. "
        f"{a.prompts} prompts from the shipped packs, batch {a.batch}, temperature 0.7, max_new_tokens "
        f"{a.max_new_tokens}, {a.rounds} alternating rounds; generated tokens per second (EOS and padding not counted).",
        "",
        *harness.table("side|tokens/s (median)|vs plain fp32", table_rows),
    ]
    harness.write_results(a, "generate_throughput", result, lines)


if __name__ == "__main__":
    main()
