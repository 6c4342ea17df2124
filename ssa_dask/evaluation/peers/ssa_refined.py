"""SSA's refined mode (:func:`ssa_dask.align` with ``refine=``), run through the peer interface.

The variant picked by the guard ablation (``benchmarks/results/refine_ablation/``): uniform cell
masses, spot capacities ``q ∝ sqrt(n_cells)`` from the number of cells per spot (a segmentation
count; the binned spots carry it as ``obs["n_cells"]``), then ``STEPS`` refine steps of step size
``ETA``.  Without a cell count the capacities are left to ``marginals`` (uniform).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ssa_dask.evaluation.peers import ssa
from ssa_dask.evaluation.peers.base import PeerProblem

NAME = "ssa_refined"
DENSE_INPUT = False

#: Refine steps and step size of the picked variant.
STEPS = 50
ETA = 5.0
#: Exponent tempering the cell-count capacity, ``q ∝ n_cells ** CAPACITY_POWER``.
CAPACITY_POWER = 0.5

unavailable = ssa.unavailable
load = ssa.load


def map_cells(problem: PeerProblem, *, seed: int = 0, top_k: int = 1, **options: Any) -> dict[str, Any]:
    """Run :func:`ssa_dask.align` in the refined mode on the caller's AnnData objects.

    Parameters
    ----------
    problem
        The prepared problem; ``spots_adata.obs["n_cells"]`` is used as the capacity prior when present.
    seed
        Unused (deterministic).
    top_k
        Passed to ``align``.
    **options
        Any keyword of :func:`ssa_dask.align`; they override the variant's ``refine``,
        ``refine_eta``, ``marginals`` and ``spot_mass``.

    Returns
    -------
    dict
        As :func:`ssa_dask.evaluation.peers.ssa.map_cells`.
    """
    obs = problem.spots_adata.obs
    variant: dict[str, Any] = {"refine": STEPS, "refine_eta": ETA, "marginals": "uniform"}
    if "n_cells" in obs:
        variant["spot_mass"] = np.asarray(obs["n_cells"], dtype=np.float64) ** CAPACITY_POWER
    return ssa.map_cells(problem, seed=seed, top_k=top_k, **(variant | options))
