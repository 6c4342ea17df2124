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


# ---------------------------------------------------------------------- the refined mode

#: Representations of the cells and spots the refined mode compares (see :func:`feature_scaling`).
FEATURES = ("zscore", "input")
#: Rows of the fixed sample over which the step scale ``M = max |G_ij|`` is taken.
STEP_SCALE_ROWS = 4096


def feature_scaling(mean: np.ndarray, std: np.ndarray, features: str) -> tuple[np.ndarray, np.ndarray]:
    """The per-gene affine map ``x -> x * scale - shift`` giving the representation the refine compares.

    Parameters
    ----------
    mean, std : (G,) arrays
        Per-gene mean and population standard deviation of the rows (cells, or spots).
    features : {"zscore", "input"}
        ``"zscore"``: per-gene z-scored values, as the cost uses them (``scale = 1/std``,
        ``shift = mean/std``); ``"input"``: the values as given (``scale = 1``, ``shift = 0``).

    Returns
    -------
    scale, shift : (G,) float64 arrays
    """
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    if features == "zscore":
        return 1.0 / std, mean / std
    if features == "input":
        return np.ones_like(mean), np.zeros_like(mean)
    raise ValueError(f"features must be one of {FEATURES}, got {features!r}")


def step_scale_rows(n_cells: int) -> np.ndarray:
    """Rows of the fixed sample for the step scale: all rows up to ``STEP_SCALE_ROWS``, else that many evenly spaced."""
    if n_cells <= STEP_SCALE_ROWS:
        return np.arange(n_cells)
    return np.linspace(0, n_cells - 1, STEP_SCALE_ROWS).astype(np.int64)


def _cosines(P: np.ndarray, S: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosines between matching columns (``axis=0``) or rows (``axis=1``) of ``P`` and ``S``, and their
    gradient with respect to ``P`` (``d cos(u, v)/du = v/(|u||v|) - (u.v) u/(|u|^3 |v|)``)."""
    tiny = np.finfo(np.float64).tiny
    nu = np.maximum(np.linalg.norm(P, axis=axis, keepdims=True), tiny)
    nv = np.maximum(np.linalg.norm(S, axis=axis, keepdims=True), tiny)
    dot = (P * S).sum(axis=axis, keepdims=True)
    cos = dot / (nu * nv)
    grad = S / (nu * nv) - dot * P / (nu**3 * nv)
    return np.squeeze(cos, axis=axis), grad


def cosine_objective(P: np.ndarray, S: np.ndarray) -> tuple[float, np.ndarray]:
    """The refine objective ``O = mean_g cos(P[:, g], S[:, g]) + mean_j cos(P[j], S[j])`` and ``dO/dP``.

    Parameters
    ----------
    P : (m, G) array
        Expression the plan predicts for each spot, ``diag(1/s) T^T X``.
    S : (m, G) array
        The spots' expression, same genes and representation.
    """
    gene_cos, gene_grad = _cosines(P, S, axis=0)
    spot_cos, spot_grad = _cosines(P, S, axis=1)
    value = float(gene_cos.mean() + spot_cos.mean())
    return value, gene_grad / P.shape[1] + spot_grad / P.shape[0]


def gene_cosine(P: np.ndarray, S: np.ndarray) -> float:
    """``mean_g cos(P[:, g], S[:, g])``: how well the plan's spot profiles match the spots, gene by gene."""
    return float(_cosines(P, S, axis=0)[0].mean())


def refine_direction(TX: np.ndarray, s: np.ndarray, S: np.ndarray, train: np.ndarray
                     ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Objective and the gradient's factors from the column sums of the plan and ``T^T X``.

    The gradient of the loss ``L = -O`` with respect to the plan is ``G_ij = X_i . W_j - c_j``.

    Parameters
    ----------
    TX : (m, G) array
        ``T^T X`` in the representation compared.
    s : (m,) array
        ``T^T 1``.
    S : (m, G) array
        Spots, same representation.
    train : (G,) bool array
        Genes in the objective (the others are held out).

    Returns
    -------
    objective : float
        ``O`` over the training genes.
    P : (m, G) array
        ``diag(1/s) T^T X`` over every gene.
    W : (m, G) array
        ``-diag(1/s) dO/dP`` (zero on held-out genes).
    c : (m,) array
        ``c_j = sum_g W_jg P_jg``.
    """
    P = TX / s[:, None]
    objective, grad = cosine_objective(P[:, train], S[:, train])
    W = np.zeros_like(P)
    W[:, train] = -grad / s[:, None]
    return objective, P, W, (W * P).sum(axis=1)


def held_out_genes(n_genes: int, fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """A fixed random ``fraction`` of the genes (at least one), left out of the objective by ``refine="auto"``."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_genes, size=max(1, int(round(fraction * n_genes))), replace=False))


def stalled(scores: list[float], patience: int) -> bool:
    """Whether the last ``patience`` scores did not rise above the best before them."""
    return len(scores) - 1 - int(np.argmax(scores)) >= patience


@dataclass
class DenseRefine:
    """Everything :func:`refine_dense` computes.

    Attributes
    ----------
    cost : (n, S) array
        The refined cost ``C_N = D + X A^T - 1 a^T``.
    g : (S,) array
        Column potential after the last step.
    plan : (n, S) array
        ``T = exp((f + g - C_N)/eps)`` with ``f`` from the row update (rows sum to ``p``).
    spot : (n,) int array
        Row argmax of the plan.
    objective : (steps + 1,) array
        ``O`` of the plan before each step and after the last one.
    held_out : (steps + 1,) array or None
        Gene-wise cosine over the held-out genes, at the same points.
    A : (S, G) array
        Accumulated spot-by-gene correction, over the genes' **input values** ``X``.
    a : (S,) array
        Accumulated column offset, so that ``C_N = D + X A^T - 1 a^T``.
    steps : int
        Steps done.
    """

    cost: np.ndarray
    g: np.ndarray
    plan: np.ndarray
    spot: np.ndarray
    objective: np.ndarray
    held_out: np.ndarray | None
    A: np.ndarray
    a: np.ndarray
    steps: int


def _lse(values: np.ndarray, axis: int) -> np.ndarray:
    top = values.max(axis=axis, keepdims=True)
    return np.squeeze(top, axis=axis) + np.log(np.exp(values - top).sum(axis=axis))


def _row_potential(cost: np.ndarray, p: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    return eps * (np.log(p) - _lse((g[None, :] - cost) / eps, axis=1))


def refine_dense(cost: np.ndarray, p: np.ndarray, q: np.ndarray, eps: float, X: np.ndarray, S: np.ndarray, g: np.ndarray,
                 *, steps: int = 30, eta: float = 5.0, inner: int = 20, tol: float = 1e-6, tau: float = 0.0,
                 features: str = "input", held_out: np.ndarray | None = None, patience: int | None = None
                 ) -> DenseRefine:
    """The refined mode, densely in float64: ``steps`` mirror-descent steps on the cost, each followed
    by ``inner`` warm-started Sinkhorn iterations (``refine_maths``).

    Parameters
    ----------
    cost : (n, S) array
        The SSA cost ``D``.
    p, q : arrays
        Marginals.
    eps : float
        Entropic regularisation.
    X : (n, G) array
        Cells over the selected genes (input values).
    S : (S, G) array
        Spots over the same genes (input values).
    g : (S,) array
        Column potential of the SSA solution (e.g. ``eps * log(DenseSSA.b)``).
    steps, eta, inner, tol
        Number of steps (the cap with ``patience``), step size, Sinkhorn iterations per step and
        their stopping tolerance.
    tau : float
        Trust region: ``C <- C - tau (C - D)`` before each update.
    features : {"zscore", "input"}
        Representation compared (:func:`feature_scaling`, statistics of ``X`` and ``S``).
    held_out : int array, optional
        Genes left out of the objective; their gene-wise cosine is recorded.
    patience : int, optional
        Stop when the held-out cosine has not risen for this many steps.
    """
    D = np.asarray(cost, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    S = np.asarray(S, dtype=np.float64)
    cell_scale, cell_shift = feature_scaling(X.mean(0), X.std(0), features)
    spot_scale, spot_shift = feature_scaling(S.mean(0), S.std(0), features)
    Z, Zs = X * cell_scale - cell_shift, S * spot_scale - spot_shift
    train = np.ones(X.shape[1], dtype=bool)
    if held_out is not None:
        train[held_out] = False
    rows = step_scale_rows(len(D))
    C, g = D.copy(), np.asarray(g, dtype=np.float64).copy()
    A, a = np.zeros_like(Zs), np.zeros(len(Zs))
    objective: list[float] = []
    held: list[float] = []
    done = 0
    while True:
        T = np.exp((_row_potential(C, p, g, eps)[:, None] + g[None, :] - C) / eps)
        value, P, W, c = refine_direction(T.T @ Z, T.sum(0), Zs, train)
        objective.append(value)
        if held_out is not None:
            held.append(gene_cosine(P[:, ~train], Zs[:, ~train]))
        if done == steps or (patience is not None and stalled(held, patience)):
            break
        gradient = Z @ W.T - c[None, :]
        scale = eta * eps / np.abs(gradient[rows]).max()
        C = C - tau * (C - D) + scale * gradient
        A, a = (1 - tau) * A + scale * W, (1 - tau) * a + scale * c
        for _ in range(inner):
            log_column = _lse((_row_potential(C, p, g, eps)[:, None] + g[None, :] - C) / eps, axis=0)
            error = np.abs(np.exp(log_column) - q).sum()
            g = g + eps * (np.log(q) - log_column)
            if error < tol:
                break
        done += 1
    plan = np.exp((_row_potential(C, p, g, eps)[:, None] + g[None, :] - C) / eps)
    return DenseRefine(cost=C, g=g, plan=plan, spot=plan.argmax(1), objective=np.asarray(objective),
                       held_out=np.asarray(held) if held_out is not None else None,
                       A=A * cell_scale, a=a + A @ cell_shift, steps=done)
