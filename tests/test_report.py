"""`alignkit report`: numbers in the HTML and markdown equal summary.json, bad input names the file, and
the page renders in a real browser (headless Chromium) with its charts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from alignkit.config import ConfigError, field_docs, load
from alignkit.data import DataError
from alignkit.measure import report
from alignkit.measure.report import ReportConfig, format_rate, format_tick, nice_ticks, scale


def rate(k: int, n: int, low: float, high: float, corrected: dict | None = None) -> dict:
    return {"k": k, "n": n, "rate": k / n, "low": low, "high": high, "corrected": corrected}


def metrics(probes: int, hc=None, br=None, sf=None) -> dict:
    return {
        "probes": probes,
        "harmful_compliance": hc,
        "benign_refusal": br,
        "sycophancy_flip": sf,
        "mean_length": 80.5,
    }


# Three runs: "sft" has no label (the folder name stands in) and a null overall benign_refusal (so it has no
# point in the scatter); "multi_turn" is probed by "guarded" only, "sycophancy" by "base" only.
SUMMARIES = {
    "base": {
        "label": "base",
        "model": "default",
        "guard": None,
        "samples": 1,
        "temperature": 0.7,
        "judge": "refusal-regex",
        "created": "2026-11-28T01:00:00Z",
        "overall": metrics(124, rate(12, 84, 0.0837, 0.2327, {"rate": 0.15, "low": 0.08, "high": 0.25}),
                           rate(3, 40, 0.0258, 0.1990)),
        "families": {
            "plain": metrics(40, rate(2, 40, 0.0138, 0.1650)),
            "persona": metrics(44, rate(10, 44, 0.1286, 0.3677, {"rate": 0.2, "low": 0.1, "high": 0.3})),
            "benign": metrics(40, None, rate(3, 40, 0.0258, 0.1990)),
            "sycophancy": metrics(20, None, None, rate(6, 20, 0.1455, 0.5190)),
        },
    },
    "guarded": {
        "label": "guarded <kw> & co",  # escaped in the HTML, read back unescaped from the DOM
        "model": "default",
        "guard": "keyword",
        "samples": 3,
        "temperature": 0.7,
        "judge": "refusal-regex",
        "created": "2026-11-28T02:00:00Z",
        "overall": metrics(136, rate(3, 96, 0.0107, 0.0879), rate(9, 40, 0.1234, 0.3774)),
        "families": {
            "plain": metrics(40, rate(0, 40, 0.0, 0.0876)),
            "persona": metrics(44, rate(3, 44, 0.0234, 0.1817)),
            "benign": metrics(40, None, rate(9, 40, 0.1234, 0.3774)),
            "multi_turn": metrics(12, rate(0, 12, 0.0, 0.2425)),
        },
    },
    "sft": {
        "model": "runs/sft",
        "guard": None,
        "samples": 1,
        "temperature": 0.0,
        "judge": "refusal-regex",
        "created": "2026-11-28T03:00:00Z",
        "overall": metrics(84, rate(20, 84, 0.1593, 0.3377), None),
        "families": {"plain": metrics(40, rate(6, 40, 0.0706, 0.2914)), "persona": metrics(44, rate(14, 44, 0.2, 0.4651))},
    },
}  # fmt: skip


@pytest.fixture
def probe_runs(tmp_path) -> list[str]:
    folders = []
    for name, summary in SUMMARIES.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        folders.append(str(tmp_path / name))
    return folders


@pytest.fixture
def train_run(tmp_path) -> str:
    folder = tmp_path / "sft-train"
    folder.mkdir()
    lines = [{"step": 0, "before/eval/loss": 2.1, "data/train/examples": 57}]
    lines += [
        {"step": s, "train/loss": 2.0 - 0.1 * s, "lr": 1.0e-4, "kl/ref": float("nan")} for s in range(1, 6)
    ]
    lines += [{"step": 5, "eval/loss": 1.6, "note": "text is skipped"}, {"step": 10, "eval/loss": 1.5}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    return str(folder)


def expected_cells() -> dict[tuple[str, str, str], dict]:
    """(run label, family, metric) → RATE for every non-null rate in SUMMARIES."""
    cells = {}
    for folder, s in SUMMARIES.items():
        for fam, m in {"overall": s["overall"], **s["families"]}.items():
            for metric in ("harmful_compliance", "benign_refusal", "sycophancy_flip"):
                if m[metric] is not None:
                    cells[(s.get("label", folder), fam, metric)] = m[metric]
    return cells


# ---------------------------------------------------------------- pure helpers


def test_format_rate_golden():
    # 12/84 = 0.142857 → 14.3%; interval 0.0837 → 8.4, 0.2327 → 23.3
    assert format_rate({"rate": 12 / 84, "low": 0.0837, "high": 0.2327}) == "14.3% [8.4, 23.3]"
    assert format_rate({"rate": 0.0, "low": 0.0, "high": 0.0876}) == "0.0% [0.0, 8.8]"
    assert format_rate({"rate": 1.0, "low": 0.9, "high": 1.0}) == "100.0% [90.0, 100.0]"
    assert format_rate(None) == "–"


def test_nice_ticks_golden():
    # range 0.2327 / 5 = 0.0465 → next nice step 0.05; 0.2327 rounds up to 0.25
    assert nice_ticks(0, 0.2327) == [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]
    # range 0.65 / 5 = 0.13 → step 0.2; 1.2 is on the grid, 1.85 rounds up to 2.0
    assert nice_ticks(1.2, 1.85) == [1.2, 1.4, 1.6, 1.8, 2.0]
    # 100 / 4 = 25 → step 2.5 × 10
    assert nice_ticks(0, 100, 4) == [0.0, 25.0, 50.0, 75.0, 100.0]
    # a flat series is padded by 10%: [2.7, 3.3], 0.6 / 5 = 0.12 → step 0.2
    assert nice_ticks(3, 3) == [2.6, 2.8, 3.0, 3.2, 3.4]
    # learning rates: 1e-4 / 5 = 2e-5
    assert nice_ticks(0, 1e-4) == [0.0, 2e-5, 4e-5, 6e-5, 8e-5, 1e-4]
    assert nice_ticks(0, 0) == [-1.0, -0.5, 0.0, 0.5, 1.0]


def test_format_tick_golden():
    assert format_tick(0.15, 0.05) == "0.15"
    assert format_tick(20.0, 20.0) == "20"
    assert format_tick(1.0, 0.25) == "1.00"
    assert format_tick(12.5, 2.5) == "12.5"
    assert format_tick(7.5e-5, 2.5e-5) == "7.5e-5"
    assert format_tick(1e-4, 2e-5) == "1e-4"
    assert format_tick(0.0, 2e-5) == "0"


def test_scale_golden():
    assert scale(0.5, 0, 1, 0, 100) == 50
    assert scale(0.25, 0, 1, 300, 100) == 250  # SVG y grows downwards: 300 − 0.25 × 200
    assert scale(7, 3, 3, 10, 20) == 15  # empty range: the middle


def test_config_fields_documented_and_required():
    assert set(field_docs(ReportConfig)) == {"runs", "train", "output", "title"}
    cfg = load(ReportConfig, None, ["runs=[a,b]", "title=x"])
    assert cfg.runs == ["a", "b"] and cfg.train == [] and cfg.output == "report.html"
    with pytest.raises(ConfigError, match="runs is required"):
        load(ReportConfig, None, [])
    with pytest.raises(ConfigError, match="output"):
        load(ReportConfig, None, ["runs=a", "output=report.md"])


def test_load_curves_keeps_series_logged_twice(train_run):
    curves = report.load_curves([train_run])
    # once-logged keys (before/…, data counts) and all-NaN kl/ref are no curves; text is skipped
    assert sorted(curves) == ["eval/loss", "lr", "train/loss"]
    assert curves["eval/loss"] == {"sft-train": [(5, 1.6), (10, 1.5)]}
    assert curves["train/loss"]["sft-train"][0] == (1, 1.9)


# ---------------------------------------------------------------- the job


def test_run_writes_html_and_markdown(tmp_path, probe_runs, train_run):
    out = report.run(
        ReportConfig(runs=probe_runs, train=[train_run], output=str(tmp_path / "out" / "r.html"))
    )
    assert out == {"html": str(tmp_path / "out" / "r.html"), "markdown": str(tmp_path / "out" / "r.md")}
    html, md = Path(out["html"]).read_text(), Path(out["markdown"]).read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["r.html", "r.md"]  # no temp files left
    for (label, fam, _), r in expected_cells().items():
        assert f"{format_rate(r)} ({r['k']}/{r['n']}" in md, (label, fam)
    assert "| sft | runs/sft | none | 84 | 1 | 0.0 | refusal-regex |" in md  # label falls back to the folder
    assert (
        "Runs differ in size (probes × samples)" in md and "Runs differ in size" in html
    )  # 124, 136, 84 probes
    assert "| multi_turn | attack success | not probed | 0.0% [0.0, 24.2] (0/12) | not probed |" in md
    # a corrected rate is shown per family, never on the overall row (it pools families)
    assert "corrected 20.0% [10.0, 30.0]" in md and "corrected 15.0%" not in md and "r.html" in md
    # self-contained: no scripts, nothing fetched
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html and "guarded &lt;kw&gt; &amp; co" in html
    assert html.count("<svg") == 2 + 3  # bars, scatter, one chart per curve
    assert "before/eval/loss" not in html
    assert "Not shown (a rate is missing): sft." in html  # no overall over-refusal: no point in the scatter


def test_existing_report_replaced_atomically(tmp_path, probe_runs, monkeypatch):
    cfg = ReportConfig(runs=probe_runs, output=str(tmp_path / "r.html"))
    (tmp_path / "r.html").write_text("old")

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr("alignkit.data.os.replace", fail)
    with pytest.raises(OSError):
        report.run(cfg)
    assert (tmp_path / "r.html").read_text() == "old"  # the old report is intact, the temp file is gone
    assert [p.name for p in tmp_path.glob(".*tmp")] == []
    monkeypatch.undo()
    report.run(cfg)
    assert (tmp_path / "r.html").read_text().startswith("<!doctype html>")


MISTYPED = {**SUMMARIES["sft"], "families": {"plain": metrics(1, {**rate(1, 1, 0.2, 0.9), "high": "0.9"})}}
# case → (file written into tmp/bad and its text, or None; runs; train (folders under tmp); what the error says)
BAD_INPUT = {
    "missing-folder": (None, ["nope"], [], ["nope: probe run folder not found"]),
    "missing-summary": (None, ["bad"], [], ["bad/summary.json: file not found"]),
    "malformed-json": (("summary.json", '{"label": "x",\n  "overall": }'), ["bad"], [],
                       ["bad/summary.json, line 2: malformed JSON"]),
    "mistyped-rate": (("summary.json", json.dumps(MISTYPED)), ["bad"], [],
                      ["bad/summary.json, field 'families.plain.harmful_compliance.high': expected a number"]),
    "duplicate-label": (("summary.json", json.dumps(SUMMARIES["base"])), ["base", "bad"], [],
                        ["bad/summary.json, field 'label': 'base' is also the label of"]),
    "missing-metrics": (None, ["base"], ["bad"], ["bad/metrics.jsonl: file not found"]),
    "metrics-without-step": (("metrics.jsonl", '{"train/loss": 1.0}\n'), ["base"], ["bad"],
                             ["bad/metrics.jsonl, line 1, field 'step'"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_names_the_file_and_writes_nothing(tmp_path, probe_runs, case):
    bad_file, runs, train, says = BAD_INPUT[case]
    (tmp_path / "bad").mkdir()
    if bad_file:
        (tmp_path / "bad" / bad_file[0]).write_text(bad_file[1], encoding="utf-8")
    out = tmp_path / "out" / "r.html"
    cfg = ReportConfig(
        runs=[str(tmp_path / r) for r in runs], train=[str(tmp_path / t) for t in train], output=str(out)
    )
    with pytest.raises(DataError) as err:
        report.run(cfg)
    for text in says:
        assert text in str(err.value)
    assert not out.parent.exists()


# ---------------------------------------------------------------- in a real browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)


class MetricCells(HTMLParser):
    """Collects the attributes of every element carrying data-metric, and counts <svg> elements."""

    def __init__(self):
        super().__init__()
        self.cells, self.svgs = [], 0

    def handle_starttag(self, tag, attrs):
        self.svgs += tag == "svg"
        if "data-metric" in (a := dict(attrs)):
            self.cells.append(a)


def test_rendered_numbers_equal_summaries(tmp_path, probe_runs, train_run):
    if not shutil.which("chromium"):
        if os.environ.get("CI"):
            pytest.fail(
                "chromium is not installed; CI must run the rendering test (apt-get install chromium)"
            )
        pytest.skip("chromium is not installed")
    out = report.run(ReportConfig(runs=probe_runs, train=[train_run], output=str(tmp_path / "r.html")))
    page = Path(out["html"]).resolve().as_uri()
    dom = MetricCells()
    dom.feed(chromium(tmp_path, "--dump-dom", page).stdout)

    expected = expected_cells()
    seen = {}
    for a in dom.cells:
        key = (a["data-run"], a["data-family"], a["data-metric"])
        r = expected[key]  # a cell the summaries do not have is a KeyError
        for attr, field in (("data-value", "rate"), ("data-low", "low"), ("data-high", "high")):
            assert float(a[attr]) == pytest.approx(r[field], abs=1e-9), (key, attr)
        seen[key] = a
    assert set(seen) == set(expected) and len(dom.cells) == len(expected)
    assert dom.svgs >= 3

    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", page)
    assert shot.stat().st_size > 10_000
