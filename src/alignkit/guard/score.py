"""`alignkit guard score`: the guard pipeline's input or output checks over JSONL records."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .. import config as cfglib
from ..data import DataError, read_records, write_jsonl
from .config import GuardConfig, build_pipeline
from .pipeline import output_scores


@dataclass(kw_only=True)
class GuardScoreConfig:
    """Run the guard over {id, prompt} records (input stage) or {id, prompt, response} (output stage)."""

    stage: Literal["input", "output"] = "input"
    """Which checks run: input (on prompts) or output (on responses)."""
    guard: str | None = None
    """Guard YAML (GuardConfig keys); unset: the default guard."""
    input: str
    """JSONL of {id, prompt} (+ response for the output stage)."""
    output: str
    """JSONL written: each record plus flagged, score, verdicts (and refusal, harm for the output stage).
    The resolved config goes next to it as <name>.job_config.yaml."""


def score(cfg: GuardScoreConfig, detectors: dict[str, Callable] | None = None) -> dict:
    records = read_records(cfg.input)
    need = ("id", "prompt", "response") if cfg.stage == "output" else ("id", "prompt")
    for line, rec in records:
        for key in need:
            if key not in rec:
                raise DataError(cfg.input, line, key, "missing")
            if key != "id" and not isinstance(rec[key], str):
                raise DataError(cfg.input, line, key, "must be a string")
    pipe = build_pipeline(cfglib.load(GuardConfig, cfg.guard) if cfg.guard else GuardConfig(), detectors)
    prompts = [r["prompt"] for _, r in records]
    responses = [r["response"] for _, r in records] if cfg.stage == "output" else None
    results = pipe.check_many(cfg.stage, prompts, responses)
    if cfg.stage == "output":  # both scores for every record, whatever stopped the checks early
        refusal, harm = output_scores(pipe, prompts, responses)
    rows = []
    for k, ((_, rec), res) in enumerate(zip(records, results, strict=True)):
        verdicts = [v.as_dict() for v in res.verdicts]
        row = {**rec, "flagged": res.flagged, "score": res.score, "verdicts": verdicts}
        if cfg.stage == "output":
            row["refusal"], row["harm"] = refusal[k] if refusal else None, harm[k] if harm else None
        rows.append(row)
    out = Path(cfg.output)
    write_jsonl(out, rows)
    cfglib.save(cfg, out.with_name(out.stem + ".job_config.yaml"))
    flagged, blocked = sum(r.flagged for r in results), sum(r.blocked for r in results)
    return {"output": str(out), "records": len(results), "flagged": flagged, "blocked": blocked}
