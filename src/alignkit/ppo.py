"""PPO against a reward function with a per-token KL penalty to the reference policy (issue 5, in progress:
the step below; the `alignkit ppo` job, its config, logging, checkpoints and resume come next).

The policy is a LoRA model; the reference is the same model with its adapters disabled, so only one
copy of the weights sits in memory. The value head is one linear layer on the policy's last hidden
state (a shared backbone: hidden+1 extra parameters, no second model), initialised from the reward
model's score head when the shapes match, else zeros.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .rl import (
    AdaptiveKL,
    FixedKL,
    explained_variance,
    gae,
    kl_rewards,
    masked_mean,
    ppo_policy_loss,
    response_logprobs,
    rollout,
    value_loss,
    whiten,
)


class ValueHead(nn.Module):
    """V(s_t) = w·h_t + b on the policy's last hidden state."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    @classmethod
    def from_reward_model(cls, rm: nn.Module, hidden: int) -> ValueHead:
        """Copy the reward model's score head (a Linear(hidden, 1)) when its shape matches."""
        head, score = cls(hidden), getattr(rm, "score", None)
        if isinstance(score, nn.Linear) and score.weight.shape == (1, hidden):
            with torch.no_grad():
                head.linear.weight.copy_(score.weight)
                if score.bias is not None:
                    head.linear.bias.copy_(score.bias)
        return head

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden.float()).squeeze(-1)


@dataclass
class PPOSettings:
    max_new_tokens: int = 32
    temperature: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    epochs: int = 2
    minibatch: int = 8
    max_grad_norm: float = 1.0
    no_eos_penalty: float = 0.0


def ppo_step(
    policy,
    head: ValueHead,
    optimizer: torch.optim.Optimizer,
    prompts: list[list[int]],
    score_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    kl: AdaptiveKL | FixedKL,
    pad_id: int,
    eos_ids: set[int],
    s: PPOSettings,
) -> dict[str, float]:
    """One PPO iteration on a batch of prompts; returns the step's statistics."""
    # 1. rollout
    policy.eval()
    query, qmask, resp, mask, ended = rollout(
        policy, prompts, pad_id, eos_ids, s.max_new_tokens, s.temperature
    )
    with torch.no_grad():
        old_lp, hidden = response_logprobs(policy, query, qmask, resp, mask)
        old_v = head(hidden) * mask
        with policy.disable_adapter():  # the reference: the same weights without the LoRA update
            ref_lp, _ = response_logprobs(policy, query, qmask, resp, mask)
        # 2. score; a response cut off before EOS is penalised
        score = score_fn(query, resp, mask).float() - s.no_eos_penalty * (~ended).float()
        # 3. per-token rewards with the KL penalty; 4. GAE, then whitened advantages
        rewards = kl_rewards(old_lp, ref_lp, score, mask, kl.beta)
        adv, ret = gae(rewards, old_v, mask, s.gamma, s.lam)
        adv = whiten(adv, mask)
    # 5. PPO epochs over minibatches
    policy.train()
    stats: dict[str, list[float]] = {
        "loss/policy": [],
        "loss/value": [],
        "ppo/clipfrac": [],
        "ppo/approx_kl": [],
    }
    params = [p for p in policy.parameters() if p.requires_grad] + list(head.parameters())
    n = len(prompts)
    for _ in range(s.epochs):
        for b in range(0, n, s.minibatch):
            i = slice(b, b + s.minibatch)
            lp, h = response_logprobs(policy, query[i], qmask[i], resp[i], mask[i])
            v = head(h)
            pl, st = ppo_policy_loss(lp, old_lp[i], adv[i], mask[i], s.clip)
            vl = value_loss(v, old_v[i], ret[i], mask[i], s.value_clip)
            loss = pl + s.vf_coef * vl
            if not torch.isfinite(loss):
                raise FloatingPointError(f"PPO loss is {loss.item()}: stopping before the update")
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            optimizer.step()
            for k, x in (
                ("loss/policy", pl),
                ("loss/value", vl),
                ("ppo/clipfrac", st["clipfrac"]),
                ("ppo/approx_kl", st["approx_kl"]),
            ):
                stats[k].append(float(x.detach()))
    # 6. the KL coefficient for the next step
    kl_ref = float(masked_mean((old_lp - ref_lp).sum(1), mask.sum(1) > 0))
    beta = kl.beta
    kl.update(kl_ref, n)
    lengths = mask.sum(1)
    return {
        "reward/score": float(score.mean()),
        "kl/ref": kl_ref,
        "kl/coef": beta,
        "value/explained_var": float(explained_variance(old_v, ret, mask)),
        "response/length": float(lengths.mean()),
        "response/ended": float(ended.float().mean()),
        **{k: sum(v) / len(v) for k, v in stats.items()},
    }
