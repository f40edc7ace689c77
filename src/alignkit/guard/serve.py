"""`alignkit serve`: an OpenAI-compatible chat endpoint with the guard pipeline around every call. Per
request: input checks judge the last user message (a block answers the refusal with finish_reason
"content_filter"); the rules go into the system prompt; a local model or an upstream answers; output checks
judge it. A streamed piece is released only after an output check of all text up to it passed."""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types at run time.
import hmac
import itertools
import json
import logging.handlers
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import prometheus_client as prom
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .. import config as cfglib
from ..data import last_user
from ..gen import Piece, PromptTooLong, Sampling
from ..gen.endpoint import Endpoint, EndpointError
from ..gen.hf import HFBackend
from .config import GuardConfig, build_pipeline
from .pipeline import GuardResult, Pipeline, Verdict, inject


def is_refusal(v) -> bool:
    """guard.RefusalCheck marks a refusal by category: over_refusal (flagged) or refusal (a right one)."""
    return v.category == "refusal" or (v.flagged and v.category == "over_refusal")


ROUTES = ("/v1/chat/completions", "/v1/models", "/v1/guard/check", "/metrics", "/healthz")
DONE = "data: [DONE]\n\n"


@dataclass
class ServeConfig:
    """Serve a chat model, or guard an upstream endpoint, behind the guard pipeline."""

    model: str = "default"
    """Local model (hub id, folder or 'default'); with `upstream`, the model name asked of the upstream."""
    upstream: str | None = None
    """Base URL of an OpenAI-compatible endpoint to guard instead of a local model (http://host:8001/v1)."""
    upstream_key_env: str = "UPSTREAM_API_KEY"
    """Environment variable holding the upstream's API key (unset: no key is sent)."""
    upstream_timeout: float = 60.0
    """Seconds to wait on the upstream (to connect, and between streamed bytes) before answering 504."""
    guard: str = "default"
    """Guard YAML (GuardConfig keys), 'default' (the default guard) or 'none' (no checks: a bare model)."""
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0: every interface)."""
    port: int = 8000
    """Port to listen on."""
    api_key_env: str = "ALIGNKIT_API_KEY"
    """Environment variable holding the keys clients may send as `Authorization: Bearer <key>`,
    comma-separated (several clients, or a key rotation); unset or empty: no auth. /healthz is always open."""
    max_body_bytes: int = 1_000_000
    """Larger request bodies are refused with 413 before they are parsed."""
    max_prompt_tokens: int = 4096
    """Longer prompts (chat template included) are refused with 422; local model only."""
    max_new_tokens: int = 512
    """Cap on, and default of, a request's max_tokens."""
    temperature: float = 0.7
    """Sampling temperature of requests that set none; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass of requests that set none."""
    check_timeout: float = 30.0
    """Seconds one stage's checks may take (a hung classifier); past it the request is answered as the
    guard's fail_closed says: blocked, or let through with an `error` verdict. 0: no limit."""
    stream_check_chars: int = 200
    """Streaming: output checks run every this many new characters and at the end; text waits for a pass."""
    log_file: str = "runs/serve/flagged.jsonl"
    """JSON-lines log of flagged and blocked events, rotated; empty: no log."""
    log_text: bool = False
    """Also write the prompt and response (first 500 characters) into the flagged log; off: verdicts only."""
    log_max_bytes: int = 10_000_000
    """Size at which the flagged log rotates."""
    log_backups: int = 3
    """Rotated flagged logs kept (flagged.jsonl.1, ...)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Local weights' dtype: auto = bf16 on GPUs and CPUs with native bf16, else fp32."""

    def __post_init__(self) -> None:
        if self.upstream and self.model == "default":
            raise ValueError("with upstream set, model must name the upstream's model")
        if min(self.max_body_bytes, self.max_prompt_tokens, self.max_new_tokens, self.stream_check_chars) < 1:
            raise ValueError("max_body_bytes, max_prompt_tokens, max_new_tokens, stream_check_chars: ≥ 1")
        if not (0 <= self.port <= 65535 and self.upstream_timeout > 0 and 0 < self.top_p <= 1):
            raise ValueError("port must be in 0..65535, upstream_timeout > 0, top_p in (0, 1]")


class ApiError(Exception):
    """An error answered the way OpenAI answers: HTTP `status` and {"error": {message, type, code}}."""

    def __init__(self, status: int, msg: str, kind="invalid_request_error", code=None, param=None):
        super().__init__(msg)
        self.status, self.body = (
            status,
            {"error": {"message": msg, "type": kind, "param": param, "code": code}},
        )


def pieces(backend, messages: list[dict], s: Sampling) -> Iterator[Piece]:
    """The backend's answer as pieces, its failures as the API's errors (422, 502, 504)."""
    try:
        yield from backend.stream(messages, s)
    except PromptTooLong as e:
        raise ApiError(422, str(e), code="context_length_exceeded") from None
    except EndpointError as e:
        status, kind = (504, "upstream_timeout") if e.timeout else (502, "upstream_error")
        raise ApiError(status, str(e).replace("endpoint", "upstream", 1), kind) from None


class Metrics:
    """Prometheus metrics in the app's own registry; refusal rate = refusals_total / responses_total."""

    def __init__(self):
        self.registry = r = prom.CollectorRegistry()
        self.requests = prom.Counter("alignkit_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        hist = prom.Histogram
        self.request_seconds = hist("alignkit_request_seconds", "To response start", ["endpoint"], registry=r)
        self.guard_seconds = hist("alignkit_guard_seconds", "One guard stage", ["stage"], registry=r)
        self.blocks = prom.Counter("alignkit_blocks", "Blocks", ["stage", "category"], registry=r)
        self.flags = prom.Counter("alignkit_flags", "Flagged verdicts", ["stage", "category"], registry=r)
        self.responses = prom.Counter("alignkit_responses", "Answers judged by output checks", registry=r)
        self.refusals = prom.Counter("alignkit_refusals", "Answers judged refusals", registry=r)


class Strict(BaseModel):
    """Request bodies (unknown fields, e.g. tools, are ignored as OpenAI does). Strict: "1" is no number."""

    model_config = ConfigDict(strict=True)


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None


class ChatRequest(Strict):
    model: str = ""
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stream: bool | None = False
    n: int = Field(1, ge=1)
    stream_options: dict | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class GuardCheckRequest(Strict):
    prompt: str
    response: str | None = None


def text_of(content: str | list[dict] | None) -> str:
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    return content or ""


def flag_log(cfg: ServeConfig) -> logging.Logger | None:
    if not cfg.log_file:
        return None
    Path(cfg.log_file).parent.mkdir(parents=True, exist_ok=True)
    log = logging.Logger(f"alignkit.serve.flagged:{cfg.log_file}", logging.INFO)  # unregistered: one per app
    h = logging.handlers.RotatingFileHandler(cfg.log_file, "a", cfg.log_max_bytes, cfg.log_backups, "utf-8")
    h.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(h)
    return log


class Server:
    """The guarded chat flow apart from HTTP: chat() returns a JSON body or an iterator of SSE lines."""

    def __init__(self, cfg: ServeConfig, pipeline: Pipeline | None = None, backend=None):
        if pipeline is None:
            named = {"default": GuardConfig(), "none": GuardConfig(patterns=[], checks=[])}
            pipeline = build_pipeline(named.get(cfg.guard) or cfglib.load(GuardConfig, cfg.guard))
        if backend is None and cfg.upstream:
            # always streamed, so that a blocked answer is cut off early; never retried: the client decides
            backend = Endpoint(cfg.upstream, cfg.model, cfg.upstream_key_env, cfg.upstream_timeout, retries=0)
        elif backend is None:
            backend = HFBackend(cfg.model, cfg.precision, batch_size=1)
            backend.max_prompt_tokens = cfg.max_prompt_tokens
        self.cfg, self.pipe, self.backend = cfg, pipeline, backend
        self.metrics, self.log, self.pool = (
            Metrics(),
            flag_log(cfg),
            futures.ThreadPoolExecutor(64, "guard-check"),
        )
        self.model_id = Path(cfg.model).name if os.path.isdir(cfg.model) else cfg.model
        self.started = int(time.time())

    def check(self, rid: str, stage: str, prompt: str, response: str | None = None, final=True):
        """One guard stage, timed; only final or blocking results count in the metrics and the flagged log."""
        t0, pipe, limit = time.perf_counter(), self.pipe, self.cfg.check_timeout
        run = lambda: pipe.check_input(prompt) if stage == "input" else pipe.check_output(prompt, response)  # noqa: E731
        try:  # with a limit, on the check pool, so that a hung check can be given up on
            res = self.pool.submit(run).result(timeout=limit) if limit else run()
        except futures.TimeoutError:  # the check's thread is left to finish; the request is answered now
            why = f"the {stage} checks took over check_timeout={limit} s"
            v = Verdict("timeout", pipe.fail_closed, float(pipe.fail_closed), "error", why)
            text = pipe.refusal_text if pipe.fail_closed else prompt if stage == "input" else response
            res = GuardResult(stage, text, pipe.fail_closed, [v])
        self.metrics.guard_seconds.labels(stage).observe(time.perf_counter() - t0)
        if final or res.blocked:
            self.record(rid, res, prompt, response)
        return res

    def record(self, rid: str, res: GuardResult, prompt: str, response: str | None) -> None:
        m, flagged = self.metrics, [v for v in res.verdicts if v.flagged]
        if res.stage == "output":
            m.responses.inc()
            if any(is_refusal(v) for v in res.verdicts):
                m.refusals.inc()
        for v in flagged:
            m.flags.labels(res.stage, v.category or v.name).inc()
        if res.blocked:  # the blocking verdict is the last: a block ends the stage
            m.blocks.labels(res.stage, res.verdicts[-1].category or res.verdicts[-1].name).inc()
        if self.log and (flagged or res.blocked):
            verdicts = [v.as_dict() for v in res.verdicts]
            event = {"time": datetime.now(timezone.utc).isoformat(), "request_id": rid, "stage": res.stage}
            event |= {"blocked": res.blocked, "score": res.score, "verdicts": verdicts}
            if self.cfg.log_text:  # prompts and responses are the users' data: kept out unless asked for
                event |= {"prompt": prompt[:500], "response": response and response[:500]}
            self.log.info(json.dumps(event, ensure_ascii=False))

    def guard_check(self, prompt: str, response: str | None) -> dict:
        rid = f"guard-{uuid.uuid4().hex}"
        inp = self.check(rid, "input", prompt)
        out = None if response is None else self.check(rid, "output", prompt, response)
        both = [r for r in (inp, out) if r is not None]
        res = {"input": inp.as_dict(), "output": out and out.as_dict()}
        return res | {"flagged": any(r.flagged for r in both), "blocked": any(r.blocked for r in both)}

    async def chat(self, body) -> dict | Iterator[str]:
        req, cfg, rid = ChatRequest.model_validate(body), self.cfg, f"chatcmpl-{uuid.uuid4().hex}"
        if req.n > 1:
            msg = f"n={req.n}: this server returns one choice per request; send {req.n} requests instead"
            raise ApiError(400, msg, param="n", code="n_unsupported")
        if req.logprobs and (req.stream or not isinstance(self.backend, HFBackend)):
            msg = "logprobs are served for a local model's non-streamed answers"
            raise ApiError(400, msg, code="logprobs")
        roles = {"developer": "system"}  # OpenAI's newer name for the one chat templates know
        msgs = [{"role": roles.get(m.role, m.role), "content": text_of(m.content)} for m in req.messages]
        prompt = last_user(msgs)
        # 1. input checks; a blocked prompt never reaches the model
        inp = await run_in_threadpool(self.check, rid, "input", prompt)
        usage = req.stream_options and req.stream_options.get("include_usage") if req.stream else True
        count = (lambda text: self.usage(msgs, text)) if usage else None
        if inp.blocked:
            guard = {"input": inp.as_dict()}
            usage = count(inp.text) if count else None
            return self.reply(rid, bool(req.stream), inp.text, "content_filter", guard, usage=usage)
        # 2. deployment rules into the system prompt, then generation (CPU-bound: in worker threads)
        if self.pipe.context is not None:
            msgs = inject(msgs, self.pipe.context)
        cap = cfg.max_new_tokens
        max_tokens = min(req.max_completion_tokens or req.max_tokens or cap, cap)
        temperature = cfg.temperature if req.temperature is None else req.temperature
        s = Sampling(1, temperature, cfg.top_p if req.top_p is None else req.top_p, max_tokens, req.seed)
        answer = pieces(self.backend, msgs, s)
        first = await run_in_threadpool(next, answer, ("", "stop"))  # errors before any text get a status
        if req.stream:
            return self.sse(rid, prompt, inp, first, answer, count)
        # 3. output checks on the whole answer
        text, finish = await run_in_threadpool(collect, first, answer)
        out = await run_in_threadpool(self.check, rid, "output", prompt, text)
        guard = {"input": inp.as_dict(), "output": out.as_dict()}
        lp = None
        if req.logprobs:
            lp = await run_in_threadpool(token_logprobs, self.backend, msgs, out.text, req.top_logprobs or 0)
        finish = "content_filter" if out.blocked else finish
        return self.reply(rid, False, out.text, finish, guard, lp, await run_in_threadpool(count, out.text))

    def usage(self, msgs: list[dict], text: str) -> dict | None:
        """OpenAI's token counts, by the local model's tokenizer (None for an upstream: no tokenizer here)."""
        if not hasattr(self.backend, "encode"):
            return None
        prompt = len(self.backend.encode(msgs))
        completion = len(self.backend.tok(text, add_special_tokens=False)["input_ids"])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse(self, rid: str, prompt: str, inp: GuardResult, first: Piece, rest: Iterator[Piece], count=None):
        """SSE lines of the answer, held back until checked; a block stops it and ends with the refusal."""
        yield self.chunk(rid, {"role": "assistant", "content": ""})
        text, checked, sent, shown = "", 0, "", ""
        try:
            for delta, finish in itertools.chain([first], rest):
                text += delta
                if finish is None and len(text) - checked < self.cfg.stream_check_chars:
                    continue
                checked = len(text)
                out = self.check(rid, "output", prompt, text, final=finish is not None)
                guard = {"input": inp.as_dict(), "output": out.as_dict()}
                # a rewrite reaching back into released text cannot be taken back: withhold the rest
                if out.blocked or not out.text.startswith(sent):
                    shown = sent + ("\n\n" if sent else "") + self.pipe.refusal_text
                    yield self.chunk(rid, {"content": shown[len(sent) :]})
                    yield self.chunk(rid, {}, "content_filter", guard=guard)
                    break
                if len(out.text) > len(sent):
                    yield self.chunk(rid, {"content": out.text[len(sent) :]})
                    sent = out.text
                if finish is not None:
                    shown = sent
                    yield self.chunk(rid, {}, finish, guard=guard)
            if count is not None and (usage := count(shown)) is not None:  # include_usage: as OpenAI sends it
                yield self.chunk(rid, None, usage=usage)  # a last chunk with no choices
        except ApiError as e:  # the status line is long gone: the error goes in-band, as OpenAI does
            yield f"data: {json.dumps(e.body)}\n\n"
        finally:
            rest.close()  # stops the local model's generation, or closes the upstream's stream
        yield DONE

    def reply(
        self, rid: str, stream: bool, text: str, finish: str, guard: dict, lp=None, usage=None
    ) -> dict | Iterator[str]:
        guard = {"input": None, "output": None} | guard
        if stream:
            role = {"role": "assistant", "content": text}
            tail = [self.chunk(rid, None, usage=usage)] if usage is not None else []
            return iter([self.chunk(rid, role), self.chunk(rid, {}, finish, guard=guard), *tail, DONE])
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        choice |= {"logprobs": {"content": lp}} if lp is not None else {}
        return {**self.head(rid, "chat.completion"), "choices": [choice], "usage": usage, "guard": guard}

    def chunk(self, rid: str, delta: dict | None, finish: str | None = None, **extra) -> str:
        """One SSE line; delta None: the usage chunk, with no choices."""
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        body = {**self.head(rid, "chat.completion.chunk"), "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n"

    def head(self, rid: str, obj: str) -> dict:
        return {"id": rid, "object": obj, "created": int(time.time()), "model": self.model_id}


def token_logprobs(backend: HFBackend, messages: list[dict], text: str, k: int) -> list[dict]:
    """OpenAI's `logprobs.content` of `text` answering `messages`: each token's and the top k, one pass."""
    tok, ans = backend.tok, backend.tok(text, add_special_tokens=False)["input_ids"]
    if not ans:
        return []
    x = torch.tensor([backend.encode(messages) + ans], device=backend.device)
    with backend.lock, torch.inference_mode():
        logp = backend.model(input_ids=x, logits_to_keep=len(ans) + 1).logits[0, :-1].float().log_softmax(-1)
    out = []
    for t, i in enumerate(ans):
        v, ids = (a.tolist() for a in logp[t].topk(k))
        top = [{"token": tok.decode([j]), "logprob": p} for p, j in zip(v, ids, strict=True)]
        out.append({"token": tok.decode([i]), "logprob": logp[t, i].item(), "top_logprobs": top})
    return out


def collect(first: Piece, rest: Iterator[Piece]) -> tuple[str, str]:
    text, finish = first
    for delta, fin in rest:
        text, finish = text + delta, fin or finish
    return text, finish or "stop"


async def read_json(request, limit: int):
    """The body parsed as JSON; 413 past `limit` bytes, by Content-Length and by the bytes read."""
    too_big = ApiError(413, f"request body over max_body_bytes={limit}", code="request_too_large")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_big
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_big
    try:
        return json.loads(body)
    except ValueError as e:
        raise ApiError(422, f"malformed JSON: {e}", code="invalid_json") from None


def error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body, status_code=e.status)


def invalid(request, e) -> JSONResponse:
    why = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()[:5])
    return error(ApiError(422, why, code="invalid_request"))


def create_app(cfg: ServeConfig, pipeline: Pipeline | None = None, backend=None) -> FastAPI:
    """The FastAPI app; `pipeline` and `backend` (anything with stream(messages, sampling)) for tests."""
    srv = Server(cfg, pipeline, backend)
    app = FastAPI(title="alignkit serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    app.add_exception_handler(ApiError, lambda request, e: error(e))
    app.add_exception_handler(HTTPException, lambda request, e: error(ApiError(e.status_code, str(e.detail))))
    app.add_exception_handler(ValidationError, invalid)
    app.add_exception_handler(RequestValidationError, invalid)

    @app.middleware("http")
    async def gate(request: Request, call_next):
        """Auth (a constant-time compare; /healthz open), then request counts and latency by endpoint."""
        t0, path = time.perf_counter(), request.url.path
        keys = [k.strip() for k in os.environ.get(cfg.api_key_env, "").split(",") if k.strip()]
        sent = request.headers.get("authorization", "").encode()
        # every key is compared, in constant time, so the time taken says nothing about which one is near
        good = [hmac.compare_digest(sent, f"Bearer {k}".encode()) for k in keys]
        if keys and path != "/healthz" and not any(good):
            msg = "missing or wrong API key (send Authorization: Bearer <key>)"
            response = error(ApiError(401, msg, "authentication_error", "invalid_api_key"))
        else:
            try:
                response = await call_next(request)
            except Exception as e:
                logging.getLogger("alignkit.serve").exception("request failed")
                response = error(ApiError(500, f"internal error ({type(e).__name__})", "server_error"))
        endpoint = path if path in ROUTES else "other"
        srv.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        srv.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        out = await srv.chat(await read_json(request, cfg.max_body_bytes))
        if isinstance(out, dict):
            return JSONResponse(out)
        return StreamingResponse(out, media_type="text/event-stream")

    @app.post("/v1/guard/check")
    async def guard_check(request: Request):
        req = GuardCheckRequest.model_validate(await read_json(request, cfg.max_body_bytes))
        return await run_in_threadpool(srv.guard_check, req.prompt, req.response)

    @app.get("/v1/models")
    async def models():
        model = {"id": srv.model_id, "object": "model", "created": srv.started, "owned_by": "alignkit"}
        return {"object": "list", "data": [model]}

    @app.get("/metrics")
    async def metrics():
        return Response(prom.generate_latest(srv.metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": srv.model_id}

    return app


def run(cfg: ServeConfig) -> None:
    app = create_app(cfg)
    auth = "on" if cfg.api_key_env and os.environ.get(cfg.api_key_env) else "off"
    print(f"alignkit serve: {app.state.server.model_id} at http://{cfg.host}:{cfg.port}/v1 (auth {auth})")
    uvicorn.run(app, host=cfg.host, port=cfg.port)


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """`app` on uvicorn on a free loopback port in a thread, yielding its base URL (tests, benchmarks)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
