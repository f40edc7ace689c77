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
}
# which function of the module runs each job
ENTRY = {"rm score": "score", "rm combine": "combine"}


def _job_parser(sub, name: str, module: str, cls_name: str, summary: str):
    cls = getattr(importlib.import_module(f"alignkit.{module}"), cls_name)
    p = sub.add_parser(
        name.split()[-1],
        help=summary,
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
    models = sub.add_parser("models", help="manage models: prepare", description="Models.")
    msub = models.add_subparsers(title="commands", metavar="<command>")
    prep = msub.add_parser(
        "prepare", help="materialise the embedded default model offline and print its path"
    )
    prep.set_defaults(job="models prepare")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not hasattr(args, "job"):
        parser().parse_args([*(argv or sys.argv[1:]), "--help"])
        return 2
    try:
        if args.job == "models prepare":
            from .models import prepare_default

            print(prepare_default())
            return 0
        overrides = list(args.overrides)
        for flag, key in (("model", "model"), ("inp", "input"), ("out", "output")):
            if getattr(args, flag, None):
                overrides.append(f"{key}={getattr(args, flag)}")
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
