"""Constitutional AI: the constitution's validation, the label's math (golden numbers), a fake labeller
whose position bias the order averaging cancels, failed judgements, the labeller gate, resume of
`cai revise` and `cai label`, the N-tier priority rule, and `alignkit serve` as the feedback endpoint."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import httpx
import pytest
import torch
from conftest import write_jsonl

from alignkit import cli
from alignkit.cai import label as L
from alignkit.cai.constitution import TIERS, load_constitution
from alignkit.cai.revise import copies_few_shot, distinct_2, screen, strip_prefix
from alignkit.config import ConfigError, load
from alignkit.data import DataError
from alignkit.gen.endpoint import Endpoint, EndpointBackend
from alignkit.train.reward import priority_combine, tiered_combine


# ---------------------------------------------------------------- the constitution
def test_default_constitution_covers_every_tier_and_the_hard_constraints():
    c = load_constitution()
    assert {p.tier for p in c.principles} == set(TIERS)
    assert {p.id for p in c.principles if p.hard} == {"mass-casualty", "minors", "oversight"}
    assert c.rules and all(r.strip() for r in c.rules)
    from alignkit.cai.constitution import DEFAULT
    from alignkit.guard.pipeline import ContextRules

    assert ContextRules.load(DEFAULT).rules == list(c.rules)  # the guard's rules_file takes the same file


GOOD = """version: 1
rules: [be kind]
principles:
  - id: a
    tier: safety
    critique: c
    revision: r
    comparison: q
"""


@pytest.mark.parametrize(
    ("edit", "line", "field", "message"),
    [
        (("tier: safety", "tier: vibes"), 5, "principles[0] (a).tier", "is not a tier"),
        (("    critique: c\n", ""), 4, "principles[0] (a).critique", "missing or empty"),
        (
            ("    comparison: q\n", "    comparison: q\n    colour: red\n"),
            9,
            "principles[0] (a).colour",
            "unknown field",
        ),
        (
            ("    comparison: q\n", "    comparison: q\n    hard: maybe\n"),
            9,
            "principles[0] (a).hard",
            "true or false",
        ),
        (
            ("    comparison: q\n", "    comparison: q\n    examples: [{prompt: p}]\n"),
            9,
            "principles[0] (a).examples",
            "exactly the fields",
        ),
        (("  - id: a\n", "  - id: ''\n"), 4, "principles[0].id", "missing or empty"),
        (
            (
                "    comparison: q\n",
                "    comparison: q\n    examples: [{prompt: p, response: '', critique: c, revision: r}]\n",
            ),
            9,
            "principles[0] (a).examples",
            "every field must be a non-empty string",
        ),
        (
            (
                "  - id: a\n    tier: safety\n    critique: c\n    revision: r\n    comparison: q\n",
                "  - just a string\n",
            ),
            4,
            "principles[0]",
            "expected a mapping",
        ),
        (("rules: [be kind]", "rules: be kind"), None, "'rules'", "list of non-empty strings"),
        (("principles:", "principle:"), None, "'principle'", "unknown key"),
    ],
)
def test_every_constitution_error_names_the_line_principle_and_field(tmp_path, edit, line, field, message):
    path = tmp_path / "c.yaml"
    path.write_text(GOOD.replace(*edit))
    with pytest.raises(DataError) as e:
        load_constitution(str(path))
    text = str(e.value)
    assert text.startswith(str(path)) and message in text and f"field '{field.strip(chr(39))}'" in text
    assert (f"line {line}," in text) if line else "line" not in text


def test_constitution_duplicate_ids_and_an_empty_list(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(GOOD + GOOD.split("principles:\n")[1])
    with pytest.raises(DataError, match=r"line 9, field 'principles\[1\] \(a\).id': duplicate id 'a'"):
        load_constitution(str(path))
    path.write_text("principles: []\n")
    with pytest.raises(DataError, match="non-empty list"):
        load_constitution(str(path))


def test_a_bad_constitution_stops_revise_before_any_model_loads(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text(GOOD.replace("tier: safety", "tier: vibes"))
    args = ["cai", "revise", f"output_dir={tmp_path / 'out'}", f"constitution={bad}", "policy=/no/such/model"]
    assert cli.main(args) == 2
    assert "is not a tier" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sampling_follows_the_tier_weights():
    import random

    c, rng = load_constitution(), random.Random(0)
    w = dict(zip(TIERS, [1.0, 0.0, 0.0, 3.0], strict=True))
    tiers = [c.sample(rng, w).tier for _ in range(4000)]
    assert set(tiers) == {"safety", "helpfulness"}
    assert abs(tiers.count("helpfulness") / 4000 - 0.75) < 0.03
    assert {c.sample(rng, w, "ethics").tier for _ in range(20)} == {"ethics"}


# ---------------------------------------------------------------- the label's math
def test_option_probs_golden():
    p, mass = L.option_probs([math.log(0.6), math.log(0.2)])
    assert p == pytest.approx([0.75, 0.25]) and mass == pytest.approx(0.8)
    p, mass = L.option_probs([math.log(0.3) + math.log(0.5), math.log(0.1)])  # a two-token option
    assert p == pytest.approx([0.6, 0.4]) and mass == pytest.approx(0.25)


def test_both_orders_and_clamp_golden():
    assert L.both_orders(0.8, 0.6) == (pytest.approx(0.7), False)
    assert L.both_orders(0.8, 0.3) == (pytest.approx(0.55), True)  # (A) won both times: position bias
    assert L.both_orders(0.2, 0.9) == (pytest.approx(0.55), True)  # (B) won both times
    assert [L.clamp(p, 0.4, 0.6) for p in (0.05, 0.5, 0.97)] == [0.4, 0.5, 0.6]


def test_ece_golden():
    err, bins = L.ece([0.9, 0.9, 0.6, 0.6], [True, False, True, True])
    assert err == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert bins == [(pytest.approx(0.6), 1.0, 2), (pytest.approx(0.9), 0.5, 2)]


# ---------------------------------------------------------------- a scripted fake labeller
QUALITY = {"good": 1.0, "fine": 0.3, "bad": -0.8}


class FakeFeedback:
    """P(A) = σ(q(first) − q(second) + bias): it knows which answer is better and also favours (A)."""

    def __init__(self, bias: float = 2.0, fail: set[str] = frozenset(), spec: str = "fake"):
        self.bias, self.fail, self.spec, self.calls = bias, fail, spec, 0

    def options(self, chat) -> tuple[str, str]:
        m = re.search(r"\(A\) (.*?)\n\n\(B\) (.*?)\n\n", chat[0]["content"], re.S)
        return m.group(1), m.group(2)

    def probs(self, chats):
        out = []
        for c in chats:
            self.calls += 1
            a, b = self.options(c)
            if a in self.fail or b in self.fail:
                out.append("failed")
                continue
            pa = 1 / (1 + math.exp(-(QUALITY[a] - QUALITY[b] + self.bias)))
            out.append(([pa, 1 - pa], 1.0))
        return out

    def reasons(self, chats, s):
        return ["thinking" for _ in chats]


def items(pairs):
    return [{"key": f"k{i}", "messages": [{"role": "user", "content": "q"}], "x": x, "y": y, "tier": None, "kind": ""}
            for i, (x, y) in enumerate(pairs)]  # fmt: skip


def test_order_averaging_cancels_a_position_bias():
    fb, keys, const = FakeFeedback(bias=2.0), L.FeedbackKeys(), load_constitution()
    pairs = [
        ("good", "bad"),
        ("bad", "good"),
        ("fine", "bad"),
        ("bad", "fine"),
        ("good", "fine"),
        ("fine", "good"),
    ]
    res = L.judge_pairs(fb, keys, const, items(pairs), None, 0)
    for (x, y), r in zip(pairs, res, strict=True):
        assert r["p_a_first"] > 0.5  # shown first, either answer "wins": the bias alone would decide
        assert (r["label"] > 0.5) == (QUALITY[x] > QUALITY[y])  # averaged, the better answer wins
    for r, swapped in zip(res[::2], res[1::2], strict=True):
        assert r["label"] + swapped["label"] == pytest.approx(1.0)
    assert all(r["position_bias"] for r in res)  # the same slot won both orders: flagged
    d, b = QUALITY["good"] - QUALITY["bad"], 2.0
    sig = 1 / (1 + math.exp(-(d + b))), 1 / (1 + math.exp(-(d - b)))
    assert res[0]["label"] == pytest.approx(sum(sig) / 2)  # (σ(d + b) + σ(d − b)) / 2


def test_chain_of_thought_probabilities_are_clamped():
    keys = L.FeedbackKeys(cot=True, principles_per_label=3)
    res = L.judge_pairs(FakeFeedback(bias=0.0), keys, load_constitution(), items([("good", "bad")]), None, 0)
    assert res[0]["p_a_first"] == 0.6 and res[0]["p_b_first"] == 0.6 and res[0]["label"] == pytest.approx(0.6)
    assert 1 <= len(res[0]["principles"]) <= 3


def test_a_failed_judgement_is_never_a_label(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"id": "1", "prompt": "q1", "responses": ["good", "bad"]},
        {"id": "2", "prompt": "q2", "responses": ["fine", "bad"]},
    ])  # fmt: skip
    cfg = load(L.LabelConfig, None, [f"output_dir={tmp_path / 'o'}", f"pairs={pairs}", "force=true"])
    fb = FakeFeedback(bias=0.0, fail={"fine"})
    rep = L.label(cfg, fb, check_items=items([("good", "bad")]))
    labels = [json.loads(x) for x in (tmp_path / "o" / "labels.jsonl").read_text().splitlines()]
    trace = [json.loads(x) for x in (tmp_path / "o" / "trace.jsonl").read_text().splitlines()]
    assert [x["pair"] for x in labels] == ["1"] and rep["failed"] == 1 and rep["labels"] == 1
    assert [t["status"] for t in trace] == ["labelled", "failed"] and "label" not in trace[1]
    assert labels[0]["chosen"] == "good" and labels[0]["label"] > 0.5 and labels[0]["labeller"] == "fake"


def test_label_output_puts_the_preferred_answer_first_and_resumes(tmp_path):
    recs = [
        {"id": str(i), "prompt": f"q{i}", "responses": r}
        for i, r in enumerate([["bad", "good"], ["good", "fine"], ["bad", "fine"]])
    ]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", recs)
    out = tmp_path / "o"
    args = [f"output_dir={out}", f"pairs={pairs}", "tiers=[safety,helpfulness]", "chunk_size=2"]
    fb = FakeFeedback(bias=1.0)
    L.label(load(L.LabelConfig, None, [*args, "limit=2"]), fb, check_items=items([("good", "bad")]))
    calls = fb.calls
    L.label(load(L.LabelConfig, None, args), fb, check_items=items([("good", "bad")]))
    assert fb.calls - calls == 2 * 2  # only the third pair, once per tier, both orders
    labels = [json.loads(x) for x in (out / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == 6 and {x["tier"] for x in labels} == {"safety", "helpfulness"}
    assert all(QUALITY[x["chosen"]] > QUALITY[x["rejected"]] and x["label"] >= 0.5 for x in labels)
    assert len((out / "labels.safety.jsonl").read_text().splitlines()) == 3
    x = labels[0]  # chosen was shown second in the first order: its probabilities are its own
    assert x["label"] == pytest.approx((x["p_a_first"] + x["p_b_first"]) / 2)


def test_label_refuses_a_labeller_below_the_floor(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"id": "1", "prompt": "q", "responses": ["good", "bad"]}])
    args = [f"output_dir={tmp_path / 'o'}", f"pairs={pairs}", "floor=0.9"]
    coin = items([("good", "bad"), ("bad", "good")])  # a strong (A) bias with no skill: 1 of 2 right
    with pytest.raises(ConfigError, match=r"got 50.0% \[.*\] of the check set right, under floor=0.9"):
        L.label(load(L.LabelConfig, None, args), FakeFeedback(bias=8.0), check_items=coin)
    assert not (tmp_path / "o" / "labels.jsonl").exists()
    rep = L.label(load(L.LabelConfig, None, [*args, "force=true"]), FakeFeedback(bias=8.0), check_items=coin)
    assert rep["labels"] == 1


def test_check_set_ships_hard_cases():
    rows = L.read_items(str(L.CHECK_SET), ("better", "worse"))
    kinds = {r["kind"] for r in rows}
    assert {
        "evasive_vs_helpful",
        "harmful_vs_refusal",
        "sycophantic_vs_correct",
        "bare_vs_explained",
    } <= kinds
    assert len(rows) >= 60


# ---------------------------------------------------------------- the feedback model: local and endpoint
def test_local_option_scores_equal_a_plain_forward_of_each_option(tiny_model):
    fb = L.Feedback(tiny_model, "fp32", 4, 0.0)
    chats = [
        [{"role": "user", "content": "the cat sat"}],
        [{"role": "user", "content": "a dog ran far away"}],
    ]
    got = fb._local_logps(chats)
    be, tok = fb.backend, fb.backend.tok
    for chat, scores in zip(chats, got, strict=True):
        for opt, s in zip(L.OPTIONS, scores, strict=True):
            p, o = be.encode(chat), tok(opt, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = be.model(input_ids=torch.tensor([p + o])).logits[0].log_softmax(-1)
            want = sum(logp[len(p) - 1 + t, i].item() for t, i in enumerate(o))
            assert s == pytest.approx(want, abs=1e-4)


def test_endpoint_option_probs_skip_a_bracket_token_and_sum_spellings():
    body = {"choices": [{"message": {"content": "(A)"}, "finish_reason": "stop", "logprobs": {"content": [
        {"token": "(", "logprob": -0.01, "top_logprobs": [{"token": "(", "logprob": -0.01}]},
        {"token": "A", "logprob": math.log(0.3), "top_logprobs": [
            {"token": "A", "logprob": math.log(0.3)}, {"token": " A", "logprob": math.log(0.1)},
            {"token": "B", "logprob": math.log(0.1)}, {"token": "x", "logprob": math.log(0.5)}]},
    ]}}]}  # fmt: skip
    transport = httpx.MockTransport(lambda req: httpx.Response(200, json=body))
    fb = L.Feedback.__new__(L.Feedback)
    fb.min_mass, fb.top, fb.batch_size = 0.05, 5, 2
    fb.backend = EndpointBackend(Endpoint("http://x/v1", "m", transport=transport, api_key_env=""))
    ((p, mass),) = fb.probs([[{"role": "user", "content": "?"}]])
    assert p == pytest.approx([0.8, 0.2]) and mass == pytest.approx(0.5)
    fb.min_mass = 0.6
    assert fb.probs([[{"role": "user", "content": "?"}]]) == ["abstained"]


def test_alignkit_serve_is_a_feedback_endpoint(tiny_model):
    from alignkit.guard.serve import ServeConfig, create_app, serving

    cfg = ServeConfig(
        model=tiny_model, guard="none", max_new_tokens=8, temperature=0.0, log_file="", precision="fp32"
    )
    with serving(create_app(cfg)) as base:
        r = httpx.post(f"{base}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 4, "temperature": 0,
            "logprobs": True, "top_logprobs": 3}, timeout=30)  # fmt: skip
        content = r.json()["choices"][0]["logprobs"]["content"]
        assert len(content) >= 1 and all(len(c["top_logprobs"]) == 3 for c in content)
        for c in content:  # greedy: the chosen token is the most likely one
            assert c["logprob"] == pytest.approx(c["top_logprobs"][0]["logprob"], abs=1e-5)
        fb = L.Feedback(f"openai:{base}/v1#tiny", "fp32", 2, 0.0, top_logprobs=20)
        got = L.judge_pairs(
            fb, L.FeedbackKeys(min_mass=0.0), load_constitution(), items([("yes", "no")]), None, 0
        )
    assert got[0]["status"] in ("labelled", "abstained")  # a random tiny model may not say A or B at all


# ---------------------------------------------------------------- N-tier priority
def test_tiered_combine_two_tiers_is_priority_combine():
    helpful, harmless = torch.tensor([0.5, -1.0, 2.0, 0.1]), torch.tensor([-0.5, 0.2, 1.0, -2.0])
    assert torch.allclose(tiered_combine([harmless, helpful], [0.0]), priority_combine(helpful, harmless))
    with pytest.raises(ValueError, match="3 tiers need 2 thresholds"):
        tiered_combine([harmless, helpful, helpful], [0.0])


def test_tiered_combine_properties():
    g = torch.Generator().manual_seed(0)
    r = [torch.randn(400, generator=g) * 3 for _ in range(4)]
    tau = [0.0, -0.5, 0.5]
    R = tiered_combine(r, tau)
    first_fail = torch.full((400,), 4)
    for i in reversed(range(3)):
        first_fail[r[i] < tau[i]] = i
    for a in range(400):  # passing more gates, in priority order, always ranks higher
        for b in range(a + 1, 400):
            if first_fail[a] != first_fail[b]:
                assert (R[a] > R[b]) == bool(first_fail[a] > first_fail[b])
    fails_first = first_fail == 0
    assert torch.allclose(R[fails_first], (r[0] - tau[0])[fails_first])  # a lower tier cannot buy it back
    ok = first_fail == 4
    order = torch.argsort(r[3][ok])
    assert torch.all(R[ok][order].diff() >= 0)  # all gates passed: the last tier decides


def test_rm_combine_writes_n_tiers(tmp_path):
    out = tmp_path / "p"
    assert cli.main(["rm", "combine", f"output_dir={out}", "tiers=[a,b,c]", "thresholds=[0.1,0.2]"]) == 0
    spec = json.loads((out / "priority.json").read_text())
    assert spec["thresholds"] == [0.1, 0.2] and [Path(t).name for t in spec["tiers"]] == ["a", "b", "c"]
    assert cli.main(["rm", "combine", f"output_dir={out}", "tiers=[a,b]", "thresholds=[0.1,0.2]"]) == 2


# ---------------------------------------------------------------- SL-CAI filters and resume
def test_revision_filters():
    assert strip_prefix("Sure, here's a revised response: I won't help.") == ("I won't help.", True)
    assert strip_prefix("Revision: Call a doctor.") == ("Call a doctor.", True)
    assert strip_prefix("I won't help with that.") == ("I won't help with that.", False)
    p = load_constitution().principles[3]  # serious-harm: has few-shot examples
    copy = " ".join(p.examples[0]["revision"].split()[:10])
    assert copies_few_shot(f"Well. {copy} and more.", p) and not copies_few_shot(
        "Something else entirely.", p
    )
    assert distinct_2(["a b a b", "a b"]) == pytest.approx(2 / 4)
    assert screen("", "x", p) == "empty" and screen("Same  words", "same words", p) == "unchanged"
    assert screen("The last answer gives harmful steps and should refuse.", "x", p) == "meta"
    assert screen("Sure. Reply with the rewritten answer only.", "x", p) == "meta"
    assert screen("no no no " * 6, "x", p) == "repetitive"
    assert (
        screen(
            "I can't help hurt anyone; if you're angry at him, talking to someone you trust helps.", "x", p
        )
        is None
    )


def test_revise_resumes_and_keeps_every_round(tiny_model, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"id": str(i), "messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "ok"},
                                    {"role": "user", "content": "now the bad part"}]} for i in range(3)
    ])  # fmt: skip
    out = tmp_path / "r"
    args = [
        "cai",
        "revise",
        f"output_dir={out}",
        f"prompts={prompts}",
        f"policy={tiny_model}",
        f"critic={tiny_model}",
    ]
    args += [
        "rounds=2",
        "samples_per_round=2",
        "max_new_tokens=6",
        "chunk_size=2",
        "helpful_data=",
        "precision=fp32",
    ]
    assert cli.main([*args, "limit=2"]) == 0
    first = (out / "trace.jsonl").read_text().splitlines()
    with (out / "trace.jsonl").open("a") as f:
        f.write('{"id": "torn')  # killed mid-write
    assert cli.main(args) == 0
    trace = [json.loads(x) for x in (out / "trace.jsonl").read_text().splitlines()]
    assert (out / "trace.jsonl").read_text().splitlines()[:2] == first and [t["id"] for t in trace] == [
        "0",
        "1",
        "2",
    ]
    assert all(len(t["messages"]) == 3 and [e["round"] for e in t["rounds"]] == [1, 2] for t in trace)
    rep = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in rep["rounds"]] == [0, 1, 2] and rep["prompts"] == 3
    sft = [json.loads(x) for x in (out / "sft.jsonl").read_text().splitlines()]
    kept = [(t["id"], e["round"]) for t in trace for e in t["rounds"] if e["outcome"] == "kept"]
    assert [(x["id"], x["round"]) for x in sft] == kept


def test_bad_pairs_and_check_files_exit_2_and_write_nothing(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "1", "prompt": "q", "responses": ["only one"]}])
    out = tmp_path / "o"
    assert cli.main(["cai", "label", f"output_dir={out}", f"pairs={bad}"]) == 2
    assert "bad.jsonl, line 1, field 'responses': expected two non-empty answers" in capsys.readouterr().err
    assert cli.main(["cai", "check", f"output_dir={out}", f"data={bad}"]) == 2
    assert "field 'better/worse'" in capsys.readouterr().err and not out.exists()
