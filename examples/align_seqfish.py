"""Align half of the seqFISH mouse embryo cells to spots binned from the same slide.

Run from the repository root (the shared data lie beside it, in ../shared/data):

    python examples/align_seqfish.py

It follows the SSA paper's semi-simulation: grid spots with the mean expression of their cells,
a sub-sample of cells as the "scRNA" set, SSA, and the distance to each cell's true spot.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np

import ssa_dask
from ssa_dask.evaluation.simulate import bin_to_spots

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "seqfish_mouse_embryo" / "seqfish_mouse_embryo.h5ad"


def main() -> None:
    adata = ad.read_h5ad(DATA)  # log-normalised already: no log1p
    spots, true_spot = bin_to_spots(adata, n_spots=400)
    rng = np.random.default_rng(0)
    cells = adata[np.sort(rng.choice(adata.n_obs, size=adata.n_obs // 2, replace=False))].copy()

    result = ssa_dask.align(cells, spots, top_k=3, client="local", progress=True)  # embedded LocalCluster
    ssa_dask.add_to_anndata(cells, result)  # obs: ssa_spot, ssa_probability, ssa_x, ssa_y

    truth = spots.obsm["spatial"][true_spot[adata.obs_names.get_indexer(cells.obs_names)]]
    error = np.linalg.norm(cells.obs[["ssa_x", "ssa_y"]].to_numpy() - truth, axis=1)
    side = spots.uns["ssa_simulation"]["spot_size"]
    print(result)
    print(f"mean distance to the true spot: {error.mean() / side:.2f} grid units "
          f"({result.attrs['n_iter']} Sinkhorn iterations, lam={result.attrs['lam']})")


if __name__ == "__main__":
    main()
