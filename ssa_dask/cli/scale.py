"""``ssa-dask synth``: write an atlas-scale synthetic data set (cells and spots) to Zarr."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ssa_dask.cli._app import app, fail
from ssa_dask.errors import SSAError
from ssa_dask.evaluation.synth import SynthParams, write_synth


@app.command("synth")
def synth(
    out: Path = typer.Argument(..., help="Output directory; gets cells.zarr, spots.zarr and synth.json."),
    cells: int = typer.Option(100_000, "--cells", help="Number of cells N."),
    genes: int = typer.Option(5000, "--genes", help="Number of genes G."),
    spots: int = typer.Option(4000, "--spots", help="Number of spots S (square grid)."),
    density: float = typer.Option(0.1, "--density", help="Target fraction of non-zero cell entries."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random draw."),
    chunk_rows: int = typer.Option(10_000, "--chunk-rows", help="Cells generated and appended per step."),
    types: int = typer.Option(8, "--types", help="Number of cell types."),
    cells_per_spot: int = typer.Option(10, "--cells-per-spot", help="Cells summed into each spot."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT when it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Write a sparse synthetic scRNA-seq matrix and its spot matrix, chunk by chunk, as AnnData-on-Zarr.

    Cell types occupy spatial domains; obs["true_spot"] and obs["domain"] of the cells record the
    truth. Peak memory stays at a few chunks whatever --cells.
    """
    console = Console(stderr=True)
    try:
        params = SynthParams(
            n_cells=cells,
            n_genes=genes,
            n_spots=spots,
            density=density,
            seed=seed,
            n_types=types,
            cells_per_spot=cells_per_spot,
        )
        start = time.perf_counter()
        with Progress(
            TextColumn("cells"),
            BarColumn(),
            TextColumn("{task.completed:,}/{task.total:,}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=quiet,
        ) as progress:
            task = progress.add_task("cells", total=cells)
            paths = write_synth(
                out,
                params,
                chunk_rows=chunk_rows,
                overwrite=overwrite,
                on_chunk=lambda done, _total: progress.update(task, completed=done),
            )
    except SSAError as err:
        fail(str(err))
    console.print(
        f"wrote {paths.cells} ({cells:,} x {genes:,}) and {paths.spots} ({spots:,} x {genes:,}) "
        f"in {time.perf_counter() - start:.1f} s"
    )
