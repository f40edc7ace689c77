"""RL training throughput: `alignkit ppo` against TRL's RLOOTrainer, with a per-phase breakdown of a step.

Each side is a subprocess on the default model: the same ShareGPT prompts in the same order (alignkit's prompt
file is laid out so that its `prompt_order` yields TRL's batches; the prompt ids are compared), samples per
step, temperature, LoRA, reference (the adapter-free model), KL β, one AdamW step a batch, fp32, and the same
seeded reward model (built once into --cache). Phases: alignkit's perf/time_* metrics, and TRL's timed
`_generate_single_turn`, `_calculate_rewards`, no-grad `_get_per_token_logps_and_entropies` and rollout.

    HF_HUB_OFFLINE=1 python benchmarks/rl_throughput.py            # 2 warm-up + 10 timed steps per side
    HF_HUB_OFFLINE=1 python benchmarks/rl_throughput.py --quick    # 1 warm-up + 2 timed steps per side
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import harness
import torch
import transformers
from harness import fmt, ok, table

from alignkit import config as cfglib
from alignkit.data import as_messages, template_ids
from alignkit.models import apply_lora, count_parameters, load_causal_lm, load_reward_model, load_tokenizer
from alignkit.models import resolve as model_path
from alignkit.sources import sharegpt_pairs
from alignkit.train import ppo
from alignkit.train.batching import prompt_order

SIDES, PHASES = ("alignkit", "trl"), ("generation", "scoring", "reference", "training")
LABEL = {"alignkit": "alignkit ppo", "trl": "TRL RLOOTrainer"}
PHASE_LABEL = {
    "generation": "generation (rollout)",
    "scoring": "scoring (reward model)",
    "reference": "old + reference log-probs",
    "training": "training (update)",
    "rollout_rest": "rest of TRL's rollout (templating, decode, padding, advantages)",
    "other": "other (rest of the step and loop)",
}
RM_RECIPE = {"base": "default", "num_labels": 1, "score_init": "normal(0, 0.02), torch.Generator seed 0"}


def build_reward_model(cache: Path) -> Path:
    """The benchmark's reward folder (built once): the default model with a seeded score head and its tokenizer."""
    out = cache / "rm"
    if (out / "bench_rm.json").exists() and json.loads((out / "bench_rm.json").read_text()) == RM_RECIPE:
        return out
    tok = load_tokenizer("default")
    model = load_reward_model("default", tok.pad_token_id)
    with torch.no_grad():
        w = model.score.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32) * 0.02)
        if getattr(model.score, "bias", None) is not None:
            model.score.bias.zero_()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "bench_rm.json").write_text(json.dumps(RM_RECIPE))  # last: a half-written folder is rebuilt
    return out


def prompt_len(tok, q: str) -> int:
    return len(template_ids(tok, as_messages(q), add_generation_prompt=True))


def build_prompts(tok, n: int, max_tokens: int) -> list[str]:
    """The first n distinct ShareGPT first human turns (training split) of at most max_tokens templated tokens."""
    out: list[str] = []
    for q, _ in sharegpt_pairs(split="train"):
        if q not in out and prompt_len(tok, q) <= max_tokens:
            out.append(q)
            if len(out) >= n:
                return out
    raise SystemExit(f"only {len(out)} ShareGPT prompts of ≤ {max_tokens} tokens; need {n}")


def alignkit_prompt_file(batches: list[list[str]], seed: int) -> list[str]:
    """alignkit's prompt file, laid out so that its own step order (`prompt_order`) yields `batches`."""
    b, n = len(batches[0]), len(batches[0]) * len(batches)
    slots: list[str | None] = [None] * n
    for s, batch in enumerate(batches):
        for i, q in zip(prompt_order(n, b, seed, s), batch, strict=True):
            if slots[i] not in (None, q):
                raise SystemExit("alignkit's prompt order is not one pass over the file: cannot lay it out")
            slots[i] = q
    if None in slots:
        raise SystemExit("alignkit's prompt order does not cover the file")
    return slots  # type: ignore[return-value]


def worker_alignkit(s: dict) -> dict:
    out, marks, info, step = Path(s["out_dir"]), [], {}, ppo.Stepper.step

    def timed_step(self, prompts, *a, **kw):
        t0, res = time.perf_counter(), step(self, prompts, *a, **kw)
        opt = getattr(self.opt, "optimizer", self.opt)  # accelerate wraps the optimiser
        flags = ", ".join(f"{k}={opt.defaults.get(k)}" for k in ("weight_decay", "foreach", "fused"))
        info["optimizer"] = f"torch.optim.{type(opt).__name__}({flags})"
        # with one update per batch the update's own forward is also the π_old/V_old pass
        single = self.s.epochs == 1 and self.s.minibatch >= len(prompts)
        info["fused_update_forward"] = bool(getattr(self, "fuse_single_update", False) and single)
        ids = [list(map(int, p)) for p in prompts]
        marks.append({"begin": t0, "end": time.perf_counter(), "prompts": ids})
        return res

    ppo.Stepper.step = timed_step
    overrides = (
        f"max_prompt_length={s['max_prompt_tokens']} steps={s['steps_total']} batch_size={s['batch_size']} "
        f"lr={s['lr']} seed={s['seed']} ppo.max_new_tokens={s['max_new_tokens']} ppo.minibatch={s['batch_size']} "
        f"model=default max_grad_norm=1.0 precision=fp32 {harness.LORA} ppo.temperature=1.0 ppo.epochs=1 "
        "kl.beta=0.05 probe.every=0 save_every=0 log_every=1 tracker=none"
    ).split() + [f"prompts={s['prompts']}", f"reward={s['reward']}", f"output_dir={out}"]
    cfg = cfglib.load(ppo.PPOConfig, None, overrides)
    t_start = time.perf_counter()
    ppo.run(cfg)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    recs = [r for r in recs if "perf/time_generation" in r]
    if len(recs) != len(marks):
        raise RuntimeError(f"{len(marks)} steps timed but {len(recs)} metrics lines")
    steps = []
    for m, r in zip(marks, recs, strict=True):
        steps.append({"begin": m["begin"] - t_start, "end": m["end"] - t_start, "prompts": m["prompts"]})
        steps[-1]["phases"] = {k: r.get(f"perf/time_{k}", 0.0) for k in PHASES}
        steps[-1] |= {"completion_len": r.get("response/length"), "samples": len(m["prompts"])}
    model = apply_lora(load_causal_lm("default"), cfg.lora, "CAUSAL_LM")
    (trainable, total), config = count_parameters(model), cfglib.to_dict(cfg)
    res = {"steps": steps, "params_trainable_lora": trainable, "params_total": total, "precision": "fp32"}
    res["params_trainable"] = trainable + model.config.hidden_size + 1  # + the value head
    res["gradient_checkpointing"] = False
    res["config"] = {k: v for k, v in config.items() if k not in ("prompts", "reward", "output_dir")}
    return info | res


def worker_trl(s: dict) -> dict:
    import datasets
    import peft
    from trl import RLOOConfig, RLOOTrainer

    path, cur = model_path("default"), {}
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    prompts = json.loads(Path(s["prompts"]).read_text())
    ds = datasets.Dataset.from_list([{"prompt": as_messages(q)} for q in prompts])
    transformers.set_seed(s["seed"])
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rm_tok = transformers.AutoTokenizer.from_pretrained(s["reward"])
    auto = transformers.AutoModelForSequenceClassification
    rm = auto.from_pretrained(s["reward"], num_labels=1, dtype=torch.float32).eval()
    rm.config.pad_token_id = rm_tok.pad_token_id

    def timed(name: str, method: str, when=lambda: True):
        def run(self, *a, **kw):
            t, on = time.perf_counter(), when()
            out = getattr(RLOOTrainer, method)(self, *a, **kw)
            if on:
                cur.setdefault("phases", {})
                cur["phases"][name] = cur["phases"].get(name, 0.0) + time.perf_counter() - t
            if name == "generation":  # (prompt ids, ...) → completion ids
                cur["prompts"] = [list(map(int, p)) for p in a[0]]
                cur["completion_lens"] = [len(c) for c in out]
            return out

        return run

    class TimedRLOO(RLOOTrainer):
        """RLOOTrainer, its rollout phases timed; the no-grad log-prob calls are the old and reference ones."""

        _generate_single_turn = timed("generation", "_generate_single_turn")
        _calculate_rewards = timed("scoring", "_calculate_rewards")
        _get_per_token_logps_and_entropies = timed(
            "reference", "_get_per_token_logps_and_entropies", lambda: not torch.is_grad_enabled()
        )
        _generate_and_score_completions = timed("rollout", "_generate_and_score_completions")

    args = harness.kv(
        "steps_per_generation=1 gradient_accumulation_steps=1 num_iterations=1 temperature=1.0 top_p=1.0 "
        "top_k=0 beta=0.05 shuffle_dataset=false lr_scheduler_type=constant warmup_steps=0 weight_decay=0.01 "
        "max_grad_norm=1.0 bf16=false activation_checkpointing=false logging_steps=1 save_strategy=no "
        "eval_strategy=no report_to=none disable_tqdm=true log_completions=false dataloader_num_workers=0"
    )
    args |= {"output_dir": s["out_dir"], "per_device_train_batch_size": s["batch_size"]}
    args |= {"num_generations": s["num_generations"], "max_completion_length": s["max_new_tokens"]}
    args |= {"learning_rate": s["lr"], "max_steps": s["steps_total"], "seed": s["seed"]}
    timer = harness.step_timer(cur)
    lora = peft.LoraConfig(**harness.PEFT_LORA, task_type="CAUSAL_LM")
    data = {"train_dataset": ds, "processing_class": tok, "reward_processing_classes": rm_tok}
    args["use_cpu"] = not torch.cuda.is_available()
    data |= {"reward_funcs": rm, "callbacks": [timer], "peft_config": lora}
    trainer = TimedRLOO(model=model, args=RLOOConfig(**args), **data)
    per, every = trainer.args.generation_batch_size, trainer.args.steps_per_generation
    if every != 1 or per != s["batch_size"]:
        raise RuntimeError(f"TRL generates {per} samples every {every} steps, not {s['batch_size']} a step")
    trainer.train()
    for st in timer.steps:
        ph = {k: 0.0 for k in ("generation", "scoring", "reference")} | st.get("phases", {})
        rollout = ph.pop("rollout", 0.0)
        ph["rollout_rest"] = rollout - ph["generation"] - ph["scoring"] - ph["reference"]
        ph["training"], st["phases"] = (st["end"] - st["begin"]) - rollout, ph
        lens = st.pop("completion_lens", [])
        st["completion_len"], st["samples"] = (sum(lens) / len(lens) if lens else None), len(lens)
    dtype = str(next(trainer.model.parameters()).dtype).replace("torch.", "") + ", mixed_precision="
    res = {"steps": timer.steps, "precision": dtype + str(trainer.accelerator.mixed_precision)}
    config = {k: getattr(trainer.args, k) for k in [*args, "generation_batch_size"]}  # as TRL resolved them
    res["config"] = config
    res["reference"] = "adapters disabled" if trainer.ref_model is None else "separate model"
    return res | harness.trl_facts(trainer)


def finish(spec: dict, res: dict) -> dict:
    steps, w = res["steps"], spec["warmup"]
    if len(steps) != spec["steps_total"]:
        return res | {"error": f"{len(steps)} steps recorded; expected {spec['steps_total']}"}
    # a step's time: from the end of the previous step (the first: its own start) to its end
    prev_end = [steps[0]["begin"]] + [s["end"] for s in steps[:-1]]
    step_s = [s["end"] - p for s, p in zip(steps, prev_end, strict=True)]
    inner_s, timed, timed_s = [s["end"] - s["begin"] for s in steps], steps[w:], step_s[w:]
    n, total, median = sum(s["samples"] for s in timed), sum(timed_s), statistics.median(timed_s)
    mean, keys = statistics.mean(timed_s), sorted({k for s in timed for k in s["phases"]})
    phases = {k: statistics.mean(s["phases"].get(k, 0.0) for s in timed) for k in keys}
    phases["other"] = mean - sum(phases.values())
    lens = [s["completion_len"] for s in timed if s["completion_len"] is not None]
    lm = statistics.mean(lens) if lens else None
    res.update(timed_steps=len(timed), samples_per_step=n / len(timed), timed_s=total, step_s=step_s)
    res.update(inner_step_s=inner_s, samples_per_s=n / total, samples_per_s_inner=n / sum(inner_s[w:]))
    res.update(samples_per_s_median_step=n / len(timed) / median, median_step_s=median, mean_step_s=mean)
    res.update(phases_mean_s=phases, completion_len_mean=lm, completion_tokens_per_s=lm and lm * n / total)
    res["progress"] = (
        f"{res['samples_per_s']:.3f} samples/s (median step {res['samples_per_s_median_step']:.3f}), completions "
        f"{fmt(lm, '.1f')} tokens, other processes {res['other_cpu_share']:.0%} CPU ({res['wall_s']:.0f} s)"
    )
    return res


def fmt_report(report: dict) -> list[str]:
    a, res, d, rep = report["args"], report["results"], report["data"], report["reward"]
    trl, fused_pass = res.get("trl"), ok(res.get("alignkit")) and res["alignkit"].get("fused_update_forward")
    rates = {LABEL[k]: [f"{r['samples_per_s']:.3f}" for r in rs if ok(r)] for k, rs in report["runs"].items()}
    rates = [f"{label} {', '.join(v)}" for label, v in rates.items()]
    optim = "; ".join(f"{LABEL[sd]} {res[sd]['optimizer']}" for sd in a["sides"] if ok(res.get(sd)))
    lines = harness.header("RL training throughput: alignkit ppo vs TRL RLOOTrainer", report) + [
        f"- Per step: {a['batch_size']} samples = {a['batch_size'] // a['num_generations']} prompts × "
        f"{a['num_generations']}, ≤ {a['max_new_tokens']} new tokens, temperature 1.0, one AdamW step (lr {a['lr']}, "
        f"weight decay 0.01, clip 1.0), fp32, LoRA r=16 α=32 all-linear, reference = the adapter-free model, β 0.05; "
        f"seed {a['seed']}; {a['warmup']} warm-up + {a['steps']} timed steps; runs (samples/s): {'; '.join(rates)}",
        f"- Prompts: {d['prompts']} ShareGPT first human turns, ≤ {a['max_prompt_tokens']} tokens templated (mean "
        f"{d['mean_prompt_tokens']:.1f}); check: {d['prompt_check']}. Reward: {rep['path']} ({rep['recipe']['score_init']})",
        f"- Optimisers: {optim}; TRL reference: {trl.get('reference') if ok(trl) else '–'}",
        "",
    ]
    rows, fails = [], []
    for side in a["sides"]:
        if not ok(r := res.get(side)):
            fails.append(f"{LABEL[side]}: {r.get('error') if r else 'not run'}")
            rows.append([LABEL[side], f"failed [{len(fails)}]", *["–"] * 7])
            continue
        rows.append(
            f"{LABEL[side]}|{r['samples_per_s']:.3f}|{r['samples_per_s_median_step']:.3f}|{r['median_step_s']:.2f}|"
            f"{statistics.mean(r['inner_step_s'][a['warmup'] :]):.2f}|{fmt(r['completion_len_mean'], '.1f')}|"
            f"{fmt(r['completion_tokens_per_s'], '.1f')}|{r['params_trainable']:,}|"
            f"{r['other_cpu_share'] * 100:.0f} %".split("|")
        )
    head = "side|samples/s|samples/s (median step)|s/step (median)|s/step inside the step (mean)|completion "
    head += "tokens (mean)|completion tokens/s|trainable params|other processes' CPU"
    lines += table(head, rows, "lr")
    if (ratio := report.get("ratio_samples_per_s")) is not None:
        med, met = report["ratio_samples_per_s_median_step"], "met" if ratio >= 2 else "NOT met"
        msg = f"{ratio:.2f}× samples/s ({med:.2f}× by median step); target ≥ 2×: {met}"
        lines += ["", f"**alignkit ÷ TRL: {msg}**"]
    good, phase_rows = [s for s in a["sides"] if ok(res.get(s))], []
    both = ("old + reference log-probs and training together", ("reference", "training"))
    for label, keys in [*((v, (k,)) for k, v in PHASE_LABEL.items()), both]:
        cells = []
        for ph, t in ((res[s]["phases_mean_s"], res[s]["mean_step_s"]) for s in good):
            x = sum(ph[k] for k in keys) if set(keys) <= ph.keys() else None
            cells.append("–" if x is None else f"{x:.2f} s ({100 * x / t:.0f} %)")
        if any(c != "–" for c in cells):
            phase_rows.append([label, *cells])
    phase_rows.append(["**step (end to end)**", *[f"{res[s]['mean_step_s']:.2f} s" for s in good]])
    lines += ["", "## Where a step goes (mean over the timed steps)", ""]
    lines += table("|".join(["phase", *[LABEL[s] for s in good]]), phase_rows, "l" + "r" * len(good))
    lines += ["", "## Notes", ""] + [f"- {x}" for x in report["notes"]]
    if fused_pass:
        lines.append("- alignkit's π_old/V_old pass is the update's own forward (one update a batch): its")
        lines[-1] += " training row is backward, clip and AdamW only; compare the rows of the two together."
    return lines + (["", *[f"[{i}] {n}" for i, n in enumerate(fails, 1)]] if fails else [])


def main(argv: list[str] | None = None) -> None:
    defaults = {"steps": 10, "warmup": 2, "batch_size": 8, "lr": 1e-5, "quiet_wait": 120, "sides": SIDES}
    p = harness.parser(
        __doc__,
        ("--num-generations", int, 2, "samples per prompt (TRL num_generations, ≥ 2)"),
        ("--max-new-tokens", int, 32, "longest completion, in tokens"),
        ("--max-prompt-tokens", int, 64, "use only prompts of at most this many templated tokens"),
        ("--cache", Path, Path("/work/runs/rl_bench"), "folder of the benchmark's reward model (built once)"),
        runs=defaults,
    )
    a = harness.parse(p, argv, {"alignkit": worker_alignkit, "trl": worker_trl}, SIDES)
    if a.num_generations < 2 or a.batch_size % a.num_generations:
        p.error("need --num-generations ≥ 2 dividing --batch-size")
    total, per_step = a.steps + a.warmup, a.batch_size // a.num_generations
    tok, rm_path = load_tokenizer("default"), build_reward_model(a.cache)
    prompts = build_prompts(tok, per_step * total, a.max_prompt_tokens)
    # each step's prompts as TRL's RepeatSampler (shuffle off) yields them: each repeated num_generations times
    steps = [prompts[s * per_step : (s + 1) * per_step] for s in range(total)]
    batches = [[q for q in step for _ in range(a.num_generations)] for step in steps]
    (a.work / "trl_prompts.json").write_text(json.dumps(prompts, ensure_ascii=False))
    rows = [json.dumps({"prompt": q}, ensure_ascii=False) for q in alignkit_prompt_file(batches, a.seed)]
    (a.work / "alignkit_prompts.jsonl").write_text("".join(r + "\n" for r in rows))
    mean_len = statistics.mean(prompt_len(tok, q) for q in prompts)
    print(f"prompts: {len(prompts)} (mean {mean_len:.1f} tokens), reward model {rm_path}", flush=True)
    keys = ("batch_size", "num_generations", "max_new_tokens", "max_prompt_tokens", "lr", "seed", "warmup")
    common = {k: getattr(a, k) for k in keys} | {"reward": str(rm_path), "steps_total": total}
    files = {"alignkit": "alignkit_prompts.jsonl", "trl": "trl_prompts.json"}
    specs = {sd: common | {"side": sd, "prompts": str(a.work / files[sd])} for sd in a.sides}
    runs, results = harness.run_sides(__file__, specs, a, finish, LABEL, "samples_per_s")
    ak, trl = results.get("alignkit"), results.get("trl")
    ids = [[st.get("prompts") for st in r["steps"]] for r in (ak, trl) if ok(r)]  # the prompts each side used
    same = sum(x == y for x, y in zip(*ids, strict=True)) if len(ids) == 2 else None
    check = f"{same} of {total} steps with identical prompt token ids on both sides"
    check = check if same is not None else "not checked (a side failed)"
    data = {"prompts": len(prompts), "mean_prompt_tokens": mean_len, "prompt_check": check}
    for st in (st for rs in runs.values() for r in rs for st in r.get("steps", [])):
        st.pop("prompts", None)  # checked: the per-step prompt ids need not go into the JSON
    report = harness.report_base(a, argv, __file__, "trl", "transformers", "peft", "accelerate")
    report["data"] = data | {"prompt_texts": prompts}
    report["reward"] = {"path": str(rm_path), "recipe": RM_RECIPE}
    report |= {"results": results, "runs": runs}
    for key in ("samples_per_s", "samples_per_s_median_step") if ok(ak) and ok(trl) else ():
        report[f"ratio_{key}"] = ak[key] / trl[key]
    report["notes"] = [
        "The algorithms differ: alignkit runs PPO with a value head on the policy's hidden state (GAE over tokens), "
        "TRL RLOO (a leave-one-out baseline, no value model); both cost next to nothing beside one generation, one "
        "reward-model pass, the old and reference log-probs and one forward + backward per step."
    ]
    if ok(ak) and ok(trl) and ak["completion_len_mean"] and trl["completion_len_mean"]:
        la, lt = ak["completion_len_mean"], trl["completion_len_mean"]
        diff = f"{(la / lt - 1) * 100:+.1f} %"
        report["notes"].append(f"Mean completion length: alignkit {la:.1f}, TRL {lt:.1f} tokens ({diff}).")
    harness.write_results(a, "rl_throughput", report, fmt_report(report))


if __name__ == "__main__":
    main()
