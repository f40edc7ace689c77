"""PPO math (alignkit.rl): golden numbers worked out by hand in the comments, and GAE against a plain
reference loop."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.train.rl import (
    AdaptiveKL,
    FixedKL,
    explained_variance,
    gae,
    kl_rewards,
    masked_mean,
    ppo_policy_loss,
    token_entropy,
    value_loss,
    whiten,
)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual).float(), torch.tensor(expected).float(), atol=atol, rtol=0
    )


def test_kl_rewards_layout():
    # β = 0.1; log π − log π_ref = [0.5, 0, −1] but the third token is padding; the score 2 goes on token 1
    logp, ref = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -2.0, -2.0]])
    r = kl_rewards(logp, ref, torch.tensor([2.0]), torch.tensor([[1.0, 1.0, 0.0]]), beta=0.1)
    close(r, [[-0.05, 2.0, 0.0]])
    # rows of different lengths: each score lands on its own last real token
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    r = kl_rewards(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask, beta=0.5)
    close(r, [[1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])


def test_gae_golden():
    r, v, m = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]]), torch.ones(1, 3)
    # γ = λ = 1: δ = [0, 0, 0.5] → A = [0.5, 0.5, 0.5], returns = Monte Carlo returns [1, 1, 1]
    adv, ret = gae(r, v, m, 1.0, 1.0)
    close(adv, [[0.5, 0.5, 0.5]])
    close(ret, [[1.0, 1.0, 1.0]])
    # γ = 0.9, λ = 0.5: δ2 = 1 − 0.5 = 0.5; δ1 = δ0 = 0.9·0.5 − 0.5 = −0.05
    # A2 = 0.5; A1 = −0.05 + 0.45·0.5 = 0.175; A0 = −0.05 + 0.45·0.175 = 0.02875
    adv, _ = gae(r, v, m, 0.9, 0.5)
    close(adv, [[0.02875, 0.175, 0.5]])


def test_gae_matches_a_reference_loop_on_ragged_rows():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 2, 7, 1]
    r, v = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in lengths])
    gamma, lam = 0.95, 0.9
    adv, ret = gae(r, v, mask, gamma, lam)
    for i, n in enumerate(lengths):
        want = [0.0] * 7
        for t in range(n):  # A_t = Σ_l (γλ)^l δ_{t+l}, V = 0 past the end
            total = 0.0
            for k in range(t, n):
                nxt = v[i, k + 1].item() if k + 1 < n else 0.0
                total += (gamma * lam) ** (k - t) * (r[i, k].item() + gamma * nxt - v[i, k].item())
            want[t] = total
        close(adv[i], want, atol=1e-5)
        close(ret[i, :n], (torch.tensor(want[:n]) + v[i, :n]).tolist(), atol=1e-5)
        assert (ret[i, n:] == 0).all()


def test_ppo_policy_loss_golden():
    # ρ = [1.5, 0.5, 1.0], A = [1, 1, −2], ε = 0.2
    # min(ρA, clip(ρ)A): [min(1.5, 1.2), min(0.5, 0.8), −2] = [1.2, 0.5, −2] → loss = −(−0.3 / 3) = 0.1
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0]])
    loss, stats = ppo_policy_loss(logp, torch.zeros(1, 3), torch.tensor([[1.0, 1.0, -2.0]]), torch.ones(1, 3))
    close(loss, 0.1)
    close(stats["clipfrac"], 1 / 3)  # only the first token's clip bites
    # approx KL = mean((ρ − 1) − log ρ) = (0.094535 + 0.193147 + 0) / 3 = 0.095894
    close(stats["approx_kl"], 0.095894)
    # padding does not count: masking the third token gives −(1.2 + 0.5) / 2 = −0.85
    loss, _ = ppo_policy_loss(
        logp, torch.zeros(1, 3), torch.tensor([[1.0, 1.0, -2.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    )
    close(loss, -0.85)


def test_value_loss_golden():
    # V = [1, 0], V_old = [0.5, 0.5], R = [2, 0], ε = 0.2
    # token 0: (1 − 2)² = 1, clipped V = 0.7 → 1.69 → 1.69; token 1: 0, clipped V = 0.3 → 0.09 → 0.09
    # ½·mean(1.69, 0.09) = 0.445
    loss = value_loss(
        torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]]), torch.ones(1, 2)
    )
    close(loss, 0.445)


def test_whiten_entropy_explained_variance():
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # mean 2, population variance 2/3: ±1/√(2/3) = ±1.224745; padding stays 0
    close(whiten(torch.tensor([[1.0, 2.0, 3.0, 99.0]]), m), [[-1.224745, 0.0, 1.224745, 0.0]], atol=1e-5)
    uniform = torch.zeros(1, 4, 4).log_softmax(-1)
    close(masked_mean(token_entropy(uniform), m), math.log(4))  # uniform over 4 tokens: log 4
    close(token_entropy(torch.tensor([0.5, 0.5, 0.0]).log()), math.log(2))  # p log p = 0 at p = 0
    ret = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    close(explained_variance(ret, ret, m), 1.0)
    close(explained_variance(torch.full_like(ret, 2.0), ret, m), 0.0)


def test_adaptive_kl_moves_beta_the_right_way():
    kl = AdaptiveKL(beta=0.1, target=6.0, horizon=10_000)
    # KL = 12: e = clip(12/6 − 1) = 0.2; β = 0.1·(1 + 0.2·256/10000) = 0.100512
    assert kl.update(12.0, 256) == pytest.approx(0.100512)
    before = kl.beta
    assert kl.update(3.0, 256) < before  # below target: β falls (e = −0.2 at most)
    before = kl.beta
    assert kl.update(6.0, 256) == pytest.approx(before)  # on target: unchanged
    assert FixedKL(0.05).update(100.0, 256) == 0.05
    with pytest.raises(ValueError):
        AdaptiveKL(0.1, 0.0, 10)


def test_rollout_masks_and_logprobs_match_generation(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.gen.hf import HFBackend
    from alignkit.train.rollout import response_logprobs, rollout

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    eos = tok.eos_token_id
    # prompts of different lengths, one containing the pad/EOS id itself (as chat templates do)
    prompts = [
        tok("tell me about the sun")["input_ids"],
        [*tok("hi")["input_ids"], eos, *tok("the moon")["input_ids"]],
    ]
    backend = HFBackend("", model_obj=model, tok=tok)
    query, qmask, resp, mask, ended = rollout(backend, prompts, tok.pad_token_id, 6, temperature=1.0, seed=0)
    assert query.shape[0] == 2 and resp.shape == mask.shape and resp.shape[1] <= 6
    assert qmask.sum(1).tolist() == [len(p) for p in prompts]
    for i in range(2):  # the mask covers the response up to and including its first EOS, then stops
        n = int(mask[i].sum())
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert bool(ended[i]) == (eos in resp[i, :n].tolist())
        if ended[i]:
            assert resp[i, n - 1] == eos and eos not in resp[i, : n - 1].tolist()
    # log-probs from one forward pass equal those of each row scored alone, without any padding
    lp, hidden, ent = response_logprobs(model, query, qmask, resp, mask, with_entropy=True)
    assert hidden.shape[:2] == resp.shape and ent.shape == resp.shape
    with torch.no_grad():
        for i, p in enumerate(prompts):
            n = int(mask[i].sum())
            ids = torch.tensor([p + resp[i, :n].tolist()])
            logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].float().log_softmax(-1)
            want = logits.gather(1, resp[i, :n, None]).squeeze(1)
            close(lp[i, :n], want.tolist(), atol=1e-4)
            close(ent[i, :n], (-(logits.exp() * logits).sum(-1)).tolist(), atol=1e-4)
            assert (lp[i, n:] == 0).all() and (ent[i, n:] == 0).all()
