"""One client for OpenAI-compatible chat endpoints (vLLM, llama.cpp, TGI, `alignkit serve`, OpenAI): pooled,
streamed, retried. Any generating role can be one: `openai:URL#MODEL` (openai:http://localhost:8001/v1#m)."""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from ..config import ConfigError
from ..data import Messages
from . import Completion, Piece, Request, Sampling

ENDPOINT_PREFIX = "openai:"
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class EndpointError(RuntimeError):
    """The endpoint failed (after its retries): HTTP `status` (None: no usable answer), `timeout` (silent)."""

    def __init__(self, message: str, status: int | None = None, timeout: bool = False):
        super().__init__(message)
        self.status, self.timeout = status, timeout


@dataclass
class Choice:
    """One sampled answer: text, finish reason, length, and ([{token: logprob}] per position) top logprobs."""

    text: str
    finish_reason: str
    tokens: int
    top_logprobs: list[dict[str, float]] | None = None


def parse_spec(spec: str) -> tuple[str, str]:
    """`openai:URL#MODEL` → (base URL, model name)."""
    url, sep, model = spec.removeprefix(ENDPOINT_PREFIX).partition("#")
    if not url.startswith(("http://", "https://")) or not sep or not model:
        raise ConfigError(f"{spec!r}: expected openai:http(s)://HOST[:PORT]/v1#MODEL")
    return url, model


class Endpoint:
    """An OpenAI-compatible endpoint serving `model`. Thread-safe; one connection pool per instance."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        concurrency: int = 8,
        transport: httpx.BaseTransport | None = None,
    ):
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        kw = {"timeout": timeout, "headers": headers, "limits": limits, "transport": transport}
        self.client = httpx.Client(base_url=base_url.rstrip("/"), **kw)
        self.model, self.timeout, self.retries, self.backoff = model, timeout, retries, backoff
        self.concurrency = concurrency

    def body(
        self, messages: Messages, s: Sampling, logprobs: int | None = None, stream: bool = False
    ) -> dict:
        body = {"model": self.model, "messages": messages, "max_tokens": s.max_new_tokens, "stream": stream}
        body |= {"temperature": s.temperature, "top_p": s.top_p}
        body |= {"n": s.n} if s.n != 1 else {}
        body |= {"seed": s.seed} if s.seed is not None else {}
        body |= {"logprobs": True, "top_logprobs": logprobs} if logprobs is not None else {}
        return body

    def send(self, body: dict, stream: bool = False) -> httpx.Response:
        """POST /chat/completions; failures, 429 and 5xx retried after backoff·2^attempt s or Retry-After."""
        for attempt in itertools.count():
            retry_after = None
            try:
                req = self.client.build_request("POST", "/chat/completions", json=body)
                r = self.client.send(req, stream=stream)
            except httpx.TimeoutException:
                err = EndpointError(f"endpoint silent for {self.timeout} s", timeout=True)
            except httpx.HTTPError as e:
                err = EndpointError(f"endpoint unreachable: {type(e).__name__}: {e}")
            else:
                if r.status_code == 200:
                    return r
                text = r.read().decode(errors="replace")[:300]
                r.close()
                err = EndpointError(f"endpoint answered {r.status_code}: {text}", status=r.status_code)
                if r.status_code not in RETRY_STATUS:
                    raise err
                retry_after = r.headers.get("retry-after")
            if attempt >= self.retries:
                raise err
            time.sleep(seconds(retry_after) or self.backoff * 2**attempt)

    def chat(self, messages: Messages, s: Sampling, logprobs: int | None = None) -> list[Choice]:
        r = self.send(self.body(messages, s, logprobs))
        try:
            body = r.json()
            choices = body["choices"]
            per_choice = ((body.get("usage") or {}).get("completion_tokens") or 0) // max(len(choices), 1)
            return [choice(c, per_choice) for c in choices]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise EndpointError(f"not a chat completion: {type(e).__name__}: {e}", status=200) from None

    def chat_many(self, conversations: list[Messages], s: Sampling, logprobs: int | None = None):
        """Answers to many conversations, `concurrency` requests in flight, in the order given."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda m: self.chat(m, s, logprobs), conversations))

    def stream(self, messages: Messages, s: Sampling) -> Iterator[Piece]:
        """(text, None) pieces, then ("", finish reason); closing it ends the connection and generation."""
        r, finish = self.send(self.body(messages, s, stream=True), stream=True), None
        try:
            for line in r.iter_lines():
                data = line[5:].strip() if line.startswith("data:") else ""
                if data == "[DONE]":
                    break
                chunk = json.loads(data) if data else {}
                if "error" in chunk:
                    raise EndpointError(f"endpoint error: {chunk['error']}", status=200)
                c = (chunk.get("choices") or [{}])[0]
                finish = c.get("finish_reason") or finish
                if text := (c.get("delta") or {}).get("content"):
                    yield text, None
        except httpx.TimeoutException:
            raise EndpointError(f"endpoint silent for {self.timeout} s", timeout=True) from None
        except (httpx.HTTPError, ValueError, AttributeError) as e:
            raise EndpointError(f"endpoint error: {type(e).__name__}: {e}") from None
        finally:
            r.close()
        yield "", finish or "stop"


def seconds(retry_after: str | None) -> float | None:
    """A Retry-After header given in seconds (None for a date or nothing)."""
    try:
        return float(retry_after) if retry_after else None
    except ValueError:
        return None


def choice(c: dict, tokens: int = 0) -> Choice:
    """A chat completion's `choices[i]` as a Choice; `tokens`: the server's count, used without logprobs."""
    lp = (c.get("logprobs") or {}).get("content")
    top = [{t["token"]: t["logprob"] for t in pos.get("top_logprobs") or []} for pos in lp] if lp else None
    text = c["message"].get("content") or ""
    return Choice(text, c.get("finish_reason") or "stop", len(lp) if lp else tokens or len(text.split()), top)


class EndpointBackend:
    """The Backend protocol over an endpoint, one call per request; token counts: `usage`'s, else words."""

    name = "endpoint"

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint

    @classmethod
    def from_spec(cls, spec: str, **kw) -> EndpointBackend:
        return cls(Endpoint(*parse_spec(spec), **kw))

    def generate(self, requests: list[Request], sampling: Sampling) -> Iterator[Completion]:
        answers = self.endpoint.chat_many([r.messages for r in requests], sampling)
        for r, got in zip(requests, answers, strict=True):
            yield Completion(r.key, [c.text for c in got], [c.tokens for c in got])
