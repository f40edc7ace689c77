"""`alignkit cai label` and `alignkit cai check`: AI-feedback preference labels (RLAIF; Bai et al. 2022,
arXiv:2212.08073, §4) and the labeller's quality gate. A label is the normalised probability of options (A)
and (B) under a principle's comparison question, asked in both orders and averaged, since position bias
grows as the labeller shrinks (Lee et al. 2023, arXiv:2309.00267, §3.1); with chain of thought it is clamped
to [0.4, 0.6] (Bai et al. 2022, §4.1). A failed or abstained (under `min_mass`) answer is never a label."""

from __future__ import annotations

import json
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import config as cfglib
from ..config import ConfigError
from ..data import DataError, Messages, as_messages, read_records, text_or_messages, write_atomic, write_jsonl
from ..gen import Sampling
from ..gen.endpoint import EndpointBackend, EndpointError
from ..gen.generate import GenerationKeys, done_ids, make_backend, read_prompts, run_generation
from ..measure.report import Frame, nice_ticks
from ..measure.stats import wilson
from .constitution import TIER_WEIGHTS, TIERS, Constitution, Principle, check_weights, load_constitution
from .revise import REDTEAM, ask

OPTIONS = ("(A)", "(B)")
CHECK_SET = Path(__file__).with_name("check.jsonl")
ANSWER = "Answer with (A) or (B) only."
USER_THEN = {"role": "user", "content": f"So which option is better? {ANSWER}"}
COT = "Think it through step by step, then say which option is better."
SHOWN = "feedback pairs accuracy ece position_consistency labels_per_s abstained failed".split()
P_FIRST = ("p_a_first", "p_b_first")


def option_probs(logps: list[float]) -> tuple[list[float], float]:
    """p_i = e^{l_i} / Σ_j e^{l_j} over the options' log-probabilities, and the options' mass Σ_j e^{l_j}."""
    top = max(logps)
    e = [math.exp(x - top) for x in logps]
    return [x / sum(e) for x in e], math.exp(top) * sum(e)


def both_orders(p_first_as_a: float, p_first_as_b: float) -> tuple[float, bool]:
    """P(x ≻ y) from P(A) with x shown as (A) and P(B) with x shown as (B), averaged (Lee et al. 2023,
    §3.1); and the position-bias flag: the same position won both orders, so the preferred answer flipped."""
    return (p_first_as_a + p_first_as_b) / 2, (p_first_as_a > 0.5) != (p_first_as_b > 0.5)


def clamp(p: float, lo: float, hi: float) -> float:
    """Chain-of-thought labels sit near 0 or 1; Bai et al. 2022 (§4.1) clamp them to [0.4, 0.6]."""
    return min(max(p, lo), hi)


def ece(confidence: list[float], correct: list[bool], bins: int = 10) -> tuple[float, list[tuple]]:
    """Expected calibration error (Guo et al. 2017, arXiv:1706.04599, Eq. 3): Σ_b |B_b|/n · |acc(B_b) −
    conf(B_b)| over equal-width confidence bins; and (mean confidence, accuracy, count) per bin."""
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(confidence):
        groups.setdefault(min(int(c * bins), bins - 1), []).append(i)
    mean = lambda xs, g: sum(xs[i] for i in g) / len(g)  # noqa: E731
    rows = [(mean(confidence, g), mean(correct, g), len(g)) for _, g in sorted(groups.items())]
    return sum(k / max(len(confidence), 1) * abs(acc - conf) for conf, acc, k in rows), rows


def comparison_chat(conv: Messages, first: str, second: str, p: Principle, cot: bool) -> Messages:
    who = {"user": "Human", "assistant": "Assistant"}
    talk = "\n".join(f"{who[m['role']]}: {m['content']}" for m in conv if m["role"] in who)
    ask = f"Consider this conversation between a person and an AI assistant:\n\n{talk}\n\n{p.comparison}\n\n"
    ask += f"Options:\n{OPTIONS[0]} {first}\n\n{OPTIONS[1]} {second}\n\n"
    return [{"role": "user", "content": ask + (COT if cot else ANSWER)}]


class Feedback:
    """A feedback model, local or an OpenAI-compatible endpoint (needs top_logprobs): option probabilities
    per chat, or 'failed' (endpoint error) or 'abstained' (under `min_mass` on the options)."""

    def __init__(self, spec: str, precision: str, batch_size: int, min_mass: float, top_logprobs: int = 20):
        self.spec, self.min_mass, self.top, self.batch_size = spec, min_mass, top_logprobs, batch_size
        self.backend = make_backend("hf", spec, precision, batch_size)

    def _each(self, fn, chats: list[Messages]) -> list:
        def safe(m):
            try:
                return fn(m)
            except EndpointError:
                return "failed"

        with ThreadPoolExecutor(self.batch_size) as pool:
            return list(pool.map(safe, chats))

    def reasons(self, chats: list[Messages], s: Sampling) -> list[str | None]:
        """Free text (the chain of thought) per chat; None where the endpoint failed."""
        if isinstance(self.backend, EndpointBackend):
            texts = self._each(lambda m: self.backend.endpoint.chat(m, s)[0].text, chats)
            return [None if t == "failed" else t for t in texts]
        got = ask(self.backend, {str(i): m for i, m in enumerate(chats)}, s)
        return [got[str(i)][0] for i in range(len(chats))]

    def probs(self, chats: list[Messages]) -> list[tuple[list[float], float] | str]:
        if isinstance(self.backend, EndpointBackend):
            return self._each(self._endpoint_probs, chats)
        bs, out = self.batch_size, []
        for i in range(0, len(chats), bs):
            out += map(option_probs, self._local_logps(chats[i : i + bs]))
        return [o if o[1] >= self.min_mass else "abstained" for o in out]

    @torch.inference_mode()
    def _local_logps(self, chats: list[Messages]) -> list[list[float]]:
        """log P(option | chat) summed over its tokens; one pass over chats × options, left-padded."""
        be, tok = self.backend, self.backend.tok
        opts = [tok(o, add_special_tokens=False)["input_ids"] for o in OPTIONS]
        rows = [be.encode(m) + o for m in chats for o in opts]
        width, keep = max(map(len, rows)), max(map(len, opts))
        ids = torch.tensor([[tok.pad_token_id or 0] * (width - len(r)) + r for r in rows], device=be.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=be.device)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        out = be.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep + 1)
        logp = out.logits[:, :-1].float().log_softmax(-1)  # position t predicts token t + 1
        rows_opts = enumerate(o for _ in chats for o in opts)
        scores = [sum(logp[r, keep - len(o) + t, i].item() for t, i in enumerate(o)) for r, o in rows_opts]
        return [scores[i : i + len(opts)] for i in range(0, len(scores), len(opts))]

    def _endpoint_probs(self, chat: Messages) -> tuple[list[float], float] | str:
        """At the first generated position whose top tokens spell option letters with `min_mass` or more,
        the letters' probabilities (a token such as '(' before it is passed over)."""
        got = self.backend.endpoint.chat(chat, Sampling(1, 0.0, 1.0, 4, 0), logprobs=self.top)[0]
        for pos in got.top_logprobs or []:
            letter = {t: t.strip(" ()\n").upper() for t in pos}
            mass = [sum(math.exp(v) for t, v in pos.items() if letter[t] == o.strip("()")) for o in OPTIONS]
            if sum(mass) > 0 and sum(mass) >= self.min_mass:
                return [m / sum(mass) for m in mass], sum(mass)
        return "abstained"


@dataclass
class FeedbackKeys:
    """How the feedback model is asked (`cai label` and `cai check`)."""

    feedback: str = "default"
    """Feedback model: 'default', a folder or hub id, or openai:URL#MODEL (with top_logprobs)."""
    constitution: str = "default"
    """Constitution YAML, or 'default'; its `comparison` texts are the questions asked."""
    principles_per_label: int = 1
    """K: a label is the mean over K principles drawn by tier, each asked in both orders."""
    tier_weights: list[float] = field(default_factory=lambda: list(TIER_WEIGHTS))
    """Weights of safety, ethics, guidelines, helpfulness when a principle is drawn."""
    cot: bool = False
    """Let the model reason before it answers; its probabilities are then clamped to cot_clamp."""
    cot_clamp: list[float] = field(default_factory=lambda: [0.4, 0.6])
    """[low, high] that chain-of-thought probabilities are clamped to."""
    min_mass: float = 0.01
    """An answer putting less probability than this on the options abstains (no label)."""
    top_logprobs: int = 20
    """top_logprobs asked of an endpoint."""

    def __post_init__(self) -> None:
        check_weights(self.tier_weights)
        ok = len(self.cot_clamp) == 2 and 0 <= self.cot_clamp[0] <= self.cot_clamp[1] <= 1
        if self.principles_per_label < 1 or not ok:
            raise ValueError("principles_per_label must be ≥ 1 and cot_clamp a [low, high] inside [0, 1]")


def judge_pairs(fb, keys: FeedbackKeys, const: Constitution, items: list[dict], s, seed: int) -> list[dict]:
    """P(x ≻ y) of items {key, messages, x, y, tier (None: any)}, K principles each asked in both orders:
    {status: labelled|failed|abstained, principles; labelled: label, p_a_first, p_b_first, position_bias}."""
    weights = dict(zip(TIERS, keys.tier_weights, strict=True))
    asks = []  # (item, principle, x shown first)
    for i, it in enumerate(items):
        rng = random.Random(f"{seed}:{it['key']}:{it['tier']}")
        principles = [const.sample(rng, weights, it["tier"]) for _ in range(keys.principles_per_label)]
        asks += [(i, p, xf) for p in principles for xf in (True, False)]
    shown = lambda it, xf: (it["x"], it["y"]) if xf else (it["y"], it["x"])  # noqa: E731
    chats = [comparison_chat(items[i]["messages"], *shown(items[i], xf), p, keys.cot) for i, p, xf in asks]
    thoughts = fb.reasons(chats, s) if keys.cot else [""] * len(chats)
    if keys.cot:
        reasoned = zip(chats, thoughts, strict=True)
        chats = [[*c, {"role": "assistant", "content": t or ""}, USER_THEN] for c, t in reasoned]
    got = ["failed" if t is None else g for g, t in zip(fb.probs(chats), thoughts, strict=True)]
    lo, hi = keys.cot_clamp if keys.cot else (0.0, 1.0)
    out = [{"status": "labelled", "principles": [], True: [], False: []} for _ in items]
    for (i, p, xf), g in zip(asks, got, strict=True):
        o = out[i]
        o["principles"] += [] if p.id in o["principles"] else [p.id]
        if isinstance(g, str):
            o["status"] = g if o["status"] == "labelled" else o["status"]
        else:
            o[xf].append(clamp(g[0][0 if xf else 1], lo, hi))
    for o in out:
        a, b = o.pop(True), o.pop(False)
        if o["status"] == "labelled":
            o["p_a_first"], o["p_b_first"] = sum(a) / len(a), sum(b) / len(b)
            o["label"], o["position_bias"] = both_orders(o["p_a_first"], o["p_b_first"])
    return out


def read_items(source: str, answers) -> list[dict]:
    """judge_pairs items from records with two answers: fields ("better", "worse"), or a "responses" list."""
    out = []
    for line, rec in read_records(source):
        conv = as_messages(text_or_messages(rec, "messages" if "messages" in rec else "prompt", source, line))
        fld = answers if isinstance(answers, str) else "/".join(answers)
        xy = rec.get(answers) if isinstance(answers, str) else [rec.get(a) for a in answers]
        if not (isinstance(xy, list) and len(xy) >= 2 and all(isinstance(t, str) and t for t in xy[:2])):
            raise DataError(source, line, fld, "expected two non-empty answers")
        if (tier := rec.get("tier")) not in (None, *TIERS):
            raise DataError(source, line, "tier", f"{tier!r} is not a tier ({', '.join(TIERS)})")
        key = str(rec.get("id", line))
        out.append({"id": key, "key": key, "messages": conv, "x": xy[0], "y": xy[1], "tier": tier})
        out[-1]["kind"] = rec.get("kind", "")
    return out


def measure_labeller(fb, keys: FeedbackKeys, const: Constitution, items: list[dict], s, seed: int) -> dict:
    """Accuracy (abstentions count as wrong) with its Wilson interval, per kind too; ECE and reliability
    bins over the labelled pairs; the share whose preferred answer survives the swap; labels per second."""
    t0 = time.perf_counter()
    res = judge_pairs(fb, keys, const, items, s, seed)
    dt = time.perf_counter() - t0
    lab = [r for r in res if r["status"] == "labelled"]
    right = [r["status"] == "labelled" and r["label"] > 0.5 for r in res]
    err, bins = ece([max(r["label"], 1 - r["label"]) for r in lab], [r["label"] > 0.5 for r in lab])
    kind = [it["kind"] for it in items]
    return {
        "feedback": fb.spec, "cot": keys.cot, "pairs": len(items), "correct": sum(right), "accuracy": wilson(sum(right), len(items)),
        "abstained": sum(r["status"] == "abstained" for r in res), "failed": sum(r["status"] == "failed" for r in res),
        "ece": err, "reliability": bins, "position_consistency": sum(not r["position_bias"] for r in lab) / max(len(lab), 1),
        "labels_per_s": len(lab) / dt if dt > 0 else 0.0,
        "by_kind": {k: wilson(sum(ok for ok, x in zip(right, kind, strict=True) if x == k), kind.count(k)) for k in sorted(set(kind))},
        "details": [{"id": it["key"], "kind": it["kind"], **r} for it, r in zip(items, res, strict=True)],
    }  # fmt: skip


def reliability_svg(bins: list[tuple]) -> str:
    """Share right against the label's confidence per bin (dots sized by count), and the diagonal."""
    fr = Frame(380, 320, nice_ticks(0.5, 1.0, 5), nice_ticks(0.0, 1.0, 5))
    diagonal = f"M{fr.x(0.5):.1f},{fr.y(0.5):.1f}L{fr.x(1):.1f},{fr.y(1):.1f}"
    body = [f'<path d="{diagonal}" stroke="#9aa1ad" stroke-dasharray="4 3"/>']
    body += [f'<circle cx="{fr.x(max(c, 0.5)):.1f}" cy="{fr.y(a):.1f}" r="{3 + min(k, 60) / 10:.1f}" fill="#3b6fd4"><title>{k} labels: '
             f"confidence {c:.2f}, right {a:.0%}</title></circle>" for c, a, k in bins]  # fmt: skip
    return fr.svg(body, "confidence of the label", "share right", pct=True)


def check_md(r: dict) -> str:
    acc, lo, hi = r["accuracy"]
    lines = [f"# Labeller check: {r['feedback']}{' (chain of thought)' * r['cot']}", ""]
    lines += [f"- accuracy {acc:.1%} [{lo:.1%}, {hi:.1%}] on {r['pairs']} pairs; ECE {r['ece']:.3f}"]
    lines += [f"- same answer preferred after the swap: {r['position_consistency']:.1%}; abstained {r['abstained']}, "
              f"failed {r['failed']}; {r['labels_per_s']:.2f} labels/s", "", "| kind | accuracy | 95% interval |", "| --- | --- | --- |"]  # fmt: skip
    lines += [f"| {k} | {a:.1%} | [{lo:.1%}, {hi:.1%}] |" for k, (a, lo, hi) in r["by_kind"].items()]
    return "\n".join(lines) + "\n\n![reliability](reliability.svg)\n"


@dataclass(kw_only=True)
class CheckConfig(GenerationKeys):
    """Score a feedback model on labelled comparisons."""

    ask: FeedbackKeys = cfglib.inline(FeedbackKeys)
    output_dir: str
    """Folder for check.json, check.md, reliability.svg and job_config.yaml."""
    data: str = "default"
    """JSONL of {id, prompt or messages, better, worse, kind?, tier?}; default: cai/check.jsonl (written
    hard cases: evasive vs helpful, harmful vs refusal, sycophantic vs correct, bare vs explained)."""


def run_check(cfg, fb, const: Constitution, data: str, out: Path, items: list[dict] | None = None) -> dict:
    items = items or read_items(str(CHECK_SET) if data == "default" else data, ("better", "worse"))
    r = measure_labeller(fb, cfg.ask, const, items, cfg.sampling(1), cfg.seed)
    write_atomic(out / "check.json", json.dumps(r, indent=2) + "\n")
    write_atomic(out / "check.md", check_md(r))
    write_atomic(out / "reliability.svg", reliability_svg(r["reliability"]))
    return r


def check(cfg: CheckConfig, feedback: Feedback | None = None) -> dict:
    const = load_constitution(cfg.ask.constitution)
    items = read_items(str(CHECK_SET) if cfg.data == "default" else cfg.data, ("better", "worse"))
    cfglib.save(cfg, Path(cfg.output_dir) / "job_config.yaml")  # after every input was read
    r = run_check(cfg, feedback or make_feedback(cfg), const, cfg.data, Path(cfg.output_dir), items)
    return {k: r[k] for k in SHOWN}


def make_feedback(cfg) -> Feedback:
    return Feedback(cfg.ask.feedback, cfg.precision, cfg.batch_size, cfg.ask.min_mass, cfg.ask.top_logprobs)


@dataclass(kw_only=True)
class LabelConfig(GenerationKeys):
    """RLAIF labels: pairs of answers compared by a feedback model under the constitution."""

    ask: FeedbackKeys = cfglib.inline(FeedbackKeys)
    output_dir: str
    """Folder for labels.jsonl (and labels.<tier>.jsonl), trace.jsonl, check.json and report.json."""
    pairs: str = ""
    """JSONL of {id, prompt or messages, responses: [a, b, ...]} (as `alignkit generate n=2` writes);
    empty: two samples per prompt from `policy`."""
    prompts: str = "default"
    """Prompts the policy samples pairs for when `pairs` is empty; default: the shipped red-team set."""
    limit: int | None = None
    """Label only the first N pairs."""
    policy: str = "default"
    """Model that samples the pairs."""
    tiers: list[str] = field(default_factory=list)
    """Tiers that each get their own labels, from their own principles; empty: one label per pair."""
    floor: float = 0.6
    """Share of the check set the feedback model must get right, or labelling stops (exit 2)."""
    force: bool = False
    """Label even below the floor."""
    check_data: str = "default"
    """Labelled comparisons of the gate (see `cai check`)."""
    chunk_size: int = 64
    """Pairs per resumable chunk."""
    resume: bool = True
    """Continue an existing trace.jsonl (false: start afresh)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if bad := [t for t in self.tiers if t not in TIERS]:
            raise ValueError(f"tiers: {bad[0]!r} is not a tier ({', '.join(TIERS)})")


def label(cfg: LabelConfig, feedback: Feedback | None = None, check_items: list[dict] | None = None) -> dict:
    """Label the pairs (sampled first when none are given) once the feedback model passes the gate.
    `feedback` and `check_items` stand in for the configured model and check set (tests)."""
    const, out = load_constitution(cfg.ask.constitution), Path(cfg.output_dir)
    if missing := [t for t in cfg.tiers if not const.tier(t)]:
        raise ConfigError(f"tiers: the constitution has no {missing[0]} principle")
    trace_path = out / "trace.jsonl"
    if not cfg.resume and trace_path.exists():
        trace_path.unlink()
    source = cfg.pairs or str(out / "samples.jsonl")
    prompts = str(REDTEAM) if cfg.prompts == "default" else cfg.prompts
    todo = [] if cfg.pairs else read_prompts(prompts, cfg.system)[: cfg.limit]
    pairs = read_items(cfg.pairs, "responses")[: cfg.limit] if cfg.pairs else None
    cfglib.save(cfg, out / "job_config.yaml")  # after every input was read
    done = done_ids(Path(source)) if todo else set()
    if pending := [(rec, r) for rec, r in todo if r.key not in done]:  # the policy samples the pairs
        policy = make_backend(cfg.backend, cfg.policy, cfg.precision, cfg.batch_size)
        run_generation(policy, pending, cfg.sampling(2), Path(source), "policy pairs")
        del policy
    pairs = pairs or read_items(source, "responses")[: cfg.limit]
    fb = feedback or make_feedback(cfg)
    gate = json.loads((out / "check.json").read_text()) if (out / "check.json").exists() else None
    if gate is None or gate["feedback"] != fb.spec or gate["cot"] != cfg.ask.cot:  # once per labeller
        gate = run_check(cfg, fb, const, cfg.check_data, out, check_items)
    if (acc := gate["accuracy"])[0] < cfg.floor and not cfg.force:
        raise ConfigError(f"feedback model {fb.spec!r} got {acc[0]:.1%} [{acc[1]:.1%}, {acc[2]:.1%}] of the check set right, "
                          f"under floor={cfg.floor} (see {out / 'check.md'}); give force=true to label anyway")  # fmt: skip
    items = [p | {"key": f"{p['id']}:{t or 'any'}", "tier": t} for p in pairs for t in cfg.tiers or [None]]
    done, t0 = done_ids(trace_path), time.perf_counter()
    pending = [it for it in items if it["key"] not in done]
    bar = tqdm(total=len(items), initial=len(items) - len(pending), desc="cai label", unit="label")
    with trace_path.open("a") as f, bar:
        for i in range(0, len(pending), cfg.chunk_size):
            chunk = pending[i : i + cfg.chunk_size]
            got = judge_pairs(fb, cfg.ask, const, chunk, cfg.sampling(1), cfg.seed)
            for it, r in zip(chunk, got, strict=True):
                rec = {"id": it["key"], "pair": it["id"], "tier": it["tier"] or "any"}
                rec |= {"prompt": it["messages"], "x": it["x"], "y": it["y"], "labeller": fb.spec} | r
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(chunk))
    dt, keys = time.perf_counter() - t0, {it["key"] for it in items}
    trace = [t for t in map(json.loads, trace_path.read_text().splitlines()) if t["id"] in keys]
    labels = [as_label(t) for t in trace if t["status"] == "labelled"]
    write_jsonl(out / "labels.jsonl", labels)
    for t in cfg.tiers:
        write_jsonl(out / f"labels.{t}.jsonl", [x for x in labels if x["tier"] == t])
    report = dict(labels=len(labels), pairs=len(pairs), feedback=fb.spec, check_accuracy=gate["accuracy"])
    report |= {s: sum(t["status"] == s for t in trace) for s in ("abstained", "failed")}
    report["position_bias"] = sum(x["position_bias"] for x in labels) / max(len(labels), 1)
    report["labels_per_s"] = len(pending) / dt if pending else None
    write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    return {"output_dir": str(out)} | report


def as_label(t: dict) -> dict:
    """A labelled trace record as an `rm train` pair: chosen is the preferred answer, label = P(chosen ≻
    rejected) ≥ 0.5, and p_a_first, p_b_first are the chosen answer's in each order."""
    keep = {k: t[k] for k in ("prompt", "tier", "principles", "labeller", "position_bias", "pair")}
    if t["label"] >= 0.5:
        return keep | {"chosen": t["x"], "rejected": t["y"], "label": t["label"]} | {k: t[k] for k in P_FIRST}
    flipped = {"p_a_first": 1 - t["p_b_first"], "p_b_first": 1 - t["p_a_first"]}
    return keep | {"chosen": t["y"], "rejected": t["x"], "label": 1 - t["label"]} | flipped
