"""What `alignkit serve` adds to end-to-end chat latency with the local default model.

Three ways to get the same greedy answer to the same benign prompt, interleaved prompt by prompt so
drift hits all of them: the model alone (LocalModel.stream, in-process), the server with no checks,
and the server with the default guard (HTTP + JSON + input and output checks). Ratios are of the
summed latencies over prompts the guard let through.

    HF_HUB_OFFLINE=1 python benchmarks/serve_overhead.py [--prompts 16 --max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from alignkit.generate import HFBackend, Sampling
from alignkit.guard import GuardConfig, Pipeline, build_pipeline
from alignkit.models import prepare_default
from alignkit.probes import load_pack
from alignkit.serve import LocalModel, ServeConfig, create_app


def start(app) -> tuple[str, uvicorn.Server]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    a = ap.parse_args()
    path = prepare_default()
    model = LocalModel(HFBackend(path, precision="fp32", batch_size=1))
    cfg = ServeConfig(model=path, max_new_tokens=a.max_tokens, log_file="")
    guarded = build_pipeline(GuardConfig())
    urls = {}
    for name, pipe in (("server_no_checks", Pipeline([])), ("server_default_guard", guarded)):
        urls[name], _ = start(create_app(cfg, pipeline=pipe, backend=model))
    prompts = [p.prompt for p in load_pack("benign")][: a.prompts]
    sampling = Sampling(1, 0.0, 1.0, a.max_tokens, 0)
    times: dict[str, list[float]] = {"model_alone": [], "server_no_checks": [], "server_default_guard": []}
    answers: dict[str, list[str]] = {k: [] for k in times}
    blocked = []
    client = httpx.Client(timeout=300)
    body = {"model": "x", "temperature": 0, "max_tokens": a.max_tokens}
    for i, prompt in enumerate(prompts):
        msgs = [{"role": "user", "content": prompt}]
        order = list(times)[i % 3 :] + list(times)[: i % 3]
        for name in order:
            t0 = time.perf_counter()
            if name == "model_alone":
                text = "".join(t for t, _ in model.stream(msgs, sampling))
            else:
                r = client.post(urls[name] + "/v1/chat/completions", json={**body, "messages": msgs}).json()
                text = r["choices"][0]["message"]["content"]
                if r["choices"][0]["finish_reason"] == "content_filter":
                    blocked.append(i)
            times[name].append(time.perf_counter() - t0)
            answers[name].append(text)
    keep = [i for i in range(len(prompts)) if i not in blocked]
    same = all(answers["model_alone"][i] == answers["server_no_checks"][i] for i in keep)
    total = {k: sum(v[i] for i in keep) for k, v in times.items()}
    res = {
        "prompts": len(prompts),
        "blocked_by_guard": len(set(blocked)),
        "max_tokens": a.max_tokens,
        "same_answers": same,
        "mean_seconds": {k: round(v / len(keep), 4) for k, v in total.items()},
        "median_seconds": {k: round(statistics.median(times[k][i] for i in keep), 4) for k in times},
        "server_no_checks_vs_model": round(total["server_no_checks"] / total["model_alone"], 4),
        "server_default_guard_vs_model": round(total["server_default_guard"] / total["model_alone"], 4),
    }
    print(json.dumps(res, indent=2))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "serve_overhead.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
