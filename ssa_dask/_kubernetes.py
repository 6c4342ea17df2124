"""Kubernetes clusters through the Dask operator (dask-kubernetes), for :func:`ssa_dask.cluster.connect`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ssa_dask.errors import SSAInputError


@contextlib.contextmanager
def kubernetes_cluster(n_workers: int, options: dict[str, Any], *, insecure: bool = False,
                       timeout: float = 600.0) -> Iterator[Any]:
    """A ``dask_kubernetes.operator.KubeCluster`` scaled to ``n_workers``, closed on exit.

    Parameters
    ----------
    n_workers : int
        Worker pods to start.
    options : dict
        Keyword arguments of ``KubeCluster`` (e.g. from ``deploy/kubernetes/cluster.yaml``).
    """
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError as exc:
        raise SSAInputError(f"scheduler 'kubernetes' needs `pip install 'ssa_dask[kubernetes]'` ({exc})") from exc
    cluster = KubeCluster(**options)
    try:
        cluster.scale(n_workers)
        yield cluster
    finally:
        cluster.close()
