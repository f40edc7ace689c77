"""Golden numbers for every loss, worked out by hand in the comments."""

from __future__ import annotations

import math

import torch

from alignkit.train.losses import IGNORE, pairwise_loss, sft_loss_sum, soft_pairwise_loss, token_logprobs

LN2, LN3 = math.log(2), math.log(3)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual).float(), torch.tensor(expected).float(), atol=atol, rtol=0
    )


# ---------------------------------------------------------------- Bradley–Terry


def test_pairwise_loss_golden():
    # diff = r_c − r_r = [2, 0, −1]
    # −log σ(2) = log(1 + e^−2) = 0.126928; −log σ(0) = log 2 = 0.693147; −log σ(−1) = log(1 + e) = 1.313262
    loss = pairwise_loss(torch.tensor([3.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 1.0]))
    close(loss, [0.126928, 0.693147, 1.313262])
    # mean over the batch = (0.126928 + 0.693147 + 1.313262) / 3 = 0.711112
    close(loss.mean(), 0.711112)


def test_pairwise_loss_with_margin_golden():
    # diff − m = [3 − 1 − 1, 2 − 0 − 2] = [1, 0]: −log σ(1) = log(1 + e^−1) = 0.313262; −log σ(0) = 0.693147
    loss = pairwise_loss(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 0.0]), margin=torch.tensor([1.0, 2.0]))
    close(loss, [0.313262, 0.693147])
    # margin 0 is the plain loss
    close(pairwise_loss(torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([0.0])), [0.126928])


def test_pairwise_loss_gradient_golden():
    # d/dr_c −log σ(d) = −(1 − σ(d)) = −σ(−d); at d = 0 that is −1/2, and +1/2 for r_r
    c, r = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    pairwise_loss(c, r).sum().backward()
    close(c.grad, [-0.5])
    close(r.grad, [0.5])


# ---------------------------------------------------------------- soft labels


def test_soft_pairwise_loss_golden():
    # diff = ln 3 → σ(ln 3) = 3/4, σ(−ln 3) = 1/4.  y = 0.75:
    # −[0.75·ln 0.75 + 0.25·ln 0.25] = 0.75·0.287682 + 0.25·1.386294 = 0.215762 + 0.346574 = 0.562335
    # diff = 0, y = 0.5: −[0.5·ln ½ + 0.5·ln ½] = ln 2 = 0.693147
    loss = soft_pairwise_loss(torch.tensor([LN3, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.75, 0.5]))
    close(loss, [0.562335, 0.693147])


def test_soft_pairwise_loss_is_minimal_where_sigmoid_matches_label():
    # d/d diff = σ(diff) − y, which is 0 at diff = ln 3 for y = 0.75 (σ(ln 3) = 3/4)
    c = torch.tensor([LN3], requires_grad=True)
    soft_pairwise_loss(c, torch.zeros(1), torch.tensor([0.75])).sum().backward()
    close(c.grad, [0.0])


def test_soft_pairwise_loss_with_hard_labels_is_pairwise_loss():
    g = torch.Generator().manual_seed(0)
    c, r = torch.randn(16, generator=g) * 3, torch.randn(16, generator=g) * 3
    torch.testing.assert_close(soft_pairwise_loss(c, r, torch.ones(16)), pairwise_loss(c, r))
    # y = 0 prefers the rejected response: the same loss with the roles swapped
    torch.testing.assert_close(soft_pairwise_loss(c, r, torch.zeros(16)), pairwise_loss(r, c))


# ---------------------------------------------------------------- next-token losses


def _sft_batch():
    """V = 4. Row a = [ln 3, 0, 0, 0] has softmax [3/6, 1/6, 1/6, 1/6]; a zero row has softmax 1/4 each.

    sample 0: labels [−100, 0, 2]; logits[0] = a predicts label 0 → ln(1/2); logits[1] = 0 predicts 2 → ln(1/4)
    sample 1: labels [3, −100, 1]; label 3 at position 0 is never predicted; logits[0] predicts −100 (skipped);
              logits[1] = a predicts 1 → ln(1/6).  The last position's logits (100s) are never used.
    """
    a, z, big = [LN3, 0.0, 0.0, 0.0], [0.0] * 4, [100.0] * 4
    logits = torch.tensor([[a, z, big], [z, a, big]])
    labels = torch.tensor([[IGNORE, 0, 2], [3, IGNORE, 1]])
    return logits, labels


def test_token_logprobs_golden():
    logits, labels = _sft_batch()
    # ln(1/2) = −0.693147, ln(1/4) = −1.386294, ln(1/6) = −1.791759; ignored positions give 0
    close(token_logprobs(logits, labels), [[-0.693147, -1.386294], [0.0, -1.791759]])


def test_sft_loss_sum_golden():
    logits, labels = _sft_batch()
    loss, count = sft_loss_sum(logits, labels)
    # ln 2 + ln 4 + ln 6 = ln 48 = 0.693147 + 1.386294 + 1.791759 = 3.871201, over 3 predicted tokens
    close(loss, 3.871201)
    assert int(count) == 3


def test_sft_loss_sums_add_up_over_micro_batches():
    """Σ over micro-batches / global count is the big batch's per-token mean: what makes accumulation exact."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 10, generator=g)
    labels = torch.randint(0, 10, (4, 6), generator=g)
    labels[0, :4] = IGNORE  # unequal token counts per sample
    labels[2, 1:] = IGNORE
    whole, n = sft_loss_sum(logits, labels)
    parts = [sft_loss_sum(logits[i : i + 1], labels[i : i + 1]) for i in range(4)]
    torch.testing.assert_close(sum(p[0] for p in parts), whole)
    # T − 1 = 5 targets per row; row 0 keeps positions 4, 5; row 2 keeps none: 2 + 5 + 0 + 5 = 12
    assert sum(int(p[1]) for p in parts) == int(n) == 12
    mean = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 10), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )
    torch.testing.assert_close(whole / n, mean)
