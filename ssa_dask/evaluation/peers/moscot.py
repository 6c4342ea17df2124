"""moscot's spatial mapping (Klein et al. 2025, Nature): ``moscot.problems.space.MappingProblem``.

moscot solves a fused Gromov-Wasserstein problem (OTT-JAX) between the spots (source) and the
cells (target): the quadratic term compares squared Euclidean distances between the spots'
standardised coordinates (``spatial_key``) with those between the cells' principal components
(``sc_attr``), the linear term is the squared Euclidean distance in a joint PCA of both
expression matrices over the shared genes (moscot's default when ``joint_attr`` is ``None``);
``alpha`` weighs the quadratic term, ``epsilon`` the entropy; marginals are uniform
(``tau_a = tau_b = 1``: balanced). Each cell goes to the spot with the largest transport.

Install: ``pip install moscot`` (brings JAX, OTT-JAX; CPU is enough).
"""

from __future__ import annotations

import logging
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from ssa_dask.evaluation.peers.base import (
    PeerProblem,
    assignment_from_plan,
    not_installed,
    pca_scores,
)

NAME = "moscot"
DENSE_INPUT = True


def unavailable() -> str | None:
    """``None`` when moscot is installed (looked up, not imported)."""
    return not_installed({"moscot": "moscot"}, "pip install moscot")


def load() -> None:
    """Import moscot (and JAX) before the timed mapping."""
    from moscot.problems.space import MappingProblem  # noqa: F401


def map_cells(
    problem: PeerProblem,
    *,
    seed: int = 0,
    top_k: int = 1,
    alpha: float = 0.5,
    epsilon: float = 0.01,
    n_pcs: int = 30,
    max_iterations: int | None = None,
) -> dict[str, Any]:
    """Map cells with ``MappingProblem(...).prepare(...).solve(...)``.

    Parameters
    ----------
    problem
        The prepared problem (needs spot coordinates).
    seed
        Unused: the full-rank solver is deterministic.
    top_k
        Best spots per cell to keep.
    alpha
        Weight of the quadratic (spatial) term, moscot's default 0.5.
    epsilon
        Entropic regularisation, moscot's default 0.01 (costs scaled by their mean).
    n_pcs
        Principal components of the cells used as ``sc_attr`` (the quadratic term).
    max_iterations
        Cap on the fused GW outer iterations (``None``: moscot's default).

    Returns
    -------
    dict
        ``spot``, ``probability`` (row-normalised transport), ``top_spots``, ``info`` (convergence).
    """
    from moscot.problems.space import MappingProblem

    sc, spots = problem.dense()
    xy = problem.require_xy("moscot")
    var = pd.DataFrame(index=pd.Index([str(g) for g in problem.genes]))
    adata_sc = ad.AnnData(X=sc.astype(np.float32), var=var.copy())
    adata_sc.obsm["X_pca"] = pca_scores(sc, n_pcs).astype(np.float32)
    adata_sp = ad.AnnData(X=spots.astype(np.float32), var=var.copy())
    adata_sp.obsm["spatial"] = np.asarray(xy, dtype=np.float32)
    log = logging.getLogger("moscot._logging")  # moscot's own INFO logger (it does not propagate)
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        mp = MappingProblem(adata_sc=adata_sc, adata_sp=adata_sp)
        mp = mp.prepare(sc_attr={"attr": "obsm", "key": "X_pca"}, spatial_key="spatial")
        mp = mp.solve(alpha=alpha, epsilon=epsilon, max_iterations=max_iterations)
    finally:
        log.setLevel(level)
    (solution,) = mp.solutions.values()
    plan = np.asarray(solution.transport_matrix, dtype=np.float64).T  # (cells, spots)
    result = assignment_from_plan(plan, top_k)
    result["info"] = {"converged": bool(solution.converged), "cost": float(solution.cost)}
    return result
