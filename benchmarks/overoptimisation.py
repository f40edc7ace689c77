"""Reward-model overoptimisation with best-of-n at toy scale (Gao et al. 2022, arXiv:2210.10760; Coste et al.
2023, arXiv:2310.02743): gold reward against √KL for a single noisy proxy, ensembles of proxies (mean, min,
UWO = mean − λ·var), each proxy alone, a pooled-data control and gold itself as the proxy, with bootstrap
intervals over prompts and a plot.

Pairs: ShareGPT first exchanges, rejected = another reply (off-topic) or the first sentence (truncated). Reward
models: Bradley–Terry linear heads on the cached last-token hidden state of the frozen default model; proxies
see small slices of the gold pairs with labels flipped. Best-of-n: N samples of disjoint short prompts and the
unbiased estimator (Gao et al. App. I). Hand-written notes at the end of overoptimisation.md are kept.

    HF_HUB_OFFLINE=1 python benchmarks/overoptimisation.py [--pairs 2000 --prompts 48 --n 32 --seed 0]
    HF_HUB_OFFLINE=1 python benchmarks/overoptimisation.py --pairs 60 --prompts 4 --n 4   # smoke test
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from pathlib import Path

import harness
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from alignkit.data import conversation, template_ids
from alignkit.gen import Request, Sampling
from alignkit.gen.hf import HFBackend
from alignkit.models import load_causal_lm, load_tokenizer
from alignkit.sources import sharegpt_pairs
from alignkit.train.reward import aggregate

MODEL = "default"
MAX_CHARS = 700  # prompt and reply length cap for the preference exchanges (characters)
BON_PROMPT_CHARS = 300  # best-of-n prompts are short, to keep generation and scoring cheap
METHODS, ENSEMBLES = ("single", "mean", "min", "uwo"), ("mean", "min", "uwo")
KINDS, CI = ("off-topic", "truncated"), [2.5, 97.5]  # CI: the percentiles of a 95 % interval
LABEL = {"single": "single proxy", "mean": "ensemble mean", "min": "ensemble min", "uwo": "ensemble UWO"}


def first_sentence(reply: str) -> str | None:
    """The reply up to its first sentence end (. ! ? : or a line break) if that is at most half of it, else None."""
    m = re.search(r"[.!?:](?=\s)|\n", reply)
    cut = reply[: m.end()].strip() if m else ""
    return cut if cut and len(cut) <= 0.5 * len(reply) else None


def build_data(n_pairs: int, n_prompts: int, seed: int, heldout: float) -> dict:
    """Best-of-n prompts and preference pairs from disjoint, deduplicated ShareGPT training exchanges."""
    seen, exchanges = set(), []
    for q, a in sharegpt_pairs(split="train", max_chars=MAX_CHARS):
        if (key := " ".join(q.lower().split())) not in seen:
            seen.add(key)
            exchanges.append((q, a))
    random.Random(seed).shuffle(exchanges)
    bon, rest = [], []
    for q, a in exchanges:
        (bon if len(bon) < n_prompts and len(q) <= BON_PROMPT_CHARS else rest).append((q, a))
    if len(bon) < n_prompts:
        raise SystemExit(f"only {len(bon)} short prompts available for best-of-n")
    used, count = [], 0  # exchanges until they give n_pairs pairs (1 off-topic + 1 truncated where possible)
    for q, a in rest:
        if count >= n_pairs:
            break
        used.append((q, a))
        count += 1 + (first_sentence(a) is not None)
    if count < n_pairs:
        raise SystemExit(f"only {count} pairs available (asked for {n_pairs})")
    pairs = []
    for i, (q, a) in enumerate(used):
        other = used[(i + len(used) // 2) % len(used)][1]
        pairs.append({"ex": i, "prompt": q, "chosen": a, "rejected": other, "kind": "off-topic"})
        if (cut := first_sentence(a)) is not None:
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


class Featurizer:
    """Last-token final hidden state of the frozen backbone, cached by token ids."""

    def __init__(self, cache: Path, max_tokens: int):
        self.tok, self.max_tokens = load_tokenizer(MODEL), max_tokens
        self.backbone = load_causal_lm(MODEL).model.eval()  # the decoder stack, final norm included
        self.path, self.store, self.truncated = cache / f"features_{MODEL}_fp32_last-token.pt", {}, 0
        if self.path.exists():
            blob = torch.load(self.path)
            self.store = dict(zip(blob["keys"], blob["feats"], strict=True))

    def ids(self, prompt: str, response: str) -> list[int]:
        """Templated ids; over max_tokens, the head and the closing end-of-turn + newline (the scored token)."""
        ids = template_ids(self.tok, conversation(prompt, response))
        if len(ids) > self.max_tokens:
            self.truncated += 1
            ids = ids[: self.max_tokens - 2] + ids[-2:]
        return ids

    @torch.inference_mode()
    def __call__(self, seqs: list[list[int]], desc: str) -> tuple[torch.Tensor, int]:
        """(len(seqs), hidden) features, computing only those not cached; → (features, computed)."""
        keys = [hashlib.sha1(np.asarray(s, dtype=np.int32).tobytes()).hexdigest() for s in seqs]
        todo = {k: s for k, s in zip(keys, seqs, strict=True) if k not in self.store}
        todo = sorted(todo.items(), key=lambda kv: -len(kv[1]))  # longest first, ≤ 16 rows and 4096 tokens
        size = max(1, min(16, 4096 // self.max_tokens))
        batches = [todo[i : i + size] for i in range(0, len(todo), size)]
        last_save, total = time.perf_counter(), sum(len(s) for _, s in todo)
        bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not todo)
        for batch in batches:
            lens = torch.tensor([len(s) for _, s in batch])
            ids = torch.tensor([s + [self.tok.pad_token_id] * (int(lens.max()) - len(s)) for _, s in batch])
            mask = (torch.arange(ids.shape[1])[None] < lens[:, None]).long()
            hidden = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            for (k, _), h in zip(batch, hidden[torch.arange(len(batch)), lens - 1].float(), strict=True):
                self.store[k] = h.clone()
            bar.update(int(lens.sum()))
            if time.perf_counter() - last_save > 120 or batch is batches[-1]:  # a killed run keeps most of it
                done, tmp, last_save = sorted(self.store), self.path.with_suffix(".tmp"), time.perf_counter()
                self.path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"keys": done, "feats": torch.stack([self.store[k] for k in done])}, tmp)
                tmp.replace(self.path)
        bar.close()
        return torch.stack([self.store[k] for k in keys]), len(todo)


def train_head(diff: torch.Tensor, l2: float, iters: int = 500) -> torch.Tensor:
    """w minimising mean softplus(−diff·w) + (l2/2)‖w‖², diff = z_chosen − z_rejected (standardised)."""
    d = diff.double()
    w = torch.zeros(d.shape[1], dtype=torch.float64, requires_grad=True)
    tol = {"tolerance_grad": 1e-9, "tolerance_change": 1e-12, "line_search_fn": "strong_wolfe"}
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=iters, **tol)

    def closure():
        opt.zero_grad()
        loss = F.softplus(-(d @ w)).mean() + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float()


def bon_curves(proxy: np.ndarray, gold: np.ndarray, ns: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt expected (gold, proxy) reward of best-of-n under the proxy, (P, N) → (P, len(ns)) each: the
    i-th lowest-ranked of N samples tops a uniformly random n-subset with weight C(i−1, n−1)/C(N, n)."""
    order, big = np.argsort(proxy, axis=1, kind="stable"), proxy.shape[1]
    w = np.array([[math.comb(i - 1, n - 1) / math.comb(big, n) for n in ns] for i in range(1, big + 1)])
    return np.take_along_axis(gold, order, 1) @ w, np.take_along_axis(proxy, order, 1) @ w


def within_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over prompts (rows) of the Pearson correlation over samples (columns)."""
    return float(np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b, strict=True) if x.std() and y.std()]))


def sample(prompts: list[str], n: int, max_new: int, seed: int, cache: Path):
    """N samples per prompt (seed + prompt index), cached as JSONL: (texts, tokens, (tokens, s, prompts) or None)."""
    path, have = cache / "samples.jsonl", {}
    settings = {"model": MODEL, "precision": "fp32", "n": n, "temperature": 1.0, "top_p": 1.0}
    settings["max_new_tokens"] = max_new
    for r in (json.loads(line) for line in (path.read_text().splitlines() if path.exists() else [])):
        have[r["key"]] = r
    recs = [{**settings, "prompt": q, "seed": seed + i} for i, q in enumerate(prompts)]
    keys = [hashlib.sha1(json.dumps(r, sort_keys=True).encode()).hexdigest() for r in recs]
    missing = [i for i, k in enumerate(keys) if k not in have]
    t0, tokens = time.perf_counter(), 0
    if missing:
        backend = HFBackend(MODEL, precision="fp32", batch_size=32)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for i in tqdm(missing, desc="best-of-n samples", unit="prompt"):
                sp = Sampling(n=n, temperature=1.0, top_p=1.0, max_new_tokens=max_new, seed=seed + i)
                (comp,) = backend.generate([Request(keys[i], [{"role": "user", "content": prompts[i]}])], sp)
                have[keys[i]] = {"key": keys[i], **recs[i], "texts": comp.texts, "tokens": comp.tokens}
                f.write(json.dumps(have[keys[i]]) + "\n")
                f.flush()
                tokens += sum(comp.tokens)
    new = (tokens, time.perf_counter() - t0, len(missing)) if missing else None
    return [have[k]["texts"] for k in keys], [have[k]["tokens"] for k in keys], new


def cache_costs(cache: Path, stage: str | None = None, **cost) -> dict:
    """Log what filling the cache cost at `stage` (so that reruns report it); → the costs summed per stage."""
    path, out = cache / "costs.jsonl", {}
    if stage:
        cache.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"stage": stage, **cost, "when": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    for r in (json.loads(line) for line in (path.read_text().splitlines() if path.exists() else [])):
        agg, _ = out.setdefault(r.pop("stage"), {}), r.pop("when")
        agg |= {k: agg.get(k, 0) + v for k, v in r.items()}
    return out


def plot(path: Path, sqrt_kl: list[float], res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_g, ax_p) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, m in enumerate(METHODS):
        ax_g.plot(sqrt_kl, res[m]["gold"], "o-", color=f"C{i}", label=LABEL[m])
        ax_g.fill_between(sqrt_kl, res[m]["gold_lo"], res[m]["gold_hi"], color=f"C{i}", alpha=0.15)
        ax_p.plot(sqrt_kl, res[m]["proxy"], "o-", color=f"C{i}", label=LABEL[m])
    ax_g.set(ylabel="gold reward (std of gold over samples; n=1 → 0)", title="gold reward (95% band)")
    ax_p.set(ylabel="proxy reward (own std over samples; n=1 → 0)", title="proxy reward (optimised)")
    for ax in (ax_g, ax_p):
        ax.set(xlabel="√KL (nats^½) of best-of-n")
        ax.axhline(0, color="grey", lw=0.6)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def shape(m: str, r: dict, big_n: int) -> str:
    (lo, hi), drop, peak = r["gold_at_N_minus_peak_ci"], -r["gold_at_N_minus_peak"], r["peak_n"]
    how = f"gold peaks at n={peak}, {drop:.3f} above n={big_n}; the 95% interval of the fall ({lo:+.3f}, {hi:+.3f}) "
    how += "excludes 0: a fall" if hi < 0 else "includes 0: a plateau, not a clear fall"
    how = f"gold rises all the way to n={big_n} (no peak within this KL range)" if peak == big_n else how
    at_n = f"{r['gold'][-1]:+.3f} (95% CI {r['gold_lo'][-1]:+.3f}, {r['gold_hi'][-1]:+.3f})"
    return f"- {LABEL[m]}: {how}; gold at n={big_n} is {at_n}."


def markdown(res: dict) -> list[str]:
    c, d, acc, ns, meth = res["config"], res["data"], res["accuracy"], res["n"], res["methods"]
    st, name, by_kind = res["settings"], {"gold": "gold", **LABEL}, d["pairs_by_kind"]
    costs = [f"{k.replace('_', ' ')} {v['seconds'] / 60:.1f} min" for k, v in res["cache_costs"].items()]
    heads = {h: v for h, v in acc.items() if not h.startswith("ensemble")}
    acc_rows = [[h, *(harness.fmt(v[k], ".1%") for k in ("heldout", *KINDS))] for h, v in heads.items()]
    ens = " / ".join(f"{acc[f'ensemble_{m}']['heldout']:.1%}" for m in ENSEMBLES)
    curve_rows = []
    for j, n in enumerate(ns):
        g = [(meth[m]["gold"][j], meth[m]["gold_lo"][j], meth[m]["gold_hi"][j]) for m in METHODS]
        row = [n, f"{res['kl'][j]:.3f}", f"{res['sqrt_kl'][j]:.2f}"]
        row += [f"{x:+.3f} ({lo:+.3f}, {hi:+.3f})" for x, lo, hi in g]
        row.append(f"{res['gold_bon_ceiling'][j]:+.3f}")
        curve_rows.append(row + [f"{meth[m]['proxy'][j]:+.3f}" for m in METHODS])
    head = "|".join(["n|KL|√KL", *(f"gold: {LABEL[m]}" for m in METHODS), "gold as proxy (ceiling)"])
    head += "".join(f"|proxy: {LABEL[m]}" for m in METHODS)
    diffs = [(m, res["paired_vs_single"][f"{m}_minus_single"]) for m in ENSEMBLES]
    diffs = [f"{m} {p['mean'][-1]:+.3f} ({p['lo'][-1]:+.3f}, {p['hi'][-1]:+.3f})" for m, p in diffs]
    corr = [f"{LABEL[m]} {meth[m]['within_prompt_corr_with_gold']:.2f}" for m in METHODS]
    each = []
    for h, e in res["gold_each_proxy_head"].items():
        gains = " / ".join(f"{v:+.3f}" for v in e["gold"][1:])
        each.append(f"{h} {gains} ({e['within_prompt_corr_with_gold']:.2f})")
    length = [(name[k], v["within_prompt_corr"], v["bon_tokens"][-1]) for k, v in res["length"].items()]
    length = [f"{k} {r:+.2f}, {t:.1f}" for k, r, t in length]
    wall = f"wall time {res['timings']['total_s'] / 60:.1f} min"
    return [
        "# Reward-model overoptimisation with best-of-n (toy scale, CPU)",
        "",
        f"`{res['command']}`; {res['machine']['summary']}; {wall}"
        + (f" (filling the cache took: {', '.join(costs)})" if costs else "")
        + ". Method: the docstring of `benchmarks/overoptimisation.py`.",
        "",
        f"Pairs: {d['pairs']} ({by_kind['off-topic']} off-topic, {by_kind['truncated']} truncated; {d['heldout_pairs']} "
        f"held out); {c['proxies']} proxies on {d['proxy_subsets']['proxy0']['pairs']} pairs, {c['flip']:.0%} flipped. "
        f"Best-of-n: {d['bon_prompts']} prompts × {c['n']} samples (mean {d['bon_sample_tokens_mean']:.1f} tokens). Gold "
        f"unit: {st['gold_unit_in_logits']:.3f} logits; intervals: {c['bootstrap']} bootstrap resamples of prompts.",
        "",
        "## Reward-model accuracy (held-out pairs)",
        "",
        *harness.table("RM|all|off-topic|truncated", [*acc_rows, ["ensemble mean / min / UWO", ens, "", ""]]),
        "",
        f"Gold accuracy on its own training pairs: {acc['gold']['train_subset']:.1%}.",
        "",
        "## Gold reward vs √KL (95% bootstrap interval), and proxy reward (what best-of-n optimises)",
        "",
        *harness.table(head, curve_rows),
        "",
        f"Ensemble minus single proxy, gold at n = {ns[-1]} (paired bootstrap): {'; '.join(diffs)}. Within-prompt "
        f"correlation with gold (mean over prompts of Pearson r): {', '.join(corr)}.",
        "",
        f"Every proxy head alone, gold at n = {', '.join(map(str, ns[1:]))} (within-prompt correlation with gold): "
        f"{'; '.join(each)}. `pooled` is a control, not an ensemble: one head on the union of the proxies' noisy "
        "subsets, to tell ensembling from seeing more data.",
        "",
        f"Length: within-prompt correlation of score with generated tokens, and the mean length of the best-of-"
        f"{ns[-1]} pick (all samples: {d['bon_sample_tokens_mean']:.1f}): {'; '.join(length)}.",
        "",
        "![gold and proxy reward vs √KL](overoptimisation.png)",
        "",
        "## Shape of the curves (computed)",
        "",
        *[shape(m, meth[m], ns[-1]) for m in METHODS],
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(
        __doc__,
        ("--cache", Path, Path("/work/runs/overopt"), "feature (.pt) and sample (.jsonl) cache"),
        ("--pairs", int, 2000, "gold-labelled preference pairs (held-out slice included)"),
        ("--prompts", int, 48, "best-of-n prompts (disjoint from every pair)"),
        ("--n", int, 32, "samples per best-of-n prompt (N); curves go to the largest power of 2 ≤ N"),
        ("--seed", int, 0, "seed of data selection, proxy subsets and label flips, sampling, bootstrap"),
        ("--heldout", float, 0.15, "fraction of pair prompts held out from gold training (for accuracies)"),
        ("--proxies", int, 4, "proxy reward models (K)"),
        ("--proxy-fraction", float, 0.12, "fraction of gold-training pairs each proxy sees"),
        ("--flip", float, 0.25, "fraction of each proxy's labels flipped"),
        ("--l2", float, 1e-3, "L2 penalty (l2/2)·‖w‖² on every head (standardised features)"),
        ("--uwo-lambda", float, 0.5, "λ of UWO, mean − λ·Var over the K proxies (members on unit scale)"),
        ("--max-tokens", int, 256, "token cap on a templated (prompt, response)"),
        ("--max-new-tokens", int, 64, "best-of-n sample length cap"),
        ("--bootstrap", int, 1000, "bootstrap resamples over prompts"),
    )
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    timings, t_all, t0 = {}, time.perf_counter(), time.perf_counter()

    def lap(key: str) -> float:
        nonlocal t0
        timings[key], t0 = time.perf_counter() - t0, time.perf_counter()
        return timings[key]

    data = build_data(a.pairs, a.prompts, a.seed, a.heldout)
    pairs, bon_prompts = data["pairs"], data["bon_prompts"]
    train_idx, held_idx = ([i for i, p in enumerate(pairs) if p["split"] == s] for s in ("train", "heldout"))
    kinds = {k: sum(p["kind"] == k for p in pairs) for k in KINDS}
    print(f"data: {len(pairs)} pairs {kinds}, {len(held_idx)} held out; {len(bon_prompts)} best-of-n prompts")
    lap("data_s")
    feat = Featurizer(a.cache, a.max_tokens)
    lap("load_backbone_s")
    seqs = [feat.ids(p["prompt"], p[k]) for k in ("chosen", "rejected") for p in pairs]
    x, computed = feat(seqs, "pair features")
    xc, xr, pair_trunc = x[: len(pairs)], x[len(pairs) :], feat.truncated
    timings["pair_features_computed"] = computed
    if lap("pair_features_s") and computed:
        cache_costs(a.cache, "pair_features", seconds=timings["pair_features_s"], sequences=computed)
    print(f"pair features: {computed} computed, the rest cached; {pair_trunc} sequences truncated")

    # heads: gold, K noisy proxies and the pooled control, on standardised features
    tr, hd = torch.tensor(train_idx), torch.tensor(held_idx)
    mu, sd = torch.cat([xc[tr], xr[tr]]).mean(0), torch.cat([xc[tr], xr[tr]]).std(0) + 1e-6
    zc, zr = (xc - mu) / sd, (xr - mu) / sd
    diff, n_sub = zc - zr, max(2, round(a.proxy_fraction * len(train_idx)))
    heads, subsets, pooled = {"gold": train_head(diff[tr], a.l2)}, {}, []
    for k in range(a.proxies):
        g = torch.Generator().manual_seed(a.seed * 1000 + 17 * (k + 1))
        sub, sign = tr[torch.randperm(len(train_idx), generator=g)[:n_sub]], torch.ones(n_sub)
        sign[torch.randperm(n_sub, generator=g)[: round(a.flip * n_sub)]] = -1.0
        pooled.append(diff[sub] * sign[:, None])
        heads[f"proxy{k}"] = train_head(pooled[-1], a.l2)
        subsets[f"proxy{k}"] = {"pairs": n_sub, "flipped": int((sign < 0).sum())}
    heads["pooled"] = train_head(torch.cat(pooled), a.l2)  # control: ensembling, or more data?
    # each head rescaled to mean 0, std 1 over the gold-training sequences (an order-preserving affine map), so
    # that the proxies share one scale before min / UWO
    ztrain, proxies = torch.cat([zc[tr], zr[tr]]), [f"proxy{k}" for k in range(a.proxies)]
    scale = {h: ((ztrain @ w).mean(), (ztrain @ w).std()) for h, w in heads.items()}

    def score(h: str, zz: torch.Tensor) -> torch.Tensor:
        return (zz @ heads[h] - scale[h][0]) / scale[h][1]

    def method_scores(zz: torch.Tensor) -> dict[str, torch.Tensor]:
        member = torch.stack([score(h, zz) for h in proxies])
        return {"single": member[0]} | {m: aggregate(member, m, uwo_lambda=a.uwo_lambda) for m in ENSEMBLES}

    def accuracy(rc: torch.Tensor, rr: torch.Tensor) -> float:
        return float((rc > rr).float().mean())

    kind_of, acc = [pairs[i]["kind"] for i in held_idx], {}
    for h in heads:
        rc, rr = score(h, zc[hd]), score(h, zr[hd])
        acc[h] = {"heldout": accuracy(rc, rr), "train_subset": None}
        for kd in KINDS:
            sel = torch.tensor([kk == kd for kk in kind_of])
            acc[h][kd] = accuracy(rc[sel], rr[sel]) if sel.any() else None
    acc["gold"]["train_subset"] = accuracy(score("gold", zc[tr]), score("gold", zr[tr]))
    mc, mr = method_scores(zc[hd]), method_scores(zr[hd])
    acc |= {f"ensemble_{m}": {"heldout": accuracy(mc[m], mr[m])} for m in ENSEMBLES}
    lap("heads_s")
    print("held-out pairwise accuracy: " + ", ".join(f"{h} {v['heldout']:.1%}" for h, v in acc.items()))

    texts, ntoks, gen = sample(bon_prompts, a.n, a.max_new_tokens, a.seed * 100003, a.cache)
    if lap("sampling_s") and gen:
        timings["sampling_tokens"], timings["sampling_tokens_per_s"] = gen[0], gen[0] / gen[1]
        cache_costs(a.cache, "sampling", seconds=gen[1], tokens=gen[0], prompts=gen[2])
    feat.truncated = 0
    seqs = [feat.ids(q, t) for q, ts in zip(bon_prompts, texts, strict=True) for t in ts]
    xb, computed = feat(seqs, "best-of-n features")
    timings["bon_features_computed"] = computed
    if lap("bon_features_s") and computed:
        cache_costs(a.cache, "bon_features", seconds=timings["bon_features_s"], sequences=computed)
    zb = (xb - mu) / sd

    # curves (gold: n=1 mean at 0, unit the std of gold over all samples; each proxy in its own unit)
    P, N = len(bon_prompts), a.n
    ns = [2**i for i in range(int(math.log2(N)) + 1)]
    boot = np.random.default_rng(a.seed).integers(0, P, (a.bootstrap, P))

    def as_np(t: torch.Tensor) -> np.ndarray:
        return t.reshape(P, N).numpy().astype(np.float64)

    gold_raw = as_np(score("gold", zb))
    gold = (gold_raw - gold_raw.mean()) / gold_raw.std()
    ms = {m: as_np(v) for m, v in method_scores(zb).items()}
    per_prompt, res, paired, each = {}, {}, {}, {}
    for m in METHODS:
        prox = (ms[m] - ms[m].mean()) / ms[m].std()
        g_pp, p_pp = bon_curves(prox, gold, ns)
        # gain over n=1 within each prompt: the intervals measure best-of-n, not how much prompts differ
        per_prompt[m] = g_pp = g_pp - g_pp[:, :1]
        bmeans, gmean = g_pp[boot].mean(1), g_pp.mean(0)  # (B, len(ns)), (len(ns),)
        peak, (lo, hi) = int(gmean.argmax()), np.percentile(bmeans, CI, 0)
        res[m] = {"gold": gmean.tolist(), "gold_lo": lo.tolist(), "gold_hi": hi.tolist(), "peak_n": ns[peak]}
        res[m] |= {"proxy": p_pp.mean(0).tolist(), "gold_at_N_minus_peak": float(gmean[-1] - gmean[peak])}
        res[m]["gold_at_N_minus_peak_ci"] = np.percentile(bmeans[:, -1] - bmeans[:, peak], CI).tolist()
        res[m]["gold_at_N_minus_n1_ci"] = np.percentile(bmeans[:, -1], CI).tolist()
        res[m]["within_prompt_corr_with_gold"] = within_corr(prox, gold)
    for m in ENSEMBLES:
        d = per_prompt[m] - per_prompt["single"]
        lo, hi = np.percentile(d[boot].mean(1), CI, 0)
        paired[f"{m}_minus_single"] = {"mean": d.mean(0).tolist(), "lo": lo.tolist(), "hi": hi.tolist()}
    lengths = np.asarray(ntoks, dtype=np.float64)  # does a reward prefer longer samples? how long is a pick?
    length = {k: {"within_prompt_corr": within_corr(v, lengths)} for k, v in {"gold": gold, **ms}.items()}
    for k, v in {"gold": gold, **ms}.items():
        length[k]["bon_tokens"] = bon_curves(v, lengths, ns)[0].mean(0).tolist()
    for h in [*proxies, "pooled"]:  # every proxy alone (the "single" method is proxy 0) and the control
        r_h = as_np(score(h, zb))
        each[h] = {"gold": bon_curves(r_h, gold, ns)[0].mean(0).tolist()}
        each[h]["within_prompt_corr_with_gold"] = within_corr(r_h, gold)
    lap("analysis_s")
    timings["total_s"] = time.perf_counter() - t_all

    flat, kls = [t for ts in ntoks for t in ts], [math.log(n) - (n - 1) / n for n in ns]
    report = harness.report_base(a, argv, __file__)
    settings = {"pair_max_chars": MAX_CHARS, "bon_prompt_max_chars": BON_PROMPT_CHARS}
    settings |= {"sampling": {"temperature": 1.0, "top_p": 1.0, "seed": f"{a.seed * 100003} + prompt index"}}
    settings["gold_unit_in_logits"] = float(gold_raw.std())  # gold: in stds of gold over all samples
    settings["gold_within_prompt_std_in_units"] = float(gold.std(1, ddof=0).mean())
    counts = {"pairs": len(pairs), "pairs_by_kind": kinds, "exchanges": data["exchanges_used"]}
    counts |= {"gold_train_pairs": len(train_idx), "heldout_pairs": len(held_idx), "proxy_subsets": subsets}
    counts |= {"pair_sequences_truncated": pair_trunc, "bon_prompts": P, "bon_samples": len(flat)}
    counts |= {"bon_sequences_truncated": feat.truncated, "bon_sample_tokens_mean": float(np.mean(flat))}
    counts["bon_samples_at_length_cap"] = float(np.mean([t >= a.max_new_tokens for t in flat]))
    result = {"config": report["args"], "command": report["command"], "settings": settings, "data": counts}
    result |= {"accuracy": acc, "n": ns, "kl": kls, "sqrt_kl": [math.sqrt(k) for k in kls], "methods": res}
    result |= {"paired_vs_single": paired, "gold_bon_ceiling": bon_curves(gold, gold, ns)[0].mean(0).tolist()}
    result |= {"gold_each_proxy_head": each, "length": length, "timings": timings}
    result |= {"cache_costs": cache_costs(a.cache), "machine": report["machine"]}
    result = json.dumps(result | {"alignkit_source": report["alignkit_source"]}, default=str)
    # round-off zeros (−1e−17) to 0.0, so that tables do not show −0.000
    result = json.loads(result, parse_float=lambda x: 0.0 if abs(float(x)) < 1e-12 else float(x))
    harness.write_results(a, "overoptimisation", result, markdown(result))
    plot(a.out / "overoptimisation.png", result["sqrt_kl"], result["methods"])


if __name__ == "__main__":
    main()
