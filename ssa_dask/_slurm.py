"""SLURM clusters through dask-jobqueue, for :func:`ssa_dask.cluster.connect`.

One context manager, :func:`slurm_cluster`, that

- checks the options against ``sinfo`` (partition, cores and memory of its nodes, walltime) and
  asks ``sbatch --test-only`` about the worker job script before anything is submitted;
- names every worker job ``ssa-worker-<run id>`` so that it can be found and cancelled by name
  (the run id is ``$SSA_RUN_ID`` when set, as ``deploy/slurm/align.sbatch`` does, else random);
- keeps ``n_workers`` jobs alive (``adapt``: a job lost to ``scancel`` or preemption is replaced);
- waits for the workers with a timeout and fails with sbatch's or squeue's own reason, never hangs;
- on any exit (return, exception, Ctrl-C, SIGTERM) cancels every worker job and checks ``squeue``;
- secures the scheduler with temporary TLS credentials unless ``insecure=True``.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask

from ssa_dask.errors import SSAClusterError, SSAInputError

log = logging.getLogger(__name__)

#: Options used when neither the cluster config nor the dask config ``jobqueue.slurm`` sets them
#: (a modest job on a typical site).
DEFAULT_OPTIONS: dict[str, Any] = {"cores": 4, "processes": 1, "memory": "16GiB"}
#: Options that :func:`check_options` compares with what ``sinfo`` reports.
CHECKED_OPTIONS = ("queue", "cores", "job_cpu", "memory", "job_mem", "walltime")
#: Prefix of the job name of every worker job (``ssa-worker-<run id>``).
JOB_NAME_PREFIX = "ssa-worker"
#: Where the run's TLS key and certificates go when ``shared_temp_directory`` is not set.
DEFAULT_SHARED_TEMP = "~/.ssa_dask/tls"
#: How long a lost worker job is given to reconnect before it is cancelled and replaced.
LOST_WORKER_TIMEOUT = "3s"
_COMMAND_TIMEOUT = 60.0
#: Job states of a job that is gone or going (COMPLETING: cancelled, resources being released).
_ENDED = ("COMPLETING", "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY")


@dataclass(frozen=True)
class NodeGroup:
    """Nodes of one partition with the same size, as ``sinfo --exact`` reports them."""

    partition: str
    default: bool
    available: str
    time_limit: str
    cpus: int
    memory_mib: int
    nodes: int


@contextlib.contextmanager
def slurm_cluster(
    n_workers: int, options: dict[str, Any], *, insecure: bool = False, timeout: float = 600.0
) -> Iterator[Any]:
    """A ``dask_jobqueue.SLURMCluster`` that keeps ``n_workers`` worker jobs, all cancelled on exit.

    Parameters
    ----------
    n_workers : int
        Worker jobs to keep running (a job that dies is replaced).
    options : dict
        Keyword arguments of ``SLURMCluster`` (e.g. from ``deploy/slurm/cluster.yaml``); missing
        ones come from the dask config ``jobqueue.slurm``, then :data:`DEFAULT_OPTIONS`.
        ``shared_temp_directory`` is where the run's TLS files are written (a directory the worker
        nodes read; default :data:`DEFAULT_SHARED_TEMP`).
    insecure : bool
        Plain ``tcp://`` instead of TLS: anyone who reaches the scheduler can run code as you.
    timeout : float
        Seconds to wait for the workers to connect before giving up with the scheduler's reason.

    Yields
    ------
    dask_jobqueue.SLURMCluster
        With the Dask workers of ``n_workers`` jobs connected (``processes`` workers per job).

    Raises
    ------
    SSAClusterError
        The options do not fit the cluster, sbatch refused the job, or the workers did not
        connect within ``timeout`` (the message carries sbatch's or squeue's reason).
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise SSAInputError(f"scheduler 'slurm' needs `pip install 'ssa_dask[slurm]'` ({exc})") from exc
    if n_workers < 1:
        raise SSAInputError(f"n_workers must be at least 1, got {n_workers}")
    run_id = os.environ.get("SSA_RUN_ID") or secrets.token_hex(4)
    options = with_defaults(options)
    job_name = f"{options.pop('job_name', None) or JOB_NAME_PREFIX}-{run_id}"
    shared_temp = _configured(options, "shared_temp_directory") or DEFAULT_SHARED_TEMP
    options.pop("shared_temp_directory", None)
    if shutil.which("sinfo"):
        check_options({key: _configured(options, key) for key in CHECKED_OPTIONS}, node_groups())
    failures: list[BaseException] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(_logged_elsewhere(failures))
        # A worker whose connection is lost is a job that is gone (scancel, preemption, node
        # failure): replace it after a few seconds instead of distributed's default 15 s.
        stack.enter_context(dask.config.set({"distributed.deploy.lost-worker-timeout": LOST_WORKER_TIMEOUT}))
        if insecure:
            log.warning("INSECURE: the SLURM scheduler listens on plain tcp://; anyone who can reach it "
                        "can run code as %s. Drop --insecure to use TLS.", getpass.getuser())
            security = None
        else:
            tls_dir = stack.enter_context(_private_directory(shared_temp))
            security = temporary_security(tls_dir)
        scheduler_options = {"dashboard_address": "127.0.0.1:0", **(_configured(options, "scheduler_options") or {})}
        options.pop("scheduler_options", None)
        try:
            cluster = SLURMCluster(job_name=job_name, security=security, scheduler_options=scheduler_options,
                                   job_cls=_recording_job_class(failures), **options)
        except (TypeError, ValueError, OSError) as exc:
            reason = str(exc).splitlines()[0].split(". Very likely")[0]
            raise SSAClusterError(f"cannot start the SLURM cluster with these options: {reason}") from exc
        stack.callback(_cancel_all, cluster, job_name)
        _test_only(cluster.job_script())
        cluster.adapt(minimum_jobs=n_workers, maximum_jobs=n_workers)
        log.info("SLURM: %d worker job(s) named %s for scheduler %s", n_workers, job_name, cluster.scheduler_address)
        workers_per_job = int(_configured(options, "processes") or 1)
        _wait_for_workers(cluster, n_workers * workers_per_job, job_name, failures, timeout)
        yield cluster


def with_defaults(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` without its ``None`` values (unset, as for dask-jobqueue) plus
    :data:`DEFAULT_OPTIONS` for what neither they nor the dask config set."""
    given = {key: value for key, value in options.items() if value is not None}
    return {**{key: value for key, value in DEFAULT_OPTIONS.items() if _configured(given, key) is None}, **given}


def _configured(options: dict[str, Any], key: str) -> Any:
    """The value dask-jobqueue will use for ``key``: from ``options``, else the dask config."""
    if options.get(key) is not None:
        return options[key]
    return dask.config.get(f"jobqueue.slurm.{key.replace('_', '-')}", None)


def node_groups() -> list[NodeGroup]:
    """Partitions and the sizes of their nodes, from ``sinfo``."""
    out = _run(["sinfo", "--exact", "--noheader", "--format=%P|%a|%l|%c|%m|%D"], "sinfo")
    groups = []
    for line in out.splitlines():
        name, available, limit, cpus, memory, nodes = line.strip().split("|")
        groups.append(NodeGroup(name.rstrip("*"), name.endswith("*"), available, limit,
                                _leading_int(cpus), _leading_int(memory), _leading_int(nodes)))
    return groups


def check_options(options: dict[str, Any], groups: list[NodeGroup]) -> None:
    """Refuse options that no node of the chosen partition can run.

    Parameters
    ----------
    options : dict
        ``SLURMCluster`` keyword arguments (``queue``, ``cores``, ``job_cpu``, ``memory``,
        ``job_mem``, ``walltime``).
    groups : list of NodeGroup
        What :func:`node_groups` reports.

    Raises
    ------
    SSAClusterError
        Naming the problem and listing the partitions with their node sizes.
    """
    if not groups:
        raise SSAClusterError("sinfo lists no partition: is this a SLURM cluster you can submit to?")
    queue = options.get("queue")
    if queue is None:
        defaults = [g.partition for g in groups if g.default]
        if not defaults:
            raise SSAClusterError(f"no default partition: set `queue` in the cluster config. {_describe(groups)}")
        queue = defaults[0]
    mine = [g for g in groups if g.partition == queue]
    if not mine:
        raise SSAClusterError(f"partition {queue!r} does not exist. {_describe(groups)}")
    if all(g.available != "up" for g in mine):
        raise SSAClusterError(f"partition {queue!r} is {mine[0].available}, not up. {_describe(groups)}")
    cpus = int(options.get("job_cpu") or options["cores"])
    if cpus > max(g.cpus for g in mine):
        raise SSAClusterError(f"{cpus} cores per job do not fit a node of partition {queue!r}. {_describe(groups)}")
    memory_mib = _memory_mib(options)
    if memory_mib is not None and memory_mib > max(g.memory_mib for g in mine if g.cpus >= cpus):
        raise SSAClusterError(f"{memory_mib} MiB per job with {cpus} cores do not fit a node of partition "
                              f"{queue!r}. {_describe(groups)}")
    walltime, limit = options.get("walltime"), max((_minutes(g.time_limit) for g in mine), default=math.inf)
    if walltime and _minutes(str(walltime)) > limit:
        raise SSAClusterError(f"walltime {walltime} exceeds the time limit {mine[0].time_limit} of partition "
                              f"{queue!r}. {_describe(groups)}")


def temporary_security(directory: Path) -> Any:
    """Temporary self-signed TLS credentials, the workers' copy written (mode 0600) to ``directory``.

    The scheduler and this process's client hold their key in memory; worker jobs read the key,
    certificate and CA from ``directory``, which must be on a file system the worker nodes see.
    """
    from distributed.security import Security

    try:
        temporary = Security.temporary()
    except ImportError as exc:
        raise SSAInputError("TLS for the SLURM scheduler needs the cryptography package: "
                            "pip install 'ssa_dask[slurm]'") from exc
    files = {}
    for field in ("tls_ca_file", "tls_worker_cert", "tls_worker_key"):
        path = directory / f"{field}.pem"
        path.touch(mode=0o600)
        path.write_text(getattr(temporary, field))
        files[field] = str(path)
    return Security(
        require_encryption=True,
        tls_ca_file=files["tls_ca_file"],
        tls_client_cert=temporary.tls_client_cert, tls_client_key=temporary.tls_client_key,
        tls_scheduler_cert=temporary.tls_scheduler_cert, tls_scheduler_key=temporary.tls_scheduler_key,
        tls_worker_cert=files["tls_worker_cert"], tls_worker_key=files["tls_worker_key"],
    )


def our_jobs(job_name: str) -> list[tuple[str, str, str]]:
    """``(job id, state, reason)`` of this user's jobs named ``job_name``, from ``squeue``."""
    out = _run(["squeue", "--noheader", f"--name={job_name}", f"--user={getpass.getuser()}",
                "--format=%i|%T|%r"], "squeue")
    jobs = []
    for line in out.splitlines():
        if line.strip():
            job_id, state, reason = line.strip().split("|", 2)
            jobs.append((job_id, state, reason))
    return jobs


def cancel_jobs(job_name: str, job_ids: Sequence[str] = ()) -> None:
    """Cancel jobs by id and, as a fallback, every job of this user named ``job_name``."""
    commands = [["scancel", *job_ids]] if job_ids else []
    commands.append(["scancel", f"--name={job_name}", f"--user={getpass.getuser()}"])
    for command in commands:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            # its own session: a Ctrl-C in the terminal does not reach scancel
            subprocess.run(command, capture_output=True, timeout=_COMMAND_TIMEOUT, check=False,
                           start_new_session=True)


def _recording_job_class(failures: list[BaseException]) -> type:
    """A ``SLURMJob`` that appends the exception to ``failures`` when a submission fails."""
    from dask_jobqueue.slurm import SLURMJob

    class RecordingSLURMJob(SLURMJob):
        async def start(self) -> None:
            try:
                await super().start()
            except Exception as exc:
                failures.append(exc)
                raise

    return RecordingSLURMJob


@contextlib.contextmanager
def _logged_elsewhere(failures: list[BaseException]) -> Iterator[None]:
    """Keep the tracebacks of failed submissions (recorded in ``failures`` and reported in the
    :class:`SSAClusterError`) out of tornado's and asyncio's logs while the block runs."""

    class DropRecorded(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            exc = record.exc_info[1] if record.exc_info else None
            return not any(exc is failure for failure in failures)

    drop = DropRecorded()
    loggers = [logging.getLogger(name) for name in ("tornado.application", "asyncio")]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def _wait_for_workers(cluster: Any, n_workers: int, job_name: str, failures: list[BaseException],
                      timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if failures:
            raise SSAClusterError(f"sbatch refused a worker job: {_sbatch_reason(str(failures[0]))}")
        connected = len(cluster.scheduler_info.get("workers", {}))
        if connected >= n_workers:
            return
        if time.monotonic() > deadline:
            jobs = our_jobs(job_name)
            states = "; ".join(f"job {i} {state} ({reason})" for i, state, reason in jobs) or "no job in squeue"
            hint = ""
            if any(state == "RUNNING" for _, state, _ in jobs):
                hint = (" Running jobs that never connect: check the worker logs (log_directory), the python "
                        "environment on the nodes, `interface`, and that shared_temp_directory is shared.")
            raise SSAClusterError(f"{connected} of {n_workers} SLURM worker(s) connected within {timeout:g} s: "
                                  f"{states}.{hint}")
        time.sleep(0.25)


def _cancel_all(cluster: Any, job_name: str) -> None:
    """Cancel every worker job of this run, close the cluster, and check that squeue is empty.

    A second Ctrl-C or SIGTERM while this runs is held back until it is done, so that it cannot
    leave jobs behind; it is raised (as ``KeyboardInterrupt``) afterwards.
    """
    with _interrupts_deferred():
        _cancel_and_close(cluster, job_name)


def _cancel_and_close(cluster: Any, job_name: str) -> None:
    job_ids = [job.job_id for job in list(cluster.workers.values()) if getattr(job, "job_id", None)]
    cancel_jobs(job_name, job_ids)
    with contextlib.suppress(Exception):
        cluster.close(timeout=30)
    deadline = time.monotonic() + 15
    left: list[tuple[str, str, str]] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(SSAClusterError):
            left = [job for job in our_jobs(job_name) if job[1] not in _ENDED]
            if not left:
                return
        cancel_jobs(job_name)
        time.sleep(0.5)
    if left:
        log.warning("SLURM jobs still listed after cancelling: %s", ", ".join(job[0] for job in left))


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while the block runs (main thread only); re-raise one after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt(signal.Signals(received[0]).name)


def _test_only(script: str) -> None:
    """Ask ``sbatch --test-only`` whether it would accept the worker job; raise with its reason if not."""
    if not shutil.which("sbatch"):
        raise SSAClusterError("sbatch not found on PATH: run on a SLURM login node (or load the slurm module)")
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="ssa-worker-") as handle:
        handle.write(script)
        handle.flush()
        try:
            done = subprocess.run(["sbatch", "--test-only", handle.name], capture_output=True, text=True,
                                  timeout=_COMMAND_TIMEOUT, check=False)
        except subprocess.TimeoutExpired as exc:
            raise SSAClusterError(f"sbatch --test-only did not answer within {_COMMAND_TIMEOUT:g} s") from exc
    if done.returncode != 0:
        raise SSAClusterError(f"sbatch would refuse the worker job: {_sbatch_reason(done.stderr + done.stdout)}")


def _sbatch_reason(text: str) -> str:
    """The ``sbatch: error:`` lines of sbatch's output (all of it when there are none), on one line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [re.sub(r"^sbatch: error:\s*", "", line) for line in lines if "error" in line.lower()
              and not line.startswith(("Command", "Exit code"))]
    return " / ".join(errors or lines) or "no message"


def _run(command: list[str], what: str) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SSAClusterError(f"{what} failed: {exc}") from exc
    if done.returncode != 0:
        raise SSAClusterError(f"{what} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


@contextlib.contextmanager
def _private_directory(parent: str) -> Iterator[Path]:
    """A fresh directory only this user can read under ``parent`` (created), removed on exit."""
    root = Path(os.path.expandvars(parent)).expanduser()
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="ssa-tls-", dir=root))
    except OSError as exc:
        raise SSAClusterError(f"cannot write TLS credentials to shared_temp_directory {parent!r}: {exc}") from exc
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _describe(groups: list[NodeGroup]) -> str:
    parts = [f"{g.partition}{' (default)' if g.default else ''}: {g.nodes} node(s) of {g.cpus} cores, "
             f"{g.memory_mib} MiB, time limit {g.time_limit}, {g.available}" for g in groups]
    return "Partitions: " + "; ".join(parts) + "."


def _leading_int(text: str) -> int:
    match = re.match(r"\d+", text.strip())
    return int(match.group()) if match else 0


def _memory_mib(options: dict[str, Any]) -> int | None:
    """Memory per job in MiB as sbatch's ``--mem`` will ask for it."""
    from dask.utils import parse_bytes

    if options.get("job_mem"):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(options["job_mem"]), re.IGNORECASE)
        if not match:
            raise SSAClusterError(f"job_mem {options['job_mem']!r} is not a SLURM memory size like 16G")
        scale = {"K": 1 / 1024, "M": 1, "": 1, "G": 1024, "T": 1024**2}[match.group(2).upper()]
        return math.ceil(float(match.group(1)) * scale)
    if options.get("memory") is None:
        return None
    try:
        return math.ceil(parse_bytes(options["memory"]) / 2**20)
    except ValueError as exc:
        raise SSAClusterError(f"memory {options['memory']!r} is not a size like 16GiB") from exc


def _minutes(limit: str) -> float:
    """Minutes of a SLURM time (``infinite``, ``D-HH:MM:SS``, ``HH:MM:SS``, ``MM:SS``, ``MM``)."""
    limit = limit.strip().lower()
    if limit in ("infinite", "unlimited", "n/a", ""):
        return math.inf
    days, _, clock = limit.rpartition("-")
    parts = [float(p) for p in clock.split(":")]
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    elif len(parts) == 2:
        hours, (minutes, seconds) = 0, parts
    else:
        hours, minutes, seconds = 0, parts[0], 0
    return float(days or 0) * 1440 + hours * 60 + minutes + seconds / 60
