"""PPO (alignkit.ppo): the step on a toy reward (reward rises while KL stays bounded), and the `alignkit ppo`
job on a tiny model and a tiny reward model: artefacts and metrics, exact resume, the NaN guard, ensembles,
full fine-tuning with a frozen reference, and clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file
from torch import nn

from alignkit import cli
from alignkit.models import LoraSettings, apply_lora
from alignkit.train import ppo
from alignkit.train.ppo import PPOSettings, Stepper
from alignkit.train.rl import AdaptiveKL, FixedKL, pearson
from alignkit.train.rollout import PolicyWithValue, ValueHead

# the tiny model's final norm bounds its logits near ±0.1, so adapters inside the layers alone cannot move
# its output much: the LM head gets an adapter too
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj", "lm_head"]
LORA = LoraSettings(r=8, alpha=16, target_modules=TARGETS)


def toy(tiny_model, seed=0):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model), LORA, "CAUSAL_LM")
    prompts = [
        tok(t)["input_ids"] for t in ("tell me about", "what is the", "how can you", "please explain")
    ] * 4
    return tok, PolicyWithValue(model, ValueHead(model.config.hidden_size)), prompts


def toy_run(tiny_model, kl) -> list[dict]:
    """24 PPO steps on the toy task (reward: the share of response tokens with an even id)."""
    tok, pv, prompts = toy(tiny_model)
    good = torch.arange(len(tok)) % 2 == 0

    def reward(query, resp, mask):
        return (good[resp].float() * mask).sum(1) / mask.sum(1).clamp(min=1)

    opt = torch.optim.Adam([p for p in pv.parameters() if p.requires_grad], lr=2e-2)
    stepper = Stepper(
        pv, opt, kl, tok, PPOSettings(max_new_tokens=8, epochs=2, minibatch=8, no_eos_penalty=0.0)
    )
    return [stepper.step(prompts, reward, seed=k) for k in range(24)]


def test_ppo_raises_a_toy_reward_while_the_kl_controller_holds_the_kl(tiny_model):
    # The trajectory depends on kernel rounding (AVX2 and AVX-512 GEMMs accumulate in different orders),
    # so the test asserts properties with wide margins, and judges the KL control against the same task
    # without a KL penalty, run in this process. Measured on AVX-512: reward 0.49 → 0.71, mean KL 2.6
    # nats with control against 30 over the last 8 steps without.
    kl = AdaptiveKL(beta=0.1, target=3.0, horizon=50)
    history = toy_run(tiny_model, kl)
    free = toy_run(tiny_model, FixedKL(0.0))
    first = sum(h["reward/score"] for h in history[:3]) / 3
    last = sum(h["reward/score"] for h in history[-4:]) / 4
    assert last > first + 0.15, (first, last)
    assert history[0]["kl/ref"] == 0.0  # before any update the policy is the reference
    kls, free_kls = [h["kl/ref"] for h in history], [h["kl/ref"] for h in free]
    assert sum(kls) / len(kls) < 1.5 * 3.0, kls  # around the controller's target of 3 nats
    assert sum(kls[-8:]) < sum(free_kls[-8:]) / 3, (kls, free_kls)  # the penalty holds π near π_ref
    assert kl.beta < 0.1  # KL ran below target on the whole, so the controller lowered β
    for key in ppo_keys():
        assert torch.isfinite(torch.tensor(history[-1][key])), key


def ppo_keys() -> list[str]:
    return [
        "reward/score",
        "reward/length_corr",
        "kl/ref",
        "kl/coef",
        "loss/policy",
        "loss/value",
        "ppo/clipfrac",
        "ppo/approx_kl",
        "value/explained_var",
        "policy/entropy",
        "response/length",
        "perf/time_generation",
        "perf/time_scoring",
        "perf/time_training",
    ]


def test_a_single_update_fused_with_the_old_policy_pass_equals_the_separate_passes(tiny_model):
    # one epoch, one minibatch: the update's own forward doubles as the π_old / V_old pass
    results = []
    for fuse in (True, False):
        tok, pv, prompts = toy(tiny_model)
        opt = torch.optim.Adam([p for p in pv.parameters() if p.requires_grad], lr=1e-2)
        stepper = Stepper(pv, opt, FixedKL(0.1), tok, PPOSettings(max_new_tokens=6, epochs=1, minibatch=16))
        stepper.fuse_single_update = fuse

        def score(query, resp, mask):
            return (resp % 3 == 0).float().mean(1)

        stats = [stepper.step(prompts, score, seed=k) for k in range(2)]
        results.append((stats, [p.detach().clone() for p in pv.parameters()]))
    (fused, wf), (separate, ws) = results
    for a, b in zip(wf, ws, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for k in ("loss/policy", "loss/value", "kl/ref", "policy/entropy", "value/explained_var"):
        assert fused[1][k] == pytest.approx(separate[1][k], rel=1e-5, abs=1e-7), k


def test_value_head_starts_from_the_reward_models_score_head():
    rm = nn.Module()
    rm.score = nn.Linear(16, 1, bias=False)
    head = ValueHead.from_score_head(rm.score, 16)
    assert torch.equal(head.linear.weight, rm.score.weight) and head.linear.bias.item() == 0
    other = nn.Module()
    other.score = nn.Linear(8, 1)  # another shape: zeros
    assert ValueHead.from_score_head(other.score, 16).linear.weight.abs().sum() == 0
    assert ValueHead.from_score_head(None, 16).linear.weight.abs().sum() == 0  # no score head: zeros


def test_the_step_stops_on_a_non_finite_score_before_any_update(tiny_model):
    tok, pv, prompts = toy(tiny_model)
    opt = torch.optim.SGD([p for p in pv.parameters() if p.requires_grad], lr=0.1)
    before = [p.detach().clone() for p in pv.parameters()]

    def nan_score(query, resp, mask):
        return torch.full((resp.shape[0],), float("nan"))

    stepper = Stepper(pv, opt, FixedKL(0.1), tok, PPOSettings(max_new_tokens=4))
    with pytest.raises(FloatingPointError, match="non-finite score"):
        stepper.step(prompts[:4], nan_score)
    assert all(torch.equal(a, b) for a, b in zip(before, pv.parameters(), strict=True))  # nothing updated


def test_pearson_is_the_length_bias_monitor():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    assert pearson(x, torch.ones(4)) == 0.0  # constant lengths: no correlation, not NaN
    # hand-computed: x − x̄ = (−1.5, −0.5, 0.5, 1.5), y = (1, 3, 2, 4) − 2.5 = (−1.5, 0.5, −0.5, 1.5)
    # Σxy = 2.25 − 0.25 − 0.25 + 2.25 = 4, Σx² = Σy² = 5: r = 0.8
    assert pearson(x, torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8)


# ---------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory, tiny_model) -> str:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("rm") / "rm"
    torch.manual_seed(1)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():  # a score head that tells responses apart
        rm.score.weight.normal_(0, 1.0)
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    texts = ["tell me about the sun", "what is water", "how can you help", "please explain fire safety"]
    recs = [{"prompt": t} for t in texts] + [{"prompt": [{"role": "user", "content": "why is the moon"}]}]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", recs * 2)


FAST = [
    "steps=4",
    "batch_size=4",
    "lr=5e-3",
    "precision=fp32",
    "ppo.max_new_tokens=6",
    "ppo.minibatch=2",
    "ppo.epochs=2",
    "ppo.entropy_coef=0.01",
    "kl.beta=0.05",
    f"lora.target_modules={json.dumps(TARGETS)}",
]


def run_ppo(
    root: Path, model: str, reward: str, prompts: Path, name: str, *overrides: str, code: int = 0
) -> Path:
    out = root / name
    args = ["ppo", f"prompts={prompts}", f"reward={reward}", f"model={model}", f"output_dir={out}", *FAST]
    assert cli.main([*args, *overrides]) == code
    return out


def metrics(out: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for ln in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(ln)
        rows.setdefault(rec.pop("step"), {}).update(rec)
    return rows


def test_ppo_job_trains_logs_and_writes_a_plain_hf_policy(tmp_path, tiny_model, tiny_rm, prompts_file):
    out = run_ppo(tmp_path, tiny_model, tiny_rm, prompts_file, "run", "probe.every=2", "probe.per_pack=3")
    assert (out / "job_config.yaml").exists() and (out / "config.json").exists()
    trained = load_file(out / "model.safetensors")
    base = load_file(Path(tiny_model) / "model.safetensors")
    assert any(not torch.equal(trained[k], base[k]) for k in base)  # merged LoRA update: weights moved
    m = metrics(out)
    assert sorted(m) == [0, 1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        for key in ppo_keys():
            assert key in m[step], (step, key)
    assert m[1]["kl/ref"] == pytest.approx(0.0, abs=1e-5)  # before the first update π = π_ref
    assert m[4]["kl/ref"] != 0.0
    assert m[1]["loss/policy"] != 0.0 and m[1]["policy/entropy"] > 0
    for step in (0, 2, 4):  # the probe evaluation: at the start, every 2 steps and at the end
        assert 0 <= m[step]["probe/refused_benign"] <= 1 and "probe/refused_harmful" in m[step]
    assert sorted(p.name for p in (out / "probes").iterdir()) == [
        "step-0.jsonl",
        "step-2.jsonl",
        "step-4.jsonl",
    ]


class Interrupted(Exception):
    pass


def test_resume_equals_an_uninterrupted_run(tmp_path, tiny_model, tiny_rm, prompts_file, monkeypatch):
    # 9 prompts / batch 4: the resumed half starts a new pass over the prompts; sampling, β and the optimiser
    # all depend on the restored state
    args = ["steps=5", "save_every=2"]
    a = run_ppo(tmp_path, tiny_model, tiny_rm, prompts_file, "a", *args)
    real = ppo.save_checkpoint

    def save_then_stop(acc, output_dir, step, keep):
        real(acc, output_dir, step, keep)
        if step == 2:
            raise Interrupted(step)

    with monkeypatch.context() as m:
        m.setattr(ppo, "save_checkpoint", save_then_stop)
        with pytest.raises(Interrupted):
            run_ppo(tmp_path, tiny_model, tiny_rm, prompts_file, "b", *args)
    b = tmp_path / "b"
    assert (b / "checkpoints" / "step-2").is_dir() and not (b / "model.safetensors").exists()
    run_ppo(tmp_path, tiny_model, tiny_rm, prompts_file, "b", *args, "resume=true")
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    ma, mb = metrics(a), metrics(b)
    assert sorted(mb) == [1, 2, 3, 4, 5]
    for step in ma:
        for key in ("reward/score", "kl/ref", "kl/coef", "loss/policy", "response/length"):
            assert ma[step][key] == pytest.approx(mb[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_nan_stops_the_job_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_model, tiny_rm, prompts_file, monkeypatch, capsys
):
    real = ppo.reward_fn
    calls = []

    def nan_on_third_step(scorer, tok, messages):
        score = real(scorer, tok, messages)
        calls.append(1)
        if len(calls) < 3:
            return score
        return lambda q, r, m: (torch.full((r.shape[0],), float("nan")), {})

    monkeypatch.setattr(ppo, "reward_fn", nan_on_third_step)
    out = run_ppo(tmp_path, tiny_model, tiny_rm, prompts_file, "nan", "save_every=2", code=1)
    err = capsys.readouterr().err
    assert "non-finite score at step 3" in err and "checkpoints/step-2" in err, err
    assert (out / "checkpoints" / "step-2").is_dir() and not (out / "model.safetensors").exists()
    assert sorted(metrics(out)) == [1, 2]


def test_ensemble_reward_logs_members_and_their_spread(tmp_path, tiny_model, prompts_file, pairs_file):
    rm = tmp_path / "ens"
    assert (
        cli.main(
            [
                "rm",
                "train",
                f"data={pairs_file}",
                f"model={tiny_model}",
                f"output_dir={rm}",
                "ensemble.size=2",
            ]
            + ["ensemble.aggregation=mean", "train.max_steps=2", "train.batch_size=4", "train.precision=fp32"]
        )
        == 0
    )
    out = run_ppo(tmp_path, tiny_model, str(rm), prompts_file, "run", "steps=1", "reward_aggregation=min")
    m = metrics(out)[1]
    assert {"reward/member_0", "reward/member_1", "ensemble/std"} <= set(m)
    # the job's reward_aggregation=min overrides the folder's mean: the score is at most each member's score, so its mean is at most each member's mean
    no_eos = 1.0 - m["response/ended"]  # the penalty on cut-off responses (ppo.no_eos_penalty = 1)
    assert m["reward/score"] + no_eos <= min(m["reward/member_0"], m["reward/member_1"]) + 1e-6


def test_full_fine_tune_keeps_a_frozen_reference(tmp_path, tiny_model, tiny_rm, prompts_file):
    out = run_ppo(
        tmp_path, tiny_model, tiny_rm, prompts_file, "full", "lora.enabled=false", "steps=2", "lr=1e-3"
    )
    m = metrics(out)
    assert m[1]["kl/ref"] == pytest.approx(0.0, abs=1e-5) and m[2]["kl/ref"] != 0.0
    trained, base = load_file(out / "model.safetensors"), load_file(Path(tiny_model) / "model.safetensors")
    assert all(not torch.equal(trained[k], base[k]) for k in base if "layers.0.mlp" in k)


def test_bad_prompts_and_reward_fail_before_anything_is_written(tmp_path, tiny_model, tiny_rm, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    out = run_ppo(tmp_path, tiny_model, tiny_rm, bad, "bad", code=2)
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err and "prompt" in err, err
    assert not out.exists()
    out = run_ppo(tmp_path, tiny_model, str(tmp_path / "missing"), bad, "bad2", code=2)
    assert "reward" in capsys.readouterr().err and not out.exists()
    out = run_ppo(tmp_path, tiny_model, tiny_rm, bad, "bad3", "ppo.bogus=1", code=2)
    assert "ppo.bogus" in capsys.readouterr().err and not out.exists()
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "hi"}])
    out = run_ppo(tmp_path, tiny_model, tiny_rm, good, "bad4", "reward_aggregation=min", code=2)
    assert "need an ensemble" in capsys.readouterr().err and not out.exists()


def test_priority_reward_logs_its_helpful_and_harmless_parts(tmp_path, tiny_model, tiny_rm, prompts_file):
    pair = tmp_path / "priority"
    args = [
        "rm",
        "combine",
        f"helpful={tiny_rm}",
        f"harmless={tiny_rm}",
        f"output_dir={pair}",
        "threshold=-100",
    ]
    assert cli.main(args) == 0
    m = metrics(run_ppo(tmp_path, tiny_model, str(pair), prompts_file, "run", "steps=1"))[1]
    # the same RM on both sides, τ far below: every response is harmless, so R = softplus(helpful) > 0
    assert m["reward/helpful"] == pytest.approx(m["reward/harmless"])
    assert m["reward/score"] + (1.0 - m["response/ended"]) > 0
