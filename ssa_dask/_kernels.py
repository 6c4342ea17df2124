"""Compiled per-block Sinkhorn sweeps (Numba): one read of a kernel block per iteration.

For a row block ``K_I`` of the kernel (or ``D_I`` of the cost in the log domain), the column
potential ``g`` (``b = exp(g / eps)``) and the row masses ``p_I``, each sweep

1. updates the row scaling of every row ``i`` of the block,
   ``a_i = p_i / sum_j K_ij b_j``  (log domain: ``f_i = eps log p_i - eps LSE_j((g_j - D_ij)/eps)``),
2. adds the block's share of the column marginal of the plan ``T = diag(a) K diag(b)``,
   ``out_j += a_i K_ij b_j`` (the log domain returns ``log sum_i T_ij`` instead, exact at any eps),

row by row, so the row is still in cache for step 2 and the block is read from memory once.
The functions release the GIL, so Dask threads run blocks in parallel.
"""

from __future__ import annotations

import numba
import numpy as np


#: Rows whose contributions are summed in float32 before they join the float64 accumulator.
_FLUSH_ROWS = 64


@numba.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
def kernel_sweep(K: np.ndarray, p: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """Add ``b * (K^T (p / (K b)))`` of one block to ``out`` (kernel domain).

    Rows are taken four at a time: one pass over ``b`` gives four row sums, and one pass over the
    float32 partial column sums adds four rows, so each element of ``K`` is loaded from memory
    once and the partial sums are loaded and stored once per four rows.  Row sums and up to
    ``_FLUSH_ROWS`` rows of contributions are accumulated in float32 (twice the vector width of
    float64), then flushed into a float64 accumulator, so the column marginal keeps float64
    accuracy over millions of rows.

    Parameters
    ----------
    K : (n, S) float32 array
        Kernel block ``exp(-D / eps)``.
    p : (n,) float64 array
        Row masses of the block.
    b : (S,) float32 array
        Column scaling ``exp(g / eps)``.
    out : (S,) float64 array
        Accumulator of the plan's column marginal; updated in place.
    """
    n, s = K.shape
    acc = np.zeros(s, dtype=np.float64)
    partial = np.zeros(s, dtype=np.float32)
    i = 0
    pending = 0
    while i < n:
        if i + 4 <= n:
            r0 = np.float32(0.0)
            r1 = np.float32(0.0)
            r2 = np.float32(0.0)
            r3 = np.float32(0.0)
            for j in range(s):
                bj = b[j]
                r0 += K[i, j] * bj
                r1 += K[i + 1, j] * bj
                r2 += K[i + 2, j] * bj
                r3 += K[i + 3, j] * bj
            a0 = np.float32(p[i] / np.float64(r0))
            a1 = np.float32(p[i + 1] / np.float64(r1))
            a2 = np.float32(p[i + 2] / np.float64(r2))
            a3 = np.float32(p[i + 3] / np.float64(r3))
            for j in range(s):
                partial[j] += a0 * K[i, j] + a1 * K[i + 1, j] + a2 * K[i + 2, j] + a3 * K[i + 3, j]
            i += 4
            pending += 4
        else:
            r0 = np.float32(0.0)
            for j in range(s):
                r0 += K[i, j] * b[j]
            a0 = np.float32(p[i] / np.float64(r0))
            for j in range(s):
                partial[j] += a0 * K[i, j]
            i += 1
            pending += 1
        if pending >= _FLUSH_ROWS or i >= n:
            for j in range(s):
                acc[j] += partial[j]
                partial[j] = 0.0
            pending = 0
    for j in range(s):
        out[j] += acc[j] * b[j]


#: Fast-math flags of the log-domain sweep: those of ``fastmath=True`` except "no NaN / no inf", so
#: ``-inf`` and ``exp`` underflow keep their IEEE meaning.
_LOG_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
#: A block's column sum accumulated in the linear domain is used when it is at least ``exp(-600)``:
#: every term lost to underflow is below 1e-323, so the sum is then exact to ``n_rows * 1e-62``
#: (relative).  Smaller sums are recomputed as a log-sum-exp over the block.
_LINEAR_FLOOR = float(np.exp(-600.0))


@numba.njit(nogil=True, fastmath=_LOG_FASTMATH, cache=True, error_model="numpy")
def log_sweep(D: np.ndarray, p: np.ndarray, g: np.ndarray, eps: float, out: np.ndarray) -> None:
    """Write the log of the plan's column marginal of one block to ``out`` (log domain, stabilised).

    Row ``i`` of the plan after its row update is ``T_ij = p_i exp(t_ij - m_i) / s_i`` with
    ``t_ij = (g_j - D_ij)/eps``, ``m_i = max_l t_il`` and ``s_i = sum_l exp(t_il - m_i)``, so no
    exponential overflows and every row sums to ``p_i``; ``log T_ij = r_i + t_ij`` with
    ``r_i = log(p_i / s_i) - m_i``.

    The block's column sums ``sum_i T_ij`` are first accumulated in float64 in the same pass (one
    ``exp`` per entry).  A column whose sum is at least ``_LINEAR_FLOOR`` is exact; any other
    column (all of its entries in this block tiny: eps very small, far from every cell of the
    block) is recomputed as ``log sum_i exp(r_i + t_ij)`` with its column maximum taken first,
    so its log marginal is exact at any eps, however far below float64's range it lies.

    Parameters
    ----------
    D : (n, S) float32 array
        Cost block.
    p : (n,) float64 array
        Row masses of the block (positive).
    g : (S,) float64 array
        Column potential.
    eps : float
        Entropic regularisation.
    out : (S,) float64 array
        Receives ``log sum_i T_ij`` of the block.
    """
    n, s = D.shape
    inv_eps = 1.0 / eps
    buf = np.empty(s, dtype=np.float64)
    linear = np.zeros(s, dtype=np.float64)
    row_offset = np.empty(n, dtype=np.float64)
    for i in range(n):
        m = (g[0] - D[i, 0]) * inv_eps
        for j in range(s):
            t = (g[j] - D[i, j]) * inv_eps
            buf[j] = t
            m = max(m, t)
        total = 0.0
        for j in range(s):
            e = np.exp(buf[j] - m)
            buf[j] = e
            total += e
        c = p[i] / total
        row_offset[i] = np.log(c) - m
        for j in range(s):
            linear[j] += c * buf[j]
    n_starved = 0
    for j in range(s):
        if linear[j] >= _LINEAR_FLOOR:
            out[j] = np.log(linear[j])
        else:
            n_starved += 1
    if n_starved:
        starved = np.empty(n_starved, dtype=np.int64)
        k = 0
        for j in range(s):
            if linear[j] < _LINEAR_FLOOR:
                starved[k] = j
                k += 1
        _log_sum_columns(D, g, inv_eps, row_offset, starved, out)


@numba.njit(nogil=True, fastmath=_LOG_FASTMATH, cache=True, error_model="numpy")
def _log_sum_columns(D: np.ndarray, g: np.ndarray, inv_eps: float, row_offset: np.ndarray, columns: np.ndarray,
                     out: np.ndarray) -> None:
    """``out[j] = log sum_i exp(row_offset_i + (g_j - D_ij)/eps)`` for ``j`` in ``columns``: max first, then the sum."""
    n = D.shape[0]
    k = columns.size
    top = np.empty(k, dtype=np.float64)
    for c in range(k):
        j = columns[c]
        top[c] = row_offset[0] + (g[j] - D[0, j]) * inv_eps
    for i in range(1, n):
        for c in range(k):
            j = columns[c]
            top[c] = max(top[c], row_offset[i] + (g[j] - D[i, j]) * inv_eps)
    acc = np.zeros(k, dtype=np.float64)
    for i in range(n):
        for c in range(k):
            j = columns[c]
            acc[c] += np.exp(row_offset[i] + (g[j] - D[i, j]) * inv_eps - top[c])
    for c in range(k):
        out[columns[c]] = top[c] + np.log(acc[c])
