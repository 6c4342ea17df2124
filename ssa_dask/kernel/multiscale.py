"""A sparse SSA kernel for slides too large for a dense one: each cell's nearest spots, found coarse to fine, plus a far field.

A dense kernel takes ``n_cells * n_spots * 4`` bytes (400 GB at 1M cells x 100k spots).  Here each
cell keeps ``n_support`` spots with their EXACT kernel values ``exp(-D_ij / eps)``, and one value
``kappa_i`` for all the other spots:

1. the spots' z-profiles (unit vectors, so ``1 - rho = |u - v|^2 / 2``) are grouped by spherical
   k-means into ``n_clusters`` clusters (:func:`cluster_spots`);
2. each block of cells is scored against the cluster directions (one small GEMM); a cell's
   candidates are the spots of its ``n_probe`` best clusters by ``|rho|``;
3. the exact costs of the candidates (one GEMM per cluster over the cells that probe it) are
   ranked and the ``n_support`` cheapest kept;
4. the far field ``kappa_i`` is the mean exact kernel value over ``n_far`` random spots off the
   cell's support (:func:`far_field`), an unbiased estimate of the mean kernel value there.

Blocks are packed as ``(n, 2 * n_support + 1)`` float32 arrays (:mod:`ssa_dask.kernel._sparse_block_math`).
Nothing of size ``n_cells x n_spots`` is ever formed.  Sinkhorn then runs unchanged on a
:class:`SparseKernel`; the plan is the entropic OT plan of the kernel ``K~`` (exact on the support,
``kappa_i`` off it), whose marginals are matched exactly.  At ``lam = 0.05`` the SSA plan is
diffuse (a cell's best spot holds a minority of its mass): without the far field a truncated
support drops that mass, the plan concentrates on the support, and a spot in no cell's support
makes the marginals infeasible (Sinkhorn diverges); with it every entry is positive.  The
comparison of these routes against the dense plan is ``benchmarks/bench_whole_slide.py``.

The build's GEMMs are small (a cluster's spots against the cells that probe it) and run inside
the executor's threads, one per core: give BLAS one thread each (``OPENBLAS_NUM_THREADS=1``), or
the two levels of threads oversubscribe the cores (5x slower on a loaded 2-core machine).

``eps = lam * max D`` needs the largest cost over all ``n * S`` pairs, which the support never sees
(it keeps the *smallest* costs).  It is taken over a sample of ``n_sample`` cells against every
spot (exact when ``n_sample >= n_cells``).  Since ``|rho| >= 0``, ``max D <= 1``: the sample max is
a lower bound of the true one, so ``eps`` is at most ``lam * (1 - sampled max D)`` too small; both
numbers are recorded (:class:`SupportCheck`).

The same sample checks the approximation once the potentials are known (:func:`check_support`):
for each sampled cell the exact plan row over ALL spots (with the solved column potential) is
compared with the support: the share of its mass the support holds, and whether its best spot is
the one the sparse plan picks.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp

from ssa_dask.kernel._block_math import scaling, to_kernel
from ssa_dask.kernel._sparse_block_math import (
    apply_columns_sparse,
    apply_rows_sparse,
    column_marginal_sparse_block,
    pack_block,
    top_k_sparse_block,
    unpack_block,
)
from ssa_dask.kernel._sparse_sweeps import keep_largest, off_support, scatter_candidates
from ssa_dask.cluster import Executor
from ssa_dask.cost import PearsonCost
from ssa_dask.errors import SSAInputError
from ssa_dask.kernel.core import Kernel
from ssa_dask.kernel.build import LOG_DOMAIN_BELOW_LAM, _max_cost, _resolve_eps
from ssa_dask.kernel.storage import MemoryBlocks

log = logging.getLogger(__name__)

#: Lloyd iterations of the spots' k-means.
KMEANS_ITERATIONS = 10
#: Default spots kept per cell.
DEFAULT_SUPPORT = 512
#: Candidates scored exactly per kept spot (sets ``n_probe`` when it is not given).
CANDIDATES_PER_KEPT = 4
#: Default random spots per cell that estimate the far field.
DEFAULT_FAR = 256
#: Default cells of the sample that sets ``max D`` and checks the support.
DEFAULT_SAMPLE = 2000
#: The check passes when the sparse plan's best spot is the exact row's best spot for at least this
#: share of the sampled cells.
MIN_BEST_SPOT_AGREEMENT = 0.9
#: Rows of the sample whose exact rows are formed at a time.
_SAMPLE_ROWS = 256


class ApproximationWarning(UserWarning):
    """The sparse kernel's check on a sample of cells found it too far from the exact kernel."""


@dataclass(frozen=True)
class SpotClusters:
    """Spots grouped by k-means on their z-profiles.

    Attributes
    ----------
    directions : (G, C) float32 array
        Unit direction of each cluster's mean profile.
    order : (S,) int32 array
        Spots sorted by cluster.
    offsets : (C + 1,) int64 array
        Cluster ``c`` holds ``order[offsets[c]:offsets[c + 1]]``.
    profiles : (S, G) float32 array
        The spots' unit profiles in that order, one row each, so a cluster's are a contiguous slice.
    """

    directions: np.ndarray
    order: np.ndarray
    offsets: np.ndarray
    profiles: np.ndarray

    @property
    def n_clusters(self) -> int:
        """Number of clusters ``C``."""
        return int(self.offsets.size - 1)

    @property
    def sizes(self) -> np.ndarray:
        """Spots per cluster, ``(C,)``."""
        return np.diff(self.offsets)


def cluster_spots(spot_profiles: np.ndarray, n_clusters: int, seed: int = 0, n_iter: int = KMEANS_ITERATIONS
                  ) -> SpotClusters:
    """Group spots by spherical k-means on their unit z-profiles (the columns of ``spot_profiles``).

    Lloyd iterations from ``n_clusters`` random spots: each spot joins the cluster direction it
    correlates with most, each direction becomes its cluster's normalised mean (an emptied
    cluster restarts at a random spot).  The clusters only steer the search for each cell's
    support; the support's costs are exact whatever they are.

    Parameters
    ----------
    spot_profiles : (G, S) float32 array
        Centred unit spot profiles (:attr:`ssa_dask.cost.PearsonCost.spot_profiles`).
    n_clusters : int
        Clusters ``C`` (``1 <= C <= S``).
    seed : int
        Seed of the initial directions.
    n_iter : int
        Lloyd iterations.
    """
    n_spots = spot_profiles.shape[1]
    if not 1 <= n_clusters <= n_spots:
        raise SSAInputError(f"n_clusters must be between 1 and the number of spots ({n_spots}), got {n_clusters}")
    rng = np.random.default_rng(seed)
    directions = spot_profiles[:, rng.choice(n_spots, n_clusters, replace=False)]
    for _ in range(n_iter):
        labels = (directions.T @ spot_profiles).argmax(axis=0)
        members = sp.csr_matrix((np.ones(n_spots), (np.arange(n_spots), labels)), shape=(n_spots, n_clusters))
        sums = np.asarray(spot_profiles.astype(np.float64) @ members)
        norms = np.linalg.norm(sums, axis=0)
        empty = norms == 0
        sums[:, empty] = spot_profiles[:, rng.choice(n_spots, int(empty.sum()), replace=False)]
        directions = (sums / np.where(empty, 1.0, norms)).astype(np.float32)
    labels = (directions.T @ spot_profiles).argmax(axis=0)
    order = np.argsort(labels, kind="stable").astype(np.int32)
    offsets = np.searchsorted(labels[order], np.arange(n_clusters + 1)).astype(np.int64)
    return SpotClusters(directions=np.ascontiguousarray(directions), order=order, offsets=offsets,
                        profiles=np.ascontiguousarray(spot_profiles[:, order].T))


def unit_profiles(block: Any, cost: PearsonCost) -> np.ndarray:
    """Cells' z-profiles, centred over genes and of unit norm: ``rho = U @ cost.spot_profiles``.

    Parameters
    ----------
    block : (n, G) array or CSR matrix
        Cell expression over the selected genes.
    cost : PearsonCost

    Returns
    -------
    (n, G) float32 array
        NaN rows for cells whose z-profile is constant over genes.
    """
    dense = block.toarray() if sp.issparse(block) else np.asarray(block)
    z = np.asarray(dense, dtype=np.float64) * cost.scale - cost.shift
    z -= z.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(norm > 1e-10 * np.sqrt(z.shape[1]), z / norm, np.nan)
    return z.astype(np.float32)


def support_block(block: Any, cost: PearsonCost, clusters: SpotClusters, *, n_probe: int, n_support: int,
                  eps: float, n_far: int = 0, seed: int = 0, block_info: dict | None = None) -> np.ndarray:
    """The kept spots of a block of cells and their exact kernel values, packed.

    Parameters
    ----------
    block : (n, G) array or CSR matrix
        Cell expression over the selected genes.
    cost : PearsonCost
    clusters : SpotClusters
    n_probe : int
        Clusters whose spots are scored exactly per cell.
    n_support : int
        Spots kept per cell (the lowest costs among the candidates); rows with fewer candidates
        are padded.
    eps : float
        Entropic regularisation.
    n_far : int
        Random spots per cell whose exact kernel values, off the support, are averaged into the
        row's far-field value (0: none, a plain truncation).
    seed : int
        Seed of those spots (with the block's first row, from ``block_info``).
    block_info : dict, optional
        Dask's block information (``map_blocks``).

    Returns
    -------
    (n, 2 * n_support + 1) float32 array
        See :func:`ssa_dask.kernel._sparse_block_math.pack_block`; NaN values in rows of constant cells.
    """
    profiles = unit_profiles(block, cost)
    n_rows = profiles.shape[0]
    n_probe = min(n_probe, clusters.n_clusters)
    score = np.abs(profiles @ clusters.directions)
    np.nan_to_num(score, copy=False)
    if n_probe < clusters.n_clusters:
        probe = np.argpartition(-score, n_probe - 1, axis=1)[:, :n_probe]
    else:
        probe = np.tile(np.arange(n_probe), (n_rows, 1))
    sizes = clusters.sizes[probe]
    start = np.cumsum(sizes, axis=1) - sizes
    width = max(int(sizes.sum(axis=1).max()), n_support)
    similarity = np.full((n_rows, width), -1.0, dtype=np.float32)  # |rho|; -1 marks padding
    spots = np.zeros((n_rows, width), dtype=np.int32)
    flat = probe.ravel()
    by_cluster = np.argsort(flat, kind="stable")
    edges = np.searchsorted(flat[by_cluster], np.arange(clusters.n_clusters + 1))
    for c in np.flatnonzero(np.diff(edges)):
        rows, slots = np.divmod(by_cluster[edges[c] : edges[c + 1]], n_probe)
        first, last = clusters.offsets[c], clusters.offsets[c + 1]
        scatter_candidates(similarity, spots, rows, start[rows, slots],
                           np.abs(profiles[rows] @ clusters.profiles[first:last].T), clusters.order[first:last])
    constant = np.isnan(profiles[:, 0])
    similarity[constant] = -1.0
    if n_support < width:
        similarity, spots = keep_largest(similarity, spots, n_support)
    start_row = block_info[0]["array-location"][0][0] if block_info else 0
    far = far_field(profiles, cost, spots, n_far, eps, np.random.default_rng([seed, start_row]))
    padding = similarity < 0
    values = _kernel_of(similarity, eps)
    values[padding] = np.broadcast_to(far[:, None], values.shape)[padding]
    spots[padding] = 0
    values[constant] = np.nan
    return pack_block(values, spots, far)


def _kernel_of(similarity: np.ndarray, eps: float) -> np.ndarray:
    """``exp(-(1 - |rho|) / eps)`` from ``|rho|``, float32."""
    return to_kernel(np.float32(1.0) - np.minimum(similarity, np.float32(1.0)), eps)


def far_field(profiles: np.ndarray, cost: PearsonCost, support: np.ndarray, n_far: int, eps: float,
              rng: np.random.Generator) -> np.ndarray:
    """Each row's mean exact kernel value over ``n_far`` random spots off its support (0 when none).

    The spots are drawn once for the block (without replacement, one GEMM for all its rows); for
    each row the drawn spots off its support are a uniform sample of the spots its support leaves
    out, so the mean is an unbiased estimate of the mean of the kernel over them.
    """
    n_rows, n_spots = profiles.shape[0], cost.n_spots
    if n_far < 1 or support.shape[1] >= n_spots:
        return np.zeros(n_rows, dtype=np.float32)
    drawn = np.sort(rng.choice(n_spots, min(n_far, n_spots), replace=False)).astype(np.int32)
    off = off_support(np.ascontiguousarray(support), np.broadcast_to(drawn, (n_rows, drawn.size)), n_spots)
    values = np.where(off, _kernel_of(np.abs(profiles @ cost.spot_profiles[:, drawn]), eps), 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(off.any(axis=1), values / off.sum(axis=1), 0.0).astype(np.float32)


def _nan_rows(block: Any) -> np.ndarray:
    """``[0, number of NaN rows, first NaN row or -1]`` of a packed block (the stats of ``_max_cost``)."""
    values, _, _ = unpack_block(block)
    bad = np.flatnonzero(np.isnan(values).any(axis=1))
    return np.array([0.0, bad.size, bad[0] if bad.size else -1], dtype=np.float64)


@dataclass
class SparseBlocks(MemoryBlocks):
    """Packed sparse row blocks in memory (NumPy arrays here, or futures on a cluster's workers).

    Attributes
    ----------
    n_support : int
        Entries stored per row.
    """

    name: str = "multiscale"
    n_support: int = 0


@dataclass
class SparseKernel(Kernel):
    """A :class:`~ssa_dask.kernel.Kernel` over :class:`SparseBlocks` (kernel domain only).

    :func:`ssa_dask.sinkhorn.sinkhorn` runs on it unchanged.  Off a row's stored support every entry
    of the kernel is the row's far-field value (0 for a plain truncation, where the plan is zero).
    """

    def column_marginal(self, p: Any, g: np.ndarray, executor: Executor, *, log: bool = False) -> np.ndarray:
        """Column marginal of the plan after the row update (see :meth:`Kernel.column_marginal`)."""
        marginal = self.map_blocks(column_marginal_sparse_block, executor, self.row_vector(p, executor), reduce="sum",
                                   g=np.asarray(g, np.float64), eps=self.eps, n_spots=self.n_spots)
        if not log:
            return marginal
        with np.errstate(divide="ignore"):
            return np.log(marginal)

    def top_k(self, p: Any, g: np.ndarray, k: int, executor: Executor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``k`` largest entries of each row of the plan (see :meth:`Kernel.top_k`); ``k <= n_support``."""
        if k > self.storage.n_support:
            raise SSAInputError(f"top_k={k} exceeds the spots kept per cell (n_support={self.storage.n_support})")
        parts = self.map_blocks(top_k_sparse_block, executor, self.row_vector(p, executor), g=np.asarray(g, np.float64),
                                eps=self.eps, k=k, label="assignment (top-k)")
        values = np.concatenate(parts, axis=0)
        return values[:, :k].astype(np.int64), values[:, k : 2 * k], values[:, -1]

    def apply(self, v: np.ndarray, axis: int, executor: Executor) -> np.ndarray:
        """Kernel-vector product ``K v`` (``axis=1``) or ``K^T v`` (``axis=0``) of the sparse kernel."""
        v = np.asarray(v, dtype=np.float64)
        if axis == 1:
            return np.concatenate(self.map_blocks(apply_rows_sparse, executor, v=v))
        if axis == 0:
            return self.map_blocks(apply_columns_sparse, executor, self.row_vector(v, executor), reduce="sum",
                                   n_spots=self.n_spots)
        raise ValueError("axis must be 0 or 1")


@dataclass
class SupportCheck:
    """The sparse kernel against the exact one on a sample of cells.

    Attributes
    ----------
    rows : (n_sample,) int array
        Sampled cells.
    clusters : SpotClusters
        The clusters the support was searched in.
    n_probe : int
        Clusters probed per cell.
    n_far, seed : int
        Far-field spots per cell and their seed.
    sampled_max_cost : float
        ``max D`` over the sample x all spots (sets ``eps``; a lower bound of the true ``max D <= 1``).
    stage_seconds : dict
        Wall time of the build's stages: ``clusters_s``, ``sample_s`` (``max D``), ``support_s``
        (the blocks), and ``check_s`` once checked.
    support_mass : (n_sample,) float array, or None before :func:`check_support`
        Share of each sampled cell's exact plan row (all spots, solved ``g``) on its stored support.
    best_in_support : (n_sample,) bool array, or None
        Whether the sparse plan's best spot is the exact row's best spot.
    row_sum_error : (n_sample,) float array, or None
        ``|sum_j K~_ij b_j - sum_j K_ij b_j| / sum_j K_ij b_j``: the relative error of the row
        scaling ``a_i`` of the sparse kernel ``K~`` (support plus far field).
    """

    rows: np.ndarray
    clusters: SpotClusters
    n_probe: int
    n_far: int
    seed: int
    sampled_max_cost: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    support_mass: np.ndarray | None = None
    best_in_support: np.ndarray | None = None
    row_sum_error: np.ndarray | None = None

    @property
    def passed(self) -> bool:
        """Whether the best spots of the sample agree often enough (``MIN_BEST_SPOT_AGREEMENT``); False before the check."""
        return self.best_in_support is not None and float(np.mean(self.best_in_support)) >= MIN_BEST_SPOT_AGREEMENT

    def warn_if_failed(self, n_support: int) -> None:
        """Warn (:class:`ApproximationWarning`) with the numbers and the remedy when the check did not pass."""
        if self.passed:
            return
        summary = self.summary()
        warnings.warn(
            f"sparse kernel check: on {summary['check_cells']} sampled cells the best spot of the sparse plan is the "
            f"exact row's best spot for only {summary.get('best_spot_agreement', float('nan')):.1%} of them "
            f"(needed {MIN_BEST_SPOT_AGREEMENT:.0%}; median share of the exact row on the support "
            f"{summary.get('support_mass_median', float('nan')):.1%}): the plan is more diffuse than {n_support} spots "
            "per cell hold. Use a larger n_support, or the dense kernel where it fits",
            ApproximationWarning, stacklevel=3,
        )

    def summary(self) -> dict[str, float]:
        """JSON scalars: the sample and search sizes, sampled max D, and the check's statistics."""
        out = {"check_cells": int(self.rows.size), "sampled_max_cost": self.sampled_max_cost,
               "n_clusters": self.clusters.n_clusters, "n_probe": self.n_probe, "n_far": self.n_far,
               **self.stage_seconds}
        if self.support_mass is not None:
            out.update(check_passed=self.passed, support_mass_median=float(np.median(self.support_mass)),
                       support_mass_p05=float(np.quantile(self.support_mass, 0.05)),
                       best_spot_agreement=float(np.mean(self.best_in_support)),
                       row_sum_error_median=float(np.median(self.row_sum_error)),
                       row_sum_error_p95=float(np.quantile(self.row_sum_error, 0.95)))
        return out


def candidate_width(n_support: int) -> int:
    """float32 columns a block's candidate buffers take per cell (``|rho|`` and spot of each candidate).

    What the width of a dense row is to the dense kernel: ``align`` sizes the row blocks by it.
    """
    return 2 * CANDIDATES_PER_KEPT * n_support


def check_sparse_options(kernel: str, n_support: int, top_k: int, log_domain: bool | str) -> None:
    """Raise :class:`SSAInputError` naming the problem unless ``align``'s kernel options are usable (before any compute)."""
    if kernel not in ("dense", "multiscale"):
        raise SSAInputError(f"kernel must be 'dense' or 'multiscale', got {kernel!r}")
    if kernel == "dense":
        return
    if isinstance(n_support, bool) or not isinstance(n_support, int) or n_support < 1:
        raise SSAInputError(f"n_support must be a positive integer, got {n_support!r}")
    if top_k > n_support:
        raise SSAInputError(f"top_k={top_k} exceeds the spots kept per cell (n_support={n_support})")
    if log_domain is True:
        raise SSAInputError("kernel='multiscale' works in the kernel domain only: use log_domain='auto' or False")


def build_multiscale_kernel(
    X: da.Array,
    cost: PearsonCost,
    executor: Executor,
    *,
    lam: float | None = 0.05,
    eps: float | None = None,
    n_support: int = DEFAULT_SUPPORT,
    n_clusters: int | None = None,
    n_probe: int | None = None,
    n_far: int = DEFAULT_FAR,
    n_sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
) -> tuple[SparseKernel, SupportCheck]:
    """Build the sparse kernel blockwise: clusters of spots, candidates per cell, exact costs, top ``n_support``.

    Parameters
    ----------
    X : dask.array.Array
        ``(n_cells, G)`` cells over the selected genes, chunked along rows only (one block each).
    cost : PearsonCost
        Cell statistics and spot profiles over the same genes.
    executor : Executor
    lam : float
        Relative regularisation, ``eps = lam * max D`` with ``max D`` from the sample.
    eps : float, optional
        Absolute regularisation; overrides ``lam``.
    n_support : int
        Spots kept per cell (``n_support >= n_spots`` keeps all: the dense kernel).
    n_clusters : int, optional
        k-means clusters of spots (default ``round(sqrt(n_spots))``).
    n_probe : int, optional
        Clusters scored exactly per cell (default: enough for ``CANDIDATES_PER_KEPT * n_support``
        candidates on average; raised where needed so that every cell has ``n_support`` candidates).
    n_far : int
        Random spots per cell that estimate its far field (0: a plain truncation, the plan is zero
        off the support).
    n_sample : int
        Cells (evenly spaced) compared with all spots to set ``max D`` and to check the support.
    seed : int
        Seed of the k-means and of the far-field spots.

    Returns
    -------
    SparseKernel, SupportCheck
        The kernel, and the sample (pass it to :func:`check_support` after Sinkhorn).
    """
    n_cells, n_spots = int(X.shape[0]), cost.n_spots
    if n_support < 1 or n_sample < 1:
        raise SSAInputError(f"n_support and n_sample must be at least 1, got {n_support} and {n_sample}")
    n_support = min(n_support, n_spots)
    n_clusters = n_clusters or max(1, round(math.sqrt(n_spots)))
    if n_support == n_spots:
        n_clusters = n_probe = 1  # every spot is kept: one cluster, no search
    start = time.perf_counter()
    clusters = cluster_spots(cost.spot_profiles, min(n_clusters, n_spots), seed)
    seconds = {"clusters_s": time.perf_counter() - start}
    if n_probe is None:
        n_probe = math.ceil(CANDIDATES_PER_KEPT * n_support * clusters.n_clusters / n_spots)
    if n_probe < 1:
        raise SSAInputError(f"n_probe must be at least 1, got {n_probe}")
    # enough clusters that even the smallest ones hold n_support candidates: no row is padded
    n_probe = max(n_probe, int(np.searchsorted(np.cumsum(np.sort(clusters.sizes)), n_support)) + 1)
    rows = np.unique(np.linspace(0, n_cells - 1, min(n_sample, n_cells)).round().astype(np.int64))
    (sample,) = executor.compute(X[rows])
    sampled_max = max(float(np.nanmax(cost.cost(sample[a : a + _SAMPLE_ROWS])))
                      for a in range(0, rows.size, _SAMPLE_ROWS))
    eps_value = _resolve_eps(sampled_max, lam, eps)
    seconds["sample_s"] = time.perf_counter() - start - seconds["clusters_s"]
    if eps_value < LOG_DOMAIN_BELOW_LAM * sampled_max:
        raise SSAInputError(
            f"eps={eps_value:.3g} is below {LOG_DOMAIN_BELOW_LAM} x max D ({sampled_max:.3g}), where the kernel domain "
            "leaves float32's range; the sparse kernel has no log domain: use a larger lam or the dense kernel"
        )
    log.info("sparse kernel: %d spots per cell, %d clusters, %d probed; max D %.6f on %d sampled cells, eps %.4g",
             n_support, clusters.n_clusters, n_probe, sampled_max, rows.size, eps_value)
    packed = X.map_blocks(support_block, dask.delayed(cost, pure=True), dask.delayed(clusters, pure=True), n_probe=n_probe, n_support=n_support, eps=eps_value,
                          n_far=n_far, seed=seed, dtype=np.float32, chunks=(X.chunks[0], (2 * n_support + 1,)),
                          meta=np.empty((0, 0), np.float32))
    blocks = executor.materialize_blocks(packed, label="sparse kernel blocks")
    bounds = np.cumsum((0,) + X.chunks[0])
    _max_cost(np.asarray(executor.map(_nan_rows, blocks)), bounds)  # raises on constant cells
    seconds["support_s"] = time.perf_counter() - start - seconds["clusters_s"] - seconds["sample_s"]
    storage = SparseBlocks(blocks, bounds, n_spots, n_support=n_support)
    kernel = SparseKernel(storage, eps=eps_value, log_domain=False, max_cost=sampled_max)
    return kernel, SupportCheck(rows=rows, clusters=clusters, n_probe=n_probe, n_far=n_far, seed=seed,
                                sampled_max_cost=sampled_max, stage_seconds=seconds)


def check_support(check: SupportCheck, X: da.Array, cost: PearsonCost, kernel: SparseKernel, g: np.ndarray,
                  executor: Executor) -> SupportCheck:
    """Compare the sparse plan with the exact plan rows (all spots, same potential ``g``) on the sample.

    Fills :attr:`SupportCheck.support_mass`, :attr:`SupportCheck.best_in_support` and
    :attr:`SupportCheck.row_sum_error` and returns ``check``.
    """
    start = time.perf_counter()
    (sample,) = executor.compute(X[check.rows])
    b = scaling(np.asarray(g, np.float64), kernel.eps)
    mass, agree, error = [], [], []
    for a in range(0, check.rows.size, _SAMPLE_ROWS):
        part = sample[a : a + _SAMPLE_ROWS]
        exact = to_kernel(cost.cost(part), kernel.eps).astype(np.float64) * b
        packed = support_block(part, cost, check.clusters, n_probe=check.n_probe, n_support=kernel.storage.n_support,
                               eps=kernel.eps, n_far=check.n_far, seed=check.seed)
        values, spots, far = unpack_block(packed)
        on_support = values.astype(np.float64) * b[spots]
        approx = on_support.sum(axis=1) + far * (b.sum() - b[spots].sum(axis=1))
        exact_sum = exact.sum(axis=1)
        mass.append(np.take_along_axis(exact, spots, axis=1).sum(axis=1) / exact_sum)
        error.append(np.abs(approx - exact_sum) / exact_sum)
        best = np.take_along_axis(spots, on_support.argmax(axis=1)[:, None], axis=1)[:, 0]
        agree.append(best == exact.argmax(axis=1))
    check.support_mass = np.concatenate(mass)
    check.best_in_support = np.concatenate(agree)
    check.row_sum_error = np.concatenate(error)
    check.stage_seconds["check_s"] = time.perf_counter() - start
    return check
