"""Which training rows to keep: all, the highest-scoring fraction, or a random one of the same size.

Computed once from (seq_id, score) of the training rows, so every rank and every resumed run derives
the same set without communicating.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from teacher_cache.errors import ConfigError

MODES = ("none", "top", "random")
_RANDOM_SALT = 0x5E1EC7  # keeps the selection's RNG stream apart from the data order's


@dataclass(frozen=True)
class Selection:
    mode: str = "none"
    fraction: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> Selection:
        mode, _, fraction = spec.partition(":")
        if mode == "none" and not fraction:
            return cls()
        if mode not in MODES[1:] or not fraction:
            raise ConfigError(f"--select {spec!r}: expected none, top:F or random:F (0 < F <= 1)")
        try:
            value = float(fraction)
        except ValueError:
            raise ConfigError(f"--select {spec!r}: {fraction!r} is not a number") from None
        if not 0 < value <= 1:
            raise ConfigError(f"--select {spec!r}: the fraction must be in (0, 1]")
        return cls(mode, value)

    def apply(self, seq_ids: np.ndarray, scores: np.ndarray, seed: int) -> np.ndarray:
        """The kept seq_ids, sorted. `scores` are NaN where the cache holds none."""
        if self.mode == "none":
            return np.sort(seq_ids, kind="stable")  # O(N) on ids that are already in order
        keep = int(round(self.fraction * len(seq_ids)))
        if self.mode == "top":
            unscored = int(np.isnan(scores).sum())
            if unscored:
                raise ConfigError(f"--select top: {unscored} of {len(seq_ids)} training rows have "
                                  f"no score; score the cache first or use --select random:"
                                  f"{self.fraction:g}")
            order = np.lexsort((seq_ids, -scores))  # highest score first, ties by lower seq_id
            return np.sort(seq_ids[order[:keep]])
        rng = np.random.default_rng([seed, _RANDOM_SALT])
        return np.sort(rng.choice(np.sort(seq_ids), size=keep, replace=False))
