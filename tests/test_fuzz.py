"""Property-based fuzzing (hypothesis) of the JSONL record readers and parsers and of config coercion: bad
input gets one error naming the file, line and field (or the key), never another exception type; good
input round-trips. Bounded and seeded (derandomize) so that CI runs the same examples every time."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from alignkit import cli
from alignkit.config import ConfigError, load, save
from alignkit.data import DataError, parse_pairs, parse_scoring, parse_sft, read_records, write_jsonl
from alignkit.guard.serve import ServeConfig
from alignkit.train.rm import CombineConfig, RMConfig
from alignkit.train.sft import SFTConfig


def fuzz(n: int):
    """Deterministic and bounded; no example database (it would be written into the checkout)."""
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------- JSON values and records

# line and paragraph separators that str.splitlines would split at, but JSON Lines does not
ODD = "\x85\u2028\u2029\x0b\x0c\x1c\x1d\x1e\r\t \ufeff\x00"
TEXT = st.text(st.characters(blacklist_categories=()) | st.sampled_from(ODD), max_size=12)  # surrogates too
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.sampled_from([10**400, -(10**400), 2**1024 - 1])  # ints no float holds
    | st.floats()  # NaN and ±Infinity included: Python's json reads and writes them
    | TEXT
)
VALUES = st.recursive(
    SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3), max_leaves=8
)
ROLE = st.sampled_from(["user", "assistant", "system"])
GOOD_MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": TEXT})
MESSAGE = GOOD_MESSAGE | st.fixed_dictionaries({}, optional={"role": ROLE | VALUES, "content": TEXT | VALUES})
TEXT_OR_MESSAGES = (
    TEXT | st.lists(GOOD_MESSAGE, min_size=1, max_size=3) | st.lists(MESSAGE, max_size=3) | VALUES
)
NUMBER = (
    st.sampled_from([1.5, 2, -0.1, 1 + 1e-9, -1e-300, 0.5, 1, 0])  # either side of [0, 1]
    | st.floats(-0.5, 1.5)
    | st.integers(-2, 2)
    | st.sampled_from([10**400, -(10**400), 2**1024 - 1, 2**1023, True, False, math.inf, -math.inf, math.nan])
    | st.floats()
    | VALUES
)
FIELDS = {k: TEXT_OR_MESSAGES for k in ("prompt", "completion", "messages", "chosen", "rejected", "response")}
RECORD = st.builds(
    lambda known, other: {**other, **known},
    st.fixed_dictionaries({}, optional={**FIELDS, "label": st.floats(0, 1) | NUMBER, "margin": NUMBER}),
    st.dictionaries(TEXT, VALUES, max_size=2),
)


GOOD_TM = TEXT | st.lists(GOOD_MESSAGE, min_size=1, max_size=3)
GOOD = {
    "sft": st.fixed_dictionaries({"prompt": GOOD_TM, "completion": GOOD_TM})
    | st.lists(GOOD_MESSAGE, max_size=2).map(
        lambda ms: {"messages": [*ms, {"role": "assistant", "content": "ok"}]}
    ),
    "pairs": st.fixed_dictionaries(
        {"prompt": GOOD_TM, "chosen": GOOD_TM, "rejected": GOOD_TM},
        optional={"label": st.floats(0, 1) | st.sampled_from([0, 1]), "margin": st.floats(-1e300, 1e300)},
    ),
    "score": st.fixed_dictionaries({"prompt": GOOD_TM, "response": GOOD_TM}),
}
GOOD_EXAMPLE = {
    "sft": {"prompt": "p", "completion": "c"},
    "pairs": {"prompt": "p", "chosen": "c", "rejected": "r"},
    "score": {"prompt": "p", "response": "r"},
}


SCHEMA_KEYS = {
    "sft": ["prompt", "completion", "messages"],
    "pairs": ["prompt", "chosen", "rejected", "label", "margin"],
    "score": ["prompt", "response"],
}
DELETE = object()


def _poke(rec: dict, changes: list[tuple[str, object]]) -> dict:
    rec = dict(rec)
    for k, v in changes:
        if v is DELETE:
            rec.pop(k, None)
        else:
            rec[k] = v
    return rec


def near(schema: str) -> st.SearchStrategy[dict]:
    """A valid record of the schema with one or two of its fields replaced or deleted."""
    value = {"label": NUMBER | st.just(DELETE), "margin": NUMBER | st.just(DELETE)}
    key = st.sampled_from([*SCHEMA_KEYS[schema], "x"])
    change = key.flatmap(lambda k: st.tuples(st.just(k), value.get(k, st.just(DELETE) | TEXT_OR_MESSAGES)))
    return st.builds(_poke, GOOD[schema], st.lists(change, min_size=1, max_size=2))


def canon(x) -> str:
    """Equality that holds for NaN too (NaN != NaN)."""
    return json.dumps(x)


def jsonl_bytes(records: list[dict], blanks: list[str], ensure_ascii: bool = True) -> tuple[bytes, list[int]]:
    """The records as JSON Lines with blank lines mixed in, and each record's 1-based line number. A lone
    surrogate (from a \\ud800 escape) is written as that escape."""
    lines, numbers = [], []
    for i, rec in enumerate(records):
        if blanks:
            lines.append(blanks[i % len(blanks)])
        lines.append(json.dumps(rec, ensure_ascii=ensure_ascii))
        numbers.append(len(lines))
    return "\n".join(lines).encode("utf-8", "backslashreplace") + b"\n", numbers


BLANK = st.sampled_from(["", " ", "\t", "\r", " \r", "\u2028", "\x85"])  # all strip() to nothing


def data_error(e: DataError, path: Path, line: int | None, fields: set[str] | None = None) -> None:
    """The message names the file first, then the line (and the field when `fields` is given)."""
    msg = str(e)
    head = f"{path}, line {line}" if line else f"{path}: "
    assert msg.startswith(head), (msg, head)
    if fields is not None:
        m = re.match(re.escape(f"{path}, line {line}, field '") + r"([^']*)': ", msg)
        assert m and m.group(1) in fields, (msg, fields)
    assert "\n" not in msg, msg


# ---------------------------------------------------------------- read_records: arbitrary bytes


def _json_line(v, ensure_ascii: bool) -> bytes:
    return json.dumps(v, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")  # not UTF-8 then


LINE = st.one_of(
    st.builds(_json_line, st.dictionaries(TEXT, VALUES, max_size=3), st.booleans()),  # a record
    st.builds(_json_line, VALUES, st.booleans()),  # any JSON value: a record only if an object
    st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")),
    TEXT.map(lambda t: t.replace("\n", "").encode("utf-8", "backslashreplace")),
    BLANK.map(str.encode),
    st.sampled_from(
        [
            b'{"a": ' + b"9" * 5000 + b"}",  # over Python's 4300-digit int limit: a ValueError in json
            b"[" * 100_000,  # nested past the recursion limit
            b'{"a": 1} {"b": 2}',
            b"\xef\xbb\xbf{}",  # a UTF-8 BOM
            b'{"a": NaN, "b": -Infinity}',
            b'{"a": "\\ud800"}',
            b"\xed\xa0\x80",  # a surrogate encoded: not UTF-8
        ]
    ),
)


def expected_outcome(raw: bytes) -> tuple[int | None, list[tuple[int, object]]]:
    """(first bad line, or None; the records before it), worked out line by line from the bytes."""
    chunks = raw.split(b"\n")
    for i, chunk in enumerate(chunks, 1):
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            return i, []  # the file is decoded before any line is read
    out = []
    for i, chunk in enumerate(chunks, 1):
        text = chunk.decode("utf-8")
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except Exception:
            return i, out
        if not isinstance(rec, dict):
            return i, out
        out.append((i, rec))
    return None, out


@fuzz(200)
@given(lines=st.lists(LINE, max_size=6), trailing_newline=st.booleans())
@example(lines=[b'{"a": 1}', b"[" * 100_000], trailing_newline=True)
@example(lines=[b'{"a": ' + b"9" * 5000 + b"}"], trailing_newline=False)
def test_read_records_names_the_file_and_line_of_any_bad_bytes(tmp, lines, trailing_newline):
    path = tmp / "any.jsonl"
    raw = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    path.write_bytes(raw)
    bad, good = expected_outcome(raw)
    try:
        got = read_records(str(path))
    except DataError as e:
        if bad is None:
            assert not good and str(e) == f"{path}: empty file: no records"
        else:
            data_error(e, path, bad)
        return
    assert bad is None and good, "read_records accepted a bad file"
    assert canon(got) == canon(good)


# ---------------------------------------------------------------- the parsers: arbitrary records


def tm_faults(rec: dict, key: str, required: bool = True) -> set[str]:
    """The fields a text-or-messages value can be faulted under (empty: valid). A reference written from
    the schema, independently of data.text_or_messages."""
    v = rec.get(key)
    if v is None:
        return {key} if required else set()
    if isinstance(v, str):
        return set()
    if not isinstance(v, list) or not v:
        return {key}
    for j, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return {f"{key}[{j}]"}
        if not isinstance(m.get("content"), str):
            return {f"{key}[{j}].content"}
    return set()


def is_number(x) -> bool:
    return type(x) in (int, float) and abs(x) <= sys.float_info.max  # finite, and a float can hold it


def sft_faults(rec: dict) -> set[str]:
    if "messages" in rec:
        faults = tm_faults(rec, "messages")
        msgs = rec["messages"]
        if not faults and (isinstance(msgs, str) or not any(m["role"] == "assistant" for m in msgs)):
            faults = {"messages"}
        return faults
    if "prompt" not in rec and "completion" not in rec:
        return {"prompt"}
    return tm_faults(rec, "prompt") | tm_faults(rec, "completion")


def pair_faults(rec: dict) -> set[str]:
    faults = tm_faults(rec, "chosen") | tm_faults(rec, "rejected")
    faults |= tm_faults(rec, "prompt", required=isinstance(rec.get("chosen"), str))
    if "label" in rec and not (is_number(rec["label"]) and 0 <= rec["label"] <= 1):
        faults.add("label")
    if "margin" in rec and not is_number(rec["margin"]):
        faults.add("margin")
    return faults


def score_faults(rec: dict) -> set[str]:
    return tm_faults(rec, "response") | tm_faults(
        rec, "prompt", required=isinstance(rec.get("response"), str)
    )


def sft_fields(rec: dict, ex) -> bool:
    if "messages" in rec:
        return ex.messages == rec["messages"] and ex.prompt is None and ex.completion is None
    return (ex.prompt, ex.completion, ex.messages) == (rec["prompt"], rec["completion"], None)


def pair_fields(rec: dict, ex) -> bool:
    label, margin = float(rec.get("label", 1.0)), float(rec.get("margin", 0.0))
    return (ex.prompt, ex.chosen, ex.rejected, ex.label, ex.margin) == (
        rec.get("prompt"),
        rec["chosen"],
        rec["rejected"],
        label,
        margin,
    )


def score_fields(rec: dict, pr) -> bool:
    return pr == (rec.get("prompt"), rec["response"])


PARSERS = {
    "sft": (parse_sft, sft_faults, sft_fields),
    "pairs": (parse_pairs, pair_faults, pair_fields),
    "score": (parse_scoring, score_faults, score_fields),
}


def check_parse(tmp: Path, schema: str, records: list[dict], blanks: list[str]) -> None:
    """The records read back as written; the parser returns them all, field for field, or raises one
    DataError naming the file, the line of the first bad record and a field that is wrong there."""
    parse, faults_of, fields_of = PARSERS[schema]
    path = tmp / f"{schema}.jsonl"
    raw, numbers = jsonl_bytes(records, blanks)
    path.write_bytes(raw)
    read = read_records(str(path))
    assert [n for n, _ in read] == numbers and canon([r for _, r in read]) == canon(records)
    first_bad = next(((n, f) for n, rec in zip(numbers, records, strict=True) if (f := faults_of(rec))), None)
    try:
        parsed = parse(read, str(path))
    except DataError as e:
        assert first_bad is not None, f"rejected a valid file: {e}"
        data_error(e, path, first_bad[0], first_bad[1])
        return
    assert first_bad is None, f"accepted line {first_bad[0]}, whose {first_bad[1]} is wrong"
    assert len(parsed) == len(records)
    assert all(fields_of(rec, ex) for rec, ex in zip(records, parsed, strict=True))


@fuzz(250)
@given(data=st.data(), schema=st.sampled_from(list(PARSERS)), blanks=st.lists(BLANK, max_size=2))
def test_parsers_accept_valid_records_and_name_the_line_and_field_of_the_first_bad_one(
    tmp, data, schema, blanks
):
    records = data.draw(st.lists(GOOD[schema] | near(schema) | RECORD, min_size=1, max_size=5))
    check_parse(tmp, schema, records, blanks)


@fuzz(150)
@given(
    numbers=st.fixed_dictionaries({}, optional={"label": NUMBER, "margin": NUMBER}), implicit=st.booleans()
)
def test_a_pairs_label_and_margin_are_numbers_in_range_or_named(tmp, numbers, implicit):
    rec = (
        {"chosen": [{"role": "assistant", "content": "c"}], "rejected": "r"}
        if implicit
        else GOOD_EXAMPLE["pairs"]
    )
    check_parse(tmp, "pairs", [GOOD_EXAMPLE["pairs"], {**rec, **numbers}], [])


@pytest.mark.parametrize(
    ("schema", "record"),
    [
        ("pairs", {"prompt": "p", "chosen": "c", "rejected": "r", "margin": 10**400}),  # no float holds it
        *[("pairs", {**GOOD_EXAMPLE["pairs"], "label": x}) for x in (None, 1.5, -0.1, True, "1", math.nan)],
        *[
            ("pairs", {**GOOD_EXAMPLE["pairs"], "margin": x})
            for x in (math.inf, -math.inf, math.nan, False, [1])
        ],
        ("pairs", {**GOOD_EXAMPLE["pairs"], "label": 0, "margin": -(2**1023)}),  # a good one
        ("pairs", {"chosen": [{"role": "user", "content": 1}], "rejected": "r"}),
        ("pairs", {"chosen": [{"role": "assistant", "content": "a"}], "rejected": "r"}),  # prompt implicit
        ("sft", {"messages": [{"role": "user", "content": "hi"}]}),  # nothing to learn from
        ("sft", {"messages": "hi"}),
        ("sft", {"completion": "no prompt"}),
        ("score", {"response": [{"content": "no role"}]}),
        ("score", {"prompt": None, "response": "r"}),
    ],
)
def test_parser_edge_cases(tmp, schema, record):
    check_parse(tmp, schema, [GOOD_EXAMPLE[schema], record], [])


# ---------------------------------------------------------------- round trips and atomic writes


@fuzz(60)
@pytest.mark.parametrize("schema", GOOD)
@given(data=st.data(), blanks=st.lists(BLANK, max_size=2), ensure_ascii=st.booleans())
def test_valid_records_written_with_json_dumps_read_back_equal(tmp, schema, data, blanks, ensure_ascii):
    records = data.draw(st.lists(GOOD[schema], min_size=1, max_size=4))
    records = [{**r, "extra": data.draw(VALUES)} for r in records]  # unknown fields ride along
    parse, _, fields_of = PARSERS[schema]
    path = tmp / f"good-{schema}.jsonl"
    raw, numbers = jsonl_bytes(records, blanks, ensure_ascii)
    path.write_bytes(raw)
    read = read_records(str(path))
    assert [n for n, _ in read] == numbers and canon([r for _, r in read]) == canon(records)
    parsed = parse(read, str(path))
    assert all(fields_of(rec, ex) for rec, ex in zip(records, parsed, strict=True))


@fuzz(100)
@given(records=st.lists(st.dictionaries(TEXT, VALUES, max_size=4), min_size=1, max_size=5))
@example(records=[{"prompt": "\ud800 lone", "\udfff": ["\u2028"]}])
def test_write_jsonl_round_trips_and_a_failed_write_leaves_the_old_file(tmp, records):
    folder = tmp / "out"
    path = folder / "records.jsonl"
    write_jsonl(path, records)
    assert canon(read_records(str(path))) == canon(list(enumerate(records, 1)))
    before = path.read_bytes()
    with pytest.raises(TypeError):  # not JSON: fails before anything replaces the file
        write_jsonl(path, [*records, {"bad": {1, 2}}])
    assert path.read_bytes() == before and [p.name for p in folder.iterdir()] == [path.name]


# ---------------------------------------------------------------- config coercion: key=value overrides

# (config class, overrides that make it valid); every one loads without touching a model
JOB_CONFIGS = {
    "sft": (SFTConfig, ["data=train.jsonl"]),
    "rm train": (RMConfig, ["data=pairs.jsonl"]),
    "serve": (ServeConfig, []),
    "rm combine": (CombineConfig, ["output_dir=out", "helpful=h", "harmless=g"]),
}


def own_keys(cls: type) -> dict[str, typing.Any]:
    """A config's keys at its level with their types, inline sections' keys lifted (their own walk)."""
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("inline"):
            out.update(own_keys(hints[f.name]))
        else:
            out[f.name] = hints[f.name]
    return out


def all_keys(cls: type, prefix: str = "") -> dict[str, typing.Any]:
    """Every dotted key (sections too) with its type."""
    out = {}
    for k, tp in own_keys(cls).items():
        out[prefix + k] = tp
        if dataclasses.is_dataclass(tp):
            out.update(all_keys(tp, f"{prefix}{k}."))
    return out


def locate(cls: type, key: str) -> tuple[str, typing.Any]:
    """(the dotted key up to where it goes wrong or ends, the type there or None where it is unknown)."""
    parts, cur = key.split("."), cls
    for i, p in enumerate(parts):
        tp = own_keys(cur).get(p)
        if tp is None or not dataclasses.is_dataclass(tp) or i == len(parts) - 1:
            return ".".join(parts[: i + 1]), tp
        cur = tp
    raise AssertionError("unreachable")


def names_key(msg: str, cls: type, item: str) -> bool:
    """Whether a ConfigError message names the key of this override (where it goes wrong)."""
    if "=" not in item:
        return f"override '{item}' is not key=value" in msg
    key = item.split("=", 1)[0].strip()
    if "" in key.split("."):  # "train..lr", ".lr", "": refused as typed
        return f"key '{key}' has an empty part" in msg
    if key and (msg.startswith(f"{key}: ") or f"'{key}'" in msg):  # "a.b: 'a' is not a section"
        return True
    where, tp = locate(cls, key)
    if tp is None:
        return f"unknown key '{where}'" in msg
    if where in msg:
        return True
    # a value the config's own check refuses (__post_init__): "train.: lr must be > 0", "ServeConfig: port..."
    section, _, leaf = where.rpartition(".")
    return section.split(".")[0] in msg and re.search(rf"(?<![\w.]){re.escape(leaf)}(?!\w)", msg) is not None


def conforms(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp in (int, float):
        return type(value) is tp
    return isinstance(value, tp)


def get_key(cfg, key: str):
    """The value a dotted key sets, inline sections searched."""
    for p in key.split("."):
        while p not in {f.name for f in dataclasses.fields(cfg)}:  # a key of an inline section
            cfg = next(getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("inline"))
        cfg = getattr(cfg, p)
    return cfg


def known_misnamed(items: list[str]) -> bool:
    """train.run=...: the inline section set by its field name, which no key is ('train.: expected...')."""
    return any("run" in item.partition("=")[0].strip().split(".") for item in items)


YAML_SPECIAL = st.sampled_from(
    [*":[]{},#&*|>'\"%@`-? .=~\\/", "null", "true", "no", "1e5", "0x1f", "0700", "1:30", "2024-01-01"]
    + [
        "2024-13-01",
        "!!int ",
        "!!bool ",
        "!!float ",
        "!!timestamp ",
        "!!binary ",
        "!!set ",
        "!x ",
        "9" * 4400,
    ]
)
OVERRIDE_TEXT = st.one_of(
    TEXT,
    st.lists(YAML_SPECIAL | st.sampled_from("ab1") | TEXT, max_size=6).map("".join),
    st.integers(-(10**30), 10**30).map(str),
    st.floats().map(repr),
    st.sampled_from(
        ["true", "False", "yes", "OFF", "null", "~", "None", "", "a,b", "[1, x]", "[]", "&a [*a]", "[" * 300]
    ),
)


@st.composite
def overrides(draw, cls: type) -> list[str]:
    keys = list(all_keys(cls))
    key = draw(
        st.sampled_from(keys)
        | st.builds(
            lambda k, w: f"{k}.{w}", st.sampled_from(keys), st.from_regex(r"[a-z_]{1,8}", fullmatch=True)
        )
        | st.from_regex(r"[a-z_]{1,10}", fullmatch=True)
        | st.sampled_from(["train.run", "train.run.seed", "train..lr", ".lr", "lr."])
        | TEXT.filter(lambda t: "=" not in t and not t.startswith("-"))
    )
    pad = draw(st.sampled_from(["", " "]))
    if draw(st.integers(0, 9)) == 0:
        return [key]  # not key=value at all
    return [f"{key}{pad}={draw(OVERRIDE_TEXT)}"]


def check_overrides(tmp: Path, cls: type, base: list[str], items: list[str]) -> None:
    """`load` returns a config whose keys hold values of their types, which saves and loads back the same;
    or it raises one ConfigError naming the key of one of the overrides."""
    try:
        cfg = load(cls, None, [*base, *items])
    except ConfigError as e:
        assert any(names_key(str(e), cls, item) for item in items) or known_misnamed(items), (str(e), items)
        return
    if known_misnamed(items):  # "train.run=" loads, though train.run is no key
        return
    for item in items:
        key = item.split("=", 1)[0].strip()
        tp = all_keys(cls)[key]  # a config loaded, so every key is known
        assert conforms(get_key(cfg, key), tp), (key, get_key(cfg, key), tp)
    save(cfg, tmp / "job_config.yaml")
    assert repr(load(cls, tmp / "job_config.yaml")) == repr(cfg)


@fuzz(250)
@given(data=st.data(), job=st.sampled_from(list(JOB_CONFIGS)))
def test_any_override_loads_or_raises_one_config_error_naming_its_key(tmp, data, job):
    cls, base = JOB_CONFIGS[job]
    items = data.draw(st.lists(overrides(cls), min_size=1, max_size=3).map(lambda xs: sum(xs, [])))
    check_overrides(tmp, cls, base, items)


@pytest.mark.parametrize(
    "items",
    [
        ["max_length.deep=1"],
        ["train=5", "train.lr=1"],
        ["train.lr=1", "train=5"],
        ["lora=a: b"],
        ["lora.target_modules=[1, {a: b}]"],
        ["model=&a [*a]"],
        ["eval_data=[x]"],
        ["train.seed=1e3"],
        ["train.batch_size=6", "train.grad_accum=4"],
        ["model=\udcff"],  # a command-line byte that is not UTF-8 (surrogateescape)
        ["model=a\x00b"],
    ],
)
def test_override_edge_cases(tmp, items):
    check_overrides(tmp, SFTConfig, ["data=train.jsonl"], items)


def typed_text(tp) -> st.SearchStrategy[tuple[str, typing.Any]]:
    """(override text, the value it must load as) for a field's type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return st.sampled_from(args).map(lambda v: (str(v), v))
    if origin is list and args[0] is str:
        words = st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True), min_size=1, max_size=3)
        return words.map(lambda ws: (",".join(ws), ws))
    if origin is list and args[0] is float:
        xs = st.lists(st.floats(allow_nan=False), min_size=1, max_size=3)
        return xs.map(lambda vs: ("[" + ", ".join(map(repr, vs)) + "]", vs))
    if origin is not None:  # X | None
        return typed_text(next(a for a in args if a is not type(None))) | st.sampled_from(
            ["null", "~", "None", "none"]
        ).map(lambda t: (t, None))
    if tp is bool:
        words = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}
        return st.sampled_from(
            [
                (f(w), v)
                for w, v in words.items()
                for f in (str, str.title, str.upper, lambda w: w[0] + w[1:].upper())
            ]
        )
    if tp is int:
        return st.integers(-(10**30), 10**30).map(lambda n: (str(n), n))
    if tp is float:
        return st.floats(allow_nan=False).map(lambda x: (repr(x), x)) | st.integers(-99, 99).map(
            lambda n: (f"{n}e-3", n / 1000)
        )
    plain = st.from_regex(r"[a-z][a-z0-9_/]{0,10}", fullmatch=True).filter(lambda s: yaml.safe_load(s) == s)
    with_colon = st.from_regex(r"[a-z]{1,5}: [a-z]{1,5}", fullmatch=True)  # a string, not a mapping
    return (plain | with_colon).map(lambda s: (s, s))


@fuzz(300)
@given(data=st.data(), job=st.sampled_from(list(JOB_CONFIGS)))
def test_a_value_of_the_fields_type_loads_as_that_value(data, job):
    cls, base = JOB_CONFIGS[job]
    fields = {k: tp for k, tp in all_keys(cls).items() if not dataclasses.is_dataclass(tp)}
    key = data.draw(st.sampled_from(sorted(fields)))
    text, value = data.draw(typed_text(fields[key]))
    try:
        cfg = load(cls, None, [*base, f"{key}={text}"])
    except ConfigError as e:  # a value the config's own check refuses (lr=-1, port=70000)
        assert names_key(str(e), cls, f"{key}={text}") and "expected" not in str(e), (str(e), key, text)
        return
    got = get_key(cfg, key)
    assert canon(got) == canon(value) and conforms(got, fields[key]), (key, text, got)


WORD = st.from_regex(r"[a-z]{1,8}", fullmatch=True).filter(lambda w: isinstance(yaml.safe_load(w), str))


def wrong_text(tp) -> st.SearchStrategy[str]:
    """Override text that no value of the field's type is spelled as."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return WORD.filter(lambda w: w not in args)
    if origin is list:
        return st.just("[[1], [2]]") | st.sampled_from(["a,b", "[x]"] if args[0] is float else ["[[x]]"])
    if origin is not None:  # X | None
        return wrong_text(next(a for a in args if a is not type(None))).filter(
            lambda t: t.lower() not in ("null", "none", "~")
        )
    nonint = st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x)).map(repr)
    return {
        bool: WORD.filter(lambda w: w not in ("true", "false", "yes", "no", "on", "off"))
        | st.sampled_from(["2", "0.5"]),
        int: WORD | nonint | st.sampled_from(["true", "[1]", "1e3"]),
        float: WORD.filter(lambda w: w.lower() not in ("inf", "nan", "infinity"))
        | st.sampled_from(["true", "[1]"]),
        str: st.sampled_from(["true", "no", "null", "[a]", "[1, 2]", "~"]),
    }[tp]


@fuzz(200)
@given(data=st.data(), job=st.sampled_from(list(JOB_CONFIGS)))
def test_a_value_not_of_the_fields_type_is_refused_naming_the_key(data, job):
    cls, base = JOB_CONFIGS[job]
    fields = {k: tp for k, tp in all_keys(cls).items() if not dataclasses.is_dataclass(tp)}
    key = data.draw(st.sampled_from(sorted(fields)))
    text = data.draw(wrong_text(fields[key]))
    with pytest.raises(ConfigError) as e:
        load(cls, None, [*base, f"{key}={text}"])
    msg = str(e.value)
    assert re.match(rf"{re.escape(key)}(\[\d+\])?: ", msg) and (
        "expected" in msg or "is not one of" in msg
    ), msg


# ---------------------------------------------------------------- config files


def yaml_value(text: str):
    """What YAML makes of a text (the text itself where it is no YAML, or PyYAML fails on it)."""
    try:
        return yaml.safe_load(text)
    except Exception:
        return text


YAML_VALUE = OVERRIDE_TEXT.map(yaml_value) | VALUES


def yaml_tree(cls: type) -> st.SearchStrategy[dict]:
    """A mapping of some of a config's keys (sections nested) and some unknown ones, to any YAML values."""
    keys = {
        k: yaml_tree(tp) | YAML_VALUE if dataclasses.is_dataclass(tp) else YAML_VALUE
        for k, tp in own_keys(cls).items()
    }
    known = st.fixed_dictionaries({}, optional=keys)
    return st.builds(lambda a, b: {**b, **a}, known, st.dictionaries(TEXT, YAML_VALUE, max_size=1))


KEY_LINES = ["max_length", "model", "eval_data", "train:\n  lr", "train:\n  seed", "lora:\n  target_modules"]
YAML_DOC = st.one_of(
    TEXT,
    st.lists(
        YAML_SPECIAL | TEXT | st.sampled_from(["\n", "\n  ", "train:", "lora:", "max_length:"]), max_size=8
    ).map("".join),
    yaml_tree(SFTConfig).map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.lists(st.tuples(st.sampled_from(KEY_LINES), OVERRIDE_TEXT), min_size=1, max_size=3).map(
        lambda kvs: "".join(f"{k}: {v}\n" for k, v in kvs)  # values as typed, unquoted
    ),
)


@fuzz(200)
@given(doc=YAML_DOC)
@example(doc="train:\n  lr: fast\n")
@example(doc="- a\n- b\n")
@example(doc="a: [b\n")
def test_any_config_file_loads_or_raises_one_config_error_naming_the_file_or_key(tmp, doc):
    path = tmp / "job.yaml"
    path.write_bytes(doc.encode("utf-8", "surrogatepass"))  # a surrogate: not UTF-8
    try:
        cfg = load(SFTConfig, path, ["data=train.jsonl"])
    except Exception as e:
        if not isinstance(e, ConfigError) and "run" in doc:  # train.run set as a value: see known_misnamed
            return
        assert isinstance(e, ConfigError), f"{type(e).__name__}: {e}"
        msg = str(e)
        # known, in config.py: PyYAML's error text spans lines; an unknown key is quoted, not repr'd
        assert "\n" not in msg or msg.startswith((f"{path}: not valid YAML", "unknown key '")), msg
        if str(path) not in msg:  # a value or key of the file: named by its key
            tree = yaml.safe_load(path.read_text(encoding="utf-8"))
            assert any(str(k) and str(k) in msg for k in tree) or "unknown key ''" in msg, (msg, tree)
        return
    assert isinstance(cfg, SFTConfig) and cfg.data == "train.jsonl"


# ---------------------------------------------------------------- the command line

BAD_OVERRIDES = st.one_of(
    st.from_regex(r"[a-z_]{1,10}", fullmatch=True)
    .filter(lambda k: k not in all_keys(SFTConfig))
    .map(lambda k: f"{k}=1"),
    st.sampled_from(["max_length", "train.batch_size", "train.seed", "lora.r"]).flatmap(
        lambda k: st.from_regex(r"[a-z]{1,6}", fullmatch=True).map(lambda v: f"{k}={v}")  # not an integer
    ),
    st.sampled_from(["train.precision", "train.lr_scheduler", "train.tracker"]).map(lambda k: f"{k}=fp16"),
    st.sampled_from(["train.lr=0", "lora.r=0", "train.grad_accum=3", "train=5", "lora=[1]"]),
)


@fuzz(25)
@given(bad=BAD_OVERRIDES, job=st.sampled_from(["sft", "rm train", "serve"]))
def test_a_bad_override_on_the_command_line_exits_2_with_one_line_and_writes_nothing(tmp, bad, job):
    out = tmp / "never"
    argv = [*JOB_CONFIGS[job][1], bad]
    if job != "serve":
        argv.append(f"output_dir={out}")
    cls = JOB_CONFIGS[job][0]
    with pytest.raises(ConfigError):  # resolving runs nothing: it must fail before the job would start
        cli.resolve(cli.JOBS[job], argv)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main([*job.split(), *argv])
    lines = err.getvalue().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"alignkit {job}: error: "), lines
    assert names_key(lines[0], cls, bad), lines
    assert not out.exists()


# ---------------------------------------------------------------- odd values (bugs fixed in config.py)

ODD_VALUES = {  # each once raised something other than ConfigError
    "bad-date": (["output_dir=2024-13-01"], "2024-13-01"),  # YAML timestamp → ValueError: month 13
    "int-tag": (["max_length=!!int x"], None),  # ValueError from PyYAML's constructor
    "bool-tag": (["model=!!bool x"], "!!bool x"),  # KeyError
    "timestamp-tag": (["model=!!timestamp x"], "!!timestamp x"),  # AttributeError
    "huge-int": (["max_length=" + "9" * 5000], None),  # ValueError: Exceeds the limit (4300 digits)
    "deep-list": (["model=" + "[" * 1000], "[" * 1000),  # RecursionError
    "inline-section-set": (["train.run=5", "train.seed=1"], None),  # TypeError: 'int' object is not a mapping
    "empty-key-part": (["train..lr=1"], None),  # once named 'train.', not the key as typed
}


@pytest.mark.parametrize("case", ODD_VALUES)
def test_odd_values_load_as_their_text_or_raise_one_config_error_naming_the_key(case):
    items, text = ODD_VALUES[case]
    key = items[0].split("=")[0]
    try:
        cfg = load(SFTConfig, None, ["data=train.jsonl", *items])
    except ConfigError as e:
        assert text is None and (key in str(e) or key.split(".")[-1] in str(e)), str(e)
    else:  # a string field keeps what was typed, verbatim
        assert text is not None and getattr(cfg, key) == text


def test_a_config_folder_raises_config_error_naming_it(tmp):
    try:
        load(SFTConfig, tmp, ["data=train.jsonl"])
    except ConfigError as e:
        assert str(tmp) in str(e)
    except Exception as e:
        raise AssertionError(f"{type(e).__name__}: {e}") from None


def test_a_bad_tag_in_a_config_file_raises_config_error(tmp):
    (tmp / "tag.yaml").write_text("max_length: !!int x\n")
    try:
        load(SFTConfig, tmp / "tag.yaml", ["data=train.jsonl"])
    except ConfigError as e:
        assert "max_length" in str(e) or str(tmp / "tag.yaml") in str(e)
    except Exception as e:
        raise AssertionError(f"{type(e).__name__}: {e}") from None
