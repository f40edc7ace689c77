"""Reward aggregation: ensembles (Coste et al. 2023, arXiv:2310.02743) and the helpful/harmless priority
rule, plus `load_scorer`, which loads any reward folder alignkit writes and scores (prompt, response) pairs.

Folders:
  single RM     a plain HF sequence-classification model (num_labels=1)
  ensemble      ensemble.json + members/<k>/ (LoRA adapters on one base, or full models)
  priority      priority.json naming a harmless and a helpful reward folder and the threshold τ
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

Aggregation = Literal["mean", "min", "uwo"]


def aggregate(scores: Tensor, method: Aggregation, uwo_lambda: float = 1.0) -> Tensor:
    """Combine member scores (K, B) → (B,).

    mean: (1/K) Σ_k r_k.  min: worst case, min_k r_k (Coste et al. 2023, §3 "WCO").
    uwo:  mean − λ·Var_k r_k, uncertainty-weighted optimisation (Coste et al. 2023, Eq. 3), with the
          population variance (1/K) Σ (r_k − mean)².
    """
    if method == "mean":
        return scores.mean(0)
    if method == "min":
        return scores.min(0).values
    if method == "uwo":
        return scores.mean(0) - uwo_lambda * scores.var(0, unbiased=False)
    raise ValueError(f"unknown aggregation {method!r} (mean, min, uwo)")


def priority_combine(helpful: Tensor, harmless: Tensor, threshold: float = 0.0) -> Tensor:
    """Harmlessness gates helpfulness. With g = harmless − τ:

        R = g               if g < 0   (judged harmful: helpfulness is ignored, R < 0)
        R = softplus(helpful) if g ≥ 0   (judged harmless: R > 0, increasing in helpfulness)

    So every harmless response outranks every harmful one, a harmful response cannot buy reward with
    helpfulness, the less harmful of two harmful responses wins, and among harmless ones the more
    helpful wins. Shapes: (B,) → (B,).
    """
    g = harmless - threshold
    return torch.where(g < 0, g, F.softplus(helpful))


@dataclass
class Scores:
    score: list[float]
    scores: list[list[float]] | None = None  # per member, (B, K)
    std: list[float] | None = None


def _pad_batch(seqs: list[list[int]], pad_id: int):
    from .data import attention_mask, pad

    return pad(seqs, pad_id), attention_mask(seqs)


class RewardScorer:
    """Scores token sequences with one RM, an ensemble, or a priority pair of them."""

    def __init__(self, path: str | Path, bf16: bool | None = None, batch_size: int = 16):
        from .models import load_tokenizer
        from .training import use_bf16

        self.path = Path(path)
        self.bf16 = use_bf16("auto") if bf16 is None else bf16
        self.batch_size = batch_size
        if (self.path / "priority.json").exists():
            spec = json.loads((self.path / "priority.json").read_text())
            self.kind = "priority"
            self.parts = {
                k: RewardScorer(self.path / spec[k], self.bf16, batch_size) for k in ("helpful", "harmless")
            }
            self.threshold = float(spec.get("threshold", 0.0))
            self.tokenizer = self.parts["helpful"].tokenizer
            return
        if (self.path / "ensemble.json").exists():
            spec = json.loads((self.path / "ensemble.json").read_text())
            self.kind, self.aggregation, self.uwo_lambda = "ensemble", spec["aggregation"], spec["uwo_lambda"]
            self.members = self._load_members(spec)
            self.tokenizer = load_tokenizer(str(self.path))
        else:
            from .models import load_reward_model

            self.tokenizer = load_tokenizer(str(self.path))
            self.kind, self.members = (
                "single",
                [load_reward_model(str(self.path), self.tokenizer.pad_token_id)],
            )
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for m in self.members:
            m.to(self.device).eval()

    def _load_members(self, spec: dict) -> list:
        from .models import load_reward_model

        names = spec["members"]
        if spec["kind"] == "full":
            tok = json.loads((self.path / names[0] / "config.json").read_text()).get("pad_token_id")
            return [load_reward_model(str(self.path / n), tok) for n in names]
        from peft import PeftModel

        base = load_reward_model(spec["base"], spec["pad_token_id"])
        model = PeftModel.from_pretrained(base, str(self.path / names[0]), adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(str(self.path / n), adapter_name=n)
        self._adapters = names
        return [model]

    @torch.no_grad()
    def _member_scores(self, seqs: list[list[int]]) -> Tensor:
        """(K, B) raw scores, batched in length order."""
        pad_id = self.tokenizer.pad_token_id
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = torch.empty(self._k(), len(seqs))
        starts = range(0, len(order), self.batch_size)
        for s in tqdm(starts, desc="score", unit="batch", disable=len(starts) < 4):
            idx = order[s : s + self.batch_size]
            ids, mask = _pad_batch([seqs[i] for i in idx], pad_id)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                rs = self._forward_all(ids.to(self.device), mask.to(self.device))
            out[:, idx] = torch.stack([r.float().cpu() for r in rs])
        return out

    def _k(self) -> int:
        return len(getattr(self, "_adapters", None) or self.members)

    def _forward_all(self, ids: Tensor, mask: Tensor) -> list[Tensor]:
        adapters = getattr(self, "_adapters", None)
        if adapters:
            model, rs = self.members[0], []
            for a in adapters:
                model.set_adapter(a)
                rs.append(model(input_ids=ids, attention_mask=mask).logits[:, 0])
            return rs
        return [m(input_ids=ids, attention_mask=mask).logits[:, 0] for m in self.members]

    def score_ids(self, seqs: list[list[int]]) -> Scores:
        if self.kind == "priority":
            h = torch.tensor(self.parts["helpful"].score_ids(seqs).score)
            s = torch.tensor(self.parts["harmless"].score_ids(seqs).score)
            return Scores(priority_combine(h, s, self.threshold).tolist(), torch.stack([h, s], 1).tolist())
        raw = self._member_scores(seqs)
        if self.kind == "single":
            return Scores(raw[0].tolist())
        agg = aggregate(raw, self.aggregation, self.uwo_lambda)
        return Scores(agg.tolist(), raw.T.tolist(), raw.std(0, unbiased=False).tolist())

    def score(self, prompts: list, responses: list) -> Scores:
        from .data import _template, conversation

        return self.score_ids(
            [_template(self.tokenizer, conversation(p, r)) for p, r in zip(prompts, responses, strict=False)]
        )


def load_scorer(path: str | Path, **kw) -> RewardScorer:
    return RewardScorer(path, **kw)
