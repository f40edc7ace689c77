"""The constitution: principles in a priority order (safety > ethics > guidelines > helpfulness), read from
YAML and checked before any model loads; errors name the file, line, principle and field. The default,
cai/constitution.yaml, is alignkit's own text; its `rules:` section also works as the guard's `rules_file`."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..data import DataError, read_yaml

TIERS = ("safety", "ethics", "guidelines", "helpfulness")  # highest priority first
TIER_WEIGHTS = (4.0, 2.0, 1.0, 2.0)
"""Default weights of the tiers when a principle is drawn: red-team answers mostly need the safety tier."""
DEFAULT = Path(__file__).with_name("constitution.yaml")
TEXTS = ("critique", "revision", "comparison")
EXAMPLE_FIELDS = ("prompt", "response", "critique", "revision")


@dataclass(frozen=True)
class Principle:
    id: str
    tier: str
    critique: str
    revision: str
    comparison: str
    hard: bool = False
    examples: tuple[dict[str, str], ...] = ()


@dataclass(frozen=True)
class Constitution:
    principles: tuple[Principle, ...]
    rules: tuple[str, ...]
    source: str

    def tier(self, tier: str) -> list[Principle]:
        return [p for p in self.principles if p.tier == tier]

    def sample(self, rng: random.Random, weights: dict[str, float], tier: str | None = None) -> Principle:
        """A tier drawn with P ∝ weights over the tiers present (or `tier`), then a principle in it."""
        if tier is None:
            tiers = [t for t in TIERS if self.tier(t) and weights.get(t, 0) > 0]
            tier = rng.choices(tiers, [weights[t] for t in tiers])[0]
        return rng.choice(self.tier(tier))


def check_weights(weights: list[float]) -> None:
    if len(weights) != len(TIERS) or min(weights) < 0 or not any(weights):
        raise ValueError(f"tier_weights: {len(TIERS)} non-negative weights, not all 0 ({', '.join(TIERS)})")


def _lines(text: str) -> dict[tuple, int]:
    """Line (1-based) of each principle and of each of its keys: {(i,): line, (i, key): line}."""
    out: dict[tuple, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return out
    for key, value in getattr(root, "value", []) if isinstance(root, yaml.MappingNode) else []:
        if key.value == "principles" and isinstance(value, yaml.SequenceNode):
            for i, item in enumerate(value.value):
                out[(i,)] = item.start_mark.line + 1
                for k, _ in item.value if isinstance(item, yaml.MappingNode) else []:
                    out[(i, k.value)] = k.start_mark.line + 1
    return out


def load_constitution(spec: str = "default") -> Constitution:
    """The constitution at `spec` (a YAML path, or 'default'); DataError for any invalid part."""
    path = DEFAULT if spec == "default" else Path(spec)
    doc = read_yaml(path)
    lines, src = _lines(path.read_text(encoding="utf-8")), str(path)
    if unknown := set(doc) - {"version", "rules", "principles"}:
        raise DataError(src, None, sorted(unknown)[0], "unknown key (keys: version, rules, principles)")
    rules = doc.get("rules") or []
    if not (isinstance(rules, list) and all(isinstance(r, str) and r.strip() for r in rules)):
        raise DataError(src, None, "rules", "expected a list of non-empty strings")
    items = doc.get("principles")
    if not isinstance(items, list) or not items:
        raise DataError(src, None, "principles", "expected a non-empty list of principles")
    out, seen = [], set()
    for i, item in enumerate(items):
        name = item.get("id") if isinstance(item, dict) else None
        label = f"principles[{i}]" + (f" ({name})" if isinstance(name, str) and name else "")

        def bad(fld: str | None, msg: str, i=i, label=label):
            line = lines.get((i, fld), lines.get((i,)))
            return DataError(src, line, f"{label}.{fld}" if fld else label, msg)

        if not isinstance(item, dict):
            raise bad(None, "expected a mapping with id, tier, critique, revision, comparison")
        if extra := set(item) - {"id", "tier", "hard", "examples", *TEXTS}:
            fields = "id, tier, critique, revision, comparison, hard, examples"
            raise bad(sorted(extra)[0], f"unknown field (fields: {fields})")
        for fld in ("id", "tier", *TEXTS):
            if not isinstance(item.get(fld), str) or not item[fld].strip():
                raise bad(fld, "missing or empty (a non-empty string is required)")
        if name in seen:
            raise bad("id", f"duplicate id {name!r}")
        if item["tier"] not in TIERS:
            raise bad("tier", f"{item['tier']!r} is not a tier ({', '.join(TIERS)})")
        if not isinstance(item.get("hard", False), bool):
            raise bad("hard", "must be true or false")
        examples = item.get("examples") or []
        if not isinstance(examples, list):
            raise bad("examples", "expected a list of {prompt, response, critique, revision}")
        for j, ex in enumerate(examples):
            if not isinstance(ex, dict) or set(ex) != set(EXAMPLE_FIELDS):
                raise bad("examples", f"example {j}: needs exactly the fields {', '.join(EXAMPLE_FIELDS)}")
            if not all(isinstance(ex[k], str) and ex[k].strip() for k in EXAMPLE_FIELDS):
                raise bad("examples", f"example {j}: every field must be a non-empty string")
        seen.add(name)
        kw = {k: " ".join(item[k].split()) for k in TEXTS} | {"hard": item.get("hard", False)}
        out.append(Principle(name, item["tier"], **kw, examples=tuple(examples)))
    return Constitution(tuple(out), tuple(rules), src)
