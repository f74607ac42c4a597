"""The score statistics a manifest records."""

from __future__ import annotations

import numpy as np

SCORE_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def score_stats(scores: np.ndarray) -> dict[str, object]:
    """The manifest's `score.stats` of a score column (nulls, as NaN, are not counted)."""
    scores = scores[~np.isnan(scores)].astype(np.float64)
    if not len(scores):
        return {"count": 0}
    return {"count": int(len(scores)), "mean": float(scores.mean()), "std": float(scores.std()),
            "min": float(scores.min()), "max": float(scores.max()),
            "quantiles": {f"{q:.1f}": float(np.quantile(scores, q)) for q in SCORE_QUANTILES}}

