"""Fitting and measuring detectors: logistic regression, Platt calibration, thresholds, binary metrics."""

from __future__ import annotations

import math

import numpy as np
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score


def fit_logistic(x, y, c: float, solver: str = "lbfgs", tol: float = 1e-4) -> tuple[np.ndarray, float]:
    """L2 logistic regression (scikit-learn) minimising C·Σ_i w_i·BCE_i + ½|w|², w_i = n / (2·n_{y_i})
    (balanced); the intercept is unpenalised (not by liblinear) → (coef, intercept). Deterministic."""
    lr = LogisticRegression(C=c, class_weight="balanced", solver=solver, max_iter=5000, tol=tol)
    lr.fit(x, np.asarray(y).astype(int))
    return lr.coef_.ravel().astype(np.float64), float(lr.intercept_[0])


def platt_fit(scores: np.ndarray, labels: np.ndarray, steps: int = 100) -> tuple[float, float]:
    """Platt scaling (Platt 1999, eq. 5–6): fit p = σ(a·s + b) to held-out scores by Newton's method on
    the log-loss, with Platt's smoothed targets t₊ = (N₊+1)/(N₊+2), t₋ = 1/(N₋+2) against overfitting."""
    s, y = np.asarray(scores, float), np.asarray(labels, float)
    scale = s.std() or 1.0  # Newton on standardised scores, halving a step that raises the loss:
    s = s / scale  # scores of an over-confident model (|s| in the hundreds) would overshoot otherwise
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    t = np.where(y > 0.5, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def loss(a: float, b: float) -> float:
        z = a * s + b
        return float((np.logaddexp(0, z) - t * z).sum())

    a, b = 1.0, 0.0
    for _ in range(steps):
        p = expit(a * s + b)
        g = np.array([((p - t) * s).sum(), (p - t).sum()])
        w = p * (1 - p) + 1e-12
        h = np.array([[(w * s * s).sum(), (w * s).sum()], [(w * s).sum(), w.sum()]]) + 1e-9 * np.eye(2)
        step, before = np.linalg.solve(h, g), loss(a, b)
        while loss(a - step[0], b - step[1]) > before and np.abs(step).max() > 1e-12:
            step = step / 2
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-10:
            break
    return float(a / scale), float(b)


def threshold_at_fpr(neg_scores: np.ndarray, fpr: float, pos_scores: np.ndarray | None = None) -> float:
    """A threshold with at most ⌊fpr·N⌋ of N negatives at or above it, halfway to the next higher score."""
    neg = np.sort(np.asarray(neg_scores, float))[::-1]
    if len(neg) == 0:
        raise ValueError("no negatives to set a threshold on")
    k = min(int(math.floor(fpr * len(neg) + 1e-9)), len(neg) - 1)
    above = np.concatenate([neg, np.asarray(pos_scores if pos_scores is not None else [], float)])
    above = above[above > neg[k]]
    return float((neg[k] + above.min()) / 2) if len(above) else float(np.nextafter(neg[k], np.inf))


def threshold_at_fpr_by(scores: np.ndarray, labels: np.ndarray, groups: list[str], fpr: float) -> float:
    """The strictest of the per-group thresholds: the FPR stays within `fpr` in every group of negatives."""
    s, y, g = np.asarray(scores, float), np.asarray(labels).astype(bool), np.asarray(groups)
    return max(threshold_at_fpr(s[~y & (g == k)], fpr, s[y]) for k in sorted(set(g[~y])))


def threshold_max_f1(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold (a midpoint of adjacent scores) maximising F1 = 2TP/(2TP+FP+FN); the highest on ties."""
    s, y = np.asarray(scores, float), np.asarray(labels).astype(bool)
    v = np.unique(s)
    cands = np.concatenate([(v[:-1] + v[1:]) / 2, [v[-1]]]) if len(v) > 1 else v
    f1 = [2 * (s[y] >= t).sum() / max((s >= t).sum() + y.sum(), 1) for t in cands]  # 2TP+FP+FN = flagged + P
    best = max(f1)
    return float(max(t for t, f in zip(cands, f1, strict=True) if f == best))


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties counting ½."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def binary_metrics(scores, labels, threshold: float) -> dict[str, float | None]:
    """Confusion counts of `score ≥ threshold` vs 0/1 labels, rates from them, the AUC (None: one class)."""
    s, y = np.asarray(scores, float), np.asarray(labels).astype(bool)
    hit = s >= threshold
    tp, fp, fn, tn = (int(x.sum()) for x in (hit & y, hit & ~y, ~hit & y, ~hit & ~y))
    sens, prec = tp / max(tp + fn, 1), tp / max(tp + fp, 1)
    return {
        "n": len(y), "positives": tp + fn, "tp": tp, "fn": fn, "tn": tn, "fp": fp,
        "sensitivity": sens,
        "specificity": tn / max(tn + fp, 1),
        "fpr": fp / max(tn + fp, 1),
        "precision": prec,
        "f1": 2 * prec * sens / max(prec + sens, 1e-12),
        "accuracy": (tp + tn) / max(len(y), 1),
        "auc": roc_auc(s[y], s[~y]) if y.any() and (~y).any() else None,
    }  # fmt: skip
