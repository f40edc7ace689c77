"""Loss functions, each a small pure function with its paper. Shapes in the docstrings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(label_t | x_<t): logits (B, T, V), labels (B, T) → (B, T-1), 0 where the label is IGNORE."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    lp = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * (labels != IGNORE)


def sft_loss_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy over completion tokens, and the token count: normalised by the whole
    (global, accumulated) batch's count, that makes gradient accumulation and data parallelism exact."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    flat = logits.reshape(-1, logits.size(-1)).float()
    loss = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, (labels != IGNORE).sum()


def target_positions(labels: Tensor) -> Tensor:
    """Positions whose next token is a target, keep[:, t] = labels[:, t+1] ≠ IGNORE, (B, T) → (B, T) bool.
    As `logits_to_keep`, skips the LM head (a fifth of SmolLM2-135M's FLOPs) on prompt and padding tokens."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def selected_sft_loss_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """`sft_loss_sum` for logits computed at `target_positions(labels)` only. logits (N, V) → (sum, N)."""
    targets = labels[:, 1:][labels[:, 1:] != IGNORE]  # (N,), row-major like the boolean mask
    return F.cross_entropy(logits.float(), targets, reduction="sum"), targets.new_tensor(targets.numel())


def pairwise_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None) -> Tensor:
    """Bradley–Terry loss −log σ(r_c − r_r − m), per pair (InstructGPT, Ouyang et al. 2022, Eq. 1;
    the margin m is Llama 2's, Touvron et al. 2023, Eq. 2). Shapes: (B,) → (B,)."""
    return -F.logsigmoid(chosen - rejected - (0 if margin is None else margin))


def soft_pairwise_loss(chosen: Tensor, rejected: Tensor, label: Tensor) -> Tensor:
    """Cross-entropy per pair against a soft label y = P(chosen ≻ rejected), (B,) → (B,): −[y·log σ(r_c − r_r)
    + (1 − y)·log σ(r_r − r_c)] (RLAIF, Bai et al. 2022 "Constitutional AI", §4.1); y = 1: `pairwise_loss`."""
    diff = chosen - rejected
    return -(label * F.logsigmoid(diff) + (1 - label) * F.logsigmoid(-diff))
