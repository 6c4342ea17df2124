"""Shared fixtures: small synthetic problems and the shared real datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _shared_dataset(name: str) -> Path:
    path = DATA / name / f"{name}.h5ad"
    if not path.exists():
        pytest.skip(f"shared dataset {name} not found at ../shared/data (see ../shared/README.md)")
    return path


@pytest.fixture
def shared_dataset():
    """``shared_dataset(name)``: path of a shared real dataset; skips the test when it is absent."""
    return _shared_dataset


@pytest.fixture
def counts_problem() -> tuple[np.ndarray, np.ndarray]:
    """Poisson counts: 300 cells and 25 spots over 40 genes with cell-type structure."""
    rng = np.random.default_rng(7)
    n_types, genes = 5, 40
    programmes = rng.gamma(0.6, 3.0, size=(n_types, genes))
    cell_type = rng.integers(0, n_types, size=300)
    sc = rng.poisson(programmes[cell_type] * rng.gamma(4.0, 0.5, size=(300, 1))).astype(np.float64)
    mix = rng.dirichlet(np.full(n_types, 0.3), size=25)
    spots = rng.poisson(20 * mix @ programmes).astype(np.float64)
    return sc, spots


@pytest.fixture
def kernel_problem() -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """A random cost in [0, 1] of 257 rows x 31 columns, eps and non-uniform marginals."""
    rng = np.random.default_rng(3)
    cost = rng.random((257, 31))
    p = rng.random(257) + 0.1
    q = rng.random(31) + 0.1
    return cost, p / p.sum(), q / q.sum(), 0.05


@pytest.fixture(scope="module")
def cluster_client():
    """A 2-worker LocalCluster's client, started once per test module that needs one."""
    from ssa_dask.cluster import connect

    with connect("local", n_workers=2) as executor:
        yield executor.client
