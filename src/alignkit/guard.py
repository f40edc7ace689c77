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


# ---------------------------------------------------------------- refusal check
@dataclass
class RefusalCheck:
    """Output check that flags a refusal of a benign request (category over_refusal) and compliance
    with a harmful one (harmful_compliance). With r = P(refusal) and q = P(harmful request), its score is
    max(r·(1−q), (1−r)·q): the chance that the reply took the wrong side, as if r and q were independent."""

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
        texts = [r or "" for r in responses]
        rs = list(self.refusal(prompts, texts))
        qs = list(self.request(prompts, prompts)) if self.request else [0.0] * len(prompts)
        out = []
        for r, q in zip(rs, qs, strict=True):
            refused, harmful = r >= self.threshold, q >= self.request_threshold
            score = max(r * (1 - q), (1 - r) * q)
            if refused and not harmful:
                out.append(
                    Verdict(self.name, True, score, "over_refusal", f"refusal {r:.3f}, request {q:.3f}")
                )
            elif harmful and not refused:
                out.append(
                    Verdict(self.name, True, score, "harmful_compliance", f"refusal {r:.3f}, request {q:.3f}")
                )
            else:
                why = f"refusal {r:.3f}, request {q:.3f}"
                out.append(Verdict(self.name, False, score, "refusal" if refused else None, why))
        return out


# ---------------------------------------------------------------- adapters
class HFSequenceScorer:
    """Any transformers sequence-classification model (a Prompt Guard–style classifier, say) as a scorer:
    the probability of `label` (default: the last class of a two-class model), or 1 − P(X) for "!X"."""

    def __init__(self, path: str, label: str | None = None, max_length: int = 512):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
        names = {v.lower(): int(k) for k, v in self.model.config.id2label.items()}
        self.negate = bool(label and label.startswith("!"))
        want = (label or "").lstrip("!").lower()
        if want and want not in names:
            raise DataError(path, None, "label", f"{want!r} is not a class (classes: {', '.join(names)})")
        if not want and len(names) != 2:
            raise DataError(path, None, "label", f"{len(names)} classes: name the unsafe one (hf:DIR:LABEL)")
        self.index = names[want] if want else 1
        self.max_length = max_length

    def __call__(self, prompts: list[str], texts: list[str]) -> list[float]:
        import torch

        enc = self.tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            p = self.model(**enc).logits.float().softmax(-1)[:, self.index]
        return (1 - p if self.negate else p).tolist()


_LOADED: dict[str, Any] = {}


def make_scorer(spec: str, label: str | None = None) -> tuple[Callable, float]:
    """(score function, its own threshold) for a classifier spec (see CheckSpec.classifier)."""
    key = f"{spec}|{label}"
    if key in _LOADED:
        return _LOADED[key]
    if spec.startswith("hf:"):
        try:
            out = (HFSequenceScorer(spec[3:], label), 0.5)
        except OSError as e:  # no such folder, or not a model: name the spec, not a traceback
            raise DataError(spec, None, "classifier", f"cannot load the model ({e})") from None
    elif spec.startswith("llamaguard:"):
        target = spec[len("llamaguard:") :]
        url = target if target.startswith(("http://", "https://")) else None
        judge = make_judge("llm", model=(label or target) if url else target, url=url)
        out = (judge.harm, 0.5)
    elif spec.startswith("judge:"):
        kind, _, head = spec[6:].partition("-")
        if head not in ("refusal", "harm"):
            raise DataError(spec, None, "classifier", "expected judge:KIND-refusal or judge:KIND-harm")
        out = (getattr(make_judge(kind), head), 0.5)
    else:
        from . import classifiers

        clf = classifiers.load(spec)
        out = (clf.score, clf.threshold)
    _LOADED[key] = out
    return out


# ---------------------------------------------------------------- config
@dataclass
class CheckSpec:
    """One classifier check of the pipeline."""

    name: str = ""
    """Verdict name (and category)."""
    stage: Literal["input", "output"] = "input"
    """input: judges the prompt; output: judges the response (to its prompt)."""
    action: Literal["block", "flag"] = "block"
    """block: replace with the refusal text and stop; flag: pass and log."""
    classifier: str = ""
    """default:NAME (shipped: jailbreak, harmful_request, refusal, output_harm), a folder written by
    `alignkit guard train`, hf:MODEL_DIR (a sequence-classification model; `label` names the unsafe
    class, or !SAFE for 1 − P(SAFE)), llamaguard:MODEL_DIR or llamaguard:URL (a Llama Guard–style
    generative judge over the S1–S14 hazards; `label` is the endpoint's model name), or
    judge:learned-refusal / judge:learned-harm / judge:regex-refusal (the probe judges)."""
    threshold: float | None = None
    """Flag at score ≥ this; null: the classifier's own calibrated threshold (0.5 for adapters)."""
    label: str | None = None
    """hf: the unsafe class; llamaguard:URL: the model name."""
    request: str | None = None
    """Output checks only: a request classifier. The check then flags refusals of benign requests
    (over_refusal) and compliance with harmful ones (harmful_compliance) instead of high scores."""


DEFAULT_CHECKS = [
    CheckSpec("jailbreak", "input", "block", "default:jailbreak"),
    CheckSpec("harmful_request", "input", "block", "default:harmful_request"),
    CheckSpec("output_harm", "output", "block", "default:output_harm"),
    CheckSpec("refusal", "output", "flag", "default:refusal", request="default:harmful_request"),
]


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
    """Built-in pattern groups the first input check blocks on (prompt_injection, jailbreak); [] for none."""
    checks: list[CheckSpec] = field(default_factory=lambda: [dataclasses.replace(c) for c in DEFAULT_CHECKS])
    """Classifier checks, run in order within each stage (list of CheckSpec mappings)."""

    def __post_init__(self):
        if unknown := [g for g in self.patterns if g not in PATTERN_GROUPS]:
            raise ValueError(f"patterns: unknown group(s) {unknown} (known: {', '.join(PATTERN_GROUPS)})")
        for i, c in enumerate(self.checks):
            if not c.name or not c.classifier:
                raise ValueError(f"checks[{i}]: name and classifier are required")
            if c.threshold is not None and not 0 <= c.threshold <= 1:
                raise ValueError(f"checks[{i}].threshold: must be in [0, 1]")
            if c.request and c.stage != "output":
                raise ValueError(f"checks[{i}].request: only output checks take a request classifier")


def build_pipeline(cfg: GuardConfig, scorers: dict[str, Callable] | None = None) -> Pipeline:
    """Patterns, then cfg.checks in order. `scorers` maps a classifier spec to a score function to use
    instead of loading it (tests; an already-loaded model); their threshold is 0.5 unless set."""
    scorers = scorers or {}

    def scorer(spec: str, label: str | None) -> tuple[Callable, float]:
        return (scorers[spec], 0.5) if spec in scorers else make_scorer(spec, label)

    groups = {g: PATTERN_GROUPS[g] for g in cfg.patterns}
    checks: list[Check] = [PatternCheck("patterns", "input", "block", groups)] if groups else []
    for c in cfg.checks:
        fn, own = scorer(c.classifier, c.label)
        threshold = own if c.threshold is None else c.threshold
        if c.request:
            req, req_t = scorer(c.request, None)
            checks.append(RefusalCheck(c.name, fn, req, threshold, req_t, action=c.action))
        else:
            checks.append(ScoreCheck(c.name, c.stage, c.action, fn, threshold, c.name))
    context = ContextRules.load(cfg.rules_file) if cfg.rules_file else None
    return Pipeline(checks, context, cfg.fail_closed, cfg.refusal_text)


def output_scores(
    pipe: Pipeline, prompts: list[str], responses: list[str]
) -> tuple[list | None, list | None]:
    """P(refusal) from the first refusal check and P(harm) from the first blocking output score check
    (None where the pipeline has no such check)."""
    ref = next((c for c in pipe.checks if isinstance(c, RefusalCheck)), None)
    harm = next(
        (c for c in pipe.checks if isinstance(c, ScoreCheck) and c.stage == "output" and c.action == "block"),
        None,
    )
    return (
        [float(x) for x in ref.refusal(prompts, responses)] if ref else None,
        [float(x) for x in harm.score(prompts, responses)] if harm else None,
    )


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


def score(cfg: GuardScoreConfig, scorers: dict[str, Callable] | None = None) -> dict:
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
    pipe = build_pipeline(gcfg, scorers)
    prompts = [r["prompt"] for _, r in records]
    responses = [r["response"] for _, r in records] if cfg.stage == "output" else None
    results = pipe.check_many(cfg.stage, prompts, responses)
    if cfg.stage == "output":  # both scores for every record, whatever stopped the checks early
        refusal, harm = output_scores(pipe, prompts, responses)
    rows = []
    for k, ((_, rec), res) in enumerate(zip(records, results, strict=True)):
        row = {
            **rec,
            "flagged": res.flagged,
            "score": res.score,
            "verdicts": [v.as_dict() for v in res.verdicts],
        }
        if cfg.stage == "output":
            row["refusal"], row["harm"] = refusal[k] if refusal else None, harm[k] if harm else None
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    out = Path(cfg.output)
    write_atomic(out, "".join(rows))
    return {
        "output": str(out),
        "records": len(results),
        "flagged": sum(r.flagged for r in results),
        "blocked": sum(r.blocked for r in results),
    }
