"""Guard classifiers: hashed n-grams (+ optional MiniLM embedding) → logistic regression, Platt-calibrated,
thresholded for a target FPR; saved as `classifier.json` and `weights.safetensors`, read back by `load`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import safetensors.numpy as st
from scipy.special import expit

from .. import config as cfglib
from ..data import DataError, read_records, write_atomic
from . import calibration
from .features import Features

VERSION = 1
SHIPPED_DIR = Path(__file__).parent / "weights"


@dataclass
class Classifier:
    """A trained guard classifier: p = σ(a·(w·x + c) + b), flagged when p ≥ threshold."""

    name: str
    features: Features
    coef: np.ndarray
    intercept: float
    platt: tuple[float, float] = (1.0, 0.0)
    threshold: float = 0.5
    info: dict = field(default_factory=dict)
    first: Classifier | None = None  # a cascade's n-gram first stage: decides the records outside `band`
    band: tuple[float, float] = (0.0, 1.0)
    counts: list[int] = field(default_factory=lambda: [0, 0])  # records scored, and those reaching stage 2

    def proba(self, x) -> np.ndarray:
        a, b = self.platt
        return expit(a * (np.asarray(x @ self.coef).ravel() + self.intercept) + b)

    def predict_proba(self, records: list[dict]) -> np.ndarray:
        """Calibrated P(flag); in a cascade only the first stage's uncertain band pays for the encoder."""
        if not records:
            return np.zeros(0)
        if self.first is None:
            return self.proba(self.features(records))
        x1 = self.features.sparse(records)
        p = self.first.proba(self.first.features(records, x1))
        todo = np.flatnonzero((p >= self.band[0]) & (p <= self.band[1]))
        self.counts[0] += len(records)
        self.counts[1] += len(todo)
        if len(todo):
            p[todo] = self.proba(self.features([records[i] for i in todo], x1[todo]))
        return p

    def p_unsafe(self, prompts: list[str], texts: list[str]) -> list[float]:
        """Calibrated P(flag) of each text: the responses at the output stage, the prompts at input."""
        if self.features.fields in (["text"], ["prompt"]):
            recs = [{"text": t, "prompt": t} for t in texts]
        else:
            recs = [{"prompt": p, "response": t} for p, t in zip(prompts, texts, strict=True)]
        return [float(p) for p in self.predict_proba(recs)]

    def save(self, out: Path) -> None:
        write_atomic(out / "weights.safetensors", st.save({"coef": self.coef.astype(np.float32)}))
        meta = {"version": VERSION, "name": self.name, "features": self.features.settings()}
        meta |= {"intercept": self.intercept, "platt": list(self.platt), "threshold": self.threshold}
        meta |= {"band": list(self.band), **self.info}
        if self.first is not None:
            self.first.save(out / "first")
        write_atomic(out / "classifier.json", json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Classifier:
        path = Path(path)
        try:
            meta = json.loads((path / "classifier.json").read_text(encoding="utf-8"))
            coef = st.load((path / "weights.safetensors").read_bytes())["coef"].astype(np.float64)
        except (OSError, ValueError, KeyError) as e:
            raise DataError(str(path), None, None, f"not a guard classifier folder ({e})") from None
        if meta.get("version") != VERSION:
            raise DataError(str(path / "classifier.json"), None, "version", f"expected {VERSION}")
        feats = Features.from_settings(meta.pop("features"))
        if coef.shape != (feats.dim,):
            raise DataError(str(path), None, "coef", f"shape {coef.shape}, features need ({feats.dim},)")
        keep = ("version", "name", "intercept", "platt", "threshold", "band")
        info = {k: v for k, v in meta.items() if k not in keep}
        first = cls.load(path / "first") if (path / "first").is_dir() else None
        clf = cls(meta["name"], feats, coef, meta["intercept"], tuple(meta["platt"]), meta["threshold"], info)
        clf.first, clf.band = first, tuple(meta.get("band", (0.0, 1.0)))
        return clf


def load(spec: str) -> Classifier:
    """A classifier folder, or `default:NAME` for one that ships with alignkit (detect/weights/NAME)."""
    path = SHIPPED_DIR / spec[8:] if spec.startswith("default:") else Path(spec)
    if spec.startswith("default:") and not path.is_dir():
        known = sorted(p.name for p in SHIPPED_DIR.glob("*") if p.is_dir())
        raise DataError(spec, None, None, f"no such default classifier (shipped: {', '.join(known)})")
    return Classifier.load(path)


@dataclass
class GuardTrainConfig:
    """Train a guard classifier on labelled JSONL records."""

    data: str
    """JSONL of {text, label} (or {prompt, response, label}); label 0/1 (1 = flag); optional split:
    train | validation | encoder (rows a tuned encoder learnt from: train, except for a head over it)."""
    output: str
    """Folder written: classifier.json + weights.safetensors (+ job_config.yaml)."""
    name: str = ""
    """Classifier name (verdict category); default: the output folder's name."""
    threshold_rule: Literal["fpr", "f1"] = "fpr"
    """fpr: the lowest threshold with validation FPR ≤ target_fpr; f1: the one with the best validation F1."""
    target_fpr: float = 0.01
    """The false-positive rate allowed on the validation split (threshold_rule=fpr)."""
    fpr_by: str | None = None
    """A record field (e.g. source): the FPR must stay within target_fpr for each of its values too."""
    validation_fraction: float = 0.25
    """Share of records held out for calibration and the threshold when records carry no split."""
    c_grid: list[float] = field(default_factory=lambda: [1.0, 4.0, 16.0, 64.0, 256.0])
    """Inverse L2 strengths tried; the one with the best validation AUC (then log-loss) wins."""
    seed: int = 0
    """Seed of the train/validation split."""
    cascade_miss: float = 0.0
    """With MiniLM features: also fit an n-gram-only first stage that decides records outside a band (below:
    at most this share of validation positives; above: no validation negative). 0: no cascade."""
    features: Features = cfglib.inline(Features)
    """The features read off each record (their keys sit at the top level: inputs=, minilm_tokens=, ...)."""

    def __post_init__(self) -> None:
        if not 0 <= self.target_fpr < 1:
            raise ValueError("target_fpr must be in [0, 1)")


def read_labelled(path: str, inputs: str) -> list[dict]:
    """Records with the fields `inputs` needs and a 0/1 label; errors name the file, line and field."""
    need = ["prompt", "response"] if inputs == "prompt+response" else [inputs]
    out = []
    for line, rec in read_records(path):
        for f in need:
            if f == "text" and "text" not in rec and "prompt" in rec:
                rec["text"] = rec["prompt"]
            if not isinstance(rec.get(f), str):
                raise DataError(path, line, f, "missing or not a string")
        if rec.get("label") not in (0, 1, True, False):
            raise DataError(path, line, "label", f"must be 0 or 1, got {rec.get('label')!r}")
        if rec.get("split", "train") not in ("train", "validation", "encoder"):
            raise DataError(path, line, "split", "must be train, validation or encoder")
        out.append({**rec, "label": int(rec["label"]), "_line": line})
    return out


def split(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Records' own `split` if any has one (encoder rows: train), else a seeded stratified `fraction`."""
    if any("split" in r for r in records):
        val = [r for r in records if r.get("split") == "validation"]
        return [r for r in records if r.get("split", "train") in ("train", "encoder")], val
    rng = np.random.default_rng(seed)
    train, val = [], []
    for lab in (0, 1):
        group = [r for r in records if r["label"] == lab]
        idx = rng.permutation(len(group))
        n_val = int(round(fraction * len(group)))
        val += [group[i] for i in idx[:n_val]]
        train += [group[i] for i in idx[n_val:]]
    return train, val


def fit(train: list[dict], val: list[dict], feats: Features, name: str, cfg: GuardTrainConfig) -> Classifier:
    """Logistic regression per C in the grid; the best on validation, Platt-calibrated, thresholded there."""
    if feats.minilm_adapter:  # a head over a tuned encoder learns only from rows the encoder did not see
        train = [r for r in train if r.get("split") != "encoder"]
    for part, what in ((train, "train"), (val, "validation")):
        if len({r["label"] for r in part}) < 2:
            raise DataError(cfg.data, None, "label", f"the {what} split needs both labels")
    x_tr, x_va = feats(train), feats(val)
    y_tr, y_va = (np.array([r["label"] for r in part]) for part in (train, val))
    best = None
    for c in cfg.c_grid:
        coef, intercept = calibration.fit_logistic(x_tr, y_tr, c, solver="liblinear")
        s = np.asarray(x_va @ coef).ravel() + intercept
        a, b = calibration.platt_fit(s, y_va)
        p = np.clip(expit(a * s + b), 1e-7, 1 - 1e-7)
        log_lik = np.mean(y_va * np.log(p) + (1 - y_va) * np.log(1 - p))
        key = (calibration.roc_auc(s[y_va == 1], s[y_va == 0]), log_lik)
        if best is None or key > best[0]:
            best = (key, c, coef, intercept, (a, b))
    _, c, coef, intercept, platt = best
    clf = Classifier(name, feats, coef, intercept, platt)
    if cfg.cascade_miss and feats.minilm_tokens:
        clf.first = fit(train, val, replace(feats, minilm_tokens=0), name, replace(cfg, cascade_miss=0.0))
        p1 = clf.first.predict_proba(val)
        # below the band: clear negatives; above it: scores no validation negative reached
        clf.band = (float(np.quantile(p1[y_va == 1], cfg.cascade_miss)), float(p1[y_va == 0].max()))
    p_va = clf.predict_proba(val)
    if cfg.threshold_rule == "f1":
        clf.threshold = calibration.threshold_max_f1(p_va, y_va)
    else:  # within every group of negatives when fpr_by names a field, so a small group is not drowned
        groups = [str(r.get(cfg.fpr_by)) for r in val] if cfg.fpr_by else ["all"] * len(val)
        clf.threshold = calibration.threshold_at_fpr_by(p_va, y_va, groups, cfg.target_fpr)
    clf.info = {"threshold_rule": cfg.threshold_rule, "target_fpr": cfg.target_fpr, "C": c}
    clf.info["trained_on"] = {"train": len(train), "validation": len(val), "positives": int(y_tr.sum())}
    clf.info["validation"] = calibration.binary_metrics(p_va, y_va, clf.threshold)
    if clf.first is not None:
        clf.info["second_stage_share"] = clf.counts[1] / max(clf.counts[0], 1)
    return clf


def train(cfg: GuardTrainConfig) -> dict:
    """`alignkit guard train`: read, split, fit, calibrate, threshold, save; returns the validation figures."""
    records = read_labelled(cfg.data, cfg.features.inputs)
    train_part, val_part = split(records, cfg.validation_fraction, cfg.seed)
    out = Path(cfg.output)
    clf = fit(train_part, val_part, cfg.features, cfg.name or out.name, cfg)
    digest = hashlib.sha256(Path(cfg.data).read_bytes()).hexdigest()[:16] if Path(cfg.data).is_file() else ""
    clf.info["data_sha256"] = digest
    clf.save(out)
    cfglib.save(cfg, out / "job_config.yaml")
    return {"output": str(out), "threshold": clf.threshold, **clf.info}
