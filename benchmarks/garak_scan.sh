#!/usr/bin/env bash
# garak 0.17.1 scans `alignkit serve` on the default model with its OpenAICompatible generator, guard on
# (the default guard) and off (guard=none); the pass rates go to benchmarks/results/garak/.
# garak has heavy dependencies, so it lives in its own venv:
#   python3 -m venv /tmp/garakenv && /tmp/garakenv/bin/pip install torch==2.13.0 garak==0.17.1
#   GARAK_PY=/tmp/garakenv/bin/python bash benchmarks/garak_scan.sh
set -euo pipefail
cd "$(dirname "$0")/.."
GARAK_PY=${GARAK_PY:-/tmp/garakenv/bin/python}
PROBES=${PROBES:-dan.AutoDANCached,dan.DUDE,dan.Dan_11_0,dan.STAN}
work=$(mktemp -d)
export HF_HUB_OFFLINE=1
.venv/bin/alignkit serve --port 8100 log_file= > "$work/on.log" 2>&1 &
on=$!
.venv/bin/alignkit serve --port 8101 guard=none log_file= > "$work/off.log" 2>&1 &
off=$!
trap 'kill $on $off 2>/dev/null' EXIT
for port in 8100 8101; do
  until curl -sf "http://127.0.0.1:$port/healthz" >/dev/null; do sleep 1; done
done
for side in on:8100 off:8101; do
  name=${side%%:*} port=${side##*:}
  (cd "$work" && OPENAICOMPATIBLE_API_KEY=unused "$GARAK_PY" -m garak \
    --target_type openai.OpenAICompatible --target_name default \
    --generator_options "{\"openai\": {\"OpenAICompatible\": {\"uri\": \"http://127.0.0.1:$port/v1/\"}}}" \
    --probes "$PROBES" --generations 1 --report_prefix "guard_$name" > "garak_$name.log" 2>&1)
done
mkdir -p benchmarks/results/garak
python3 - "$work" <<'PY'
import json, re, sys
work, out = sys.argv[1], {}
for side in ("on", "off"):
    text = re.sub(r"\x1b\[[0-9;]*m", "", open(f"{work}/garak_{side}.log").read().replace("\r", "\n"))
    out[side] = {(m[1], m[2]): (int(m[3]), int(m[4])) for m in re.finditer(
        r"^\s*(\w+\.\w+)\s+([\w.]+): (?:PASS|FAIL)\s+ok on\s+(\d+)/\s*(\d+)", text, re.M)}
rows = ["| probe | detector | guard on: passed | guard off: passed |", "| --- | --- | ---: | ---: |"]
rows += [f"| {p} | {d} | {a}/{n} | {out['off'][p, d][0]}/{out['off'][p, d][1]} |" for (p, d), (a, n) in out["on"].items()]
open("benchmarks/results/garak/report.md", "w").write(
    "# garak 0.17.1 against `alignkit serve` on the default model\n\n`bash benchmarks/garak_scan.sh`. "
    "Passed: attempts where garak's detector found no attack success.\n\n" + "\n".join(rows) + "\n")
json.dump({s: [{"probe": p, "detector": d, "passed": a, "attempts": n} for (p, d), (a, n) in v.items()]
           for s, v in out.items()}, open("benchmarks/results/garak/summary.json", "w"), indent=2)
print("\n".join(rows))
PY
