"""Inference-time guardrails: ordered input/output checks, and rules injected into the system prompt.

Each check returns a `Verdict` scored in [0, 1] (higher = more likely unsafe). A `Pipeline` runs a stage's
checks in order: the first flagged `block` check ends the stage (later checks are not called), `flag`
records and goes on, `rewrite` changes the text later checks see. A check that raises blocks the record
(`fail_closed=True`) or is recorded unflagged and skipped. judges.py plugs in through `ScoreCheck`."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml

from .data import DataError
from .judges import make_judge

Stage = Literal["input", "output"]
Action = Literal["block", "flag", "rewrite"]
STAGES, ACTIONS = ("input", "output"), ("block", "flag", "rewrite")

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


# ---------------------------------------------------------------- built-in checks
@dataclass
class PatternCheck:
    """Named regexes (category -> regexes, case-insensitive); the first category that matches flags (score 1).
    `rewrite` replaces every match with `replacement`, so action="rewrite" makes it a redactor."""

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
    """A scorer `score(prompts, texts) -> [float | None]` (texts: the responses, or the prompts at the input
    stage) with a threshold: score >= threshold flags; None (the judge has no opinion) is an unflagged 0."""

    name: str
    stage: Stage
    action: Action
    score: Callable[[list[str], list[str]], Sequence[float | None]]
    threshold: float = 0.5
    category: str | None = None

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"{self.name}: threshold {self.threshold} is outside [0, 1]")

    def check(self, prompt: str, response: str | None) -> Verdict:
        return self.check_batch([prompt], [response])[0]

    def check_batch(self, prompts: list[str], responses: list[str | None]) -> list[Verdict]:
        texts = list(prompts) if self.stage == "input" else [r or "" for r in responses]
        scores = list(self.score(list(prompts), texts))
        if len(scores) != len(prompts):
            raise ValueError(f"{self.name}: scorer returned {len(scores)} scores for {len(prompts)} texts")
        return [self._verdict(s) for s in scores]

    def _verdict(self, s: float | None) -> Verdict:
        hit = s is not None and s >= self.threshold
        why = "no score" if s is None else f"{s:.3f} {'>=' if hit else '<'} threshold {self.threshold}"
        return Verdict(self.name, hit, float(s or 0.0), self.category or self.name, why)


# ---------------------------------------------------------------- context injection
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
        try:
            tree = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise DataError(str(path), None, None, f"cannot read the rules file ({e})") from None
        rules = tree.get("rules") if isinstance(tree, dict) else None
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


# ---------------------------------------------------------------- pipeline
@dataclass
class Pipeline:
    """Runs a stage's checks in order on each record (see the module docstring for the rules)."""

    checks: list[Check]
    context: ContextRules | None = None
    fail_closed: bool = True
    refusal_text: str = "I can't help with that."

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

    def check_many(
        self, stage: Stage, prompts: list[str], responses: list[str] | None = None
    ) -> list[GuardResult]:
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
            try:
                vs = list(c.check_batch(ps, rs))
                if len(vs) == len(ps) and all(isinstance(v, Verdict) for v in vs):
                    return vs
            except Exception:
                pass  # retry one record at a time, so that one bad record fails alone
        out: list[Verdict | Exception] = []
        for p, r in zip(ps, rs, strict=True):
            try:
                out.append(c.check(p, r))
            except Exception as e:
                out.append(e)
        return out

    def _settle(self, c: Check, v: Verdict | Exception, res: GuardResult) -> None:
        """Apply one check's verdict (or its exception) to a running record."""
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


# ---------------------------------------------------------------- config
@dataclass
class GuardConfig:
    """A guard pipeline (the YAML of `--guard`)."""

    fail_closed: bool = True
    """A check that raises blocks the record (true) or is recorded unflagged and skipped (false)."""
    refusal_text: str = "I can't help with that."
    """What a blocked prompt or response is replaced with."""
    rules_file: str | None = None
    """YAML file `{rules: [...]}` injected into the system prompt; null for none."""
    patterns: list[str] = field(default_factory=lambda: list(PATTERN_GROUPS))
    """Built-in pattern groups the input check blocks on (prompt_injection, jailbreak); empty for none."""
    refusal_threshold: float = 0.5
    """Refusal score at or above which a response is flagged as a possible over-refusal (never blocked)."""
    harm_threshold: float = 0.5
    """Harm score at or above which a response is blocked."""
    judge: Literal["regex", "learned"] = "learned"
    """Refusal/harm judge of the output checks (regex gives no harm scores, so nothing is blocked for harm)."""

    def __post_init__(self):
        if unknown := [g for g in self.patterns if g not in PATTERN_GROUPS]:
            raise ValueError(f"patterns: unknown group(s) {unknown} (known: {', '.join(PATTERN_GROUPS)})")
        if bad := [k for k in ("refusal_threshold", "harm_threshold") if not 0 <= getattr(self, k) <= 1]:
            raise ValueError(f"{', '.join(bad)}: must be in [0, 1]")


def build_pipeline(cfg: GuardConfig, judge: Any = None) -> Pipeline:
    """Input pattern block, output harm block, output over-refusal flag, from `judge` (or cfg.judge)."""
    judge = judge if judge is not None else make_judge(cfg.judge)
    groups = {g: PATTERN_GROUPS[g] for g in cfg.patterns}
    checks: list[Check] = [PatternCheck("patterns", "input", "block", groups)] if groups else []
    checks.append(ScoreCheck("harm", "output", "block", judge.harm, cfg.harm_threshold, "harm"))
    # a refusal may be of a benign request: a signal to review, not a reason to withhold the reply
    checks.append(ScoreCheck("over_refusal", "output", "flag", judge.refusal, cfg.refusal_threshold))
    context = ContextRules.load(cfg.rules_file) if cfg.rules_file else None
    return Pipeline(checks, context, cfg.fail_closed, cfg.refusal_text)


# ---------------------------------------------------------------- `alignkit guard score`
@dataclass
class GuardScoreConfig:
    """Run the guard over {id, prompt} records (input stage) or {id, prompt, response} (output stage)."""

    stage: Literal["input", "output"] = "input"
    """Which checks run: input (on prompts) or output (on responses)."""
    guard: str | None = None
    """Guard YAML (GuardConfig keys); unset: the default guard."""
    input: str = ""
    """JSONL of {id, prompt} (+ response for the output stage)."""
    output: str = ""
    """JSONL written: each record plus flagged, score, verdicts (and refusal, harm for the output stage)."""


def score(cfg: GuardScoreConfig, judge: Any = None) -> dict:
    import json

    from .config import load
    from .data import read_records, write_atomic

    if not cfg.input or not cfg.output:
        raise DataError("guard score", None, "input/output", "both --in and --out are needed")
    records = read_records(cfg.input)
    need = ("id", "prompt", "response") if cfg.stage == "output" else ("id", "prompt")
    for line, rec in records:
        for key in need:
            if key not in rec:
                raise DataError(cfg.input, line, key, "missing")
            if key != "id" and not isinstance(rec[key], str):
                raise DataError(cfg.input, line, key, "must be a string")
    gcfg = load(GuardConfig, cfg.guard) if cfg.guard else GuardConfig()
    judge = judge if judge is not None else make_judge(gcfg.judge)
    pipe = build_pipeline(gcfg, judge)
    prompts = [r["prompt"] for _, r in records]
    responses = [r["response"] for _, r in records] if cfg.stage == "output" else None
    results = pipe.check_many(cfg.stage, prompts, responses)
    if cfg.stage == "output":  # both scores for every record, whatever stopped the checks early
        refusal, harm = judge.refusal(prompts, responses), judge.harm(prompts, responses)
    rows = []
    for k, ((_, rec), res) in enumerate(zip(records, results, strict=True)):
        row = {
            **rec,
            "flagged": res.flagged,
            "score": res.score,
            "verdicts": [v.as_dict() for v in res.verdicts],
        }
        if cfg.stage == "output":
            row["refusal"], row["harm"] = refusal[k], harm[k]
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    out = Path(cfg.output)
    write_atomic(out, "".join(rows))
    return {
        "output": str(out),
        "records": len(results),
        "flagged": sum(r.flagged for r in results),
        "blocked": sum(r.blocked for r in results),
    }
