"""The OpenAI-compatible client (alignkit.gen.endpoint) against scripted transports: answers, order under
concurrency, retry with backoff on 429/5xx and transport errors, no retry on a 4xx, timeouts, streams,
logprobs, and the Backend protocol over it."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from alignkit.gen import Request, Sampling
from alignkit.gen import endpoint as ep
from alignkit.gen.endpoint import Endpoint, EndpointBackend, EndpointError, parse_spec
from alignkit.gen.generate import make_backend


def completion(text: str, logprobs=None, tokens: int = 3) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {"choices": [choice], "usage": {"completion_tokens": tokens}}


def endpoint(handler, **kw) -> Endpoint:
    return Endpoint("http://test/v1", "m", api_key_env="", transport=httpx.MockTransport(handler), **kw)


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    waited: list[float] = []
    monkeypatch.setattr(ep.time, "sleep", waited.append)
    return waited


def test_chat_sends_the_request_and_reads_the_answer():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, json.loads(request.content)))
        return httpx.Response(200, json=completion("hello"))

    (got,) = endpoint(handler).chat(
        [{"role": "user", "content": "hi"}], Sampling(temperature=0, max_new_tokens=5)
    )
    assert (got.text, got.finish_reason, got.tokens, got.top_logprobs) == ("hello", "stop", 3, None)
    path, body = seen[0]
    assert path == "/v1/chat/completions" and body["model"] == "m" and body["max_tokens"] == 5
    assert body["temperature"] == 0 and body["stream"] is False and "n" not in body and "logprobs" not in body


def test_logprobs_are_asked_for_and_parsed():
    lp = [
        {
            "token": "(A",
            "logprob": -0.1,
            "top_logprobs": [{"token": "(A", "logprob": -0.1}, {"token": "(B", "logprob": -2.4}],
        },
        {"token": ")", "logprob": -0.01, "top_logprobs": [{"token": ")", "logprob": -0.01}]},
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["logprobs"] is True and body["top_logprobs"] == 2
        return httpx.Response(200, json=completion("(A)", lp))

    (got,) = endpoint(handler).chat([{"role": "user", "content": "A or B?"}], Sampling(), logprobs=2)
    assert got.top_logprobs == [{"(A": -0.1, "(B": -2.4}, {")": -0.01}] and got.tokens == 2


def test_chat_many_keeps_the_order_with_requests_in_flight():
    lock, active, peak = threading.Lock(), [0], [0]
    release = threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            if active[0] == 3:
                release.set()
        release.wait(5)  # the first three wait for each other: they must be in flight together
        with lock:
            active[0] -= 1
        text = json.loads(request.content)["messages"][0]["content"]
        return httpx.Response(200, json=completion(text.upper()))

    convs = [[{"role": "user", "content": w}] for w in ("a", "b", "c", "d", "e")]
    got = endpoint(handler, concurrency=3).chat_many(convs, Sampling())
    assert [c[0].text for c in got] == ["A", "B", "C", "D", "E"] and peak[0] == 3


def test_retries_with_exponential_backoff_then_succeeds(sleeps):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ConnectError("refused")
        if len(calls) == 2:
            return httpx.Response(503, text="busy")
        if len(calls) == 3:
            return httpx.Response(429, headers={"retry-after": "2.5"}, text="slow down")
        return httpx.Response(200, json=completion("ok"))

    (got,) = endpoint(handler, retries=3, backoff=0.5).chat([{"role": "user", "content": "x"}], Sampling())
    # attempt 0 → 0.5 s, attempt 1 → 0.5·2 = 1 s, attempt 2: the server's Retry-After of 2.5 s
    assert got.text == "ok" and sleeps == [0.5, 1.0, 2.5]


def test_a_client_error_is_not_retried_and_names_the_status(sleeps):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, text="bad model")

    with pytest.raises(EndpointError, match="answered 400: bad model") as e:
        endpoint(handler, retries=3).chat([{"role": "user", "content": "x"}], Sampling())
    assert e.value.status == 400 and not e.value.timeout and sleeps == []


def test_a_server_that_keeps_failing_gives_up_after_the_retries(sleeps):
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("silent")

    with pytest.raises(EndpointError, match="silent for") as e:
        endpoint(handler, retries=2, backoff=0.1).chat([{"role": "user", "content": "x"}], Sampling())
    assert e.value.timeout and sleeps == [0.1, 0.2]


def test_garbage_is_an_endpoint_error():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>proxy error</html>")

    with pytest.raises(EndpointError, match="not a chat completion"):
        endpoint(handler).chat([{"role": "user", "content": "x"}], Sampling())


def sse(*chunks: dict) -> bytes:
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks).encode() + b"data: [DONE]\n\n"


def test_stream_yields_pieces_and_the_finish_reason():
    def handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["stream"] is True
        body = sse(
            {"choices": [{"delta": {"role": "assistant"}}]},
            {"choices": [{"delta": {"content": "Hel"}}]},
            {"choices": [{"delta": {"content": "lo"}, "finish_reason": "length"}]},
        )
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    pieces = list(endpoint(handler).stream([{"role": "user", "content": "x"}], Sampling()))
    assert pieces == [("Hel", None), ("lo", None), ("", "length")]


def test_an_error_inside_a_stream_is_an_endpoint_error():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse({"error": {"message": "overloaded"}}))

    with pytest.raises(EndpointError, match="overloaded"):
        list(endpoint(handler).stream([{"role": "user", "content": "x"}], Sampling()))


def test_the_backend_protocol_over_an_endpoint():
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        words = body["messages"][-1]["content"].split()
        choices = [completion(" ".join(words[: k + 1]))["choices"][0] for k in range(body["n"])]
        return httpx.Response(200, json={"choices": choices})

    backend = EndpointBackend(endpoint(handler))
    reqs = [
        Request("a", [{"role": "user", "content": "one two three"}]),
        Request("b", [{"role": "user", "content": "x y"}]),
    ]
    got = {c.key: c for c in backend.generate(reqs, Sampling(n=2))}
    assert (
        got["a"].texts == ["one", "one two"] and got["a"].tokens == [1, 2] and got["b"].texts == ["x", "x y"]
    )


def test_endpoint_specs():
    assert parse_spec("openai:http://localhost:8001/v1#llama-3-8b") == (
        "http://localhost:8001/v1",
        "llama-3-8b",
    )
    for bad in ("openai:localhost:8001#m", "openai:http://h/v1", "openai:http://h/v1#"):
        with pytest.raises(ValueError, match="expected openai:"):
            parse_spec(bad)
    backend = make_backend("hf", "openai:http://127.0.0.1:9/v1#judge")  # no model is loaded for an endpoint
    assert isinstance(backend, EndpointBackend) and backend.endpoint.model == "judge"


def test_an_unreachable_endpoint_stops_the_job_with_exit_1(tmp_path, sleeps, capsys):
    from conftest import write_jsonl

    from alignkit import cli

    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hi"}])
    argv = [
        "generate",
        "--model",
        "openai:http://127.0.0.1:9/v1#m",
        "--in",
        str(src),
        "--out",
        str(tmp_path / "o.jsonl"),
    ]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "alignkit generate: stopped: endpoint unreachable" in err and sleeps == [0.5, 1.0, 2.0]
    assert cli.main([*argv[:2], "openai:localhost#m", *argv[3:]]) == 2  # a malformed spec is a usage error
