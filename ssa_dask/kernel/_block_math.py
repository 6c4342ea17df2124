"""The per-block maths of the kernel: what one task does to one row block, wherever it lives.

Every function takes a block handle (a NumPy array, a :class:`~ssa_dask.kernel.precision.HalfRows`
of float16/bfloat16 rows with their scales, or anything with a ``load()`` method such as a
:class:`~ssa_dask.kernel.store.StoredBlock`, resolved by :func:`load_block`) and returns a small
array: a spot-length partial sum, per-row top-k entries, statistics.  :class:`~ssa_dask.kernel.Kernel`
schedules them; the Numba sweeps are in :mod:`ssa_dask.kernel._sweeps`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ssa_dask.kernel import _sweeps
from ssa_dask.kernel.precision import HalfRows


def load_block(block: Any) -> np.ndarray:
    """The rows of a block handle: the array itself, or what its ``load()`` returns."""
    load = getattr(block, "load", None)
    return load() if callable(load) else block


def log_sum_exp(parts: list[np.ndarray]) -> np.ndarray:
    """``log sum_k exp(parts[k])`` elementwise; non-finite inputs give non-finite outputs, silently."""
    with np.errstate(invalid="ignore"):
        return np.logaddexp.reduce(np.asarray(parts), axis=0)


#: How :meth:`~ssa_dask.kernel.Kernel.map_blocks` combines per-block arrays: a plain sum, or a log-sum-exp of logs.
REDUCTIONS: dict[str, Callable[[list[np.ndarray]], np.ndarray]] = {
    "sum": lambda parts: np.sum(parts, axis=0),
    "logsumexp": log_sum_exp,
}


def kernel_rows(values: np.ndarray | HalfRows) -> tuple[np.ndarray, np.ndarray]:
    """Float32 kernel rows of a loaded block and their log scales: ``K_ij = rows_ij exp(log_scale_i)``.

    A float32 block is its own rows (scales 0); 16-bit rows are decoded.
    """
    if isinstance(values, HalfRows):
        return values.scaled_rows(), values.log_scale
    return values, np.zeros(values.shape[0])


def gibbs(block: Any, eps: float, log_domain: bool) -> np.ndarray:
    """The block as float64 kernel values (``exp(-D/eps)`` of a cost block in the log domain)."""
    values = load_block(block)
    if log_domain:
        return np.exp(-np.asarray(values, np.float64) / eps)
    rows, log_scale = kernel_rows(values)
    return np.asarray(rows, np.float64) * np.exp(log_scale)[:, None]


def apply_rows(block: Any, v: np.ndarray, eps: float, log_domain: bool) -> np.ndarray:
    """``K_I v`` for the block's rows ``I``."""
    return gibbs(block, eps, log_domain) @ v


def apply_columns(block: Any, v: np.ndarray, eps: float, log_domain: bool) -> np.ndarray:
    """``K_I^T v_I``: the block's share of ``K^T v``."""
    return gibbs(block, eps, log_domain).T @ v


def scaling(g: np.ndarray, eps: float) -> np.ndarray:
    """``b = exp((g - max g)/eps)``: the column scaling up to a constant factor (which cancels)."""
    return np.exp((g - g.max()) / eps)


def column_marginal_block(block: Any, p: np.ndarray, g: np.ndarray, eps: float, log_domain: bool) -> np.ndarray:
    """The block's share of the plan's column marginal; its log in the log domain."""
    values = load_block(block)
    out = np.zeros(values.shape[1], dtype=np.float64)
    rows = np.ascontiguousarray(p, dtype=np.float64)
    if log_domain:
        _sweeps.log_sweep(values, rows, g, eps, out)
    elif isinstance(values, HalfRows):  # the row scales cancel in the marginal
        _sweeps.kernel_sweep(values.bits, rows, scaling(g, eps).astype(np.float32), out, values.bfloat16)
    else:
        _sweeps.kernel_sweep(values, rows, scaling(g, eps).astype(np.float32), out)
    return out


def top_k_block(block: Any, p: np.ndarray, g: np.ndarray, eps: float, log_domain: bool, k: int) -> np.ndarray:
    """Top-k columns of each row of the plan, their row-normalised weights, and the row potential.

    Row ``i`` of the plan is proportional to ``K_ij b_j``.  In the kernel domain the scores stay
    float32 like the kernel (row sums in float64); the log domain works in float64, where the
    scores span a range float32 cannot resolve: each row is shifted by its maximum (so its sum is
    at least 1 and ``f`` is finite at any eps) and ranked by its log scores, which keep their order
    where the scores themselves underflow to 0.  A row scale of 16-bit rows enters only ``f``.
    """
    values = load_block(block)
    if log_domain:
        log_score = (g[None, :] - np.asarray(values, np.float64)) / eps
        shift = log_score.max(axis=1, keepdims=True)
        rank = log_score - shift
        score = np.exp(rank)
        log_offset = shift[:, 0]
    else:
        rows, log_scale = kernel_rows(values)
        score = rows * scaling(g, eps).astype(np.float32)[None, :]
        rank = score
        log_offset = g.max() / eps + log_scale
    row_sum = score.sum(axis=1, dtype=np.float64)
    top = top_k_columns(rank, k)
    probability = np.take_along_axis(score, top, axis=1).astype(np.float64) / row_sum[:, None]
    f = eps * (np.log(p) - np.log(row_sum) - log_offset)
    return np.concatenate([top.astype(np.float64), probability, f[:, None]], axis=1)


def top_k_columns(rank: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` largest entries of each row of ``rank``, largest first (ties in column order)."""
    if k == 1:
        return rank.argmax(axis=1)[:, None]
    if k < rank.shape[1]:
        top = np.argpartition(-rank, k - 1, axis=1)[:, :k]
    else:
        top = np.tile(np.arange(rank.shape[1]), (rank.shape[0], 1))
    order = np.argsort(-np.take_along_axis(rank, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def block_stats(block: Any) -> np.ndarray:
    """Largest finite cost, number of NaN rows (constant cells) and the first such row of a block."""
    values = load_block(block)
    nan_rows = np.flatnonzero(np.isnan(values).any(axis=1))
    finite_max = np.nanmax(values) if nan_rows.size < values.shape[0] else -np.inf
    return np.array([finite_max, nan_rows.size, nan_rows[0] if nan_rows.size else -1], dtype=np.float64)


def to_kernel(cost: np.ndarray, eps: float) -> np.ndarray:
    """``exp(-D/eps)`` in place, float32."""
    np.multiply(cost, np.float32(-1.0 / eps), out=cost)
    return np.exp(cost, out=cost)


def cost_to_kernel(cost: np.ndarray, eps: float) -> np.ndarray:
    """``exp(-D/eps)`` of a copy (the cost block stays as it is)."""
    return to_kernel(cost.copy(), eps)


