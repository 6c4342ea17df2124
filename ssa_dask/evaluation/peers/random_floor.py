"""The floor: every cell goes to a spot drawn uniformly at random.

Any method worth running must place cells closer to their true spots than this. The expected
mean distance of the floor is ``(1/n) sum_c (1/m) sum_j d(t_c, j)`` over the ``m`` spots.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ssa_dask.evaluation.peers.base import PeerProblem

NAME = "random"
DENSE_INPUT = False


def unavailable() -> str | None:
    """Always available (NumPy only)."""
    return None


def load() -> None:
    """Nothing to import beforehand."""


def map_cells(problem: PeerProblem, *, seed: int = 0, top_k: int = 1) -> dict[str, Any]:
    """Draw each cell's spot uniformly from the ``m`` spots.

    ``spot_c ~ Uniform{0, ..., m-1}`` independently, from ``numpy.random.default_rng(seed)``;
    ``probability_c = 1/m``. The floor has no ranking, so ``top_spots`` is the drawn spot alone
    whatever ``top_k`` is (its top-k accuracy is ``k/m`` in expectation).

    Parameters
    ----------
    problem
        The prepared problem (only its sizes are used).
    seed
        Seed of the generator.
    top_k
        Ignored (accepted for the common interface).

    Returns
    -------
    dict
        ``spot`` (n_cells,), ``probability`` (n_cells,), ``top_spots`` (n_cells, 1).
    """
    rng = np.random.default_rng(seed)
    spot = rng.integers(0, problem.n_spots, size=problem.n_cells, dtype=np.int64)
    return {"spot": spot, "probability": np.full(problem.n_cells, 1.0 / problem.n_spots), "top_spots": spot[:, None]}
