"""Inference-time guardrails: ordered input/output checks, and rules injected into the system prompt. Each
check returns a `Verdict` scored in [0, 1] (higher = more likely unsafe). A `Pipeline` runs a stage's checks
in order: the first flagged `block` check ends the stage, `flag` records and goes on, `rewrite` changes the
text later checks see. A check that raises blocks if `fail_closed`, else is recorded unflagged and skipped."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from ..data import DataError, read_yaml

Stage = Literal["input", "output"]
Action = Literal["block", "flag", "rewrite"]
STAGES, ACTIONS = ("input", "output"), ("block", "flag", "rewrite")
BLOCKED = (
    "I'm sorry, but I can't help with that. This service's safety checks declined the request, because "
    "answering it could cause harm."
)
"""The default block message: a refusal that people and scanners' refusal markers (garak's) read as one."""

# Built-in pattern groups (category -> regexes), matched case-insensitively. Markers, not a classifier:
# they catch the copy-pasted openers of common jailbreaks and prompt injections, nothing paraphrased.
PATTERN_GROUPS: dict[str, list[str]] = {
    "prompt_injection": [
        r"\b(ignore|disregard|forget) (all |any )?(the |your )?(previous |prior |above )?(instructions|rules)\b",
        r"\breveal (your|the) (system prompt|hidden instructions)\b",
    ],
    "jailbreak": [
        r"\byou are (now )?DAN\b",
        r"\bdo anything now\b",
        r"\bdeveloper mode\b",
        r"\bpretend (that )?you have no (rules|restrictions|limits)\b",
    ],
}


@dataclass(frozen=True)
class Verdict:
    """One check's judgement of one record."""

    name: str
    flagged: bool
    score: float
    category: str | None = None
    reason: str = ""

    def __post_init__(self):
        if not 0.0 <= self.score <= 1.0:  # also rejects NaN
            raise ValueError(f"verdict '{self.name}': score {self.score!r} is outside [0, 1]")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Check(Protocol):
    """What a pipeline runs (input checks get response=None); optional: check_batch, rewrite(text)."""

    name: str
    stage: Stage
    action: Action

    def check(self, prompt: str, response: str | None) -> Verdict: ...


@dataclass
class GuardResult:
    """A stage's outcome for one record: `text` is the (possibly rewritten) text, or the refusal if blocked."""

    stage: Stage
    text: str
    blocked: bool = False
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return any(v.flagged for v in self.verdicts)

    @property
    def score(self) -> float:
        return max((v.score for v in self.verdicts), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "flagged": self.flagged, "score": self.score}


@dataclass
class PatternCheck:
    """Regexes by category (case-insensitive): the first match flags (score 1); `rewrite` redacts all."""

    name: str = "patterns"
    stage: Stage = "input"
    action: Action = "block"
    patterns: dict[str, list[str]] = field(default_factory=lambda: dict(PATTERN_GROUPS))
    replacement: str = "[REDACTED]"

    def __post_init__(self):
        self._rx = {cat: re.compile("|".join(ps), re.I) for cat, ps in self.patterns.items()}

    def check(self, prompt: str, response: str | None) -> Verdict:
        text = prompt if self.stage == "input" else (response or "")
        for cat, rx in self._rx.items():
            if m := rx.search(text):
                return Verdict(self.name, True, 1.0, cat, f"matched {m.group(0)!r}")
        return Verdict(self.name, False, 0.0)

    def rewrite(self, text: str) -> str:
        for rx in self._rx.values():
            text = rx.sub(self.replacement, text)
        return text


@dataclass
class ScoreCheck:
    """`detector(prompts, texts)` → [float | None] (texts: responses; prompts at input); ≥ threshold flags."""

    name: str
    stage: Stage
    action: Action
    detector: Callable[[list[str], list[str]], Sequence[float | None]]
    threshold: float = 0.5
    category: str | None = None

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"{self.name}: threshold {self.threshold} is outside [0, 1]")

    def check(self, prompt: str, response: str | None) -> Verdict:
        return self.check_batch([prompt], [response])[0]

    def check_batch(self, prompts: list[str], responses: list[str | None]) -> list[Verdict]:
        texts = list(prompts) if self.stage == "input" else [r or "" for r in responses]
        scores = list(self.detector(list(prompts), texts))
        if len(scores) != len(prompts):
            raise ValueError(f"{self.name}: detector returned {len(scores)} scores for {len(prompts)} texts")
        return [self._verdict(s) for s in scores]

    def _verdict(self, s: float | None) -> Verdict:
        hit = s is not None and s >= self.threshold
        why = "no score" if s is None else f"{s:.3f} {'>=' if hit else '<'} threshold {self.threshold}"
        return Verdict(self.name, hit, float(s or 0.0), self.category or self.name, why)


@dataclass
class ContextRules:
    """Rules the model is told to follow, rendered into system-prompt text."""

    rules: list[str]
    header: str = "Follow these rules in every reply:"

    def text(self) -> str:
        return "\n".join([self.header, *(f"- {r}" for r in self.rules)])

    @classmethod
    def load(cls, path: str | Path) -> ContextRules:
        """Read a YAML file `{rules: [str, ...]}`; a bad file raises DataError naming it."""
        rules = read_yaml(path).get("rules")
        if not (isinstance(rules, list) and rules and all(isinstance(r, str) and r.strip() for r in rules)):
            raise DataError(str(path), None, "rules", "expected a mapping {rules: [non-empty strings]}")
        return cls(rules)


def inject(messages: list[dict[str, str]], rules: ContextRules) -> list[dict[str, str]]:
    """A copy of `messages` with the rules appended to the first system message, or in a new one first."""
    out = [dict(m) for m in messages]
    for m in out:
        if m.get("role") == "system":
            m["content"] = f"{m['content']}\n\n{rules.text()}" if m.get("content") else rules.text()
            return out
    return [{"role": "system", "content": rules.text()}, *out]


@dataclass
class Pipeline:
    """Runs a stage's checks in order on each record (see the module docstring for the rules)."""

    checks: list[Check]
    context: ContextRules | None = None
    fail_closed: bool = True
    refusal_text: str = BLOCKED

    def __post_init__(self):
        for c in self.checks:
            if c.stage not in STAGES or c.action not in ACTIONS:
                raise ValueError(f"check '{c.name}': bad stage {c.stage!r} or action {c.action!r}")
            if c.action == "rewrite" and not callable(getattr(c, "rewrite", None)):
                raise ValueError(f"check '{c.name}': action 'rewrite' needs a rewrite(text) method")

    def check_input(self, prompt: str) -> GuardResult:
        return self._run("input", [prompt], None, batched=False)[0]

    def check_output(self, prompt: str, response: str) -> GuardResult:
        return self._run("output", [prompt], [response], batched=False)[0]

    def check_many(self, stage: Stage, prompts: list[str], responses: list[str] | None = None):
        """As check_input/check_output per record; `check_batch` gets the records not yet blocked at once."""
        return self._run(stage, prompts, responses, batched=True)

    def _run(self, stage, prompts, responses, batched) -> list[GuardResult]:
        if stage not in STAGES:
            raise ValueError(f"stage must be 'input' or 'output', got {stage!r}")
        if stage == "output" and (responses is None or len(responses) != len(prompts)):
            raise ValueError("the output stage needs one response per prompt")
        results = [GuardResult(stage, t) for t in (prompts if stage == "input" else responses)]
        for c in (c for c in self.checks if c.stage == stage):
            live = [i for i, res in enumerate(results) if not res.blocked]
            if not live:
                break
            # the text under judgement is the stage's current (possibly rewritten) text
            ps = [results[i].text if stage == "input" else prompts[i] for i in live]
            rs = [None if stage == "input" else results[i].text for i in live]
            for i, v in zip(live, self._call(c, ps, rs, batched), strict=True):
                self._settle(c, v, results[i])
        return results

    @staticmethod
    def _call(c: Check, ps: list[str], rs: list, batched: bool) -> list[Verdict | Exception]:
        """Verdicts, with the exception in place of the verdict of a record whose check raised."""
        if batched and hasattr(c, "check_batch"):
            with contextlib.suppress(Exception):  # if it raises: one record at a time, a bad one fails alone
                vs = list(c.check_batch(ps, rs))
                if len(vs) == len(ps) and all(isinstance(v, Verdict) for v in vs):
                    return vs
        out: list[Verdict | Exception] = []
        for p, r in zip(ps, rs, strict=True):
            try:
                out.append(c.check(p, r))
            except Exception as e:
                out.append(e)
        return out

    def _settle(self, c: Check, v: Verdict | Exception, res: GuardResult) -> None:
        if not isinstance(v, (Verdict, Exception)):
            v = TypeError(f"check returned {type(v).__name__}, not a Verdict")
        if isinstance(v, Verdict) and v.flagged and c.action == "rewrite":
            try:
                res.text = c.rewrite(res.text)  # type: ignore[attr-defined]
            except Exception as e:
                v = e
        block = self.fail_closed if isinstance(v, Exception) else v.flagged and c.action == "block"
        if isinstance(v, Exception):
            v = Verdict(c.name, block, float(block), "error", f"{type(v).__name__}: {v}")
        res.verdicts.append(v)
        if block:
            res.blocked, res.text = True, self.refusal_text


@dataclass
class RefusalCheck:
    """Flags refusing a benign request (over_refusal) and complying with a harmful one (harmful_compliance):
    with r = P(refusal), q = P(harmful request), score max(r·(1−q), (1−r)·q), the wrong-side chance."""

    name: str
    refusal: Callable[[list[str], list[str]], Sequence[float]]
    request: Callable[[list[str], list[str]], Sequence[float]] | None
    threshold: float = 0.5
    request_threshold: float = 0.5
    stage: Stage = "output"
    action: Action = "flag"

    def check(self, prompt: str, response: str | None) -> Verdict:
        return self.check_batch([prompt], [response])[0]

    def check_batch(self, prompts: list[str], responses: list[str | None]) -> list[Verdict]:
        rs = list(self.refusal(prompts, [r or "" for r in responses]))
        qs = list(self.request(prompts, prompts)) if self.request else [0.0] * len(prompts)
        out = []
        for r, q in zip(rs, qs, strict=True):
            refused, harmful = r >= self.threshold, q >= self.request_threshold
            if refused != harmful:  # the reply took the wrong side
                category = "over_refusal" if refused else "harmful_compliance"
            else:
                category = "refusal" if refused else None
            why = f"refusal {r:.3f}, request {q:.3f}"
            out.append(Verdict(self.name, refused != harmful, max(r * (1 - q), (1 - r) * q), category, why))
        return out


def output_scores(
    pipe: Pipeline, prompts: list[str], responses: list[str]
) -> tuple[list | None, list | None]:
    """P(refusal) of the first refusal check, P(harm) of the first blocking output ScoreCheck (or None)."""
    ref = next((c.refusal for c in pipe.checks if isinstance(c, RefusalCheck)), None)
    outs = [c for c in pipe.checks if isinstance(c, ScoreCheck) and c.stage == "output"]
    harm = next((c.detector for c in outs if c.action == "block"), None)
    return tuple(None if fn is None else [float(x) for x in fn(prompts, responses)] for fn in (ref, harm))
