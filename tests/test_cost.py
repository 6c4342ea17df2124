"""Blockwise Pearson cost: sparse product with rank-one corrections equals the dense definition."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from ssa_dask.cost import PearsonCost
from ssa_dask.reference import pearson_cost


def _cost_for(sc: np.ndarray, spots: np.ndarray) -> PearsonCost:
    return PearsonCost.from_statistics(sc.mean(0), sc.std(0), spots, spots.mean(0), spots.std(0))


def test_dense_block_equals_reference(counts_problem):
    sc, spots = counts_problem
    np.testing.assert_allclose(_cost_for(sc, spots).cost(sc), pearson_cost(sc, spots), atol=2e-6)


@pytest.mark.parametrize("density", [0.01, 0.5])
def test_sparse_paths_equal_reference(density):
    """Very sparse blocks take the sparse product; denser ones are densified per block."""
    rng = np.random.default_rng(0)
    sc = sp.random(400, 300, density=density, random_state=1, format="csr", dtype=np.float64) * 10
    # one non-zero in every row and every column, so no cell is empty and no gene constant
    sc = sc + sp.csr_matrix((np.ones(400), (np.arange(400), np.arange(400) % 300)), shape=(400, 300))
    spots = rng.poisson(2.0, size=(12, 300)).astype(float)
    dense = sc.toarray()
    cost = _cost_for(dense, spots)
    np.testing.assert_allclose(cost.cost(sc.tocsr()), pearson_cost(dense, spots), atol=2e-5)


def test_constant_cell_gives_nan_row_and_constant_spot_raises(counts_problem):
    from ssa_dask import SSAInputError

    sc, spots = counts_problem
    cost = _cost_for(sc, spots)
    constant_cell = sc.mean(0, keepdims=True) + sc.std(0, keepdims=True) * 2.0  # z-profile = 2 everywhere
    assert np.isnan(cost.cost(constant_cell)).all()
    # the third spot is the mean of all three, so its z-profile is 0 in every gene
    varying = spots[0] != spots[1]
    flat_spots = np.vstack([spots[0], spots[1], (spots[0] + spots[1]) / 2])[:, varying]
    with pytest.raises(SSAInputError, match="constant z-profile"):
        _cost_for(sc[:, varying], flat_spots)
