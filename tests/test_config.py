"""Job configs: dataclass defaults ← YAML file ← `a.b=value` overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from alignkit import cli
from alignkit.config import ConfigError, describe, inline, load, save, to_dict
from alignkit.train.rm import RMConfig
from alignkit.train.sft import SFTConfig

ROOT = Path(__file__).resolve().parents[1]


def sft(*overrides: str, config_file=None) -> SFTConfig:
    return load(SFTConfig, config_file, ["data=train.jsonl", *overrides])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_then_overrides(tmp_path):
    f = write(tmp_path, "max_length: 64\nmodel: some/model\ntrain:\n  batch_size: 4\n  lr: 1.0e-5\n")
    cfg = sft("max_length=32", "train.grad_accum=2", config_file=f)
    assert cfg.max_length == 32  # the override wins over the file
    assert cfg.model == "some/model"  # the file wins over the default
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.lr) == (4, 2, 1.0e-5)
    assert cfg.lora.r == 16 and cfg.output_dir == "runs/sft"  # untouched defaults


def test_nested_overrides_and_value_types():
    cfg = sft("lora.r=4", "lora.enabled=false", "lora.target_modules=q_proj,v_proj", "eval_data=null")
    assert cfg.lora.r == 4 and cfg.lora.enabled is False
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.eval_data is None
    assert sft("train.precision=bf16").train.run.precision == "bf16"


def test_partly_given_section_keeps_the_jobs_own_defaults(tmp_path):
    # SFT's train section defaults to lr 2e-4 (TrainSettings' own default is 1e-4); setting another train key,
    # by override or in a file, must not reset it
    assert sft().train.lr == 2.0e-4
    assert sft("train.max_steps=3").train.lr == 2.0e-4
    assert sft(config_file=write(tmp_path, "train:\n  batch_size: 4\n")).train.lr == 2.0e-4


@pytest.mark.parametrize(
    ("yaml_text", "override", "expected"),
    [
        ("train:\n  lr: 1.0e-5\n", None, 1.0e-5),  # YAML 1.1 float
        ("train:\n  lr: 1e-5\n", None, 1.0e-5),  # PyYAML reads this as the string '1e-5'
        (None, "train.lr=1e-5", 1.0e-5),
        (None, "train.lr=3", 3.0),  # an int is a fine float
    ],
)
def test_float_parsing(tmp_path, yaml_text, override, expected):
    f = write(tmp_path, yaml_text) if yaml_text else None
    lr = sft(*([override] if override else []), config_file=f).train.lr
    assert isinstance(lr, float) and lr == expected


@pytest.mark.parametrize("key", ["bogus", "train.bogus", "lora.bogus"])
def test_unknown_key_is_named(key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        sft(f"{key}=1")


def test_unknown_key_in_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("'train.learning_rate'")):
        sft(config_file=write(tmp_path, "train:\n  learning_rate: 0.1\n"))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("max_length=long", "max_length"),
        ("max_length=1.5", "max_length"),
        ("train.lr=fast", "train.lr"),
        ("lora.enabled=maybe", "lora.enabled"),
        ("train.max_steps=true", "train.max_steps"),
        ("train=5", "train"),
    ],
)
def test_wrong_type_is_named(override, key):
    with pytest.raises(ConfigError) as e:
        sft(override)
    assert str(e.value).startswith(f"{key}:")


def test_literal_choices():
    with pytest.raises(ConfigError) as e:
        sft("train.precision=fp16")
    assert str(e.value).startswith("train.precision:") and all(
        c in str(e.value) for c in ("auto", "bf16", "fp32")
    )
    with pytest.raises(ConfigError, match="loss"):
        load(RMConfig, None, ["data=p.jsonl", "loss=hinge"])
    assert load(RMConfig, None, ["data=p.jsonl", "loss=soft"]).loss == "soft"


def test_invalid_values_become_config_errors():
    with pytest.raises(ConfigError, match="data is required"):
        load(SFTConfig, None, [])
    with pytest.raises(ConfigError, match="not divisible"):
        sft("train.batch_size=6", "train.grad_accum=4")
    with pytest.raises(ConfigError, match="key=value"):
        sft("max_length")


def test_bad_config_files_are_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        sft(config_file=missing)
    bad = write(tmp_path, "train: [unclosed\n")
    with pytest.raises(ConfigError, match=re.escape(str(bad))):
        sft(config_file=bad)
    with pytest.raises(ConfigError, match="mapping"):
        sft(config_file=write(tmp_path, "- a\n- b\n"))


def test_saved_config_loads_back_equal(tmp_path):
    cfg = sft("train.lr=3.0e-5", "lora.target_modules=q_proj", "max_length=77", "eval_data=dev.jsonl")
    save(cfg, tmp_path / "job_config.yaml")
    assert load(SFTConfig, tmp_path / "job_config.yaml") == cfg


# ---------------------------------------------------------------- composition and required keys
@dataclasses.dataclass
class Inner:
    seed: int = 0
    """A seed."""
    tracker: str = "none"
    """A tracker."""


@dataclasses.dataclass
class Outer:
    name: str
    """Required: no default."""
    steps: int = 3
    """Steps."""
    run: Inner = inline(Inner)
    """Inline: its keys sit at this level."""


def test_an_inline_section_keeps_its_keys_at_the_parents_level(tmp_path):
    cfg = load(Outer, write(tmp_path, "name: a\nseed: 4\n"), ["tracker=tensorboard"])
    assert (cfg.run.seed, cfg.run.tracker, cfg.steps) == (4, "tensorboard", 3)
    assert to_dict(cfg) == {"name": "a", "steps": 3, "seed": 4, "tracker": "tensorboard"}  # flat, as spelled
    save(cfg, tmp_path / "job_config.yaml")
    assert load(Outer, tmp_path / "job_config.yaml") == cfg
    with pytest.raises(ConfigError, match=r"unknown key 'colour' \(known: name, seed, steps, tracker\)"):
        load(Outer, None, ["name=a", "colour=red"])
    with pytest.raises(ConfigError, match="seed: expected an integer"):
        load(Outer, None, ["name=a", "seed=x"])
    assert [row[0] for row in describe(Outer)] == ["name", "steps", "seed", "tracker"]
    # the same inside a section: the training jobs' train.seed is TrainSettings' inline run section
    assert sft("train.seed=9", "train.save_every=5").train.run.seed == 9


def test_a_field_with_no_default_is_required_when_the_config_is_built():
    with pytest.raises(ConfigError, match=r"name is required \(Required: no default.\)"):
        load(Outer, None, [])
    with pytest.raises(ConfigError, match="name is required"):
        load(Outer, None, ["name="])  # empty is as good as missing
    assert describe(Outer)[0][2] == "(required)"


# ---------------------------------------------------------------- shipped configs

ACCELERATE = ROOT / "configs" / "accelerate"
JOB_FILES = sorted(p for p in (ROOT / "configs").glob("**/*.yaml") if ACCELERATE not in p.parents)


def _loads_as(path: Path, job: str) -> bool:
    """Whether `path` loads as `job`'s config; required keys (fields with no default) the file leaves out
    are given placeholders, as a user gives them on the command line."""
    cls = cli.JOBS[job].config_class()
    given = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in given
    ]
    try:
        load(cls, path, [f"{k}=placeholder" for k in required])
    except ConfigError:
        return False
    return True


def test_configs_are_shipped():
    assert JOB_FILES, "no job configs under configs/"
    names = {p.name for p in JOB_FILES}
    assert {"sft.yaml", "rm.yaml"} <= names


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_job_config_loads(path):
    # a header such as `# alignkit rm train --config configs/rm.yaml ...` declares the job
    declared = re.search(r"^#\s*alignkit ([a-z ]+?) --config", path.read_text(encoding="utf-8"), re.M)
    if declared:
        assert declared.group(1) in cli.JOBS, f"{path.name} declares unknown job {declared.group(1)!r}"
        assert _loads_as(path, declared.group(1))
    if path.name.startswith("guard"):  # a guard pipeline (--guard / guard=), not a job
        from alignkit.guard.config import GuardConfig

        assert isinstance(load(GuardConfig, path), GuardConfig)
        return
    assert any(_loads_as(path, job) for job in cli.JOBS), f"{path.name} loads as no job's config"


def test_shipped_accelerate_configs_parse():
    for path in sorted(ACCELERATE.glob("*.yaml")):
        assert isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), dict), path.name


def test_override_with_a_colon_stays_a_string():
    from alignkit.measure.report import ReportConfig

    cfg = load(ReportConfig, None, ["runs=[a]", "title=baseline: SmolLM2"])
    assert cfg.title == "baseline: SmolLM2"
