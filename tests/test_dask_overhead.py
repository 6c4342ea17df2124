"""Distributed Sinkhorn iterations with little scheduling: one task per worker thread per iteration (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest

from ssa_dask.cluster import Executor
from ssa_dask.kernel.build import kernel_from_array
from ssa_dask.sinkhorn import sinkhorn


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
    nthreads = cluster_client.nthreads()
    p_blocks = kernel.row_vector(p, executor)
    sinkhorn(kernel, p_blocks, q, tol=1e-300, max_iter=1, executor=executor)  # task groups fixed at the first call
    with get_task_stream(cluster_client) as stream:
        result = sinkhorn(kernel, p_blocks, q, tol=1e-300, max_iter=5, executor=executor)
    assert len(stream.data) == 5 * sum(nthreads.values())  # nothing else is computed during the iterations
    reference = _dense_sinkhorn(K.astype(np.float64), p, q, eps, 5)
    np.testing.assert_allclose(result.g, reference, rtol=0, atol=1e-7)
    assert not np.allclose(_dense_sinkhorn(K.astype(np.float64), p, q, eps, 4), reference, rtol=0, atol=1e-7)
    kernel.close()
