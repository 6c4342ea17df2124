"""A small dense NumPy reference of the whole SSA method, for tests and for checking results.

Everything is float64 and in memory; it follows the method step by step with no blocking, no
Dask and no compiled kernels, so the distributed path can be compared with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class DenseSSA:
    """Everything the dense reference computes.

    Attributes
    ----------
    genes : (n_genes,) int array
        Selected gene columns (into the shared-gene matrices passed in).
    cost : (n, S) array
        ``D = 1 - |rho|``.
    eps : float
        ``lam * max D`` (or the given eps).
    a, b : arrays
        Sinkhorn scalings; the plan is ``diag(a) K diag(b)``.
    plan : (n, S) array
        Transport plan.
    spot : (n,) int array
        Row argmax of the plan.
    probability : (n,) array
        Row-normalised plan at ``spot``.
    n_iter : int
        Iterations until ``||T^T 1 - q||_1 < tol``.
    """

    genes: np.ndarray
    cost: np.ndarray
    eps: float
    a: np.ndarray
    b: np.ndarray
    plan: np.ndarray
    spot: np.ndarray
    probability: np.ndarray
    n_iter: int


def pearson_cost(sc: np.ndarray, spots: np.ndarray) -> np.ndarray:
    """``1 - |rho|`` between rows of per-gene z-scored ``sc`` and ``spots`` (same gene columns)."""
    zc = (sc - sc.mean(0)) / sc.std(0)
    zs = (spots - spots.mean(0)) / spots.std(0)
    rho = np.corrcoef(zc, zs)[: len(zc), len(zc):]
    return 1.0 - np.abs(rho)


def sinkhorn_dense(K: np.ndarray, p: np.ndarray, q: np.ndarray, *, tol: float = 1e-9, max_iter: int = 10000
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """Textbook Sinkhorn: from ``b = 1``, repeat ``a = p / K b``, ``b = q / K^T a`` until the marginals match.

    Returns ``a``, ``b`` and the number of iterations (each a pair of updates).
    """
    b = np.ones(K.shape[1])
    for iteration in range(1, max_iter + 1):
        a = p / (K @ b)
        column = b * (K.T @ a)
        b = q / (K.T @ a)
        if np.abs(column - q).sum() < tol:
            return a, b, iteration
    return a, b, max_iter


def ssa_dense(sc: np.ndarray, spots: np.ndarray, *, n_genes: int = 5000, lam: float = 0.05, eps: float | None = None,
              marginals: str = "total", tol: float = 1e-9, max_iter: int = 10000) -> DenseSSA:
    """The SSA method on dense in-memory matrices over the same genes (columns).

    Parameters
    ----------
    sc : (n, G) array
        Cells over the shared genes.
    spots : (S, G) array
        Spots over the same genes, same column order.
    n_genes : int
        Top-variance genes of ``sc`` to keep (genes constant in either matrix are then dropped).
    lam, eps : float
        ``eps = lam * max D`` unless ``eps`` is given.
    marginals : {"total", "uniform"}
        Per-row totals (normalised) or uniform masses.
    tol, max_iter
        Sinkhorn stopping rule on the column-marginal L1 error.
    """
    sc = np.asarray(sc, dtype=np.float64)
    spots = np.asarray(spots, dtype=np.float64)
    order = np.argsort(-sc.var(0), kind="stable")[:n_genes]
    keep = order[(sc[:, order].var(0) > 0) & (spots[:, order].var(0) > 0)]
    cost = pearson_cost(sc[:, keep], spots[:, keep])
    eps = float(lam * cost.max()) if eps is None else float(eps)
    if marginals == "uniform":
        p, q = np.full(len(sc), 1 / len(sc)), np.full(len(spots), 1 / len(spots))
    else:
        p, q = sc.sum(1) / sc.sum(), spots.sum(1) / spots.sum()
    K = np.exp(-cost / eps)
    a, b, n_iter = sinkhorn_dense(K, p, q, tol=tol, max_iter=max_iter)
    plan = a[:, None] * K * b[None, :]
    spot = plan.argmax(1)
    probability = plan[np.arange(len(plan)), spot] / plan.sum(1)
    return DenseSSA(genes=keep, cost=cost, eps=eps, a=a, b=b, plan=plan, spot=spot, probability=probability, n_iter=n_iter)
