"""The transformers backend: batched, KV-cached sampling with continuous batching (`batch_size` sequences
decode together; as soon as some finish, queued prompts take their slots), and token streaming. Rows of
different ages share one left-padded KV cache; position ids count each row's own tokens."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, DynamicCache, StoppingCriteria, TextIteratorStreamer
from transformers.cache_utils import DynamicLayer
from transformers.generation import StoppingCriteriaList

from ..data import Messages, template_ids
from ..models import load_tokenizer, resolve, use_bf16
from . import Completion, Piece, PromptTooLong, Request, Sampling


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else nucleus sampling (Holtzman et al. 2020, Sec. 3.1)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # the smallest prefix whose mass reaches top_p stays
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    # inverse-CDF draw: one uniform per row (torch.multinomial draws an exponential per vocabulary entry)
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=gen, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


class SlackLayer(DynamicLayer):
    """A KV-cache layer that grows into preallocated slack instead of re-concatenating every step."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, add = self.keys.shape[-2] if self.keys.numel() else 0, key_states.shape[-2]
        buf = getattr(self, "buf", None)
        if buf is None or self.keys is not self.view or n + add > buf[0].shape[-2]:
            shape = (*key_states.shape[:-2], max(2 * (n + add), 64), key_states.shape[-1])
            buf = (key_states.new_zeros(shape), value_states.new_zeros(shape))
            if n:
                buf[0][..., :n, :], buf[1][..., :n, :] = self.keys, self.values
            self.buf = buf
        buf[0][..., n : n + add, :], buf[1][..., n : n + add, :] = key_states, value_states
        self.keys, self.values = buf[0][..., : n + add, :], buf[1][..., : n + add, :]
        self.view = self.keys
        return self.keys, self.values


def left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    if (extra := length - t.shape[dim]) <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@dataclass
class Running:
    """The rows decoding together: their (request, sample), tokens so far, and shared left-padded KV cache."""

    rows: list[tuple[int, int]]
    out_ids: list[list[int]]
    cache: DynamicCache
    mask: torch.Tensor  # (B, T)
    pos: torch.Tensor  # (B,)
    last: torch.Tensor  # (B,)

    def merge(self, new: Running) -> Running:
        """Append freshly prefilled rows: left-pad the shorter cache so both share one length; → self."""
        length = max(self.mask.shape[1], new.mask.shape[1])
        for old_l, new_l in zip(self.cache.layers, new.cache.layers, strict=True):
            old_l.keys = torch.cat([left_pad(old_l.keys, length, 2), left_pad(new_l.keys, length, 2)])
            old_l.values = torch.cat([left_pad(old_l.values, length, 2), left_pad(new_l.values, length, 2)])
        self.mask = torch.cat([left_pad(self.mask, length, 1), left_pad(new.mask, length, 1)])
        self.pos, self.last = torch.cat([self.pos, new.pos]), torch.cat([self.last, new.last])
        self.rows, self.out_ids = self.rows + new.rows, self.out_ids + new.out_ids
        return self

    def keep(self, keep: list[int], device) -> None:
        """Keep only rows `keep` (sorted), and drop leading columns no remaining row attends to."""
        sel = torch.tensor(keep)
        self.rows, self.out_ids = [self.rows[j] for j in keep], [self.out_ids[j] for j in keep]
        self.cache.batch_select_indices(sel.to(device))
        self.mask, self.pos, self.last = self.mask[sel], self.pos[sel], self.last[sel]
        lead = int((self.mask.sum(0) > 0).int().argmax())
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]


class Results:
    """Finished samples per request; a request's Completion is ready once all its n samples are."""

    def __init__(self, requests: list[Request], n: int):
        self.requests = requests
        self.texts: list[list[str]] = [[""] * n for _ in requests]
        self.tokens: list[list[int]] = [[0] * n for _ in requests]
        self.ids: list[list[list[int]]] = [[[] for _ in range(n)] for _ in requests]
        self.left = [n] * len(requests)

    def finish(self, i: int, s: int, text: str, ids: list[int], ended: bool) -> Completion | None:
        self.texts[i][s], self.tokens[i][s], self.ids[i][s] = text, len(ids) - ended, ids
        self.left[i] -= 1
        if self.left[i]:
            return None
        return Completion(self.requests[i].key, self.texts[i], self.tokens[i], self.ids[i])


class HFBackend:
    """A transformers causal LM: continuous batching (`generate`), one streamed answer at once (`stream`)."""

    name = "hf"

    def __init__(self, model: str, precision: str = "auto", batch_size: int = 16, model_obj=None, tok=None):
        self.tok = tok or load_tokenizer(model)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = torch.bfloat16 if use_bf16(precision) else torch.float32
        if model_obj is None:
            model_obj = AutoModelForCausalLM.from_pretrained(resolve(model), dtype=self.dtype)
        self.model = model_obj.to(self.device).eval()
        self.batch_size = batch_size
        ids = self.model.generation_config.eos_token_id
        self.eos = ({ids} if isinstance(ids, int) else set(ids or [])) | ({self.tok.eos_token_id} - {None})
        self.max_prompt_tokens: int | None = None
        self.lock = threading.Lock()  # one streamed generation at a time

    def encode(self, msgs: Messages) -> list[int]:
        return template_ids(self.tok, msgs, add_generation_prompt=True)

    def forward(self, ids, mask, pos, cache) -> torch.Tensor:
        """Logits of the last position of each row, extending `cache`."""
        ids, mask, pos = (t.to(self.device) for t in (ids, mask, pos))
        kw = {"cache": cache, "use_cache": True, "logits_to_keep": 1}
        return self.model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw).logits[:, -1]

    @torch.inference_mode()
    def generate(self, requests: list[Request], sampling: Sampling) -> Iterator[Completion]:
        gen = torch.Generator().manual_seed(sampling.seed)
        # queue of (request, sample, prompt ids); pop() takes the shortest, so prefill batches pad little
        prompts = [r.ids if r.ids is not None else self.encode(r.messages) for r in requests]
        queue = [(i, s, p) for i, p in enumerate(prompts) for s in range(sampling.n)]
        queue = sorted(queue, key=lambda q: len(q[2]))[::-1]
        results, run = Results(requests, sampling.n), None
        while queue or run:
            free = self.batch_size - (len(run.rows) if run else 0)
            # 1. refill once an eighth of the slots idle (or none run): a prefill costs about one decode step
            if queue and (run is None or free >= max(1, self.batch_size // 8)):
                new = self.prefill([queue.pop() for _ in range(min(free, len(queue)))], sampling, gen)
                start = len(run.rows) if run else 0
                run = new if run is None else run.merge(new)
                fresh = range(start, len(run.rows))  # only the new rows got a token
            else:  # 2. one decode step for every running row
                self.decode(run, sampling, gen)
                fresh = range(len(run.rows))
            # 3. record the new tokens; retire rows that hit EOS or the length cap
            yield from self.retire(run, fresh, results, sampling.max_new_tokens)
            if not run.rows:
                run = None

    def prefill(self, take: list[tuple[int, int, list[int]]], sampling: Sampling, gen) -> Running:
        """Left-padded prompts through the model into a fresh cache, and the first token of each."""
        prompts = [t[2] for t in take]
        width = max(map(len, prompts))
        ids = torch.tensor([[self.tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        m = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        cache = DynamicCache(config=self.model.config)
        cache.layers = [SlackLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
        logits = self.forward(ids, m, (m.cumsum(-1) - 1).clamp(min=0), cache)
        first = sample_next(logits, sampling.temperature, sampling.top_p, gen).cpu()
        return Running([(t[0], t[1]) for t in take], [[] for _ in take], cache, m, m.sum(-1), first)

    def decode(self, run: Running, sampling: Sampling, gen) -> None:
        run.mask = torch.cat([run.mask, torch.ones(len(run.rows), 1, dtype=run.mask.dtype)], dim=1)
        logits = self.forward(run.last[:, None], run.mask, run.pos[:, None], run.cache)
        run.pos = run.pos + 1
        run.last = sample_next(logits, sampling.temperature, sampling.top_p, gen).cpu()

    def retire(self, run: Running, fresh: range, results: Results, max_new: int) -> Iterator[Completion]:
        keep = [j for j in range(len(run.rows)) if j not in fresh]
        new_tokens = run.last.tolist()
        for j in fresh:
            tok_id, out = new_tokens[j], run.out_ids[j]
            ended = tok_id in self.eos
            if not ended:
                out.append(tok_id)
            if not ended and len(out) < max_new:
                keep.append(j)
                continue
            text = self.tok.decode(out, skip_special_tokens=True)
            if done := results.finish(*run.rows[j], text, out + [tok_id] if ended else out, ended):
                yield done
        if not keep:
            run.rows = []  # the caller drops the batch
        elif len(keep) < len(run.rows):
            run.keep(sorted(keep), self.device)

    def stream(self, messages: Messages, s: Sampling) -> Iterator[Piece]:
        """One answer in pieces from a worker thread, stopped on close; PromptTooLong over the limit."""
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        stop, result = threading.Event(), {}

        class Stop(StoppingCriteria):  # ends generation once the consumer has gone (blocked, disconnected)
            def __call__(self, input_ids, scores, **kw):
                return torch.full((input_ids.shape[0],), stop.is_set(), device=input_ids.device)

        def work():
            try:
                with self.lock, torch.inference_mode():
                    result["tokens"] = self.generate_one(messages, s, streamer, Stop())
            except BaseException as e:  # handed to the consumer, whose streamer must not wait forever
                result["error"] = e
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield from ((text, None) for text in streamer if text)
        finally:
            stop.set()
        thread.join()
        if "error" in result:
            raise result["error"]
        yield "", "length" if result["tokens"] >= s.max_new_tokens else "stop"

    def generate_one(self, messages: Messages, s: Sampling, streamer, stop: StoppingCriteria) -> int:
        """transformers' `generate` for one prompt into `streamer`; returns the tokens generated."""
        ids = self.encode(messages)
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            msg = f"the prompt has {len(ids)} tokens, over max_prompt_tokens={self.max_prompt_tokens}"
            raise PromptTooLong(msg)
        if s.seed is not None:
            torch.manual_seed(s.seed)
        x = torch.tensor([ids], device=self.device)
        kw = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p}
        kw = kw if s.temperature > 0 else {"do_sample": False}
        kw |= {"max_new_tokens": s.max_new_tokens, "streamer": streamer}
        stops = StoppingCriteriaList([stop])
        out = self.model.generate(x, attention_mask=torch.ones_like(x), stopping_criteria=stops, **kw)
        return out.shape[1] - len(ids)
