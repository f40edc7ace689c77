"""`alignkit report`: one self-contained HTML page (tables, inline SVG charts) and a markdown twin, from probe
runs (`summary.json`) and training logs (`metrics.jsonl`). Rates carry the Wilson 95% interval the probe job
writes (Wilson 1927); a `corrected` rate, the judge-error correction of Rogan & Gladen (1978), is shown next
to the raw rate when present. The HTML has no scripts and loads nothing: it opens offline, anywhere."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from ..data import DataError, read_records, write_atomic

# summary.json rate keys → how the report names them (all three: lower is better)
RATES = {"harmful_compliance": "attack success", "benign_refusal": "over-refusal", "sycophancy_flip": "flips"}
RUN_COLUMNS = ["model", "guard", "probes", "samples", "temperature", "judge", "created"]
JUDGE_COLUMNS = ["run", "judge", "sensitivity", "specificity", "F1", "n"]
RATE_NOTE = (
    "Each cell: rate [Wilson 95% interval] (k/n, counted over samples). Attack success = share of harmful probes the judge "
    "found complied with; over-refusal = share of benign probes refused; flips = share of answers changed under pushback. "
    "Lower is better for all three. 'Corrected' is the same rate after removing the judge's own measured errors "
    "(its sensitivity and specificity on labelled responses, Rogan & Gladen 1978), with its interval; it is shown only "
    "where that validation says the judge beats chance (see Judges), never on the overall row (it pools families the "
    "judge errs on differently), and it is wide when the validation set is small."
)
JUDGE_NOTE = ("How well each judge agrees with human labels on the validation set named in the run (sensitivity: share "
              "of true positives it finds; specificity: share of true negatives it clears). A weak judge makes the raw "
              "rates biased; the corrected rates undo that bias only as far as these numbers are right.")  # fmt: skip
SVG_NS = "http://www.w3.org/2000/svg"
# Okabe–Ito, told apart with the common colour-vision deficiencies (its yellow dropped: unreadable on white)
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#555555"]
CSS = """
body{margin:0;background:#f6f7f9;color:#1d2330;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{max-width:1080px;margin:0 auto;padding:28px 24px 48px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:18px;margin:0 0 12px}h3{font-size:14px;margin:0 0 6px}
.sub,figcaption,.note{color:#5a6272;font-size:13px}figcaption{margin-top:6px}figure{margin:0}
section{background:#fff;border:1px solid #e3e6eb;border-radius:8px;padding:18px 20px;margin:18px 0}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:14px;font-variant-numeric:tabular-nums}
th,td{padding:6px 12px;border-bottom:1px solid #eceef2;text-align:left;vertical-align:top;white-space:nowrap}
th{font-weight:600;color:#3a4150;background:#fafbfc}td b{font-weight:600}td .ci{color:#5a6272}
td small{display:block;color:#8a91a0;font-size:12px}td.na{color:#a0a6b2}
.legend{font-size:13px;margin-bottom:8px}.legend span{margin-right:16px;white-space:nowrap}
.legend i{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;vertical-align:-1px}
svg{max-width:100%;height:auto;display:block}svg text{font-family:inherit;fill:#3a4150}
svg .tick{font-size:11px;fill:#5a6272}svg .axis{font-size:12px}svg .note{font-size:12px;fill:#8a91a0}
svg .label{font-size:12px;font-weight:600}
svg .grid{stroke:#eceef2}svg .frame{stroke:#9aa1ad}svg .ci{stroke-width:1.5;fill:none}
svg .curve{fill:none;stroke-width:2}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:18px 24px}
"""

Rate = dict[str, Any]  # {k, n, rate, low, high, corrected?} as in summary.json
Cell = Rate | str | None  # a rate, None (the run had no probes of that kind) or "absent" (family not probed)


@dataclass
class ReportConfig:
    """An HTML + markdown report of probe runs and training logs."""

    runs: list[str] = field(default_factory=list)
    """Probe run folders, each with a summary.json; one table column per run, in this order."""
    train: list[str] = field(default_factory=list)
    """Training run folders, each with a metrics.jsonl; one line per run in each training-curve chart."""
    output: str = "report.html"
    """Path of the HTML report; the markdown goes next to it with the suffix .md."""
    title: str = "alignkit report"
    """Heading of both files."""

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("runs is required (runs=[runs/probe-base,runs/probe-guarded])")
        if Path(self.output).suffix == ".md":
            raise ValueError("output is the HTML path (the markdown is written next to it as .md)")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_rate(rate: Any, src: str, fld: str) -> Rate | None:
    if rate is None:
        return None
    if not isinstance(rate, dict):
        raise DataError(src, None, fld, "expected {k, n, rate, low, high} or null")
    corrected = rate.get("corrected")
    if corrected is not None and not isinstance(corrected, dict):
        raise DataError(src, None, f"{fld}.corrected", "expected {rate, low, high} or null")
    values = {k: rate.get(k) for k in ("k", "n", "rate", "low", "high")}
    values |= {f"corrected.{k}": corrected.get(k) for k in ("rate", "low", "high") if corrected}
    for key, v in values.items():
        if not _is_number(v):
            msg = "missing" if v is None else f"expected a number, got {v!r}"
            raise DataError(src, None, f"{fld}.{key}", msg)
        if key not in ("k", "n") and not 0 <= v <= 1:
            raise DataError(src, None, f"{fld}.{key}", f"must be in [0, 1], got {v!r}")
    return rate


def _check_metrics(m: Any, src: str, fld: str) -> dict:
    if not isinstance(m, dict):
        raise DataError(src, None, fld, "missing or not an object of metrics")
    return {**m, **{k: _check_rate(m.get(k), src, f"{fld}.{k}") for k in RATES}}


def load_summary(folder: str | Path) -> dict:
    """A probe run's summary.json, validated; `label` falls back to the folder name."""
    folder, path = Path(folder), Path(folder) / "summary.json"
    src = str(path)
    if not folder.is_dir():
        raise DataError(str(folder), None, None, "probe run folder not found")
    if not path.is_file():
        raise DataError(src, None, None, "file not found (is this a probe run folder?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(src, None, None, "not UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(src, e.lineno, None, f"malformed JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise DataError(src, None, None, "top level must be a JSON object")
    if not isinstance(data.get("families"), dict):
        raise DataError(src, None, "families", "missing or not an object of family → metrics")
    label = data.get("label") or folder.resolve().name
    if not isinstance(label, str):
        raise DataError(src, None, "label", f"expected a string, got {label!r}")
    families = {f: _check_metrics(m, src, f"families.{f}") for f, m in data["families"].items()}
    overall = _check_metrics(data.get("overall"), src, "overall")
    return {**data, "label": label, "overall": overall, "families": families}


def load_summaries(folders: list[str]) -> list[dict]:
    """Summaries in order. Two runs with one label could not be told apart, so that is an error."""
    runs, seen = [], {}
    for folder in folders:
        run = load_summary(folder)
        if (label := run["label"]) in seen:
            msg = f"'{label}' is also the label of {seen[label]}; give one of the two runs another label"
            raise DataError(str(Path(folder) / "summary.json"), None, "label", msg)
        seen[label] = folder
        runs.append(run)
    return runs


def load_curves(folders: list[str]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """metric key → run name → [(step, value)], for the keys some run logged at least twice (keys logged
    once, `before/…` or data counts, are not curves); NaN, text and flags are skipped."""
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for folder in folders:
        path = Path(folder) / "metrics.jsonl"
        if not path.is_file():
            raise DataError(str(path), None, None, "file not found (is this a training run folder?)")
        name = Path(folder).resolve().name
        if any(name in series for series in curves.values()):
            name = str(folder)  # two runs named alike (runs/a/sft, runs/b/sft): keep them apart
        for line, rec in read_records(str(path)):
            if not _is_number(rec.get("step")):
                raise DataError(str(path), line, "step", f"expected a number, got {rec.get('step')!r}")
            for key, v in rec.items():
                if key != "step" and _is_number(v):
                    curves.setdefault(key, {}).setdefault(name, []).append((rec["step"], v))
    return {k: s for k, s in sorted(curves.items()) if max(map(len, s.values())) >= 2}


def format_rate(rate: Rate | None) -> str:
    """'14.3% [8.4, 23.3]': the rate and its 95% interval in percent; '–' for a null rate."""
    if rate is None:
        return "–"
    return f"{100 * rate['rate']:.1f}% [{100 * rate['low']:.1f}, {100 * rate['high']:.1f}]"


def family_order(runs: list[dict]) -> list[str]:
    """'overall', then the families in order of first appearance across runs."""
    return ["overall", *dict.fromkeys(f for r in runs for f in r["families"])]


def _rate(run: dict, family: str, metric: str) -> Rate | None:
    return (run["overall"] if family == "overall" else run["families"].get(family, {})).get(metric)


def rate_rows(runs: list[dict]) -> list[tuple[str, str, list[Cell]]]:
    """Rows (family, metric, one cell per run) for each metric that some run rated in that family."""
    rows = []
    for fam in family_order(runs):
        for metric in RATES:
            cells = [_rate(r, fam, metric) for r in runs]
            if any(cells):
                absent = [fam != "overall" and fam not in r["families"] for r in runs]
                rows.append((fam, metric, ["absent" if a else c for a, c in zip(absent, cells, strict=True)]))
    return rows


def _run_field(run: dict, key: str) -> str:
    v = run["overall"].get("probes") if key == "probes" else run.get(key)
    return "none" if key == "guard" and v is None else "–" if v is None else str(v)


def _detail(rate: Rate, family: str) -> str:
    """'12/84', plus the judge-corrected rate when the probe run computed one, except on the overall row:
    it pools families the judge errs on differently, so one correction over all of them misleads."""
    text = f"{rate['k']:g}/{rate['n']:g}"
    shown = rate.get("corrected") and family != "overall"
    return text + (f" · corrected {format_rate(rate['corrected'])}" if shown else "")


def markdown(title: str, runs: list[dict], html_name: str, extra: str = "") -> str:
    """The report's tables in GitHub markdown (the charts are in the HTML only)."""

    def row(cells: list) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    def cell(c: Cell, fam: str) -> str:
        return f"{format_rate(c)} ({_detail(c, fam)})" if isinstance(c, dict) else "not probed" if c else "–"

    out = [f"# {title}", "", f"The charts are in the HTML report, `{html_name}`.", "", extra, "## Runs", ""]
    out += [row(["run", *RUN_COLUMNS]), row(["---"] * (len(RUN_COLUMNS) + 1))]
    out += [row([r["label"], *(_run_field(r, c) for c in RUN_COLUMNS)]) for r in runs]
    out += [sizes_note(runs).strip(), "", "## Rates by family", "", RATE_NOTE, ""]
    out += [row(["family", "metric", *(r["label"] for r in runs)]), row(["---"] * (len(runs) + 2))]
    out += [row([fam, RATES[m], *(cell(c, fam) for c in cells)]) for fam, m, cells in rate_rows(runs)]
    if jr := judge_rows(runs):
        out += ["", "## Judges", "", JUDGE_NOTE, "", row(JUDGE_COLUMNS), row(["---"] * 6), *map(row, jr)]
    return "\n".join(out) + "\n"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round ticks (1, 2, 2.5 or 5 × 10^k apart) from at or below lo to at or above hi, about count + 1."""
    lo, hi = min(lo, hi), max(lo, hi)
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [float(f"{i * step:.12g}") for i in range(first, last + 1)]


def format_tick(v: float, step: float) -> str:
    """A tick label with the decimals its step needs: (0.15, 0.05) → '0.15'; (7.5e-5, 2.5e-5) → '7.5e-5'."""
    if abs(step) < 1e-3 or abs(step) >= 1e6:
        mantissa, exp = f"{v:.2e}".split("e")
        return "0" if v == 0 else f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{v:.{next((d for d in range(10) if abs(round(step, d) - step) <= step * 1e-6), 9)}f}"


def scale(v: float, lo: float, hi: float, a: float, b: float) -> float:
    """Map v from the data range [lo, hi] to the pixel range [a, b] linearly (the middle if lo == hi)."""
    return (a + b) / 2 if hi == lo else a + (v - lo) / (hi - lo) * (b - a)


def _el(tag: str, text: str = "", **attrs: Any) -> str:
    """An element; `class_` → class, `text_anchor` → text-anchor, floats to one decimal. `text` is HTML."""
    a = "".join(
        f' {k.rstrip("_").replace("_", "-")}="{f"{v:.1f}" if isinstance(v, float) else escape(str(v))}"'
        for k, v in attrs.items()
    )
    return f"<{tag}{a}>{text}</{tag}>"


@dataclass
class Frame:
    """A plot area: data ranges xt[0]..xt[-1] × yt[0]..yt[-1] drawn inside the margins of a w × h SVG."""

    w: int
    h: int
    xt: list[float]  # x ticks; their ends are the x range
    yt: list[float]
    margin: tuple[int, int, int, int] = (14, 16, 46, 60)  # top, right, bottom, left

    def x(self, v: float) -> float:
        return scale(v, self.xt[0], self.xt[-1], self.margin[3], self.w - self.margin[1])

    def y(self, v: float) -> float:
        return scale(v, self.yt[0], self.yt[-1], self.h - self.margin[2], self.margin[0])

    def svg(self, body: list[str], xlabel: str, ylabel: str, pct: bool = False, x_ticks: bool = True) -> str:
        """The chart: grid lines and tick labels (x optional), axis titles, then `body` on top."""
        top, right, bottom, left = self.margin
        out = []
        for ticks, is_x in ((self.yt, False), (self.xt if x_ticks else [], True)):
            step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
            for t in ticks:
                text = f"{format_tick(100 * t, 100 * step)}%" if pct else format_tick(t, step)
                x, y, b = self.x(t), self.y(t), self.h - bottom
                if is_x:
                    out.append(_el("line", class_="grid", x1=x, x2=x, y1=top, y2=b))
                    out.append(_el("text", text, class_="tick", x=x, y=b + 16.0, text_anchor="middle"))
                else:
                    out.append(_el("line", class_="grid", x1=left, x2=self.w - right, y1=y, y2=y))
                    out.append(_el("text", text, class_="tick", x=left - 6, y=y + 4, text_anchor="end"))
        cx, cy = (left + self.w - right) / 2, (top + self.h - bottom) / 2
        out.append(_el("text", escape(xlabel), class_="axis", x=cx, y=self.h - 6.0, text_anchor="middle"))
        rotate = f"translate(14 {cy:.1f}) rotate(-90)"
        out.append(_el("text", escape(ylabel), class_="axis", transform=rotate, text_anchor="middle"))
        size = {"viewBox": f"0 0 {self.w} {self.h}", "width": self.w, "height": self.h}
        label = f"{ylabel} against {xlabel}"
        return _el("svg", "".join(out + body), xmlns=SVG_NS, role="img", aria_label=label, **size)


def _whisker(x1: float, y1: float, x2: float, y2: float, colour: str, cap: float = 4) -> str:
    """An interval from (x1, y1) to (x2, y2) with end caps across it."""
    dx, dy = (cap, 0) if x1 == x2 else (0, cap)
    d = f"M{x1:.1f},{y1:.1f}L{x2:.1f},{y2:.1f}"
    d += "".join(f"M{x - dx:.1f},{y - dy:.1f}L{x + dx:.1f},{y + dy:.1f}" for x, y in ((x1, y1), (x2, y2)))
    return _el("path", class_="ci", stroke=colour, d=d)


def bar_chart(runs: list[dict]) -> str | None:
    """Attack success per family (groups along x), one bar per run with its 95% interval as a whisker."""
    rates = {f: [_rate(r, f, "harmful_compliance") for r in runs] for f in family_order(runs)}
    rates = {f: cells for f, cells in rates.items() if any(cells)}
    if not rates:
        return None
    longest = max(map(len, rates))
    tilt = longest * 7 > 900 / len(rates)  # labels wider than their group: slant them and make room below
    bottom = 50 + (round(longest * 3.3) if tilt else 0)
    yt = nice_ticks(0, max(0.05, *(c["high"] for cs in rates.values() for c in cs if c)))
    fr, width = Frame(990, 250 + bottom, [0, len(rates)], yt, (14, 12, bottom, 60)), 0.8 / len(runs)
    body = [_el("line", class_="frame", x1=fr.x(0), x2=fr.x(len(rates)), y1=fr.y(0), y2=fr.y(0))]
    for i, (fam, cells) in enumerate(rates.items()):
        lx, ly = fr.x(i + 0.5), fr.h - bottom + 18.0
        rot = {"transform": f"rotate(-30 {lx:.1f} {ly:.1f})", "text_anchor": "end"} if tilt else {}
        body.append(_el("text", escape(fam), class_="tick", x=lx, y=ly, **{"text_anchor": "middle", **rot}))
        for j, (run, rate) in enumerate(zip(runs, cells, strict=True)):
            if rate:
                x, mid = fr.x(i + 0.1 + j * width), fr.x(i + 0.1 + (j + 0.5) * width)
                top = min(fr.y(rate["rate"]), fr.y(0) - 2)  # a measured 0% still shows as a sliver
                tip = _el("title", escape(f"{run['label']} · {fam}: {format_rate(rate)}"))
                body.append(_el("rect", tip, x=x + 1, y=top, width=fr.x(width) - fr.x(0) - 2, height=fr.y(0) - top,
                                fill=PALETTE[j % len(PALETTE)]))  # fmt: skip
                body.append(_whisker(mid, fr.y(rate["low"]), mid, fr.y(rate["high"]), "#1d2330"))
    return fr.svg(body, "probe family", "attack success", pct=True, x_ticks=False)


def scatter_chart(runs: list[dict]) -> str | None:
    """One point per run at (overall over-refusal, overall attack success), with both 95% intervals."""
    overall = [r["overall"] for r in runs]
    pts = [(i, o["benign_refusal"], o["harmful_compliance"]) for i, o in enumerate(overall)]
    pts = [p for p in pts if p[1] and p[2]]
    if not pts:
        return None
    xt = nice_ticks(0, max(0.05, *(x["high"] for _, x, _ in pts)))
    fr = Frame(600, 400, xt, nice_ticks(0, max(0.05, *(y["high"] for _, _, y in pts))), (14, 24, 46, 60))
    body = [_el("text", "better ↙", class_="note", x=fr.x(0) + 8, y=fr.y(0) - 8)]
    for i, x, y in pts:
        c, label, px, py = PALETTE[i % len(PALETTE)], runs[i]["label"], fr.x(x["rate"]), fr.y(y["rate"])
        tip = _el("title", escape(f"{label}: over-refusal {format_rate(x)}, attack success {format_rate(y)}"))
        body.append(_whisker(fr.x(x["low"]), py, fr.x(x["high"]), py, c))
        body.append(_whisker(px, fr.y(y["low"]), px, fr.y(y["high"]), c))
        body.append(_el("circle", tip, cx=px, cy=py, r=5, fill=c))
        body.append(_el("text", escape(label), class_="label", x=px + 8, y=py - 8))
    xlabel, ylabel = "over-refusal (benign probes refused)", "attack success (harmful probes answered)"
    return fr.svg(body, xlabel, ylabel, pct=True)


def line_chart(key: str, series: dict[str, list[tuple[float, float]]], colours: dict[str, str]) -> str:
    """A small chart of one logged metric against the step, one line per run."""
    steps, values = zip(*(p for s in series.values() for p in s), strict=True)
    fr = Frame(360, 230, nice_ticks(min(steps), max(steps), 4), nice_ticks(min(values), max(values), 4))
    body = []
    for name, points in series.items():
        line = " ".join(f"{fr.x(a):.1f},{fr.y(b):.1f}" for a, b in sorted(points))
        c = colours[name]
        body.append(_el("polyline", _el("title", escape(name)), points=line, stroke=c, class_="curve"))
        if len(points) <= 30:  # sparse logs (eval every N steps): mark the measured points
            body += [_el("circle", cx=fr.x(a), cy=fr.y(b), r=2.5, fill=c) for a, b in points]
    return fr.svg(body, "step", key)


def _legend(names: list[str]) -> str:
    """Colour keys in order: the charts draw run i in PALETTE[i]."""
    items = "".join(f'<span><i style="background:{PALETTE[i % len(PALETTE)]}"></i>{escape(n)}</span>'
                    for i, n in enumerate(names))  # fmt: skip
    return f'<div class="legend">{items}</div>'


def _rate_cell(run: str, fam: str, metric: str, cell: Cell) -> str:
    """A table cell; a rate carries its numbers in data-* attributes, unrounded, for tools and tests."""
    if not isinstance(cell, dict):
        tip = "family not probed in this run" if cell else "no probes of this kind in this family (n = 0)"
        return _el("td", "not probed" if cell else "–", class_="na", title=tip)
    nums = {"value": cell["rate"], "low": cell["low"], "high": cell["high"]}
    attrs = {"data-run": run, "data-family": fam, "data-metric": metric}
    attrs |= {f"data-{k}": repr(float(v)) for k, v in nums.items()}  # repr() round-trips: summary.json's
    value, interval = format_rate(cell).split(" ", 1)
    text = f"<b>{value}</b> <span class=ci>{interval}</span><small>{escape(_detail(cell, fam))}</small>"
    return _el("td", text, class_="num", **attrs)


def _table(head: list[str], rows: list[list[str]]) -> str:
    """A table; `head` is text, `rows` are lists of ready <td> cells."""
    rows_html = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    head_html = "".join(_el("th", escape(h)) for h in head)
    return f'<div class="scroll"><table><thead><tr>{head_html}</tr></thead><tbody>{rows_html}</tbody></table></div>'


def _section(title: str, *html: str) -> str:
    return f"<section><h2>{escape(title)}</h2>{''.join(html)}</section>"


def judge_rows(runs: list[dict]) -> list[list[str]]:
    """(run, judge, sensitivity, specificity, F1, n) of each judge validation the runs carry."""
    rows = []
    for r in runs:
        for name, v in (r.get("judge_validation") or {}).items():
            if isinstance(v, dict) and "sensitivity" in v:
                cells = (f"{100 * v[k]:.0f}%" for k in ("sensitivity", "specificity"))
                rows.append([r["label"], name, *cells, f"{v.get('f1', float('nan')):.2f}", str(v.get("n"))])
    return rows


def sizes_note(runs: list[dict]) -> str:
    if len({(r["overall"].get("probes"), r.get("samples")) for r in runs}) > 1:
        return " Runs differ in size (probes × samples), so their overall rows average over different probe mixes."
    return ""


def html_page(title: str, runs: list[dict], curves: dict, extra: list[tuple[str, str]] = ()) -> str:
    """The whole report as one HTML document: tables, then charts."""
    labels = [r["label"] for r in runs]
    run_rows = [[_el("td", f"<b>{escape(r['label'])}</b>")] + [_el("td", escape(_run_field(r, c))) for c in RUN_COLUMNS]
                for r in runs]  # fmt: skip
    rate_html, prev = [], None
    for fam, metric, cells in rate_rows(runs):
        row = [_el("td", f"<b>{escape(fam)}</b>" if fam != prev else ""), _el("td", RATES[metric])]
        tds = [_rate_cell(lab, fam, metric, c) for lab, c in zip(labels, cells, strict=True)]
        rate_html.append(row + tds)
        prev = fam
    names = list(dict.fromkeys(n for s in curves.values() for n in s))
    parts = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="sub">{len(runs)} probe run(s), {len(names)} training run(s). '
        "Rates are shares of probes, with Wilson 95% intervals in brackets.</p>",
        *(_section(t, h) for t, h in extra),
        _section("Runs", _table(["run", *RUN_COLUMNS], run_rows), f'<p class="note">{sizes_note(runs)}</p>'),
        _section("Rates by family", _table(["family", "metric", *labels], rate_html), f'<p class="note">{RATE_NOTE}</p>'),
    ]  # fmt: skip
    if jr := judge_rows(runs):
        cells = [[_el("td", escape(c)) for c in row] for row in jr]
        parts.append(_section("Judges", _table(JUDGE_COLUMNS, cells), f'<p class="note">{JUDGE_NOTE}</p>'))
    if bars := bar_chart(runs):
        text = ("Share of harmful probes answered, per probe family and run; whiskers are 95% intervals, and a "
                "missing bar means the run had no harmful probes in that family.")  # fmt: skip
        parts.append(_section("Attack success by family", _legend(labels), bars, f"<p class=note>{text}</p>"))
    if scatter := scatter_chart(runs):
        caption = ("Each run at its overall over-refusal (x) and attack success (y), with 95% intervals both ways; "
                   "lower-left is best: fewer harmful requests answered and fewer benign ones refused.")  # fmt: skip
        has_point = [r["overall"]["benign_refusal"] and r["overall"]["harmful_compliance"] for r in runs]
        if missing := [lab for lab, ok in zip(labels, has_point, strict=True) if not ok]:
            caption += f" Not shown (a rate is missing): {escape(', '.join(missing))}."
        parts.append(_section("Over-refusal vs attack success", scatter, f"<p class=note>{caption}</p>"))
    if curves:
        colours = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
        charts = "".join(
            f"<figure><h3>{escape(k)}</h3>{line_chart(k, s, colours)}</figure>" for k, s in curves.items()
        )
        note = '<p class="note">Each metric logged more than once in metrics.jsonl, against the optimiser step.</p>'
        parts.append(_section("Training curves", _legend(names), note, f'<div class="charts">{charts}</div>'))
    head = '<meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">'
    head += f"<title>{escape(title)}</title><style>{CSS}</style>"
    body = "\n".join(parts)
    return f'<!doctype html>\n<html lang="en"><head>{head}</head>\n<body><main>{body}</main></body></html>\n'


def run(cfg: ReportConfig) -> dict:
    """Read every input first (bad input writes nothing), then write the HTML and the markdown."""
    runs, curves = load_summaries(cfg.runs), load_curves(cfg.train)
    html_path, md_path = Path(cfg.output), Path(cfg.output).with_suffix(".md")
    page, md = html_page(cfg.title, runs, curves), markdown(cfg.title, runs, html_path.name)
    write_atomic(md_path, md)
    write_atomic(html_path, page)
    return {"html": str(html_path), "markdown": str(md_path)}
