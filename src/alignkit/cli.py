"""`alignkit <job> [--config FILE.yaml] [key=value ...]`.

Every job is one row of JOBS: its name, where its config class and entry function live, a summary for
`--help`, and the flags that stand for keys. Exit codes: 0 done; 1 training diverged (checkpoints kept)
or an endpoint failed after its retries; 2 bad input, config or usage (one message naming the file,
line and field, or the key).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from dataclasses import dataclass

from .config import ConfigError, help_text, load, output_lock, peak_rss_mb
from .data import DataError
from .gen.endpoint import EndpointError


@dataclass(frozen=True)
class Flag:
    """`--name VALUE` as a shorthand for key=VALUE; repeatable flags gather a list."""

    name: str
    key: str
    help: str
    repeat: bool = False


@dataclass(frozen=True)
class Job:
    name: str
    """The words after `alignkit`, e.g. 'rm train'."""
    module: str
    """The module under alignkit holding the config class and the entry function."""
    config: str
    entry: str
    summary: str
    flags: tuple[Flag, ...] = ()
    positional: str | None = None
    """A list key filled by the bare arguments (run folders), e.g. runs."""

    def config_class(self) -> type:
        return getattr(importlib.import_module(f"alignkit.{self.module}"), self.config)


MODEL, GUARD = (
    Flag("--model", "model", "the model (same as model=...)"),
    Flag("--guard", "guard", "guard YAML"),
)
IN, OUT = Flag("--in", "input", "input JSONL (same as input=...)"), Flag("--out", "output", "output file")
JOBS = {
    j.name: j
    for j in (
        Job("run", "pipeline", "RunConfig", "run", "the whole pipeline (SL-CAI, RLAIF, reward models, PPO, probes) → one report",
            (Flag("--preset", "preset", "laptop, smoke, cluster or a recipe YAML (same as preset=...)"),
             Flag("--out", "output_dir", "run folder (same as output_dir=...)"),
             Flag("--from", "from_stage", "rerun from this stage on"), Flag("--only", "only", "run only this stage"))),
        Job("sft", "train.sft", "SFTConfig", "run", "supervised fine-tuning on prompt/completion or message data"),
        Job("rm train", "train.rm", "RMConfig", "run", "train a reward model (or an ensemble) on preference pairs"),
        Job("rm score", "train.rm", "ScoreConfig", "score", "score {prompt, response} records with a reward model",
            (Flag("--model", "model", "reward model or ensemble folder (same as model=...)"), IN, OUT)),
        Job("rm combine", "train.rm", "CombineConfig", "combine", "gate a helpfulness RM by a harmlessness RM (priority)"),
        Job("ppo", "train.ppo", "PPOConfig", "run", "PPO against a reward model with a per-token KL penalty to the SFT policy"),
        Job("cai revise", "cai.revise", "ReviseConfig", "run", "SL-CAI: critique → revision rounds over red-team prompts → SFT set"),
        Job("cai label", "cai.label", "LabelConfig", "label", "RLAIF: AI-feedback preference labels, both orders averaged, per tier"),
        Job("cai check", "cai.label", "CheckConfig", "check", "score a feedback model on labelled comparisons (accuracy, ECE, swaps)"),
        Job("generate", "gen.generate", "GenerateConfig", "run", "batched, resumable generation for {id, prompt} records",
            (MODEL, IN, OUT)),
        Job("probe", "measure.probe", "ProbeConfig", "run", "adversarial and benign probe packs → rates with 95% intervals",
            (MODEL, Flag("--pack", "packs", "a pack; repeat for several (packs=[...])", True),
             Flag("--out", "output_dir", "run folder (same as output_dir=...)"),
             Flag("--guard", "guard", "put the guard in front: 'default' or a guard YAML (same as guard=...)"))),
        Job("probe compare", "measure.probe", "CompareConfig", "compare", "put probe runs side by side",
            (Flag("--out", "output", "also write the markdown table here"),), "runs"),
        Job("judge eval", "detect.judges", "JudgeEvalConfig", "evaluate", "measure a judge on labelled responses"),
        Job("guard score", "guard.score", "GuardScoreConfig", "score", "run the guard's input or output checks over JSONL records",
            (Flag("--stage", "stage", "input or output (same as stage=...)"), GUARD, IN, OUT)),
        Job("guard train", "detect.classifiers", "GuardTrainConfig", "train", "train a calibrated guard classifier on labelled JSONL",
            (Flag("--data", "data", "labelled JSONL (same as data=...)"), Flag("--out", "output", "classifier folder"))),
        Job("serve", "guard.serve", "ServeConfig", "run", "an OpenAI-compatible chat server with the guard around every call",
            (Flag("--model", "model", "local model, or the upstream's model name (same as model=...)"), GUARD)),
        Job("report", "measure.report", "ReportConfig", "run", "a self-contained HTML + markdown report of probe runs and training logs",
            (Flag("--train", "train", "a training run folder; repeatable", True),
             Flag("--out", "output", "HTML path; the markdown goes next to it (same as output=...)")), "runs"),
    )
}  # fmt: skip
GROUPS = {"rm": "reward models: train, score, combine", "cai": "Constitutional AI: revise, label, check", "judge": "judges of responses: eval",
          "guard": "inference-time guardrails: score, train", "models": "models: prepare"}  # fmt: skip
PREPARE = "materialise the embedded default model offline and print its path"


def top_parser() -> argparse.ArgumentParser:
    """`alignkit --help`: the jobs, without importing any job's module."""
    top = argparse.ArgumentParser(
        prog="alignkit",
        description="alignkit: the language-model alignment stack. `alignkit <job> --help` lists its keys.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rows = [(n, j.summary) for n, j in JOBS.items()] + [("models prepare", PREPARE)]
    width = max(len(n) for n, _ in rows)
    top.epilog = "jobs:\n" + "\n".join(f"  {n:<{width}}  {s}" for n, s in rows)
    top.add_argument("job", nargs="?", help="see the list below")
    return top


def job_parser(job: Job) -> argparse.ArgumentParser:
    cls = job.config_class()
    usage = (
        f"alignkit {job.name}{' RUN_DIR...' if job.positional else ''} [--config FILE.yaml] "
        "[key=value | --key value ...]"
    )
    p = argparse.ArgumentParser(
        prog=f"alignkit {job.name}",
        usage=usage,
        description=f"alignkit {job.name}: {job.summary}.",
        epilog="keys (set in --config YAML, as key=value or as --key value; nested as a.b=value):\n"
        + help_text(cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of keys (overrides win over it)")
    for f in job.flags:
        p.add_argument(
            f.name, dest=f.key, action="append" if f.repeat else "store", help=f.help.replace("%", "%%")
        )
    if job.name == "probe":
        p.epilog = "`alignkit probe compare DIR...` puts runs side by side.\n\n" + p.epilog
    return p


def no_job(argv: list[str]) -> int:
    """`alignkit`, `alignkit --help` and `alignkit GROUP --help` print help (exit 0); anything else is a
    usage error naming the jobs (exit 2)."""
    asks_help = not argv or "--help" in argv or "-h" in argv
    if argv and argv[0] in GROUPS:
        words = [n for n in [*JOBS, "models prepare"] if n.split()[0] == argv[0]]
        text = f"alignkit {argv[0]}: {GROUPS[argv[0]]}\n\ncommands:\n" + "\n".join(
            f"  alignkit {w}" for w in words
        )
        print(text, file=sys.stdout if asks_help else sys.stderr)
        if asks_help:
            raise SystemExit(0)
        return 2
    if asks_help:
        top_parser().parse_args(["--help"])  # prints the help and exits 0
    print(
        f"alignkit: error: unknown job {argv[0]!r} (jobs: {', '.join(JOBS)}, models prepare)", file=sys.stderr
    )
    return 2


def find_job(argv: list[str]) -> tuple[str | None, list[str]]:
    """The job named by the first words of argv (the longest match) and the arguments after it."""
    for words in (2, 1):
        name = " ".join(argv[:words])
        if name in JOBS or name == "models prepare":
            return name, argv[words:]
    return None, argv


def flag_overrides(rest: list[str]) -> list[str]:
    """`--a.b-c VALUE` and `--a.b-c=VALUE` as key=value (a.b_c=VALUE); a flag without a value means true.
    An unknown key is refused by `load`, which lists the keys."""
    out, i = [], 0
    while i < len(rest):
        x = rest[i]
        if x.startswith("--") and len(x) > 2:
            key, eq, value = x[2:].partition("=")
            if not eq:
                has = i + 1 < len(rest) and not rest[i + 1].startswith("--")
                value, i = (rest[i + 1], i + 1) if has else ("true", i)
            x = f"{key.replace('-', '_')}={value}"
        elif x.startswith("-"):
            raise ConfigError(f"unknown option {x!r}: give keys as key=value or --key value")
        out.append(x)
        i += 1
    return out


def overrides_of(job: Job, args: argparse.Namespace, rest: list[str]) -> list[str]:
    """key=value overrides from the bare arguments and the flags; bare run folders for a positional job."""
    rest = flag_overrides(rest)
    overrides = [x for x in rest if "=" in x]
    bare = [x for x in rest if "=" not in x]
    if bare and not job.positional:
        raise ConfigError(f"{bare[0]!r} is not key=value")
    if bare:  # as a JSON list, so paths like text:a.txt stay verbatim
        overrides.append(f"{job.positional}={json.dumps(bare)}")
    for f in job.flags:
        if value := getattr(args, f.key, None):
            overrides.append(f"{f.key}={json.dumps(value)}" if f.repeat else f"{f.key}={value}")
    return overrides


def resolve(job: Job, rest: list[str]):
    """The config a job's arguments resolve to (ConfigError/DataError for bad ones); nothing runs."""
    args, rest = job_parser(job).parse_known_args(rest)
    return load(job.config_class(), args.config, overrides_of(job, args, rest))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name, rest = find_job(argv)
    if name is None:
        return no_job(argv)
    if name == "models prepare":
        from .models import prepare_default  # transformers and peft take seconds to import: only here

        print(prepare_default())
        return 0
    job = JOBS[name]
    try:
        cfg = resolve(job, rest)
        out = getattr(cfg, "output_dir", None) or getattr(cfg, "output", None)
        rank0 = os.environ.get("RANK", "0") == "0"  # under accelerate launch, rank 0 holds the lock
        with output_lock(out) if out and rank0 else contextlib.nullcontext():
            result = getattr(importlib.import_module(f"alignkit.{job.module}"), job.entry)(cfg)
    except (ConfigError, DataError) as e:
        print(f"alignkit {name}: error: {e}", file=sys.stderr)
        return 2
    except (FloatingPointError, EndpointError) as e:  # diverged, or an endpoint failed its retries
        print(f"alignkit {name}: stopped: {e}", file=sys.stderr)
        return 1
    # probe and run print their own readable summaries (their numbers are in files)
    if result and name not in ("probe", "run") and os.environ.get("RANK", "0") == "0":  # once per job
        print(json.dumps(result, indent=2, default=float))
    print(f"alignkit {name}: peak memory {peak_rss_mb():,.0f} MB RSS", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
