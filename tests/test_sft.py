"""`alignkit sft` end to end on a tiny Llama: artefacts, LoRA and full fine-tuning, exact accumulation and
exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import WORDS, write_jsonl
from safetensors.torch import load_file

from alignkit import cli
from alignkit.config import load
from alignkit.train import loop
from alignkit.train.sft import SFTConfig

FAST = ["train.precision=fp32", "lora.r=4", "train.batch_size=4", "train.max_steps=3"]


def sft_data(root: Path) -> Path:
    """25 examples whose completions differ in length (1–6 words), so token counts differ per example."""
    recs = [
        {"prompt": f"tell me about {w}", "completion": " ".join(WORDS[i : i + 1 + i % 6])}
        for i, w in enumerate(WORDS[:24])
    ]
    recs.append(
        {"messages": [{"role": "user", "content": "what is water"}, {"role": "assistant", "content": "good"}]}
    )
    return write_jsonl(root / "sft.jsonl", recs)


def run_sft(root: Path, model: str, name: str, *overrides: str) -> Path:
    out = root / name
    data = root / "sft.jsonl" if (root / "sft.jsonl").exists() else sft_data(root)
    assert cli.main(["sft", f"data={data}", f"model={model}", f"output_dir={out}", *FAST, *overrides]) == 0
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def train_metrics(folder: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "train/loss" in r}


def spy_on_train(monkeypatch, module) -> list[dict]:
    """Wrap `module.train` to record the model's parameters before and after training."""
    seen, real = [], module.train

    def wrapper(model, *args, **kw):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        result = real(model, *args, **kw)
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen.append({"before": before, "after": after, "trainable": trainable})
        return result

    monkeypatch.setattr(module, "train", wrapper)
    return seen


# ---------------------------------------------------------------- a run and what it writes


def test_sft_writes_a_plain_hf_model_and_its_records(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    out = run_sft(tmp_path, tiny_model, "run")
    # the resolved config, reloadable as is
    cfg = load(SFTConfig, out / "job_config.yaml")
    assert (cfg.model, cfg.train.max_steps, cfg.lora.r) == (tiny_model, 3, 4)
    # metrics: one object per line, `step` plus group/name keys, finite training losses for every step
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(set(r) - {"step"} and all(k.count("/") >= 1 for k in r if k != "step") for r in rows)
    losses = {s: r["train/loss"] for s, r in train_metrics(out).items()}
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) and v > 0 for v in losses.values())
    assert any("eval/loss" in r for r in rows)
    # merged weights by default: a plain folder that transformers loads without peft or alignkit
    assert not (out / "adapter_config.json").exists()
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert any("q_proj" in n for n in changed) and any("down_proj" in n for n in changed)
    assert not any("norm" in n or "embed" in n for n in changed)  # LoRA touches linear layers only


def test_sft_adapter_only_on_request_equals_merged(tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = run_sft(tmp_path, tiny_model, "merged")
    adapter = run_sft(tmp_path, tiny_model, "adapter", "lora.save_adapter_only=true")
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert not (adapter / "model.safetensors").exists()
    ids = torch.tensor([[1, 20, 30, 40, 50, 2]])
    with torch.no_grad():
        a = (
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)
            .eval()(ids)
            .logits
        )
        m = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(ids).logits
    torch.testing.assert_close(a, m, atol=1e-5, rtol=0)
    assert not torch.allclose(a, b, atol=1e-5)  # and the adapter did learn something


# ---------------------------------------------------------------- what training changes


def test_lora_trains_the_adapters_only_and_all_of_them(tmp_path, tiny_model, monkeypatch):
    seen = spy_on_train(monkeypatch, loop)
    run_sft(tmp_path, tiny_model, "lora")
    (r,) = seen
    assert r["trainable"] and all("lora_" in n for n in r["trainable"])
    for name, before in r["before"].items():
        if name in r["trainable"]:
            assert not torch.equal(before, r["after"][name]), f"{name} did not change"
        else:
            assert torch.equal(before, r["after"][name]), f"frozen {name} changed"


def test_full_finetune_changes_every_parameter(tmp_path, tiny_model, monkeypatch):
    seen = spy_on_train(monkeypatch, loop)
    out = run_sft(tmp_path, tiny_model, "full", "lora.enabled=false")
    (r,) = seen
    assert r["trainable"] == set(r["before"])
    unchanged = [n for n, p in r["before"].items() if torch.equal(p, r["after"][n])]
    assert unchanged == []
    assert not (out / "adapter_config.json").exists()


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("split", ["train.grad_accum=4", "train.micro_tokens=1"])  # 1: a row per pass
@pytest.mark.parametrize("lora", ["true", "false"])
def test_grad_accum_equals_one_big_batch(tmp_path, tiny_model, lora, split):
    one = run_sft(tmp_path, tiny_model, "accum1", f"lora.enabled={lora}", "train.micro_tokens=0")
    four = run_sft(tmp_path, tiny_model, "accum4", f"lora.enabled={lora}", split)
    # Adam's first steps move each weight by about lr·sign(g) ≈ 1e-4 whatever |g|: a wrong accumulation shows at
    # that size, while summation order alone can nudge updates of near-zero gradient entries by a few 1e-6
    assert_same_weights(one, four, atol=1e-5)
    # the per-token loss and the gradient norm (before clipping) match too: same scale, not only same direction
    m1, m4 = train_metrics(one), train_metrics(four)
    for step in (1, 2, 3):
        for key in ("train/loss", "train/grad_norm"):
            assert m1[step][key] == pytest.approx(m4[step][key], rel=1e-5), (step, key)
        # the cap split every step into one-row passes: the largest pass is one row, not the batch
        assert m4[step]["perf/micro_tokens"] < m1[step]["perf/micro_tokens"]


class Interrupted(Exception):
    pass


def interrupt_after_checkpoint(monkeypatch, at_step: int) -> None:
    real = loop.save_checkpoint

    def save_then_stop(acc, output_dir, step, keep):
        real(acc, output_dir, step, keep)
        if step == at_step:
            raise Interrupted(step)

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)


def test_resume_equals_an_uninterrupted_run(tmp_path, tiny_model, monkeypatch):
    # 24 training examples / batch 6 = 4 steps an epoch: the resumed half crosses an epoch boundary;
    # adapter dropout makes the result depend on the restored RNG state
    args = [
        "train.max_steps=6",
        "train.save_every=3",
        "train.batch_size=6",
        "train.grad_accum=2",
        "lora.dropout=0.1",
    ]
    a = run_sft(tmp_path, tiny_model, "a", *args)
    with monkeypatch.context() as m:
        interrupt_after_checkpoint(m, at_step=3)
        with pytest.raises(Interrupted):
            run_sft(tmp_path, tiny_model, "b", *args)
    b = tmp_path / "b"
    assert (b / "checkpoints" / "step-3").is_dir() and not (b / "model.safetensors").exists()
    run_sft(tmp_path, tiny_model, "b", *args, "train.resume=true")
    assert_same_weights(a, b, atol=1e-6)
    ma, mb = train_metrics(a), train_metrics(b)
    assert sorted(mb) == [1, 2, 3, 4, 5, 6]  # metrics.jsonl continues without repeats
    assert [ma[s]["train/loss"] for s in ma] == pytest.approx([mb[s]["train/loss"] for s in mb], rel=1e-6)


def test_loss_on_target_positions_only_equals_the_full_logits_loss(tiny_model):
    # the LM head runs only where a completion token is predicted; the summed loss must not change
    import torch
    from transformers import AutoModelForCausalLM

    from alignkit.train.losses import IGNORE, selected_sft_loss_sum, sft_loss_sum, target_positions

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = IGNORE  # prompt
    labels[1, :2] = IGNORE
    labels[2, 6:] = IGNORE  # padding
    keep = target_positions(labels)
    selected = model(input_ids=ids, logits_to_keep=keep).logits
    # targets at 4..8, 2..8 and 1..5 (position 0 is never predicted) → 5 + 7 + 5 = 17 rows of (N, V)
    assert int(keep.sum()) == 17
    assert selected.shape == (17, model.config.vocab_size)
    full, n_full = sft_loss_sum(model(input_ids=ids).logits, labels)
    part, n_part = selected_sft_loss_sum(selected, labels)
    assert int(n_full) == int(n_part) == 17
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)


def test_tensorboard_tracker_logs_sft(tmp_path, tiny_model, sft_file):
    from test_rm import tracked_tags

    out = tmp_path / "run"
    args = [
        f"data={sft_file}",
        f"model={tiny_model}",
        f"output_dir={out}",
        "train.max_steps=2",
        "train.tracker=tensorboard",
    ]
    assert cli.main(["sft", *args]) == 0
    assert b"train/loss" in tracked_tags(out) and b"perf/tokens_per_s" in tracked_tags(out)


def test_jobs_of_different_precisions_run_one_after_another_in_one_process(tmp_path, tiny_model, sft_file):
    # accelerate keeps one state per process and refuses to change its mixed precision; a pipeline (or
    # `alignkit run`) runs several jobs in one process
    for precision in ("fp32", "bf16", "fp32"):
        out = tmp_path / precision
        args = [f"data={sft_file}", f"model={tiny_model}", f"output_dir={out}", "train.max_steps=1"]
        assert cli.main(["sft", *args, f"train.precision={precision}"]) == 0
