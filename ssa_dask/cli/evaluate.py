"""``ssa-dask simulate`` and ``ssa-dask benchmark``: the paper's semi-simulation protocol as commands."""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler

from ssa_dask.cli._app import app, fail
from ssa_dask.errors import OutputExistsError, SSAError, SSAInputError

_ALL = "ssa,distmap,spaotsc,tangram,seurat,novosparc,moscot,random"


def _read(path: Path):
    import anndata as ad

    if not path.exists():
        raise SSAInputError(f"{path} does not exist")
    if path.suffix == ".zarr" or path.is_dir():
        return ad.read_zarr(path)
    return ad.read_h5ad(path)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise SSAInputError(f"{what} must be comma-separated numbers, got {text!r}") from err


def _grid(spot_size: float | None, n_spots: int | None) -> tuple[float | None, int | None]:
    if spot_size is not None and n_spots is not None:
        raise SSAInputError("give --spot-size or --n-spots, not both")
    if spot_size is None and n_spots is None:
        return None, 500
    return spot_size, n_spots


@app.command("simulate")
def simulate(
    input: Path = typer.Argument(..., help="Single-cell-resolution slide (.h5ad or AnnData .zarr) with obs x, y, cell type."),
    out_dir: Path = typer.Argument(..., help="Output folder: spots.h5ad, replicates/, truth.csv, simulation.json."),
    spot_size: float | None = typer.Option(None, "--spot-size", help="Grid square side, in coordinate units."),
    n_spots: int | None = typer.Option(None, "--n-spots", help="Target number of non-empty squares (default 500)."),
    replicates: int = typer.Option(10, "--replicates", "-r", help="Number of replicate scRNA-seq sets."),
    fraction: float | None = typer.Option(None, "--fraction", help="Fraction of cells per replicate (default 0.5)."),
    n_cells: int | None = typer.Option(None, "--n-cells", help="Cells per replicate (instead of --fraction)."),
    seed: int = typer.Option(0, "--seed", help="Base seed of the sub-sampling."),
    log1p: bool = typer.Option(True, "--log1p/--no-log1p", help="Apply log(A+1) to replicates and spot means (default ON here, unlike `align`: these commands bin raw counts themselves); use --no-log1p for already log-normalised data."),
    cell_type_key: str = typer.Option("cell_type", "--cell-type-key", help="obs column holding cell types."),
    layer: str | None = typer.Option(None, "--layer", help="Expression layer to use instead of X."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
) -> None:
    """Cut a slide into grid spots (mean expression, centroid) and draw replicate scRNA-seq sets with their true spots."""
    from ssa_dask.evaluation.simulate import (
        bin_to_spots,
        sample_replicates,
        truth_table,
        write_simulation,
    )

    console = Console(stderr=True)
    try:
        start = time.perf_counter()
        size, target = _grid(spot_size, n_spots)
        adata = _read(input)
        spots, cell_spot = bin_to_spots(adata, spot_size=size, n_spots=target, layer=layer, log1p=log1p, cell_type_key=cell_type_key)
        reps = sample_replicates(
            adata, n_replicates=replicates, fraction=fraction, n_cells=n_cells, seed=seed, log1p=log1p,
            true_spot=cell_spot, layer=layer, cell_type_key=cell_type_key,
        )
        truth = truth_table(adata, spots, cell_spot, cell_type_key=cell_type_key)
        params = {"input": input.name, "seed": seed, "fraction": fraction, "n_cells_per_replicate": n_cells, "log1p": log1p}
        write_simulation(out_dir, spots, reps, truth, overwrite=overwrite, params=params)
    except SSAError as err:
        fail(str(err))
    side = spots.uns["ssa_simulation"]["spot_size"]
    console.print(
        f"{adata.n_obs:,} cells -> {spots.n_obs:,} spots of side {side:.4g} "
        f"(median {spots.obs['n_cells'].median():.0f} cells per spot); {replicates} replicates of {reps[0].n_obs:,} cells "
        f"written to {out_dir} in {time.perf_counter() - start:.1f} s"
    )


@app.command("benchmark")
def benchmark(
    input: Path = typer.Argument(..., help="Single-cell-resolution slide (.h5ad or AnnData .zarr) with obs x, y, cell type."),
    out_dir: Path = typer.Argument(..., help="Output folder for tables, figures and summary.md."),
    methods: str = typer.Option(_ALL, "--methods", "-m", help="Comma-separated methods to compare."),
    replicates: int = typer.Option(10, "--replicates", "-r", help="Number of replicate scRNA-seq sets."),
    spot_size: float | None = typer.Option(None, "--spot-size", help="Grid square side, in coordinate units."),
    n_spots: int | None = typer.Option(None, "--n-spots", help="Target number of non-empty squares (default 500)."),
    fraction: float | None = typer.Option(None, "--fraction", help="Fraction of cells per replicate (default 0.5)."),
    n_cells: int | None = typer.Option(None, "--n-cells", help="Cells per replicate (instead of --fraction)."),
    seed: int = typer.Option(0, "--seed", help="Base seed (replicate r is mapped with seed + r)."),
    log1p: bool = typer.Option(True, "--log1p/--no-log1p", help="Apply log(A+1) to replicates and spot means (default ON here, unlike `align`: these commands bin raw counts themselves); use --no-log1p for already log-normalised data."),
    lambdas: str = typer.Option("0.005,0.01,0.02,0.05,0.1,0.2", "--lambdas", help="SSA lam values to sweep ('' for none)."),
    n_genes_sweep: str = typer.Option("10,25,50,100,200,5000", "--n-genes-sweep", help="SSA n_genes values to sweep ('' for none)."),
    sweep_replicates: int = typer.Option(3, "--sweep-replicates", help="Replicates used by the sweeps."),
    cell_type_key: str = typer.Option("cell_type", "--cell-type-key", help="obs column holding cell types."),
    layer: str | None = typer.Option(None, "--layer", help="Expression layer to use instead of X."),
    name: str | None = typer.Option(None, "--name", help="Data set name in the summary (default: file stem)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into OUT_DIR even if it holds a summary.md."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Run the semi-simulation benchmark: every method on every replicate, tables (CSV, Markdown), figures, Wilcoxon tests.

    A method that is unavailable (missing optional dependency) or fails is reported in the tables
    with its reason; the run goes on.
    """
    from ssa_dask.evaluation import (
        BenchmarkConfig,
        config_dict,
        run_benchmark,
        write_outputs,
    )

    console = Console(stderr=True)
    log = logging.getLogger("ssa_dask")
    handlers: list[logging.Handler] = []
    try:
        if (out_dir / "summary.md").exists() and not overwrite:
            raise OutputExistsError(f"{out_dir / 'summary.md'} exists; pass --overwrite to replace the results")
        size, target = _grid(spot_size, n_spots)
        cfg = BenchmarkConfig(
            methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
            n_replicates=replicates,
            spot_size=size,
            n_spots=target,
            fraction=fraction,
            n_cells=n_cells,
            seed=seed,
            log1p=log1p,
            cell_type_key=cell_type_key,
            layer=layer,
            lambdas=tuple(_floats(lambdas, "--lambdas")),
            n_genes_sweep=tuple(int(v) for v in _floats(n_genes_sweep, "--n-genes-sweep")),
            sweep_replicates=sweep_replicates,
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(out_dir / "benchmark.log", mode="w")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers = [file_handler, RichHandler(console=console, show_path=False, level=logging.WARNING)]
        for h in handlers:
            log.addHandler(h)
        log.setLevel(logging.INFO)
        adata = _read(input)
        result = run_benchmark(adata, cfg, progress=not quiet, name=name or input.stem)
        files = write_outputs(result, out_dir)
        record = {
            "input": input.name,
            "config": config_dict(cfg),
            "seconds": result.seconds,
            "cell_filter": result.dataset["cell_filter"],
            "python": platform.python_version(),
        }
        (out_dir / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    except SSAError as err:
        fail(str(err))
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
    console.print(f"wrote {len(files) + 2} files to {out_dir} in {result.seconds / 60:.1f} min; see {out_dir / 'summary.md'}")
