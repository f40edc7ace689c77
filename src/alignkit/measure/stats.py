"""Rates with intervals: Wilson score intervals and the Rogan–Gladen judge-error correction."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float, float]:
    """Wilson score interval (Wilson 1927; Agresti & Coull 1998, Eq. 2): (k/n, low, high); n = 0: (nan, 0, 1).
    centre = (p + z²/2n) / (1 + z²/n);  half = z·sqrt(p(1−p)/n + z²/4n²) / (1 + z²/n)."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 ≤ k ≤ n, got k={k}, n={n}")
    if n == 0:
        return math.nan, 0.0, 1.0
    p, denom = k / n, 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exact ends: no 1e-17 from rounding
    high = 1.0 if k == n else min(1.0, centre + half)
    return p, low, high


def rogan_gladen(p_obs: float, sensitivity: float, specificity: float) -> float:
    """True prevalence from an imperfect judge (Rogan & Gladen 1978, Eq. 1), clipped to [0, 1]:
    p_true = (p_obs + Sp − 1) / (Se + Sp − 1). Needs Se + Sp > 1 (a judge better than chance)."""
    youden = sensitivity + specificity - 1
    if youden <= 0:
        raise ValueError(f"judge no better than chance: sensitivity + specificity = {youden + 1:.3f} ≤ 1")
    return min(1.0, max(0.0, (p_obs + specificity - 1) / youden))


def corrected_interval(
    k: int, n: int, se_k: int, se_n: int, sp_k: int, sp_n: int, z: float = Z95
) -> tuple[float, float, float]:
    """Rogan–Gladen estimate of k/n judge positives, with an interval carrying the judge's own uncertainty (in
    validation it caught se_k of se_n true positives, cleared sp_k of sp_n true negatives): a delta method
    adjusted after Lang & Reiczigel (2014) (z²/2 successes and failures added to the test count, one of each
    to the validation counts), Var(p̂) = [Var(p_obs) + p̂²·Var(Se) + (1 − p̂)²·Var(Sp)] / (Se + Sp − 1)²."""
    if n == 0:
        return math.nan, 0.0, 1.0
    point = rogan_gladen(k / n, se_k / se_n, sp_k / sp_n)
    n_a, se_a, sp_a = n + z * z, (se_k + 1) / (se_n + 2), (sp_k + 1) / (sp_n + 2)
    p_a = (k + z * z / 2) / n_a
    youden = se_a + sp_a - 1
    if youden <= 0:
        raise ValueError("judge no better than chance after adjustment: validate it on more items")
    centre = min(1.0, max(0.0, (p_a + sp_a - 1) / youden))
    var = (
        p_a * (1 - p_a) / n_a
        + centre**2 * se_a * (1 - se_a) / (se_n + 2)
        + (1 - centre) ** 2 * sp_a * (1 - sp_a) / (sp_n + 2)
    ) / youden**2
    half = z * math.sqrt(var)
    return point, max(0.0, centre - half), min(1.0, centre + half)


def rate(k: int, n: int, judge: dict | None = None) -> dict | None:
    """The RATE record of summary.json: {k, n, rate, low, high, corrected}; None when n = 0. judge:
    {se_k, se_n, sp_k, sp_n} from the judge's validation, to add the Rogan–Gladen correction."""
    if n == 0:
        return None
    p, low, high = wilson(k, n)
    out = {"k": k, "n": n, "rate": p, "low": low, "high": high, "corrected": None}
    if judge:
        cp, cl, ch = corrected_interval(k, n, judge["se_k"], judge["se_n"], judge["sp_k"], judge["sp_n"])
        out["corrected"] = {"rate": cp, "low": cl, "high": ch}
    return out
