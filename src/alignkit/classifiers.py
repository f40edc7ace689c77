"""Guard classifiers: hashed character n-grams (+ optional MiniLM embedding) → logistic regression,
Platt-calibrated, with a threshold chosen on a validation split for a target false-positive rate.

`alignkit guard train --data labelled.jsonl --out DIR` trains one; `load(spec)` reads one back. A
classifier folder holds `classifier.json` (settings, calibration, threshold, validation figures) and
`weights.safetensors` (coefficients). Records are `{text, label}` (or `{prompt, response, label}` for
the output stage), with an optional `split` of "train" or "validation"."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from scipy.special import expit

from .data import DataError, read_records, write_atomic

VERSION = 1
DEFAULTS_DIR = Path(__file__).parent / "guard_models"
Inputs = Literal["text", "prompt", "response", "prompt+response"]


# ---------------------------------------------------------------- the math (pure functions)
def platt_fit(scores: np.ndarray, labels: np.ndarray, steps: int = 100) -> tuple[float, float]:
    """Platt scaling (Platt 1999, eq. 5–6): fit p = σ(a·s + b) to held-out scores by Newton's method on
    the log-loss, with Platt's smoothed targets t₊ = (N₊+1)/(N₊+2), t₋ = 1/(N₋+2) against overfitting."""
    s, y = np.asarray(scores, float), np.asarray(labels, float)
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    t = np.where(y > 0.5, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    a, b = 1.0, 0.0
    for _ in range(steps):
        p = expit(a * s + b)
        g = np.array([((p - t) * s).sum(), (p - t).sum()])
        w = p * (1 - p) + 1e-12
        h = np.array([[(w * s * s).sum(), (w * s).sum()], [(w * s).sum(), w.sum()]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(h, g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-10:
            break
    return float(a), float(b)


def threshold_at_fpr(neg_scores: np.ndarray, fpr: float, pos_scores: np.ndarray | None = None) -> float:
    """A threshold t at which at most ⌊fpr·N⌋ of the N negatives score ≥ t (flag when score ≥ t), placed
    halfway between the highest negative left unflagged and the next score above it (negative or
    positive), for the widest margin; just above it when nothing scores higher."""
    neg = np.sort(np.asarray(neg_scores, float))[::-1]
    if len(neg) == 0:
        raise ValueError("no negatives to set a threshold on")
    k = min(int(math.floor(fpr * len(neg) + 1e-9)), len(neg) - 1)
    pos = np.asarray(pos_scores if pos_scores is not None else [], float)
    above = np.concatenate([neg, pos])
    above = above[above > neg[k]]
    return float((neg[k] + above.min()) / 2) if len(above) else float(np.nextafter(neg[k], np.inf))


def threshold_at_fpr_by(scores: np.ndarray, labels: np.ndarray, groups: list[str], fpr: float) -> float:
    """The strictest of the per-group thresholds: the FPR stays within `fpr` in every group of negatives."""
    s, y, g = np.asarray(scores, float), np.asarray(labels).astype(bool), np.asarray(groups)
    return max(threshold_at_fpr(s[~y & (g == k)], fpr, s[y]) for k in sorted(set(g[~y])))


def threshold_max_f1(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold (a midpoint between adjacent distinct scores) that maximises F1 = 2TP/(2TP+FP+FN)
    of `score ≥ t`; the highest such threshold on ties."""
    s, y = np.asarray(scores, float), np.asarray(labels).astype(bool)
    v = np.unique(s)
    cands = np.concatenate([(v[:-1] + v[1:]) / 2, [v[-1]]]) if len(v) > 1 else v
    f1 = [
        2 * (s[y] >= t).sum() / max(2 * (s[y] >= t).sum() + (s[~y] >= t).sum() + (s[y] < t).sum(), 1)
        for t in cands
    ]
    best = max(f1)
    return float(max(t for t, f in zip(cands, f1, strict=True) if f == best))


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties counting ½."""
    from sklearn.metrics import roc_auc_score

    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def binary_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """TPR, FPR, precision, F1 and AUC of `score ≥ threshold` against 0/1 labels."""
    s, y = np.asarray(scores, float), np.asarray(labels).astype(bool)
    hit = s >= threshold
    tp, fp = int((hit & y).sum()), int((hit & ~y).sum())
    tpr = tp / max(y.sum(), 1)
    prec = tp / max(tp + fp, 1)
    return {
        "n": int(len(y)),
        "positives": int(y.sum()),
        "tpr": tpr,
        "fpr": fp / max((~y).sum(), 1),
        "precision": prec,
        "f1": 2 * prec * tpr / max(prec + tpr, 1e-12),
        "auc": roc_auc(s[y], s[~y]) if y.any() and (~y).any() else float("nan"),
    }


# ---------------------------------------------------------------- features
@dataclass
class Features:
    """How a record becomes a vector: hashed char n-grams of each input field, plus MiniLM if asked."""

    inputs: Inputs = "text"
    ngram: tuple[int, int] = (2, 5)
    n_features: int = 2**17
    max_chars: int = 2000
    minilm_tokens: int = 0
    ngram_weight: float = 1.0
    minilm_weight: float = 1.0
    regex_weight: float = 0.0
    word_weight: float = 0.0

    def __post_init__(self):
        from sklearn.feature_extraction.text import HashingVectorizer

        self.ngram = tuple(self.ngram)
        self._hv = HashingVectorizer(
            analyzer="char_wb",
            ngram_range=self.ngram,
            n_features=self.n_features,
            alternate_sign=False,
            norm="l2",
            lowercase=True,
        )
        self._words = HashingVectorizer(  # word 1–2-grams, one more block per field when word_weight > 0
            ngram_range=(1, 2), n_features=self.n_features, alternate_sign=False, norm="l2"
        )
        self._enc = None

    @property
    def fields(self) -> list[str]:
        return ["prompt", "response"] if self.inputs == "prompt+response" else [self.inputs]

    @property
    def dim(self) -> int:
        per_field = self.n_features * (2 if self.word_weight else 1)
        return per_field * len(self.fields) + (384 if self.minilm_tokens else 0) + bool(self.regex_weight)

    def __call__(self, records: list[dict]):
        import scipy.sparse as sp

        blocks = []
        for f in self.fields:
            texts = [str(r.get(f) or "")[: self.max_chars] for r in records]
            blocks.append(self.ngram_weight * self._hv.transform(texts))
            if self.word_weight:
                blocks.append(self.word_weight * self._words.transform(texts))
        last = [str(r.get(self.fields[-1]) or "") for r in records]
        if self.minilm_tokens:
            from .judges import Encoder

            if self._enc is None:
                self._enc = Encoder(max_length=self.minilm_tokens)
            # cut first: tokenising a long text only to truncate it costs more than the model's forward
            head = [t[: 8 * self.minilm_tokens] for t in last]
            blocks.append(sp.csr_matrix(self.minilm_weight * self._enc(head).numpy()))
        if self.regex_weight:  # the refusal-phrase verdict of judges.RegexJudge, as one more feature
            from .judges import RegexJudge

            rx = np.array(RegexJudge().refusal(last, last), float)[:, None]
            blocks.append(sp.csr_matrix(self.regex_weight * rx))
        return sp.hstack(blocks, format="csr")

    def settings(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


# ---------------------------------------------------------------- the classifier
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

    def decision(self, records: list[dict]) -> np.ndarray:
        if not records:
            return np.zeros(0)
        return np.asarray(self.features(records) @ self.coef).ravel() + self.intercept

    def predict_proba(self, records: list[dict]) -> np.ndarray:
        a, b = self.platt
        return expit(a * self.decision(records) + b)

    def score(self, prompts: list[str], texts: list[str]) -> list[float]:
        """The `ScoreCheck` scorer: texts are the responses at the output stage, the prompts at input."""
        f = self.features.fields
        if f == ["text"] or f == ["prompt"]:
            recs = [{"text": t, "prompt": t} for t in texts]
        else:
            recs = [{"prompt": p, "response": t} for p, t in zip(prompts, texts, strict=True)]
        return [float(p) for p in self.predict_proba(recs)]

    def save(self, out: Path) -> None:
        from safetensors.numpy import save_file

        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".weights.safetensors.tmp"
        save_file({"coef": self.coef.astype(np.float32)}, str(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        tmp.replace(out / "weights.safetensors")
        meta = {
            "version": VERSION,
            "name": self.name,
            "features": self.features.settings(),
            "intercept": self.intercept,
            "platt": list(self.platt),
            "threshold": self.threshold,
            **self.info,
        }
        write_atomic(out / "classifier.json", json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Classifier:
        from safetensors.numpy import load_file

        path = Path(path)
        try:
            meta = json.loads((path / "classifier.json").read_text(encoding="utf-8"))
            coef = load_file(str(path / "weights.safetensors"))["coef"].astype(np.float64)
        except (OSError, ValueError, KeyError) as e:
            raise DataError(str(path), None, None, f"not a guard classifier folder ({e})") from None
        if meta.get("version") != VERSION:
            raise DataError(str(path / "classifier.json"), None, "version", f"expected {VERSION}")
        feats = Features(**meta.pop("features"))
        if coef.shape != (feats.dim,):
            raise DataError(str(path), None, "coef", f"shape {coef.shape}, features need ({feats.dim},)")
        keep = ("version", "name", "intercept", "platt", "threshold")
        info = {k: v for k, v in meta.items() if k not in keep}
        return cls(
            meta["name"], feats, coef, meta["intercept"], tuple(meta["platt"]), meta["threshold"], info
        )


def load(spec: str) -> Classifier:
    """A classifier folder, or `default:NAME` for one that ships with alignkit (guard_models/NAME)."""
    if spec.startswith("default:"):
        path = DEFAULTS_DIR / spec[8:]
        if not path.is_dir():
            known = sorted(p.name for p in DEFAULTS_DIR.glob("*") if p.is_dir())
            raise DataError(spec, None, None, f"no such default classifier (shipped: {', '.join(known)})")
        return Classifier.load(path)
    return Classifier.load(spec)


# ---------------------------------------------------------------- training
@dataclass
class GuardTrainConfig:
    """Train a guard classifier on labelled JSONL records."""

    data: str = ""
    """JSONL of {text, label} (or {prompt, response, label}); label 0/1 (1 = flag); optional split:
    train | validation."""
    output: str = ""
    """Folder written: classifier.json + weights.safetensors."""
    name: str = ""
    """Classifier name (verdict category); default: the output folder's name."""
    inputs: Inputs = "text"
    """Which record fields are read: text, prompt, response, or prompt+response (hashed separately)."""
    threshold_rule: Literal["fpr", "f1"] = "fpr"
    """fpr: the lowest threshold whose validation false-positive rate is at most target_fpr; f1: the
    threshold with the best validation F1."""
    target_fpr: float = 0.01
    """The false-positive rate allowed on the validation split (threshold_rule=fpr)."""
    fpr_by: str | None = None
    """A record field (e.g. source): the false-positive rate must stay within target_fpr for every value
    of it, not only overall."""
    validation_fraction: float = 0.25
    """Share of records held out for calibration and the threshold when records carry no split."""
    ngram_min: int = 2
    """Shortest character n-gram."""
    ngram_max: int = 5
    """Longest character n-gram."""
    n_features: int = 2**17
    """Hash buckets per input field."""
    max_chars: int = 2000
    """Characters of each field read (bounds latency on long texts)."""
    minilm_tokens: int = 0
    """Tokens of the last field embedded by all-MiniLM-L6-v2 and appended; 0: n-grams only (fast)."""
    ngram_weight: float = 1.0
    """Scale of the (L2-normalised) n-gram block: with L2 regularisation, a larger scale leans on it more."""
    minilm_weight: float = 1.0
    """Scale of the (unit-length) MiniLM embedding block."""
    regex_weight: float = 0.0
    """Scale of one more feature, the refusal-phrase verdict of the regex judge; 0: left out."""
    word_weight: float = 0.0
    """Scale of a block of hashed word 1–2-grams per field; 0: left out."""
    c_grid: list[float] = field(default_factory=lambda: [1.0, 4.0, 16.0, 64.0, 256.0])
    """Inverse L2 strengths tried; the one with the best validation AUC (then log-loss) wins."""
    seed: int = 0
    """Seed of the train/validation split."""


def read_labelled(path: str, inputs: Inputs) -> list[dict]:
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
        if rec.get("split", "train") not in ("train", "validation"):
            raise DataError(path, line, "split", "must be train or validation")
        out.append({**rec, "label": int(rec["label"]), "_line": line})
    return out


def split(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Records' own `split` if any record has one, else a seeded stratified draw of `fraction`."""
    if any("split" in r for r in records):
        return [r for r in records if r.get("split", "train") == "train"], [
            r for r in records if r.get("split") == "validation"
        ]
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
    """Logistic regression (classes balanced) per C in the grid; keep the best on validation, then
    calibrate on validation (Platt) and pick the threshold there for the target FPR."""
    from sklearn.linear_model import LogisticRegression

    for part, what in ((train, "train"), (val, "validation")):
        if len({r["label"] for r in part}) < 2:
            raise DataError(cfg.data, None, "label", f"the {what} split needs both labels")
    x_tr, x_va = feats(train), feats(val)
    y_tr = np.array([r["label"] for r in train])
    y_va = np.array([r["label"] for r in val])
    best = None
    for c in cfg.c_grid:
        lr = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, solver="liblinear")
        lr.fit(x_tr, y_tr)
        s = lr.decision_function(x_va)
        a, b = platt_fit(s, y_va)
        p = np.clip(expit(a * s + b), 1e-7, 1 - 1e-7)
        key = (roc_auc(s[y_va == 1], s[y_va == 0]), np.mean(y_va * np.log(p) + (1 - y_va) * np.log(1 - p)))
        if best is None or key > best[0]:
            best = (key, c, lr, (a, b))
    (auc, _), c, lr, platt = best
    clf = Classifier(name, feats, lr.coef_.ravel().astype(np.float64), float(lr.intercept_[0]), platt)
    p_va = clf.predict_proba(val)
    if cfg.threshold_rule == "f1":
        clf.threshold = threshold_max_f1(p_va, y_va)
    else:  # within every group of negatives when fpr_by names a field, so a small group is not drowned
        groups = [str(r.get(cfg.fpr_by)) for r in val] if cfg.fpr_by else ["all"] * len(val)
        clf.threshold = threshold_at_fpr_by(p_va, y_va, groups, cfg.target_fpr)
    clf.info = {
        "threshold_rule": cfg.threshold_rule,
        "target_fpr": cfg.target_fpr,
        "C": c,
        "trained_on": {"train": len(train), "validation": len(val), "positives": int(y_tr.sum())},
        "validation": binary_metrics(p_va, y_va, clf.threshold),
    }
    return clf


def train(cfg: GuardTrainConfig) -> dict:
    """`alignkit guard train`: read, split, fit, calibrate, threshold, save; returns the validation figures."""
    if not cfg.data or not cfg.output:
        raise DataError("guard train", None, "data/output", "both --data and --out are needed")
    if not 0 <= cfg.target_fpr < 1:
        raise DataError("guard train", None, "target_fpr", "must be in [0, 1)")
    records = read_labelled(cfg.data, cfg.inputs)
    train_part, val_part = split(records, cfg.validation_fraction, cfg.seed)
    # the feature settings are the config's fields of the same names (the n-gram range aside)
    names = [f.name for f in dataclasses.fields(Features) if f.name != "ngram"]
    feats = Features(ngram=(cfg.ngram_min, cfg.ngram_max), **{k: getattr(cfg, k) for k in names})
    out = Path(cfg.output)
    clf = fit(train_part, val_part, feats, cfg.name or out.name, cfg)
    digest = hashlib.sha256(Path(cfg.data).read_bytes()).hexdigest()[:16] if Path(cfg.data).is_file() else ""
    clf.info["data_sha256"] = digest
    clf.save(out)
    return {"output": str(out), "threshold": clf.threshold, **clf.info}
