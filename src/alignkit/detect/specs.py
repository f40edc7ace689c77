"""Detector specs: one string names anything that scores texts in [0, 1] (higher = more likely unsafe),
and `detector(spec)` loads it as a function (prompts, texts) → scores, with its own threshold:
  default:NAME               a guard classifier that ships with alignkit (detect/weights/NAME)
  DIR                        a folder written by `alignkit guard train`
  hf:MODEL_DIR               any transformers sequence classifier (a Prompt Guard–style model, say)
  llamaguard:MODEL|URL       a Llama Guard–style generative judge over the S1–S14 hazards
  judge:KIND-refusal|harm    a probe judge (regex, learned) as a detector"""

import functools
from collections.abc import Callable, Sequence

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ..data import DataError
from . import classifiers
from .judges import make_judge

Detector = Callable[[list[str], list[str]], Sequence[float | None]]


class HFSequenceScorer:
    """A transformers classifier as a detector: P(`label`; default: class 1 of two), or 1 − P(X) for "!X"."""

    def __init__(self, path: str, label: str | None = None, max_length: int = 512):
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
        names = {v.lower(): int(k) for k, v in self.model.config.id2label.items()}
        self.negate = bool(label and label.startswith("!"))
        want = (label or "").lstrip("!").lower()
        if want and want not in names:
            raise DataError(path, None, "label", f"{want!r} is not a class (classes: {', '.join(names)})")
        if not want and len(names) != 2:
            raise DataError(path, None, "label", f"{len(names)} classes: name the unsafe one (hf:DIR:LABEL)")
        self.index, self.max_length = names[want] if want else 1, max_length

    def __call__(self, prompts: list[str], texts: list[str]) -> list[float]:
        enc = self.tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            p = self.model(**enc).logits.float().softmax(-1)[:, self.index]
        return (1 - p if self.negate else p).tolist()


def detector(spec: str, label: str | None = None) -> tuple[Detector, float]:
    """(detector, its own threshold) for a spec; `label` is hf:'s unsafe class or llamaguard:URL's model."""
    return load_detector(spec, label)


@functools.cache  # once a process, by spec and label: a pipeline names one detector several times
def load_detector(spec: str, label: str | None) -> tuple[Detector, float]:
    if spec.startswith("hf:"):
        try:
            return HFSequenceScorer(spec[3:], label), 0.5
        except OSError as e:  # no such folder, or not a model: name the spec, not a traceback
            raise DataError(spec, None, "classifier", f"cannot load the model ({e})") from None
    if spec.startswith("llamaguard:"):
        target = spec[len("llamaguard:") :]
        url = target if target.startswith(("http://", "https://")) else None
        return make_judge("llm", model=(label or target) if url else target, url=url).harm, 0.5
    if spec.startswith("judge:"):
        kind, _, head = spec[6:].partition("-")
        if head not in ("refusal", "harm"):
            raise DataError(spec, None, "classifier", "expected judge:KIND-refusal or judge:KIND-harm")
        return getattr(make_judge(kind), head), 0.5
    clf = classifiers.load(spec)
    return clf.p_unsafe, clf.threshold
