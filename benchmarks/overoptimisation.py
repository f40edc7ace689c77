"""Reward-model overoptimisation at toy scale, with best-of-n sampling (Gao et al. 2022, arXiv:2210.10760;
Coste et al. 2023, arXiv:2310.02743).

A "gold" reward model stands in for human preference; proxy reward models are trained on a small,
noisy slice of the gold-labelled pairs. Best-of-n with a proxy buys proxy reward at a KL cost of
log n − (n−1)/n nats; the question is whether gold reward keeps pace, peaks then falls (overoptimisation),
and whether an ensemble of proxies (min: worst case; UWO: mean − λ·variance) holds it up.

Data: first exchanges of non-reserved ShareGPT conversations (`sharegpt_pairs(split="train")`,
deduplicated by prompt). Preference pairs, as in `alignkit quickstart`: chosen = the real reply; rejected
= the reply of another conversation (off-topic), plus, where the reply has more than one sentence, a
second pair whose rejected reply is the real reply cut after its first sentence (truncated). Pairs are
split by prompt: 15 % of prompts are held out and the gold RM trains on the other 85 %. A disjoint set
of short prompts (never in any pair) is kept for best-of-n.

Reward models: the frozen default backbone (SmolLM2-135M-Instruct, fp32) and a linear head on the last
hidden state (after the final norm) of the last token of the chat-templated (prompt, response), i.e.
an HF sequence-classification reward model with the backbone frozen. Features are computed once and
cached. Heads minimise the Bradley–Terry loss −log σ(r_c − r_r) + (l2/2)·‖w‖² on standardised features
(full-batch L-BFGS). Gold: all gold-training pairs. Proxies: K heads, each on its own random fraction
of the gold-training pairs with a share of the labels flipped. Control: one head on the union of the
proxies' noisy subsets (does an ensemble help by ensembling, or by seeing more data?).

Best-of-n: N samples per prompt from the default model (temperature 1, top_p 1, `alignkit.generate.
HFBackend`), scored by every head; the expected gold and proxy reward of best-of-n for n = 1, 2, 4, …, N
come from the unbiased estimator over the N samples (Gao et al. 2022, App. I), with a bootstrap over
prompts for the gold intervals.

    HF_HUB_OFFLINE=1 python benchmarks/overoptimisation.py [--pairs 2000 --prompts 48 --n 32 --seed 0]
    HF_HUB_OFFLINE=1 python benchmarks/overoptimisation.py --pairs 60 --prompts 4 --n 4   # smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from alignkit.data import _template, conversation
from alignkit.ensemble import aggregate

MODEL = "default"
MAX_CHARS = 700  # prompt and reply length cap for the preference exchanges (characters)
BON_PROMPT_CHARS = 300  # best-of-n prompts are short, to keep generation and scoring cheap
METHODS = ("single", "mean", "min", "uwo")
LABEL = {"single": "single proxy", "mean": "ensemble mean", "min": "ensemble min", "uwo": "ensemble UWO"}


# ---------------------------------------------------------------- data


def first_sentence(reply: str) -> str | None:
    """The reply up to its first sentence end (. ! ? : before whitespace) or line break, if that is at
    most half of it; else None (a one-sentence reply gives no truncated negative)."""
    m = re.search(r"[.!?:](?=\s)|\n", reply)
    if not m:
        return None
    cut = reply[: m.end()].strip()
    return cut if cut and len(cut) <= 0.5 * len(reply) else None


def build_data(n_pairs: int, n_prompts: int, seed: int, heldout: float) -> dict:
    """Best-of-n prompts and preference pairs from disjoint, deduplicated ShareGPT training exchanges."""
    from alignkit.sources import sharegpt_pairs

    seen, exchanges = set(), []
    for q, a in sharegpt_pairs(split="train", max_chars=MAX_CHARS):
        key = " ".join(q.lower().split())
        if key not in seen:
            seen.add(key)
            exchanges.append((q, a))
    random.Random(seed).shuffle(exchanges)
    bon, rest = [], []
    for q, a in exchanges:
        (bon if len(bon) < n_prompts and len(q) <= BON_PROMPT_CHARS else rest).append((q, a))
    if len(bon) < n_prompts:
        raise SystemExit(f"only {len(bon)} short prompts available for best-of-n")
    # take exchanges until they give n_pairs pairs (1 off-topic + 1 truncated where possible each)
    used, count = [], 0
    for q, a in rest:
        if count >= n_pairs:
            break
        used.append((q, a))
        count += 1 + (first_sentence(a) is not None)
    if count < n_pairs:
        raise SystemExit(f"only {count} pairs available (asked for {n_pairs})")
    half = len(used) // 2
    pairs = []
    for i, (q, a) in enumerate(used):
        pairs.append(
            {
                "ex": i,
                "prompt": q,
                "chosen": a,
                "rejected": used[(i + half) % len(used)][1],
                "kind": "off-topic",
            }
        )
        cut = first_sentence(a)
        if cut is not None:
            pairs.append({"ex": i, "prompt": q, "chosen": a, "rejected": cut, "kind": "truncated"})
    pairs = pairs[:n_pairs]
    n_ex = pairs[-1]["ex"] + 1
    # hold out whole exchanges (prompts), so no held-out pair shares a sequence with a training pair
    order = list(range(n_ex))
    random.Random(seed + 1).shuffle(order)
    held = set(order[: max(1, round(heldout * n_ex))])
    for p in pairs:
        p["split"] = "heldout" if p["ex"] in held else "train"
    return {"bon_prompts": [q for q, _ in bon], "pairs": pairs, "exchanges_used": n_ex}


# ---------------------------------------------------------------- features


class Featurizer:
    """Last-token final hidden state of the frozen backbone, cached by token ids."""

    def __init__(self, cache: Path, max_tokens: int, batch_tokens: int = 4096, max_batch: int = 16):
        from alignkit.models import load_causal_lm, load_tokenizer

        self.tok = load_tokenizer(MODEL)
        self.backbone = load_causal_lm(MODEL).model.eval()  # the decoder stack, final norm included
        self.max_tokens, self.batch_tokens, self.max_batch = max_tokens, batch_tokens, max_batch
        self.path = cache / f"features_{MODEL}_fp32_last-token.pt"
        self.store: dict[str, torch.Tensor] = {}
        if self.path.exists():
            blob = torch.load(self.path)
            self.store = dict(zip(blob["keys"], blob["feats"], strict=True))
        self.truncated = 0

    def ids(self, prompt: str, response: str) -> list[int]:
        """Chat-templated ids; a sequence over max_tokens keeps its head and the template's closing
        tokens (end-of-turn + newline), so the scored token is always the end of the reply."""
        ids = _template(self.tok, conversation(prompt, response))
        if len(ids) > self.max_tokens:
            self.truncated += 1
            ids = ids[: self.max_tokens - 2] + ids[-2:]
        return ids

    @staticmethod
    def key(ids: list[int]) -> str:
        return hashlib.sha1(np.asarray(ids, dtype=np.int32).tobytes()).hexdigest()

    def save(self) -> None:
        keys = sorted(self.store)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"keys": keys, "feats": torch.stack([self.store[k] for k in keys])}, tmp)
        tmp.replace(self.path)

    @torch.inference_mode()
    def __call__(self, seqs: list[list[int]], desc: str) -> tuple[torch.Tensor, int]:
        """(len(seqs), hidden) features; computes only those not cached. Returns (features, computed)."""
        keys = [self.key(s) for s in seqs]
        todo = sorted(
            {k: s for k, s in zip(keys, seqs, strict=True) if k not in self.store}.items(),
            key=lambda kv: -len(kv[1]),
        )
        batches, cur = [], []
        for kv in todo:  # longest first, batches capped by rows and padded tokens
            if cur and (len(cur) + 1 > self.max_batch or (len(cur) + 1) * len(cur[0][1]) > self.batch_tokens):
                batches.append(cur)
                cur = []
            cur.append(kv)
        if cur:
            batches.append(cur)
        last_save = time.perf_counter()
        bar = tqdm(
            total=sum(len(s) for _, s in todo), desc=desc, unit="tok", unit_scale=True, disable=not todo
        )
        for batch in batches:
            lens = torch.tensor([len(s) for _, s in batch])
            width = int(lens.max())
            ids = torch.tensor([s + [self.tok.pad_token_id] * (width - len(s)) for _, s in batch])
            mask = (torch.arange(width)[None] < lens[:, None]).long()
            hidden = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            last = hidden[torch.arange(len(batch)), lens - 1].float()
            for (k, _), h in zip(batch, last, strict=True):
                self.store[k] = h.clone()
            bar.update(int(lens.sum()))
            if time.perf_counter() - last_save > 120:  # a killed run keeps most of its work
                self.save()
                last_save = time.perf_counter()
        bar.close()
        if todo:
            self.save()
        return torch.stack([self.store[k] for k in keys]), len(todo)


# ---------------------------------------------------------------- reward heads


def train_head(diff: torch.Tensor, l2: float, iters: int) -> torch.Tensor:
    """w minimising mean softplus(−diff·w) + (l2/2)‖w‖², diff = z_chosen − z_rejected (standardised)."""
    d = diff.double()
    w = torch.zeros(d.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w],
        lr=1.0,
        max_iter=iters,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = F.softplus(-(d @ w)).mean() + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float()


def pair_accuracy(rc: torch.Tensor, rr: torch.Tensor) -> float:
    return float((rc > rr).float().mean())


# ---------------------------------------------------------------- best-of-n


def bon_weights(big_n: int, n: int) -> np.ndarray:
    """Weight of the i-th lowest-ranked of big_n samples (1-based i) being the top of a uniformly random
    n-subset: C(i−1, n−1) / C(big_n, n)."""
    return np.array([math.comb(i - 1, n - 1) / math.comb(big_n, n) for i in range(1, big_n + 1)])


def bon_curves(proxy: np.ndarray, gold: np.ndarray, ns: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt expected (gold, proxy) reward of best-of-n under the proxy. (P, N) → (P, len(ns)) each."""
    order = np.argsort(proxy, axis=1, kind="stable")
    g_sorted = np.take_along_axis(gold, order, 1)
    p_sorted = np.take_along_axis(proxy, order, 1)
    w = np.stack([bon_weights(proxy.shape[1], n) for n in ns], 1)  # (N, len(ns))
    return g_sorted @ w, p_sorted @ w


def _clean(v):
    """Round-off zeros (−1e−17) to 0.0 so that tables do not show −0.000."""
    if isinstance(v, float):
        return 0.0 if abs(v) < 1e-12 else v
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def within_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over prompts (rows) of the Pearson correlation over samples (columns)."""
    return float(
        np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b, strict=True) if x.std() > 0 and y.std() > 0])
    )


def kl_bon(n: int) -> float:
    return math.log(n) - (n - 1) / n


# ---------------------------------------------------------------- sampling


def sample(prompts: list[str], n: int, max_new: int, seed: int, cache: Path):
    """N samples per prompt, one generate call per prompt (seed + prompt index), cached as JSONL.

    Returns (texts per prompt, generated tokens per sample, (tokens, seconds, prompts) of new sampling or
    None)."""
    from alignkit.generate import HFBackend, Request, Sampling

    path = cache / "samples.jsonl"
    settings = {
        "model": MODEL,
        "precision": "fp32",
        "n": n,
        "temperature": 1.0,
        "top_p": 1.0,
        "max_new_tokens": max_new,
    }
    have = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            have[r["key"]] = r
    keys = [
        hashlib.sha1(
            json.dumps({**settings, "prompt": q, "seed": seed + i}, sort_keys=True).encode()
        ).hexdigest()
        for i, q in enumerate(prompts)
    ]
    missing = [i for i, k in enumerate(keys) if k not in have]
    t0, tokens = time.perf_counter(), 0
    if missing:
        backend = HFBackend(MODEL, precision="fp32", batch_size=32)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for i in tqdm(missing, desc="best-of-n samples", unit="prompt"):
                sp = Sampling(n=n, temperature=1.0, top_p=1.0, max_new_tokens=max_new, seed=seed + i)
                (comp,) = backend.generate([Request(keys[i], [{"role": "user", "content": prompts[i]}])], sp)
                rec = {
                    "key": keys[i],
                    **settings,
                    "seed": seed + i,
                    "prompt": prompts[i],
                    "texts": comp.texts,
                    "tokens": comp.tokens,
                }
                f.write(json.dumps(rec) + "\n")
                f.flush()
                have[keys[i]] = rec
                tokens += sum(comp.tokens)
    dt = time.perf_counter() - t0
    recs = [have[k] for k in keys]
    return (
        [r["texts"] for r in recs],
        [r["tokens"] for r in recs],
        (tokens, dt, len(missing)) if missing else None,
    )


# ---------------------------------------------------------------- outputs


def log_cost(cache: Path, stage: str, seconds: float, **kw) -> None:
    """Record what filling the cache cost, so a rerun from the cache can still report it."""
    cache.mkdir(parents=True, exist_ok=True)
    rec = {"stage": stage, "seconds": seconds, **kw, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    with (cache / "costs.jsonl").open("a") as f:
        f.write(json.dumps(rec) + "\n")


def cache_costs(cache: Path) -> dict:
    """Seconds (and counts) per stage summed over every run that added to the cache."""
    out: dict[str, dict] = {}
    path = cache / "costs.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        agg = out.setdefault(r.pop("stage"), {})
        r.pop("when")
        for k, v in r.items():
            agg[k] = agg.get(k, 0) + v
    return out


def plot(path: Path, sqrt_kl: list[float], res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_g, ax_p) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, m in enumerate(METHODS):
        r, c = res[m], f"C{i}"
        ax_g.plot(sqrt_kl, r["gold"], "o-", color=c, label=LABEL[m])
        ax_g.fill_between(sqrt_kl, r["gold_lo"], r["gold_hi"], color=c, alpha=0.15)
        ax_p.plot(sqrt_kl, r["proxy"], "o-", color=c, label=LABEL[m])
    ax_g.set(
        xlabel="√KL (nats^½) of best-of-n",
        ylabel="gold reward (std of gold over samples; n=1 → 0)",
        title="gold reward (95% bootstrap band over prompts)",
    )
    ax_p.set(
        xlabel="√KL (nats^½) of best-of-n",
        ylabel="proxy reward (own std over samples; n=1 → 0)",
        title="proxy reward (what best-of-n optimises)",
    )
    for ax in (ax_g, ax_p):
        ax.axhline(0, color="grey", lw=0.6)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


NOTES = "<!-- notes: hand-written text below this line is kept when the script rewrites the file -->"


def _verdict(m: str, r: dict) -> str:
    lo, hi = r["gold_at_N_minus_peak_ci"]
    top = r["gold"][-1]
    if r["peak_n"] == r["n"][-1]:
        shape = f"gold rises all the way to n={r['n'][-1]} (no peak within this KL range)"
    elif hi < 0:
        shape = (
            f"gold peaks at n={r['peak_n']} and then falls by {-r['gold_at_N_minus_peak']:.3f}; the 95% interval "
            f"of gold(n={r['n'][-1]}) − gold(n={r['peak_n']}) excludes 0 ({lo:+.3f}, {hi:+.3f})"
        )
    else:
        shape = (
            f"gold is highest at n={r['peak_n']}, {-r['gold_at_N_minus_peak']:.3f} above n={r['n'][-1]}, but the 95% "
            f"interval of that difference ({lo:+.3f}, {hi:+.3f}) includes 0: a plateau, not a clear fall"
        )
    return f"- {LABEL[m]}: {shape}; gold at n={r['n'][-1]} is {top:+.3f} (95% CI {r['gold_lo'][-1]:+.3f}, {r['gold_hi'][-1]:+.3f})."


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1%}"


def write_markdown(path: Path, res: dict) -> None:
    c, d, acc, ns = res["config"], res["data"], res["accuracy"], res["n"]
    meth = res["methods"]
    for r in meth.values():
        r["n"] = ns
    lines = [
        "# Reward-model overoptimisation with best-of-n (toy scale, CPU)",
        "",
        "Gao et al. 2022 (arXiv:2210.10760) and Coste et al. 2023 (arXiv:2310.02743) at toy scale: "
        "`benchmarks/overoptimisation.py`, "
        f"`--pairs {c['pairs']} --prompts {c['prompts']} --n {c['n']} --seed {c['seed']}`; "
        f"{res['machine']}, wall time {res['timings']['total_s'] / 60:.1f} min"
        + (
            " (filling the cache took: "
            + ", ".join(
                f"{k.replace('_', ' ')} {v['seconds'] / 60:.1f} min" for k, v in res["cache_costs"].items()
            )
            + ")"
            if res["cache_costs"]
            else ""
        )
        + ".",
        "",
        "## Setup",
        "",
        f"- **Preference data**: {d['pairs']} pairs from {d['exchanges']} deduplicated first exchanges of non-reserved "
        f'ShareGPT conversations (`sharegpt_pairs(split="train", max_chars={MAX_CHARS})`). Chosen = the real reply. '
        f"Rejected = the reply of another conversation ({d['pairs_by_kind']['off-topic']} off-topic pairs, as in "
        "`alignkit quickstart`) or, where the reply has more than one sentence, the real reply cut after its first "
        f"sentence ({d['pairs_by_kind']['truncated']} truncated pairs; added so that the gold also ranks "
        "responses to the same prompt by completeness, not only by relevance). "
        f"{c['heldout']:.0%} of the prompts ({d['heldout_pairs']} pairs) are held out; the gold RM trains on the other "
        f"{d['gold_train_pairs']} pairs.",
        f"- **Reward models**: frozen SmolLM2-135M-Instruct (fp32) + a linear head on the final hidden state of the "
        f"last token of the chat-templated (prompt, response) — an HF sequence-classification RM with the backbone "
        f"frozen (features standardised; sequences over {c['max_tokens']} tokens keep their head and the template's "
        f"closing tokens: {d['pair_sequences_truncated']} pair and {d['bon_sequences_truncated']} best-of-n sequences). "
        f"Bradley–Terry loss + (l2/2)‖w‖², l2 = {c['l2']:g}, full-batch L-BFGS. Gold: all gold-training pairs. "
        f"{c['proxies']} proxies: each on its own random {c['proxy_fraction']:.0%} of the gold-training pairs "
        f"({d['proxy_subsets']['proxy0']['pairs']} pairs) with {c['flip']:.0%} of their labels flipped, different seeds.",
        f"- **Best-of-n**: {d['bon_prompts']} short prompts (≤ {BON_PROMPT_CHARS} characters, in no pair), "
        f"N = {c['n']} samples each from the default model (`HFBackend`, fp32, temperature 1, top_p 1, ≤ "
        f"{c['max_new_tokens']} new tokens; mean {d['bon_sample_tokens_mean']:.1f} tokens, "
        f"{d['bon_samples_at_length_cap']:.0%} hit the cap). Expected reward of best-of-n from the unbiased "
        "estimator over the N samples (sort by proxy; the i-th lowest gets weight C(i−1, n−1)/C(N, n)), averaged "
        "over prompts; KL = log n − (n−1)/n nats.",
        "- **Proxies compared**: single = proxy 0; ensemble of all proxies with `alignkit.ensemble.aggregate` "
        f"(mean; min = worst case; UWO = mean − λ·Var with λ = {c['uwo_lambda']:g}), each member first rescaled "
        "to mean 0, std 1 over the gold-training sequences (an order-preserving map, so the members share a scale).",
        f"- **Units**: gold = gold-RM logits divided by their std over all best-of-n samples "
        f"(1 unit = {res['settings']['gold_unit_in_logits']:.3f} logits), shifted so n = 1 is 0; proxy = each method's "
        "own score in units of its std over the samples, n = 1 at 0. Gold intervals: 95% percentile bootstrap over "
        f"prompts ({c['bootstrap']} resamples) of the per-prompt gain over n = 1 (so the n = 1 interval is 0 by "
        "construction). For scale: the mean within-prompt std of gold over the N samples is "
        f"{res['settings']['gold_within_prompt_std_in_units']:.2f} units.",
        "",
        "## Reward-model accuracy (held-out pairs)",
        "",
        "| RM | all | off-topic | truncated |",
        "| --- | --- | --- | --- |",
    ]
    for h, v in acc.items():
        if h.startswith("ensemble"):
            continue
        lines.append(f"| {h} | {_pct(v['heldout'])} | {_pct(v['off-topic'])} | {_pct(v['truncated'])} |")
    lines += [
        f"| ensemble mean / min / UWO | {acc['ensemble_mean']['heldout']:.1%} / {acc['ensemble_min']['heldout']:.1%} "
        f"/ {acc['ensemble_uwo']['heldout']:.1%} | | |",
        "",
        f"Gold accuracy on its own training pairs: {acc['gold']['train_subset']:.1%}.",
        "",
        "## Gold reward vs √KL (95% bootstrap interval)",
        "",
        "| n | KL | √KL | " + " | ".join(LABEL[m] for m in METHODS) + " | gold as proxy (ceiling) |",
        "| --- | --- | --- | " + " | ".join("---" for _ in METHODS) + " | --- |",
    ]
    for j, n in enumerate(ns):
        cells = " | ".join(
            f"{meth[m]['gold'][j]:+.3f} ({meth[m]['gold_lo'][j]:+.3f}, {meth[m]['gold_hi'][j]:+.3f})"
            for m in METHODS
        )
        lines.append(
            f"| {n} | {res['kl'][j]:.3f} | {res['sqrt_kl'][j]:.2f} | {cells} | {res['gold_bon_ceiling'][j]:+.3f} |"
        )
    lines += [
        "",
        "## Proxy reward vs √KL (what best-of-n optimises)",
        "",
        "| n | √KL | " + " | ".join(LABEL[m] for m in METHODS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in METHODS) + " |",
    ]
    for j, n in enumerate(ns):
        lines.append(
            f"| {n} | {res['sqrt_kl'][j]:.2f} | "
            + " | ".join(f"{meth[m]['proxy'][j]:+.3f}" for m in METHODS)
            + " |"
        )
    lines += [
        "",
        "Ensemble minus single proxy, gold reward at n = "
        + f"{ns[-1]} (paired bootstrap over prompts): "
        + "; ".join(
            f"{m} {res['paired_vs_single'][f'{m}_minus_single']['mean'][-1]:+.3f} "
            f"({res['paired_vs_single'][f'{m}_minus_single']['lo'][-1]:+.3f}, "
            f"{res['paired_vs_single'][f'{m}_minus_single']['hi'][-1]:+.3f})"
            for m in ("mean", "min", "uwo")
        )
        + ".",
        "",
        "Within-prompt correlation of each method's score with gold (mean over prompts of Pearson r over the N "
        "samples): "
        + ", ".join(f"{LABEL[m]} {meth[m]['within_prompt_corr_with_gold']:.2f}" for m in METHODS)
        + ".",
        "",
        "Every proxy head alone, gold reward at n = "
        + ", ".join(str(n) for n in ns[1:])
        + " (within-prompt correlation with gold): "
        + "; ".join(
            f"{h} "
            + " / ".join(f"{v:+.3f}" for v in e["gold"][1:])
            + f" ({e['within_prompt_corr_with_gold']:.2f})"
            for h, e in res["gold_each_proxy_head"].items()
        )
        + ". `pooled` is a control, not an ensemble: one head trained on the union of the proxies' noisy "
        "subsets, to tell the effect of ensembling from that of the ensemble seeing more data.",
        "",
        "Length (generated tokens; cap "
        f"{c['max_new_tokens']}): within-prompt correlation of score with length, and mean length of the "
        f"best-of-{ns[-1]} pick (mean over all samples {d['bon_sample_tokens_mean']:.1f}): "
        + "; ".join(
            f"{'gold' if k == 'gold' else LABEL[k]} {v['within_prompt_corr']:+.2f}, {v['bon_tokens'][-1]:.1f}"
            for k, v in res["length"].items()
        )
        + ".",
        "",
        "![gold and proxy reward vs √KL](overoptimisation.png)",
        "",
        "## Shape of the curves (computed)",
        "",
        *[_verdict(m, meth[m]) for m in METHODS],
        "",
    ]
    for r in meth.values():
        del r["n"]
    old = path.read_text() if path.exists() else ""
    notes = old.split(NOTES, 1)[1] if NOTES in old else "\n"
    path.write_text("\n".join(lines) + NOTES + notes)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument(
        "--out-dir",
        type=Path,
        default=Path("benchmarks/results"),
        help="where overoptimisation.{json,md,png} go",
    )
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path("/work/runs/overopt"),
        help="feature (.pt) and sample (.jsonl) cache",
    )
    ap.add_argument(
        "--pairs", type=int, default=2000, help="gold-labelled preference pairs (held-out slice included)"
    )
    ap.add_argument("--prompts", type=int, default=48, help="best-of-n prompts (disjoint from every pair)")
    ap.add_argument(
        "--n",
        type=int,
        default=32,
        help="samples per best-of-n prompt (N); curves go to the largest power of 2 ≤ N",
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for data selection, proxy subsets and label flips, sampling, bootstrap",
    )
    ap.add_argument(
        "--heldout",
        type=float,
        default=0.15,
        help="fraction of pair prompts held out from gold training (for accuracies)",
    )
    ap.add_argument("--proxies", type=int, default=4, help="proxy reward models (K)")
    ap.add_argument(
        "--proxy-fraction", type=float, default=0.12, help="fraction of gold-training pairs each proxy sees"
    )
    ap.add_argument("--flip", type=float, default=0.25, help="fraction of each proxy's labels flipped")
    ap.add_argument(
        "--l2", type=float, default=1e-3, help="L2 penalty (l2/2)·‖w‖² on every head (standardised features)"
    )
    ap.add_argument(
        "--uwo-lambda",
        type=float,
        default=0.5,
        help="λ of UWO, mean − λ·Var over the K proxies (members on unit scale)",
    )
    ap.add_argument("--max-tokens", type=int, default=256, help="token cap on a templated (prompt, response)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="best-of-n sample length cap")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over prompts")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. data
    t0 = time.perf_counter()
    data = build_data(a.pairs, a.prompts, a.seed, a.heldout)
    pairs, bon_prompts = data["pairs"], data["bon_prompts"]
    train_idx = [i for i, p in enumerate(pairs) if p["split"] == "train"]
    held_idx = [i for i, p in enumerate(pairs) if p["split"] == "heldout"]
    kinds = {k: sum(p["kind"] == k for p in pairs) for k in ("off-topic", "truncated")}
    print(
        f"data: {len(pairs)} pairs {kinds} from {data['exchanges_used']} exchanges; {len(train_idx)} gold-train, {len(held_idx)} held out; {len(bon_prompts)} best-of-n prompts",
        flush=True,
    )
    timings["data_s"] = time.perf_counter() - t0

    # 2. pair features
    t0 = time.perf_counter()
    feat = Featurizer(a.cache, a.max_tokens)
    timings["load_backbone_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    seqs_c = [feat.ids(p["prompt"], p["chosen"]) for p in pairs]
    seqs_r = [feat.ids(p["prompt"], p["rejected"]) for p in pairs]
    pair_trunc = feat.truncated
    x, computed = feat(seqs_c + seqs_r, "pair features")
    xc, xr = x[: len(pairs)], x[len(pairs) :]
    timings["pair_features_s"] = time.perf_counter() - t0
    timings["pair_features_computed"] = computed
    if computed:
        log_cost(a.cache, "pair_features", timings["pair_features_s"], sequences=computed)
    print(
        f"pair features: {computed} computed, {2 * len(pairs) - computed} cached/shared; {pair_trunc} sequences truncated to {a.max_tokens} tokens",
        flush=True,
    )

    # 3. heads
    t0 = time.perf_counter()
    tr = torch.tensor(train_idx)
    mu = torch.cat([xc[tr], xr[tr]]).mean(0)
    sd = torch.cat([xc[tr], xr[tr]]).std(0) + 1e-6

    def z(v):
        return (v - mu) / sd

    zc, zr = z(xc), z(xr)
    diff = zc - zr
    heads = {"gold": train_head(diff[tr], a.l2, 500)}
    subsets, pooled = {}, []
    n_sub = max(2, round(a.proxy_fraction * len(train_idx)))
    for k in range(a.proxies):
        g = torch.Generator().manual_seed(a.seed * 1000 + 17 * (k + 1))
        sub = tr[torch.randperm(len(train_idx), generator=g)[:n_sub]]
        sign = torch.ones(n_sub)
        sign[torch.randperm(n_sub, generator=g)[: round(a.flip * n_sub)]] = -1.0
        heads[f"proxy{k}"] = train_head(diff[sub] * sign[:, None], a.l2, 500)
        subsets[f"proxy{k}"] = {"pairs": n_sub, "flipped": int((sign < 0).sum())}
        pooled.append(diff[sub] * sign[:, None])
    # control: one head on the union of the proxies' (noisy) data, to tell ensembling from more data
    heads["pooled"] = train_head(torch.cat(pooled), a.l2, 500)
    # each head's output rescaled to mean 0, std 1 over the gold-training sequences (a ranking-preserving
    # affine map) so the proxies share one scale before min / UWO
    ztrain = torch.cat([zc[tr], zr[tr]])
    scale = {h: ((ztrain @ w).mean(), (ztrain @ w).std()) for h, w in heads.items()}

    def score(h, zz):
        m, s = scale[h]
        return (zz @ heads[h] - m) / s

    proxies = [f"proxy{k}" for k in range(a.proxies)]

    def method_scores(zz) -> dict[str, torch.Tensor]:
        member = torch.stack([score(h, zz) for h in proxies])
        out = {"single": member[0]}
        for m in ("mean", "min", "uwo"):
            out[m] = aggregate(member, m, uwo_lambda=a.uwo_lambda)
        return out

    hd = torch.tensor(held_idx)
    acc = {}
    kind_of = [pairs[i]["kind"] for i in held_idx]
    for h in heads:
        rc, rr = score(h, zc[hd]), score(h, zr[hd])
        acc[h] = {"heldout": pair_accuracy(rc, rr), "train_subset": None}
        for kd in ("off-topic", "truncated"):
            sel = torch.tensor([kk == kd for kk in kind_of])
            acc[h][kd] = pair_accuracy(rc[sel], rr[sel]) if sel.any() else None
    acc["gold"]["train_subset"] = pair_accuracy(score("gold", zc[tr]), score("gold", zr[tr]))
    mc, mr = method_scores(zc[hd]), method_scores(zr[hd])
    for m in ("mean", "min", "uwo"):
        acc[f"ensemble_{m}"] = {"heldout": pair_accuracy(mc[m], mr[m])}
    timings["heads_s"] = time.perf_counter() - t0
    print(
        "held-out pairwise accuracy: " + ", ".join(f"{h} {v['heldout']:.1%}" for h, v in acc.items()),
        flush=True,
    )

    # 4. best-of-n samples and their features
    t0 = time.perf_counter()
    texts, ntoks, gen_stats = sample(bon_prompts, a.n, a.max_new_tokens, a.seed * 100003, a.cache)
    timings["sampling_s"] = time.perf_counter() - t0
    if gen_stats:
        timings["sampling_tokens"], timings["sampling_tokens_per_s"] = (
            gen_stats[0],
            gen_stats[0] / gen_stats[1],
        )
        log_cost(a.cache, "sampling", gen_stats[1], tokens=gen_stats[0], prompts=gen_stats[2])
    t0 = time.perf_counter()
    feat.truncated = 0
    bon_seqs = [feat.ids(q, t) for q, ts in zip(bon_prompts, texts, strict=True) for t in ts]
    bon_trunc = feat.truncated
    xb, computed = feat(bon_seqs, "best-of-n features")
    timings["bon_features_s"] = time.perf_counter() - t0
    timings["bon_features_computed"] = computed
    if computed:
        log_cost(a.cache, "bon_features", timings["bon_features_s"], sequences=computed)
    zb = z(xb)

    # 5. curves
    t0 = time.perf_counter()
    P, N = len(bon_prompts), a.n
    ns = [2**i for i in range(int(math.log2(N)) + 1)]
    gold_raw = score("gold", zb).reshape(P, N).numpy().astype(np.float64)
    gold_unit = float(gold_raw.std())
    gold = (gold_raw - gold_raw.mean()) / gold_unit  # n=1 mean → 0, unit: std of gold over all samples
    ms = {m: v.reshape(P, N).numpy().astype(np.float64) for m, v in method_scores(zb).items()}
    rng = np.random.default_rng(a.seed)
    boot = rng.integers(0, P, size=(a.bootstrap, P))
    per_prompt, res = {}, {}
    for m in METHODS:
        prox = (ms[m] - ms[m].mean()) / ms[m].std()
        g_pp, p_pp = bon_curves(prox, gold, ns)
        # gain over n=1 within each prompt, so the intervals measure best-of-n's effect, not how much
        # prompts differ from each other (the mean over prompts is unchanged: n=1 is already 0)
        g_pp = g_pp - g_pp[:, :1]
        per_prompt[m] = g_pp
        bmeans = g_pp[boot].mean(1)  # (B, len(ns))
        gmean = g_pp.mean(0)
        peak = int(gmean.argmax())
        drop = bmeans[:, -1] - bmeans[:, peak]
        res[m] = {
            "gold": gmean.tolist(),
            "gold_lo": np.percentile(bmeans, 2.5, 0).tolist(),
            "gold_hi": np.percentile(bmeans, 97.5, 0).tolist(),
            "proxy": p_pp.mean(0).tolist(),
            "peak_n": ns[peak],
            "gold_at_N_minus_peak": float(gmean[-1] - gmean[peak]),
            "gold_at_N_minus_peak_ci": [float(np.percentile(drop, 2.5)), float(np.percentile(drop, 97.5))],
            "gold_at_N_minus_n1_ci": [
                float(np.percentile(bmeans[:, -1], 2.5)),
                float(np.percentile(bmeans[:, -1], 97.5)),
            ],
            # within-prompt agreement of the method with gold: mean over prompts of Pearson r
            "within_prompt_corr_with_gold": within_corr(prox, gold),
        }
    paired = {}
    for m in ("mean", "min", "uwo"):
        d = (per_prompt[m] - per_prompt["single"])[boot].mean(1)
        paired[f"{m}_minus_single"] = {
            "mean": (per_prompt[m] - per_prompt["single"]).mean(0).tolist(),
            "lo": np.percentile(d, 2.5, 0).tolist(),
            "hi": np.percentile(d, 97.5, 0).tolist(),
        }
    # gold-best-of-n: the ceiling that an ideal proxy (gold itself) reaches at the same KL
    g_or, _ = bon_curves(gold, gold, ns)
    # length: does a reward prefer longer samples, and how long is the sample best-of-n picks?
    lengths = np.asarray(ntoks, dtype=np.float64)
    length = {
        "gold": {
            "within_prompt_corr": within_corr(gold, lengths),
            "bon_tokens": bon_curves(gold, lengths, ns)[0].mean(0).tolist(),
        }
    }
    for m in METHODS:
        length[m] = {
            "within_prompt_corr": within_corr(ms[m], lengths),
            "bon_tokens": bon_curves(ms[m], lengths, ns)[0].mean(0).tolist(),
        }
    # every proxy alone (the "single" method is proxy 0) and the pooled-data control
    each = {}
    for h in [*proxies, "pooled"]:
        r_h = score(h, zb).reshape(P, N).numpy().astype(np.float64)
        each[h] = {
            "gold": bon_curves(r_h, gold, ns)[0].mean(0).tolist(),
            "within_prompt_corr_with_gold": within_corr(r_h, gold),
        }
    timings["analysis_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_all

    flat_tok = [t for ts in ntoks for t in ts]
    kls = [kl_bon(n) for n in ns]
    sqrt_kl = [math.sqrt(k) for k in kls]
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "settings": {
            "model": "SmolLM2-135M-Instruct (alignkit 'default'), frozen, fp32",
            "reward_head": "linear on standardised last-token final hidden state; Bradley–Terry + L2; L-BFGS (≤500 iterations)",
            "pair_max_chars": MAX_CHARS,
            "bon_prompt_max_chars": BON_PROMPT_CHARS,
            "sampling": {
                "temperature": 1.0,
                "top_p": 1.0,
                "max_new_tokens": a.max_new_tokens,
                "n": a.n,
                "seed": "seed*100003 + prompt index",
            },
            "member_scale": "each head rescaled to mean 0, std 1 over gold-training sequences before aggregation",
            "gold_unit": "std of gold-RM logits over all best-of-n samples",
            "gold_unit_in_logits": gold_unit,
            "gold_within_prompt_std_in_units": float(gold.std(1, ddof=0).mean()),
            "proxy_unit": "each method's own std over all best-of-n samples; n=1 mean 0",
        },
        "data": {
            "pairs": len(pairs),
            "pairs_by_kind": kinds,
            "exchanges": data["exchanges_used"],
            "gold_train_pairs": len(train_idx),
            "heldout_pairs": len(held_idx),
            "proxy_subsets": subsets,
            "pair_sequences_truncated": pair_trunc,
            "bon_prompts": len(bon_prompts),
            "bon_samples": len(flat_tok),
            "bon_sequences_truncated": bon_trunc,
            "bon_sample_tokens_mean": float(np.mean(flat_tok)),
            "bon_samples_at_length_cap": float(np.mean([t >= a.max_new_tokens for t in flat_tok])),
        },
        "accuracy": acc,
        "n": ns,
        "kl": kls,
        "sqrt_kl": sqrt_kl,
        "methods": res,
        "paired_vs_single": paired,
        "gold_bon_ceiling": g_or.mean(0).tolist(),
        "gold_each_proxy_head": each,
        "length": length,
        "timings": timings,
        "cache_costs": cache_costs(a.cache),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    result = _clean(result)
    res = result["methods"]
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "overoptimisation.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(a.out_dir / "overoptimisation.png", sqrt_kl, res)
    write_markdown(a.out_dir / "overoptimisation.md", result)

    # compact summary
    head = "n    √KL   " + "".join(f"{m:>21}" for m in METHODS) + "   gold-BoN"
    print("\nexpected reward of best-of-n: gold [proxy] (gold: std units, n=1 → 0)")
    print(head)
    for j, n in enumerate(ns):
        cells = "".join(f"{res[m]['gold'][j]:>+12.3f} [{res[m]['proxy'][j]:+.2f}]" for m in METHODS)
        print(f"{n:<4} {sqrt_kl[j]:.2f} {cells}   {result['gold_bon_ceiling'][j]:+.3f}")
    for m in METHODS:
        r = res[m]
        print(
            f"{m:>7}: gold peaks at n={r['peak_n']}; gold(N) − gold(peak) = {r['gold_at_N_minus_peak']:+.3f} (95% CI {r['gold_at_N_minus_peak_ci'][0]:+.3f}, {r['gold_at_N_minus_peak_ci'][1]:+.3f})"
        )
    print(f"wall time {timings['total_s']:.0f} s; results in {a.out_dir}/overoptimisation.{{json,md,png}}")


if __name__ == "__main__":
    main()
