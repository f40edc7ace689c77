"""The policy side of PPO: rollouts through a generation backend, the responses' log-probabilities, and the
value model, a linear head on the policy's last hidden state: hidden+1 parameters and no extra pass, but the
value loss also moves the policy's adapters (`ppo.vf_coef` weighs it); a separate one costs a backbone."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..gen import Request, Sampling
from .rl import token_entropy


class Rollout(NamedTuple):
    """Sampled responses as tensors; explicit masks, as chat templates put EOS-like pad ids in prompts."""

    query: Tensor  # (B, Q) left-padded prompt ids
    query_mask: Tensor  # (B, Q)
    response: Tensor  # (B, T) right-padded with the pad id
    response_mask: Tensor  # (B, T) float, 1 on generated tokens
    ended: Tensor  # (B,) bool: stopped on an EOS token rather than at max_new_tokens


def rollout(
    backend, prompts: list[list[int]], pad_id: int, max_new_tokens: int, temperature: float, seed: int
):
    """Step 1 of the PPO loop: one response per templated prompt, sampled by `backend` seeded with `seed`."""
    sampling = Sampling(n=1, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    requests = [Request(str(i), [], p) for i, p in enumerate(prompts)]
    done = {c.key: c.ids[0] for c in backend.generate(requests, sampling)}
    outs = [done[str(i)] for i in range(len(prompts))]
    q_len, t_len = max(map(len, prompts)), max(1, max(map(len, outs)))
    query = torch.full((len(prompts), q_len), pad_id, dtype=torch.long)
    query_mask = torch.zeros_like(query)
    response = torch.full((len(prompts), t_len), pad_id, dtype=torch.long)
    response_mask = torch.zeros(len(prompts), t_len)
    for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        query[i, q_len - len(p) :], query_mask[i, q_len - len(p) :] = torch.tensor(p), 1
        response[i, : len(o)], response_mask[i, : len(o)] = torch.tensor(o, dtype=torch.long), 1
    ended = torch.tensor([bool(o) and o[-1] in backend.eos for o in outs])
    return Rollout(query, query_mask, response, response_mask, ended)


def response_logprobs(
    model, query, query_mask, response, response_mask, with_entropy: bool = False, temperature: float = 1.0
) -> tuple[Tensor, Tensor, Tensor | None]:
    """log π(y_t | x, y_<t) of each response token (π at `temperature`, as sampled), the last hidden state
    that predicts it (B, T, H) and optionally π's entropy, from one forward pass; (B, T), 0 on padding."""
    ids = torch.cat([query, response], 1).to(model.device)
    attn = torch.cat([query_mask.bool(), response_mask.bool()], 1).long().to(model.device)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    t = response.shape[1]
    out = model(
        input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=True, logits_to_keep=t + 1
    )
    # the positions that predict response tokens
    all_logprobs = (out.logits[:, -t - 1 : -1].float() / temperature).log_softmax(-1)
    logprobs = all_logprobs.gather(2, response.to(ids.device).unsqueeze(-1)).squeeze(-1)
    hidden = out.hidden_states[-1][:, -t - 1 : -1]
    m = response_mask.to(logprobs.device)
    entropy = token_entropy(all_logprobs) * m if with_entropy else None
    return logprobs * m, hidden * m.unsqueeze(-1).to(hidden.dtype), entropy


class ValueHead(nn.Module):
    """V(s_t) = w·h_t + b on the policy's last hidden state."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    @classmethod
    def from_score_head(cls, score: nn.Module | None, hidden: int) -> ValueHead:
        """A head starting from a reward model's score head (a Linear(hidden, 1)) if shapes fit, else 0."""
        head = cls(hidden)
        if isinstance(score, nn.Linear) and score.weight.shape == (1, hidden):
            with torch.no_grad():
                head.linear.weight.copy_(score.weight)
                if score.bias is not None:
                    head.linear.bias.copy_(score.bias)
        return head

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden.float()).squeeze(-1)


class PolicyWithValue(nn.Module):
    """The policy and its value head as one module, so that DDP syncs both and checkpoints hold both."""

    def __init__(self, policy, head: ValueHead):
        super().__init__()
        self.policy, self.head = policy, head

    def forward(self, query, query_mask, response, response_mask, temperature=1.0, with_entropy=False):
        """(logprobs, values, entropy or None) of the responses, (B, T) each, from one forward pass."""
        logprobs, hidden, entropy = response_logprobs(
            self.policy, query, query_mask, response, response_mask, with_entropy, temperature
        )
        return logprobs, self.head(hidden) * response_mask.to(logprobs.device), entropy
