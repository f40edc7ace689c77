"""The math of PPO for RLHF, as small pure functions on tensors (train.ppo's loop is built on them).
Shapes: B responses, T response tokens, right-padded; `mask` (B, T) is 1 on real response tokens."""

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean) / std over the masked entries (population variance); masked-out entries become 0."""
    mean = masked_mean(x, mask)
    return (x - mean) * torch.rsqrt(masked_mean((x - mean) ** 2, mask) + eps) * mask


def kl_rewards(logprobs: Tensor, ref_logprobs: Tensor, rewards: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Per-token rewards r_t = −β·(log π(y_t) − log π_ref(y_t)), plus the reward (B,) on the last real token
    (Ziegler et al. 2019, Eq. 2; InstructGPT, Ouyang et al. 2022, Eq. 2, spread over tokens) → (B, T)."""
    r = -beta * (logprobs - ref_logprobs) * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    return r.scatter_add(1, last[:, None], (rewards * (mask.sum(1) > 0))[:, None].to(r.dtype))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, Eq. 16): δ_t = r_t + γ·V_{t+1} − V_t,
    A_t = Σ_l (γλ)^l δ_{t+l}, V = 0 after the last real token → (advantages, returns = A + V), 0 on pads."""
    m = mask.to(rewards.dtype)
    rewards, values = rewards * m, values * m
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_v = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        advantages[:, t] = running = (delta + gamma * lam * running) * m[:, t]
    return advantages, (advantages + values) * m


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate (Schulman et al. 2017, Eq. 7), negated: L = −E[min(ρ·A, clip(ρ, 1−ε, 1+ε)·A)], ρ =
    π/π_old; also the clipped share and approx KL(π_old‖π) = E[(ρ − 1) − log ρ] (unbiased, non-negative)."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = log_ratio.exp()
    unclipped, clipped = ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages
    return -masked_mean(torch.min(unclipped, clipped), mask), {
        "clipfrac": masked_mean((clipped < unclipped).float(), mask),
        "approx_kl": masked_mean(ratio - 1 - log_ratio, mask),
    }


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip=0.2) -> Tensor:
    """Clipped value loss ½·E[max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²)] over real tokens
    (the PPO value clipping of OpenAI baselines' ppo2, used by Ziegler et al. 2019)."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def token_entropy(logprobs: Tensor) -> Tensor:
    """H(π(·|s_t)) = −Σ_v π(v) log π(v) per position from log-probs (..., V); −inf ones add 0, not NaN."""
    return -(logprobs.exp() * logprobs.clamp(min=torch.finfo(logprobs.dtype).min)).sum(-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 − Var[R − V] / Var[R] over real tokens: 1 is a perfect value function, ≤ 0 no better than a constant."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return 1 - var_d / var_r.clamp(min=1e-12)


class FixedKL:
    """A constant β (update does nothing). Checkpoints carry β, so a resume is exact."""

    def __init__(self, beta: float):
        self.beta = beta

    def update(self, kl: float, n: int) -> float:
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])


class AdaptiveKL(FixedKL):
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


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two 1-D tensors; 0 when either is constant (the length-bias monitor)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = float((x.square().sum() * y.square().sum()).sqrt())
    return float((x * y).sum()) / den if den > 0 else 0.0
