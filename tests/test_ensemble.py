"""Reward aggregation (golden numbers and properties) and trained ensembles scored through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import WORDS, write_jsonl

from alignkit import cli
from alignkit.train.reward import aggregate, load_reward, priority_combine


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual).float(), torch.tensor(expected).float(), atol=atol, rtol=0
    )


# ---------------------------------------------------------------- aggregation

# K = 3 members (rows) × B = 2 responses (columns)
SCORES = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 6.0]])


def test_aggregate_mean_and_min_golden():
    close(aggregate(SCORES, "mean"), [2.0, 2.0])  # (1+2+3)/3 = 2; (0+0+6)/3 = 2
    close(aggregate(SCORES, "min"), [1.0, 0.0])


def test_aggregate_uwo_golden_uses_population_variance():
    # population variance: column 0 ((1−2)² + 0² + (3−2)²)/3 = 2/3; column 1 ((0−2)² + (0−2)² + (6−2)²)/3 = 24/3 = 8
    # λ = 0.5: [2 − 0.5·2/3, 2 − 0.5·8] = [1.666667, −2]
    close(aggregate(SCORES, "uwo", uwo_lambda=0.5), [1.666667, -2.0])
    # λ = 1 (the default): [2 − 2/3, 2 − 8] = [1.333333, −6]
    close(aggregate(SCORES, "uwo"), [1.333333, -6.0])


def test_aggregate_of_one_member_is_that_member():
    one = torch.tensor([[0.5, -1.5]])
    for method in ("mean", "min", "uwo"):
        close(aggregate(one, method), [0.5, -1.5])  # variance of a single score is 0


def test_aggregate_rejects_unknown_method():
    with pytest.raises(ValueError, match="median"):
        aggregate(SCORES, "median")


# ---------------------------------------------------------------- priority (harmlessness gates helpfulness)


def test_priority_combine_golden():
    # Rule, with g = harmless − τ:  R = g if g < 0 (harmful),  else R = softplus(helpful) = log(1 + e^helpful).
    helpful = torch.tensor([1.0, 5.0, 0.0, 3.0, -1.0])
    harmless = torch.tensor([-0.5, -2.0, 1.0, 0.2, 0.5])
    # τ = 0: g = [−0.5, −2, 1, 0.2, 0.5] → [−0.5, −2, log 2, log(1 + e³), log(1 + e^−1)]
    #        log 2 = 0.693147; log(1 + 20.085537) = 3.048587; log(1 + 0.367879) = 0.313262
    close(priority_combine(helpful, harmless), [-0.5, -2.0, 0.693147, 3.048587, 0.313262])
    # τ = 0.5: g = [−1, −2.5, 0.5, −0.3, 0]; g = 0 exactly counts as harmless
    close(priority_combine(helpful, harmless, 0.5), [-1.0, -2.5, 0.693147, -0.3, 0.313262])


def _random_rewards(seed: int, n: int = 512):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 3, torch.randn(n, generator=g) * 3


@pytest.mark.parametrize("tau", [-1.0, 0.0, 0.7])
def test_priority_harmful_response_cannot_buy_reward_with_helpfulness(tau):
    helpful, harmless = _random_rewards(1)
    harmful = harmless < tau
    assert 0 < harmful.sum() < len(harmful)
    base = priority_combine(helpful, harmless, tau)
    for delta in (0.1, 1.0, 100.0):
        more = priority_combine(helpful + delta, harmless, tau)
        assert torch.equal(more[harmful], base[harmful])  # no gain at all for harmful ones
        assert (more[~harmful] > base[~harmful]).all()  # harmless ones gain (softplus is increasing)


@pytest.mark.parametrize("tau", [-1.0, 0.0, 0.7])
def test_priority_every_harmless_outranks_every_harmful(tau):
    helpful, harmless = _random_rewards(2)
    r = priority_combine(helpful, harmless, tau)
    harmful = harmless < tau
    assert r[~harmful].min() > 0 > r[harmful].max()
    # the less harmful of two harmful responses wins, whatever their helpfulness
    order = harmless[harmful].argsort()
    assert (r[harmful][order].diff() >= 0).all()
    # among harmless responses the more helpful wins
    order = helpful[~harmful].argsort()
    assert (r[~harmful][order].diff() >= 0).all()


# ---------------------------------------------------------------- trained ensembles, scored by `alignkit rm score`

CONV = [{"role": "user", "content": "tell me about water"}]
REPLY = "sure here is water, helpful and polite"
RECORDS = [
    {"id": "plain", "prompt": "tell me about water", "response": REPLY},
    {"id": "other", "prompt": "tell me about fire", "response": "no sorry cannot assist"},
    # the same conversation as "plain", in the conversational forms
    {"id": "messages", "prompt": CONV, "response": [{"role": "assistant", "content": REPLY}]},
    {"id": "implicit", "response": CONV + [{"role": "assistant", "content": REPLY}]},
]


def _train(root: Path, model: str, name: str, *overrides: str) -> Path:
    pairs = [
        {
            "prompt": f"tell me about {w}",
            "chosen": f"sure here is {w}, helpful and polite",
            "rejected": "no sorry",
        }
        for w in WORDS[:16]
    ]
    data = write_jsonl(root / "pairs.jsonl", pairs)
    out = root / name
    args = [f"data={data}", f"model={model}", f"output_dir={out}", "train.max_steps=2", "train.batch_size=4"]
    assert cli.main(["rm", "train", *args, "train.precision=fp32", "lora.r=4", *overrides]) == 0
    return out


def _score(model_dir: Path, tmp: Path, records=RECORDS) -> list[dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    src, dst = write_jsonl(tmp / "in.jsonl", records), tmp / "scored" / "out.jsonl"
    assert cli.main(["rm", "score", "--model", str(model_dir), "--in", str(src), "--out", str(dst)]) == 0
    assert (dst.parent / "out.job_config.yaml").is_file()  # the resolved config, next to the output
    return [json.loads(line) for line in dst.read_text().splitlines()]


@pytest.fixture(scope="module")
def lora_ensemble(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("ens_lora")
    return _train(
        root, tiny_model, "rm", "ensemble.size=2", "ensemble.aggregation=uwo", "ensemble.uwo_lambda=2.0"
    )


@pytest.fixture(scope="module")
def full_ensemble(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("ens_full")
    return _train(root, tiny_model, "rm", "ensemble.size=2", "ensemble.aggregation=min", "lora.enabled=false")


def _check_scored(rows: list[dict], method: str, lam: float) -> None:
    assert [r["id"] for r in rows] == [r["id"] for r in RECORDS]  # every record back, in order, fields kept
    for rec, row in zip(RECORDS, rows, strict=True):
        assert {k: row[k] for k in rec} == rec
        scores = torch.tensor(row["scores"])
        assert scores.shape == (2,) and torch.isfinite(scores).all()
        close(row["score"], aggregate(scores[:, None], method, lam)[0].item())
        close(row["std"], scores.std(unbiased=False).item())  # population std over members
    by_id = {r["id"]: r for r in rows}
    for form in ("messages", "implicit"):  # the conversational forms score like the plain strings
        close(by_id[form]["scores"], by_id["plain"]["scores"], atol=1e-5)
    assert by_id["plain"]["scores"] != by_id["other"]["scores"]
    assert any(r["scores"][0] != r["scores"][1] for r in rows)  # members differ (seed k)


def test_lora_ensemble_is_one_folder_and_scores_with_uwo(lora_ensemble, tmp_path):
    spec = json.loads((lora_ensemble / "ensemble.json").read_text())
    assert spec["kind"] == "lora" and len(spec["members"]) == 2
    for m in spec["members"]:
        assert (lora_ensemble / m / "adapter_model.safetensors").exists()
    assert load_reward(lora_ensemble, bf16=False).kind == "ensemble"
    _check_scored(_score(lora_ensemble, tmp_path), "uwo", 2.0)


def test_full_ensemble_is_one_folder_and_scores_with_min(full_ensemble, tmp_path):
    spec = json.loads((full_ensemble / "ensemble.json").read_text())
    assert spec["kind"] == "full" and spec["base"] is None and len(spec["members"]) == 2
    assert load_reward(full_ensemble, bf16=False).kind == "ensemble"
    _check_scored(_score(full_ensemble, tmp_path), "min", 1.0)


def _plain_score(model, tok, messages) -> float:
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**enc).logits[0, 0].item()


def test_ensemble_member_scores_match_each_member_loaded_alone(lora_ensemble, full_ensemble, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    messages = CONV + [{"role": "assistant", "content": REPLY}]
    for folder in (lora_ensemble, full_ensemble):
        parts = load_reward(folder, bf16=False).score(["tell me about water"], [REPLY]).parts
        got = [v[0] for v in parts.values()]
        spec = json.loads((folder / "ensemble.json").read_text())
        tok = AutoTokenizer.from_pretrained(folder)
        for k, member in enumerate(spec["members"]):
            if spec["kind"] == "full":
                model = AutoModelForSequenceClassification.from_pretrained(folder / member)
            else:
                base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
                model = PeftModel.from_pretrained(base, folder / member)
            close(got[k], _plain_score(model.eval(), tok, messages), atol=1e-5)


def test_priority_pair_scores_by_the_priority_rule(lora_ensemble, full_ensemble, tmp_path):
    out = tmp_path / "priority"
    args = [f"helpful={lora_ensemble}", f"harmless={full_ensemble}", f"output_dir={out}", "threshold=0.05"]
    assert cli.main(["rm", "combine", *args]) == 0
    assert yaml.safe_load((out / "job_config.yaml").read_text())["threshold"] == 0.05
    rows = _score(out, tmp_path)
    helpful = {r["id"]: r["score"] for r in _score(lora_ensemble, tmp_path / "h")}
    harmless = {r["id"]: r["score"] for r in _score(full_ensemble, tmp_path / "s")}
    for row in rows:
        h, s = helpful[row["id"]], harmless[row["id"]]
        close(row["scores"], [h, s], atol=1e-5)
        expected = s - 0.05 if s - 0.05 < 0 else math.log1p(math.exp(h))
        close(row["score"], expected, atol=1e-5)
