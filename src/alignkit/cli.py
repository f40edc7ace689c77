"""`alignkit <job> [--config FILE.yaml] [key=value ...]`. Bad input exits with code 2 and one message."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from .config import ConfigError, help_text, load
from .data import DataError

# job name → (module, config class, one-line summary)
JOBS = {
    "quickstart": ("quickstart", "QuickstartConfig", "a short SFT + reward-model run on the default model"),
    "sft": ("train_sft", "SFTConfig", "supervised fine-tuning on prompt/completion or message data"),
    "rm train": ("train_rm", "RMConfig", "train a reward model (or an ensemble) on preference pairs"),
    "rm score": ("train_rm", "ScoreConfig", "score {prompt, response} records with a reward model"),
    "rm combine": ("train_rm", "CombineConfig", "gate a helpfulness RM by a harmlessness RM (priority)"),
    "ppo": ("ppo", "PPOConfig", "PPO against a reward model with a per-token KL penalty to the SFT policy"),
    "generate": ("generate", "GenerateConfig", "batched, resumable generation for {id, prompt} records"),
    "probe": ("probe", "ProbeConfig", "adversarial and benign probe packs → rates with 95% intervals"),
    "probe compare": ("probe", "CompareConfig", "put probe runs side by side"),
    "judge eval": ("judges", "JudgeEvalConfig", "measure a judge on labelled responses"),
    "guard score": ("guard", "GuardScoreConfig", "run the guard's input or output checks over JSONL records"),
    "guard train": (
        "classifiers",
        "GuardTrainConfig",
        "train a calibrated guard classifier on labelled JSONL",
    ),
    "serve": ("serve", "ServeConfig", "an OpenAI-compatible chat server with the guard around every call"),
    "report": (
        "report",
        "ReportConfig",
        "a self-contained HTML + markdown report of probe runs and training logs",
    ),
}
# which function of the module runs each job
ENTRY = {
    "rm score": "score",
    "rm combine": "combine",
    "probe compare": "compare",
    "judge eval": "evaluate",
    "guard score": "score",
    "guard train": "train",
}
# flags that stand for keys: flag → (key, repeatable)
FLAGS = {
    "model": ("model", False),
    "inp": ("input", False),
    "out": ("output", False),
    "out_dir": ("output_dir", False),
    "packs": ("packs", True),
    "runs": ("runs", True),
    "train_dirs": ("train", True),
    "stage": ("stage", False),
    "guard_file": ("guard", False),
    "data": ("data", False),
}


def _job_parser(sub, name: str, module: str, cls_name: str, summary: str):
    cls = getattr(importlib.import_module(f"alignkit.{module}"), cls_name)
    p = sub.add_parser(
        name.split()[-1],
        help=summary.replace("%", "%%"),  # argparse %-formats help strings
        description=f"alignkit {name}: {summary}.",
        epilog="keys (set in --config YAML or as key=value; nested as a.b=value):\n" + help_text(cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of keys (overrides win over it)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. train.lr=1.0e-4")
    p.set_defaults(job=name, module=module, cls=cls)
    return p


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="alignkit",
        description="alignkit: the language-model alignment stack. `alignkit <job> --help` lists its keys.",
    )
    sub = top.add_subparsers(title="jobs", metavar="<job>")
    _job_parser(sub, "quickstart", *JOBS["quickstart"])
    _job_parser(sub, "sft", *JOBS["sft"])
    rm = sub.add_parser("rm", help="reward models: train, score", description="Reward models.")
    rm_sub = rm.add_subparsers(title="commands", metavar="<command>")
    _job_parser(rm_sub, "rm train", *JOBS["rm train"])
    sc = _job_parser(rm_sub, "rm score", *JOBS["rm score"])
    sc.add_argument("--model", help="reward model or ensemble folder (same as model=...)")
    sc.add_argument("--in", dest="inp", help="input JSONL of {prompt, response} (same as input=...)")
    sc.add_argument("--out", help="output JSONL (same as output=...)")
    _job_parser(rm_sub, "rm combine", *JOBS["rm combine"])
    _job_parser(sub, "ppo", *JOBS["ppo"])
    gen = _job_parser(sub, "generate", *JOBS["generate"])
    gen.add_argument("--model", help="policy (same as model=...)")
    gen.add_argument("--in", dest="inp", help="input JSONL of {id, prompt | messages} (same as input=...)")
    gen.add_argument("--out", help="output JSONL, appended and resumed (same as output=...)")
    probe = _job_parser(sub, "probe", *JOBS["probe"])
    probe.epilog = "`alignkit probe compare DIR...` puts runs side by side.\n\n" + probe.epilog
    probe.add_argument("--model", help="model under test (same as model=...)")
    probe.add_argument(
        "--pack", dest="packs", action="append", help="a pack; repeat for several (packs=[...])"
    )
    probe.add_argument("--out", dest="out_dir", help="run folder (same as output_dir=...)")
    probe.add_argument(
        "--guard",
        dest="guard_file",
        help="put the guard in front: 'default' or a guard YAML (same as guard=...)",
    )
    report = _job_parser(sub, "report", *JOBS["report"])
    report.usage = "alignkit report RUN_DIR... [--train DIR] [--out F.html] [key=value ...]"
    report.add_argument(
        "--train", dest="train_dirs", action="append", help="a training run folder; repeatable"
    )
    report.add_argument("--out", help="HTML path; the markdown goes next to it (same as output=...)")
    judge = sub.add_parser("judge", help="judges: eval", description="Judges of responses.")
    judge_sub = judge.add_subparsers(title="commands", metavar="<command>")
    _job_parser(judge_sub, "judge eval", *JOBS["judge eval"])
    guard = sub.add_parser("guard", help="guardrails: score, train", description="Inference-time guardrails.")
    guard_sub = guard.add_subparsers(title="commands", metavar="<command>")
    gs = _job_parser(guard_sub, "guard score", *JOBS["guard score"])
    gs.add_argument("--stage", help="input or output (same as stage=...)")
    gs.add_argument("--guard", dest="guard_file", help="guard YAML (same as guard=...)")
    gs.add_argument("--in", dest="inp", help="input JSONL (same as input=...)")
    gs.add_argument("--out", help="output JSONL (same as output=...)")
    gt = _job_parser(guard_sub, "guard train", *JOBS["guard train"])
    gt.add_argument("--data", help="labelled JSONL (same as data=...)")
    gt.add_argument("--out", help="classifier folder (same as output=...)")
    serve = _job_parser(sub, "serve", *JOBS["serve"])
    serve.add_argument("--model", help="local model, or the upstream's model name (same as model=...)")
    serve.add_argument("--guard", dest="guard_file", help="guard YAML (same as guard=...)")
    models = sub.add_parser("models", help="manage models: prepare", description="Models.")
    msub = models.add_subparsers(title="commands", metavar="<command>")
    prep = msub.add_parser(
        "prepare", help="materialise the embedded default model offline and print its path"
    )
    prep.set_defaults(job="models prepare")
    return top


def compare_parser() -> argparse.ArgumentParser:
    from .probe import CompareConfig

    p = argparse.ArgumentParser(
        prog="alignkit probe compare",
        description=f"alignkit probe compare: {JOBS['probe compare'][2]}: one column per run, one row per "
        "family and metric.",
        epilog="keys:\n" + help_text(CompareConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="probe run folders (each with summary.json)")
    p.add_argument("--out", help="also write the markdown table here")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["probe", "compare"]:
        from .probe import CompareConfig, compare

        a = compare_parser().parse_args(argv[2:])
        try:
            compare(CompareConfig(runs=a.runs, output=a.out))
        except DataError as e:
            print(f"alignkit probe compare: error: {e}", file=sys.stderr)
            return 2
        return 0
    top = parser()
    # key=value and run folders may come after flags too ("report A --out F title=T"), which one
    # nargs="*" positional cannot take in argparse: collect the leftovers here
    args, extra = top.parse_known_args(argv)
    if any(x.startswith("-") for x in extra) or (extra and not hasattr(args, "overrides")):
        top.parse_args(argv)  # prints argparse's own error and exits 2
    if extra:
        args.overrides = [*args.overrides, *extra]
    if not hasattr(args, "job"):
        parser().parse_args([*argv, "--help"])
        return 2
    try:
        if args.job == "models prepare":
            from .models import prepare_default

            print(prepare_default())
            return 0
        overrides = [o for o in args.overrides if "=" in o]
        if args.job == "report":  # positional run folders share the nargs="*" slot with key=value
            args.runs = [o for o in args.overrides if "=" not in o] or None
        elif len(overrides) < len(args.overrides):
            bad = next(o for o in args.overrides if "=" not in o)
            raise ConfigError(f"{bad!r} is not key=value")
        for flag, (key, repeat) in FLAGS.items():
            value = getattr(args, flag, None)
            if value:
                if repeat:  # as a JSON list, so paths like text:a.txt stay verbatim
                    overrides.append(f"{key}={json.dumps(value)}")
                else:
                    overrides.append(f"{key}={value}")
        cfg = load(args.cls, args.config, overrides)

        module = importlib.import_module(f"alignkit.{args.module}")
        result = getattr(module, ENTRY.get(args.job, "run"))(cfg)
    except (ConfigError, DataError) as e:
        print(f"alignkit {args.job}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # training diverged: say so plainly, checkpoints stay as they were
        print(f"alignkit {args.job}: stopped: {e}", file=sys.stderr)
        return 1
    if result and os.environ.get("RANK", "0") == "0":  # once, not once per process
        print(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
