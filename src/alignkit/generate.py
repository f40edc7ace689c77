"""`alignkit generate`: batched, KV-cached, resumable generation behind a small backend interface.

The HF backend runs continuous batching: `batch_size` sequences decode together, and as soon as some
finish, queued prompts are prefilled and take their slots, so the batch never idles on one long answer.
Rows of different ages share one left-padded KV cache; position ids count each row's own tokens.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch

from .data import DataError, Messages, _text_or_messages, read_records
from .models import load_tokenizer, resolve
from .training import use_bf16


@dataclass(frozen=True)
class Sampling:
    n: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0


@dataclass
class Request:
    key: str
    messages: Messages
    ids: list[int] | None = None  # an already templated prompt, used as is (the PPO rollout)


@dataclass
class Completion:
    key: str
    texts: list[str]
    tokens: list[int]  # generated tokens per sample, EOS excluded
    ids: list[list[int]] | None = None  # generated token ids per sample, with the EOS that ended it


class Backend(Protocol):
    """What probe and training jobs need from a generator; HF and vLLM implement it."""

    name: str

    def generate(self, requests: list[Request], sampling: Sampling) -> Iterator[Completion]:
        """Yield one Completion per request (n samples each), in any order, as they finish."""
        ...


def as_messages(prompt: str | Messages, system: str | None = None) -> Messages:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not (msgs and msgs[0]["role"] == "system"):
        msgs = [{"role": "system", "content": system}, *msgs]
    return msgs


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else nucleus sampling (Holtzman et al. 2020, Sec. 3.1)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    # inverse-CDF draw: one uniform per row (torch.multinomial draws an exponential per vocabulary entry)
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=gen, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def _slack_cache(config):
    """A DynamicCache whose layers grow into preallocated slack instead of re-concatenating every step."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class SlackLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, add = self.keys.shape[-2] if self.keys.numel() else 0, key_states.shape[-2]
            buf = getattr(self, "_buf", None)
            if buf is None or self.keys is not self._view or n + add > buf[0].shape[-2]:
                shape = list(key_states.shape)
                shape[-2] = max(2 * (n + add), 64)
                buf = (key_states.new_zeros(shape), value_states.new_zeros(shape))
                if n:
                    buf[0][..., :n, :], buf[1][..., :n, :] = self.keys, self.values
                self._buf = buf
            buf[0][..., n : n + add, :], buf[1][..., n : n + add, :] = key_states, value_states
            self.keys, self.values = buf[0][..., : n + add, :], buf[1][..., : n + add, :]
            self._view = self.keys
            return self.keys, self.values

    cache = DynamicCache(config=config)
    cache.layers = [SlackLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero-pad `t` on the left of `dim` up to `length`."""
    extra = length - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class HFBackend:
    """transformers model, continuous batching over a shared left-padded DynamicCache."""

    name = "hf"

    def __init__(self, model: str, precision: str = "auto", batch_size: int = 16, model_obj=None, tok=None):
        from transformers import AutoModelForCausalLM

        self.tok = tok or load_tokenizer(model)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = torch.bfloat16 if use_bf16(precision) else torch.float32
        if model_obj is None:
            model_obj = AutoModelForCausalLM.from_pretrained(resolve(model), dtype=self.dtype)
        self.model = model_obj.to(self.device).eval()
        self.batch_size = batch_size
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        self.eos = set(ids) | ({self.tok.eos_token_id} if self.tok.eos_token_id is not None else set())

    def encode(self, msgs: Messages) -> list[int]:
        out = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(out["input_ids"] if isinstance(out, dict) else out)

    @torch.inference_mode()
    def generate(self, requests, sampling):
        gen = torch.Generator().manual_seed(sampling.seed)
        # queue of (request index, sample index, prompt ids), shortest prompts first so each prefill
        # batch holds similar lengths (little padding)
        queue = [
            (i, s, r.ids if r.ids is not None else self.encode(r.messages))
            for i, r in enumerate(requests)
            for s in range(sampling.n)
        ]
        queue.sort(key=lambda q: len(q[2]))
        queue.reverse()  # pop() from the end takes the shortest
        texts: list[list[str | None]] = [[None] * sampling.n for _ in requests]
        counts: list[list[int]] = [[0] * sampling.n for _ in requests]
        gen_ids: list[list[list[int]]] = [[[] for _ in range(sampling.n)] for _ in requests]
        left = [sampling.n] * len(requests)
        rows: list[tuple[int, int]] = []  # (request, sample) of each batch row
        out_ids: list[list[int]] = []
        cache, mask, pos, last = None, None, None, None
        while queue or rows:
            free = self.batch_size - len(rows)
            # step 1: refill free slots once an eighth of the batch is free (or nothing is running); a
            # prefill costs about one decode step, and an idle slot costs its share of every step
            if queue and (not rows or free >= max(1, self.batch_size // 8)):
                take = [queue.pop() for _ in range(min(free, len(queue)))]
                prompts = [t[2] for t in take]
                width = max(map(len, prompts))
                ids = torch.tensor([[self.tok.pad_token_id] * (width - len(p)) + p for p in prompts])
                m = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
                new_cache = _slack_cache(self.model.config)
                logits = self.model(
                    input_ids=ids.to(self.device),
                    attention_mask=m.to(self.device),
                    position_ids=(m.cumsum(-1) - 1).clamp(min=0).to(self.device),
                    cache=new_cache,
                    use_cache=True,
                    logits_to_keep=1,
                ).logits[:, -1]
                first = sample_next(logits, sampling.temperature, sampling.top_p, gen).cpu()
                new_pos = m.sum(-1)
                if cache is None:
                    cache, mask, pos, last = new_cache, m, new_pos, first
                else:  # merge: left-pad the shorter cache so both share one length
                    length = max(mask.shape[1], m.shape[1])
                    for old_l, new_l in zip(cache.layers, new_cache.layers, strict=True):
                        old_l.keys = torch.cat(
                            [left_pad(old_l.keys, length, 2), left_pad(new_l.keys, length, 2)]
                        )
                        old_l.values = torch.cat(
                            [left_pad(old_l.values, length, 2), left_pad(new_l.values, length, 2)]
                        )
                    mask = torch.cat([left_pad(mask, length, 1), left_pad(m, length, 1)])
                    pos, last = torch.cat([pos, new_pos]), torch.cat([last, first])
                fresh = range(len(rows), len(rows) + len(take))  # only the new rows got a token
                rows += [(t[0], t[1]) for t in take]
                out_ids += [[] for _ in take]
            else:
                # step 2: one decode step for every running row
                mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
                logits = self.model(
                    input_ids=last[:, None].to(self.device),
                    attention_mask=mask.to(self.device),
                    position_ids=pos[:, None].to(self.device),
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                ).logits[:, -1]
                pos = pos + 1
                last = sample_next(logits, sampling.temperature, sampling.top_p, gen).cpu()
                fresh = range(len(rows))
            # step 3: record the new token of every row; retire rows that hit EOS or the length cap
            keep = [j for j in range(len(rows)) if j not in fresh]
            new_tokens = last.tolist()
            for j in fresh:
                tok_id = new_tokens[j]
                done = tok_id in self.eos
                if not done:
                    out_ids[j].append(tok_id)
                    done = len(out_ids[j]) >= sampling.max_new_tokens
                if not done:
                    keep.append(j)
                    continue
                i, s = rows[j]
                texts[i][s] = self.tok.decode(out_ids[j], skip_special_tokens=True)
                counts[i][s] = len(out_ids[j])
                gen_ids[i][s] = out_ids[j] + [tok_id] if tok_id in self.eos else out_ids[j]
                left[i] -= 1
                if left[i] == 0:
                    yield Completion(requests[i].key, texts[i], counts[i], gen_ids[i])
            if len(keep) < len(rows):
                keep.sort()
                if not keep:
                    rows, out_ids, cache, mask, pos, last = [], [], None, None, None, None
                    continue
                sel = torch.tensor(keep)
                rows, out_ids = [rows[j] for j in keep], [out_ids[j] for j in keep]
                cache.batch_select_indices(sel.to(self.device))
                mask, pos, last = mask[sel], pos[sel], last[sel]
                # drop leading columns that no remaining row attends to (they belonged to retired rows)
                lead = int((mask.sum(0) > 0).int().argmax())
                if lead:
                    mask = mask[:, lead:]
                    for layer in cache.layers:
                        layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]


class VLLMBackend:
    """vLLM, where it is installed (GPU clusters): same interface, vLLM's own scheduler."""

    name = "vllm"

    def __init__(self, model: str, precision: str = "auto", batch_size: int = 16):
        from vllm import LLM

        dtype = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16"}[precision]
        self.llm = LLM(model=resolve(model), dtype=dtype, max_num_seqs=batch_size)

    def generate(self, requests, sampling):
        from vllm import SamplingParams

        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            seed=sampling.seed,
        )
        for r, out in zip(requests, self.llm.chat([r.messages for r in requests], params), strict=True):
            yield Completion(r.key, [o.text for o in out.outputs], [len(o.token_ids) for o in out.outputs])


def make_backend(kind: str, model: str, precision: str = "auto", batch_size: int = 16) -> Backend:
    if kind == "auto":
        try:
            import vllm  # noqa: F401

            kind = "vllm" if torch.cuda.is_available() else "hf"
        except ImportError:
            kind = "hf"
    if kind == "vllm":
        return VLLMBackend(model, precision, batch_size)
    return HFBackend(model, precision, batch_size)


# ---------------------------------------------------------------- the job


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
    """Sequences decoded together (continuous batching refills finished slots)."""
    backend: Literal["auto", "hf", "vllm"] = "auto"
    """Generation backend: hf (transformers), vllm, or auto (vllm when installed and a GPU is present)."""
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


@dataclass
class GenerateConfig(GenerationKeys):
    """Generate responses for {id, prompt} or {id, messages} records."""

    model: str = "default"
    """Policy: hub id, local folder or 'default'."""
    input: str = ""
    """JSONL of {id, prompt} or {id, messages} (other fields are carried through)."""
    output: str = ""
    """JSONL written: each input record plus `response` (n = 1) or `responses`, and `response_tokens`."""
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
        field = "messages" if "messages" in rec else "prompt"
        out.append((rec, Request(key, as_messages(_text_or_messages(rec, field, source, line), system))))
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
        with path.open("r+b") as f:
            f.truncate(good)
    return ids


def run_generation(
    backend: Backend,
    pending: list[tuple[dict, Request]],
    sampling: Sampling,
    out_path: Path,
    desc: str = "generate",
) -> int:
    """Generate for `pending`, appending each finished record to `out_path`; returns tokens generated."""
    from tqdm.auto import tqdm

    by_key = {r.key: rec for rec, r in pending}
    total = 0
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
    import time

    if not cfg.input or not cfg.output:
        raise DataError("generate", None, "input/output", "both --in and --out are needed")
    todo = read_prompts(cfg.input, cfg.system)
    out = Path(cfg.output)
    if not cfg.resume and out.exists():
        out.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_ids(out)
    pending = [(rec, r) for rec, r in todo if r.key not in done]
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    backend = make_backend(cfg.backend, cfg.model, cfg.precision, cfg.batch_size)
    t0 = time.perf_counter()
    tokens = run_generation(backend, pending, cfg.sampling(cfg.n), out)
    dt = time.perf_counter() - t0
    return {
        "output": os.fspath(out),
        "generated": len(pending),
        "skipped": len(todo) - len(pending),
        "tokens": tokens,
        "tokens_per_s": tokens / dt if dt > 0 and tokens else 0.0,
        "backend": backend.name,
    }
