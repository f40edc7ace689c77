"""The PPO step (alignkit.ppo) on a tiny model and a toy reward: reward rises while KL stays bounded."""

from __future__ import annotations

import torch
from torch import nn

from alignkit.models import LoraSettings, apply_lora
from alignkit.ppo import PPOSettings, ValueHead, ppo_step
from alignkit.rl import AdaptiveKL, FixedKL

# the tiny model's final norm bounds its logits near ±0.1, so adapters inside the layers alone cannot move
# its output much: the LM head gets an adapter too
LORA = LoraSettings(r=8, alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj", "lm_head"])


def toy(tiny_model, seed=0):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model), LORA, "CAUSAL_LM")
    prompts = [
        tok(t)["input_ids"] for t in ("tell me about", "what is the", "how can you", "please explain")
    ] * 4
    return tok, model, prompts


def test_ppo_raises_a_toy_reward_with_bounded_kl(tiny_model):
    tok, model, prompts = toy(tiny_model)
    good = torch.arange(len(tok)) % 2 == 0  # reward: the share of response tokens with an even id

    def score(query, resp, mask):
        return (good[resp].float() * mask).sum(1) / mask.sum(1).clamp(min=1)

    head = ValueHead(model.config.hidden_size)
    opt = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad] + list(head.parameters()), lr=2e-2
    )
    kl = AdaptiveKL(beta=0.1, target=3.0, horizon=50)
    s = PPOSettings(max_new_tokens=8, epochs=2, minibatch=8)
    history = [
        ppo_step(model, head, opt, prompts, score, kl, tok.pad_token_id, {tok.eos_token_id}, s)
        for _ in range(18)
    ]
    first = sum(h["reward/score"] for h in history[:3]) / 3
    last = sum(h["reward/score"] for h in history[-3:]) / 3
    assert last > first + 0.15, (first, last)
    assert max(h["kl/ref"] for h in history) < 2 * 3.0  # held near the controller's target of 3 nats
    assert history[0]["kl/ref"] == 0.0  # before any update the policy is the reference
    assert kl.beta < 0.1  # KL ran below target, so the controller lowered β
    for key in (
        "loss/policy",
        "loss/value",
        "ppo/clipfrac",
        "ppo/approx_kl",
        "value/explained_var",
        "response/length",
    ):
        assert torch.isfinite(torch.tensor(history[-1][key])), key


def test_value_head_starts_from_the_reward_models_score_head():
    rm = nn.Module()
    rm.score = nn.Linear(16, 1, bias=False)
    head = ValueHead.from_reward_model(rm, 16)
    assert torch.equal(head.linear.weight, rm.score.weight) and head.linear.bias.item() == 0
    other = nn.Module()
    other.score = nn.Linear(8, 1)  # another shape: zeros
    assert ValueHead.from_reward_model(other, 16).linear.weight.abs().sum() == 0


def test_ppo_step_stops_on_a_non_finite_loss(tiny_model):
    import pytest

    tok, model, prompts = toy(tiny_model)
    head = ValueHead(model.config.hidden_size)
    opt = torch.optim.SGD(list(head.parameters()), lr=0.1)
    before = [p.detach().clone() for p in head.parameters()]

    def nan_score(query, resp, mask):
        return torch.full((resp.shape[0],), float("nan"))

    with pytest.raises(FloatingPointError, match="stopping before the update"):
        ppo_step(
            model,
            head,
            opt,
            prompts[:4],
            nan_score,
            FixedKL(0.1),
            tok.pad_token_id,
            {tok.eos_token_id},
            PPOSettings(max_new_tokens=4),
        )
    assert all(torch.equal(a, b) for a, b in zip(before, head.parameters(), strict=True))  # nothing updated
