"""Generation: what every job that samples from a model shares. The `Backend` protocol and its records live
here; `hf`, `vllm` and `endpoint` (any OpenAI-compatible server) implement it; `generate` is the job."""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from ..data import Messages

Piece = tuple[str, str | None]
"""A streamed piece of an answer: (new text, finish reason), the reason None until the last piece."""


@dataclass(frozen=True)
class Sampling:
    n: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = 0


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
    """What probe, judge and training jobs need from a generator."""

    name: str

    def generate(self, requests: list[Request], sampling: Sampling) -> Iterator[Completion]:
        """Yield one Completion per request (n samples each), in any order, as they finish."""


class PromptTooLong(ValueError):
    """A prompt over the backend's token limit (the server answers it with 422)."""
