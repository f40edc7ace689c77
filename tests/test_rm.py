"""`alignkit rm train` end to end on a tiny Llama: a plain HF reward model, LoRA and full training, exact
accumulation and resume, bootstrap ensembles."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_sft import Interrupted, assert_same_weights, interrupt_after_checkpoint, spy_on_train, train_metrics

from alignkit import cli
from alignkit.config import load
from alignkit.models import load_tokenizer
from alignkit.train import loop
from alignkit.train import rm as train_rm
from alignkit.train.reward import load_reward
from alignkit.train.rm import RMConfig, build_task

FAST = ["train.precision=fp32", "lora.r=4", "train.batch_size=4", "train.max_steps=3"]
PROMPTS = ["tell me about water", "tell me about fire", "what is the moon"]
RESPONSES = ["sure here is water, helpful and polite", "no sorry cannot assist", "the moon is good"]


def run_rm(data: Path, model: str, out: Path, *overrides: str) -> Path:
    assert (
        cli.main(["rm", "train", f"data={data}", f"model={model}", f"output_dir={out}", *FAST, *overrides])
        == 0
    )
    return out


def plain_scores(model, tok) -> list[float]:
    """Score PROMPTS × RESPONSES one at a time with plain transformers (no alignkit code)."""
    out = []
    for p, r in zip(PROMPTS, RESPONSES, strict=True):
        text = tok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
        )
        with torch.no_grad():
            out.append(model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item())
    return out


def test_rm_writes_a_plain_hf_reward_model_that_scores_like_load_reward(tmp_path, tiny_model, pairs_file):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = run_rm(pairs_file, tiny_model, tmp_path / "rm")
    assert load(RMConfig, out / "job_config.yaml").model == tiny_model
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("/" in k for r in rows for k in r if k != "step")  # group/name keys
    metrics = train_metrics(out)
    assert sorted(metrics) == [1, 2, 3]
    assert all(math.isfinite(m["train/loss"]) and 0 <= m["train/accuracy"] <= 1 for m in metrics.values())
    assert not (out / "adapter_config.json").exists() and not (out / "ensemble.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    assert not torch.equal(
        model.state_dict()["model.layers.0.self_attn.q_proj.weight"],
        base.state_dict()["model.layers.0.self_attn.q_proj.weight"],
    )
    expected = plain_scores(model, AutoTokenizer.from_pretrained(out))
    reward = load_reward(out, bf16=False)
    assert reward.kind == "single"
    got = reward.score(PROMPTS, RESPONSES)
    torch.testing.assert_close(torch.tensor(got.reward), torch.tensor(expected), atol=1e-5, rtol=0)
    assert got.parts is None and got.std is None


def test_rm_adapter_only_on_request_scores_like_merged(tmp_path, tiny_model, pairs_file):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    merged = run_rm(pairs_file, tiny_model, tmp_path / "merged")
    adapter = run_rm(pairs_file, tiny_model, tmp_path / "adapter", "lora.save_adapter_only=true")
    assert (adapter / "adapter_model.safetensors").exists() and not (adapter / "model.safetensors").exists()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    tok = AutoTokenizer.from_pretrained(adapter)
    got = plain_scores(PeftModel.from_pretrained(base, adapter).eval(), tok)
    expected = plain_scores(AutoModelForSequenceClassification.from_pretrained(merged).eval(), tok)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-5, rtol=0)
    # and alignkit's own scorer reads the adapter folder too
    scored = load_reward(adapter, bf16=False).score(PROMPTS, RESPONSES).reward
    torch.testing.assert_close(torch.tensor(scored), torch.tensor(expected), atol=1e-5, rtol=0)


def test_rm_lora_trains_adapters_and_head_only(tmp_path, tiny_model, pairs_file, monkeypatch):
    seen = spy_on_train(monkeypatch, loop)
    run_rm(pairs_file, tiny_model, tmp_path / "rm")
    (r,) = seen
    assert any("lora_" in n for n in r["trainable"]) and any("score" in n for n in r["trainable"])
    assert all("lora_" in n or "modules_to_save" in n for n in r["trainable"])
    for name, before in r["before"].items():
        same = torch.equal(before, r["after"][name])
        assert same != (name in r["trainable"]), (
            f"{name}: trainable={name in r['trainable']}, changed={not same}"
        )


def test_rm_full_training_changes_every_parameter(tmp_path, tiny_model, pairs_file, monkeypatch):
    seen = spy_on_train(monkeypatch, loop)
    run_rm(pairs_file, tiny_model, tmp_path / "rm", "lora.enabled=false")
    (r,) = seen
    assert r["trainable"] == set(r["before"])
    assert [n for n, p in r["before"].items() if torch.equal(p, r["after"][n])] == []


@pytest.mark.parametrize("split", ["train.grad_accum=4", "train.micro_tokens=1"])  # 1: a pair per pass
@pytest.mark.parametrize("lora", ["true", "false"])
def test_rm_grad_accum_equals_one_big_batch(tmp_path, tiny_model, pairs_file, lora, split):
    one = run_rm(pairs_file, tiny_model, tmp_path / "a1", f"lora.enabled={lora}", "train.micro_tokens=0")
    four = run_rm(pairs_file, tiny_model, tmp_path / "a4", f"lora.enabled={lora}", split)
    # Adam's first steps move each weight by about lr·sign(g) ≈ 1e-4 whatever |g|: a wrong accumulation shows at
    # that size, while summation order alone can nudge updates of near-zero gradient entries by a few 1e-6
    assert_same_weights(one, four, atol=1e-5)
    m1, m4 = train_metrics(one), train_metrics(four)
    for step in (1, 2, 3):
        for key in ("train/loss", "train/grad_norm", "train/accuracy"):
            assert m1[step][key] == pytest.approx(m4[step][key], rel=1e-5), (step, key)
        # the cap split every step into one-row passes: the largest pass is one row, not the batch
        assert m4[step]["perf/micro_tokens"] < m1[step]["perf/micro_tokens"]


def test_rm_resume_equals_an_uninterrupted_run(tmp_path, tiny_model, pairs_file, monkeypatch):
    args = ["train.max_steps=6", "train.save_every=3", "train.grad_accum=2", "lora.dropout=0.1"]
    a = run_rm(pairs_file, tiny_model, tmp_path / "a", *args)
    with monkeypatch.context() as m:
        interrupt_after_checkpoint(m, at_step=3)
        with pytest.raises(Interrupted):
            run_rm(pairs_file, tiny_model, tmp_path / "b", *args)
    b = run_rm(pairs_file, tiny_model, tmp_path / "b", *args, "train.resume=true")
    assert_same_weights(a, b, atol=1e-6)
    assert sorted(train_metrics(b)) == [1, 2, 3, 4, 5, 6]


def test_bootstrap_gives_members_different_data(tmp_path, tiny_model, pairs_file, monkeypatch):
    def member_data(name: str, *overrides: str) -> list[list[tuple]]:
        seen, real = [], loop.train

        def spy(model, task, *args, **kw):
            seen.append([(tuple(r["chosen_ids"]), tuple(r["rejected_ids"])) for r in task.train_rows])
            return real(model, task, *args, **kw)

        with monkeypatch.context() as m:
            m.setattr(loop, "train", spy)
            run_rm(
                pairs_file, tiny_model, tmp_path / name, "ensemble.size=2", "train.max_steps=1", *overrides
            )
        return seen

    plain = member_data("plain")
    assert len(plain) == 2 and plain[0] == plain[1]  # without bootstrap members differ by seed only
    boot = member_data("boot", "ensemble.bootstrap=true")
    assert len(boot) == 2 and boot[0] != boot[1]
    for rows in boot:  # a resample with replacement of the same training pairs
        assert len(rows) == len(plain[0]) and set(rows) <= set(plain[0]) and len(set(rows)) < len(rows)


def test_loss_choice_follows_labels(tmp_path, tiny_model):
    from conftest import write_jsonl

    tok = load_tokenizer(tiny_model)
    hard = [{"prompt": f"q {i}", "chosen": "yes good", "rejected": "no bad"} for i in range(4)]
    soft = hard[:3] + [{**hard[3], "label": 0.7}]

    def is_soft(records, loss="auto"):
        data = write_jsonl(tmp_path / "p.jsonl", records)
        return build_task(
            load(RMConfig, None, [f"data={data}", f"loss={loss}", "train.eval_fraction=0"]), tok
        )[2]

    assert not is_soft(hard) and is_soft(soft)
    assert is_soft(hard, "soft") and not is_soft(soft, "bt")


def test_ensemble_members_resume_by_member(tmp_path, tiny_model, pairs_file, monkeypatch):
    """An ensemble run that stopped during member 1 keeps member 0 and trains member 1 only when run again."""
    real, calls, stop = train_rm.train_member, [], {"member-1"}

    def member_or_stop(cfg, task, tok, out, *args, **kw):
        calls.append(out.name)
        if out.name in stop:
            stop.discard(out.name)
            raise Interrupted(out.name)
        return real(cfg, task, tok, out, *args, **kw)

    monkeypatch.setattr(train_rm, "train_member", member_or_stop)
    with pytest.raises(Interrupted):
        run_rm(pairs_file, tiny_model, tmp_path / "ens", "ensemble.size=2")
    assert (tmp_path / "ens" / "members" / "member-0" / "done.json").exists()
    run_rm(pairs_file, tiny_model, tmp_path / "ens", "ensemble.size=2")
    assert calls == ["member-0", "member-1", "member-1"]
    spec = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert spec["members"] == ["members/member-0", "members/member-1"]


def tracked_tags(folder: Path) -> bytes:
    """The bytes of every TensorBoard event file under `folder` (scalar tags are stored as plain text)."""
    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard events under {folder}"
    return b"".join(f.read_bytes() for f in files)


def test_tensorboard_tracker_logs_reward_model_training(tmp_path, tiny_model, pairs_file):
    # `rm train` once never started its tracker: train.tracker=tensorboard wrote nothing
    out = run_rm(pairs_file, tiny_model, tmp_path / "rm", "train.tracker=tensorboard")
    tags = tracked_tags(out)
    assert b"train/loss" in tags and b"train/accuracy" in tags and b"eval/accuracy" in tags
    ens = run_rm(pairs_file, tiny_model, tmp_path / "ens", "train.tracker=tensorboard", "ensemble.size=2")
    for k in (0, 1):  # each member logs to its own tracker
        assert b"train/loss" in tracked_tags(ens / "members" / f"member-{k}")
