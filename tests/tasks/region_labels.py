"""Random detector labels for generated feature-store records (a helper module of the tasks tests, not a test file)."""

from __future__ import annotations

import numpy as np


def random_labels(rng: np.random.Generator, n: int, conf_low: float = 0.0) -> dict[str, np.ndarray]:
    """``obj_ids`` / ``obj_conf`` / ``attr_ids`` / ``attr_conf`` of ``n`` regions (VG ids, confidences in
    [conf_low, 1)), drawn from ``rng`` in that order."""
    return {
        "obj_ids": rng.integers(0, 1600, n),
        "obj_conf": rng.uniform(conf_low, 1, n).astype(np.float32),
        "attr_ids": rng.integers(0, 400, n),
        "attr_conf": rng.uniform(conf_low, 1, n).astype(np.float32),
    }
