"""Rewards from any reward folder alignkit writes, behind one protocol: ensembles (Coste et al. 2023,
arXiv:2310.02743), the helpful/harmless priority rule, and `load_reward`. Folders:
  single RM     a plain HF sequence-classification model (num_labels=1)
  ensemble      ensemble.json + members/<k>/ (LoRA adapters on one base, or full models)
  priority      priority.json: reward folders in priority order (safety first, helpfulness last) and a
                threshold per tier but the last ({tiers, thresholds}; or {helpful, harmless, threshold})"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import ConfigError
from ..data import conversation, template_ids
from ..models import load_reward_model, load_tokenizer, use_bf16
from .batching import attention_mask, pad

Aggregation = Literal["mean", "min", "uwo"]


def aggregate(rewards: Tensor, method: Aggregation, uwo_lambda: float = 1.0) -> Tensor:
    """Member rewards (K, B) → (B,): mean; min, the worst case (Coste et al. 2023, §3 "WCO"); or uwo, mean −
    λ·Var_k r_k (population variance), uncertainty-weighted optimisation (Coste et al. 2023, Eq. 3)."""
    if method == "mean":
        return rewards.mean(0)
    if method == "min":
        return rewards.min(0).values
    if method == "uwo":
        return rewards.mean(0) - uwo_lambda * rewards.var(0, unbiased=False)
    raise ValueError(f"unknown aggregation {method!r} (mean, min, uwo)")


def priority_combine(helpful: Tensor, harmless: Tensor, threshold: float = 0.0) -> Tensor:
    """Harmlessness gates helpfulness, g = harmless − τ: R = g if g < 0 (harmful), else softplus(helpful) > 0.
    Every harmless response outranks every harmful one; helpfulness cannot buy back harm. (B,) → (B,)."""
    g = harmless - threshold
    return torch.where(g < 0, g, F.softplus(helpful))


def tiered_combine(rewards: list[Tensor], thresholds: list[float]) -> Tensor:
    """N tiers in priority order (e.g. safety > ethics > guidelines > helpfulness), bottom up: R_N = r_N,
    R_i = r_i − τ_i if r_i < τ_i, else softplus(R_{i+1}); no lower tier can buy back a failed higher one."""
    if len(thresholds) != len(rewards) - 1:
        raise ValueError(f"{len(rewards)} tiers need {len(rewards) - 1} thresholds, got {len(thresholds)}")
    out = rewards[-1]
    for r, t in zip(reversed(rewards[:-1]), reversed(thresholds), strict=True):
        out = priority_combine(out, r, t)
    return out


@dataclass
class Rewards:
    """Rewards of B responses, their parts (`member_k`, or `helpful` and `harmless`), an ensemble's spread."""

    reward: list[float]
    parts: dict[str, list[float]] | None = None
    std: list[float] | None = None


class Reward:
    """A reward folder, whatever its kind (single, ensemble, priority); what every kind shares."""

    kind = "folder"
    tokenizer: object

    def score_ids(self, seqs: list[list[int]]) -> Rewards:
        """Rewards of templated token sequences."""
        raise NotImplementedError

    def score(self, prompts: list, responses: list) -> Rewards:
        """Rewards of (prompt, response) pairs, through the tokenizer's chat template."""
        convs = [conversation(p, r) for p, r in zip(prompts, responses, strict=True)]
        return self.score_ids([template_ids(self.tokenizer, c) for c in convs])

    def set_aggregation(self, method: Aggregation | None, uwo_lambda: float | None) -> None:
        """Override how an ensemble combines its members (ConfigError for other kinds)."""
        if method or uwo_lambda is not None:
            msg = f"reward_aggregation and reward_uwo_lambda need an ensemble; this is {self.kind}"
            raise ConfigError(msg)

    def score_head(self) -> nn.Module | None:
        """The linear score head of a single reward model (to start a value head from), else None."""
        return None


class SingleReward(Reward):
    """One reward model (or, in EnsembleReward, several), batched forward passes in length order."""

    kind = "single"

    def __init__(self, models: list, tokenizer, bf16: bool, batch_size: int, k: int | None = None):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.models = [m.to(self.device).eval() for m in models]
        self.tokenizer, self.bf16, self.batch_size, self.k = tokenizer, bf16, batch_size, k or len(models)

    def forward(self, ids: Tensor, mask: Tensor) -> list[Tensor]:
        """Each member's rewards of one batch: [(B,)] * K."""
        return [m(input_ids=ids, attention_mask=mask).logits[:, 0] for m in self.models]

    @torch.no_grad()
    def member_rewards(self, seqs: list[list[int]]) -> Tensor:
        """(K, B) raw rewards, batched in length order."""
        pad_id = self.tokenizer.pad_token_id
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = torch.empty(self.k, len(seqs))
        starts = range(0, len(order), self.batch_size)
        for s in tqdm(starts, desc="score", unit="batch", disable=len(starts) < 4):
            idx = order[s : s + self.batch_size]
            batch = [seqs[i] for i in idx]
            ids, mask = pad(batch, pad_id).to(self.device), attention_mask(batch).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out[:, idx] = torch.stack([r.float().cpu() for r in self.forward(ids, mask)])
        return out

    def score_ids(self, seqs: list[list[int]]) -> Rewards:
        return Rewards(self.member_rewards(seqs)[0].tolist())

    def score_head(self) -> nn.Module | None:
        return getattr(self.models[0], "score", None)


class EnsembleReward(SingleReward):
    """K members combined by `aggregation`: LoRA adapters on one base (a pass per adapter) or full models."""

    kind = "ensemble"

    def __init__(self, path: Path, bf16: bool, batch_size: int):
        spec = json.loads((path / "ensemble.json").read_text())
        names = spec["members"]
        self.aggregation, self.uwo_lambda, self.adapters = spec["aggregation"], spec["uwo_lambda"], None
        if spec["kind"] == "full":
            pad_id = json.loads((path / names[0] / "config.json").read_text()).get("pad_token_id")
            models = [load_reward_model(str(path / n), pad_id) for n in names]
        else:
            base = load_reward_model(spec["base"], spec["pad_token_id"])
            model = PeftModel.from_pretrained(base, str(path / names[0]), adapter_name=names[0])
            for n in names[1:]:
                model.load_adapter(str(path / n), adapter_name=n)
            models, self.adapters = [model], names
        super().__init__(models, load_tokenizer(str(path)), bf16, batch_size, k=len(names))

    def forward(self, ids: Tensor, mask: Tensor) -> list[Tensor]:
        if not self.adapters:
            return super().forward(ids, mask)
        model, rs = self.models[0], []
        for a in self.adapters:
            model.set_adapter(a)
            rs.append(model(input_ids=ids, attention_mask=mask).logits[:, 0])
        return rs

    def score_ids(self, seqs: list[list[int]]) -> Rewards:
        raw = self.member_rewards(seqs)  # (K, B)
        parts = {f"member_{k}": r.tolist() for k, r in enumerate(raw)}
        agg = aggregate(raw, self.aggregation, self.uwo_lambda)
        return Rewards(agg.tolist(), parts, raw.std(0, unbiased=False).tolist())

    def set_aggregation(self, method: Aggregation | None, uwo_lambda: float | None) -> None:
        self.aggregation = method or self.aggregation
        self.uwo_lambda = self.uwo_lambda if uwo_lambda is None else uwo_lambda

    def score_head(self) -> nn.Module | None:
        return None


class PriorityReward(Reward):
    """Reward folders in priority order, each but the last gating the rest (`tiered_combine`)."""

    kind = "priority"

    def __init__(self, path: Path, bf16: bool, batch_size: int):
        spec = json.loads((path / "priority.json").read_text())
        if "tiers" not in spec:  # the two-tier form: harmlessness gates helpfulness
            spec = {"tiers": [spec["harmless"], spec["helpful"]], "thresholds": [spec.get("threshold", 0.0)]}
            self.names, self.shown = ["harmless", "helpful"], ["helpful", "harmless"]
        else:
            self.names = self.shown = [Path(t).name for t in spec["tiers"]]
        self.tiers = [load_reward(path / t, bf16, batch_size) for t in spec["tiers"]]
        self.thresholds = [float(t) for t in spec["thresholds"]]
        self.tokenizer = self.tiers[-1].tokenizer

    def score_ids(self, seqs: list[list[int]]) -> Rewards:
        parts = [torch.tensor(t.score_ids(seqs).reward) for t in self.tiers]
        combined = tiered_combine(parts, self.thresholds).tolist()
        named = dict(zip(self.names, parts, strict=True))
        return Rewards(combined, {n: named[n].tolist() for n in self.shown})


def load_reward(path: str | Path, bf16: bool | None = None, batch_size: int = 16) -> Reward:
    """The reward of a folder from `alignkit rm train` or `rm combine`; bf16 None: as precision=auto."""
    path, bf16 = Path(path), use_bf16("auto") if bf16 is None else bf16
    if (path / "priority.json").exists():
        return PriorityReward(path, bf16, batch_size)
    if (path / "ensemble.json").exists():
        return EnsembleReward(path, bf16, batch_size)
    tok = load_tokenizer(str(path))
    return SingleReward([load_reward_model(str(path), tok.pad_token_id)], tok, bf16, batch_size)
