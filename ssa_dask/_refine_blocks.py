"""What one task of the refined mode does to one row block of the kernel (see :mod:`ssa_dask.refine`).

Each function takes a kernel block handle (resolved by :func:`~ssa_dask.kernel._block_math.load_block`)
and the block's cells over the selected genes as read (dense or CSR; sparse stays sparse), and
works in float64; updated blocks are stored back as float32 like the kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from ssa_dask.kernel._block_math import load_block, scaling
from ssa_dask.cost import DENSIFY_ABOVE_DENSITY
from ssa_dask.kernel.store import StoredBlock


def plan_rows(block: Any, p: np.ndarray, g: np.ndarray, eps: float, log_domain: bool) -> np.ndarray:
    """The block's rows of the plan after the row update, float64: ``T_ij = p_i w_ij / sum_l w_il``.

    ``w_ij = K_ij exp(g_j/eps)`` up to a per-row factor: in the log domain each row of
    ``(g - D)/eps`` is shifted by its maximum first, so no exponential overflows.
    """
    values = np.asarray(load_block(block), dtype=np.float64)
    if log_domain:
        weight = (g[None, :] - values) / eps
        weight -= weight.max(axis=1, keepdims=True)
        np.exp(weight, out=weight)
    else:
        weight = values * scaling(g, eps)[None, :]
    weight *= (np.asarray(p, np.float64) / weight.sum(axis=1))[:, None]
    return weight


def _operand(X: Any) -> Any:
    """A block of cells as a float32 matrix product operand: CSR while sparse enough, else dense (BLAS wins).

    The same rule and precision as the cost's products (:data:`ssa_dask.cost.DENSIFY_ABOVE_DENSITY`,
    SGEMM, twice DGEMM's speed); one block at a time.
    """
    if sp.issparse(X) and X.nnz <= DENSIFY_ABOVE_DENSITY * X.shape[0] * X.shape[1]:
        return sp.csr_matrix(X, dtype=np.float32)
    return X.toarray().astype(np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32)


def _transpose_times(X: Any, T: np.ndarray) -> np.ndarray:
    """``T^T X``, ``(m, G)``, float64 (from a float32 product)."""
    X = _operand(X)
    T = T.astype(np.float32)
    if sp.issparse(X):
        return np.asarray((X.T @ T).T, dtype=np.float64)
    return (T.T @ X).astype(np.float64)


def plan_moments(block: Any, X: Any, p: np.ndarray, g: np.ndarray, eps: float, log_domain: bool) -> np.ndarray:
    """The block's share of ``[T^T 1 | T^T X]``, ``(m, 1 + G)``: pass A of a refine step."""
    T = plan_rows(block, p, g, eps, log_domain)
    return np.concatenate([T.sum(axis=0)[:, None], _transpose_times(X, T)], axis=1)


def take_rows(X: Any, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` of a cell block as a dense float64 array."""
    part = X[rows]
    return part.toarray().astype(np.float64) if sp.issparse(part) else np.asarray(part, dtype=np.float64)


def cost_increment(X: Any, B: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``X B^T - 1 b^T``: the change of the block's cost, ``(rows, m)`` float64 (one GEMM)."""
    product = np.asarray(_operand(X) @ B.T.astype(np.float32), dtype=np.float64)
    product -= b[None, :]
    return product


def updated_block(block: Any, X: Any, B: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """A cost block after the change ``X B^T - 1 b^T`` (log domain): ``D + change``, float32."""
    values = np.asarray(load_block(block), dtype=np.float64)
    values += cost_increment(X, B, b)
    return values.astype(np.float32)


def absorbed_block(block: Any, X: Any, p: np.ndarray, g: np.ndarray, B: np.ndarray, b: np.ndarray,
                   eps: float) -> tuple[np.ndarray, np.ndarray]:
    """A kernel block after the cost change, with the potentials absorbed (kernel domain).

    With the block holding ``K_ij = exp((F_i + G_j - C_ij)/eps)`` and the current column potential
    ``g``, returns ``exp((F_i + f_i + G_j + g_j - C_ij - change_ij)/eps)`` in float32, whose rows sum
    to ``p``, and the row potential ``f`` that made them so: the new kernel is the plan of the
    changed cost after one row update, so its entries stay within ``[0, p_i]`` however far the
    changes add up over the steps (Schmitzer's absorption), where ``K exp(-change/eps)`` would
    leave float32's range.  The caller adds ``g`` to ``G`` and ``f`` to ``F``.
    """
    exponent = np.asarray(load_block(block), dtype=np.float64)
    with np.errstate(divide="ignore"):  # an entry that underflowed to 0 stays 0
        np.log(exponent, out=exponent)
    exponent += (g / eps)[None, :] - cost_increment(X, B, b) / eps
    shift = exponent.max(axis=1)
    exponent -= shift[:, None]
    np.exp(exponent, out=exponent)
    log_row = shift + np.log(exponent.sum(axis=1))
    p = np.asarray(p, np.float64)
    exponent *= (p / exponent.sum(axis=1))[:, None]
    return exponent.astype(np.float32), eps * (np.log(p) - log_row)


def refined_block(block: Any, X: Any, p: np.ndarray, *, g: np.ndarray, B: np.ndarray, b: np.ndarray, eps: float,
                  log_domain: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The block after the cost change, and the row potential it absorbed: :func:`absorbed_block`
    in the kernel domain, :func:`updated_block` (and None) in the log domain."""
    if log_domain:
        return updated_block(block, X, B, b, eps), None
    return absorbed_block(block, X, p, g, B, b, eps)


def update_in_place(block: np.ndarray, X: Any, p: np.ndarray, **options: Any) -> np.ndarray | None:
    """:func:`refined_block` written over the block's own array (local memory storage); the absorbed ``f`` or None."""
    block[...], f = refined_block(block, X, p, **options)
    return f


def rewrite_stored(source: StoredBlock, X: Any, p: np.ndarray, target: StoredBlock, **options: Any) -> np.ndarray | None:
    """:func:`refined_block` of a stored chunk, written atomically to its chunk of another array; ``f`` or None.

    The source is never modified, so a retried task reads the same input and writes the same bytes.
    """
    values, f = refined_block(source, X, p, **options)
    target.write(values)
    return f
