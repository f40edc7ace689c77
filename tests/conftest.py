"""Shared fixtures: a tiny Llama with a tiny BPE tokenizer and a ChatML template, built offline."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

# the build-time modules the tests cover (scripts/guard_data.py) are not in the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run fastest on one thread, and two threads thrash when anything else shares the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# What precision=auto means here: fp32 on every CPU kind, so that no trajectory depends on whether this
# machine has native bf16. ALIGNKIT_PRECISION=bf16 runs the whole suite in bf16 instead.
os.environ.setdefault("ALIGNKIT_PRECISION", "fp32")


def pytest_configure(config):
    import torch

    torch.use_deterministic_algorithms(True)


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = (
    "the a is of and to in what how why can you please tell me about water fire safety chemistry history "
    "help answer question explain sure here no sorry cannot assist with that request good bad helpful "
    "harmful kind rude polite yes one two three four five six seven eight nine ten cat dog sun moon"
).split()


def make_tiny_model(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    from tokenizers import decoders

    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tok.chat_template = CHATML
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def sft_file(tmp_path) -> Path:
    recs = []
    for i in range(24):
        w = WORDS[i % len(WORDS)]
        recs.append({"prompt": f"tell me about {w}", "completion": f"sure here is {w} and {w} is good"})
    recs.append(
        {
            "messages": [
                {"role": "user", "content": "what is water"},
                {"role": "assistant", "content": "water is good"},
            ]
        }
    )
    return write_jsonl(tmp_path / "sft.jsonl", recs)


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    recs = []
    for i in range(24):
        w = WORDS[i % len(WORDS)]
        recs.append(
            {
                "prompt": f"tell me about {w}",
                "chosen": f"sure here is {w}, helpful and polite",
                "rejected": "no sorry cannot assist",
            }
        )
    return write_jsonl(tmp_path / "pairs.jsonl", recs)
