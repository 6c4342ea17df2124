"""What every peer method shares: the result type, the prepared problem and the measurement.

A peer maps the cells of a scRNA-seq matrix onto the spots of a spatial slide, like SSA does.
To compare them fairly, every peer

* receives the same :class:`PeerProblem`, built once by :func:`prepare_problem` with SSA's own
  gene rule (:func:`ssa_dask.genes.select_genes`: top-``n_genes`` variance genes of the cells,
  intersected with the spot genes, non-constant in both) and dense float64 matrices over them;
* is timed and memory-sampled the same way by :func:`measure` around its own mapping code only
  (its own preprocessing, fitting and assignment; not the shared gene intersection);
* returns a :class:`MappingResult` with one spot row index per cell.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anndata as ad
import numpy as np
import psutil
import scipy.sparse as sp

from ssa_dask.errors import SSAError, SSAInputError
from ssa_dask.genes import select_genes
from ssa_dask.evaluation.simulate import cell_coordinates

__all__ = [
    "MappingResult",
    "PeerProblem",
    "PeerUnavailableError",
    "assignment_from_plan",
    "check_dense_memory",
    "measure",
    "pca_scores",
    "pearson_matrix",
    "prepare_problem",
    "shared_genes",
    "top_k",
]

T = TypeVar("T")


def not_installed(packages: dict[str, str], install: str) -> str | None:
    """Why a peer cannot run: the packages whose modules are not found (looked up, not imported).

    Parameters
    ----------
    packages : dict
        Package name (as installed) -> module name (as imported).
    install : str
        The command that installs them, quoted in the reason.

    Returns
    -------
    str or None
        ``None`` when every module is found.
    """
    missing = [package for package, module in packages.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed ({install})"


class PeerUnavailableError(SSAError, RuntimeError):
    """A peer method's optional dependency is missing; the message says what and how to install it."""


@dataclass
class MappingResult:
    """One method's cell -> spot mapping.

    Attributes
    ----------
    method
        Name under which the method was run (see :func:`ssa_dask.evaluation.peers.available_methods`).
    spot
        ``(n_cells,)`` int64 row index into the spots AnnData; ``-1`` means the cell was not mapped.
    seconds
        Wall-clock seconds of the method's own mapping code (see :func:`measure`).
    peak_memory_bytes
        Peak increase of resident memory of this process plus all its child processes during the
        mapping, over the value just before it (see :func:`measure`); ``None`` if it could not be read.
    probability
        ``(n_cells,)`` the method's score of the chosen spot, normalised per cell over the spots
        where the method has such a score (``None`` if the method has none).
    top_spots
        ``(n_cells, k)`` int64 best spots per cell, best first (``None`` if not computed).
    info
        Method-specific details of the run (e.g. the parameters Seurat actually used, DistMap's
        chosen quantile).
    """

    method: str
    spot: np.ndarray
    seconds: float
    peak_memory_bytes: int | None
    probability: np.ndarray | None = None
    top_spots: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PeerProblem:
    """The inputs every peer receives.

    Attributes
    ----------
    sc
        ``(n_cells, n_genes)`` float64 dense expression of the cells over :attr:`genes`
        (``None`` for methods that read the AnnData themselves, e.g. SSA).
    spots
        ``(n_spots, n_genes)`` float64 dense expression of the spots over :attr:`genes` (or ``None``).
    genes
        ``(n_genes,)`` shared gene names, in the order of the columns.
    spot_xy
        ``(n_spots, 2)`` spot coordinates from ``obs["x"], obs["y"]`` (or ``obsm["spatial"]``),
        ``None`` when the spots have none.
    sc_adata, spots_adata
        The AnnData objects as the caller gave them.
    n_top_genes
        The ``n_genes`` given to :func:`shared_genes` (passed on to SSA, which applies the same rule).
    """

    sc: np.ndarray | None
    spots: np.ndarray | None
    genes: np.ndarray
    spot_xy: np.ndarray | None
    sc_adata: ad.AnnData
    spots_adata: ad.AnnData
    n_top_genes: int = 5000

    @property
    def n_cells(self) -> int:
        return self.sc_adata.n_obs

    @property
    def n_spots(self) -> int:
        return self.spots_adata.n_obs

    def require_xy(self, method: str) -> np.ndarray:
        """Return :attr:`spot_xy`, raising :class:`SSAInputError` when the spots have no coordinates."""
        if self.spot_xy is None:
            raise SSAInputError(
                f'{method} needs spot coordinates: give the spots obs["x"], obs["y"] or obsm["spatial"]'
            )
        return self.spot_xy

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """``(sc, spots)`` dense matrices; raises if the problem was prepared without them."""
        if self.sc is None or self.spots is None:
            raise RuntimeError("this PeerProblem was prepared with dense=False")
        return self.sc, self.spots


def _gene_variance(x) -> np.ndarray:
    """Per-column variance of a dense or sparse matrix, without densifying it."""
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float64)
        mean = np.asarray(x.mean(axis=0)).ravel()
        mean_sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
        return mean_sq - mean**2
    return np.asarray(x, dtype=np.float64).var(axis=0)


def shared_genes(sc_adata: ad.AnnData, spots_adata: ad.AnnData, n_genes: int = 5000) -> np.ndarray:
    """The genes every peer uses: exactly SSA's rule (:func:`ssa_dask.genes.select_genes`).

    The ``n_genes`` genes of largest variance across the cells (ties broken by position) that
    the spots also have, minus genes constant in the cells or in the spots; ordered by decreasing
    cell variance.

    Parameters
    ----------
    sc_adata
        ``n_cells x n_genes_sc`` AnnData.
    spots_adata
        ``n_spots x n_genes_sp`` AnnData.
    n_genes
        Number of top-variance genes of the cells to start from.

    Returns
    -------
    numpy.ndarray
        ``(n_shared,)`` gene names.
    """
    selection = select_genes(
        sc_adata.var_names,
        _gene_variance(sc_adata.X),
        spots_adata.var_names,
        _gene_variance(spots_adata.X),
        int(n_genes),
    )
    return np.asarray(selection.genes)


def _dense(adata: ad.AnnData, genes: np.ndarray) -> np.ndarray:
    x = adata[:, genes].X
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise SSAInputError("the expression matrix contains NaN or infinite values")
    return x


def prepare_problem(
    sc_adata: ad.AnnData, spots_adata: ad.AnnData, *, n_genes: int = 5000, dense: bool = True
) -> PeerProblem:
    """Build the :class:`PeerProblem` shared by all peers.

    Parameters
    ----------
    sc_adata
        ``n_cells x genes`` AnnData, already transformed as the protocol wants (e.g. log1p).
    spots_adata
        ``n_spots x genes`` AnnData with coordinates in ``obs["x"], obs["y"]`` or ``obsm["spatial"]``.
    n_genes
        See :func:`shared_genes`.
    dense
        Build the dense float64 matrices over the shared genes (``False`` leaves them ``None``).

    Returns
    -------
    PeerProblem
    """
    for name, obj in (("sc_adata", sc_adata), ("spots_adata", spots_adata)):
        if not isinstance(obj, ad.AnnData):
            raise SSAInputError(f"{name} must be an AnnData, got {type(obj).__name__}")
        if obj.n_obs == 0:
            raise SSAInputError(f"{name} has no rows")
        if not obj.var_names.is_unique:
            raise SSAInputError(f"{name} has duplicated gene names; make them unique first")
    genes = shared_genes(sc_adata, spots_adata, n_genes)
    try:
        xy = cell_coordinates(spots_adata)
    except SSAInputError:
        xy = None
    return PeerProblem(
        sc=_dense(sc_adata, genes) if dense else None,
        spots=_dense(spots_adata, genes) if dense else None,
        genes=genes,
        spot_xy=xy,
        sc_adata=sc_adata,
        spots_adata=spots_adata,
        n_top_genes=int(n_genes),
    )


def pearson_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of every row of ``a`` with every row of ``b``.

    ``rho[i, j] = <a_i - mean(a_i), b_j - mean(b_j)> / (||a_i - mean(a_i)|| ||b_j - mean(b_j)||)``
    computed as one matrix product of row-centred, row-normalised matrices; a constant row
    gets correlation 0 with everything.

    Parameters
    ----------
    a
        ``(n, g)`` array.
    b
        ``(m, g)`` array.

    Returns
    -------
    numpy.ndarray
        ``(n, m)`` correlations in ``[-1, 1]``.
    """

    def unit_rows(x: np.ndarray) -> np.ndarray:
        x = x - x.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)

    return np.clip(unit_rows(a) @ unit_rows(b).T, -1.0, 1.0)


def check_dense_memory(method: str, n_floats: float) -> None:
    """Refuse a dense computation of ``n_floats`` float64 values that cannot fit in free memory.

    Raises
    ------
    SSAInputError
        When ``8 * n_floats`` bytes exceed the memory available now (``psutil.virtual_memory``),
        naming the method and the size, instead of letting the process be killed.
    """
    need = 8.0 * float(n_floats)
    available = float(psutil.virtual_memory().available)
    if need > available:
        raise SSAInputError(
            f"{method} needs about {need / 2**30:.1f} GiB of dense matrices for this problem but only "
            f"{available / 2**30:.1f} GiB is free; subsample the cells (these methods scale as n_cells^2)"
        )


def pca_scores(x: np.ndarray, n_components: int) -> np.ndarray:
    """Principal component scores of the rows of ``x``.

    Columns are centred, then ``x - mean = U S V^T`` (thin SVD) and the scores are ``U S`` for the
    first ``min(n_components, n_rows - 1, n_cols)`` components.

    Parameters
    ----------
    x
        ``(n, g)`` array.
    n_components
        Number of components wanted.

    Returns
    -------
    numpy.ndarray
        ``(n, k)`` scores.
    """
    centred = x - x.mean(axis=0, keepdims=True)
    k = int(max(1, min(n_components, x.shape[0] - 1, x.shape[1])))
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    return u[:, :k] * s[:k]


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def measure(fn: Callable[[], T], *, interval: float = 0.01) -> tuple[T, float, int | None]:
    """Run ``fn()`` and measure its wall time and its peak memory.

    Memory: a background thread samples, every ``interval`` seconds, the resident set size (RSS)
    of this process plus every descendant process (e.g. the ``Rscript`` of the Seurat peer), via
    :mod:`psutil`. The result is ``max(samples) - baseline``, with the baseline sampled just before
    ``fn`` starts (clamped at 0). Limits: an allocation that lives shorter than ``interval`` can be
    missed; memory already held by the process (e.g. an allocator's free pool) can be reused
    without showing; libraries imported for the first time inside ``fn`` count towards it.

    Parameters
    ----------
    fn
        Zero-argument callable doing the mapping.
    interval
        Seconds between memory samples.

    Returns
    -------
    tuple
        ``(fn(), seconds, peak_memory_bytes)``; ``peak_memory_bytes`` is ``None`` when the
        process memory cannot be read.
    """
    try:
        proc = psutil.Process(os.getpid())
        baseline = _tree_rss(proc)
    except (psutil.Error, OSError):
        proc, baseline = None, 0
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            peak[0] = max(peak[0], _tree_rss(proc))

    thread = threading.Thread(target=sample, name="peer-memory-sampler", daemon=True) if proc else None
    if thread is not None:
        thread.start()
    start = time.perf_counter()
    try:
        out: Any = fn()
    finally:
        seconds = time.perf_counter() - start
        stop.set()
        if thread is not None:
            thread.join()
    if proc is None:
        return out, seconds, None
    peak[0] = max(peak[0], _tree_rss(proc))
    return out, seconds, max(0, int(peak[0] - baseline))


def top_k(score: np.ndarray, k: int) -> np.ndarray:
    """``(n, k)`` column indices of the ``k`` largest entries of each row, best first, ties to the lower index."""
    k = int(min(max(k, 1), score.shape[1]))
    return np.argsort(-score, axis=1, kind="stable")[:, :k].astype(np.int64)


def assignment_from_plan(plan: np.ndarray, k: int = 1) -> dict[str, np.ndarray]:
    """Turn a non-negative ``(n_cells, n_spots)`` plan or score into the :class:`MappingResult` fields.

    ``spot = argmax_j plan[i, j]``, ``probability = plan[i, spot] / sum_j plan[i, j]``, and
    ``top_spots`` the ``k`` best columns. A row of zeros (or non-finite values only) gives
    ``spot = -1`` and probability NaN.
    """
    plan = np.where(np.isfinite(plan), plan, 0.0)
    total = plan.sum(axis=1)
    top = top_k(plan, k)
    spot = top[:, 0].copy()
    empty = ~(total > 0)
    spot[empty] = -1
    top[empty] = -1
    best = plan[np.arange(plan.shape[0]), np.maximum(spot, 0)]
    prob = np.divide(best, total, out=np.full(plan.shape[0], np.nan), where=~empty)
    return {"spot": spot.astype(np.int64), "probability": prob, "top_spots": top}
