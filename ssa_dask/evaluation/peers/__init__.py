"""Peer methods run side by side with SSA behind one interface.

>>> from ssa_dask.evaluation.peers import run_method, available_methods
>>> available_methods()                      # name -> None if it can run, else why not
>>> res = run_method("distmap", sc_adata, spots_adata, seed=0)
>>> res.spot, res.seconds, res.peak_memory_bytes

Every method gets the same :class:`~ssa_dask.evaluation.peers.base.PeerProblem` (SSA's gene rule: top-5000
variance genes of the cells intersected with the spot genes) and returns a
:class:`MappingResult` with one spot row index per cell.

========== ===================================================== ==============================
name       method                                                needs
========== ===================================================== ==============================
ssa        :func:`ssa_dask.align` (this package)                 --
ssa_refined ``align(refine=50)``, uniform p, q ∝ sqrt(cells/spot)  --
random     uniform random spot per cell (the floor)              --
distmap    DistMap (Karaiskos et al. 2017): binarise + MCC        --
spaotsc    SpaOTsc (Cang & Nie 2020): unbalanced fused GW OT      POT
tangram    Tangram (Biancalani et al. 2021), ``mode="cells"``     torch, tangram-sc
seurat     Seurat v3+ anchors, spot identity as transferred label ``Rscript`` with R package Seurat
novosparc  novoSpaRc (Nitzan et al. 2019) with the spots as atlas novosparc
moscot     moscot ``MappingProblem`` (Klein et al. 2025)          moscot (JAX)
========== ===================================================== ==============================

The optional dependencies are imported only when a method runs; :func:`available_methods`
looks them up without importing them.

Each method is a module of this package with ``NAME``, ``DENSE_INPUT`` (whether it needs the
dense shared-gene matrices), ``unavailable() -> str | None``, ``load()`` (imports its
dependencies; run before the clock starts, so import time is not counted) and
``map_cells(problem, *, seed, top_k, **options) -> dict`` (``spot`` and optionally
``probability``, ``top_spots``, ``info``), timed and memory-sampled by
:func:`~ssa_dask.evaluation.peers.base.measure`.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType
from typing import Any

import anndata as ad
import numpy as np

from ssa_dask.errors import SSAInputError
from ssa_dask.evaluation.peers.base import MappingResult, PeerProblem, PeerUnavailableError, measure, prepare_problem

__all__ = [
    "METHODS",
    "MappingResult",
    "PeerProblem",
    "PeerUnavailableError",
    "available_methods",
    "run_method",
]

#: Method name -> module in :mod:`ssa_dask.evaluation.peers` implementing it.
METHODS: dict[str, str] = {
    "ssa": "ssa",
    "ssa_refined": "ssa_refined",
    "random": "random_floor",
    "distmap": "distmap",
    "spaotsc": "spaotsc",
    "tangram": "tangram",
    "seurat": "seurat",
    "novosparc": "novosparc",
    "moscot": "moscot",
}


def _module(name: str) -> ModuleType:
    if name not in METHODS:
        raise SSAInputError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return importlib.import_module(f"{__name__}.{METHODS[name]}")


def available_methods() -> dict[str, str | None]:
    """Which peer methods can run here.

    Returns
    -------
    dict
        ``{name: None}`` for a method whose dependencies are found, ``{name: reason}`` (what is
        missing and how to install it) otherwise. Nothing heavy is imported: Python packages are
        looked up with :func:`importlib.util.find_spec`, R with :func:`shutil.which` and one quick
        ``Rscript`` call (cached) that asks whether the Seurat package is installed.
    """
    return {name: _module(name).unavailable() for name in METHODS}


def run_method(
    name: str,
    sc_adata: ad.AnnData,
    spots_adata: ad.AnnData,
    seed: int = 0,
    *,
    n_genes: int = 5000,
    top_k: int = 5,
    **options: Any,
) -> MappingResult:
    """Map the cells onto the spots with one method.

    Parameters
    ----------
    name
        A key of :data:`METHODS`.
    sc_adata
        ``n_cells x genes`` AnnData, already transformed as the protocol wants (e.g. log1p).
    spots_adata
        ``n_spots x genes`` AnnData with spot coordinates in ``obs["x"], obs["y"]`` (or
        ``obsm["spatial"]``).
    seed
        Seed for every random choice the method makes (methods without randomness ignore it).
    n_genes
        Genes used: the ``n_genes`` top-variance genes of the cells that the spots also have.
    top_k
        Number of best spots per cell kept in :attr:`MappingResult.top_spots` (where the method
        gives a score for every spot).
    **options
        Method-specific options; see ``map_cells`` in each method's module.

    Returns
    -------
    MappingResult
        ``seconds`` and ``peak_memory_bytes`` cover ``map_cells`` only: the method's own
        preprocessing, fitting and assignment (and, for Seurat, starting R), not the shared gene
        selection nor the first import of its Python dependencies.

    Raises
    ------
    PeerUnavailableError
        The method's optional dependency is missing (the message says how to install it).
    SSAInputError
        Unknown method or option, or unusable input.
    """
    module = _module(name)
    reason = module.unavailable()
    if reason is not None:
        raise PeerUnavailableError(f"{name} cannot run: {reason}")
    if int(top_k) < 1:
        raise SSAInputError(f"top_k must be at least 1, got {top_k}")
    try:
        module.load()
    except ImportError as err:
        raise PeerUnavailableError(f"{name} cannot run: importing its dependency failed: {err}") from err
    problem = prepare_problem(sc_adata, spots_adata, n_genes=n_genes, dense=module.DENSE_INPUT)
    try:
        inspect.signature(module.map_cells).bind(problem, seed=seed, top_k=top_k, **options)
    except TypeError as err:
        accepted = [p for p in inspect.signature(module.map_cells).parameters if p not in ("problem", "seed", "top_k")]
        raise SSAInputError(f"{name}: {err}; its options are {accepted}") from None
    fields, seconds, peak = measure(lambda: module.map_cells(problem, seed=seed, top_k=top_k, **options))
    return _result(name, problem, fields, seconds, peak)


def _result(name: str, problem: PeerProblem, fields: dict[str, Any], seconds: float, peak: int | None) -> MappingResult:
    spot = np.asarray(fields["spot"], dtype=np.int64)
    if spot.shape != (problem.n_cells,):
        raise RuntimeError(f"{name} returned {spot.shape} spots for {problem.n_cells} cells")
    if spot.size and (spot.min() < -1 or spot.max() >= problem.n_spots):
        raise RuntimeError(f"{name} returned a spot index outside [-1, {problem.n_spots})")
    probability = fields.get("probability")
    top = fields.get("top_spots")
    return MappingResult(
        method=name,
        spot=spot,
        seconds=float(seconds),
        peak_memory_bytes=peak,
        probability=None if probability is None else np.asarray(probability, dtype=np.float64),
        top_spots=None if top is None else np.asarray(top, dtype=np.int64),
        info=dict(fields.get("info", {})),
    )
