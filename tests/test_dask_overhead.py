"""Distributed Sinkhorn iterations with little scheduling: one task per worker thread per iteration,
and blocks spread evenly over the workers (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest

from ssa_dask.cluster import Executor, block_workers
from ssa_dask.errors import SSAClusterError
from ssa_dask.kernel.build import kernel_from_array
from ssa_dask.sinkhorn import sinkhorn


def test_block_workers_gives_contiguous_runs_of_equal_blocks_per_thread():
    assert block_workers(10, {"tcp://b:2": 3, "tcp://a:1": 1}) == ["tcp://a:1"] * 3 + ["tcp://b:2"] * 7
    rng = np.random.default_rng(0)
    for n_blocks in range(0, 40, 3):
        nthreads = {f"tcp://w{i}:1": int(t) for i, t in enumerate(rng.integers(1, 4, size=int(rng.integers(1, 5))))}
        owners = block_workers(n_blocks, nthreads)
        assert len(owners) == n_blocks
        assert owners == sorted(owners)  # contiguous runs, workers in address order
        per_thread = n_blocks / sum(nthreads.values())
        for worker, threads in nthreads.items():
            held = owners.count(worker)
            assert np.floor(per_thread) * threads <= held <= np.ceil(per_thread) * threads
    with pytest.raises(SSAClusterError, match="no worker"):
        block_workers(3, {})


def _dense_sinkhorn(K: np.ndarray, p: np.ndarray, q: np.ndarray, eps: float, n_iter: int) -> np.ndarray:
    """``g`` after ``n_iter`` fused iterations ``g += eps (log q - log(b * K^T (p / (K b))))``, in float64."""
    g = np.zeros(K.shape[1])
    for _ in range(n_iter):
        b = np.exp(g / eps)
        column = b * (K.T @ (p / (K @ b)))
        g = g + eps * (np.log(q) - np.log(column))
    return g


@pytest.mark.filterwarnings("ignore::ssa_dask.ConvergenceWarning")
def test_sinkhorn_on_a_cluster_runs_one_task_per_thread_per_iteration(cluster_client, kernel_problem):
    from distributed import get_task_stream

    cost, p, q, eps = kernel_problem
    K = np.exp(-cost / eps).astype(np.float32)
    executor = Executor(cluster_client)
    kernel = kernel_from_array(K, eps=eps, block_rows=16, executor=executor)  # 17 blocks
    who_has = cluster_client.who_has(kernel.blocks)
    nthreads = cluster_client.nthreads()
    assert [who_has[block.key][0] for block in kernel.blocks] == block_workers(len(kernel.blocks), nthreads)
    p_blocks = kernel.row_vector(p, executor)
    sinkhorn(kernel, p_blocks, q, tol=1e-300, max_iter=1, executor=executor)  # task groups fixed at the first call
    with get_task_stream(cluster_client) as stream:
        result = sinkhorn(kernel, p_blocks, q, tol=1e-300, max_iter=5, executor=executor)
    assert len(stream.data) == 5 * sum(nthreads.values())  # nothing else is computed during the iterations
    reference = _dense_sinkhorn(K.astype(np.float64), p, q, eps, 5)
    np.testing.assert_allclose(result.g, reference, rtol=0, atol=1e-7)
    assert not np.allclose(_dense_sinkhorn(K.astype(np.float64), p, q, eps, 4), reference, rtol=0, atol=1e-7)
    kernel.close()
