"""Out-of-core alignment: ingest an h5ad into chunked Zarr, stream the kernel from Zarr.

    python examples/out_of_core.py OUT_DIR

With real atlases, `ssa-dask ingest atlas.h5ad atlas.zarr` once, then align from the Zarr store:
cells are read chunk by chunk on the workers, and with `kernel_storage="zarr"` the cell x spot
kernel lives on disk and is streamed once per Sinkhorn iteration.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad

import ssa_dask
from ssa_dask.evaluation.simulate import bin_to_spots

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "xenium_breast_scider" / "xenium_breast_scider.h5ad"


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    cells_store = ssa_dask.ingest(DATA, out_dir / "xenium_cells.zarr", chunk_rows=2048, overwrite=True)
    spots, _ = bin_to_spots(ad.read_h5ad(DATA), n_spots=400)
    spots.write_h5ad(out_dir / "xenium_spots.h5ad")
    result = ssa_dask.align(
        str(cells_store), str(out_dir / "xenium_spots.h5ad"),
        log1p=True,                       # raw counts: log(1 + x) as the paper does
        kernel_storage="zarr",            # stream the kernel from disk
        kernel_path=str(out_dir),         # scratch directory for the kernel store (removed afterwards)
        client="local", progress=True,
    )
    ssa_dask.write_result(result, str(out_dir / "assignment.zarr"), overwrite=True)
    print(result.attrs["kernel_storage"], result.attrs["n_iter"], "iterations ->", out_dir / "assignment.zarr")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "ssa_out_of_core"))
