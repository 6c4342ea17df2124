"""SpaOTsc's mapping (Cang & Nie 2020, Nat Commun 11:2084): unbalanced structured (fused GW) OT.

What is implemented (SpaOTsc's ``spatial_sc.transport_plan`` with the inputs of its published
tutorial, continuous correlation in place of the binarised MCC because the spots are continuous):

* ``rho[i, j]``: Pearson correlation of cell ``i`` and spot ``j`` over the shared genes;
* cost ``M = exp(1 - rho) ** 2`` (the tutorial passes ``C**2`` with ``C = exp(1 - MCC)``;
  ``cost_power`` sets the exponent);
* marginals from the weights ``W = exp(rho)``: ``a = W 1 / sum(W)`` (cells), ``b = W^T 1 / sum(W)``
  (spots), as ``transport_plan(cor_matrix=...)`` does;
* cell-cell dissimilarity ``C_sc = exp(1 - r_sc)`` with ``r_sc`` the Pearson correlation between
  cells over their first 40 principal components (the tutorial's ``exp(1 - pcc)`` on PCA-40), and
  spot-spot Euclidean distance ``C_sp`` (the geodesic distance of a flat slide); both divided by
  their maximum;
* the problem
  ``min_g (1 - alpha) <g, M> + (alpha / 2) sum_{i,k,j,l} (C_sc[i,k] - C_sp[j,l])^2 g_ij g_kl
  + epsilon sum_ij g_ij (log g_ij - 1) + kappa KL(g 1 | a) + kappa KL(g^T 1 | b)``
  with SpaOTsc's defaults ``alpha = 0.1``, ``epsilon = 1.0``, ``kappa`` (SpaOTsc's ``rho``) ``= 100``;
* solved as SpaOTsc's ``usot``: ``n_outer = 10`` conditional-gradient steps from ``g = a b^T``;
  each linearises the quadratic term, ``G = (1 - alpha) M + 2 alpha (c_a - C_sc g C_sp)`` with
  ``c_a = (C_sc^2 / 2) a 1^T + 1 b^T (C_sp^2 / 2)`` (the plan's marginals taken as ``a``, ``b`` in
  this constant part, as SpaOTsc's code does), solves the entropic unbalanced problem in ``G``
  with POT (``ot.unbalanced.sinkhorn_unbalanced``, ``KL(g | 1)`` regulariser, up to 1000
  iterations where SpaOTsc runs 50) and takes SpaOTsc's exact line search on the segment.
  Each cell goes to the spot of largest ``g``.

The ``(n_cells, n_cells)`` matrix ``C_sc`` and the ``C_sc g`` products (``O(n^2 m)`` per step)
limit this method to modest numbers of cells (thousands), as in the paper.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ssa_dask.evaluation.peers.base import (
    PeerProblem,
    assignment_from_plan,
    check_dense_memory,
    not_installed,
    pca_scores,
    pearson_matrix,
)

NAME = "spaotsc"
DENSE_INPUT = True


def unavailable() -> str | None:
    """``None`` when POT is installed."""
    return not_installed({"POT": "ot"}, "pip install pot")


def load() -> None:
    """Import POT (and the backends it loads) before the timed mapping."""
    import ot  # noqa: F401


def usot(
    a: np.ndarray,
    b: np.ndarray,
    cost: np.ndarray,
    c_sc: np.ndarray,
    c_sp: np.ndarray,
    *,
    alpha: float,
    epsilon: float,
    kappa: float,
    n_outer: int,
    n_inner: int = 1000,
) -> np.ndarray:
    """SpaOTsc's unbalanced structured OT by conditional gradient (see module docstring).

    Parameters
    ----------
    a, b
        ``(n,)`` and ``(m,)`` marginals.
    cost
        ``(n, m)`` linear cost ``M``.
    c_sc, c_sp
        ``(n, n)`` and ``(m, m)`` intra-domain dissimilarities.
    alpha, epsilon, kappa
        Weight of the structured term, entropic weight, marginal KL weight.
    n_outer
        Conditional-gradient steps.
    n_inner
        Iteration cap of each unbalanced Sinkhorn solve.

    Returns
    -------
    numpy.ndarray
        ``(n, m)`` plan.
    """
    import ot

    const = (0.5 * c_sc**2) @ a[:, None] + ((0.5 * c_sp**2) @ b)[None, :]
    plan = np.outer(a, b)
    ones = np.ones_like(cost)  # KL(g | 1): SpaOTsc's entropy term sum g (log g - 1), up to a constant
    for _ in range(int(n_outer)):
        grad = (1.0 - alpha) * cost + 2.0 * alpha * (const - c_sc @ plan @ c_sp.T)
        target = ot.unbalanced.sinkhorn_unbalanced(
            a, b, grad, reg=epsilon, reg_m=kappa, reg_type="kl", c=ones, numItermax=n_inner, stopThr=1e-9
        )
        step = target - plan
        quad = -alpha * np.sum((c_sc @ step @ c_sp) * step)
        lin = np.sum(((1.0 - alpha) * cost + alpha * const - 2.0 * alpha * (c_sc @ plan @ c_sp)) * step)
        if quad > 0:
            tau = min(1.0, max(0.0, -0.5 * lin / quad))
        elif quad + lin < 0:
            tau = 1.0
        else:
            tau = 0.0
        plan = plan + tau * step
    return plan


def map_cells(
    problem: PeerProblem,
    *,
    seed: int = 0,
    top_k: int = 1,
    alpha: float = 0.1,
    epsilon: float = 1.0,
    kappa: float = 100.0,
    n_outer: int = 10,
    n_pcs: int = 40,
    cost_power: float = 2.0,
) -> dict[str, Any]:
    """Map cells with SpaOTsc's unbalanced fused Gromov-Wasserstein transport plan.

    Parameters
    ----------
    problem
        The prepared problem (needs spot coordinates).
    seed
        Unused (the method is deterministic).
    top_k
        Best spots per cell to keep.
    alpha
        Weight of the structured (GW) term, SpaOTsc default 0.1.
    epsilon
        Entropic weight, SpaOTsc default 1.0.
    kappa
        KL weight of the unbalanced marginals (SpaOTsc's ``rho``), default 100.
    n_outer
        Conditional-gradient steps (SpaOTsc's ``niter``), default 10.
    n_pcs
        Principal components for the cell-cell correlation, default 40.
    cost_power
        Exponent of ``exp(1 - rho)`` in the cost, default 2 (the published tutorial).

    Returns
    -------
    dict
        ``spot``, ``probability`` (row-normalised plan), ``top_spots``.
    """
    sc, spots = problem.dense()
    xy = problem.require_xy("spaotsc")
    n, m = problem.n_cells, problem.n_spots
    check_dense_memory("spaotsc", 3 * n * n + 8 * n * m + 2 * m * m)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rho = pearson_matrix(sc, spots)
    cost = np.exp(1.0 - rho) ** cost_power
    weight = np.exp(rho)
    a = weight.sum(axis=1) / weight.sum()
    b = weight.sum(axis=0) / weight.sum()
    pcs = pca_scores(sc, n_pcs)
    c_sc = np.exp(1.0 - pearson_matrix(pcs, pcs))
    c_sc /= c_sc.max()
    c_sp = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(axis=2))
    if c_sp.max() > 0:
        c_sp /= c_sp.max()
    plan = usot(a, b, cost, c_sc, c_sp, alpha=alpha, epsilon=epsilon, kappa=kappa, n_outer=n_outer)
    return assignment_from_plan(plan, top_k)
