"""The guard's configuration (the YAML of `--guard`) and `build_pipeline`, which loads it into a Pipeline."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from .. import config as cfglib
from ..detect.specs import detector
from .pipeline import PATTERN_GROUPS, Check, ContextRules, PatternCheck, Pipeline, RefusalCheck, ScoreCheck


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
    """default:NAME (shipped: jailbreak, harmful_request, refusal, output_harm), a folder from `alignkit
    guard train`, hf:MODEL_DIR (a sequence classifier; `label` names the unsafe class, or !SAFE for
    1 − P(SAFE)), llamaguard:MODEL_DIR|URL (a Llama Guard–style judge of the S1–S14 hazards; `label` is
    the endpoint's model name), or judge:learned-refusal|learned-harm|regex-refusal (the probe judges)."""
    threshold: float | None = None
    """Flag at score ≥ this; null: the classifier's own calibrated threshold (0.5 for adapters)."""
    label: str | None = None
    """hf: the unsafe class; llamaguard:URL: the model name."""
    request: str | None = None
    """Output checks only: a request classifier; the check then flags over_refusal and harmful_compliance."""


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
    refusal_text: str = Pipeline.refusal_text
    """What a blocked prompt or response is replaced with (say what was declined, and why)."""
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


def build_pipeline(cfg: GuardConfig, detectors: dict[str, Callable] | None = None) -> Pipeline:
    """Patterns, then cfg.checks in order; `detectors`: spec → detector used instead of loading (tests)."""
    detectors = detectors or {}

    def loaded(spec: str, label: str | None) -> tuple[Callable, float]:
        return (detectors[spec], 0.5) if spec in detectors else detector(spec, label)

    groups = {g: PATTERN_GROUPS[g] for g in cfg.patterns}
    checks: list[Check] = [PatternCheck("patterns", "input", "block", groups)] if groups else []
    for c in cfg.checks:
        fn, own = loaded(c.classifier, c.label)
        threshold = own if c.threshold is None else c.threshold
        if c.request:
            req, req_t = loaded(c.request, None)
            checks.append(RefusalCheck(c.name, fn, req, threshold, req_t, action=c.action))
        else:
            checks.append(ScoreCheck(c.name, c.stage, c.action, fn, threshold, c.name))
    context = ContextRules.load(cfg.rules_file) if cfg.rules_file else None
    return Pipeline(checks, context, cfg.fail_closed, cfg.refusal_text)


def load_pipeline(spec: str | None) -> Pipeline | None:
    """None, or the pipeline of 'default' (the default guard) or of a guard YAML file."""
    if not spec:
        return None
    return build_pipeline(GuardConfig() if spec == "default" else cfglib.load(GuardConfig, spec))
