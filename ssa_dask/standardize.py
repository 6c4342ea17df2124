"""Per-gene mean and standard deviation as one lazy Dask reduction, and z-scoring.

One pass over a row-chunked matrix (dense or CSR chunks) gives every statistic the pipeline
needs: per-gene sums and sums of squares (so mean and variance), per-row totals (the Sinkhorn
masses), and checks for non-finite and negative values.  Nothing is densified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import scipy.sparse as sp

from ssa_dask.cluster import Executor


@dataclass(frozen=True)
class MatrixSummary:
    """Statistics of a (rows x genes) matrix gathered in one pass.

    Attributes
    ----------
    n_rows : int
        Number of rows.
    gene_sum, gene_sumsq : (G,) float64 arrays
        Per-gene sum and sum of squares over rows.
    row_totals : (n_rows,) float64 array
        Per-row sum over all genes.
    n_nonfinite : int
        Number of NaN or infinite entries.
    min_value : float
        Smallest finite entry (0 for sparse matrices with implicit zeros).
    """

    n_rows: int
    gene_sum: np.ndarray
    gene_sumsq: np.ndarray
    row_totals: np.ndarray
    n_nonfinite: int
    min_value: float

    @property
    def mean(self) -> np.ndarray:
        """Per-gene mean over rows."""
        return self.gene_sum / self.n_rows

    @property
    def variance(self) -> np.ndarray:
        """Per-gene population variance over rows (ddof=0), clipped at 0."""
        return np.maximum(self.gene_sumsq / self.n_rows - self.mean**2, 0.0)

    @property
    def std(self) -> np.ndarray:
        """Per-gene population standard deviation over rows."""
        return np.sqrt(self.variance)


def _block_moments(block: Any) -> np.ndarray:
    """Gene sums, gene sums of squares, non-finite count and minimum of one block, packed in one row."""
    if sp.issparse(block):
        values = block.data.astype(np.float64, copy=False)
        finite = np.isfinite(values)
        clean = block.astype(np.float64)  # a copy (scipy copies by default)
        clean.data[~finite] = 0.0
        gene_sum = np.asarray(clean.sum(axis=0)).ravel()
        gene_sumsq = np.asarray(clean.multiply(clean).sum(axis=0)).ravel()
        implicit_zero = block.nnz < block.shape[0] * block.shape[1]
        finite_values = values[finite]
        smallest = min(finite_values.min(initial=np.inf), 0.0 if implicit_zero else np.inf)
    else:
        values = np.asarray(block, dtype=np.float64)
        finite = np.isfinite(values)
        clean = np.where(finite, values, 0.0)
        gene_sum = clean.sum(axis=0)
        gene_sumsq = (clean * clean).sum(axis=0)
        smallest = values[finite].min(initial=np.inf)
    n_bad = float((~finite).sum())
    return np.concatenate([gene_sum, gene_sumsq, [n_bad, smallest]])[None, :]


def _block_row_totals(block: Any) -> np.ndarray:
    totals = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
    return np.where(np.isfinite(totals), totals, np.nan)


def summarize(X: da.Array, executor: Executor, label: str | None = None) -> MatrixSummary:
    """Per-gene sums and squares, row totals and value checks of ``X`` in one pass.

    Parameters
    ----------
    X : dask.array.Array
        ``(n_rows, G)`` matrix chunked along rows (dense or CSR chunks).
    executor : Executor
        Where to run the reduction.
    label : str, optional
        Progress-bar label (shown when the executor shows progress).

    Returns
    -------
    MatrixSummary
    """
    n_genes = X.shape[1]
    moments = X.map_blocks(
        _block_moments, dtype=np.float64, chunks=((1,) * X.numblocks[0], (2 * n_genes + 2,)), meta=np.empty((0, 0))
    )
    totals = X.map_blocks(_block_row_totals, dtype=np.float64, drop_axis=1, meta=np.empty(0))
    packed, row_totals = executor.compute(moments, totals, label=label)
    gene_sum = packed[:, :n_genes].sum(axis=0)
    gene_sumsq = packed[:, n_genes : 2 * n_genes].sum(axis=0)
    return MatrixSummary(
        n_rows=int(X.shape[0]),
        gene_sum=gene_sum,
        gene_sumsq=gene_sumsq,
        row_totals=np.asarray(row_totals, dtype=np.float64),
        n_nonfinite=int(packed[:, -2].sum()),
        min_value=float(packed[:, -1].min()),
    )


def zscore(values: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Z-score each column: ``(x - mean_g) / std_g``.

    Parameters
    ----------
    values : (n, G) array
    mean, std : (G,) arrays
        Per-gene mean and (non-zero) standard deviation.

    Returns
    -------
    (n, G) float64 array
    """
    return (np.asarray(values, dtype=np.float64) - mean) / std
