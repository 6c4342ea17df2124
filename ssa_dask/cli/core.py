"""``ssa-dask align``, ``ssa-dask ingest`` and ``ssa-dask demo``."""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from ssa_dask.cli._app import app, console, fail
from ssa_dask.errors import OutputExistsError, SSAError

log = logging.getLogger("ssa_dask")


class Domain(str, Enum):
    """Choice of Sinkhorn domain on the command line."""

    auto = "auto"
    log = "log"
    kernel = "kernel"


class Storage(str, Enum):
    """Where kernel blocks live."""

    auto = "auto"
    memory = "memory"
    zarr = "zarr"


def setup_logging(verbose: bool) -> None:
    """Log ``ssa_dask`` messages through rich (INFO, or DEBUG with ``verbose``)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    import distributed  # noqa: F401  (creates its loggers, which we quieten below)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("distributed"):
            logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


def refuse_existing(path: Path, overwrite: bool) -> None:
    """Stop before any work when ``path`` exists and ``--overwrite`` was not given."""
    if path.exists() and not overwrite:
        fail(f"{path} exists; pass --overwrite to replace it")


def _cluster_kwargs(n_workers: int | None, threads_per_worker: int | None, memory_limit: str | None,
                    cluster_config: Path | None) -> dict[str, Any]:
    options: dict[str, Any] = {"n_workers": n_workers, "threads_per_worker": threads_per_worker, "memory_limit": memory_limit}
    if cluster_config is not None:
        import yaml

        options["cluster_options"] = yaml.safe_load(cluster_config.read_text()) or {}
    return options


@app.command("align")
def align_command(
    sc: Path = typer.Argument(..., help="scRNA matrix: .h5ad, AnnData-Zarr store, or Zarr array (cells x genes)."),
    spots: Path = typer.Argument(..., help="Spot matrix, same formats (spots x genes; obs x,y or obsm spatial)."),
    out: Path = typer.Option(..., "--out", "-o", help="Result Zarr store (xarray Dataset)."),
    n_genes: int = typer.Option(5000, help="Top-variance scRNA genes to use."),
    lam: float = typer.Option(0.05, help="Relative entropic regularisation: eps = lam * max(D)."),
    eps: float | None = typer.Option(None, help="Absolute eps (overrides --lam)."),
    tol: float = typer.Option(1e-6, help="Stop when the marginal L1 error is below this."),
    max_iter: int = typer.Option(2000, help="Iteration cap."),
    top_k: int = typer.Option(1, help="Best spots reported per cell."),
    marginals: str = typer.Option("total", help="'total' (per-row totals, the method) or 'uniform'."),
    log_domain: Domain = typer.Option(Domain.auto, help="Sinkhorn domain."),
    kernel_storage: Storage = typer.Option(Storage.auto, help="Kernel blocks in worker memory or streamed from Zarr."),
    kernel_path: Path | None = typer.Option(None, help="Directory for the temporary Zarr store of kernel blocks (removed after the run)."),
    block_rows: int | None = typer.Option(None, help="Cells per block (default: ~128 MiB blocks)."),
    checkpoint: Path | None = typer.Option(None, help="Save Sinkhorn state here every 10 iterations; resume from it if present."),
    log1p: bool = typer.Option(False, "--log1p", help="Apply log(1+x) to both matrices first."),
    sc_layer: str | None = typer.Option(None, help="AnnData layer of the scRNA matrix."),
    spots_layer: str | None = typer.Option(None, help="AnnData layer of the spot matrix."),
    gene_key: str | None = typer.Option(None, help="var column holding gene names."),
    scheduler: str = typer.Option("local", help="'local' (embedded LocalCluster), 'threads', 'slurm', 'kubernetes', or a scheduler address."),
    n_workers: int | None = typer.Option(None, help="Workers of a cluster started here."),
    threads_per_worker: int | None = typer.Option(None, help="Threads per worker of a LocalCluster."),
    memory_limit: str | None = typer.Option(None, help="Memory limit per worker, e.g. '8GiB'."),
    cluster_config: Path | None = typer.Option(None, help="YAML file of keyword arguments for the SLURM/Kubernetes cluster."),
    obs_out: Path | None = typer.Option(None, help="Also write the result as AnnData obs columns (an obs-only .h5ad)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Align every cell of SC to a spot of SPOTS and write the assignment to OUT."""
    import ssa_dask
    from ssa_dask.assign import write_result
    from ssa_dask.cluster import connect

    setup_logging(verbose)
    refuse_existing(out, overwrite)
    if obs_out is not None:
        refuse_existing(obs_out, overwrite)
    domain = {"auto": "auto", "log": True, "kernel": False}[log_domain.value]
    try:
        with connect(scheduler, progress=True, **_cluster_kwargs(n_workers, threads_per_worker, memory_limit, cluster_config)) as executor:
            result = ssa_dask.align(
                str(sc), str(spots), n_genes=n_genes, lam=lam, eps=eps, marginals=marginals, tol=tol, max_iter=max_iter,
                log_domain=domain, top_k=top_k, block_rows=block_rows, kernel_storage=kernel_storage.value,
                kernel_path=str(kernel_path) if kernel_path else None, client=executor.client, sc_layer=sc_layer,
                spots_layer=spots_layer, gene_key=gene_key, log1p=log1p, progress=True,
                checkpoint=str(checkpoint) if checkpoint else None,
            )
        write_result(result, str(out), overwrite=overwrite)
        if obs_out is not None:
            _write_obs(result, obs_out, overwrite)
    except (SSAError, OutputExistsError) as exc:
        fail(str(exc))
    _print_summary(result, out)


def _write_obs(result: Any, path: Path, overwrite: bool) -> None:
    import anndata as ad
    import pandas as pd

    from ssa_dask.assign import add_to_anndata
    from ssa_dask.io import write_atomically

    adata = ad.AnnData(obs=pd.DataFrame(index=pd.Index(result["cell"].values, dtype=str)))
    add_to_anndata(adata, result)
    adata.uns["ssa"] = {k: v for k, v in result.attrs.items() if k != "column_potential"}
    write_atomically(path, lambda tmp: adata.write_h5ad(tmp), overwrite=overwrite)


def _print_summary(result: Any, out: Path) -> None:
    attrs = result.attrs
    console.print(
        f"[green]aligned[/] {result.sizes['cell']:,} cells: {attrs['n_iter']} Sinkhorn iterations, marginal error "
        f"{attrs['marginal_error']:.2e} ({'converged' if attrs['converged'] else 'NOT converged'}), "
        f"lam={attrs['lam']:.3g}, eps={attrs['eps']:.3g}, {attrs['n_genes_used']} genes -> {out}"
    )


@app.command("ingest")
def ingest_command(
    source: Path = typer.Argument(..., help="Input .h5ad file."),
    target: Path = typer.Argument(..., help="Output AnnData-on-Zarr store."),
    chunk_rows: int = typer.Option(8192, help="Rows per Zarr chunk."),
    layer: str | None = typer.Option(None, help="Layer to store as X."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace TARGET if it exists."),
) -> None:
    """Rewrite an .h5ad into a row-chunked Zarr store, streaming (never loads X whole)."""
    from ssa_dask.io import ingest

    setup_logging(False)
    refuse_existing(target, overwrite)
    try:
        ingest(source, target, layer=layer, chunk_rows=chunk_rows, overwrite=overwrite)
    except SSAError as exc:
        fail(str(exc))
    console.print(f"[green]wrote[/] {target}")


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("ssa_demo.zarr"), "--out", "-o", help="Where to write the result."),
    n_cells: int = typer.Option(6000, help="Cells of the synthetic tissue."),
    n_genes: int = typer.Option(300, help="Genes of the synthetic tissue."),
    n_spots: int = typer.Option(400, help="Approximate number of grid spots."),
    fraction: float = typer.Option(0.5, help="Fraction of cells sub-sampled as the 'scRNA' set."),
    seed: int = typer.Option(0, help="Seed of the tissue and the sub-sample."),
    scheduler: str = typer.Option("local", help="'local' (embedded LocalCluster), 'threads', or a scheduler address."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Simulate a tissue, bin it into spots as the SSA paper does, align, and score against the truth."""
    import ssa_dask
    from ssa_dask.assign import write_result
    from ssa_dask.simulate import bin_to_spots, synthetic_tissue

    setup_logging(False)
    refuse_existing(out, overwrite)
    tissue = synthetic_tissue(n_cells=n_cells, n_genes=n_genes, seed=seed)
    spots, cell_spot = bin_to_spots(tissue, n_spots=n_spots)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(tissue.n_obs, size=max(1, int(fraction * tissue.n_obs)), replace=False))
    sc = tissue[chosen].copy()
    log.info("synthetic tissue: %d cells x %d genes, %d types; %d spots; %d cells sub-sampled as scRNA",
             tissue.n_obs, tissue.n_vars, tissue.obs["cell_type"].nunique(), spots.n_obs, sc.n_obs)
    try:
        result = ssa_dask.align(sc, spots, log1p=True, client=scheduler, progress=True)
        write_result(result, str(out), overwrite=overwrite)
    except SSAError as exc:
        fail(str(exc))
    true_xy = spots.obsm["spatial"][cell_spot[chosen]]
    pred_xy = np.column_stack([result["spot_x"].values, result["spot_y"].values])
    random_xy = spots.obsm["spatial"][rng.integers(0, spots.n_obs, size=sc.n_obs)]
    spot_size = spots.uns["ssa_simulation"]["spot_size"]
    table = Table(title=f"SSA demo: {sc.n_obs:,} cells -> {spots.n_obs} spots (grid side {spot_size:.1f})")
    for column in ("assignment", "mean Euclidean (grid units)", "exact spot"):
        table.add_column(column)
    for name, xy, exact in (("SSA", pred_xy, result["spot"].values == cell_spot[chosen]),
                            ("random", random_xy, None)):
        distance = np.linalg.norm(xy - true_xy, axis=1).mean() / spot_size
        table.add_row(name, f"{distance:.3f}", "-" if exact is None else f"{exact.mean():.1%}")
    Console().print(table)
    _print_summary(result, out)
