"""``ssa-dask align``, ``ssa-dask ingest`` and ``ssa-dask demo``."""

from __future__ import annotations

import logging
import tempfile
import warnings
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from ssa_dask.cli._app import app, console, fail
from ssa_dask.errors import OutputExistsError, OutputWriteError, SSAError, SSAInputError

log = logging.getLogger("ssa_dask")


class Domain(str, Enum):
    """Choice of Sinkhorn domain on the command line."""

    auto = "auto"
    log = "log"
    kernel = "kernel"


class KernelMethod(str, Enum):
    """Dense kernel, or the sparse multiscale one."""

    dense = "dense"
    multiscale = "multiscale"


class Storage(str, Enum):
    """Where kernel blocks live."""

    auto = "auto"
    memory = "memory"
    zarr = "zarr"


class KernelDtype(str, Enum):
    """Format of the stored kernel entries."""

    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


def setup_logging(verbose: bool) -> None:
    """Log ``ssa_dask`` messages through rich (INFO, or DEBUG with ``verbose``)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    warnings.showwarning = _log_warning
    import distributed  # noqa: F401  (creates its loggers, which we quieten below)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("distributed"):
            logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                 line: str | None = None) -> None:
    """Show a Python warning as one log line (its class and message), not as a source path and code line."""
    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, message)


def refuse_existing(path: Path, overwrite: bool) -> None:
    """Stop before any work when ``path`` exists and ``--overwrite`` was not given."""
    if path.exists() and not overwrite:
        fail(f"{path} exists; pass --overwrite to replace it")


#: Why ``ssa-dask`` runs on an embedded LocalCluster by default while ``ssa_dask.align`` runs on threads.
SCHEDULER_HELP = (
    "'local' (default): an embedded LocalCluster of worker processes, with memory limits, spilling and a dashboard, "
    "as a batch run wants. 'threads': this process's threads, the default of the Python API (ssa_dask.align), "
    "which starts no processes inside a notebook and ships no in-memory inputs to workers."
)
#: Whole-number input whose largest value (in the rows looked at) exceeds this is reported as raw counts.
RAW_COUNT_MIN_MAX = 10
#: Rows of each input looked at for the raw-count warning (one read of the first rows, before any cluster starts).
RAW_COUNT_ROWS = 1000


def _warn_if_raw_counts(matrix: Any, role: str) -> None:
    """Log a warning when the first rows of ``matrix`` hold only whole numbers above ``RAW_COUNT_MIN_MAX``."""
    import dask
    import scipy.sparse as sp

    n_rows = min(RAW_COUNT_ROWS, matrix.shape[0])
    with dask.config.set(scheduler="sync"):
        head = matrix.X[:n_rows].compute()
    values = head.data if sp.issparse(head) else np.asarray(head).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0 or values.max() <= RAW_COUNT_MIN_MAX or not np.array_equal(values, np.round(values)):
        return
    log.warning("%s: the first %d rows hold only whole numbers up to %g, which looks like raw counts; SSA's Pearson "
                "cost is normally computed on log-normalised data: pass --log1p to apply log(1+x), or --no-log1p to "
                "use the values as they are (and silence this warning)", role, n_rows, float(values.max()))


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
    strict: bool = typer.Option(False, "--strict", help="Exit with code 3 when Sinkhorn does not converge."),
    drop_empty: bool = typer.Option(False, "--drop-empty", help="Leave out cells and spots with zero total expression (logged; reported unassigned, assigned=False) instead of refusing the run."),
    top_k: int = typer.Option(1, help="Best spots reported per cell."),
    marginals: str = typer.Option("total", help="'total' (per-row totals, the method) or 'uniform'."),
    spot_mass: str | None = typer.Option(None, help="Spot capacities q from this column of the spots' obs (e.g. n_cells, cells per spot) instead of per-spot totals; suits spots that are means of their cells."),
    log_domain: Domain = typer.Option(Domain.auto, help="Sinkhorn domain."),
    kernel_storage: Storage = typer.Option(Storage.auto, help="Kernel blocks in worker memory or streamed from Zarr."),
    kernel_path: Path | None = typer.Option(None, help="Scratch directory for the kernel store (removed after the run; shared file system on a multi-node cluster)."),
    kernel_dtype: KernelDtype = typer.Option(KernelDtype.auto, help="Stored kernel entries: float16/bfloat16 rows (each scaled to max 1) halve memory and bytes read per iteration; auto picks float16 only when float32 would not fit in memory. Kernel domain only."),
    kernel: KernelMethod = typer.Option(KernelMethod.dense, help="'dense' (exact) or 'multiscale': a sparse kernel of --n-support nearest spots per cell plus a far field, for slides too large for a dense kernel (checked on a sample of cells)."),
    n_support: int = typer.Option(512, help="Spots kept per cell with --kernel multiscale."),
    block_rows: int | None = typer.Option(None, help="Cells per block (default: ~128 MiB blocks)."),
    checkpoint: Path | None = typer.Option(None, help="Save Sinkhorn state here every 10 iterations; a rerun resumes from it and reuses the kernel store."),
    log1p: bool | None = typer.Option(None, "--log1p/--no-log1p", help="Apply log(1+x) to both matrices first. Default OFF here (inputs are usually normalised already), unlike `simulate` and `benchmark` (default ON, they bin raw counts); without either flag, a warning is logged when the input looks like raw counts."),
    sc_layer: str | None = typer.Option(None, help="AnnData layer of the scRNA matrix."),
    spots_layer: str | None = typer.Option(None, help="AnnData layer of the spot matrix."),
    gene_key: str | None = typer.Option(None, help="var column holding gene names."),
    scheduler: str = typer.Option("local", help=SCHEDULER_HELP + " A scheduler address (tls://host:8786), 'slurm' and 'kubernetes' run on a cluster."),
    n_workers: int | None = typer.Option(None, help="Workers of a cluster started here."),
    threads_per_worker: int | None = typer.Option(None, help="Threads per worker of a LocalCluster."),
    memory_limit: str | None = typer.Option(None, help="Memory limit per worker, e.g. '8GiB'."),
    cluster_config: Path | None = typer.Option(None, help="YAML file of keyword arguments for the SLURM/Kubernetes cluster."),
    connect_timeout: float | None = typer.Option(None, help="Seconds to wait for the scheduler and its workers (default 30; 600 for slurm/kubernetes)."),
    tls_ca_file: Path | None = typer.Option(None, help="CA certificate of a tls:// scheduler."),
    tls_cert: Path | None = typer.Option(None, help="Client certificate for a tls:// scheduler."),
    tls_key: Path | None = typer.Option(None, help="Client key for a tls:// scheduler."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow schedulers without TLS that others can reach (SLURM/Kubernetes)."),
    dashboard_address: str | None = typer.Option(None, help="Dashboard of the embedded cluster (default 127.0.0.1, a free port)."),
    refine: str | None = typer.Option(None, help="Refined mode: N mirror-descent steps on the cost after SSA (spot profiles matched gene-wise and spot-wise), or 'auto' (stop on held-out genes). Default: the SSA method unchanged."),
    refine_eta: float = typer.Option(5.0, help="Step size of --refine."),
    refine_inner: int = typer.Option(20, help="Sinkhorn iterations after each --refine step."),
    obs_out: Path | None = typer.Option(None, help="Also write the result as AnnData obs columns (an obs-only .h5ad)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Align every cell of SC to a spot of SPOTS and write the assignment to OUT.

    Everything that can be checked is checked before a cluster starts: inputs open, outputs
    writable and distinct, options in range, room for the kernel store.
    """
    import ssa_dask
    from ssa_dask.cluster import connect, tls_security
    from ssa_dask.kernel.multiscale import check_sparse_options

    setup_logging(verbose)
    warn_raw_counts = log1p is None
    log1p = bool(log1p)
    domain = {"auto": "auto", "log": True, "kernel": False}[log_domain.value]
    try:
        from ssa_dask.cli import _checks

        refine_value = _checks.refine_steps(refine)
        check_sparse_options(kernel.value, n_support, top_k, domain)
        cells, spot_matrix, security = _preflight(
            sc, spots, out, obs_out, checkpoint, kernel_path, kernel_storage.value, overwrite,
            kernel_dtype=kernel_dtype.value, domain=domain,
            options={"--lam": lam, "--eps": eps, "--tol": tol, "--max-iter": max_iter, "--top-k": top_k,
                     "--block-rows": block_rows, "--n-genes": n_genes, "--refine-eta": refine_eta,
                     "--refine-inner": refine_inner},
            scheduler=scheduler, n_workers=n_workers, threads_per_worker=threads_per_worker, memory_limit=memory_limit,
            read=dict(sc_layer=sc_layer, spots_layer=spots_layer, gene_key=gene_key, spot_mass=spot_mass),
            tls=(tls_ca_file, tls_cert, tls_key), tls_security=tls_security,
        )
        cluster_kwargs = _cluster_kwargs(n_workers, threads_per_worker, memory_limit, cluster_config)
        if connect_timeout is not None:
            cluster_kwargs["timeout"] = connect_timeout
        elif scheduler in ("slurm", "kubernetes"):
            cluster_kwargs["timeout"] = 600.0
        with connect(scheduler, progress=True, security=security, insecure=insecure,
                     dashboard_address=dashboard_address, **cluster_kwargs) as executor:
            if warn_raw_counts:  # read here, once every option and the connection are known to be good
                _warn_if_raw_counts(cells, "scRNA")
                _warn_if_raw_counts(spot_matrix, "spots")
            result = ssa_dask.align(
                cells, spot_matrix, n_genes=n_genes, lam=lam, eps=eps, marginals=marginals, tol=tol,
                max_iter=max_iter, log_domain=domain, top_k=top_k, block_rows=block_rows,
                kernel_storage=kernel_storage.value, kernel_path=str(kernel_path) if kernel_path else None,
                kernel_dtype=kernel_dtype.value, client=executor.client, progress=True, checkpoint=str(checkpoint) if checkpoint else None,
                drop_empty=drop_empty, log1p=log1p, spot_mass=spot_mass, kernel=kernel.value, n_support=n_support,
                refine=refine_value, refine_eta=refine_eta, refine_inner=refine_inner,
            )
        _write_outputs(result, out, obs_out, overwrite)
    except (SSAError, OutputExistsError) as exc:
        fail(str(exc))
    _print_summary(result, out)
    if strict and not result.attrs["converged"]:
        fail(f"Sinkhorn did not converge in {result.attrs['n_iter']} iterations (--strict); the result was written "
             f"to {out}", code=3)


def _preflight(sc: Path, spots: Path, out: Path, obs_out: Path | None, checkpoint: Path | None,
               kernel_path: Path | None, kernel_storage: str, overwrite: bool, *, kernel_dtype: str, domain: Any,
               options: dict[str, Any],
               scheduler: str, n_workers: int | None, threads_per_worker: int | None, memory_limit: str | None,
               read: dict[str, Any], tls: tuple[Path | None, ...], tls_security: Any) -> tuple[Any, Any, Any]:
    """Every check that needs no cluster; returns the (lazily) opened inputs and the TLS credentials."""
    from ssa_dask.align import spot_capacity
    from ssa_dask.cli import _checks
    from ssa_dask.cluster import check_scheduler
    from ssa_dask.io import read_expression
    from ssa_dask.paths import check_outputs
    from ssa_dask.kernel.build import check_dtype_domain
    from ssa_dask.kernel.store import check_free_space, local_directory, store_bytes

    _checks.numeric_options(options)
    check_dtype_domain(kernel_dtype, domain, options["--lam"] if options["--eps"] is None else None, options["--eps"])
    _checks.memory_limit(memory_limit)
    _checks.cluster_size(n_workers, threads_per_worker)
    check_scheduler(scheduler)
    security = tls_security(*(str(p) if p else None for p in tls))
    outputs = check_outputs({"-o": out, "--obs-out": obs_out}, overwrite=overwrite, inputs=[sc, spots])
    if checkpoint is not None:
        check_outputs({"--checkpoint": checkpoint}, overwrite=True, inputs=[sc, spots, *outputs.values()])
    scratch = local_directory(kernel_path, "--kernel-path")
    cells = read_expression(sc, layer=read["sc_layer"], gene_key=read["gene_key"], role="scRNA")
    spot_matrix = read_expression(spots, layer=read["spots_layer"], gene_key=read["gene_key"], role="spots")
    spot_capacity(read["spot_mass"], spot_matrix)
    if options["--top-k"] > spot_matrix.shape[0]:
        raise SSAInputError(f"--top-k {options['--top-k']} exceeds the number of spots ({spot_matrix.shape[0]})")
    if kernel_storage == "zarr":
        store_dtype = "float32" if kernel_dtype == "auto" else kernel_dtype  # auto keeps float32 on disk
        check_free_space(scratch, store_bytes((cells.shape[0], spot_matrix.shape[0]), store_dtype))
    return cells, spot_matrix, security


def _write_outputs(result: Any, out: Path, obs_out: Path | None, overwrite: bool) -> None:
    """Write the result; if that fails at this last step, keep it where the error message says."""
    from ssa_dask.assign import write_result

    try:
        write_result(result, str(out), overwrite=overwrite)
    except OutputWriteError as exc:
        kept = _rescue(result, out)
        raise SSAError(f"{exc}; the computed result was saved to {kept}") from exc
    if obs_out is not None:
        try:
            _write_obs(result, obs_out, overwrite)
        except OutputWriteError as exc:
            raise SSAError(f"wrote {out}, but {exc}") from exc


def _rescue(result: Any, out: Path) -> Path:
    """Save a result that could not go to ``out`` into the temporary directory; return where."""
    import tempfile
    import uuid

    from ssa_dask.assign import write_result

    kept = Path(tempfile.gettempdir()) / f"ssa-result-{out.stem}-{uuid.uuid4().hex[:8]}.zarr"
    write_result(result, str(kept))
    return kept


def _write_obs(result: Any, path: Path, overwrite: bool) -> None:
    import anndata as ad
    import pandas as pd

    from ssa_dask.assign import add_to_anndata
    from ssa_dask.paths import write_atomically

    adata = ad.AnnData(obs=pd.DataFrame(index=pd.Index(result["cell"].values, dtype=str)))
    add_to_anndata(adata, result)
    write_atomically(path, lambda tmp: adata.write_h5ad(tmp), overwrite=overwrite)


def _print_summary(result: Any, out: Path) -> None:
    attrs = result.attrs
    if attrs.get("n_cells_dropped"):
        console.print(f"[yellow]{attrs['n_cells_dropped']:,} empty cell(s) left unassigned (assigned=False)[/]")
    console.print(
        f"[green]aligned[/] {result.sizes['cell']:,} cells: {attrs['n_iter']} Sinkhorn iterations, marginal error "
        f"{attrs['marginal_error']:.2e} ({'converged' if attrs['converged'] else 'NOT converged'}), "
        f"lam={attrs['lam']:.3g}, eps={attrs['eps']:.3g}, {attrs['n_genes_used']} genes -> {out}"
    )
    if "refine_steps" in attrs:
        objective = attrs["refine_objective"]
        console.print(f"[green]refined[/] in {attrs['refine_steps']} step(s) ({attrs['refine_seconds']:.1f} s): objective "
                      f"{objective[0]:.4f} -> {objective[-1]:.4f}")


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
    scheduler: str = typer.Option("local", help=SCHEDULER_HELP + " Or a scheduler address."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Simulate a tissue, bin it into spots as the SSA paper does, align, and score against the truth."""
    import ssa_dask
    from ssa_dask.assign import write_result
    from ssa_dask.evaluation.simulate import bin_to_spots, synthetic_tissue

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
        with tempfile.TemporaryDirectory(prefix="ssa-demo-") as tmp:
            # Aligned from files, as `ssa-dask align` does: workers read their blocks instead of receiving the
            # matrices inside the task graph (which Dask warns about on a cluster).
            sc.write_h5ad(Path(tmp) / "sc.h5ad")
            spots.write_h5ad(Path(tmp) / "spots.h5ad")
            result = ssa_dask.align(Path(tmp) / "sc.h5ad", Path(tmp) / "spots.h5ad", log1p=True, client=scheduler,
                                    progress=True)
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
