"""Every kernel storage behind the same interface gives the dense maths."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from ssa_dask.cluster import Executor
from ssa_dask.kernel.build import build_kernel, kernel_from_array
from ssa_dask.kernel.storage import DiskBlocks, KernelStorage, MemoryBlocks


@pytest.mark.parametrize("block_rows", [50, 257])
def test_every_storage_gives_the_dense_column_marginal_top_k_and_products(tmp_path, kernel_problem, block_rows):
    cost, p, q, eps = kernel_problem
    K = np.exp(-cost.astype(np.float32) / np.float32(eps)).astype(np.float64)
    executor = Executor()
    memory = kernel_from_array(np.exp(-cost / eps), eps=eps, block_rows=block_rows)
    disk = build_kernel(da.from_array(cost.astype(np.float32), chunks=(block_rows, -1)), executor, eps=eps,
                        storage="zarr", path=tmp_path)
    assert isinstance(memory.storage, MemoryBlocks) and isinstance(disk.storage, DiskBlocks)
    g = np.random.default_rng(1).normal(size=cost.shape[1]) * eps
    b = np.exp(g / eps)
    a = p / (K @ b)
    plan = a[:, None] * K * b[None, :]
    v_cells, v_spots = np.arange(cost.shape[0], dtype=float), np.arange(cost.shape[1], dtype=float)
    for kernel in (memory, disk):
        assert isinstance(kernel.storage, KernelStorage)
        np.testing.assert_allclose(kernel.column_marginal(p, g, executor), plan.sum(0), rtol=2e-5)
        index, probability, f = kernel.top_k(p, g, 3, executor)
        rows = plan / plan.sum(1, keepdims=True)
        np.testing.assert_array_equal(index[:, 0], rows.argmax(1))
        np.testing.assert_allclose(probability, np.sort(rows, 1)[:, ::-1][:, :3], rtol=2e-5)
        np.testing.assert_allclose(np.exp(f / eps), a, rtol=2e-5)
        np.testing.assert_allclose(kernel.apply(v_spots, 1, executor), K @ v_spots, rtol=2e-5)
        np.testing.assert_allclose(kernel.apply(v_cells, 0, executor), K.T @ v_cells, rtol=2e-5)
    disk.close()
    assert not disk.storage.store.root.exists() and list(tmp_path.iterdir()) == []
