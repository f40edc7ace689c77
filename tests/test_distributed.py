"""Scale-out: every training job under `accelerate launch` with 2 CPU processes (gloo) gives the same
weights and logged metrics as 1 process at the same global batch, checkpoints and resumes under 2
processes, and the shipped accelerate configs (configs/accelerate/) are valid for accelerate.

The jobs run as subprocesses exactly as a user starts them:
    python -m alignkit.cli <job> ...                                                   (1 process)
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m alignkit.cli <job> ...  (2)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import WORDS, make_tiny_model, write_jsonl
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "configs" / "accelerate"
CPU_2PROC = ACCELERATE / "cpu_2proc.yaml"
ATOL = 1e-5  # weights after a few fp32 steps: observed differences are ~1e-6 (reduction order)
COMMON = ["train.precision=fp32", "train.seed=3", "train.lr=1e-3", "train.batch_size=8", "train.max_steps=4"]


# ---------------------------------------------------------------- running jobs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(procs: int, *args: str, ok: bool = True) -> tuple[str, str]:
    """Run `alignkit <args>` on `procs` CPU processes; return its stdout and stderr."""
    if procs == 1:
        cmd = [sys.executable, "-m", "alignkit.cli", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC)]
        cmd += ["--num_processes", str(procs), "--main_process_port", str(_free_port())]
        cmd += ["-m", "alignkit.cli", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    # CPU only, one thread per process: the same arithmetic for 1 and 2 processes, on any machine
    env.update(
        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""
    )
    p = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # a collective mismatch hangs: stop the launcher and its workers
        os.killpg(p.pid, signal.SIGTERM)  # torchrun passes SIGTERM on to the workers it started
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
        pytest.fail(f"{' '.join(args[:2])} on {procs} processes hung (300 s)\n{err[-3000:]}")
    assert (p.returncode == 0) == ok, f"exit {p.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    return out, err


def result(stdout: str) -> dict:
    """The job's JSON result, which must be printed once, not once per process."""
    assert stdout.count("\n{\n") + stdout.startswith("{\n") == 1, stdout
    return json.loads(stdout[stdout.index("{\n") :])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A tiny Llama, 25 SFT examples and 24 preference pairs whose lengths differ (so padding and
    per-example token counts differ between the two processes' shares of a batch)."""
    root = tmp_path_factory.mktemp("dist")
    make_tiny_model(root / "model")
    sft = [
        {"prompt": f"tell me about {w}", "completion": " ".join(WORDS[i : i + 1 + i % 6])}
        for i, w in enumerate(WORDS[:24])
    ]
    sft.append(
        {"messages": [{"role": "user", "content": "what is water"}, {"role": "assistant", "content": "good"}]}
    )
    write_jsonl(root / "sft.jsonl", sft)
    pairs = [
        {
            "prompt": f"tell me about {w}",
            "chosen": f"sure here is {w}, helpful and polite" + " yes" * (i % 3),
            "rejected": "no sorry cannot assist" + " no" * (i % 4),
        }
        for i, w in enumerate(WORDS[:24])
    ]
    write_jsonl(root / "pairs.jsonl", pairs)
    return root


def job_args(root: Path, job: str, out: Path, *overrides: str) -> list[str]:
    data = root / ("sft.jsonl" if job == "sft" else "pairs.jsonl")
    return [*job.split(), f"data={data}", f"model={root / 'model'}", f"output_dir={out}", *COMMON, *overrides]


# ---------------------------------------------------------------- comparing runs


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=ATOL, rtol=0, msg=lambda m, k=k: f"{a.name}: {k}: {m}")


def logged(folder: Path) -> list[dict]:
    """metrics.jsonl without the throughput figures, which depend on the process count."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def assert_same_metrics(a: Path, b: Path) -> None:
    ra, rb = logged(a), logged(b)
    assert [sorted(r) for r in ra] == [sorted(r) for r in rb]  # the same lines, written once each
    for x, y in zip(ra, rb, strict=True):
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (x["step"], k)
    assert any("train/loss" in r for r in ra) and any("eval/loss" in r for r in ra)


def model_dirs(out: Path) -> list[Path]:
    """The saved model folders of a job: the output folder, or each ensemble member."""
    members = sorted((out / "members").glob("member-*"))
    return members or [out]


# ---------------------------------------------------------------- 2 processes = 1 process

CASES = {
    # job, overrides; eval_fraction 0.05 leaves 1 held-out example, so one process evaluates none
    "sft-lora": ("sft", ["lora.r=4"]),
    "rm-lora-accum": ("rm train", ["lora.r=4", "train.grad_accum=2", "train.eval_fraction=0.15"]),
    "rm-ensemble-full": (
        "rm train",
        ["lora.enabled=false", "ensemble.size=2", "ensemble.bootstrap=true", "train.max_steps=3"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one(inputs, tmp_path, case):
    job, overrides = CASES[case]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = result(launch(1, *job_args(inputs, job, one, *overrides))[0])
    r2 = result(launch(2, *job_args(inputs, job, two, *overrides))[0])
    for a, b in zip(model_dirs(one), model_dirs(two), strict=True):
        assert_same_weights(a, b)
        assert_same_metrics(a, b)
    loss = "eval/loss" if "eval/loss" in r1 else "eval/loss_mean"
    assert r2[loss] == pytest.approx(r1[loss], rel=1e-5)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


@pytest.mark.slow
def test_two_processes_checkpoint_and_resume(inputs, tmp_path):
    """Full fine-tune with accumulation: 2 processes equal 1, write resumable checkpoints (with each
    process's RNG state), and a run resumed from a checkpoint on 2 processes equals the uninterrupted one."""
    overrides = ["lora.enabled=false", "train.grad_accum=2", "train.max_steps=6", "train.save_every=2"]
    overrides += ["train.eval_fraction=0.2", "train.eval_every=3"]
    one, two = tmp_path / "one", tmp_path / "two"
    launch(1, *job_args(inputs, "sft", one, *overrides))
    launch(2, *job_args(inputs, "sft", two, *overrides))
    assert_same_weights(one, two)
    assert_same_metrics(one, two)
    ckpts = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert ckpts == ["step-2", "step-4"]  # keep_checkpoints=2, no temp folders left
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {
        p.name for p in (two / "checkpoints/step-4").iterdir()
    }

    # interrupted after step 4: the final model and the later metrics never got written
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    (resumed / "model.safetensors").unlink()
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= 5))
    launch(2, *job_args(inputs, "sft", resumed, *overrides, "train.resume=true"))
    assert_same_weights(two, resumed)
    assert_same_metrics(two, resumed)


@pytest.mark.slow
def test_ppo_under_two_processes_logs_once_and_resumes_exactly(inputs, tmp_path):
    """PPO under DDP: each process rolls out its share of the prompts, gradients and the KL controller are
    shared, metrics are written once, and a run resumed from a checkpoint on 2 processes (each with its own
    sampling RNG state) equals the uninterrupted one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = tmp_path / "rm"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(inputs / "model", num_labels=1)
    model.config.pad_token_id = model.config.eos_token_id
    model.save_pretrained(rm)
    AutoTokenizer.from_pretrained(inputs / "model").save_pretrained(rm)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"tell me about {w}"} for w in WORDS[:10]])
    args = [f"prompts={prompts}", f"reward={rm}", f"model={inputs / 'model'}", "steps=4", "batch_size=4"]
    args += ["precision=fp32", "ppo.max_new_tokens=5", "ppo.minibatch=1", "save_every=2", "lr=1e-2"]
    two = tmp_path / "two"
    r = result(launch(2, "ppo", *args, f"output_dir={two}")[0])
    assert "kl/ref" in r and (two / "model.safetensors").exists()
    steps = [json.loads(ln)["step"] for ln in (two / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    (resumed / "model.safetensors").unlink()
    launch(2, "ppo", *args, f"output_dir={resumed}", "resume=true")
    assert_same_weights(two, resumed)
    for x, y in zip(logged(two), logged(resumed), strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (x["step"], k)


@pytest.mark.slow
def test_global_batch_must_split_evenly_over_processes(inputs, tmp_path):
    # 6 examples a step do not split into 2 processes × 2 equal micro-batches: a config error in every process
    out = tmp_path / "bad"
    _, err = launch(2, *job_args(inputs, "sft", out, "train.batch_size=6", "train.grad_accum=2"), ok=False)
    assert "alignkit sft: error: train.batch_size 6 is the global batch" in err
    assert not out.exists()


# ---------------------------------------------------------------- the shipped accelerate configs


def _launch_env(path: Path) -> tuple[object, dict[str, str]]:
    """What `accelerate launch --config_file path` would run with: its parsed args and the environment
    the processes get (accelerate's own parsing and validation; nothing is started)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    config = load_config_from_file(str(path))  # unknown top-level keys raise
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "alignkit.cli", "sft"])
    dests = set(vars(args))
    for key in config.fsdp_config:  # nested keys are copied onto launch arguments: they must exist
        assert (key if key.startswith("fsdp_") else f"fsdp_{key}") in dests, f"{path.name}: {key}"
    for key in config.deepspeed_config:
        assert key in dests, f"{path.name}: {key}"
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, env


def _set_env(monkeypatch, env: dict[str, str]) -> None:
    for k, v in env.items():
        if k.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(k, v)


def test_accelerate_configs_are_shipped():
    assert {p.name for p in ACCELERATE.glob("*.yaml")} >= {
        "deepspeed_zero3.yaml",
        "fsdp.yaml",
        "cpu_2proc.yaml",
    }


def test_cpu_2proc_config_starts_two_local_processes():
    args, env = _launch_env(CPU_2PROC)
    assert args.multi_gpu and not args.use_deepspeed and not args.use_fsdp  # the torchrun launcher
    assert args.num_processes == 2 and args.num_machines == 1
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"


def test_fsdp_config_is_fsdp2_full_shard_wrapping_llama_layers(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    args, env = _launch_env(ACCELERATE / "fsdp.yaml")
    assert args.use_fsdp and args.num_processes == 8 and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    _set_env(monkeypatch, env)
    plugin = FullyShardedDataParallelPlugin()  # what Accelerator builds from that environment
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert "LlamaDecoderLayer" in LlamaForCausalLM._no_split_modules


def test_deepspeed_config_is_zero3_saving_full_weights(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    args, env = _launch_env(ACCELERATE / "deepspeed_zero3.yaml")
    assert args.use_deepspeed and args.num_processes == 8 and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    _set_env(monkeypatch, env)
    ds = DeepSpeedPlugin().deepspeed_config  # what Accelerator builds from that environment
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["gradient_accumulation_steps"] == 1


# ---------------------------------------------------------------- saving gathered (ZeRO-3/FSDP) weights


def test_gathered_state_dict_loads_into_a_fresh_model(inputs):
    """The final save under ZeRO-3/FSDP loads the gathered state dict into a fresh unsharded copy; a tied
    weight may arrive under one name only, a really missing weight is an error."""
    from alignkit.models import LoraSettings, apply_lora, load_causal_lm
    from alignkit.train.loop import load_full_state

    def build():
        return apply_lora(load_causal_lm(str(inputs / "model")), LoraSettings(r=4), "CAUSAL_LM")

    trained = build()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    state = {k: v for k, v in trained.state_dict().items() if "lm_head" not in k}  # tied to embed_tokens
    fresh = load_full_state(build(), state)
    for (k, a), b in zip(trained.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    del state[next(k for k in state if "q_proj.lora_A" in k)]
    with pytest.raises(RuntimeError, match="missing"):
        load_full_state(build(), state)
