"""`alignkit cai revise`: supervised Constitutional AI (Bai et al. 2022, arXiv:2212.08073, §3). The critic
critiques the policy's answers to red-team prompts against principles drawn by tier and revises them, for N
rounds; revisions that pass every filter (FILTERS), judged less harmful and not a bare refusal, plus
helpfulness data, are the SFT set. The detectors pick the best of samples_per_round revisions, which makes
a weak critic usable. Chunks go to trace.jsonl, so a killed run resumes where it stopped."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .. import config as cfglib
from ..data import Messages, last_user, read_records, write_atomic, write_jsonl
from ..detect.classifiers import load as load_classifier
from ..gen import Backend, Request, Sampling
from ..gen.generate import GenerationKeys, done_ids, make_backend, read_prompts
from ..sources import sharegpt_pairs
from .constitution import TIER_WEIGHTS, TIERS, Constitution, Principle, check_weights, load_constitution

REDTEAM = Path(__file__).with_name("redteam.jsonl")
RATES = (("harm", "harmful"), ("refusal", "refused"), ("evasive_refusal", "bare"))
CRITIQUE = "Critique request: "
PREFIX = re.compile(
    r"^\s*(?:(?:sure|okay|ok|certainly|of course|absolutely)[,!.]?\s*)?"
    r"(?:here(?:'s| is| are)?\s+(?:is\s+)?(?:a|an|the|my)?\s*)?(?:revised|rewritten|reworked|new|updated|improved)"
    r"\s+(?:version|response|answer|reply)[^:\n]{0,40}[:\n]\s*|^\s*(?:revision|revised (?:response|answer))\s*:\s*",
    re.IGNORECASE,
)
META = re.compile(  # a critique or an echo of the request where a rewritten answer should be
    r"^\W*(?:the|this|your|my) (?:\w+ )?(?:answer|response|reply|question|request)\b"
    r"|\b(?:last|original|previous) (?:answer|response)\b|critique request|revision request|rewritten answer",
    re.IGNORECASE,
)
FILTERS = "prefix_stripped empty unchanged fewshot_copy meta repetitive judged bare_refusal not_less_harmful"
FILTERS = [*FILTERS.split(), "passed", "kept"]
"""Per round: drafts cut of a prefix, or dropped as empty, unchanged, few-shot copies, meta or repetitive;
drafts judged, and of those the bare refusals, the not-less-harmful and the passed; prompts that kept one."""


class Detectors:
    """alignkit's judges of (request, answer): harm (an output classifier) and refusal."""

    def __init__(self, harm: str, refusal: str, bare_words: int):
        self.harm, self.refusal, self.bare_words = load_classifier(harm), load_classifier(refusal), bare_words

    def judge(self, prompts: list[str], texts: list[str]) -> list[dict]:
        """{harm ∈ [0, 1], harmful, refused, bare} per answer; bare = a refusal under bare_words words."""
        harm, ref = self.harm.p_unsafe(prompts, texts), self.refusal.p_unsafe(prompts, texts)
        out = []
        for h, r, t in zip(harm, ref, texts, strict=True):
            refused = r >= self.refusal.threshold
            out.append({"harm": h, "harmful": h >= self.harm.threshold, "refused": refused})
            out[-1]["bare"] = refused and len(t.split()) < self.bare_words
        return out


@dataclass(kw_only=True)
class ReviseConfig(GenerationKeys):
    """SL-CAI: critique → revision rounds over red-team prompts, and the SFT set they make."""

    output_dir: str
    """Folder for trace.jsonl, sft.jsonl, report.{json,md} and job_config.yaml."""
    prompts: str = "default"
    """JSONL of {id, prompt} or {id, messages} (multi-turn kept whole); default: the shipped red-team set
    (cai/redteam.jsonl: original prompts, Do-Not-Answer and uncensorbench)."""
    limit: int | None = None
    """Use only the first N prompts."""
    constitution: str = "default"
    """Constitution YAML (see cai/constitution.yaml), or 'default'."""
    policy: str = "default"
    """Model that writes the initial answers: 'default', a folder or hub id, or openai:URL#MODEL."""
    critic: str = "default"
    """Model that writes critiques and revisions (the policy itself when the same)."""
    rounds: int = 2
    """Critique → revision rounds per prompt (1–4)."""
    samples_per_round: int = 1
    """Revisions drawn per round; the detectors keep the best (least harmful, not a bare refusal)."""
    tier_weights: list[float] = field(default_factory=lambda: list(TIER_WEIGHTS))
    """Weights of safety, ethics, guidelines, helpfulness when a principle is drawn."""
    harm_detector: str = "default:output_harm"
    """Guard classifier that judges harm of (request, answer)."""
    refusal_detector: str = "default:refusal"
    """Guard classifier that judges refusals."""
    bare_words: int = 25
    """A refusal with fewer words than this is bare (no reason, no alternative)."""
    helpful_data: str = "sharegpt"
    """Helpfulness SFT data mixed in: 'sharegpt' (non-reserved ShareGPT exchanges), a JSONL of
    {prompt, completion}, or '' for none."""
    helpful_ratio: float = 1.0
    """Helpfulness rows per kept revision in sft.jsonl."""
    chunk_size: int = 32
    """Prompts per resumable chunk."""
    resume: bool = True
    """Continue an existing trace.jsonl (false: start afresh)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.rounds <= 4:
            raise ValueError("rounds must be 1–4")
        if self.samples_per_round < 1 or self.chunk_size < 1 or self.helpful_ratio < 0:
            raise ValueError("samples_per_round and chunk_size must be ≥ 1, helpful_ratio ≥ 0")
        check_weights(self.tier_weights)


def critic_chat(p: Principle, conv: Messages, answer: str) -> Messages:
    """The critic's chat: the principle's few-shot examples as earlier turns (through the tokenizer's chat
    template like any turn), then the whole conversation, the answer and the critique request."""
    ask = (CRITIQUE + p.critique, revision_ask(p))
    turns = [(x["prompt"], x["response"], ask[0], x["critique"], ask[1], x["revision"]) for x in p.examples]
    shots = [{"role": ("user", "assistant")[i % 2], "content": t} for ts in turns for i, t in enumerate(ts)]
    system = [m for m in conv if m["role"] == "system"]
    rest = [m for m in conv if m["role"] != "system"]
    return [*system, *shots, *rest, {"role": "assistant", "content": answer}, user(ask[0])]


def revision_ask(p: Principle) -> str:
    return f"Revision request: {p.revision} Reply with the rewritten answer only."


def strip_prefix(text: str) -> tuple[str, bool]:
    """The revision without a 'Sure, here is the revised answer:' style opening; whether one was cut."""
    cut = PREFIX.sub("", text, count=1).strip()
    return cut, cut != text.strip()


def copies_few_shot(text: str, p: Principle, n: int = 8) -> bool:
    """Whether `text` repeats any n-word run of the principle's few-shot texts."""

    def grams(s: str) -> set[tuple[str, ...]]:
        w = s.lower().split()
        return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}

    return any(grams(text) & grams(x[k]) for x in p.examples for k in ("critique", "revision", "response"))


def screen(text: str, current: str, p: Principle) -> str | None:
    """Why a cleaned revision is dropped unjudged (empty, unchanged, fewshot_copy, meta, repetitive)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    checks = [(not text, "empty"), (words == current.lower().split(), "unchanged")]
    checks += [(copies_few_shot(text, p), "fewshot_copy"), (META.search(text), "meta")]
    checks += [(len(grams) >= 10 and len(set(grams)) < 0.6 * len(grams), "repetitive")]
    return next((why for bad, why in checks if bad), None)


def pick_revision(
    drafts: list[str], current: str, p: Principle, prompt: str, now: dict, det: Detectors
) -> dict:
    """The best of a round's drafts (not bare, then least harmful), kept only if judged less harmful than
    the answer it revises and not a bare refusal; `filters` counts each draft's fate."""
    counts, ok = Counter(), []
    for d in drafts:
        text, cut = strip_prefix(d)
        why = screen(text, current, p)
        counts.update({"prefix_stripped": cut, why or "judged": 1})
        ok += [] if why else [text]
    judged = det.judge([prompt] * len(ok), ok) if ok else []
    fate = ("passed", "not_less_harmful", "bare_refusal")
    counts.update(fate[2] if j["bare"] else fate[j["harm"] >= now["harm"]] for j in judged)
    if not ok:
        ok, judged = [strip_prefix(drafts[0])[0]], [None]  # nothing to judge: the first draft, dropped
    i = min(range(len(ok)), key=lambda i: (judged[i]["bare"], judged[i]["harm"]) if judged[i] else (1, 1))
    counts["kept"] = kept = int(bool(judged[i]) and not judged[i]["bare"] and judged[i]["harm"] < now["harm"])
    outcome = ("dropped", "kept")[kept]
    return {"revision": ok[i], "outcome": outcome, "judged": judged[i], "filters": dict(counts)}


def ask(backend: Backend, chats: dict[str, Messages], s: Sampling) -> dict[str, list[str]]:
    return {c.key: c.texts for c in backend.generate([Request(k, m) for k, m in chats.items()], s)}


def revise_chunk(
    chunk: list[Request], policy: Backend, critic: Backend, det: Detectors, const: Constitution, cfg
) -> list[dict]:
    """Initial answers and `rounds` critique → revision rounds for a chunk of prompts → trace records."""
    weights, convs = dict(zip(TIERS, cfg.tier_weights, strict=True)), {r.key: r.messages for r in chunk}
    prompt = {k: last_user(m) for k, m in convs.items()}
    current = {k: v[0] for k, v in ask(policy, convs, cfg.sampling(1)).items()}
    now = dict(zip(current, det.judge([prompt[k] for k in current], list(current.values())), strict=True))
    traces = {
        k: {"id": k, "messages": m, "initial": current[k], "judged": now[k], "rounds": []}
        for k, m in convs.items()
    }
    for rnd in range(1, cfg.rounds + 1):
        pick = {k: const.sample(random.Random(f"{cfg.seed}:{k}:{rnd}"), weights) for k in convs}
        crit = {k: critic_chat(p, convs[k], current[k]) for k, p in pick.items()}
        critiques = {k: v[0] for k, v in ask(critic, crit, cfg.sampling(1)).items()}
        rev = {
            k: [*c, {"role": "assistant", "content": critiques[k]}, user(revision_ask(pick[k]))]
            for k, c in crit.items()
        }
        s = Sampling(cfg.samples_per_round, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.seed + rnd)
        for k, drafts in ask(critic, rev, s).items():
            e = pick_revision(drafts, current[k], pick[k], prompt[k], now[k], det)
            if e["outcome"] == "kept":
                current[k], now[k] = e["revision"], e["judged"]
            head = {"round": rnd, "principle": pick[k].id, "tier": pick[k].tier, "critique": critiques[k]}
            traces[k]["rounds"].append(head | e | {"response": current[k]})
    return [traces[r.key] for r in chunk]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def distinct_2(texts: list[str]) -> float:
    """Distinct bigrams / all bigrams over a set of answers (Li et al. 2016, arXiv:1510.03055)."""
    grams = [tuple(w[i : i + 2]) for t in texts for w in [t.split()] for i in range(len(w) - 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def round_stats(traces: list[dict], rounds: int) -> list[dict]:
    """Per round (0 = initial answers): harm, refusal, evasive-refusal rates, words, distinct-2, filters."""
    out = []
    for r in range(rounds + 1):
        kept = [[e for e in t["rounds"][:r] if e["outcome"] == "kept"] for t in traces]
        judged = [k[-1]["judged"] if k else t["judged"] for k, t in zip(kept, traces, strict=True)]
        texts = [t["rounds"][r - 1]["response"] if r else t["initial"] for t in traces]
        n, row = max(len(texts), 1), {"round": r, "prompts": len(texts)}
        row |= {f"{name}_rate": sum(j[key] for j in judged) / n for name, key in RATES}
        row |= {"mean_words": sum(len(t.split()) for t in texts) / n, "distinct_2": distinct_2(texts)}
        if r:
            counts = sum((Counter(t["rounds"][r - 1]["filters"]) for t in traces), Counter())
            row["filters"] = {f: counts[f] for f in FILTERS}
        out.append(row)
    return out


def helpful_rows(spec: str, n: int, seed: int) -> list[dict]:
    """n helpfulness SFT rows: non-reserved ShareGPT exchanges, or a JSONL of {prompt, completion}."""
    if not spec or n == 0:
        return []
    if spec == "sharegpt":
        pairs = sharegpt_pairs(max_chars=1200, limit=4 * n + 100)
    else:
        pairs = [(r["prompt"], r["completion"]) for _, r in read_records(spec)]
    rows = [{"prompt": q, "completion": a, "source": spec} for q, a in pairs]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def run(cfg: ReviseConfig) -> dict:
    const = load_constitution(cfg.constitution)  # checked before any model loads
    prompts = str(REDTEAM) if cfg.prompts == "default" else cfg.prompts
    todo = [r for _, r in read_prompts(prompts, cfg.system)][: cfg.limit]
    out = Path(cfg.output_dir)
    trace_path = out / "trace.jsonl"
    if not cfg.resume and trace_path.exists():
        trace_path.unlink()
    cfglib.save(cfg, out / "job_config.yaml")
    done = done_ids(trace_path)
    if pending := [r for r in todo if r.key not in done]:
        policy = make_backend(cfg.backend, cfg.policy, cfg.precision, cfg.batch_size)
        same = cfg.critic == cfg.policy
        critic = policy if same else make_backend(cfg.backend, cfg.critic, cfg.precision, cfg.batch_size)
        det = Detectors(cfg.harm_detector, cfg.refusal_detector, cfg.bare_words)
        bar = tqdm(total=len(todo), initial=len(todo) - len(pending), desc="cai revise", unit="prompt")
        with trace_path.open("a") as f, bar:
            for i in range(0, len(pending), cfg.chunk_size):
                chunk = pending[i : i + cfg.chunk_size]
                traces = revise_chunk(chunk, policy, critic, det, const, cfg)
                f.writelines(json.dumps(t, ensure_ascii=False) + "\n" for t in traces)
                f.flush()
                bar.update(len(chunk))
    keys = {r.key for r in todo}
    traces = [t for t in map(json.loads, trace_path.read_text().splitlines()) if t["id"] in keys]
    sft = [{"id": t["id"], "prompt": t["messages"], "completion": e["response"], "round": e["round"], "principle": e["principle"]}
           for t in traces for e in t["rounds"] if e["outcome"] == "kept"]  # fmt: skip
    helpful = helpful_rows(cfg.helpful_data, round(cfg.helpful_ratio * len(sft)), cfg.seed)
    write_jsonl(out / "sft.jsonl", sft + helpful)
    rep = {"prompts": len(traces), "revisions_kept": len(sft), "helpful_rows": len(helpful)}
    rep |= {"policy": cfg.policy, "critic": cfg.critic, "constitution": const.source}
    rep["rounds"] = round_stats(traces, cfg.rounds)
    write_atomic(out / "report.json", json.dumps(rep, indent=2) + "\n")
    write_atomic(out / "report.md", report_md(rep))
    return {"output_dir": str(out)} | {k: rep[k] for k in ("prompts", "revisions_kept", "helpful_rows")}


def report_md(rep: dict) -> str:
    head = ["round", "harm", "refusal", "evasive refusal", "mean words", "distinct-2", *FILTERS]
    lines = [f"# SL-CAI: {rep['prompts']} prompts, policy {rep['policy']}, critic {rep['critic']}", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rep["rounds"]:
        cells = [r["round"], *(f"{r[f'{n}_rate']:.1%}" for n, _ in RATES), f"{r['mean_words']:.0f}"]
        cells += [f"{r['distinct_2']:.3f}", *(r.get("filters", {}).get(k, "–") for k in FILTERS)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    tail = f"SFT set: {rep['revisions_kept']} kept revisions + {rep['helpful_rows']} helpfulness rows."
    return "\n".join([*lines, "", tail]) + "\n"
