"""The commands in the README and docs/: every `alignkit` command in a bash block resolves to a valid job
config (its job, flags, keys and values), and the README's tour runs as written on a tiny model, in
order, each step reading what the earlier ones wrote."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from alignkit import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOUR = "<!-- tour -->"  # the README's bash block after this marker is the tour the test runs
# appended to each job of the tour so that it runs in seconds on the tiny model; the command's own keys
# are still all read, checked and used
QUICK = {
    "sft": [
        "train.max_steps=1",
        "train.batch_size=2",
        "max_length=64",
        "train.eval_every=0",
        "train.save_every=0",
    ],
    "rm train": [
        "train.max_steps=1",
        "train.batch_size=2",
        "max_length=64",
        "train.eval_every=0",
        "train.save_every=0",
    ],
    "ppo": [
        "steps=1",
        "batch_size=2",
        "ppo.max_new_tokens=4",
        "ppo.minibatch=2",
        "probe.every=0",
        "save_every=0",
    ],
    "generate": ["max_new_tokens=4"],
    "probe": [
        "limit=1",
        "max_new_tokens=4",
        "judge.refusal=regex",
        "judge.harm=none",
        "judge.validation=none",
    ],
    "judge eval": ["judges=[regex]"],
}
SKIP = {"serve", "models prepare"}  # a server that runs until stopped; the default model's 100 MB download


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def commands(block: str) -> list[list[str]]:
    """The argv after `alignkit` (or `-m alignkit.cli`) of each command line in a bash block."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        if "alignkit" not in line:
            continue
        words = shlex.split(line.split("&&")[-1], comments=True)
        for i, w in enumerate(words):
            if w in ("alignkit", ".venv/bin/alignkit") or (w == "alignkit.cli" and words[i - 1] == "-m"):
                out.append(words[i + 1 :])
                break
    return out


def documented() -> list[tuple[str, list[str]]]:
    return [(p.name, argv) for p in DOCS for block in bash_blocks(p.read_text()) for argv in commands(block)]


def test_the_docs_have_commands():
    names = {name for name, _ in documented()}
    assert {"README.md", "guardrails.md", "measurement.md", "scale-out.md", "guardrails-server.md"} <= names


@pytest.mark.parametrize(
    ("doc", "argv"), documented(), ids=lambda x: x if isinstance(x, str) else " ".join(x)[:60]
)
def test_every_documented_command_resolves_to_a_valid_config(doc, argv):
    name, rest = cli.find_job(argv)
    assert name is not None, f"{doc}: unknown job in `alignkit {' '.join(argv)}`"
    if name != "models prepare":
        cli.resolve(cli.JOBS[name], rest)  # raises ConfigError naming the bad key


def with_tiny_model(name: str, argv: list[str], tiny: str) -> list[str]:
    """argv with the default model, given or implied (by the job or its --config file), made the tiny one."""
    argv = [tiny if a == "default" and argv[i - 1] == "--model" else a for i, a in enumerate(argv)]
    argv = [f"model={tiny}" if a == "model=default" else a for a in argv]
    fields = {f.name: f for f in dataclasses.fields(cli.JOBS[name].config_class())}
    model = next((a for i, a in enumerate(argv) if a.startswith("model=") or argv[i - 1] == "--model"), None)
    if model is None and "--config" in argv:
        model = yaml.safe_load((ROOT / argv[argv.index("--config") + 1]).read_text()).get("model")
    if "model" in fields and fields["model"].default == "default" and model in (None, "default"):
        argv = [*argv, f"model={tiny}"]
    return argv


def test_the_readme_tour_runs_as_written_on_a_tiny_model(tmp_path, tiny_model, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    assert TOUR in text, "the README's tour is marked with " + TOUR
    (block,) = bash_blocks(text.split(TOUR, 1)[1])[:1]
    for folder in ("configs", "examples"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    monkeypatch.chdir(tmp_path)
    ran = []
    for argv in commands(block):
        name, rest = cli.find_job(argv)
        if name in SKIP:
            continue
        full = [*name.split(), *with_tiny_model(name, rest, tiny_model), *QUICK.get(name, [])]
        assert cli.main(full) == 0, f"`alignkit {' '.join(argv)}` failed:\n{capsys.readouterr().err[-2000:]}"
        ran.append(name)
    # the tour trains, scores, probes and guards, and what it writes is where the README says
    assert {"run", "sft", "rm train", "ppo", "probe", "report", "guard score"} <= set(ran), ran
    for path in (
        "runs/sft/model.safetensors",
        "runs/rm/model.safetensors",
        "runs/ppo/model.safetensors",
        "runs/report.html",
    ):
        assert os.path.exists(path), path
