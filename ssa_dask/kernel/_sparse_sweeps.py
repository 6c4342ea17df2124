"""Compiled loops of the sparse-plus-far-field kernel: the Sinkhorn sweep and two steps of its build.

A row block holds, for each of its ``n`` cells, ``k`` kernel values ``K_il`` and the spots
``j_il`` they belong to (an ELLPACK layout: every row has the same length, so no row pointer), and
one far-field value ``kappa_i`` that stands for every spot off the row's support:
``K~_ij = K_il`` where ``j = j_il``, ``kappa_i`` elsewhere.  Like
:func:`ssa_dask.kernel._sweeps.kernel_sweep`, one sweep updates the row scaling of every row,

    a_i = p_i / (sum_l (K_il - kappa_i) b_{j_il} + kappa_i sum_j b_j),

and adds the block's share of the plan's column marginal,
``out_j += b_j (sum_{i,l: j_il = j} a_i (K_il - kappa_i) + sum_i a_i kappa_i)``, reading the block once.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
def sparse_kernel_sweep(packed: np.ndarray, bits: np.ndarray, p: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """Add ``b * (K~^T (p / (K~ b)))`` of one block to ``out`` (kernel domain).

    Parameters
    ----------
    packed : (n, 2k + 1) float32 array
        ``[:, :k]`` kernel values ``exp(-D / eps)`` of each row's support (``kappa_i`` for padding),
        ``[:, -1]`` the far-field value ``kappa_i`` of each row (0: the plan is zero off the support).
    bits : (n, 2k + 1) int32 array
        The same memory as int32: ``[:, k:2k]`` the spot of each entry.
    p : (n,) float64 array
        Row masses of the block.
    b : (S,) float64 array
        Column scaling ``exp(g / eps)`` (up to a constant factor).
    out : (S,) float64 array
        Accumulator of the plan's column marginal; updated in place.
    """
    n = packed.shape[0]
    k = packed.shape[1] // 2
    s = out.shape[0]
    total_b = 0.0
    for j in range(s):
        total_b += b[j]
    acc = np.zeros(s, dtype=np.float64)
    far_total = 0.0
    for i in range(n):
        kappa = np.float64(packed[i, 2 * k])
        row = kappa * total_b
        for l in range(k):
            row += (packed[i, l] - kappa) * b[bits[i, k + l]]
        a = p[i] / row
        far_total += a * kappa
        for l in range(k):
            acc[bits[i, k + l]] += a * (packed[i, l] - kappa)
    for j in range(s):
        out[j] += (acc[j] + far_total) * b[j]


@numba.njit(nogil=True, cache=True)
def scatter_candidates(similarity: np.ndarray, spots: np.ndarray, rows: np.ndarray, starts: np.ndarray,
                       values: np.ndarray, members: np.ndarray) -> None:
    """Write one cluster's exact ``|rho|`` into the candidate buffers of the cells that probe it.

    Row ``rows[r]`` receives ``values[r, :]`` and ``members`` at columns ``starts[r]:starts[r] + members.size``.
    """
    for r in range(rows.size):
        i = rows[r]
        offset = starts[r]
        for t in range(members.size):
            similarity[i, offset + t] = values[r, t]
            spots[i, offset + t] = members[t]


@numba.njit(nogil=True, cache=True)
def off_support(support: np.ndarray, drawn: np.ndarray, n_spots: int) -> np.ndarray:
    """Whether each drawn spot ``drawn[i, t]`` is off row ``i``'s support ``support[i, :]``."""
    n, k = support.shape
    marked = np.zeros(n_spots, dtype=np.bool_)
    out = np.empty(drawn.shape, dtype=np.bool_)
    for i in range(n):
        for l in range(k):
            marked[support[i, l]] = True
        for t in range(drawn.shape[1]):
            out[i, t] = not marked[drawn[i, t]]
        for l in range(k):
            marked[support[i, l]] = False
    return out


@numba.njit(nogil=True, cache=True)
def keep_largest(similarity: np.ndarray, spots: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest entries of each row of ``similarity`` and their ``spots`` (in no particular order).

    A selection per row (``np.partition`` of a copy), then one pass that keeps the entries above the
    ``k``-th largest and as many equal to it as fit.
    """
    n, width = similarity.shape
    values = np.empty((n, k), dtype=similarity.dtype)
    kept = np.empty((n, k), dtype=spots.dtype)
    for i in range(n):
        threshold = np.partition(similarity[i].copy(), width - k)[width - k]
        m = 0
        for t in range(width):
            if similarity[i, t] > threshold:
                values[i, m] = similarity[i, t]
                kept[i, m] = spots[i, t]
                m += 1
        for t in range(width):
            if m == k:
                break
            if similarity[i, t] == threshold:
                values[i, m] = similarity[i, t]
                kept[i, m] = spots[i, t]
                m += 1
    return values, kept
