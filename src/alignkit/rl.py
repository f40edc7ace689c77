"""The math of PPO for RLHF, as small pure functions (the `alignkit ppo` loop of issue 5 builds on them).

Shapes: B responses, T response tokens, right-padded; `mask` (B, T) is 1 on real response tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x − mean) / std over the masked entries (population variance); masked-out entries become 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_rewards(logp: Tensor, ref_logp: Tensor, score: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Per-token rewards r_t = −β·(log π(y_t) − log π_ref(y_t)), plus the sequence score on the last real
    token (Ziegler et al. 2019, Eq. 2; InstructGPT, Ouyang et al. 2022, Eq. 2, spread over tokens).
    logp, ref_logp, mask (B, T); score (B,) → (B, T), 0 on padding."""
    r = -beta * (logp - ref_logp) * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    return r.scatter_add(1, last[:, None], (score * (mask.sum(1) > 0))[:, None].to(r.dtype))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, Eq. 16):
    δ_t = r_t + γ·V_{t+1} − V_t,  A_t = Σ_l (γλ)^l δ_{t+l},  with V = 0 after the last real token.
    Returns (advantages, returns = A + V), both (B, T) and 0 on padding."""
    rewards, values, m = rewards * mask, values * mask, mask.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_v = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        adv[:, t] = running
    return adv, (adv + values) * m


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate (Schulman et al. 2017, Eq. 7), negated for minimisation:
    L = −E[min(ρ·A, clip(ρ, 1−ε, 1+ε)·A)], ρ = π/π_old, averaged over real tokens.
    Also the share of tokens where the clip was active, and approx KL(π_old‖π) = E[(ρ − 1) − log ρ]
    (an unbiased, non-negative estimator)."""
    log_ratio = (logp - old_logp) * mask
    ratio = log_ratio.exp()
    unclipped, clipped = ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv
    loss = -masked_mean(torch.min(unclipped, clipped), mask)
    stats = {
        "clipfrac": masked_mean((clipped < unclipped).float(), mask),
        "approx_kl": masked_mean(ratio - 1 - log_ratio, mask),
    }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> Tensor:
    """Clipped value loss ½·E[max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²)] over real tokens
    (the PPO value clipping of OpenAI baselines' ppo2, used by Ziegler et al. 2019)."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def token_entropy(logp: Tensor) -> Tensor:
    """H(π(·|s_t)) = −Σ_v π(v) log π(v) per position, from log-probabilities (..., V) → (...); a token
    with probability 0 (log-prob −inf) adds 0, not NaN."""
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 − Var[R − V] / Var[R] over real tokens: 1 is a perfect value function, ≤ 0 no better than a constant."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return 1 - var_d / var_r.clamp(min=1e-12)


class AdaptiveKL:
    """The adaptive KL coefficient of Ziegler et al. 2019, §2.2: with e = clip(KL/target − 1, −0.2, 0.2),
    β ← β·(1 + e·n/horizon) after n samples, so β rises while KL runs above target and falls below it."""

    def __init__(self, beta: float, target: float, horizon: int):
        if beta <= 0 or target <= 0 or horizon <= 0:
            raise ValueError("beta, target and horizon must be positive")
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> float:
        e = min(max(kl / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + e * n / self.horizon
        return self.beta

    def state_dict(self) -> dict:  # so accelerate checkpoints carry β (exact resume)
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])


class FixedKL:
    """A constant β (update does nothing)."""

    def __init__(self, beta: float):
        self.beta = beta

    def update(self, kl: float, n: int) -> float:
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])


# ---------------------------------------------------------------- rollout tensors
def rollout(
    backend, prompts: list[list[int]], pad_id: int, max_new_tokens: int, temperature: float, seed: int
):
    """Step 1 of the PPO loop: sample one response per prompt with a generation backend (alignkit.generate:
    batched, KV-cached, continuous batching), from its own generator seeded with `seed`.
    Returns (query (B, Q) left-padded, its attention mask (B, Q), response (B, T) right-padded with
    pad_id, response mask (B, T), ended (B,) bool: the response stopped on an EOS token rather than at
    max_new_tokens). The masks are explicit: chat templates put EOS-like tokens (the pad id) in prompts."""
    from .generate import Request, Sampling

    sampling = Sampling(n=1, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    done = {
        c.key: c.ids[0]
        for c in backend.generate([Request(str(i), [], p) for i, p in enumerate(prompts)], sampling)
    }
    outs = [done[str(i)] for i in range(len(prompts))]
    q_len, t_len = max(map(len, prompts)), max(1, max(map(len, outs)))
    query = torch.full((len(prompts), q_len), pad_id, dtype=torch.long)
    attn = torch.zeros_like(query)
    response = torch.full((len(prompts), t_len), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), t_len)
    for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        query[i, q_len - len(p) :], attn[i, q_len - len(p) :] = torch.tensor(p), 1
        response[i, : len(o)], mask[i, : len(o)] = torch.tensor(o, dtype=torch.long), 1
    ended = torch.tensor([bool(o) and o[-1] in backend.eos for o in outs])
    return query, attn, response, mask, ended


def response_logprobs(
    model,
    query: Tensor,
    query_mask: Tensor,
    response: Tensor,
    mask: Tensor,
    with_entropy: bool = False,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """log π(y_t | x, y_<t) of each response token (π: the model's softmax at `temperature`, as sampled),
    the last hidden state at the positions that predict them (for a value head), and optionally the
    entropy of π there, from one forward pass that projects onto the vocabulary only those positions.
    (B, T) each, hidden (B, T, H); 0 on padding."""
    ids = torch.cat([query, response], 1).to(model.device)
    attn = torch.cat([query_mask.bool(), mask.bool()], 1).long().to(model.device)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    t = response.shape[1]
    out = model(
        input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=True, logits_to_keep=t + 1
    )
    logp = (out.logits[:, -t - 1 : -1].float() / temperature).log_softmax(
        -1
    )  # the positions that predict response tokens
    lp = logp.gather(2, response.to(ids.device).unsqueeze(-1)).squeeze(-1)
    hidden = out.hidden_states[-1][:, -t - 1 : -1]
    m = mask.to(lp.device)
    ent = token_entropy(logp) * m if with_entropy else None
    return lp * m, hidden * m.unsqueeze(-1).to(hidden.dtype), ent
