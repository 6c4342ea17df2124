"""Where the work runs: the local threaded scheduler, an embedded LocalCluster, an existing
scheduler address, a SLURM cluster (dask-jobqueue) or a Kubernetes one (Dask operator).

The rest of the package talks to an :class:`Executor`, which computes and persists Dask
collections on whichever of these it was given, and shows progress while it does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask
import psutil
from dask.callbacks import Callback

from ssa_dask.errors import SSAInputError

log = logging.getLogger(__name__)

#: Names accepted by :func:`connect` besides a scheduler address or a ``distributed.Client``.
SCHEDULERS = ("threads", "local", "slurm", "kubernetes")


class Executor:
    """Compute and persist Dask collections on a distributed client or local threads.

    Parameters
    ----------
    client : distributed.Client or None
        ``None`` runs on the local threaded scheduler of this process.
    progress : bool
        Show a progress bar for long computations.
    """

    def __init__(self, client: Any = None, *, progress: bool = False) -> None:
        self.client = client
        self.progress = progress
        self._pool: ThreadPoolExecutor | None = None

    def map(self, func: Callable[..., Any], *iterables: Sequence[Any], **kwargs: Any) -> list[Any]:
        """Apply ``func`` to each set of block handles in parallel; return results in order.

        Handles are NumPy arrays or small descriptors (local threads) or ``distributed`` futures,
        which each task receives resolved.  One task per block, no graph building: the per-call
        overhead is about a millisecond per task on a cluster and microseconds locally.
        """
        if self.client is not None:
            futures = self.client.map(func, *iterables, pure=False, **kwargs)
            return self.client.gather(futures)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.n_threads())
        return list(self._pool.map(lambda args: func(*args, **kwargs), zip(*iterables)))

    def submit_map(self, func: Callable[..., Any], *iterables: Sequence[Any], **kwargs: Any) -> list[Any]:
        """Like :meth:`map` but keeps the results where they are: futures on a cluster (held in
        worker memory, recomputable from lineage; returned once computed), values locally."""
        if self.client is not None:
            from distributed import wait

            futures = self.client.map(func, *iterables, pure=False, **kwargs)
            wait(futures)
            return futures
        return self.map(func, *iterables, **kwargs)

    def materialize_blocks(self, array: Any, label: str | None = None) -> list[Any]:
        """The row blocks of a Dask array, computed and held: NumPy arrays locally, futures on a
        cluster (computed from the graph, so a lost block is recomputed from lineage)."""
        delayed_blocks = list(array.to_delayed().ravel())
        if self.client is None:
            return list(self.compute(*delayed_blocks, label=label))
        futures = self.client.compute(delayed_blocks)
        if self.progress and label is not None:
            _track_futures(futures, label)
        from distributed import wait

        wait(futures)
        return futures

    def close(self) -> None:
        """Stop the local thread pool."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    @property
    def distributed(self) -> bool:
        """Whether work runs on a ``distributed`` cluster."""
        return self.client is not None

    def n_threads(self) -> int:
        """Total worker threads available."""
        if self.client is None:
            return psutil.cpu_count() or 1
        return max(1, sum(self.client.nthreads().values()))

    def memory_bytes(self) -> int:
        """Total memory the workers may use (this machine's available memory when local)."""
        if self.client is None:
            return int(psutil.virtual_memory().available)
        info = self.client.scheduler_info(n_workers=-1)["workers"].values()
        limits = [w.get("memory_limit") or 0 for w in info]
        return int(sum(limits)) or int(psutil.virtual_memory().available)

    def compute(self, *collections: Any, label: str | None = None) -> tuple[Any, ...]:
        """Compute collections and return their values (a tuple, like ``dask.compute``)."""
        show = self.progress and label is not None
        if self.client is not None:
            futures = self.client.compute(list(collections))
            if show:
                _track_futures(futures, label)
            return tuple(self.client.gather(futures))
        with _RichProgress(label) if show else contextlib.nullcontext():
            return dask.compute(*collections, scheduler="threads")


def _track_futures(futures: list[Any], label: str) -> None:
    from distributed import as_completed, futures_of
    from rich.progress import Progress

    flat = futures_of(futures)
    with Progress(transient=True) as bar:
        task = bar.add_task(label, total=len(flat))
        for _ in as_completed(flat):
            bar.advance(task)


class _RichProgress(Callback):
    """A rich progress bar over the tasks of a local Dask computation."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def __enter__(self) -> _RichProgress:
        from rich.progress import Progress

        self._bar = Progress(transient=True)
        self._bar.start()
        self._task = self._bar.add_task(self.label, total=None)
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        super().__exit__(*args)
        self._bar.stop()

    def _start_state(self, dsk: Any, state: Any) -> None:
        self._bar.update(self._task, total=len(state["ready"]) + len(state["waiting"]) + len(state["running"]))

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        self._bar.advance(self._task)


@contextlib.contextmanager
def connect(
    scheduler: Any = None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | int | None = None,
    cluster_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> Iterator[Executor]:
    """Open the Dask backend named by ``scheduler`` and close what was started here on exit.

    Parameters
    ----------
    scheduler
        ``None`` or ``"threads"``: this process's threads. ``"local"``: an embedded
        ``distributed.LocalCluster`` of worker processes. ``"slurm"``: a
        ``dask_jobqueue.SLURMCluster`` (options from ``cluster_options`` or the dask config
        ``jobqueue.slurm``, see ``deploy/slurm``). ``"kubernetes"``: a ``dask_kubernetes``
        operator ``KubeCluster`` (see ``deploy/kubernetes``). A string like
        ``"tcp://host:8786"``: an existing scheduler. A ``distributed.Client``: used as is.
    n_workers, threads_per_worker, memory_limit
        Size of a cluster started here (``local``: default one worker per core, one thread each;
        ``slurm``/``kubernetes``: number of workers to scale to).
    cluster_options
        Extra keyword arguments for the cluster class.
    progress
        Show progress bars.

    Yields
    ------
    Executor
    """
    options = dict(cluster_options or {})
    if scheduler is None or scheduler == "threads":
        executor = Executor(None, progress=progress)
        try:
            yield executor
        finally:
            executor.close()
        return
    from distributed import Client

    if isinstance(scheduler, Client):
        yield Executor(scheduler, progress=progress)
        return
    if not isinstance(scheduler, str):
        raise SSAInputError(f"scheduler must be one of {SCHEDULERS}, an address or a distributed.Client")
    with contextlib.ExitStack() as stack:
        if scheduler == "local":
            from distributed import LocalCluster

            cores = psutil.cpu_count() or 1
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=n_workers or cores,
                    threads_per_worker=threads_per_worker or 1,
                    memory_limit=memory_limit if memory_limit is not None else "auto",
                    dashboard_address=options.pop("dashboard_address", ":0"),
                    **options,
                )
            )
        elif scheduler == "slurm":
            from ssa_dask._slurm import slurm_cluster

            cluster = stack.enter_context(slurm_cluster(n_workers or 1, options))
        elif scheduler == "kubernetes":
            from ssa_dask._kubernetes import kubernetes_cluster

            cluster = stack.enter_context(kubernetes_cluster(n_workers or 1, options))
        else:
            cluster = scheduler
        client = stack.enter_context(Client(cluster))
        log.info("running on %s", client)
        yield Executor(client, progress=progress)


