"""The command line: bad input exits 2 with one message naming the file, line and field, and writes nothing;
`--help` documents every key."""

from __future__ import annotations

import dataclasses
import json
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from alignkit import cli
from alignkit.config import field_docs

SFT_OK = {"prompt": "tell me about water", "completion": "water is good"}
PAIR_OK = {"prompt": "tell me about water", "chosen": "water is good", "rejected": "no sorry"}
SCORE_OK = {"prompt": "tell me about water", "response": "water is good"}


def line(record: dict) -> bytes:
    return (json.dumps(record) + "\n").encode()


# (job, file bytes, extra overrides, what the message must say besides the file name)
BAD_INPUT = {
    "sft-malformed-json": (
        "sft",
        line(SFT_OK) + b'{"prompt": "a", "completion": }\n',
        [],
        ["line 2", "malformed JSON"],
    ),
    "sft-missing-field": (
        "sft",
        line(SFT_OK) + line({"prompt": "a"}),
        [],
        ["line 2", "field 'completion'", "missing"],
    ),
    "sft-mistyped-field": (
        "sft",
        line(SFT_OK) + line({"prompt": "a", "completion": 7}),
        [],
        ["line 2", "field 'completion'", "int"],
    ),
    "sft-empty-file": ("sft", b"", [], ["empty file"]),
    "sft-not-utf8": (
        "sft",
        line(SFT_OK) + b'{"prompt": "caf\xe9", "completion": "b"}\n',
        [],
        ["line 2", "not UTF-8"],
    ),
    "sft-all-truncated": ("sft", line(SFT_OK) * 3, ["max_length=4"], ["truncated away", "max_length=4"]),
    "rm-malformed-json": (
        "rm train",
        line(PAIR_OK) + line(PAIR_OK)[:-3] + b"\n",
        [],
        ["line 2", "malformed JSON"],
    ),
    "rm-missing-field": (
        "rm train",
        line({k: v for k, v in PAIR_OK.items() if k != "rejected"}),
        [],
        ["line 1", "field 'rejected'", "missing"],
    ),
    "rm-mistyped-field": (
        "rm train",
        line(PAIR_OK) + line({**PAIR_OK, "chosen": ["x"]}),
        [],
        ["line 2", "field 'chosen[0]'"],
    ),
    "rm-label-out-of-range": (
        "rm train",
        line(PAIR_OK) * 2 + line({**PAIR_OK, "label": 1.5}),
        [],
        ["line 3", "field 'label'", "[0, 1]", "1.5"],
    ),
    "rm-empty-file": ("rm train", b"\n\n", [], ["empty file"]),
    "rm-not-utf8": ("rm train", b"\xff\xfe" + line(PAIR_OK), [], ["line 1", "not UTF-8"]),
    "rm-all-truncated": ("rm train", line(PAIR_OK) * 3, ["max_length=4"], ["truncated away", "max_length=4"]),
    "score-missing-field": (
        "rm score",
        line(SCORE_OK) + line({"prompt": "q"}),
        [],
        ["line 2", "field 'response'", "missing"],
    ),
}


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_model) -> Path:
    """A reward folder for `rm score` (an untrained single RM: scoring input is checked, not quality)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("rm") / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def one_error(capfd, job: str) -> str:
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"alignkit {job}: error: ")
    return lines[0]


@pytest.mark.parametrize("case", BAD_INPUT, ids=str)
def test_bad_input_exits_2_with_one_message_and_writes_nothing(
    case, tmp_path, tiny_model, reward_model, capfd
):
    job, content, overrides, says = BAD_INPUT[case]
    data, out = tmp_path / "input.jsonl", tmp_path / "out"
    data.write_bytes(content)
    if job == "rm score":
        args = [
            "rm",
            "score",
            "--model",
            str(reward_model),
            "--in",
            str(data),
            "--out",
            str(out / "scored.jsonl"),
        ]
    else:
        args = [*job.split(), f"data={data}", f"model={tiny_model}", f"output_dir={out}"]
    assert cli.main([*args, *overrides]) == 2
    msg = one_error(capfd, job)
    for s in [str(data), *says]:
        assert s in msg
    assert not out.exists()


def test_bad_eval_data_is_named(tmp_path, tiny_model, capfd):
    data = tmp_path / "train.jsonl"
    data.write_bytes(line(SFT_OK) * 4)
    dev = tmp_path / "dev.jsonl"
    dev.write_bytes(line(SFT_OK) + line({"completion": "no prompt"}))
    args = [
        "sft",
        f"data={data}",
        f"eval_data={dev}",
        f"model={tiny_model}",
        f"output_dir={tmp_path / 'out'}",
    ]
    assert cli.main(args) == 2
    assert f"{dev}, line 2, field 'prompt'" in one_error(capfd, "sft")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["train.learning_rate=0.1"], "'train.learning_rate'"),
        (["bogus=1"], "'bogus'"),
        (["train.precision=fp16"], "train.precision"),
        (["--config", "{tmp}/missing.yaml"], "config file not found"),
        (["data="], "data is required"),
        (["data={tmp}/missing.jsonl"], "missing.jsonl: file not found"),
    ],
)
def test_bad_config_exits_2(args, says, tmp_path, tiny_model, capfd):
    data = tmp_path / "train.jsonl"
    data.write_bytes(line(SFT_OK) * 4)
    args = [a.format(tmp=tmp_path) for a in args]
    base = [f"data={data}", f"model={tiny_model}", f"output_dir={tmp_path / 'out'}"]
    assert cli.main(["sft", *base, *args]) == 2
    assert says in one_error(capfd, "sft")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- help


def _fields(cls: type, prefix: str = ""):
    """(dotted key, doc) for every field of a job config, walked independently of the help code; an
    inline section's keys sit at its parent's level."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            yield from _fields(type(sub), prefix if f.metadata.get("inline") else f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, docs.get(f.name, "")


def help_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # whitespace-normalised: docs are wrapped


def test_top_level_help_lists_the_jobs(capsys):
    out = help_of([], capsys)
    for job in cli.JOBS:
        assert f" {job.split()[0]} " in out
    assert "rm" in help_of(["rm"], capsys) and "score" in help_of(["rm"], capsys)


@pytest.mark.parametrize("job", list(cli.JOBS))
def test_job_help_lists_every_key_with_its_doc(job, capsys):
    cls = cli.JOBS[job].config_class()
    out = help_of(job.split(), capsys)
    assert cli.JOBS[job].summary in out
    keys = list(_fields(cls))
    assert keys
    for key, doc in keys:
        assert doc, f"{job}: {key} has no doc string"
        assert f" {key} (" in out, f"{job}: {key} missing from --help"
        assert " ".join(doc.split()) in out, f"{job}: doc of {key} missing from --help"


def test_help_shows_the_jobs_own_defaults(capsys):
    assert "train.lr (float, default 0.0002)" in help_of(["sft"], capsys)  # SFTConfig's train section
    assert "train.lr (float, default 0.0001)" in help_of(["rm", "train"], capsys)


def test_console_script_is_cli_main():
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "alignkit"]
    assert ep.load() is cli.main


def test_a_diverging_run_stops_with_a_clear_message_and_exit_1(tiny_model, sft_file, tmp_path, capsys):
    # an absurd learning rate drives the tiny model's loss to inf/nan within a few steps
    out = tmp_path / "diverged"
    code = cli.main(
        [
            "sft",
            f"data={sft_file}",
            f"model={tiny_model}",
            f"output_dir={out}",
            "train.max_steps=30",
            "train.lr=1.0e+12",
            "train.max_grad_norm=0",
            "train.warmup_ratio=0",
            "lora.enabled=false",
            "train.precision=fp32",
        ]
    )
    assert code == 1
    assert "stopped: loss is" in capsys.readouterr().err
    assert not (out / "model.safetensors").exists()  # no final model from a diverged run


def test_report_takes_run_folders_and_keys_after_flags(tmp_path, capsys):
    # folders, then a flag, then key=value: argparse alone would reject the trailing key=value
    code = cli.main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r.html"), "title=a: b"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nope" in err and "not found" in err and not (tmp_path / "r.html").exists()


def test_percent_signs_read_as_written_in_help(capsys):
    for argv in (["--help"], ["probe", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        out = capsys.readouterr().out
        assert "95% intervals" in out and "%%" not in out
