"""vLLM, where it is installed (GPU clusters): the Backend protocol over vLLM's own scheduler."""

from collections.abc import Iterator

from vllm import LLM, SamplingParams

from ..models import resolve
from . import Completion, Request, Sampling


class VLLMBackend:
    name = "vllm"

    def __init__(self, model: str, precision: str = "auto", batch_size: int = 16):
        dtype = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16"}[precision]
        self.llm = LLM(model=resolve(model), dtype=dtype, max_num_seqs=batch_size)

    def generate(self, requests: list[Request], sampling: Sampling) -> Iterator[Completion]:
        s = sampling
        params = SamplingParams(
            n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens, seed=s.seed
        )
        for r, out in zip(requests, self.llm.chat([r.messages for r in requests], params), strict=True):
            yield Completion(r.key, [o.text for o in out.outputs], [len(o.token_ids) for o in out.outputs])
