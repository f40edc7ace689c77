"""What the benchmark scripts share: a quiet machine before each run, each measured side in its own subprocess
(a JSON spec in, a JSON result out), interleaved repeats, the machine and alignkit source measured, the TRL
step timer, and one writer of results (markdown + JSON into benchmarks/results/). Scripts `import harness`."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
from transformers import TrainerCallback

import alignkit
from alignkit.models import use_bf16

RESULTS = Path(__file__).resolve().parent / "results"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
OFFLINE_ENV |= {"TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
NOTES = "<!-- notes: hand-written text below this line is kept when the script rewrites the file -->"
LORA = "lora.enabled=true lora.r=16 lora.alpha=32 lora.dropout=0.0 lora.target_modules=all-linear"
PEFT_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def _cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat ((0, 0) where unavailable)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    busy = f[0] + f[1] + f[2] + sum(f[5:8])  # user nice system irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK"), (busy + f[3] + f[4]) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wait_quiet(max_wait: float, threshold: float = 0.15, window: float = 3.0) -> float:
    """Wait (up to max_wait s) until other processes use under `threshold` of the CPUs; → seconds waited."""
    t0 = time.perf_counter()
    while max_wait > 0:
        b0, a0 = _cpu_seconds()
        time.sleep(window)
        b1, a1 = _cpu_seconds()
        if a1 <= a0 or (b1 - b0) / (a1 - a0) < threshold or time.perf_counter() - t0 >= max_wait:
            break
    return time.perf_counter() - t0


def ok(r: dict | None) -> bool:
    return bool(r) and "error" not in r and "skipped" not in r


def run_worker(script: str, spec: dict, work: Path, name: str) -> dict:
    """`script --worker SPEC`'s result, its wall clock and other processes' CPU share, or {"error": ...}."""
    spec = {**spec, "out_dir": str(work / name), "result": str(work / f"{name}.result.json")}
    spec_path, log = work / f"{name}.spec.json", work / f"{name}.log"
    spec_path.write_text(json.dumps(spec))
    load0, busy0, child0, t = os.getloadavg()[0], _cpu_seconds()[0], _children_cpu(), time.perf_counter()
    with log.open("w") as f:
        cmd = [sys.executable, str(Path(script).resolve()), "--worker", str(spec_path)]
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE_ENV})
    wall, cores = time.perf_counter() - t, os.cpu_count() or 1
    # CPU time of everything but this run, as a share of the machine: contention during the run
    other = max(0.0, (_cpu_seconds()[0] - busy0) - (_children_cpu() - child0)) / (wall * cores)
    base = {"wall_s": wall, "load_start": load0, "load_end": os.getloadavg()[0], "other_cpu_share": other}
    base["log"] = str(log)
    shutil.rmtree(spec["out_dir"], ignore_errors=True)  # the trained model: not needed
    if proc.returncode != 0 or not Path(spec["result"]).exists():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        return {**base, "error": f"exit {proc.returncode}: {(lines or ['(no output)'])[-1][:300]}"}
    return {**json.loads(Path(spec["result"]).read_text()), **base}


def worker_main(spec_path: str, workers: dict) -> None:
    """In the subprocess: workers[the spec's side up to its first '-'](spec) into spec["result"]."""
    spec = json.loads(Path(spec_path).read_text())
    Path(spec["result"]).write_text(json.dumps(workers[spec["side"].split("-")[0]](spec), default=str))


def run_sides(script, specs: dict, a, finish, label: dict, key: str, tag: str = "") -> tuple:
    """a.repeats interleaved runs (A, B, A, B, ...) of each side, after wait_quiet; finish(spec, result) adds the
    figures and a "progress" line, or an error. → ({side: [runs]}, {side: its fastest good run by `key`})."""
    runs: dict[str, list[dict]] = {side: [] for side in specs}
    for rep, side in ((rep, side) for rep in range(a.repeats) for side in specs):
        print(f"{tag + ' / ' if tag else ''}{label[side]} (run {rep + 1}) ...", end=" ", flush=True)
        waited = wait_quiet(a.quiet_wait)
        r = run_worker(script, specs[side], a.work, f"{tag + '-' if tag else ''}{side}-run{rep + 1}")
        r = {**(finish(specs[side], r) if ok(r) else r), "waited_for_quiet_s": waited}
        runs[side].append(r)
        print(r["progress"] if ok(r) else f"FAILED ({r['error']}; log {r['log']})", flush=True)
    # the fastest: other processes only ever slow a run down
    best = {s: max((r for r in rs if ok(r)), key=lambda r: r[key], default=rs[-1]) for s, rs in runs.items()}
    return runs, best


def kv(text: str) -> dict:
    """`key=value ...` as keyword arguments: numbers, true and false as such, anything else as a string."""
    pairs = (item.split("=", 1) for item in text.split())
    return {k: json.loads(v) if v in ("true", "false") or v[0].isdigit() else v for k, v in pairs}


def step_timer(cur: dict):
    """A TrainerCallback that appends `cur` with each step's begin, pre_opt, opt and end times to .steps."""

    def at(key: str):
        def on(self, *a, **kw):
            if key == "begin":
                cur.clear()
            cur[key] = time.perf_counter() - self.t0
            if key == "end":
                self.steps.append(dict(cur))

        return on

    class StepTimer(TrainerCallback):
        t0, steps = 0.0, []
        on_step_begin, on_pre_optimizer_step = at("begin"), at("pre_opt")
        on_optimizer_step, on_step_end = at("opt"), at("end")

        def on_train_begin(self, *a, **kw):
            self.t0 = time.perf_counter()

    return StepTimer()


def trl_facts(trainer) -> dict:
    """What a TRL trainer ran with: optimiser, gradient checkpointing, parameter counts."""
    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    gc = getattr(base, "is_activation_checkpointing", None) or getattr(base, "is_gradient_checkpointing", 0)
    params, optim = list(trainer.model.parameters()), getattr(trainer.args.optim, "value", trainer.args.optim)
    out = {"optimizer": f"optim={optim}", "gradient_checkpointing": bool(gc)}
    out["params_trainable"] = sum(p.numel() for p in params if p.requires_grad)
    return out | {"params_total": sum(p.numel() for p in params)}


def machine_info() -> dict:
    """CPU model, cores, the CPU flags that decide bf16 speed, and the precision `auto` picks here."""
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = [ln.partition(":")[2].strip() for ln in info if ln.startswith("model name")] + [platform.machine()]
    flags = set(next((ln for ln in info if ln.startswith("flags")), "").split(":", 1)[-1].split())
    has = {f: f in flags for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f")}
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    out = {"cpu": cpu[0], "cores": os.cpu_count(), "gpu": gpu, "flags": has, "avx512": has["avx512f"]}
    out["native_bf16"], gpu = has["avx512_bf16"] or has["amx_bf16"], f", GPU {gpu}" if gpu else ""
    out["precision_auto"], yes = "bf16" if use_bf16("auto") else "fp32", {True: "yes", False: "no"}
    bf16 = f"native bf16 (AVX-512 BF16/AMX): {yes[out['native_bf16']]}, AVX-512: {yes[has['avx512f']]}"
    out["summary"] = f"{cpu[0]}, {out['cores']} cores{gpu}, {bf16}; precision=auto → {out['precision_auto']}"
    return out


def alignkit_source() -> dict:
    """Which alignkit code was measured: git commit, uncommitted files under src/alignkit, hash of its sources."""
    pkg = Path(alignkit.__file__).resolve().parent
    digest = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        digest.update(f.relative_to(pkg).as_posix().encode() + b"\0" + f.read_bytes())
    out = {"path": str(pkg), "sources_sha256": digest.hexdigest()[:16], "commit": None, "uncommitted": None}

    def git(*args: str) -> str:
        cmd = ["git", "-C", str(pkg), *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    try:
        out["commit"] = git("rev-parse", "--short", "HEAD").strip()
        status = git("status", "--porcelain", "--", ".").splitlines()
        out["uncommitted"] = sorted(ln[3:] for ln in status if ln.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def parser(doc: str, *opts: tuple, runs: dict | None = None) -> argparse.ArgumentParser:
    """--out, `opts` (flag, type: bool a switch, a tuple the choices; default, help) and, given `runs`, more."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=fmt)
    opts = (("--out", Path, RESULTS, "results folder (NAME.md and NAME.json go there)"), *opts)
    if runs:
        opts += (
            ("--steps", int, runs["steps"], "timed steps per run (after the warm-up steps)"),
            ("--warmup", int, runs["warmup"], "untimed warm-up steps at the start of each run"),
            ("--quick", bool, False, "smoke test: 1 warm-up + 2 timed steps (overrides both)"),
            ("--batch-size", int, runs["batch_size"], "examples (samples) per step, both sides"),
            ("--lr", float, runs["lr"], "learning rate, both sides (constant, no warmup)"),
            ("--seed", int, 0, "seed of data order, initialisation (head, LoRA) and sampling"),
            ("--sides", str, ",".join(runs["sides"]), "comma-separated subset of the default"),
            ("--repeats", int, 1, "runs per side, interleaved; each side's fastest is reported"),
            ("--quiet-wait", float, runs["quiet_wait"], "wait up to this many s for a quiet machine"),
            ("--work-dir", Path, None, "scratch folder for data and logs (unset: a temp dir, removed)"),
            ("--worker", str, None, argparse.SUPPRESS),
        )
    for flag, kind, default, text in opts:
        if kind is bool:
            p.add_argument(flag, action="store_true", help=text)
        else:
            kw = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
            p.add_argument(flag, default=default, help=text, **kw)
    return p


def parse(p, argv: list[str] | None, workers: dict, sides: tuple) -> argparse.Namespace:
    """Parse; as a worker, run the spec and exit; else check the options and make the scratch folder a.work."""
    a = p.parse_args(argv)
    os.environ.update(OFFLINE_ENV)
    if a.worker:
        sys.exit(worker_main(a.worker, workers))
    if a.quick:
        a.steps, a.warmup = 2, 1
    a.sides = [s for s in a.sides.split(",") if s]
    if not a.sides or not set(a.sides) <= set(sides) or a.steps < 1 or a.warmup < 0 or a.repeats < 1:
        p.error("need --sides from the list, --steps ≥ 1, --warmup ≥ 0, --repeats ≥ 1")
    a.work = a.work_dir or Path(tempfile.mkdtemp(prefix="alignkit-bench-"))
    a.work.mkdir(parents=True, exist_ok=True)
    return a


def report_base(a, argv: list[str] | None, script: str, *packages: str) -> dict:
    """The arguments, the command line that reproduces the run, the machine, the alignkit source, versions."""
    cmd = " ".join([os.path.relpath(os.path.abspath(script)), *(sys.argv[1:] if argv is None else argv)])
    versions = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    versions |= {p: version(p) for p in packages} | {"python": platform.python_version()}
    args = {k: v for k, v in vars(a).items() if k not in ("worker", "work")}
    out = {"args": args, "command": f"HF_HUB_OFFLINE=1 python {cmd}", "machine": machine_info()}
    return out | {"alignkit_source": alignkit_source(), "versions": versions}


def _source_line(src: dict) -> str:
    dirty = ", ".join(src["uncommitted"] or [])
    dirty = f" plus uncommitted changes to {dirty}" if dirty else ", clean"
    code = f"commit {src['commit']}{dirty}" if src["commit"] else "not in git"
    return code + f" (sources sha256 {src['sources_sha256']})"


def header(title: str, report: dict) -> list[str]:
    """A results file's title and its command, machine (with versions) and alignkit code lines."""
    vs, code = ", ".join(f"{k} {v}" for k, v in report["versions"].items()), report["alignkit_source"]
    command, machine = f"- Command: `{report['command']}`", f"- Machine: {report['machine']['summary']}"
    return [f"# {title}", "", command, f"{machine}; {vs}", f"- alignkit code: {_source_line(code)}"]


def fmt(x, spec: str = ".2f") -> str:
    return "–" if x is None else f"{x:{spec}}"


def table(head: str, rows: list[list], align: str = "l") -> list[str]:
    """A markdown table of the columns `head` split at '|', aligned by `align` (r: right; the last repeats)."""
    cols = head.split("|")
    sep = ["---:" if c == "r" else "---" for c in align.ljust(len(cols), align[-1])]
    return ["| " + " | ".join(str(c) for c in row) + " |" for row in [cols, sep, *rows]]


def write_results(a, name: str, report: dict, lines: list[str] | None = None) -> None:
    """a.out/NAME.json, a.out/NAME.md given lines (hand-written text below NOTES kept); the scratch folder removed."""
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    if lines is not None:
        md, text = a.out / f"{name}.md", "\n".join(lines) + "\n"
        old = md.read_text() if md.exists() else ""
        md.write_text(text + (NOTES + old.split(NOTES, 1)[1] if NOTES in old else ""))
        print("\n" + text, end="")
    print(f"written: {a.out / name}.json" + (f" and {a.out / name}.md" if lines is not None else ""))
    if getattr(a, "work", None) and a.work_dir is None:
        shutil.rmtree(a.work, ignore_errors=True)
    elif getattr(a, "work", None):
        print(f"work dir (data, logs): {a.work}")
