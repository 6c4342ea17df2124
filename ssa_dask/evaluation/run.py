"""The paper's benchmark run: semi-simulation, every method on every replicate, scored.

:func:`run_benchmark` cuts a single-cell-resolution slide into grid spots
(:func:`ssa_dask.evaluation.simulate.bin_to_spots`), draws ``R`` replicate scRNA-seq sets
(:func:`ssa_dask.evaluation.simulate.sample_replicates`), maps each replicate with every requested
method through :func:`ssa_dask.evaluation.peers.run_method`, and scores the mappings with
:mod:`ssa_dask.evaluation.metrics`. It also sweeps SSA's ``lam`` and ``n_genes`` (calling
:func:`ssa_dask.align` directly). :func:`ssa_dask.evaluation.report.write_outputs` writes the
tables (CSV and Markdown), the figures and ``summary.md``.

Fairness: the methods see only expression, the spot coordinates, the cells' type labels and the
number of cells per spot (what nuclei segmentation gives; only ``ssa_refined`` uses it, and the
refine ablation shows Tangram with the same counts as its density prior); the cells' coordinates
and true spots are stripped before a method is called, and so are the spots' dominant types.  Every method sees the same cells: cells that no method can place
(zero total expression over the panel, or non-finite values) are removed from the slide before
binning and sampling (:func:`common_cell_filter`), logged, and recorded in the result.

Units. Distances are reported twice: in *grid units* (between the grid indices ``(i, j)`` of the
predicted and the true square, so that neighbouring squares are 1 apart; this is the unit of the
paper's Tables 1-2) and in *coordinate units* (between the centroids of the predicted and the
true spot, in the slide's units). The KL divergence compares the true spots' centroids with the
predicted spots' centroids of each cell type, so a perfect mapping scores 0.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import anndata as ad
import numpy as np
import pandas as pd

from ssa_dask.errors import SSAInputError
from ssa_dask.evaluation.metrics import (
    mean_euclidean,
    mean_manhattan,
    per_type_kl,
    spot_accuracy,
    topk_accuracy,
)
from ssa_dask.evaluation.simulate import bin_to_spots, cell_coordinates, sample_replicates

__all__ = [
    "ALL_METHODS",
    "BenchmarkConfig",
    "common_cell_filter",
    "BenchmarkResult",
    "config_dict",
    "run_benchmark",
    "score_mapping",
]

logger = logging.getLogger(__name__)

ALL_METHODS = ("ssa", "ssa_refined", "distmap", "spaotsc", "tangram", "seurat", "novosparc", "moscot", "random")

_METRICS = ("euclidean_grid", "manhattan_grid", "euclidean", "manhattan", "accuracy", "topk_accuracy")


@dataclass
class BenchmarkConfig:
    """Parameters of one benchmark run.

    Attributes
    ----------
    methods
        Method names for :func:`ssa_dask.evaluation.peers.run_method`.
    n_replicates
        Number ``R`` of replicate scRNA-seq sets.
    spot_size, n_spots
        Grid side (coordinate units) or target number of spots; see
        :func:`ssa_dask.evaluation.simulate.bin_to_spots`. With neither, ``n_spots=500``.
    fraction, n_cells
        Cells per replicate; see :func:`ssa_dask.evaluation.simulate.sample_replicates`.
    seed
        Base seed of the replicates; replicate ``r`` is mapped with ``seed + r``.
    log1p
        Apply ``log(A + 1)`` to the replicates and to the spot means (the paper's transform);
        False for data that are already log-normalised.
    cell_type_key, layer
        ``obs`` column of the cell types; expression layer (None: ``X``).
    lambdas
        Values of SSA's ``lam`` in the sweep (empty: no sweep).
    n_genes_sweep
        Values of SSA's ``n_genes`` in the sweep (empty: no sweep).
    sweep_replicates
        Replicates used by the sweeps (the first ones).
    method_options
        Method name -> keyword options for :func:`ssa_dask.evaluation.peers.run_method`.
    """

    methods: Sequence[str] = ALL_METHODS
    n_replicates: int = 10
    spot_size: float | None = None
    n_spots: int | None = None
    fraction: float | None = None
    n_cells: int | None = None
    seed: int = 0
    log1p: bool = True
    cell_type_key: str = "cell_type"
    layer: str | None = None
    lambdas: Sequence[float] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
    n_genes_sweep: Sequence[int] = (10, 25, 50, 100, 200, 5000)
    sweep_replicates: int = 3
    method_options: dict[str, dict] = field(default_factory=dict)


def config_dict(cfg: BenchmarkConfig) -> dict:
    """The configuration as a JSON-serialisable dict."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}


@dataclass
class BenchmarkResult:
    """Everything :func:`~ssa_dask.evaluation.report.write_outputs` needs.

    Attributes
    ----------
    config
        The configuration.
    spots
        The spots AnnData.
    metrics
        Long table: one row per (replicate, method) with ``status`` (``ok`` / ``failed`` /
        ``unavailable``), ``reason`` and the metric columns (NaN when not ok).
    kl
        Long table ``replicate, method, cell_type, kl``.
    kl_skipped
        Long table ``replicate, method, cell_type, reason`` of the types :func:`per_type_kl` skipped.
    sweeps
        Long table ``sweep, replicate, lam, n_genes, n_genes_used`` and metric columns.
    example
        Replicate 0: ``cell_type``, true ``x``/``y`` and ``<method>_x``/``<method>_y`` predicted
        positions per successful method.
    dataset
        Short description of the input (name, cells, genes) and, under ``cell_filter``, the
        record of :func:`common_cell_filter`.
    seconds
        Wall time of the whole run.
    """

    config: BenchmarkConfig
    spots: ad.AnnData
    metrics: pd.DataFrame
    kl: pd.DataFrame
    kl_skipped: pd.DataFrame
    sweeps: pd.DataFrame
    example: pd.DataFrame
    dataset: dict
    seconds: float


def common_cell_filter(adata: ad.AnnData, layer: str | None = None) -> tuple[ad.AnnData, dict]:
    """Remove the cells that no method can place, so that every method sees the same cells.

    A cell is removed when its total expression over the panel is zero (an empty cell: SSA refuses
    it, its correlation with any spot is undefined) or not finite.  Filtering the slide once, before
    binning and sampling, keeps replicates identical across methods; filtering inside one method
    would score it on fewer replicates than the others.

    Parameters
    ----------
    adata
        The slide.
    layer
        Expression layer (None: ``X``).

    Returns
    -------
    adata : anndata.AnnData
        The slide without those cells (the input itself when none is removed).
    record : dict
        ``rule``, ``n_cells_input``, ``n_cells_removed`` and ``removed`` (up to 20 cell names).
    """
    x = adata.X if layer is None else adata.layers[layer] if layer in adata.layers else None
    if x is None:
        raise SSAInputError(f"layer {layer!r} is not in the AnnData (layers: {list(adata.layers)})")
    totals = x.sum(axis=1)
    totals = np.asarray(totals.compute() if hasattr(totals, "compute") else totals, dtype=np.float64).ravel()
    bad = ~np.isfinite(totals) | (totals == 0)
    record = {
        "rule": "cells with zero or non-finite total expression over the panel removed before binning and sampling",
        "n_cells_input": int(adata.n_obs),
        "n_cells_removed": int(bad.sum()),
        "removed": [str(n) for n in adata.obs_names[bad][:20]],
    }
    if not bad.any():
        return adata, record
    logger.warning(
        "common cell filter: %d of %d cells have zero or non-finite total expression and are removed for every "
        "method (e.g. %s)", record["n_cells_removed"], adata.n_obs, record["removed"][:5],
    )
    return adata[~bad].copy(), record


def _method_inputs(rep: ad.AnnData, spots: ad.AnnData, cell_type_key: str) -> tuple[ad.AnnData, ad.AnnData]:
    """What a method may see: expression, the cells' types, the spot coordinates and the number of
    cells per spot (a nuclei-segmentation count; only ``ssa_refined`` uses it)."""
    sc_obs = rep.obs[["cell_type"]].copy() if "cell_type" in rep.obs else pd.DataFrame(index=rep.obs_names)
    sc = ad.AnnData(X=rep.X, obs=sc_obs, var=rep.var[[]].copy())
    spot_obs = spots.obs[[c for c in ("x", "y", "n_cells") if c in spots.obs]].copy()
    visible = ad.AnnData(X=spots.X, obs=spot_obs, var=spots.var[[]].copy())
    visible.obsm["spatial"] = spot_obs[["x", "y"]].to_numpy()
    return sc, visible


def score_mapping(
    pred_spot: np.ndarray,
    true_spot: np.ndarray,
    spots: ad.AnnData,
    *,
    top_spots: np.ndarray | None = None,
) -> dict[str, float]:
    """Score one mapping of cells to spots.

    Parameters
    ----------
    pred_spot
        ``(n,)`` predicted spot row indices, ``-1`` for unmapped cells (left out of the distances,
        counted wrong by the accuracies).
    true_spot
        ``(n,)`` true spot row indices.
    spots
        Spots AnnData with obs ``x``, ``y``, ``grid_i``, ``grid_j``.
    top_spots
        ``(n, k)`` best spots per cell, if the method gives them.

    Returns
    -------
    dict
        ``n_mapped``, ``euclidean_grid``, ``manhattan_grid`` (grid units), ``euclidean``,
        ``manhattan`` (coordinate units), ``accuracy``, ``topk_accuracy`` and ``k``.
    """
    pred_spot = np.asarray(pred_spot, dtype=np.int64)
    true_spot = np.asarray(true_spot, dtype=np.int64)
    if pred_spot.shape != true_spot.shape:
        raise SSAInputError(f"the method returned {pred_spot.shape[0]} spots for {true_spot.shape[0]} cells")
    if pred_spot.max(initial=-1) >= spots.n_obs:
        raise SSAInputError(f"the method returned spot index {pred_spot.max()} for {spots.n_obs} spots")
    mapped = pred_spot >= 0
    grid = spots.obs[["grid_i", "grid_j"]].to_numpy(dtype=np.float64)
    xy = cell_coordinates(spots)
    out: dict[str, float] = {"n_mapped": int(mapped.sum())}
    if mapped.any():
        p, t = pred_spot[mapped], true_spot[mapped]
        out["euclidean_grid"] = mean_euclidean(grid[p], grid[t])
        out["manhattan_grid"] = mean_manhattan(grid[p], grid[t])
        out["euclidean"] = mean_euclidean(xy[p], xy[t])
        out["manhattan"] = mean_manhattan(xy[p], xy[t])
    else:
        out.update(euclidean_grid=np.nan, manhattan_grid=np.nan, euclidean=np.nan, manhattan=np.nan)
    out["accuracy"] = spot_accuracy(pred_spot, true_spot)
    if top_spots is not None:
        top = np.asarray(top_spots)
        out["topk_accuracy"] = topk_accuracy(top, true_spot)
        out["k"] = int(top.shape[1]) if top.ndim == 2 else 1
    else:
        out["topk_accuracy"], out["k"] = np.nan, np.nan
    return out


def _positions(spot: np.ndarray, xy: np.ndarray) -> np.ndarray:
    pos = np.full((spot.shape[0], 2), np.nan)
    ok = spot >= 0
    pos[ok] = xy[spot[ok]]
    return pos


def _ssa_sweeps(
    cfg: BenchmarkConfig,
    inputs: list[tuple[ad.AnnData, ad.AnnData]],
    true_spots: list[np.ndarray],
    spots: ad.AnnData,
    advance: Callable[[str], None],
) -> pd.DataFrame:
    import ssa_dask

    rows = []
    settings = [("lambda", {"lam": float(lam)}) for lam in cfg.lambdas]
    settings += [("n_genes", {"n_genes": int(n)}) for n in cfg.n_genes_sweep]
    for r, ((sc, visible), truth) in enumerate(zip(inputs, true_spots)):
        for sweep, kwargs in settings:
            advance(f"sweep {sweep} {kwargs} (replicate {r})")
            row = {"sweep": sweep, "replicate": r, "lam": kwargs.get("lam", 0.05), "n_genes": kwargs.get("n_genes", 5000)}
            start = time.perf_counter()
            try:
                ds = ssa_dask.align(sc, visible, **kwargs)
            except Exception as err:  # noqa: BLE001  (a sweep point that fails is recorded, not fatal)
                logger.warning("SSA sweep %s %s on replicate %d failed: %s", sweep, kwargs, r, err)
                rows.append({**row, "status": f"failed: {type(err).__name__}: {err}"})
                continue
            row.update(
                status="ok",
                seconds=time.perf_counter() - start,
                n_genes_used=int(ds.attrs.get("n_genes_used", -1)),
                converged=bool(ds.attrs.get("converged", True)),
                **score_mapping(ds["spot"].to_numpy(), truth, spots),
            )
            rows.append(row)
    return pd.DataFrame(rows)


def run_benchmark(adata: ad.AnnData, cfg: BenchmarkConfig, *, progress: bool = True, name: str = "dataset") -> BenchmarkResult:
    """Run the semi-simulation benchmark on a single-cell-resolution slide.

    For every replicate ``r`` and method ``m``: ``run_method(m, sc_r, spots, seed=cfg.seed + r,
    **cfg.method_options[m])``; a method whose optional dependency is missing
    (:class:`~ssa_dask.evaluation.peers.PeerUnavailableError`) is marked ``unavailable`` and not retried;
    any other exception marks that (replicate, method) ``failed`` with its reason, and the run
    goes on.

    Parameters
    ----------
    adata
        Slide: ``n_cells x n_genes`` with obs ``x``, ``y`` and ``cfg.cell_type_key``.
    cfg
        The configuration.
    progress
        Show a rich progress bar.
    name
        Name of the data set (for the summary).

    Returns
    -------
    BenchmarkResult
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from ssa_dask.evaluation import peers

    start_all = time.perf_counter()
    unknown = sorted(set(cfg.methods) - set(ALL_METHODS))
    if unknown:
        raise SSAInputError(f"unknown methods {unknown}; choose from {list(ALL_METHODS)}")
    if cfg.cell_type_key not in adata.obs:
        raise SSAInputError(f"obs has no cell type column {cfg.cell_type_key!r}")
    n_input_cells = adata.n_obs
    adata, cell_filter = common_cell_filter(adata, cfg.layer)
    spot_size, n_spots = cfg.spot_size, cfg.n_spots
    if spot_size is None and n_spots is None:
        n_spots = 500
    spots, cell_spot = bin_to_spots(
        adata, spot_size=spot_size, n_spots=n_spots, layer=cfg.layer, log1p=cfg.log1p, cell_type_key=cfg.cell_type_key
    )
    logger.info(
        "%s: %d cells -> %d spots of side %.4g (median %.1f cells per spot)",
        name, adata.n_obs, spots.n_obs, spots.uns["ssa_simulation"]["spot_size"], spots.obs["n_cells"].median(),
    )
    reps = sample_replicates(
        adata,
        n_replicates=cfg.n_replicates,
        fraction=cfg.fraction,
        n_cells=cfg.n_cells,
        seed=cfg.seed,
        log1p=cfg.log1p,
        true_spot=cell_spot,
        layer=cfg.layer,
        cell_type_key=cfg.cell_type_key,
    )
    inputs = [_method_inputs(rep, spots, cfg.cell_type_key) for rep in reps]
    true_spots = [rep.obs["true_spot"].to_numpy() for rep in reps]
    spot_xy = cell_coordinates(spots)

    n_sweep = min(cfg.sweep_replicates, len(reps)) * (len(cfg.lambdas) + len(cfg.n_genes_sweep))
    rows, kl_rows, skipped_rows = [], [], []
    unavailable: dict[str, str] = {}
    example = reps[0].obs[["cell_type", "x", "y"]].copy()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not progress,
    ) as bar:
        task = bar.add_task("benchmark", total=len(reps) * len(cfg.methods) + n_sweep)

        def advance(text: str) -> None:
            bar.update(task, description=text)

        for r, ((sc, visible), rep, truth) in enumerate(zip(inputs, reps, true_spots)):
            for method in cfg.methods:
                advance(f"replicate {r}: {method}")
                row = {"replicate": r, "method": method, "n_cells": rep.n_obs}
                if method in unavailable:
                    rows.append({**row, "status": "unavailable", "reason": unavailable[method]})
                    bar.advance(task)
                    continue
                try:
                    res = peers.run_method(method, sc, visible, seed=cfg.seed + r, **cfg.method_options.get(method, {}))
                    scores = score_mapping(res.spot, truth, spots, top_spots=res.top_spots)
                except peers.PeerUnavailableError as err:
                    unavailable[method] = str(err)
                    logger.warning("%s is unavailable: %s", method, err)
                    rows.append({**row, "status": "unavailable", "reason": str(err)})
                    bar.advance(task)
                    continue
                except Exception as err:  # noqa: BLE001  (a failing method is reported in the tables, never fatal)
                    logger.error("%s failed on replicate %d: %s\n%s", method, r, err, traceback.format_exc())
                    rows.append({**row, "status": "failed", "reason": f"{type(err).__name__}: {err}"})
                    bar.advance(task)
                    continue
                peak = res.peak_memory_bytes
                rows.append(
                    {
                        **row,
                        "status": "ok" if scores["n_mapped"] > 0 else "failed",
                        "reason": "" if scores["n_mapped"] > 0 else "no cell mapped",
                        **scores,
                        "seconds": float(res.seconds),
                        "peak_memory_mib": np.nan if peak is None else peak / 2**20,
                    }
                )
                logger.info(
                    "replicate %d %s: euclidean %.3f grid units, accuracy %.3f, %.1f s",
                    r, method, scores["euclidean_grid"], scores["accuracy"], res.seconds,
                )
                pred_xy = _positions(np.asarray(res.spot, dtype=np.int64), spot_xy)
                kl = per_type_kl(rep.obs["cell_type"].to_numpy(), spot_xy[truth], pred_xy)
                kl_rows += [{"replicate": r, "method": method, "cell_type": t, "kl": v} for t, v in kl.items()]
                skipped_rows += [
                    {"replicate": r, "method": method, "cell_type": t, "reason": why}
                    for t, why in kl.attrs["skipped"].items()
                ]
                if r == 0:
                    example[f"{method}_x"], example[f"{method}_y"] = pred_xy[:, 0], pred_xy[:, 1]
                bar.advance(task)

        n_sw = min(cfg.sweep_replicates, len(reps))

        def sweep_step(text: str) -> None:
            advance(text)
            bar.advance(task)

        sweeps = _ssa_sweeps(cfg, inputs[:n_sw], true_spots[:n_sw], spots, sweep_step) if n_sweep else pd.DataFrame()

    metrics = pd.DataFrame(rows)
    for col in (*_METRICS, "n_mapped", "k", "seconds", "peak_memory_mib"):
        if col not in metrics:
            metrics[col] = np.nan
    return BenchmarkResult(
        config=cfg,
        spots=spots,
        metrics=metrics,
        kl=pd.DataFrame(kl_rows, columns=["replicate", "method", "cell_type", "kl"]),
        kl_skipped=pd.DataFrame(skipped_rows, columns=["replicate", "method", "cell_type", "reason"]),
        sweeps=sweeps,
        example=example,
        dataset={"name": name, "n_cells": int(n_input_cells), "n_genes": int(adata.n_vars), "cell_filter": cell_filter},
        seconds=time.perf_counter() - start_all,
    )
