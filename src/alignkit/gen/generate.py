"""`alignkit generate`: batched, resumable generation for {id, prompt} records, and `make_backend`."""

import importlib.util
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from .. import config as cfglib
from ..data import DataError, as_messages, read_records, text_or_messages
from . import Backend, Request, Sampling
from .endpoint import ENDPOINT_PREFIX, EndpointBackend
from .hf import HFBackend


def make_backend(kind: str, model: str, precision: str = "auto", batch_size: int = 16) -> Backend:
    """An `openai:URL#MODEL` endpoint, or a local model through `kind` (hf, vllm; auto: vllm if it can)."""
    if model.startswith(ENDPOINT_PREFIX):
        return EndpointBackend.from_spec(model, concurrency=batch_size)
    if kind == "auto":
        kind = "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "hf"
    if kind == "vllm":
        from .vllm import VLLMBackend  # vLLM is optional and heavy: imported only when asked for

        return VLLMBackend(model, precision, batch_size)
    return HFBackend(model, precision, batch_size)


@dataclass
class GenerationKeys:
    """Sampling and engine keys of every job that generates (generate, probe)."""

    temperature: float = 0.7
    """Sampling temperature; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int = 256
    """Cap on generated tokens per sample."""
    seed: int = 0
    """Sampling seed."""
    batch_size: int = 16
    """Sequences decoded together (continuous batching); requests in flight for an endpoint."""
    backend: Literal["auto", "hf", "vllm"] = "auto"
    """hf (transformers), vllm, or auto (vllm if installed and a GPU is present); openai:URL#MODEL: HTTP."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Weights' dtype: auto = bf16 on GPUs and CPUs with native bf16, else fp32."""
    system: str | None = None
    """System prompt added to records that have none (deployment rules, say)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be ≥ 1")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")

    def sampling(self, n: int) -> Sampling:
        return Sampling(n, self.temperature, self.top_p, self.max_new_tokens, self.seed)


@dataclass(kw_only=True)
class GenerateConfig(GenerationKeys):
    """Generate responses for {id, prompt} or {id, messages} records."""

    model: str = "default"
    """Policy: hub id, local folder, 'default', or openai:URL#MODEL (an OpenAI-compatible endpoint)."""
    input: str
    """JSONL of {id, prompt} or {id, messages} (other fields are carried through)."""
    output: str
    """JSONL written (config in <name>.job_config.yaml): records + `response`(s) and `response_tokens`."""
    n: int = 1
    """Samples per prompt."""
    resume: bool = True
    """Append to an existing output and skip ids already there (false: start the output afresh)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n < 1:
            raise ValueError("n must be ≥ 1")


def read_prompts(source: str, system: str | None = None) -> list[tuple[dict, Request]]:
    """Records with a unique `id` and a `prompt` or `messages` field → (record, Request)."""
    out, seen = [], {}
    for line, rec in read_records(source):
        if "id" not in rec:
            raise DataError(source, line, "id", "missing")
        key = str(rec["id"])
        if key in seen:
            raise DataError(source, line, "id", f"duplicate id {key!r} (first on line {seen[key]})")
        seen[key] = line
        prompt = text_or_messages(rec, "messages" if "messages" in rec else "prompt", source, line)
        out.append((rec, Request(key, as_messages(prompt, "user", system))))
    return out


def done_ids(path: Path) -> set[str]:
    """Ids already written to an output JSONL. A torn last line (killed mid-write) is cut off."""
    if not path.exists():
        return set()
    lines = path.read_bytes().split(b"\n")
    ids, good = set(), 0
    for n, raw in enumerate(lines[:-1], 1):  # every complete line must parse
        try:
            ids.add(str(json.loads(raw)["id"]))
        except (ValueError, KeyError, TypeError):
            if n < len(lines) - 1:
                raise DataError(str(path), n, "id", "unreadable line in an existing output") from None
            break
        good += len(raw) + 1
    if good < path.stat().st_size:
        os.truncate(path, good)
    return ids


def run_generation(
    backend: Backend, pending: list[tuple[dict, Request]], sampling: Sampling, out_path: Path, desc="generate"
) -> int:
    """Generate for `pending`, appending each finished record to `out_path`; returns tokens generated."""
    by_key, total = {r.key: rec for rec, r in pending}, 0
    with (
        out_path.open("a") as f,
        tqdm(total=len(pending), desc=desc, unit="prompt", disable=not pending) as bar,
    ):
        for c in backend.generate([r for _, r in pending], sampling):
            rec = dict(by_key[c.key])
            if sampling.n == 1:
                rec["response"], rec["response_tokens"] = c.texts[0], c.tokens[0]
            else:
                rec["responses"], rec["response_tokens"] = c.texts, c.tokens
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            total += sum(c.tokens)
            bar.update(1)
            bar.set_postfix(tokens=total)
    return total


def run(cfg: GenerateConfig) -> dict:
    todo = read_prompts(cfg.input, cfg.system)
    out = Path(cfg.output)
    if not cfg.resume and out.exists():
        out.unlink()
    cfglib.save(cfg, out.with_name(out.stem + ".job_config.yaml"))
    done = done_ids(out)
    pending = [(rec, r) for rec, r in todo if r.key not in done]
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    backend = make_backend(cfg.backend, cfg.model, cfg.precision, cfg.batch_size)
    t0 = time.perf_counter()
    tokens = run_generation(backend, pending, cfg.sampling(cfg.n), out)
    dt = time.perf_counter() - t0
    stats = {"output": os.fspath(out), "generated": len(pending), "skipped": len(todo) - len(pending)}
    speed = tokens / dt if dt > 0 and tokens else 0.0
    return stats | {"tokens": tokens, "tokens_per_s": speed, "backend": backend.name}
