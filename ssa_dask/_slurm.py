"""SLURM clusters through dask-jobqueue, for :func:`ssa_dask.cluster.connect`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ssa_dask.errors import SSAInputError


@contextlib.contextmanager
def slurm_cluster(n_workers: int, options: dict[str, Any], *, insecure: bool = False,
                  timeout: float = 600.0) -> Iterator[Any]:
    """A ``dask_jobqueue.SLURMCluster`` scaled to ``n_workers`` jobs, closed (jobs cancelled) on exit.

    Parameters
    ----------
    n_workers : int
        Worker jobs to start.
    options : dict
        Keyword arguments of ``SLURMCluster`` (e.g. from ``deploy/slurm/cluster.yaml``).
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise SSAInputError(f"scheduler 'slurm' needs `pip install 'ssa_dask[slurm]'` ({exc})") from exc
    cluster = SLURMCluster(**options)
    try:
        cluster.scale(n_workers)
        yield cluster
    finally:
        cluster.close()
