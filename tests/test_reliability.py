"""Bounded memory and one job per output: the token cap on micro-batches, the memory check after the first
step, peak RSS in the metrics, no RSS growth across steps, and the output lock that dies with its process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import WORDS
from test_sft import FAST, assert_same_weights, sft_data, train_metrics, write_jsonl

from alignkit import cli
from alignkit.config import ConfigError, output_lock
from alignkit.train import loop
from alignkit.train.batching import token_split


def test_token_split_caps_rows_times_the_longest_row():
    lengths = [10, 9, 8, 3, 30, 2]
    # cap 20: [10, 9] is 2 × 10 = 20, and 8 would make 3 × 10; [8, 3] is 2 × 8 = 16; 30 is over the cap and
    # runs alone, and 2 can't join it (2 × 30)
    assert token_split([[0, 1, 2, 3], [4, 5]], lengths, 20) == [[0, 1], [2, 3], [4], [5]]
    assert token_split([[0, 1, 2, 3], [4, 5]], lengths, 0) == [[0, 1, 2, 3], [4, 5]]  # 0: no cap
    assert token_split([[3, 5]], lengths, 6) == [[3, 5]]  # 2 × 3 = 6 fits exactly


def fake_acc():
    return SimpleNamespace(num_processes=1, device="cpu", reduce=lambda t, op: t)


def test_check_memory_names_the_settings_to_lower(monkeypatch):
    task = SimpleNamespace(lengths=[100, 400, 50])
    settings = loop.TrainSettings(batch_size=4, micro_tokens=0)
    water = iter([1_100.0])  # the high-water mark after step 1: 100 MB over rss0 = 1,000 MB
    monkeypatch.setattr(loop, "high_water_mb", lambda: next(water))
    monkeypatch.setattr(loop.psutil, "virtual_memory", lambda: SimpleNamespace(available=250 * 2**20))
    # step 1 ran 400 padded tokens; the largest pass is 4 rows × 400 = 1,600 tokens: 4× → 300 MB more > 250
    with pytest.raises(ConfigError) as e:
        loop.check_memory(fake_acc(), task, settings, 1_000.0, padded=400)
    msg = str(e.value)
    assert "1,600 tokens" in msg and "300 MB more" in msg and "250 MB are free" in msg
    assert all(k in msg for k in ("train.micro_tokens", "train.batch_size", "gradient_checkpointing"))
    # with the cap at 800 tokens the largest pass is 800: 100 MB more fits in 250 MB
    water = iter([1_100.0])
    capped = loop.TrainSettings(batch_size=4, micro_tokens=800)
    loop.check_memory(fake_acc(), task, capped, 1_000.0, padded=400)
    loop.check_memory(
        fake_acc(), task, settings, None, padded=400
    )  # no high-water mark (not Linux): no check


def test_a_job_short_of_memory_stops_after_one_step_with_exit_2(tmp_path, tiny_model, monkeypatch, capsys):
    rows = [{"prompt": f"tell me about {i}", "completion": "water " * (2 + 40 * (i == 5))} for i in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    marks = iter([500.0, 600.0])  # reset, then after step 1: grew 100 MB
    monkeypatch.setattr(loop, "high_water_mb", lambda reset=False: next(marks))
    monkeypatch.setattr(loop.psutil, "virtual_memory", lambda: SimpleNamespace(available=2**20))
    out = tmp_path / "sft"
    args = ["sft", f"data={data}", f"model={tiny_model}", f"output_dir={out}", *FAST, "train.batch_size=1"]
    assert cli.main([*args, "train.micro_tokens=0", "train.eval_fraction=0"]) == 2
    assert "not enough memory" in capsys.readouterr().err
    assert not (out / "model.safetensors").exists() and not list(out.glob("checkpoints/step-*"))


def test_training_metrics_carry_peak_rss_and_rss_does_not_grow(tmp_path, tiny_model):
    """A fresh process (the peak is per process): 40 steps of identical shapes; after the first steps, the
    peak stays put. A step that kept a tensor alive (a loss with its graph, say) would raise it each step."""
    rows = [{"prompt": "tell me about water", "completion": "sure here is water " * 40} for _ in range(16)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "sft"
    args = [f"data={data}", f"model={tiny_model}", f"output_dir={out}", "train.precision=fp32", "lora.r=4"]
    args += ["train.batch_size=4", "train.max_steps=40", "train.eval_fraction=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "alignkit.cli", "sft", *args], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert "peak memory" in done.stderr.decode()
    peak = {s: m["perf/peak_rss_mb"] for s, m in train_metrics(out).items()}
    assert sorted(peak) == list(range(1, 41)) and peak[1] > 50
    assert peak[40] - peak[10] < 8, peak


def test_two_jobs_on_one_output_dir_the_second_refuses_until_the_first_dies(tmp_path, tiny_model, capsys):
    out = tmp_path / "sft"
    hold = "import sys, time\nfrom alignkit.config import output_lock\nwith output_lock(sys.argv[1]):\n"
    hold += "    print('held', flush=True)\n    time.sleep(120)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
        assert cli.main(["sft", f"data={data}", f"model={tiny_model}", f"output_dir={out}", *FAST]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another alignkit job (pid {holder.pid})" in err and not out.exists()
        with pytest.raises(ConfigError):  # the same folder by another spelling is the same lock
            with output_lock(str(tmp_path / "x" / ".." / "sft")):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with output_lock(str(out)):  # kill -9 released it
        pass


def alignkit(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "alignkit.cli", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, ready, delay: float) -> None:
    """SIGKILL `proc` `delay` seconds after `ready()` first holds (the job must not have ended by then)."""
    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the job never got there"
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the job ended before the kill"


def finish(*args: str) -> None:
    proc = alignkit(*args)
    assert proc.wait() == 0, proc.stderr.read()[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.3])  # at a checkpoint write, or steps after one
def test_sft_killed_9_resumes_to_the_same_bits(tmp_path, tiny_model, delay):
    data = sft_data(tmp_path)
    args = ["sft", f"data={data}", f"model={tiny_model}", *FAST, "train.max_steps=8", "train.save_every=2"]
    finish(*args, f"output_dir={tmp_path / 'whole'}")
    out = tmp_path / "killed"
    proc = alignkit(*args, f"output_dir={out}")
    kill_when(proc, lambda: (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()), delay)
    finish(*args, f"output_dir={out}", "train.resume=true")
    assert_same_weights(tmp_path / "whole", out, atol=0)
    drop = ("perf/tokens_per_s", "perf/peak_rss_mb")
    same = [{k: v for k, v in m.items() if k not in drop} for m in train_metrics(out).values()]
    assert same == [
        {k: v for k, v in m.items() if k not in drop} for m in train_metrics(tmp_path / "whole").values()
    ]


@pytest.mark.slow
@pytest.mark.parametrize("lines", [5])
def test_generate_killed_9_mid_append_resumes_to_the_same_records(tmp_path, tiny_model, lines):
    prompts = write_jsonl(
        tmp_path / "p.jsonl", [{"id": i, "prompt": f"tell me about {w}"} for i, w in enumerate(WORDS[:24])]
    )
    args = ["generate", f"input={prompts}", f"model={tiny_model}", "temperature=0", "max_new_tokens=24"]
    args += ["batch_size=1", "precision=fp32"]
    finish(*args, f"output={tmp_path / 'whole.jsonl'}")
    out = tmp_path / "killed.jsonl"
    proc = alignkit(*args, f"output={out}")
    kill_when(proc, lambda: out.exists() and out.read_bytes().count(b"\n") >= lines, 0.0)
    if lines == 5:  # and as if killed inside a write: the last line torn
        os.truncate(out, out.stat().st_size - 7)
    finish(*args, f"output={out}")
    read = lambda p: {r["id"]: r for r in map(json.loads, p.read_text().splitlines())}  # noqa: E731
    assert read(out) == read(tmp_path / "whole.jsonl") and len(read(out)) == 24


BAD_FILES = {  # job args (FILE: the bad file, OUT: the output), the file's text, what the error names
    "jsonl": ("sft data=FILE output_dir=OUT", '{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n', ["line 2", "prompt"]),
    "probe pack": ("probe --pack FILE output_dir=OUT", "probes:\n  - {id: a, family: plain}\n", ["FILE"]),
    "constitution": ("cai revise constitution=FILE output_dir=OUT policy=TINY", "version: 1\nprinciples: []\n", ["principles"]),
    "guard config": ("guard score --stage input --guard FILE --in IN --out OUT", "fail_closd: true\n", ["fail_closd"]),
    "rules file": ("guard score --stage input --guard GUARD --in IN --out OUT", "rules: [1, '']\n", ["rules"]),
    "recipe": ("run --config FILE output_dir=OUT", "sft:\n  train:\n    lrr: 1\n", ["sft.train.lrr"]),
    "override": ("sft data=IN output_dir=OUT train.lr=fast", "", ["train.lr"]),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_FILES)
def test_every_bad_input_is_one_error_naming_it_exit_2_and_nothing_written(
    tmp_path, tiny_model, case, capsys
):
    args, text, names = BAD_FILES[case]
    bad, out = tmp_path / ("bad.jsonl" if case == "jsonl" else "bad.yaml"), tmp_path / "out"
    bad.write_text(text)
    good = write_jsonl(tmp_path / "in.jsonl", [{"id": "1", "prompt": "hi", "completion": "there"}])
    guard = tmp_path / "guard.yaml"
    guard.write_text(f"rules_file: {bad}\npatterns: []\nchecks: []\n")
    subs = {"FILE": str(bad), "OUT": str(out), "IN": str(good), "GUARD": str(guard), "TINY": tiny_model}
    argv = [re.sub(r"\b(FILE|OUT|IN|GUARD|TINY)\b", lambda m: subs[m[1]], a) for a in args.split()]
    assert "OUT" not in " ".join(argv) and str(out) in " ".join(argv)
    if case in ("jsonl", "probe pack", "override"):
        argv.append(f"model={tiny_model}")
    assert cli.main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"alignkit {argv[0]}"), err
    assert all(n.replace("FILE", str(bad)) in err[0] for n in names), err[0]
    assert not out.exists()


@pytest.mark.slow
def test_probe_killed_9_mid_generation_resumes_to_the_same_results(tmp_path, tiny_model):
    args = ["probe", "--pack", "benign", f"model={tiny_model}", "temperature=0", "batch_size=1", "limit=16"]
    args += ["max_new_tokens=16", "precision=fp32", "judge.refusal=regex", "judge.harm=none"]
    finish(*args, f"output_dir={tmp_path / 'whole'}")
    out = tmp_path / "killed"
    proc = alignkit(*args, f"output_dir={out}")
    gens = out / "generations.jsonl"
    kill_when(proc, lambda: gens.exists() and gens.read_bytes().count(b"\n") >= 4, 0.0)
    assert not (out / "summary.json").exists()
    finish(*args, f"output_dir={out}")
    rows = lambda d: sorted(map(json.loads, (d / "results.jsonl").read_text().splitlines()), key=str)  # noqa: E731
    assert rows(out) == rows(tmp_path / "whole") and len(rows(out)) == 16
    summary = lambda d: json.loads((d / "summary.json").read_text())["families"]  # noqa: E731
    assert summary(out) == summary(tmp_path / "whole")


@pytest.mark.slow
def test_rm_ensemble_killed_9_in_its_second_member_resumes_to_the_same_bits(tmp_path, tiny_model, pairs_file):
    from safetensors.torch import load_file

    args = ["rm", "train", f"data={pairs_file}", f"model={tiny_model}", *FAST, "ensemble.size=2"]
    args += ["train.max_steps=6", "train.save_every=2"]
    finish(*args, f"output_dir={tmp_path / 'whole'}")
    out = tmp_path / "killed"
    proc = alignkit(*args, f"output_dir={out}")
    ckpts = out / "members" / "member-1" / "checkpoints"
    kill_when(proc, lambda: ckpts.exists() and any(ckpts.glob("step-*")), 0.0)
    assert (out / "members" / "member-0" / "done.json").exists() and not (out / "ensemble.json").exists()
    finish(*args, f"output_dir={out}", "train.resume=true")
    for k in (0, 1):
        a, b = (
            load_file(d / "members" / f"member-{k}" / "adapter_model.safetensors")
            for d in (tmp_path / "whole", out)
        )
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), k
    assert json.loads((out / "ensemble.json").read_text())["members"] == [
        "members/member-0",
        "members/member-1",
    ]
