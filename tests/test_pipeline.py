"""`alignkit run`: the smoke recipe end to end, kill -9 and resume, cache keys, recipe validation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_report import chromium

from alignkit import config as cfglib
from alignkit.config import ConfigError
from alignkit.pipeline import STAGES, RunConfig, stage_keys

RUN = [sys.executable, "-m", "alignkit.cli", "run", "preset=smoke"]


def alignkit_run(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = (out.parent / f"{out.name}.log").open("a")
    return subprocess.Popen(
        [*RUN, f"output_dir={out}", *extra], stdout=log, stderr=subprocess.STDOUT, env=env
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "smoke"
    assert alignkit_run(out).wait(timeout=600) == 0, (out.parent / "smoke.log").read_text()[-3000:]
    return out


def test_smoke_writes_every_stage_and_the_report(smoke_run):
    for stage in STAGES:
        done = json.loads((smoke_run / stage / "done.json").read_text())
        assert done["stage"] == stage and done["seconds"] >= 0
    for name in ("report.html", "report.md", "summary.json", "summary.txt"):
        assert (smoke_run / "report" / name).stat().st_size > 200
    for probe_run in ("base", "base+guard"):
        assert (smoke_run / "baseline" / probe_run / "summary.json").is_file()
    for probe_run in ("sl-cai", "sl-cai+guard", "rl-cai", "rl-cai+guard"):
        assert (smoke_run / "final" / probe_run / "summary.json").is_file()
    summary = json.loads((smoke_run / "report" / "summary.json").read_text())
    assert [r["metric"].split(",")[0] for r in summary["headline"]] == [
        "harmful compliance", "jailbreak success", "benign + edgy refused", "sycophancy flips",
        "helpfulness NLL (held-out ShareGPT answers)",
    ]  # fmt: skip
    text = (smoke_run / "report" / "summary.txt").read_text()
    assert "report.html" in text and "labeller:" in text and "{" not in text  # words, not a JSON dump
    recorded = cfglib.load(RunConfig, smoke_run / "job_config.yaml")  # the whole resolved recipe
    assert recorded.data.revise_prompts == 4 and recorded.model == "tiny"


def test_rerun_skips_every_done_stage(smoke_run, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(smoke_run, out)
    assert alignkit_run(out).wait(timeout=300) == 0
    log = (tmp_path / "again.log").read_text()
    assert log.count("skipped") == len(STAGES), log[-2000:]


class Page(HTMLParser):
    """Text of the rendered page, its h2 headings and its bar-chart rectangles."""

    def __init__(self):
        super().__init__()
        self.text, self.h2, self.rects, self._in_h2 = [], [], 0, False

    def handle_starttag(self, tag, attrs):
        self._in_h2 |= tag == "h2"
        self.rects += tag == "rect"

    def handle_endtag(self, tag):
        self._in_h2 &= tag != "h2"

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self.h2.append(data)


def test_report_stands_on_its_own_in_a_browser(smoke_run, tmp_path):
    if not shutil.which("chromium"):
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; CI must run the rendering test")
        pytest.skip("chromium is not installed")
    page = Page()
    page.feed(chromium(tmp_path, "--dump-dom", (smoke_run / "report" / "report.html").as_uri()).stdout)
    text = " ".join(page.text)
    for heading in ("What changed", "The labeller", "Reward hacking monitors", "Answers before and after",
                    "Stages", "Runs", "Rates by family", "Judges", "Attack success by family",
                    "Over-refusal vs attack success", "Training curves"):  # fmt: skip
        assert heading in page.h2, heading
    assert "'Corrected' is the same rate after removing the judge's own measured errors" in text
    assert "sensitivity" in text and "specificity" in text  # the judges' measured weakness is on the page
    runs = [json.loads(p.read_text()) for p in smoke_run.glob("*/*/summary.json")]
    sizes = {(r["overall"]["probes"], r["samples"]) for r in runs}
    assert ("Runs differ in size" in text) == (len(sizes) > 1)
    # every (family, run) with harmful probes has a bar, a measured 0% included
    bars = sum(
        bool(m.get("harmful_compliance")) for r in runs for m in [r["overall"], *r["families"].values()]
    )
    assert page.rects == bars
    for row in json.loads((smoke_run / "report" / "summary.json").read_text())["headline"]:
        assert row["verdict"] in text


def test_kill_9_mid_stage_then_rerun_gives_the_same_summary(smoke_run, tmp_path):
    out = tmp_path / "killed"
    proc = alignkit_run(out)
    deadline = time.monotonic() + 300
    while not (out / "final").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final" / "done.json").exists() and (out / "ppo" / "done.json").exists()
    assert alignkit_run(out).wait(timeout=300) == 0
    got, want = (json.loads((d / "report" / "summary.json").read_text()) for d in (out, smoke_run))
    assert got["headline"] == want["headline"]


def keys_with(*overrides: str) -> dict[str, str]:
    return stage_keys(cfglib.load(RunConfig, None, ["preset=smoke", "output_dir=runs/x", *overrides]))


@pytest.mark.parametrize(
    ("override", "first_changed"),
    [("ppo.steps=3", "ppo"), ("revise.rounds=2", "revise"), ("rm.train.lr=0.002", "rm"),
     ("data.heldout=9", "data"), ("label.max_new_tokens=9", "label")],
)  # fmt: skip
def test_a_changed_key_invalidates_exactly_the_stages_from_its_own(override, first_changed):
    before, after = keys_with(), keys_with(override)
    i = STAGES.index(first_changed)
    assert all(before[s] == after[s] for s in STAGES[:i])
    assert all(before[s] != after[s] for s in STAGES[i:])


def test_keys_do_not_depend_on_where_the_run_folder_is():
    a = stage_keys(cfglib.load(RunConfig, None, ["preset=smoke", "output_dir=/tmp/a"]))
    assert a == stage_keys(cfglib.load(RunConfig, None, ["preset=smoke", "output_dir=/elsewhere/b"]))


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["sft.train.lrr=1"], "unknown key 'sft.train.lrr'"),
        (["ppo.kl.targett=1"], "unknown key 'ppo.kl.targett'"),
        (["bogus=1"], "unknown key 'bogus'"),
        (["data.revise=1"], "unknown key 'data.revise'"),
        (["sft.data=x.jsonl"], "sft.data: set by the pipeline"),
        (["rm_tiers=[ethics,helpfulness]"], "rm_tiers: 'ethics' has no labels"),
        (["from_stage=nope"], "from_stage: 'nope' is not a stage"),
        (["preset=nope"], "preset: 'nope' is neither a shipped recipe"),
        (["probe.limit=x"], "probe.limit: expected an integer"),
        (["revise.rounds=9"], "rounds must be 1–4"),
    ],
)
def test_recipe_errors_name_the_key(overrides, says):
    base = ["preset=smoke"] if not any(o.startswith("preset=") for o in overrides) else []
    with pytest.raises(ConfigError) as err:
        cfglib.load(RunConfig, None, [*base, *overrides])
    assert says in str(err.value)


def test_cli_exits_2_on_a_bad_recipe_key_and_writes_nothing(tmp_path):
    out = tmp_path / "bad"
    proc = subprocess.run([*RUN, f"output_dir={out}", "sft.train.lrr=1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "sft.train.lrr" in proc.stderr and not out.exists()


@pytest.mark.parametrize("preset", ["laptop", "cluster"])
def test_shipped_recipes_load_and_validate(preset):
    cfg = cfglib.load(RunConfig, None, [f"preset={preset}"])
    assert set(cfg.jobs) == set(STAGES) and len(stage_keys(cfg)) == len(STAGES)
