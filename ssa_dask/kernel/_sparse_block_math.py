"""Per-block maths of a sparse kernel (fixed entries per row): what one task does to one row block.

A sparse row block is one ``(n, 2k + 1)`` float32 array: columns ``[:k]`` hold each row's kernel
values ``K_il = exp(-D_il / eps)`` on its support, columns ``[k:2k]`` the int32 bits of their spot
indices, the last column the row's far-field value ``kappa_i``, the kernel's value at every spot off
the support (0 for a plain truncation; padding entries hold ``kappa_i``, so they add nothing)
(:func:`pack_block`, :func:`unpack_block`, :mod:`ssa_dask.kernel._sparse_sweeps`).  One array per block lets the blocks live wherever dense
blocks live (NumPy arrays here, futures on a cluster's workers) with no other handle type.  The
functions mirror the dense ones of :mod:`ssa_dask.kernel._block_math` (kernel domain only).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ssa_dask.kernel._block_math import load_block, scaling, top_k_columns
from ssa_dask.kernel._sparse_sweeps import sparse_kernel_sweep


def pack_block(values: np.ndarray, index: np.ndarray, far: np.ndarray) -> np.ndarray:
    """``(n, k)`` float32 values, int32 spot indices and ``(n,)`` far-field values as one ``(n, 2k + 1)`` block."""
    k = values.shape[1]
    block = np.empty((values.shape[0], 2 * k + 1), dtype=np.float32)
    block[:, :k] = values
    block[:, k : 2 * k] = np.ascontiguousarray(index, dtype=np.int32).view(np.float32)
    block[:, -1] = far
    return block


def unpack_block(block: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kernel values ``(n, k)`` float32, spot indices ``(n, k)`` int32 and far-field values ``(n,)`` of a packed block."""
    packed = load_block(block)
    k = packed.shape[1] // 2
    return (np.ascontiguousarray(packed[:, :k]), np.ascontiguousarray(packed[:, k : 2 * k]).view(np.int32),
            np.ascontiguousarray(packed[:, -1]))


def dense_rows(block: Any, n_spots: int) -> np.ndarray:
    """The dense float64 rows ``K~`` a packed block stands for: ``kappa_i`` everywhere, the support's values on it.

    For checks and benchmarks on problems small enough to densify.
    """
    values, index, far = unpack_block(block)
    rows = np.repeat(far.astype(np.float64)[:, None], n_spots, axis=1)
    np.put_along_axis(rows, index, values.astype(np.float64), axis=1)
    return rows


def column_marginal_sparse_block(block: Any, p: np.ndarray, g: np.ndarray, eps: float, n_spots: int) -> np.ndarray:
    """The block's share of the plan's column marginal after the row update (kernel domain)."""
    packed = np.ascontiguousarray(load_block(block))
    out = np.zeros(n_spots, dtype=np.float64)
    sparse_kernel_sweep(packed, packed.view(np.int32), np.ascontiguousarray(p, dtype=np.float64), scaling(g, eps), out)
    return out


def top_k_sparse_block(block: Any, p: np.ndarray, g: np.ndarray, eps: float, k: int) -> np.ndarray:
    """Top-k spots of each row of the plan, their row-normalised weights and the row potential ``f``.

    Same output layout as :func:`ssa_dask.kernel._block_math.top_k_block`.  A row ranks only its support
    (``k`` must not exceed it); its sum, which normalises the weights, includes the far field.
    """
    values, index, far = unpack_block(block)
    b = scaling(g, eps)
    score = values.astype(np.float64) * b[index]
    kappa = far.astype(np.float64)
    row_sum = score.sum(axis=1) + kappa * (b.sum() - b[index].sum(axis=1))
    top = top_k_columns(score, k)
    probability = np.take_along_axis(score, top, axis=1) / row_sum[:, None]
    spots = np.take_along_axis(index, top, axis=1)
    f = eps * (np.log(p) - np.log(row_sum) - g.max() / eps)
    return np.concatenate([spots.astype(np.float64), probability, f[:, None]], axis=1)


def apply_rows_sparse(block: Any, v: np.ndarray) -> np.ndarray:
    """``K_I v`` for the block's rows ``I``."""
    values, index, far = unpack_block(block)
    kappa = far.astype(np.float64)[:, None]
    return ((values - kappa) * v[index]).sum(axis=1) + kappa[:, 0] * v.sum()


def apply_columns_sparse(block: Any, v: np.ndarray, n_spots: int) -> np.ndarray:
    """``K_I^T v_I``: the block's share of ``K^T v``."""
    values, index, far = unpack_block(block)
    kappa = far.astype(np.float64)[:, None]
    weights = ((values - kappa) * v[:, None]).ravel()
    return np.bincount(index.ravel(), weights=weights, minlength=n_spots) + float(kappa[:, 0] @ v)

