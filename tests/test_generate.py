"""`alignkit generate`: sampling, continuous batching equal to plain one-prompt-at-a-time generation, and
resumable output."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from alignkit import cli
from alignkit.data import DataError
from alignkit.gen import Completion, Request, Sampling
from alignkit.gen import generate as gen_mod
from alignkit.gen.generate import GenerateConfig, done_ids, read_prompts
from alignkit.gen.hf import HFBackend, left_pad, sample_next

PROMPTS = [
    "water",
    "tell me about fire",
    "what is the moon and the sun",
    "how can you help",
    "please explain chemistry history to me one two three",
]


@pytest.fixture(scope="module")
def lively(tiny_model):
    """The tiny Llama with weights redrawn at a scale where the greedy output depends on the context.

    At the default init (std 0.02) every prompt decodes to one repeated token, so a broken KV cache or
    mask would go unnoticed. One frequent token is also made a stop token so that rows finish at
    different steps and refills merge caches of different ages.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if w.dim() == 2:  # std 1/√fan_in for embeddings, 2/√fan_in for the layers
                w.copy_(
                    torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5 * (1.0 if "embed" in name else 2.0)
                )
    plain = [reference(model, tok, p, {tok.eos_token_id}, 12) for p in PROMPTS]
    stop = Counter(t for ids in plain for t in ids[1:]).most_common(1)[0][0]
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    return model, tok


def prompt_ids(tok, prompt: str) -> list[int]:
    out = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return list(out["input_ids"] if isinstance(out, dict) else out)


def reference(model, tok, prompt: str, eos: set[int], max_new_tokens: int) -> list[int]:
    """Plain transformers greedy decoding of one prompt alone (no padding); tokens up to the first EOS."""
    ids = prompt_ids(tok, prompt)
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=sorted(eos),
        pad_token_id=tok.pad_token_id,
    )[0, len(ids) :].tolist()
    cut = next((i for i, t in enumerate(out) if t in eos), len(out))
    return out[:cut]


# ---------------------------------------------------------------- sampling


def test_sample_next_greedy_at_temperature_zero():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0], [-5.0, -4.0, -6.0, -4.5]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.0, 1.0, g).tolist() == [1, 0, 1]
    assert sample_next(logits, 0.0, 0.1, g).tolist() == [1, 0, 1]


def test_sample_next_tiny_top_p_always_takes_the_argmax():
    logits = torch.tensor([[0.0, 0.1, 0.2, 0.15]] * 64)  # nearly flat: plain sampling would spread
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_next(logits, 1.0, 1e-6, g).tolist() == [2] * 64
    assert len(set(sample_next(logits, 1.0, 1.0, g).tolist())) > 1  # and without top_p it does spread


def test_sample_next_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    # probs 0.4, 0.35, 0.25: 0.4 < 0.5, 0.4 + 0.35 ≥ 0.5 → tokens 0 and 1 stay, token 2 never drawn
    logits = torch.tensor([[0.4, 0.35, 0.25]]).log().expand(4000, 3)
    draws = sample_next(logits, 1.0, 0.5, torch.Generator().manual_seed(1)).tolist()
    counts = Counter(draws)
    assert set(counts) == {0, 1}
    # renormalised 0.4/0.75 = 0.5333 for token 0 (4000 draws: sd 0.008)
    assert counts[0] / 4000 == pytest.approx(0.5333, abs=0.03)


def test_sample_next_seeded_draws_are_reproducible():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(3))

    def draws(seed: int) -> list[list[int]]:  # five steps from one generator, as a decode loop does
        g = torch.Generator().manual_seed(seed)
        return [sample_next(logits, 0.9, 0.95, g).tolist() for _ in range(5)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_sample_next_never_draws_a_zero_probability_token(monkeypatch):
    # u = 0: the draw must still land on a token with positive probability
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.zeros(*shape, dtype=kw.get("dtype")))
    logits = torch.tensor([[float("-inf"), 0.0, 0.0], [0.0, 5.0, 5.0]])
    # row 1 with top_p = 0.9: probs ≈ (0.0034, 0.4983, 0.4983); token 0 is outside the nucleus
    got = sample_next(logits, 1.0, 0.9, torch.Generator().manual_seed(0)).tolist()
    assert got[0] != 0 and got[1] != 0


def test_left_pad_golden():
    t = torch.tensor([[1, 2], [3, 4]])
    assert left_pad(t, 4, 1).tolist() == [[0, 0, 1, 2], [0, 0, 3, 4]]
    assert left_pad(t, 3, 0).tolist() == [[0, 0], [1, 2], [3, 4]]
    assert left_pad(t, 2, 1) is t and left_pad(t, 1, 1) is t
    kv = torch.ones(2, 3, 5, 4)  # (B, heads, T, head_dim): pad T
    padded = left_pad(kv, 7, 2)
    assert padded.shape == (2, 3, 7, 4) and padded[:, :, :2].abs().sum() == 0 and padded[:, :, 2:].eq(1).all()


# ---------------------------------------------------------------- continuous batching


def run_backend(backend: HFBackend, sampling: Sampling, prompts=PROMPTS):
    """Completions by key, and the token ids behind each yielded text (n = 1), caught at decode time."""
    decoded: list[list[int]] = []
    real = backend.tok.decode

    def spy(ids, **kw):
        decoded.append(list(ids))
        return real(ids, **kw)

    backend.tok.decode = spy
    try:
        reqs = [Request(f"r{i}", [{"role": "user", "content": p}]) for i, p in enumerate(prompts)]
        got, ids = {}, {}
        for c in backend.generate(reqs, sampling):
            assert isinstance(c, Completion) and c.key not in got
            got[c.key] = c
            ids[c.key] = decoded[-1]
    finally:
        del backend.tok.decode
    return got, ids


def test_continuous_batching_equals_one_prompt_at_a_time(lively):
    model, tok = lively
    backend = HFBackend(model="unused", model_obj=model, tok=tok, batch_size=2)
    assert len(backend.eos) == 2
    expected = [reference(model, tok, p, backend.eos, 12) for p in PROMPTS]
    lengths = [len(e) for e in expected]
    # the premise: rows retire at different steps (so refills merge caches of different ages), some at the cap
    assert len(set(lengths)) >= 3 and 12 in lengths and min(lengths) < 12, lengths
    assert len({len(prompt_ids(tok, p)) for p in PROMPTS}) == 5  # prompts of 5 different lengths

    calls = []
    forward = model.forward

    def count(*a, **kw):
        calls.append(kw["input_ids"].shape)
        return forward(*a, **kw)

    model.forward = count
    try:
        got, ids = run_backend(backend, Sampling(n=1, temperature=0.0, max_new_tokens=12))
    finally:
        del model.forward
    assert sorted(got) == [f"r{i}" for i in range(5)]  # each request exactly once
    prefills = [s for s in calls if s[1] > 1]
    assert len(prefills) >= 3 and max(s[0] for s in calls) == 2  # refills happened, never over batch 2
    for i, want in enumerate(expected):
        c = got[f"r{i}"]
        assert ids[f"r{i}"] == want, (PROMPTS[i], ids[f"r{i}"], want)
        assert c.tokens == [len(want)]
        assert c.texts == [tok.decode(want, skip_special_tokens=True)]


def test_batch_size_does_not_change_greedy_output(lively):
    model, tok = lively
    sampling = Sampling(n=1, temperature=0.0, max_new_tokens=12)
    one, _ = run_backend(HFBackend(model="unused", model_obj=model, tok=tok, batch_size=1), sampling)
    five, _ = run_backend(HFBackend(model="unused", model_obj=model, tok=tok, batch_size=5), sampling)
    assert {k: c.texts for k, c in one.items()} == {k: c.texts for k, c in five.items()}


def test_n_samples_at_temperature_zero_are_identical(lively):
    model, tok = lively
    backend = HFBackend(model="unused", model_obj=model, tok=tok, batch_size=4)
    single, _ = run_backend(backend, Sampling(n=1, temperature=0.0, max_new_tokens=12), PROMPTS[:3])
    reqs = [Request(f"r{i}", [{"role": "user", "content": p}]) for i, p in enumerate(PROMPTS[:3])]
    seen = Counter()
    for c in backend.generate(reqs, Sampling(n=3, temperature=0.0, max_new_tokens=12)):
        seen[c.key] += 1
        assert c.texts == single[c.key].texts * 3
        assert c.tokens == single[c.key].tokens * 3
    assert seen == {"r0": 1, "r1": 1, "r2": 1}


def test_sampling_is_seeded(lively):
    model, tok = lively
    backend = HFBackend(model="unused", model_obj=model, tok=tok, batch_size=3)

    def texts(seed):
        s = Sampling(n=2, temperature=1.0, max_new_tokens=8, seed=seed)
        reqs = [Request(f"r{i}", [{"role": "user", "content": p}]) for i, p in enumerate(PROMPTS[:3])]
        return {c.key: c.texts for c in backend.generate(reqs, s)}

    assert texts(0) == texts(0)
    assert texts(0) != texts(1)


# ---------------------------------------------------------------- output files


def test_done_ids_cuts_a_torn_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    good = '{"id": "a", "response": "x"}\n{"id": 2, "response": "y"}\n'
    out.write_text(good + '{"id": "c", "resp')
    assert done_ids(out) == {"a", "2"}
    assert out.read_text() == good  # the torn line is gone, so appending starts on a fresh line
    assert done_ids(out) == {"a", "2"}
    # a torn line that happens to parse is still torn (no newline): not counted, cut
    out.write_text(good + '{"id": "c"}')
    assert done_ids(out) == {"a", "2"} and out.read_text() == good
    assert done_ids(tmp_path / "missing.jsonl") == set()


def test_done_ids_bad_line_in_the_middle_raises(tmp_path):
    out = tmp_path / "out.jsonl"
    text = '{"id": "a"}\nnot json\n{"id": "c"}\n'
    out.write_text(text)
    with pytest.raises(DataError, match="line 2"):
        done_ids(out)
    assert out.read_text() == text  # nothing cut


def test_read_prompts_errors_name_the_line(tmp_path):
    dup = write_jsonl(
        tmp_path / "dup.jsonl", [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}, {"id": 1, "prompt": "c"}]
    )
    with pytest.raises(DataError, match=r"line 3.*duplicate id '1' \(first on line 1\)"):
        read_prompts(str(dup))
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"id": 1, "prompt": "a"}, {"id": 2, "text": "b"}])
    with pytest.raises(DataError, match=r"line 2, field 'prompt': missing"):
        read_prompts(str(missing))
    no_id = write_jsonl(tmp_path / "noid.jsonl", [{"prompt": "a"}])
    with pytest.raises(DataError, match=r"line 1, field 'id'"):
        read_prompts(str(no_id))


def test_read_prompts_messages_and_system(tmp_path):
    msgs = [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"}]
    src = write_jsonl(
        tmp_path / "p.jsonl", [{"id": "a", "prompt": "hello", "x": 1}, {"id": "b", "messages": msgs}]
    )
    (rec_a, req_a), (rec_b, req_b) = read_prompts(str(src), system="sys")
    assert rec_a == {"id": "a", "prompt": "hello", "x": 1}
    assert req_a.messages == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"}]
    assert req_b.messages == msgs  # a record with its own system prompt keeps it


class Interrupted(KeyboardInterrupt):
    pass


class StopsAfter:
    """Wraps a backend: yields `after` completions, then raises (a killed job)."""

    name = "hf"

    def __init__(self, inner, after: int | None = None):
        self.inner, self.after, self.asked = inner, after, []

    def generate(self, requests, sampling):
        self.asked.append([r.key for r in requests])
        for i, c in enumerate(self.inner.generate(requests, sampling)):
            if i == self.after:
                raise Interrupted
            yield c


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("n", [1, 2])
def test_generate_resumes_after_an_interruption(tmp_path, lively, monkeypatch, n):
    model, tok = lively
    src = write_jsonl(
        tmp_path / "in.jsonl", [{"id": f"p{i}", "prompt": PROMPTS[i % 5], "tag": i} for i in range(6)]
    )
    args = [f"input={src}", "temperature=0", "max_new_tokens=6", "batch_size=2", f"n={n}"]
    backends = []

    def make(after):
        def factory(kind, model_name, precision, batch_size):
            b = StopsAfter(HFBackend("unused", model_obj=model, tok=tok, batch_size=batch_size), after)
            backends.append(b)
            return b

        return factory

    from alignkit.config import load

    monkeypatch.setattr(gen_mod, "make_backend", make(None))
    whole = tmp_path / "whole.jsonl"
    gen_mod.run(load(GenerateConfig, None, [*args, f"output={whole}"]))

    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(gen_mod, "make_backend", make(3))
    with pytest.raises(Interrupted):
        gen_mod.run(load(GenerateConfig, None, [*args, f"output={out}"]))
    first = [r["id"] for r in read_out(out)]
    assert len(first) == 3
    monkeypatch.setattr(gen_mod, "make_backend", make(None))
    result = gen_mod.run(load(GenerateConfig, None, [*args, f"output={out}"]))
    assert (result["generated"], result["skipped"]) == (3, 3)
    assert sorted(backends[-1].asked[0]) == sorted({f"p{i}" for i in range(6)} - set(first))

    recs = read_out(out)
    assert sorted(r["id"] for r in recs) == [f"p{i}" for i in range(6)]  # each id exactly once
    for r in recs:
        assert r["tag"] == int(r["id"][1:]) and r["prompt"] == PROMPTS[r["tag"] % 5]  # fields carried through
        if n == 1:
            assert isinstance(r["response"], str) and "responses" not in r
            assert isinstance(r["response_tokens"], int) and 1 <= r["response_tokens"] <= 6
        else:
            assert len(r["responses"]) == 2 and "response" not in r
            assert len(r["response_tokens"]) == 2 and r["responses"][0] == r["responses"][1]
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(recs, key=key) == sorted(read_out(whole), key=key)  # as if never interrupted


def test_generate_resume_false_starts_afresh(tmp_path, lively, monkeypatch):
    model, tok = lively
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "water"}])
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "response": "old"}\n{"id": "zz", "response": "old"}\n')
    monkeypatch.setattr(gen_mod, "make_backend", lambda *a: HFBackend("unused", model_obj=model, tok=tok))
    from alignkit.config import load

    cfg = load(GenerateConfig, None, [f"input={src}", f"output={out}", "temperature=0", "max_new_tokens=4"])
    assert gen_mod.run(cfg)["skipped"] == 1  # resume: a is done
    assert load(GenerateConfig, tmp_path / "out.job_config.yaml") == cfg  # the resolved config, next to it
    cfg.resume = False
    assert gen_mod.run(cfg)["generated"] == 1
    assert [r["id"] for r in read_out(out)] == ["a"] and read_out(out)[0]["response"] != "old"


# ---------------------------------------------------------------- CLI


def test_generate_help_lists_its_keys(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for key in ("model (str", "input (str", "output (str", "n (int, default 1)", "temperature (float, default 0.7)",
                "top_p (float", "max_new_tokens (int, default 256)", "batch_size (int, default 16)",
                "backend (auto|hf|vllm", "resume (bool, default True)", "--in", "--out"):  # fmt: skip
        assert key in out, key


def test_generate_missing_input_exits_2_naming_the_file(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    out = tmp_path / "o" / "out.jsonl"
    assert cli.main(["generate", "--in", str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "file not found" in err
    assert not out.exists()
    assert cli.main(["generate", f"output={out}"]) == 2  # no input at all
    assert "input" in capsys.readouterr().err
