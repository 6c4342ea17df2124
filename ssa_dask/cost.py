"""Blockwise Pearson cost between cells and spots: D = 1 - |rho|.

Cells are z-scored per gene with the cells' statistics, spots with the spots' statistics, and
``rho_ij`` is the Pearson correlation over genes of cell ``i``'s and spot ``j``'s z-profiles.
Writing the cell z-profile as ``z_i = x_i * s - m`` (``s = 1/std``, ``m = mean/std``) and
``w_j`` for the spot z-profile centred over genes and scaled to unit norm,

    rho_ij = (<x_i * s, w_j> - <m, w_j>) / ||z_i - mean(z_i)||,

so a sparse cell block needs one sparse-times-dense product plus rank-one corrections and is
never densified whole.  A block dense enough for BLAS to win is densified one block at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp
from dask.delayed import Delayed

from ssa_dask.errors import SSAInputError

#: Above this fraction of non-zeros a CSR block is densified and multiplied with SGEMM.
DENSIFY_ABOVE_DENSITY = 0.02


@dataclass(frozen=True)
class PearsonCost:
    """Everything needed to compute the cost of any block of cells against all spots.

    Attributes
    ----------
    scale : (G,) float64 array
        ``1 / std`` of each gene over cells.
    shift : (G,) float64 array
        ``mean / std`` of each gene over cells.
    spot_profiles : (G, S) float32 array
        Spot z-profiles, centred over genes and of unit norm, one column per spot.
    """

    scale: np.ndarray
    shift: np.ndarray
    spot_profiles: np.ndarray

    @property
    def n_spots(self) -> int:
        """Number of spots ``S``."""
        return int(self.spot_profiles.shape[1])

    @classmethod
    def from_statistics(
        cls, cell_mean: np.ndarray, cell_std: np.ndarray, spot_values: np.ndarray, spot_mean: np.ndarray, spot_std: np.ndarray
    ) -> PearsonCost:
        """Build the cost from per-gene cell statistics and the (small) spot matrix.

        Parameters
        ----------
        cell_mean, cell_std : (G,) arrays
            Per-gene mean and standard deviation over cells (``std > 0``).
        spot_values : (S, G) array or sparse matrix
            Spot expression over the selected genes.
        spot_mean, spot_std : (G,) arrays
            Per-gene mean and standard deviation over spots (``std > 0``).

        Raises
        ------
        SSAInputError
            A spot's z-profile is constant over genes (its correlation is undefined).
        """
        dense = spot_values.toarray() if sp.issparse(spot_values) else spot_values
        z = (np.asarray(dense, dtype=np.float64) - spot_mean) / spot_std
        z -= z.mean(axis=1, keepdims=True)
        norms = np.linalg.norm(z, axis=1)
        constant = np.flatnonzero(norms <= 1e-10 * np.sqrt(z.shape[1]))
        if constant.size:
            raise SSAInputError(
                f"{constant.size} spot(s) have a constant z-profile over the selected genes (e.g. row "
                f"{constant[:5].tolist()}), so their Pearson correlation is undefined; remove them"
            )
        profiles = (z / norms[:, None]).T.astype(np.float32)
        return cls(scale=1.0 / np.asarray(cell_std, np.float64), shift=np.asarray(cell_mean, np.float64) / cell_std,
                   spot_profiles=np.ascontiguousarray(profiles))

    def correlation(self, block: Any) -> np.ndarray:
        """Pearson correlation of a block of cells with every spot.

        Parameters
        ----------
        block : (n, G) array or CSR matrix
            Cell expression over the selected genes.

        Returns
        -------
        (n, S) float32 array
            ``rho``; rows of cells whose z-profile is constant over genes are NaN.
        """
        n_genes = self.scale.shape[0]
        if sp.issparse(block) and block.nnz <= DENSIFY_ABOVE_DENSITY * block.shape[0] * block.shape[1]:
            xs = sp.csr_matrix(block, dtype=np.float64).multiply(self.scale).tocsr()
            row_sum = np.asarray(xs.sum(axis=1)).ravel() - self.shift.sum()
            row_sq = (np.asarray(xs.multiply(xs).sum(axis=1)).ravel() - 2.0 * (xs @ self.shift)
                      + self.shift @ self.shift)
            numerator = np.asarray(xs.astype(np.float32) @ self.spot_profiles) - (self.shift @ self.spot_profiles)[None, :]
        else:
            dense = block.toarray() if sp.issparse(block) else np.asarray(block)
            z = np.array(dense, dtype=np.float32)  # a copy we own: z-scored in place
            z *= self.scale.astype(np.float32)
            z -= self.shift.astype(np.float32)
            row_sum = z.sum(axis=1, dtype=np.float64)
            row_sq = np.einsum("ij,ij->i", z, z, dtype=np.float64)
            numerator = z @ self.spot_profiles
        centred_sq = row_sq - row_sum**2 / n_genes
        with np.errstate(divide="ignore", invalid="ignore"):
            inv_norm = np.where(centred_sq > 1e-10 * n_genes, 1.0 / np.sqrt(np.maximum(centred_sq, 0.0)), np.nan)
        rho = np.asarray(numerator, dtype=np.float32)
        rho *= inv_norm.astype(np.float32)[:, None]
        return np.clip(rho, -1.0, 1.0, out=rho)

    def cost(self, block: Any) -> np.ndarray:
        """``D = 1 - |rho|`` of a block of cells, float32, NaN rows for constant cells."""
        rho = self.correlation(block)
        np.abs(rho, out=rho)
        np.subtract(np.float32(1.0), rho, out=rho)
        return rho


def lazy_pearson_cost(
    cell_mean: np.ndarray, cell_std: np.ndarray, spot_X: da.Array, spot_mean: np.ndarray, spot_std: np.ndarray
) -> Delayed:
    """A :class:`PearsonCost` built where it is needed, from the lazy spot matrix.

    The spot profiles (genes x spots, e.g. 80 MB at 5,000 x 4,000) are computed on a worker from the
    spot matrix's own lazy reader, so they never travel inside the task graph, and a worker that
    dies with them is recovered by recomputing them from the same graph (nothing is scattered).

    Parameters
    ----------
    cell_mean, cell_std : (G,) arrays
        Per-gene statistics over cells.
    spot_X : dask.array.Array
        ``(S, G)`` spot expression over the selected genes (dense or CSR chunks).
    spot_mean, spot_std : (G,) arrays
        Per-gene statistics over spots.

    Returns
    -------
    dask.delayed.Delayed
        Evaluates to the :class:`PearsonCost`.
    """
    build = dask.delayed(PearsonCost.from_statistics, pure=True)
    return build(np.asarray(cell_mean), np.asarray(cell_std), spot_X, np.asarray(spot_mean), np.asarray(spot_std),
                 dask_key_name=f"pearson-cost-{dask.base.tokenize(cell_mean, cell_std, spot_X, spot_mean, spot_std)}")


def cost_blocks(X: da.Array, cost: PearsonCost | Delayed, n_spots: int | None = None) -> da.Array:
    """Lazy row blocks of the cost matrix ``D`` (cells x spots, float32).

    Parameters
    ----------
    X : dask.array.Array
        ``(n_cells, G)`` cells over the selected genes, chunked along rows only.
    cost : PearsonCost or dask.delayed.Delayed
        The cost, or a lazy one from :func:`lazy_pearson_cost`.
    n_spots : int, optional
        Number of spots; required when ``cost`` is lazy.

    Returns
    -------
    dask.array.Array
        ``(n_cells, S)`` with the row chunks of ``X``.
    """
    if isinstance(cost, PearsonCost):
        n_spots = cost.n_spots
        cost = dask.delayed(cost, pure=True)  # one graph key: sent once per worker, not once per block
    elif n_spots is None:
        raise ValueError("n_spots is required with a lazy cost")
    return X.map_blocks(
        _cost_of_block, cost, dtype=np.float32, chunks=(X.chunks[0], (n_spots,)),
        meta=np.empty((0, 0), np.float32),
    )


def _cost_of_block(block: Any, cost: PearsonCost) -> np.ndarray:
    return cost.cost(block)
