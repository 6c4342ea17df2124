"""A small alignment problem with cell types and spot coordinates, shared by the plan and explore tests."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def make_problem(seed: int = 7, n_cells: int = 300, n_spots: int = 25, n_genes: int = 40):
    """Poisson counts with cell-type structure, spots with coordinates, and cell types."""
    rng = np.random.default_rng(seed)
    n_types = 5
    programmes = rng.gamma(0.6, 3.0, size=(n_types, n_genes))
    cell_type = rng.integers(0, n_types, size=n_cells)
    sc = rng.poisson(programmes[cell_type] * rng.gamma(4.0, 0.5, size=(n_cells, 1))).astype(np.float64)
    mix = rng.dirichlet(np.full(n_types, 0.3), size=n_spots)
    spots = rng.poisson(20 * mix @ programmes).astype(np.float64)
    coords = rng.random((n_spots, 2)) * 10
    return sc, spots, coords, cell_type


def as_anndata(sc, spots, coords):
    """Cells (CSR) and spots (with obs x, y) as AnnData over genes g0, g1, ..."""
    genes = pd.Index([f"g{i}" for i in range(sc.shape[1])])
    cells = ad.AnnData(sp.csr_matrix(sc), obs=pd.DataFrame(index=[f"c{i}" for i in range(len(sc))]),
                       var=pd.DataFrame(index=genes))
    spot_obs = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1]}, index=[f"s{j}" for j in range(len(spots))])
    return cells, ad.AnnData(spots, obs=spot_obs, var=pd.DataFrame(index=genes))
