"""`alignkit ppo`: PPO against a reward model, ensemble or priority pair, with a per-token KL penalty to the
reference policy (Ziegler et al. 2019, arXiv:1909.08593; Ouyang et al. 2022, arXiv:2203.02155).

Memory. The policy is a LoRA model and the reference is the same model with its adapters disabled, so only
one copy of the weights sits in memory. `lora.enabled=false` fine-tunes every weight and keeps a frozen
reference copy: two copies of the weights plus AdamW's two moments for every parameter.

Value model. A linear head on the policy's last hidden state, i.e. a backbone shared with the policy. It
costs hidden+1 parameters and no extra forward pass: the log-probs and the values come from the same pass.
The price is that the value loss also moves the policy's adapters (`ppo.vf_coef` weighs it). A separate
value model would cost another copy of the backbone's activations and forward/backward passes every step.
The head starts from the reward model's score head when its shape fits (a single RM), else at zero.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from . import config as cfglib
from . import training
from .data import DataError, Messages, _as_messages, _template, _text_or_messages, read_records
from .models import LoraSettings, apply_lora, count_parameters, load_causal_lm, load_tokenizer, save_model
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
from .training import MetricsLog, TrainSettings, latest_checkpoint, make_accelerator


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


class PolicyWithValue(nn.Module):
    """The policy and its value head as one module, so that DDP syncs both and checkpoints hold both."""

    def __init__(self, policy, head: ValueHead):
        super().__init__()
        self.policy, self.head = policy, head

    def forward(self, query, qmask, resp, mask, temperature: float = 1.0, with_entropy: bool = False):
        lp, hidden, ent = response_logprobs(self.policy, query, qmask, resp, mask, with_entropy, temperature)
        return lp, self.head(hidden) * mask.to(lp.device), ent


# ---------------------------------------------------------------- config
@dataclass
class KLSettings:
    """The KL penalty to the reference policy."""

    mode: Literal["adaptive", "fixed"] = "adaptive"
    """adaptive: the controller of Ziegler et al. 2019 steers the KL towards `target`; fixed: β stays `beta`."""
    beta: float = 0.05
    """β: the starting (adaptive) or constant (fixed) coefficient of the per-token penalty."""
    target: float = 6.0
    """Target KL(π‖π_ref) per response, in nats (adaptive)."""
    horizon: int = 10000
    """Samples over which the adaptive controller may move β by up to 20% (adaptive)."""

    def __post_init__(self) -> None:
        if self.beta < 0 or (self.mode == "adaptive" and min(self.beta, self.target, self.horizon) <= 0):
            raise ValueError("beta must be ≥ 0 (and beta, target, horizon > 0 when mode=adaptive)")

    def controller(self) -> AdaptiveKL | FixedKL:
        if self.mode == "adaptive":
            return AdaptiveKL(self.beta, self.target, self.horizon)
        return FixedKL(self.beta)


@dataclass
class PPOSettings:
    """Rollouts and the PPO update."""

    max_new_tokens: int = 64
    """Longest response, in tokens."""
    temperature: float = 1.0
    """Sampling temperature of rollouts; log-probs use the same temperature so the ratio stays exact."""
    gamma: float = 1.0
    """Discount γ of GAE."""
    lam: float = 0.95
    """λ of GAE."""
    clip: float = 0.2
    """ε of the clipped surrogate: the ratio π/π_old is clipped to [1 − ε, 1 + ε]."""
    value_clip: float = 0.2
    """How far a value may move from its rollout-time estimate before its loss is clipped."""
    vf_coef: float = 0.1
    """Weight of the value loss in the joint loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (0: none; the entropy is logged either way)."""
    epochs: int = 2
    """PPO epochs over each batch of rollouts."""
    minibatch: int = 8
    """Rollouts per gradient step, per process."""
    no_eos_penalty: float = 1.0
    """Subtracted from the score of a response cut off at max_new_tokens before its EOS token."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.epochs < 1 or self.minibatch < 1:
            raise ValueError("max_new_tokens, epochs and minibatch must be ≥ 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (PPO needs sampled rollouts)")


@dataclass
class ProbeEvalSettings:
    """A small probe evaluation during training, so that over-refusal shows as it happens."""

    every: int = 0
    """Evaluate at step 0, every N steps and at the end (0: never)."""
    packs: list[str] = field(default_factory=lambda: ["harmful", "benign"])
    """Probe packs to take probes from (see `alignkit probe`)."""
    per_pack: int = 16
    """The first N probes of each pack."""
    max_new_tokens: int = 64
    """Answer length for the probes (greedy decoding)."""


@dataclass
class PPOConfig:
    """PPO against a reward model with a KL penalty to the starting policy."""

    prompts: str = ""
    """Prompts: JSONL {prompt} (a string or a message list), a save_to_disk folder or an HF dataset."""
    reward: str = ""
    """Reward folder from `alignkit rm train` or `rm combine`: a single RM, an ensemble or a priority pair."""
    model: str = "default"
    """Starting policy and reference (an SFT output): hub id, local folder or 'default'."""
    output_dir: str = "runs/ppo"
    """Where the policy (a plain HF folder), job_config.yaml, metrics.jsonl and checkpoints go."""
    system: str | None = None
    """A system message put before each prompt that has none."""
    max_prompt_length: int = 256
    """Prompts longer than this many tokens (chat template included) are skipped and counted."""
    steps: int = 100
    """PPO iterations (rollout + update)."""
    batch_size: int = 8
    """Prompts per iteration, over all processes."""
    lr: float = 1.0e-4
    """AdamW learning rate (constant)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0 disables)."""
    seed: int = 0
    """Seed for prompt order, sampling and initialisation."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """bf16 autocast or fp32. auto: bf16 on a GPU or a CPU with native bf16."""
    value_init: Literal["reward", "zeros"] = "reward"
    """Start the value head from the reward model's score head (when its shape fits), or at zero."""
    reward_batch_size: int = 16
    """Sequences per reward-model forward pass."""
    reward_aggregation: Literal["mean", "min", "uwo"] | None = None
    """For an ensemble: override the folder's aggregation (mean, min = worst case, uwo = mean − λ·var)."""
    reward_uwo_lambda: float | None = None
    """For an ensemble: override the folder's λ of uwo."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings; lora.enabled=false fine-tunes every weight and keeps a frozen reference copy."""
    ppo: PPOSettings = field(default_factory=PPOSettings)
    """Rollout and update settings."""
    kl: KLSettings = field(default_factory=KLSettings)
    """KL penalty settings."""
    probe: ProbeEvalSettings = field(default_factory=ProbeEvalSettings)
    """Periodic probe evaluation."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0: none but the final model)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir (same prompts, RNG, optimiser and β)."""
    log_every: int = 1
    """Write metrics every N steps."""
    tracker: Literal["none", "tensorboard", "wandb"] = "none"
    """Also log metrics to this accelerate tracker."""

    def __post_init__(self) -> None:
        for k in ("prompts", "reward"):
            if not getattr(self, k):
                raise ValueError(f"{k} is required ({k}=...)")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be ≥ 1")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")


@dataclass
class Prompt:
    messages: Messages
    ids: list[int]


def load_prompts(cfg: PPOConfig, tok) -> tuple[list[Prompt], dict]:
    """Read and template the prompts; a bad record is a DataError naming the file, line and field."""
    out, skipped = [], 0
    for line, rec in read_records(cfg.prompts):
        msgs = _as_messages(_text_or_messages(rec, "prompt", cfg.prompts, line), "user")
        if cfg.system and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": cfg.system}, *msgs]
        ids = _template(tok, msgs, add_generation_prompt=True)
        if len(ids) > cfg.max_prompt_length:
            skipped += 1
            continue
        out.append(Prompt(msgs, ids))
    if not out:
        raise DataError(
            cfg.prompts, None, "prompt", f"no prompt fits max_prompt_length={cfg.max_prompt_length}"
        )
    return out, {"data/prompts": len(out), "data/skipped_long": skipped}


# ---------------------------------------------------------------- the PPO iteration
class Stepper:
    """What one PPO iteration needs besides the batch: the model, its optimiser, the KL controller, the
    tokenizer, the settings, the accelerator (None: one plain process) and the reference (None: the policy
    with its adapters disabled). Rollouts go through the generation backend (alignkit.generate)."""

    def __init__(self, model, optimizer, kl, tok, s: PPOSettings, acc=None, ref=None):
        from .generate import HFBackend

        self.model, self.opt, self.kl, self.s, self.acc, self.ref = model, optimizer, kl, s, acc, ref
        self.pad_id, self.max_grad_norm = tok.pad_token_id, 1.0
        self.fuse_single_update = True  # see step 3
        self.backend = HFBackend("", model_obj=self._unwrapped().policy, tok=tok)

    def _unwrapped(self) -> PolicyWithValue:
        return self.acc.unwrap_model(self.model) if self.acc else self.model

    def _autocast(self):
        return self.acc.autocast() if self.acc else contextlib.nullcontext()

    def _mean(self, values: list[float]) -> list[float]:
        """Means over processes (one all-reduce)."""
        if not self.acc or self.acc.num_processes == 1:
            return values
        t = self.acc.reduce(torch.tensor(values, dtype=torch.float64, device=self.acc.device), "mean")
        return t.cpu().tolist()

    def _anywhere(self, bad: bool) -> bool:
        """Whether any process has `bad` set, so that every process stops at the same point."""
        if not self.acc or self.acc.num_processes == 1:
            return bad
        return bool(self.acc.reduce(torch.tensor([float(bad)], device=self.acc.device), "sum").item() > 0)

    def _gather(self, x: Tensor) -> Tensor:
        if not self.acc or self.acc.num_processes == 1:
            return x
        return self.acc.gather(x.to(self.acc.device)).cpu()

    def step(self, prompts: list[list[int]], score_fn: Callable, seed: int = 0) -> dict[str, float]:
        """One PPO iteration on this process's prompts; returns the step's statistics (over all processes).

        `score_fn(query, response, mask)` returns the sequence scores (B,), or (scores, extra stats);
        `seed` seeds the rollout's sampling, so a resumed run samples what the uninterrupted one did."""
        s, pv = self.s, self._unwrapped()
        times = {}
        # 1. rollout: batched, KV-cached sampling from the current policy
        t0 = time.perf_counter()
        pv.eval()  # no dropout anywhere: the ratio π/π_old must be 1 before the first update
        with self._autocast():
            self.backend.batch_size = len(prompts)
            query, qmask, resp, mask, ended = rollout(
                self.backend, prompts, self.pad_id, s.max_new_tokens, s.temperature, seed
            )
        times["generation"] = time.perf_counter() - t0
        # 2. score with the reward model; a response cut off before its EOS is penalised
        t0 = time.perf_counter()
        out = score_fn(query, resp, mask)
        score, extra = out if isinstance(out, tuple) else (out, {})
        score = score.float() - s.no_eos_penalty * (~ended).float()
        times["scoring"] = time.perf_counter() - t0
        if self._anywhere(not torch.isfinite(score).all()):
            raise FloatingPointError("the reward model returned a non-finite score")
        # 3. log-probs of the policy and the reference, values; per-token rewards with the KL penalty.
        # With a single update per batch (one epoch, one minibatch) the policy's pass is the update's own
        # forward: its detached outputs are π_old and V_old, and the graph is kept for step 5
        t0 = time.perf_counter()
        n = len(prompts)
        fused = None
        if self.fuse_single_update and s.epochs == 1 and s.minibatch >= n:
            with self._autocast():
                fused = self.model(query, qmask, resp, mask, s.temperature, True)
            old_lp, old_v, ent = (x.detach() for x in fused)
        with torch.no_grad(), self._autocast():
            if fused is None:
                old_lp, old_v, ent = pv(query, qmask, resp, mask, s.temperature, with_entropy=True)
            if self.ref is not None:
                ref_lp, _, _ = response_logprobs(self.ref, query, qmask, resp, mask, False, s.temperature)
            else:
                with pv.policy.disable_adapter():  # the reference: the same weights without the LoRA update
                    ref_lp, _, _ = response_logprobs(
                        pv.policy, query, qmask, resp, mask, False, s.temperature
                    )
        old_lp, old_v, ref_lp, score = old_lp.cpu(), old_v.float().cpu(), ref_lp.cpu(), score.cpu()
        rewards = kl_rewards(old_lp, ref_lp, score, mask, self.kl.beta)
        # 4. GAE, then whitened advantages
        adv, ret = gae(rewards, old_v, mask, s.gamma, s.lam)
        adv = whiten(adv, mask)
        times["reference"] = time.perf_counter() - t0
        # 5. PPO epochs over minibatches
        t0 = time.perf_counter()
        sums: dict[str, list[float]] = {
            k: [] for k in ("policy", "value", "clipfrac", "approx_kl", "grad_norm")
        }
        for _ in range(s.epochs):
            for b in range(0, n, s.minibatch):
                i = slice(b, b + s.minibatch)
                if fused is not None:
                    (lp, v, ent_mb), fused = fused, None
                else:
                    with self._autocast():
                        lp, v, ent_mb = self.model(
                            query[i], qmask[i], resp[i], mask[i], s.temperature, s.entropy_coef > 0
                        )
                m = mask[i].to(lp.device)
                pl, st = ppo_policy_loss(lp, old_lp[i].to(lp.device), adv[i].to(lp.device), m, s.clip)
                vl = value_loss(v.float(), old_v[i].to(lp.device), ret[i].to(lp.device), m, s.value_clip)
                loss = pl + s.vf_coef * vl
                if s.entropy_coef > 0:
                    loss = loss - s.entropy_coef * masked_mean(ent_mb, m)
                if self._anywhere(not torch.isfinite(loss)):
                    raise FloatingPointError(
                        f"a PPO loss is not finite (here {loss.item()}): stopped before the update"
                    )
                self.opt.zero_grad(set_to_none=True)
                self.acc.backward(loss) if self.acc else loss.backward()
                params = [p for p in self.model.parameters() if p.requires_grad]
                clip = self.acc.clip_grad_norm_ if self.acc else torch.nn.utils.clip_grad_norm_
                norm = float(clip(params, self.max_grad_norm or math.inf))  # the norm before clipping
                if not math.isfinite(norm):
                    raise FloatingPointError(f"the gradient norm is {norm}: stopped before the update")
                self.opt.step()
                for k, x in (
                    ("policy", pl),
                    ("value", vl),
                    ("clipfrac", st["clipfrac"]),
                    ("approx_kl", st["approx_kl"]),
                ):
                    sums[k].append(float(x.detach()))
                sums["grad_norm"].append(norm)
        self.opt.zero_grad(set_to_none=True)
        times["training"] = time.perf_counter() - t0
        # 6. the KL coefficient for the next iteration, from the KL over all processes
        lengths = mask.sum(1)
        kl_seq = (old_lp - ref_lp).sum(1)
        all_score, all_len = self._gather(score), self._gather(lengths)
        local = {
            "reward/score": float(score.mean()),
            "kl/ref": float(kl_seq.mean()),
            "value/explained_var": float(explained_variance(old_v, ret, mask)),
            "policy/entropy": float(masked_mean(ent.float().cpu(), mask)),
            "response/length": float(lengths.mean()),
            "response/ended": float(ended.float().mean()),
            **{f"loss/{k}": sum(v) / len(v) for k, v in sums.items() if k in ("policy", "value")},
            **{f"ppo/{k}": sum(v) / len(v) for k, v in sums.items() if k in ("clipfrac", "approx_kl")},
            "train/grad_norm": sum(sums["grad_norm"]) / len(sums["grad_norm"]),
            **{f"perf/time_{k}": v for k, v in times.items()},
            **extra,
        }
        keys = list(local)
        stats = dict(zip(keys, self._mean([local[k] for k in keys]), strict=True))
        beta = self.kl.beta
        self.kl.update(stats["kl/ref"], len(all_score))
        stats["kl/coef"] = beta
        stats["reward/length_corr"] = pearson(all_score, all_len.float())
        stats["perf/samples_per_s"] = len(all_score) / max(sum(times.values()), 1e-9)
        return stats


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two 1-D tensors; 0 when either is constant (the length-bias monitor)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = float((x.square().sum() * y.square().sum()).sqrt())
    return float((x * y).sum()) / den if den > 0 else 0.0


# ---------------------------------------------------------------- scoring and probes
def reward_fn(scorer, tok, messages: list[Messages]) -> Callable:
    """Decode the responses and score them with the reward folder; per-member means go into the stats."""

    def score(query, resp, mask):
        texts = [
            tok.decode(r[: int(m.sum())].tolist(), skip_special_tokens=True)
            for r, m in zip(resp, mask, strict=True)
        ]
        res = scorer.score(messages, texts)
        extra = {}
        if res.scores is not None:
            cols = torch.tensor(res.scores).mean(0).tolist()
            names = (
                ["helpful", "harmless"]
                if scorer.kind == "priority"
                else [f"member_{k}" for k in range(len(cols))]
            )
            extra = {f"reward/{n}": c for n, c in zip(names, cols, strict=True)}
        if res.std is not None:
            extra["ensemble/std"] = sum(res.std) / len(res.std)
        return torch.tensor(res.score), extra

    return score


class ProbeEval:
    """Greedy answers to a few harmful and benign probes, judged by the shipped refusal and output-harm
    classifiers: refusal rate on harmful probes, over-refusal on benign ones, harm on harmful ones."""

    def __init__(self, s: ProbeEvalSettings):
        from . import classifiers
        from .probes import load_pack

        self.s = s
        self.probes = [p for spec in s.packs for p in load_pack(spec)[: s.per_pack]]
        self.refusal = classifiers.load("default:refusal")
        self.harm = classifiers.load("default:output_harm")

    def __call__(self, policy, tok) -> dict[str, float]:
        from .generate import HFBackend, Request, Sampling

        backend = HFBackend("", batch_size=16, model_obj=policy, tok=tok)
        reqs = [Request(p.id, _as_messages(p.prompt, "user")) for p in self.probes]
        sampling = Sampling(n=1, temperature=0.0, max_new_tokens=self.s.max_new_tokens)
        answers = {c.key: c.texts[0] for c in backend.generate(reqs, sampling)}
        prompts = [p.prompt if isinstance(p.prompt, str) else p.prompt[-1]["content"] for p in self.probes]
        texts = [answers[p.id] for p in self.probes]
        refused = [r >= self.refusal.threshold for r in self.refusal.score(prompts, texts)]
        harmful = [h >= self.harm.threshold for h in self.harm.score(prompts, texts)]
        out = {}
        for kind, name in (("refuse", "harmful"), ("comply", "benign")):
            idx = [i for i, p in enumerate(self.probes) if p.expected == kind]
            if idx:
                out[f"probe/refused_{name}"] = sum(refused[i] for i in idx) / len(idx)
                if kind == "refuse":
                    out["probe/harmful_answers"] = sum(harmful[i] for i in idx) / len(idx)
        return out


# ---------------------------------------------------------------- the job
def _order(n: int, batch: int, seed: int, step: int) -> list[int]:
    """The prompts of a step: a fresh permutation each pass over the data, a pure function of (seed, step)."""
    per_pass = max(1, n // batch)
    epoch, off = divmod(step, per_pass)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [perm[(off * batch + j) % n] for j in range(batch)]


def run(cfg: PPOConfig) -> dict:
    from .ensemble import load_scorer

    out = Path(cfg.output_dir)
    if not Path(cfg.reward).is_dir():
        raise DataError(cfg.reward, None, "reward", "not a reward folder (from `alignkit rm train`)")
    tok = load_tokenizer(cfg.model)
    prompts, report = load_prompts(cfg, tok)  # bad data fails here, before output_dir exists
    probe_eval = ProbeEval(cfg.probe) if cfg.probe.every else None  # a bad pack fails here too
    settings = TrainSettings(
        batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, precision=cfg.precision, tracker=cfg.tracker
    )
    acc = make_accelerator(settings, out)
    # DeepSpeed and FSDP shard the weights that generation needs; that path is not built (nor tested)
    if acc.distributed_type.name in ("DEEPSPEED", "FSDP"):
        raise cfglib.ConfigError(
            "ppo runs on one process or under DDP (multi-GPU/CPU), not DeepSpeed or FSDP"
        )
    scorer = load_scorer(cfg.reward, bf16=acc.mixed_precision == "bf16", batch_size=cfg.reward_batch_size)
    if cfg.reward_aggregation or cfg.reward_uwo_lambda is not None:
        if scorer.kind != "ensemble":
            raise cfglib.ConfigError(
                f"reward_aggregation and reward_uwo_lambda need an ensemble; {cfg.reward} is {scorer.kind}"
            )
        scorer.aggregation = cfg.reward_aggregation or scorer.aggregation
        scorer.uwo_lambda = scorer.uwo_lambda if cfg.reward_uwo_lambda is None else cfg.reward_uwo_lambda
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfglib.save(cfg, out / "job_config.yaml")
    if cfg.tracker != "none":
        acc.init_trackers("alignkit-ppo", config=cfglib.to_dict(cfg))
    policy = load_causal_lm(cfg.model)
    hidden = policy.config.hidden_size
    ref = None
    if cfg.lora.enabled:
        policy = apply_lora(policy, cfg.lora, "CAUSAL_LM")
    else:
        ref = copy.deepcopy(policy).eval().requires_grad_(False).to(acc.device)
    single = cfg.value_init == "reward" and scorer.kind == "single"
    head = ValueHead.from_reward_model(scorer.members[0], hidden) if single else ValueHead(hidden)
    model = PolicyWithValue(policy, head)
    trainable, total = count_parameters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    model, opt = acc.prepare(model, opt)
    kl = cfg.kl.controller()
    acc.register_for_checkpointing(kl)
    start = 0
    if cfg.resume and (ck := latest_checkpoint(out)) is not None:
        acc.load_state(str(ck))
        start = json.loads((ck / "trainer_state.json").read_text())["step"]
    log = MetricsLog(out / "metrics.jsonl", acc, resume_step=start if cfg.resume else None)
    if not cfg.resume and acc.is_main_process:
        (out / "metrics.jsonl").write_text("")
    stepper = Stepper(model, opt, kl, tok, cfg.ppo, acc, ref)
    stepper.max_grad_norm = cfg.max_grad_norm
    acc.print(
        f"ppo: {len(prompts)} prompts, reward {scorer.kind} ({cfg.reward}), {trainable:,} of {total:,} "
        f"parameters trainable, {acc.num_processes} process(es), data: {report}"
    )
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc="ppo", disable=not acc.is_main_process)
    if probe_eval and start == 0:
        log.log(0, probe_eval(acc.unwrap_model(model).policy, tok))
    last: dict[str, float] = {}
    for step in range(start, cfg.steps):
        idx = _order(len(prompts), cfg.batch_size, cfg.seed, step)[acc.process_index :: acc.num_processes]
        batch = [prompts[i] for i in idx]
        score_fn = reward_fn(scorer, tok, [p.messages for p in batch])
        try:
            seed = (cfg.seed * 1_000_003 + step) * 1_009 + acc.process_index
            last = stepper.step([p.ids for p in batch], score_fn, seed)
        except FloatingPointError as e:
            ck = latest_checkpoint(out)
            kept = f"the last good checkpoint is {ck}" if ck else "no checkpoint was written (save_every=0)"
            raise FloatingPointError(
                f"{e} at step {step + 1}; {kept}; the final model was not written"
            ) from None
        done = step + 1
        bar.update(1)
        bar.set_postfix(score=f"{last['reward/score']:.3f}", kl=f"{last['kl/ref']:.2f}")
        if done % cfg.log_every == 0 or done == cfg.steps:
            log.log(done, last)
        if probe_eval and (done % cfg.probe.every == 0 or done == cfg.steps):
            ev = probe_eval(acc.unwrap_model(model).policy, tok)
            log.log(done, ev)
            last.update(ev)
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            training.save_checkpoint(acc, out, done, cfg.keep_checkpoints)
    bar.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_model(acc.unwrap_model(model).policy, tok, out, cfg.lora)
    acc.wait_for_everyone()  # no process leaves the group while another still uses it
    acc.end_training()
    return {**last, **report}
