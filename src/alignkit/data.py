"""Records: `DataError`, JSONL readers and atomic writers, TRL's schemas validated line by line, and chat
templating; plain Python, no torch. Schemas (values: strings or message lists): sft {prompt, completion} or
{messages}; pairs {prompt, chosen, rejected, label?} (label: P(chosen wins)); score {prompt, response}."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Messages = list[dict[str, str]]


class DataError(ValueError):
    """Bad input data. The message names the file, the line (1-based) and the field."""

    def __init__(self, source: str, line: int | None, fld: str | None, msg: str):
        where = str(source) + (f", line {line}" if line else "") + (f", field '{fld}'" if fld else "")
        super().__init__(f"{where}: {msg}")


def read_records(source: str, split: str = "train") -> list[tuple[int, dict]]:
    """(line number, record) pairs from a JSONL file, a `save_to_disk` folder or an HF dataset name."""
    path = Path(source)
    if path.is_file():
        return list(_read_jsonl(path))
    is_dataset = any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json"))
    if path.suffix in (".jsonl", ".json") or (path.is_dir() and not is_dataset):
        raise DataError(source, None, None, "file not found")
    # datasets (with pyarrow) takes seconds to import and JSONL needs neither: imported for this case only
    import datasets

    try:
        ds = datasets.load_from_disk(source) if path.is_dir() else datasets.load_dataset(source, split=split)
    except Exception as e:  # the hub is unreachable offline: say so plainly
        raise DataError(source, None, None, f"not a file and not a loadable dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split]
    return [(i + 1, dict(r)) for i, r in enumerate(ds)]


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(str(path), line, None, f"not UTF-8 (byte {raw[e.start]:#04x})") from None
    n = 0
    # JSON Lines ends lines at \n only: str.splitlines would also split at U+2028 and friends inside strings
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError; or a 4300+ digit number, or deep nesting
            at = f"{e.msg}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else e
            raise DataError(str(path), i, None, f"malformed JSON ({at})") from None
        if not isinstance(rec, dict):
            raise DataError(str(path), i, None, "each line must be a JSON object")
        n += 1
        yield i, rec
    if n == 0:
        raise DataError(str(path), None, None, "empty file: no records")


def read_yaml(path: str | Path) -> dict:
    """A YAML file whose top level is a mapping; DataError naming the file (and line) otherwise."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(str(path), None, None, "no such file") from None
    except UnicodeDecodeError:
        raise DataError(str(path), None, None, "not UTF-8") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise DataError(str(path), None if line is None else line + 1, None, f"not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise DataError(str(path), None, None, "expected a mapping at the top level")
    return doc


def write_atomic(path: str | Path, content: str | bytes) -> None:
    """Write text (UTF-8) or bytes via a temp file in the same folder, os.replace'd: no reader sees half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode("utf-8", "backslashreplace") if isinstance(content, str) else content)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def text_or_messages(rec: dict, key: str, src: str, line: int | None, required: bool = True):
    """A record's field as a string or a validated message list; DataError naming the field if not."""
    if key not in rec or rec[key] is None:
        if required:
            raise DataError(src, line, key, "missing")
        return None
    v = rec[key]
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v:
        for j, m in enumerate(v):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
                raise DataError(src, line, f"{key}[{j}]", "each message needs a string 'role'")
            if not isinstance(m.get("content"), str):
                raise DataError(src, line, f"{key}[{j}].content", "must be a string")
        return v
    raise DataError(src, line, key, f"must be a string or a list of messages, got {type(v).__name__}")


@dataclass
class SFTExample:
    prompt: str | Messages | None
    completion: str | Messages | None
    messages: Messages | None = None


@dataclass
class PairExample:
    prompt: str | Messages | None
    chosen: str | Messages
    rejected: str | Messages
    label: float = 1.0
    margin: float = 0.0


def parse_sft(records: list[tuple[int, dict]], src: str) -> list[SFTExample]:
    out = []
    for line, rec in records:
        if "messages" in rec:
            msgs = text_or_messages(rec, "messages", src, line)
            if isinstance(msgs, str):
                raise DataError(src, line, "messages", "must be a list of messages")
            if not any(m["role"] == "assistant" for m in msgs):
                raise DataError(src, line, "messages", "has no assistant message to learn from")
            out.append(SFTExample(None, None, msgs))
        else:
            if "prompt" not in rec and "completion" not in rec:
                raise DataError(src, line, "prompt", "missing (need {prompt, completion} or {messages})")
            p, c = (text_or_messages(rec, k, src, line) for k in ("prompt", "completion"))
            out.append(SFTExample(p, c))
    return out


def parse_pairs(records: list[tuple[int, dict]], src: str) -> list[PairExample]:
    out = []
    for line, rec in records:
        chosen, rejected = (text_or_messages(rec, k, src, line) for k in ("chosen", "rejected"))
        # the prompt may be implicit in conversational chosen/rejected (TRL's convention)
        prompt = text_or_messages(rec, "prompt", src, line, required=isinstance(chosen, str))
        label = rec.get("label", 1.0)
        if isinstance(label, bool) or not isinstance(label, (int, float)) or not 0 <= label <= 1:
            raise DataError(src, line, "label", f"must be a number in [0, 1], got {label!r}")
        margin = rec.get("margin", 0.0)
        if type(margin) not in (int, float) or not abs(margin) <= sys.float_info.max:  # a float holds it
            raise DataError(src, line, "margin", f"must be a number, got {margin!r}")
        out.append(PairExample(prompt, chosen, rejected, float(label), float(margin)))
    return out


def parse_scoring(records: list[tuple[int, dict]], src: str) -> list[tuple[Any, Any]]:
    out = []
    for line, rec in records:
        response = text_or_messages(rec, "response", src, line)
        prompt = text_or_messages(rec, "prompt", src, line, required=isinstance(response, str))
        out.append((prompt, response))
    return out


def as_messages(x: str | Messages, role: str = "user", system: str | None = None) -> Messages:
    """A string as one message of `role`, or a copy of a message list; `system` first unless there is one."""
    msgs = [{"role": role, "content": x}] if isinstance(x, str) else list(x)
    if system and not (msgs and msgs[0]["role"] == "system"):
        msgs = [{"role": "system", "content": system}, *msgs]
    return msgs


def last_user(prompt: str | Messages) -> str:
    """The text a detector reads from a prompt: the string, or the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), prompt[-1]["content"])


def template_ids(tok, msgs: Messages, add_generation_prompt: bool = False) -> list[int]:
    out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def conversation(prompt, response) -> Messages:
    """A (prompt, response) pair as one message list; the prompt may be missing (implicit)."""
    head = [] if prompt is None else as_messages(prompt, "user")
    return head + as_messages(response, "assistant")


def tokenize_supervised(tok, msgs: Messages) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation, and a mask True on assistant tokens (found by templating prefixes)."""
    ids = template_ids(tok, msgs)
    mask = [False] * len(ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(template_ids(tok, msgs[:i], add_generation_prompt=True)) if i else 0
        end = len(template_ids(tok, msgs[: i + 1]))
        for t in range(start, min(end, len(ids))):
            mask[t] = True
    return ids, mask


@dataclass
class TruncationReport:
    """Counts, never silence: how many examples were cut to max_length, and how many lost all targets."""

    total: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0

    def as_metrics(self, prefix: str) -> dict[str, float]:
        counts = {"examples": self.total, "truncated": self.truncated, "dropped": self.dropped}
        return {f"{prefix}/{k}": v for k, v in counts.items()}


def encode_sft(examples: list[SFTExample], tok, max_length: int, src: str):
    """→ (list of {input_ids, labels}, report). labels = -100 outside completion tokens."""
    rows, rep = [], TruncationReport(total=len(examples))
    for ex in examples:
        msgs = ex.messages or conversation(ex.prompt, ex.completion)
        ids, mask = tokenize_supervised(tok, msgs)
        if len(ids) > max_length:
            rep.truncated += 1
            ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask[1:]):  # a label at position 0 is never predicted
            rep.dropped += 1
            continue
        rows.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask, strict=False)]})
        rep.tokens += len(ids)
    if not rows:
        raise DataError(src, None, None, f"every example was truncated away at max_length={max_length}")
    return rows, rep


def encode_pairs(examples: list[PairExample], tok, max_length: int, src: str):
    """→ (list of {chosen_ids, rejected_ids, label, margin}, report)."""
    rows, rep = [], TruncationReport(total=len(examples))
    for ex in examples:
        c, r = (template_ids(tok, conversation(ex.prompt, x)) for x in (ex.chosen, ex.rejected))
        if len(c) > max_length or len(r) > max_length:
            rep.truncated += 1
            c, r = c[:max_length], r[:max_length]
        if c == r:  # truncation erased the difference: nothing left to compare
            rep.dropped += 1
            continue
        rows.append({"chosen_ids": c, "rejected_ids": r, "label": ex.label, "margin": ex.margin})
        rep.tokens += len(c) + len(r)
    if not rows:
        raise DataError(src, None, None, f"every pair was truncated away at max_length={max_length}")
    return rows, rep
