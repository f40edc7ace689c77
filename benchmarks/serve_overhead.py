"""What `alignkit serve` adds to chat latency with the local default model: the same greedy answers from
the model alone (the server's backend, `HFBackend.stream`), the server with no checks and the server with the
default guard, interleaved prompt by prompt; ratios of the summed latencies of prompts the guard let through.

    HF_HUB_OFFLINE=1 python benchmarks/serve_overhead.py [--prompts 16 --max-tokens 64]
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time

import harness
import httpx
import uvicorn

from alignkit.gen import Sampling
from alignkit.gen.hf import HFBackend
from alignkit.guard.config import GuardConfig, build_pipeline
from alignkit.guard.pipeline import Pipeline
from alignkit.guard.serve import ServeConfig, create_app
from alignkit.models import prepare_default
from alignkit.packs import load_pack


def start(app) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> None:
    opts = ("--prompts", int, 16, "benign pack prompts"), ("--max-tokens", int, 64, "answer length")
    p = harness.parser(__doc__, *opts)
    a = p.parse_args(argv)
    path = prepare_default()
    cfg = ServeConfig(model=path, max_new_tokens=a.max_tokens, log_file="")
    model = HFBackend(path, precision="fp32", batch_size=1)  # what the server itself builds, in fp32
    model.max_prompt_tokens = cfg.max_prompt_tokens
    pipes = {"server_no_checks": Pipeline([]), "server_default_guard": build_pipeline(GuardConfig())}
    urls = {name: start(create_app(cfg, pipeline=pipe, backend=model)) for name, pipe in pipes.items()}
    prompts = [x.prompt for x in load_pack("benign")][: a.prompts]
    sampling = Sampling(1, 0.0, 1.0, a.max_tokens, 0)
    times: dict[str, list[float]] = {"model_alone": [], "server_no_checks": [], "server_default_guard": []}
    answers: dict[str, list[str]] = {k: [] for k in times}
    blocked, client = set(), httpx.Client(timeout=300)
    body = {"model": "x", "temperature": 0, "max_tokens": a.max_tokens}
    for i, prompt in enumerate(prompts):
        msgs = [{"role": "user", "content": prompt}]
        for name in list(times)[i % 3 :] + list(times)[: i % 3]:
            t0 = time.perf_counter()
            if name == "model_alone":
                text = "".join(t for t, _ in model.stream(msgs, sampling))
            else:
                url = urls[name] + "/v1/chat/completions"
                choice = client.post(url, json={**body, "messages": msgs}).json()["choices"][0]
                text = choice["message"]["content"]
                if choice["finish_reason"] == "content_filter":
                    blocked.add(i)
            times[name].append(time.perf_counter() - t0)
            answers[name].append(text)
    keep = [i for i in range(len(prompts)) if i not in blocked]
    total = {k: sum(v[i] for i in keep) for k, v in times.items()}
    res = {"prompts": len(prompts), "blocked_by_guard": len(blocked), "max_tokens": a.max_tokens}
    res["same_answers"] = all(answers["model_alone"][i] == answers["server_no_checks"][i] for i in keep)
    res["mean_seconds"] = {k: round(v / len(keep), 4) for k, v in total.items()}
    res["median_seconds"] = {k: round(statistics.median(times[k][i] for i in keep), 4) for k in times}
    res |= {f"{k}_vs_model": round(total[k] / total["model_alone"], 4) for k in list(pipes)}
    report = harness.report_base(a, argv, __file__, "transformers", "uvicorn")
    res |= {"command": report["command"], "machine": report["machine"]}
    print(json.dumps(res, indent=2))
    harness.write_results(a, "serve_overhead", res)


if __name__ == "__main__":
    main()
