"""Means with 95 % confidence intervals and paired differences between variants.

Variants of the benchmark see the same prompts with the same seeds, so a variant's effect is
best measured per image pair (same prompt, same seed) rather than as two independent means:
the pairing removes the prompts' own spread from the interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as scipy_stats


def mean_ci(values: Sequence[float]) -> dict[str, float]:
    """{mean, ci (half-width of the 95 % t-interval), n} over the finite values."""
    x = np.asarray(values, np.float64)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return {"mean": math.nan, "ci": math.nan, "n": 0}
    half = (float(scipy_stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n))
            if n > 1 else math.nan)
    return {"mean": float(x.mean()), "ci": half, "n": n}


def paired_difference(rows: Sequence[dict], metric: str, variant: str, baseline: str) -> dict[str, float]:
    """Mean of (variant - baseline) over image pairs with the same prompt and seed index, with
    its 95 % interval; n is the number of pairs."""
    base = {(r["prompt_key"], r["index"]): r[metric] for r in rows if r["variant"] == baseline}
    diffs = [r[metric] - base[(r["prompt_key"], r["index"])] for r in rows
             if r["variant"] == variant and (r["prompt_key"], r["index"]) in base]
    return mean_ci(diffs)


def summarise(rows: Sequence[dict], metrics: Sequence[str], by: Sequence[str]) -> list[dict]:
    """One row per distinct value of the `by` keys: each metric's mean, ci and n."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in by), []).append(row)
    out = []
    for key, members in groups.items():
        entry = dict(zip(by, key)) | {"images": len(members)}
        for m in metrics:
            entry[m] = mean_ci([r[m] for r in members])
        out.append(entry)
    return out
