"""Training throughput: alignkit `sft` / `rm` against TRL's SFTTrainer / RewardTrainer (fp32 and bf16).

Held equal: the default model, the ShareGPT examples in the same order (each exactly --seq-len tokens), batch,
lr, AdamW, clip, seed, trainable parameters (full, or LoRA with --lora) and steps; no eval, checkpoints or
gradient checkpointing. Each run is a subprocess timed after --warmup steps; where bf16 is emulated (no AVX-512
BF16/AMX) bf16 sides run --slow-bf16-steps steps. Figures: tokens/s, loss, and MFU (6·N FLOPs per token, LoRA:
4·N + 2·N_trainable) over the matmul peak measured in the same run in the side's precision.

    HF_HUB_OFFLINE=1 python benchmarks/train_throughput.py            # 20 timed steps after 2 warm-up
    HF_HUB_OFFLINE=1 python benchmarks/train_throughput.py --quick    # 3-step smoke test
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import harness
import torch
import transformers
from harness import ok, table

from alignkit import config as cfglib
from alignkit.data import encode_pairs, encode_sft, parse_pairs, parse_sft, template_ids
from alignkit.models import apply_lora, load_causal_lm, load_reward_model, load_tokenizer, resolve, use_bf16
from alignkit.sources import sharegpt_conversations
from alignkit.train import rm, sft
from alignkit.train.batching import batch_order
from alignkit.train.loop import make_optimizer

SIDES, TASKS = ("alignkit", "trl-fp32", "trl-bf16"), ("sft", "rm")
LABEL = {"alignkit": "alignkit", "trl-fp32": "TRL fp32", "trl-bf16": "TRL bf16"}


def msg(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def fit_reply(tok, prompt: list[dict], reply: str, target: int) -> str | None:
    """`reply` cut on a token boundary so that the templated prompt + reply is exactly `target` tokens."""
    ids = tok(reply, add_special_tokens=False)["input_ids"]
    k0 = target - len(template_ids(tok, prompt + msg("")))
    if k0 < 1 or len(ids) < k0:
        return None
    for k in sorted(range(max(1, k0 - 6), min(len(ids), k0 + 6) + 1), key=lambda k: (abs(k - k0), k)):
        if len(template_ids(tok, prompt + msg(text := tok.decode(ids[:k])))) == target:
            return text
    return None


def build_data(tok, n: int, seq_len: int, min_completion: int = 32):
    """n SFT rows {prompt, completion} and n RM rows {prompt, chosen, rejected} of exactly seq_len tokens, from
    ShareGPT's first exchanges (never the index % 10 == 0 evaluation reserve); rejected: the next reply that fits."""
    cands = []  # (index, prompt messages, reply text)
    for i, conv in sharegpt_conversations():
        t = conv.get("conversations") or []
        if i % 10 == 0 or len(t) < 2 or [x.get("from") for x in t[:2]] != ["human", "gpt"]:
            continue
        p, r = t[0].get("value"), t[1].get("value")
        if not (isinstance(p, str) and isinstance(r, str) and p.strip() and r.strip()):
            continue
        prompt = [{"role": "user", "content": p}]
        short = len(template_ids(tok, prompt, add_generation_prompt=True)) <= seq_len - min_completion
        if short and fit_reply(tok, prompt, r, seq_len) is not None:
            cands.append((i, prompt, r))
        if len(cands) >= n + 8:
            break
    if len(cands) < n + 1:
        raise SystemExit(f"only {len(cands)} usable conversations; need {n + 1}")
    sft_rows, rm_rows = [], []
    for j, (i, prompt, reply) in enumerate(cands[:n]):
        chosen = fit_reply(tok, prompt, reply, seq_len)
        sft_rows.append({"prompt": prompt, "completion": msg(chosen)})
        fits = (fit_reply(tok, prompt, cands[(j + k) % len(cands)][2], seq_len) for k in range(1, len(cands)))
        if (rejected := next((f for f in fits if f is not None and f != chosen), None)) is None:
            raise SystemExit(f"no rejected reply fits conversation {i}")
        rm_rows.append({"prompt": prompt, "chosen": msg(chosen), "rejected": msg(rejected)})
    # with alignkit's own tokenisation: every sequence is exactly seq_len, nothing truncated or dropped
    rows, rep = encode_sft(parse_sft(list(enumerate(sft_rows, 1)), "sft"), tok, seq_len, "sft")
    bad = rep.truncated or rep.dropped or any(len(r["input_ids"]) != seq_len for r in rows)
    pairs, rep = encode_pairs(parse_pairs(list(enumerate(rm_rows, 1)), "rm"), tok, seq_len, "rm")
    bad = bad or rep.truncated or rep.dropped
    if bad or any({len(r["chosen_ids"]), len(r["rejected_ids"])} != {seq_len} for r in pairs):
        raise SystemExit(f"the data is not {seq_len} tokens per sequence under alignkit's tokenisation")
    return sft_rows, rm_rows, [c[0] for c in cands[:n]]


def matmul_peak(n: int, shape: tuple[int, int, int], budget_s: float = 2.0) -> dict[str, dict]:
    """Best matmul FLOP/s in bf16 and fp32: square torch.mm up to n³ (doubling from 256 while the next is projected
    to take under budget_s: emulated bf16 is slow), and F.linear of the MLP shape; each measurement is kept."""

    def best(fn, seconds: float) -> float:
        fn()
        t_best, t_end, reps = float("inf"), time.perf_counter() + seconds, 0
        while reps < 3 or time.perf_counter() < t_end:
            t = time.perf_counter()
            fn()
            t_best, reps = min(t_best, time.perf_counter() - t), reps + 1
        return t_best

    out, (m, k, nn) = {}, shape
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        rates, size = {}, 256
        while True:
            a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
            t = best(lambda a=a, b=b: torch.mm(a, b), 0.5 if size < n else 1.5)
            rates[f"mm {size}³"] = 2 * size**3 / t
            if size >= n or 8 * t > budget_s:
                break
            size *= 2
        x, w = torch.randn(m, k).to(dtype), torch.randn(nn, k).to(dtype)
        t = best(lambda x=x, w=w: torch.nn.functional.linear(x, w), 1.0)
        rates[f"linear {m}×{k}→{nn}"] = 2 * m * k * nn / t
        top = max(rates, key=rates.get)
        out[name] = {"flops": rates[top], "what": top, "all": rates}
    return out


def matmul_params() -> dict[str, int]:
    """N for the MFU and the bf16 projection, from the config alone (no weights loaded)."""
    config = transformers.AutoConfig.from_pretrained(resolve("default"))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    head = 0 if config.tie_word_embeddings else model.get_output_embeddings().weight.numel()
    out = {"sft": total if config.tie_word_embeddings else total - emb, "rm": total - emb - head}
    return out | {"hidden": config.hidden_size, "intermediate": config.intermediate_size}


def param_counts(model, task: str) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    # the input embedding is a lookup; it costs matmul FLOPs only where it doubles as the LM head
    matmul = total if (task == "sft" and tied) else total - emb.numel()
    return {"params_total": total, "params_trainable": trainable, "params_matmul": matmul}


def worker_alignkit(s: dict) -> dict:
    out = Path(s["out_dir"])
    overrides = (
        f"train.batch_size={s['batch_size']} train.lr={s['lr']} train.max_steps={s['steps_total']} "
        f"train.seed={s['seed']} train.precision={s['precision']} max_length={s['seq_len']} model=default "
        "train.grad_accum=1 train.weight_decay=0.0 train.lr_scheduler=constant train.warmup_ratio=0.0 "
        "train.max_grad_norm=1.0 train.gradient_checkpointing=false train.group_by_length=false "
        "train.eval_fraction=0.0 train.eval_every=0 train.save_every=0 train.log_every=1 train.tracker=none "
        + (harness.LORA if s["lora"] else "lora.enabled=false")
    ).split() + [f"data={s['data']}", f"output_dir={out}"]
    if s["task"] == "sft":
        cfg = cfglib.load(sft.SFTConfig, None, overrides)
        sft.run(cfg)
        model = apply_lora(load_causal_lm("default"), cfg.lora, "CAUSAL_LM")
    else:
        cfg = cfglib.load(rm.RMConfig, None, [*overrides, "loss=bt", "ensemble.size=1"])
        rm.run(cfg)
        model = load_reward_model("default", load_tokenizer("default").pad_token_id)
        model = apply_lora(model, cfg.lora, "SEQ_CLS")
    # perf/tokens_per_s: tokens since step 0 / elapsed, so step k ends at k·tokens_per_step / tokens_per_s(k)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    recs = [r for r in recs if "perf/tokens_per_s" in r]
    opt, _ = make_optimizer(torch.nn.Linear(2, 2), cfg.train, 1)  # how alignkit builds its optimiser
    flags = ", ".join(f"{k}={opt.defaults.get(k)}" for k in ("fused", "foreach") if k in opt.defaults)
    ends = [r["step"] * s["tokens_per_step"] / r["perf/tokens_per_s"] for r in recs]
    optimizer, losses = f"torch.optim.{type(opt).__name__}({flags})", [r["train/loss"] for r in recs]
    res = {"step_ends_s": ends, "losses": losses, "optimizer": optimizer}
    prec, gc = "bf16" if use_bf16(s["precision"]) else "fp32", cfg.train.gradient_checkpointing
    return res | {"precision": prec, "gradient_checkpointing": gc} | param_counts(model, s["task"])


def worker_trl(s: dict) -> dict:
    import datasets
    import peft
    import trl

    path, is_sft = resolve("default"), s["task"] == "sft"
    rows = [json.loads(ln) for ln in Path(s["data"]).read_text().splitlines() if ln.strip()]
    # alignkit's batch order (group_by_length off) fed to TRL sequentially: both see the same batches
    order = [i for b in batch_order([0] * len(rows), s["batch_size"], s["seed"], 0, False) for i in b]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    transformers.set_seed(s["seed"])  # right before loading, as alignkit: the RM head and LoRA start alike
    if is_sft:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        auto = transformers.AutoModelForSequenceClassification
        model = auto.from_pretrained(path, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
    lora = peft.LoraConfig(**harness.PEFT_LORA, task_type="CAUSAL_LM" if is_sft else "SEQ_CLS")
    args = harness.kv(
        "gradient_accumulation_steps=1 lr_scheduler_type=constant warmup_steps=0 weight_decay=0.0 "
        "max_grad_norm=1.0 train_sampling_strategy=sequential logging_steps=1 save_strategy=no "
        "eval_strategy=no report_to=none disable_tqdm=true "
        + ("completion_only_loss=true assistant_only_loss=false packing=false shuffle_dataset=false" * is_sft)
    )
    args |= {"output_dir": s["out_dir"], "per_device_train_batch_size": s["batch_size"], "seed": s["seed"]}
    args |= {"max_steps": s["steps_total"], "learning_rate": s["lr"], "bf16": s["precision"] == "bf16"}
    # activation_checkpointing: transformers 5's name for gradient_checkpointing (TRL defaults it to True)
    args |= {"activation_checkpointing": s["trl_gradient_checkpointing"], "max_length": s["seq_len"]}
    config, make = (trl.SFTConfig, trl.SFTTrainer) if is_sft else (trl.RewardConfig, trl.RewardTrainer)
    timer, ds = harness.step_timer({}), datasets.Dataset.from_list([rows[i] for i in order])
    data = {"train_dataset": ds, "processing_class": tok, "peft_config": lora if s["lora"] else None}
    args["use_cpu"] = not torch.cuda.is_available()
    trainer = make(model=model, args=config(**args), callbacks=[timer], **data)
    cols = ["input_ids"] if is_sft else ["chosen_ids", "rejected_ids"]
    lens = {len(x) for c in cols for x in trainer.train_dataset[c]}
    if len(trainer.train_dataset) != len(rows) or lens != {s["seq_len"]}:
        raise RuntimeError(f"TRL prepared {len(trainer.train_dataset)} of {len(rows)} rows, lengths {lens}")
    trainer.train()
    parts = (("fwd_bwd_clip", "begin", "pre_opt"), ("optimizer", "pre_opt", "opt"), ("rest", "opt", "end"))
    res = {"step_ends_s": [st["end"] for st in timer.steps], "precision": s["precision"]}
    res["step_phases_s"] = [{k: st[b] - st[a] for k, a, b in parts} for st in timer.steps if "opt" in st]
    res["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return res | harness.trl_facts(trainer) | param_counts(trainer.model, s["task"])


def finish(spec: dict, res: dict) -> dict:
    ends, losses, w, tps = res["step_ends_s"], res["losses"], spec["warmup"], spec["tokens_per_step"]
    if len(ends) != spec["steps_total"] or len(losses) != spec["steps_total"]:
        return res | {"error": f"{len(ends)} steps, {len(losses)} losses; expected {spec['steps_total']}"}
    step_s = [b - a for a, b in zip([0.0, *ends[:-1]], ends, strict=True)]
    timed, med = step_s[w:], statistics.median(step_s[w:])
    res.update(timed_steps=len(timed), timed_s=sum(timed), tokens_timed=len(timed) * tps, step_s=step_s)
    res.update(tokens_per_s=len(timed) * tps / sum(timed), tokens_per_s_median_step=tps / med)
    res.update(final_loss=losses[-1], first_loss=losses[0], reduced_steps=spec["reduced_steps"])
    res["progress"] = (
        f"{res['tokens_per_s']:.1f} tokens/s (median step {res['tokens_per_s_median_step']:.1f}), final loss "
        f"{res['final_loss']:.4f}, other processes {res['other_cpu_share']:.0%} CPU ({res['wall_s']:.0f} s)"
    )
    return res


def loss_diff(ak: dict, r: dict) -> float:
    """(alignkit − side) / side at the side's last step (the same batch on both: a shortened run compares early)."""
    return (ak["losses"][len(r["losses"]) - 1] - r["final_loss"]) / abs(r["final_loss"])


def verdict(report: dict) -> list[str]:
    out = []
    for task, side in ((t, s) for t in report["args"]["tasks"] for s in ("trl-fp32", "trl-bf16")):
        ak, r = report["results"][task].get("alignkit"), report["results"][task].get(side)
        if not (ok(ak) and ok(r)):
            continue
        ratio, diff = ak["tokens_per_s"] / r["tokens_per_s"], abs(loss_diff(ak, r))
        med = ak["tokens_per_s_median_step"] / r["tokens_per_s_median_step"]
        n, precisions = len(r["losses"]), (ak["precision"], r["precision"])
        how = f"not like for like: alignkit {precisions[0]}, TRL {precisions[1]}, {n} step(s)"
        if not r.get("reduced_steps") and precisions[0] == precisions[1]:
            how = f"target (≥ 2× at ≤ 2 %) {'met' if ratio >= 2 and diff <= 0.02 else 'NOT met'}"
        head = f"{task} vs {LABEL[side]}: {ratio:.2f}× ({med:.2f}× by median step)"
        out.append(f"{head}, loss Δ {diff:.2%}; {how}")
    return out


def fmt_table(report: dict) -> list[str]:
    a, res, d = report["args"], report["results"], report["data"]
    optim = {LABEL[sd]: r["optimizer"] for t in a["tasks"] for sd, r in res[t].items() if ok(r)}
    optim, gc = "; ".join(f"{k} {v}" for k, v in optim.items()), a["trl_gradient_checkpointing"]
    peaks = [f"{k} {p['flops'] / 1e9:.1f} GFLOP/s ({p['what']})" for k, p in report["peak"].items()]
    flops = "4·N + 2·N_trainable" if a["lora"] else "6·N"
    ns = [f"{t} {n / 1e6:.1f} M" for t, n in report["params_matmul"].items()]
    lines = harness.header("Training throughput: alignkit vs TRL", report) + [
        f"- Setup: {'LoRA r=16 α=32 all-linear' if a['lora'] else 'full fine-tune'}, batch {a['batch_size']} × "
        f"{a['seq_len']} tokens, lr {a['lr']}, seed {a['seed']}, {a['warmup']} warm-up + {a['steps']} timed steps, "
        f"fastest of {a['repeats']}; data {d['source']} ({d['examples']} examples per task); alignkit "
        f"train.precision={a['alignkit_precision']}; TRL gradient checkpointing {'on' if gc else 'off'}; {optim}",
        f"- MFU: {flops} FLOPs per token (N: {', '.join(ns)}) over the matmul peak (up to {a['peak_size']}³, start "
        f"and end of the run) of the side's precision: {', '.join(peaks)}",
        "",
    ]
    rows, notes = [], []
    for task, side in ((t, s) for t in a["tasks"] for s in a["sides"] if s in res[t]):
        r, ak = res[task][side], res[task].get("alignkit")
        if not ok(r):
            notes.append(f"{task} / {LABEL[side]}: {r.get('skipped') or r.get('error')}")
            status = "skipped" if "skipped" in r else "failed"
            rows.append([task, LABEL[side], r.get("precision", "–"), f"{status} [{len(notes)}]", *["–"] * 7])
            continue
        if r.get("reduced_steps"):
            notes.append(f"{task} / {LABEL[side]}: bf16 is emulated here: {len(r['losses'])} step(s) only")
        vs, mark = ok(ak) and side != "alignkit", f" [{len(notes)}]" if r.get("reduced_steps") else ""
        ratio = f"{ak['tokens_per_s'] / r['tokens_per_s']:.2f}×" if vs else "–"
        diff = f"{loss_diff(ak, r) * 100:+.2f} %" if vs else "–"
        rows.append(
            f"{task}|{LABEL[side]}|{r['precision']}|{r['tokens_per_s']:.1f}{mark}|{r['tokens_per_s_median_step']:.1f}|"
            f"{ratio}|{r['final_loss']:.4f}|{diff}|{r['first_loss']:.4f}|{r['mfu'] * 100:.1f} % ({r['precision']})|"
            f"{r['other_cpu_share'] * 100:.0f} %".split("|")
        )
    head = "task|side|precision|tokens/s|tokens/s (median step)|alignkit ÷ side|final loss|loss diff (alignkit − side)"
    lines += table(head + "|first-step loss|MFU (vs peak)|other processes' CPU share", rows, "lll" + "r" * 8)
    lines += ["", *[f"[{i}] {n}" for i, n in enumerate(notes, 1)]] if notes else []
    return lines + ["", *[f"- {x}" for x in report["verdict"]]]


def main(argv: list[str] | None = None) -> None:
    defaults = {"steps": 20, "warmup": 2, "batch_size": 8, "lr": 2e-5, "quiet_wait": 300, "sides": SIDES}
    p = harness.parser(
        __doc__,
        ("--seq-len", int, 128, "tokens in every sequence (templated and cut to exactly this)"),
        ("--lora", bool, False, "train LoRA adapters (r=16, α=32, all linear layers), not every weight"),
        ("--tasks", str, "sft,rm", "comma-separated subset of: " + ", ".join(TASKS)),
        ("--alignkit-precision", ("auto", "bf16", "fp32"), "auto", "alignkit's train.precision"),
        ("--trl-gradient-checkpointing", bool, False, "keep TRL's default gradient checkpointing"),
        ("--force-bf16", bool, False, "run bf16 sides in full even where bf16 is emulated"),
        ("--slow-bf16-steps", int, 1, "steps of bf16 sides where bf16 is emulated (0: skip them)"),
        ("--peak-size", int, 2048, "largest n of the n×n×n matmuls that measure the peak"),
        runs=defaults,
    )
    a = harness.parse(p, argv, {"alignkit": worker_alignkit, "trl": worker_trl}, SIDES)
    if not set(tasks := [t for t in a.tasks.split(",") if t]) <= set(TASKS):
        p.error("bad --tasks")

    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    native_bf16, total = harness.machine_info()["native_bf16"] or gpu_bf16, a.steps + a.warmup
    n, tok, t = a.batch_size * total, load_tokenizer("default"), time.perf_counter()
    sft_rows, rm_rows, indices = build_data(tok, n, a.seq_len)
    print(f"data: {n} ShareGPT examples of exactly {a.seq_len} tokens ({time.perf_counter() - t:.0f} s)")
    for name, rows in (("sft", sft_rows), ("rm", rm_rows)):
        (a.work / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    n_matmul = matmul_params()
    harness.wait_quiet(a.quiet_wait)
    shape = (a.batch_size * a.seq_len, n_matmul["hidden"], n_matmul["intermediate"])
    peak_start = matmul_peak(a.peak_size, shape)
    print("matmul peak: " + ", ".join(f"{k} {v['flops'] / 1e9:.1f} GFLOP/s" for k, v in peak_start.items()))
    precision = {"alignkit": "bf16" if use_bf16(a.alignkit_precision) else "fp32"}
    precision |= {"trl-fp32": "fp32", "trl-bf16": "bf16"}
    keep = ("batch_size", "seq_len", "lr", "seed", "lora", "trl_gradient_checkpointing")
    runs, results = {}, {}
    for task in tasks:
        tps, specs, results[task] = a.batch_size * a.seq_len * (2 if task == "rm" else 1), {}, {}
        common = {k: getattr(a, k) for k in keep} | {"task": task, "tokens_per_step": tps}
        common["data"] = str(a.work / f"{task}.jsonl")
        for side in a.sides:
            steps, warmup = total, a.warmup
            if precision[side] == "bf16" and not native_bf16 and not a.force_bf16:
                if a.slow_bf16_steps == 0:  # emulated bf16: skipped, the reason is written at the end
                    results[task][side] = {"precision": "bf16", "skipped": "", "tokens_per_step": tps}
                    print(f"{task} / {LABEL[side]}: skipped (no native bf16)", flush=True)
                    continue
                steps, warmup = a.slow_bf16_steps, 0
            own = a.alignkit_precision if side == "alignkit" else precision[side]
            specs[side] = common | dict(side=side, steps_total=steps, warmup=warmup, precision=own)
            specs[side]["reduced_steps"] = steps != total
        runs[task], best = harness.run_sides(__file__, specs, a, finish, LABEL, "tokens_per_s", task)
        results[task] |= best
    peak_end = matmul_peak(a.peak_size, shape)
    peaks = {k: max(peak_start[k], peak_end[k], key=lambda v: v["flops"]) for k in peak_start}
    bf, fp = peaks["bf16"]["flops"], peaks["fp32"]["flops"]
    for task, r in ((t, r) for t in tasks for r in results[t].values()):
        if "skipped" in r:
            minutes = 6 * n_matmul[task] * r["tokens_per_step"] / bf / 60
            r["skipped"] = (
                f"bf16 is emulated on this CPU (no AVX-512 BF16/AMX): bf16 matmuls reach {bf / 1e9:.1f} GFLOP/s against "
                f"{fp / 1e9:.1f} in fp32, so a step needs about {minutes:.0f} min (--slow-bf16-steps N, --force-bf16)"
            )
        if ok(r):
            flops = 4 * r["params_matmul"] + 2 * r["params_trainable"] if a.lora else 6 * r["params_matmul"]
            r["mfu"] = flops * r["tokens_per_s"] / peaks[r["precision"]]["flops"]
    report = harness.report_base(a, argv, __file__, "trl", "transformers", "accelerate")
    report["args"]["tasks"] = tasks
    report |= {"data": {"source": "sharegpt", "examples": n, "sharegpt_indices": indices}, "peak": peaks}
    per_task = {t: n_matmul[t] for t in tasks}
    report |= {"peak_start": peak_start, "peak_end": peak_end, "params_matmul": per_task}
    report |= {"results": results, "runs": runs}
    report["verdict"] = verdict(report)
    harness.write_results(a, "train_throughput", report, fmt_table(report))


if __name__ == "__main__":
    main()
