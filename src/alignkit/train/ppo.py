"""`alignkit ppo`: PPO against a reward model, ensemble or priority pair, with a per-token KL penalty to the
reference policy (Ziegler et al. 2019, arXiv:1909.08593; Ouyang et al. 2022, arXiv:2203.02155). The
reference is the LoRA policy with its adapters disabled: one copy of the weights (`lora.enabled=false` trains
every weight and keeps a frozen copy); the value head shares the policy's backbone."""

import contextlib
import copy
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..config import ConfigError, inline, peak_rss_mb
from ..data import DataError, Messages, as_messages, read_records, template_ids, text_or_messages
from ..detect import classifiers
from ..detect.judges import ClassifierJudge
from ..gen import Sampling
from ..gen.hf import HFBackend
from ..measure.probe import probe_metrics
from ..models import LoraSettings, apply_lora, count_parameters, load_causal_lm, load_tokenizer, save_model
from ..packs import load_pack
from . import loop, rl
from .batching import prompt_order
from .loop import RunSettings, end_job, make_accelerator, open_run, record_job, save_checkpoint
from .reward import Reward, load_reward
from .rollout import PolicyWithValue, Rollout, ValueHead, response_logprobs, rollout


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

    def controller(self) -> rl.AdaptiveKL | rl.FixedKL:
        adaptive = self.mode == "adaptive"
        return rl.AdaptiveKL(self.beta, self.target, self.horizon) if adaptive else rl.FixedKL(self.beta)


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

    prompts: str
    """Prompts: JSONL {prompt} (a string or a message list), a save_to_disk folder or an HF dataset."""
    reward: str
    """Reward folder from `alignkit rm train` or `rm combine`: a single RM, an ensemble or a priority pair."""
    model: str = "default"
    """Starting policy and reference (an SFT output): hub id, local folder or 'default'."""
    output_dir: str = "runs/ppo"
    """Where the policy (a plain HF folder), job_config.yaml, metrics.jsonl, checkpoints and probes/ go."""
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
    run: RunSettings = inline(RunSettings)
    """Seed, precision, clipping, checkpoints and logging (keys at the top level: seed=, resume=, ...)."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be ≥ 1")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")


class Prompt(NamedTuple):
    messages: Messages
    ids: list[int]


def load_prompts(cfg: PPOConfig, tok) -> tuple[list[Prompt], dict]:
    """Read and template the prompts; a bad record is a DataError naming the file, line and field."""
    every = []
    for line, rec in read_records(cfg.prompts):
        msgs = as_messages(text_or_messages(rec, "prompt", cfg.prompts, line), "user", cfg.system)
        every.append(Prompt(msgs, template_ids(tok, msgs, add_generation_prompt=True)))
    out = [p for p in every if len(p.ids) <= cfg.max_prompt_length]
    if not out:
        msg = f"no prompt fits max_prompt_length={cfg.max_prompt_length}"
        raise DataError(cfg.prompts, None, "prompt", msg)
    return out, {"data/prompts": len(out), "data/skipped_long": len(every) - len(out)}


class Experience(NamedTuple):
    """Steps 2–4 of a rollout (on the CPU), and the fused rollout-time pass's outputs with their graph."""

    rewards: Tensor  # (B,) after the no-EOS penalty
    old_logprobs: Tensor  # (B, T)
    old_values: Tensor  # (B, T)
    ref_logprobs: Tensor  # (B, T)
    entropy: Tensor  # (B, T)
    advantages: Tensor  # (B, T) whitened
    returns: Tensor  # (B, T)
    fused: tuple | None = None


class Stepper:
    """PPO iterations; acc=None: one plain process; ref=None: the reference is the LoRA-disabled policy."""

    def __init__(self, model, optimizer, kl, tok, s: PPOSettings, acc=None, ref=None):
        self.model, self.opt, self.kl, self.s, self.acc, self.ref = model, optimizer, kl, s, acc, ref
        self.pad_id, self.max_grad_norm = tok.pad_token_id, 1.0
        self.multi = acc is not None and acc.num_processes > 1
        self.fuse_single_update = True  # see step 3
        self.backend = HFBackend("", model_obj=self.unwrapped().policy, tok=tok)

    def unwrapped(self) -> PolicyWithValue:
        return self.acc.unwrap_model(self.model) if self.acc else self.model

    def autocast(self):
        return self.acc.autocast() if self.acc else contextlib.nullcontext()

    def mean(self, values: list[float]) -> list[float]:
        if not self.multi:
            return values
        t = self.acc.reduce(torch.tensor(values, dtype=torch.float64, device=self.acc.device), "mean")
        return t.cpu().tolist()

    def anywhere(self, bad: bool) -> bool:
        """Whether any process has `bad` set, so that every process stops at the same point."""
        return self.mean([float(bad)])[0] > 0

    def gather(self, x: Tensor) -> Tensor:
        return self.acc.gather(x.to(self.acc.device)).cpu() if self.multi else x

    def step(self, prompts: list[list[int]], reward_fn: Callable, seed: int = 0) -> dict[str, float]:
        """One PPO iteration → stats over all processes; `reward_fn(query, response, mask)` → rewards (B,)."""
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        ro = self.sample(prompts, seed)  # 1. rollout: batched, KV-cached sampling from the current policy
        t0 = lap(times, "generation", t0)
        # 2. score with the reward model; a response cut off before its EOS is penalised
        out = reward_fn(ro.query, ro.response, ro.response_mask)
        rewards, extra = out if isinstance(out, tuple) else (out, {})
        rewards = rewards.float() - self.s.no_eos_penalty * (~ro.ended).float()
        if self.anywhere(not torch.isfinite(rewards).all()):
            raise FloatingPointError("the reward model returned a non-finite score")
        t0 = lap(times, "scoring", t0)
        exp = self.experience(ro, rewards)  # 3.–4. log-probs, values, KL-penalised per-token rewards, GAE
        t0 = lap(times, "reference", t0)
        losses = self.update(ro, exp)  # 5. PPO epochs over minibatches
        lap(times, "training", t0)
        return self.statistics(ro, exp, losses, times, extra)  # 6. statistics, and β for the next step

    def sample(self, prompts: list[list[int]], seed: int) -> Rollout:
        self.unwrapped().eval()  # no dropout anywhere: the ratio π/π_old must be 1 before the first update
        self.backend.batch_size, s = len(prompts), self.s
        with self.autocast():
            return rollout(self.backend, prompts, self.pad_id, s.max_new_tokens, s.temperature, seed)

    def experience(self, ro: Rollout, rewards: Tensor) -> Experience:
        """Steps 3–4. With a single update per batch (one epoch, one minibatch) the policy's pass is the
        update's own forward: its detached outputs are π_old and V_old, and its graph is kept for step 5."""
        s, pv, fused = self.s, self.unwrapped(), None
        args = (ro.query, ro.query_mask, ro.response, ro.response_mask)
        if self.fuse_single_update and s.epochs == 1 and s.minibatch >= len(ro.query):
            with self.autocast():
                fused = self.model(*args, s.temperature, True)
            old_lp, old_v, ent = (x.detach() for x in fused)
        with torch.no_grad(), self.autocast():
            if fused is None:
                old_lp, old_v, ent = pv(*args, s.temperature, with_entropy=True)
            if self.ref is not None:
                ref_lp, _, _ = response_logprobs(self.ref, *args, False, s.temperature)
            else:
                with pv.policy.disable_adapter():  # the reference: the same weights without the LoRA update
                    ref_lp, _, _ = response_logprobs(pv.policy, *args, False, s.temperature)
        old_lp, old_v, ref_lp, rewards = old_lp.cpu(), old_v.float().cpu(), ref_lp.cpu(), rewards.cpu()
        # 3. r_t = −β·(log π − log π_ref)_t, plus the reward on the last response token
        token_rewards = rl.kl_rewards(old_lp, ref_lp, rewards, ro.response_mask, self.kl.beta)
        # 4. δ_t = r_t + γV_{t+1} − V_t;  A_t = δ_t + γλA_{t+1} (GAE, Schulman et al. 2016), whitened
        advantages, returns = rl.gae(token_rewards, old_v, ro.response_mask, s.gamma, s.lam)
        advantages = rl.whiten(advantages, ro.response_mask)
        return Experience(rewards, old_lp, old_v, ref_lp, ent, advantages, returns, fused)

    def update(self, ro: Rollout, exp: Experience) -> dict[str, list[float]]:
        """Step 5: `epochs` of clipped surrogate + value loss (+ entropy) minibatch steps, NaN-guarded."""
        s, n, fused = self.s, len(ro.query), exp.fused
        sums = {k: [] for k in ("policy", "value", "clipfrac", "approx_kl", "grad_norm")}
        for _ in range(s.epochs):
            for b in range(0, n, s.minibatch):
                i = slice(b, b + s.minibatch)
                if fused is not None:
                    (logprobs, values, entropy), fused = fused, None
                else:
                    batch = (ro.query[i], ro.query_mask[i], ro.response[i], ro.response_mask[i])
                    with self.autocast():
                        logprobs, values, entropy = self.model(*batch, s.temperature, s.entropy_coef > 0)
                stored = (exp.old_logprobs, exp.advantages, exp.old_values, exp.returns, ro.response_mask)
                old_lp, adv, old_v, ret, m = (x[i].to(logprobs.device) for x in stored)
                pl, st = rl.ppo_policy_loss(logprobs, old_lp, adv, m, s.clip)
                vl = rl.value_loss(values.float(), old_v, ret, m, s.value_clip)
                loss = pl + s.vf_coef * vl
                if s.entropy_coef > 0:
                    loss = loss - s.entropy_coef * rl.masked_mean(entropy, m)
                sums["grad_norm"].append(self.backward(loss))
                for k, x in {"policy": pl, "value": vl, **st}.items():  # st: clipfrac, approx_kl
                    sums[k].append(float(x.detach()))
        self.opt.zero_grad(set_to_none=True)
        return sums

    def backward(self, loss: Tensor) -> float:
        """Backward, clip and step, after checking the loss and the gradient norm; → the unclipped norm."""
        if self.anywhere(not torch.isfinite(loss)):
            msg = f"a PPO loss is not finite (here {loss.item()}): stopped before the update"
            raise FloatingPointError(msg)
        self.opt.zero_grad(set_to_none=True)
        self.acc.backward(loss) if self.acc else loss.backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = self.acc.clip_grad_norm_ if self.acc else torch.nn.utils.clip_grad_norm_
        norm = float(clip(params, self.max_grad_norm or math.inf))
        if not math.isfinite(norm):
            raise FloatingPointError(f"the gradient norm is {norm}: stopped before the update")
        self.opt.step()
        return norm

    def statistics(self, ro: Rollout, exp: Experience, losses: dict, times: dict, extra: dict) -> dict:
        """Step 6: the metrics (means over all processes; the README's glossary), then β from their KL."""
        mask = ro.response_mask
        lengths, kl_seq = mask.sum(1), (exp.old_logprobs - exp.ref_logprobs).sum(1)
        all_rewards, all_lengths = self.gather(exp.rewards), self.gather(lengths)
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        local = {
            "reward/score": float(exp.rewards.mean()),
            "kl/ref": float(kl_seq.mean()),
            "value/explained_var": float(rl.explained_variance(exp.old_values, exp.returns, mask)),
            "policy/entropy": float(rl.masked_mean(exp.entropy.float().cpu(), mask)),
            "response/length": float(lengths.mean()),
            "response/ended": float(ro.ended.float().mean()),
            **{f"loss/{k}": mean(losses[k]) for k in ("policy", "value")},
            **{f"ppo/{k}": mean(losses[k]) for k in ("clipfrac", "approx_kl")},
            "train/grad_norm": mean(losses["grad_norm"]),
            **{f"perf/time_{k}": v for k, v in times.items()},
            **extra,
        }
        stats = dict(zip(local, self.mean(list(local.values())), strict=True))
        stats["kl/coef"] = self.kl.beta  # the β this step used; update() sets the next one
        self.kl.update(stats["kl/ref"], len(all_rewards))
        stats["reward/length_corr"] = rl.pearson(all_rewards, all_lengths.float())
        stats["perf/samples_per_s"] = len(all_rewards) / max(sum(times.values()), 1e-9)
        stats["perf/peak_rss_mb"] = peak_rss_mb()
        return stats


def lap(times: dict[str, float], phase: str, t0: float) -> float:
    now = time.perf_counter()
    times[phase] = now - t0
    return now


def reward_fn(reward: Reward, tok, messages: list[Messages]) -> Callable:
    """Score the decoded responses; each part's mean and the ensemble's spread go into the step's stats."""

    def rewards_of(query, response, response_mask):
        texts = [
            tok.decode(r[: int(m.sum())].tolist(), skip_special_tokens=True)
            for r, m in zip(response, response_mask, strict=True)
        ]
        res = reward.score(messages, texts)
        extra = {f"reward/{k}": sum(v) / len(v) for k, v in (res.parts or {}).items()}
        if res.std is not None:
            extra["ensemble/std"] = sum(res.std) / len(res.std)
        return torch.tensor(res.reward), extra

    return rewards_of


class ProbeEval:
    """Greedy answers to a few probes, judged by shipped classifiers; step N's go to probes/step-N.jsonl."""

    def __init__(self, s: ProbeEvalSettings, folder: Path):
        self.s, self.folder = s, folder
        self.probes = [p for spec in s.packs for p in load_pack(spec)[: s.per_pack]]
        self.refusal = ClassifierJudge(classifiers.load("default:refusal"), "refusal")
        self.harm = ClassifierJudge(classifiers.load("default:output_harm"), "harm")

    def __call__(self, policy, tok, step: int) -> dict[str, float]:
        backend = HFBackend("", batch_size=16, model_obj=policy, tok=tok)
        sampling = Sampling(n=1, temperature=0.0, max_new_tokens=self.s.max_new_tokens)
        path = self.folder / f"step-{step}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        return probe_metrics(backend, self.probes, sampling, path, self.refusal, self.harm)


def build_model(cfg: PPOConfig, reward: Reward, acc):
    """The policy (LoRA, or full with a frozen reference copy) and its value head: → (model, reference)."""
    policy = load_causal_lm(cfg.model)
    hidden = policy.config.hidden_size
    ref = None if cfg.lora.enabled else copy.deepcopy(policy).eval().requires_grad_(False).to(acc.device)
    policy = apply_lora(policy, cfg.lora, "CAUSAL_LM")  # as is for a full fine-tune
    head = ValueHead.from_score_head(reward.score_head() if cfg.value_init == "reward" else None, hidden)
    return PolicyWithValue(policy, head), ref


def setup(cfg: PPOConfig):
    """Everything a run needs, bad input refused before anything is written."""
    if not Path(cfg.reward).is_dir():
        raise DataError(cfg.reward, None, "reward", "not a reward folder (from `alignkit rm train`)")
    out = Path(cfg.output_dir)
    tok = load_tokenizer(cfg.model)
    prompts, report = load_prompts(cfg, tok)
    probe_eval = ProbeEval(cfg.probe, out / "probes") if cfg.probe.every else None  # a bad pack fails here
    acc = make_accelerator(cfg.run, out, cfg.batch_size, batch_key="batch_size")
    # DeepSpeed and FSDP shard the weights that generation needs; that path is not built (nor tested)
    if acc.distributed_type.name in ("DEEPSPEED", "FSDP"):
        raise ConfigError("ppo runs on one process or under DDP (multi-GPU/CPU), not DeepSpeed or FSDP")
    reward = load_reward(cfg.reward, bf16=acc.mixed_precision == "bf16", batch_size=cfg.reward_batch_size)
    reward.set_aggregation(cfg.reward_aggregation, cfg.reward_uwo_lambda)
    record_job(acc, cfg, cfg.run, out, "ppo")
    return tok, prompts, report, probe_eval, reward, acc


def run(cfg: PPOConfig) -> dict:
    out = Path(cfg.output_dir)
    tok, prompts, report, probe_eval, reward, acc = setup(cfg)
    model, ref = build_model(cfg, reward, acc)
    trainable, total = count_parameters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    model, opt = acc.prepare(model, opt)
    kl = cfg.kl.controller()
    acc.register_for_checkpointing(kl)
    start, log = open_run(acc, out, cfg.run.resume)
    if not cfg.run.resume and acc.is_main_process:
        shutil.rmtree(out / "probes", ignore_errors=True)
    stepper = Stepper(model, opt, kl, tok, cfg.ppo, acc, ref)
    stepper.max_grad_norm = cfg.run.max_grad_norm
    acc.print(
        f"ppo: {len(prompts)} prompts, reward {reward.kind} ({cfg.reward}), {trainable:,} of {total:,} "
        f"parameters trainable, {acc.num_processes} process(es), data: {report}"
    )
    evaluate = probe_eval and acc.is_main_process  # the answers are the same on every process
    bar = tqdm(total=cfg.steps, initial=start, desc="ppo", disable=not acc.is_main_process)
    if evaluate and start == 0:
        log.log(0, probe_eval(acc.unwrap_model(model).policy, tok, 0))
    last: dict[str, float] = {}
    for done in range(start + 1, cfg.steps + 1):
        last = ppo_step(cfg, stepper, prompts, reward, tok, acc, done - 1)
        bar.update(1)
        bar.set_postfix(score=f"{last['reward/score']:.3f}", kl=f"{last['kl/ref']:.2f}")
        if done % cfg.run.log_every == 0 or done == cfg.steps:
            log.log(done, last)
        if evaluate and (done % cfg.probe.every == 0 or done == cfg.steps):
            ev = probe_eval(acc.unwrap_model(model).policy, tok, done)
            log.log(done, ev)
            last.update(ev)
        if cfg.run.save_every and done % cfg.run.save_every == 0 and done < cfg.steps:
            save_checkpoint(acc, out, done, cfg.run.keep_checkpoints)
    bar.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_model(acc.unwrap_model(model).policy, tok, out, cfg.lora)
    del stepper, model, opt  # the DDP model goes while the process group is alive (see end_job)
    end_job(acc)  # no process leaves the group while another still uses it
    return {**last, **report}


def ppo_step(cfg: PPOConfig, stepper: Stepper, prompts: list[Prompt], reward: Reward, tok, acc, step: int):
    """Iteration `step` on this process's share of the prompts; a divergence names the last checkpoint."""
    order = prompt_order(len(prompts), cfg.batch_size, cfg.run.seed, step)
    batch = [prompts[i] for i in order[acc.process_index :: acc.num_processes]]
    try:
        seed = (cfg.run.seed * 1_000_003 + step) * 1_009 + acc.process_index
        return stepper.step([p.ids for p in batch], reward_fn(reward, tok, [p.messages for p in batch]), seed)
    except FloatingPointError as e:
        ck = loop.latest_checkpoint(Path(cfg.output_dir))
        kept = f"the last good checkpoint is {ck}" if ck else "no checkpoint was written (save_every=0)"
        raise FloatingPointError(f"{e} at step {step + 1}; {kept}; the final model was not written") from None
