"""Where the work runs: the local threaded scheduler, an embedded LocalCluster, an existing
scheduler address, a SLURM cluster (dask-jobqueue) or a Kubernetes one (Dask operator).

The rest of the package talks to an :class:`Executor`, which computes and persists Dask
collections on whichever of these it was given, and shows progress while it does.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask
import psutil
from dask.callbacks import Callback

from ssa_dask.errors import SSAClusterError, SSAInputError

log = logging.getLogger(__name__)

#: Names accepted by :func:`connect` besides a scheduler address or a ``distributed.Client``.
SCHEDULERS = ("threads", "local", "slurm", "kubernetes")
_ADDRESS = re.compile(r"^([a-z]+://[^\s]+|[A-Za-z0-9.\-]+:\d+)$")


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

    def map(self, func: Callable[..., Any], *iterables: Sequence[Any], label: str | None = None,
            **kwargs: Any) -> list[Any]:
        """Apply ``func`` to each set of block handles in parallel; return results in order.

        Handles are NumPy arrays or small descriptors (local threads) or ``distributed`` futures,
        which each task receives resolved.  One task per block, no graph building: the per-call
        overhead is about a millisecond per task on a cluster and microseconds locally.  With
        ``label`` (and ``progress``), a bar counts the finished tasks.
        """
        show = self.progress and label is not None
        if self.client is not None:
            futures = self.client.map(func, *iterables, pure=False, **kwargs)
            if show:
                _track_futures(futures, label)
            return self.client.gather(futures)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.n_threads())
        results = self._pool.map(lambda args: func(*args, **kwargs), zip(*iterables))
        if not show:
            return list(results)
        collected = []
        with _progress_bar() as bar:
            task = bar.add_task(label, total=min(map(len, iterables)))
            for result in results:
                collected.append(result)
                bar.advance(task)
        return collected

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


def _progress_bar() -> Any:
    """A transient rich progress bar on stderr (stdout stays clean for results)."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    # Off a terminal (a SLURM log, a pipe) a transient bar only leaves blank lines: draw nothing.
    return Progress(transient=True, console=console, disable=not console.is_terminal)


def _track_futures(futures: list[Any], label: str) -> None:
    from distributed import as_completed, futures_of

    flat = futures_of(futures)
    with _progress_bar() as bar:
        task = bar.add_task(label, total=len(flat))
        for _ in as_completed(flat):
            bar.advance(task)


class _RichProgress(Callback):
    """A rich progress bar over the tasks of a local Dask computation."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def __enter__(self) -> _RichProgress:
        self._bar = _progress_bar()
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


def check_scheduler(scheduler: Any) -> None:
    """Refuse a ``scheduler`` value that :func:`connect` cannot use, before anything starts.

    Raises
    ------
    SSAInputError
        Neither one of :data:`SCHEDULERS`, an address (``tcp://``, ``tls://``, ``ucx://``, ``inproc://``
        or ``host:port``), a ``distributed.Client`` nor None.
    """
    if scheduler is None or not isinstance(scheduler, str) or scheduler in SCHEDULERS:
        return
    if _ADDRESS.match(scheduler):
        return
    raise SSAInputError(
        f"unknown scheduler {scheduler!r}: use one of {', '.join(SCHEDULERS)} or a scheduler address such as "
        "tcp://host:8786 or tls://host:8786"
    )


def tls_security(ca_file: str | None, cert: str | None, key: str | None) -> Any:
    """A ``distributed.Security`` for a ``tls://`` scheduler from certificate files, or None.

    Without files, ``distributed`` reads the dask configuration (``distributed.comm.tls.*``,
    e.g. ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE``), which is also how a site usually ships them.

    Raises
    ------
    SSAInputError
        Only some of the files given, or a file missing.
    """
    given = [v for v in (ca_file, cert, key) if v]
    if not given:
        return None
    if len(given) != 3:
        raise SSAInputError("TLS needs all of --tls-ca-file, --tls-cert and --tls-key")
    for value in given:
        if not Path(value).is_file():
            raise SSAInputError(f"TLS credential file not found: {value}")
    from distributed import Security

    return Security(tls_ca_file=str(Path(ca_file).resolve()), tls_client_cert=str(Path(cert).resolve()),
                    tls_client_key=str(Path(key).resolve()), require_encryption=True)


@contextlib.contextmanager
def connect(
    scheduler: Any = None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | int | None = None,
    cluster_options: dict[str, Any] | None = None,
    security: Any = None,
    insecure: bool = False,
    dashboard_address: str | None = None,
    timeout: float = 30.0,
    progress: bool = False,
) -> Iterator[Executor]:
    """Open the Dask backend named by ``scheduler`` and close what was started here on exit.

    Parameters
    ----------
    scheduler
        ``None`` or ``"threads"``: this process's threads. ``"local"``: an embedded
        ``distributed.LocalCluster`` of worker processes, listening on 127.0.0.1 only.
        ``"slurm"``: a ``dask_jobqueue.SLURMCluster`` (TLS with temporary credentials unless
        ``insecure``; see ``deploy/slurm``). ``"kubernetes"``: a ``DaskCluster`` created through
        the Dask operator (TLS from a Secret unless ``insecure``; see ``deploy/kubernetes``).
        An address such as ``"tls://host:8786"`` or ``"tcp://host:8786"``: an existing scheduler.
        A ``distributed.Client``: used as is.
    n_workers, threads_per_worker, memory_limit
        Size of a cluster started here (``local``: default one worker per core, one thread each;
        ``slurm``/``kubernetes``: number of workers to start).
    cluster_options
        Extra keyword arguments for the cluster class.
    security : distributed.Security, optional
        Credentials for a ``tls://`` scheduler (see :func:`tls_security`; default: the dask config).
    insecure : bool
        Allow unencrypted, unauthenticated schedulers that others on the network can reach
        (SLURM/Kubernetes without TLS, a ``tcp://`` scheduler on another host); logged loudly.
    dashboard_address : str, optional
        Where the embedded cluster's dashboard listens (default ``127.0.0.1:0``, a free loopback port).
    timeout : float
        Seconds to wait for a scheduler to answer and for its first worker.
    progress
        Show progress bars.

    Yields
    ------
    Executor

    Raises
    ------
    SSAClusterError
        The scheduler cannot be reached, refuses the connection, or has no worker in time.
    """
    check_scheduler(scheduler)
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
    if insecure:
        log.warning("--insecure: the Dask scheduler accepts unencrypted connections; anyone who can reach it can "
                    "run code as this user")
    with contextlib.ExitStack() as stack:
        if scheduler == "local":
            cluster = stack.enter_context(_local_cluster(n_workers, threads_per_worker, memory_limit, dashboard_address,
                                                         options))
            client = stack.enter_context(Client(cluster))
        elif scheduler in ("slurm", "kubernetes"):
            if scheduler == "slurm":
                from ssa_dask._slurm import slurm_cluster as start
            else:
                from ssa_dask._kubernetes import kubernetes_cluster as start
            cluster = stack.enter_context(start(n_workers or 1, options, insecure=insecure, timeout=timeout))
            client = stack.enter_context(Client(cluster))
        else:
            client = stack.enter_context(_client_for_address(scheduler, security, insecure, timeout))
        if client.dashboard_link:
            log.info("Dask dashboard: %s", client.dashboard_link)
        log.info("running on %s", client)
        yield Executor(client, progress=progress)


def _local_cluster(n_workers: int | None, threads_per_worker: int | None, memory_limit: Any,
                   dashboard_address: str | None, options: dict[str, Any]) -> Any:
    """An embedded LocalCluster whose scheduler, workers and dashboard listen on loopback only.

    Its worker processes ignore SIGINT: Ctrl-C in a terminal reaches the whole process group, and
    only this process should act on it (close the cluster cleanly) instead of every worker dying
    with a traceback mid-task.
    """
    from distributed import LocalCluster

    with _children_ignore_sigint():
        return LocalCluster(
            n_workers=n_workers or psutil.cpu_count() or 1,
            threads_per_worker=threads_per_worker or 1,
            memory_limit=memory_limit if memory_limit is not None else "auto",
            host=options.pop("host", "127.0.0.1"),
            dashboard_address=dashboard_address or options.pop("dashboard_address", "127.0.0.1:0"),
            silence_logs=logging.CRITICAL,
            **options,
        )


@contextlib.contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Ignore SIGINT while child processes start (they inherit the disposition), then restore it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _client_for_address(address: str, security: Any, insecure: bool, timeout: float) -> Iterator[Any]:
    """A client of an existing scheduler, failing fast with the reason instead of hanging."""
    from distributed import Client

    if address.startswith("tls://") and security is None and not _tls_configured():
        raise SSAInputError(
            f"{address} needs TLS credentials: pass --tls-ca-file, --tls-cert and --tls-key (API: "
            "security=ssa_dask.cluster.tls_security(...)) or set dask's distributed.comm.tls.* configuration"
        )
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    if address.startswith("tcp://") and host not in ("127.0.0.1", "localhost", "[::1]") and not insecure:
        log.warning("%s is unencrypted: anyone who can reach that scheduler can run code as its user; prefer tls://",
                    address)
    try:
        client = Client(address, security=security, timeout=f"{timeout}s")
    except (OSError, TimeoutError) as exc:
        raise SSAClusterError(f"cannot connect to the Dask scheduler at {address} within {timeout:g} s: "
                              f"{_first_line(exc)}") from None
    try:
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise SSAClusterError(f"the Dask scheduler at {address} has no worker after {timeout:g} s; start "
                                  "workers with `dask worker " + address + "`") from None
        yield client
    finally:
        client.close()


def _tls_configured() -> bool:
    return bool(dask.config.get("distributed.comm.tls.ca-file", None))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
