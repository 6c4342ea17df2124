"""A real one-node SLURM on 127.0.0.1 for the tests: munged, slurmctld and slurmd from the
distribution's packages (``.ci/install-slurm``), configured in a scratch directory, started by hand
(no systemd) and stopped by PID."""

from __future__ import annotations

import getpass
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

#: Daemons and clients a local SLURM needs.
BINARIES = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scancel", "scontrol")
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def missing_binaries() -> list[str]:
    """The SLURM/munge programs not installed here."""
    return [name for name in BINARIES if shutil.which(name, path=_SEARCH_PATH) is None]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_size() -> tuple[str, int, int]:
    """``(node name, CPUs, RealMemory MiB)`` as slurmd detects them (``slurmd -C``)."""
    out = subprocess.run([shutil.which("slurmd", path=_SEARCH_PATH), "-C"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0]))
    return fields["NodeName"], int(fields["CPUs"]), int(fields["RealMemory"])


class LocalSlurm:
    """A one-node SLURM cluster (partition ``debug``) whose files all live under ``root``.

    Parameters
    ----------
    root : Path
        Scratch directory for slurm.conf, the munge key and socket, state, spool and logs.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.node, self.cpus, self.memory_mib = _node_size()
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self._daemons: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point SLURM's clients at this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 30.0) -> None:
        """Write the configuration, start munged, slurmctld and slurmd, wait for the node to be idle."""
        for sub in ("munge", "state", "spool", "logs"):
            (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.touch(mode=0o600)
        key.write_bytes(secrets.token_bytes(1024))
        self.conf.write_text(self._config())
        munge = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={munge / 'munged.pid'}",
                               f"--seed-file={munge / 'munged.seed'}", f"--log-file={munge / 'munged.log'}"])
        self._wait(lambda: self.munge_socket.exists(), 10, "munged did not create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait(lambda: self.node_state() == "idle", timeout, "the SLURM node did not become idle")

    def stop(self) -> None:
        """Cancel every job, then stop the daemons by PID (TERM, then KILL after 10 s)."""
        if "slurmctld" in self._daemons:
            self.cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._daemons.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def run(self, *command: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, check=check,
                              env={**os.environ, **self.env})

    def node_state(self) -> str:
        """The node's state as sinfo reports it (``idle``, ``mixed``, ...), ``""`` when unreachable."""
        done = self.run("sinfo", "--noheader", "--format=%T", check=False, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else ""

    def jobs(self) -> list[dict[str, str]]:
        """Every job in the queue: ``{"id", "name", "state", "reason"}``."""
        out = self.run("squeue", "--noheader", "--format=%i|%j|%T|%r").stdout
        keys = ("id", "name", "state", "reason")
        return [dict(zip(keys, line.strip().split("|", 3))) for line in out.splitlines() if line.strip()]

    def job_state(self, job_id: str) -> str:
        """``JobState`` of one job from ``scontrol show job`` (sacct needs accounting, not set up here)."""
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        match = re.search(r"JobState=(\w+)", out)
        return match.group(1) if match else ""

    def cancel_all(self, timeout: float = 20.0) -> None:
        """Cancel every job and wait until the queue is empty."""
        self.run("scancel", f"--user={getpass.getuser()}", check=False)
        self._wait(lambda: not self.jobs(), timeout, "jobs left in the queue after scancel")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of each daemon's log (for failure messages)."""
        parts = []
        for log in sorted((self.root / "logs").glob("*.log")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)

    def _spawn(self, name: str, command: list[str]) -> None:
        executable = shutil.which(command[0], path=_SEARCH_PATH)
        with open(self.root / "logs" / f"{name}.out", "wb") as out:
            self._daemons[name] = subprocess.Popen([executable, *command[1:]], stdout=out, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                                   env={**os.environ, **self.env})

    def _wait(self, ready, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [name for name, proc in self._daemons.items() if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{message} (exited: {dead or 'none'})\n{self.log_tail()}")
            time.sleep(0.25)

    def _config(self) -> str:
        logs = self.root / "logs"
        return f"""\
ClusterName=ssatest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={getpass.getuser()}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
KillWait=5
StateSaveLocation={self.root / 'state'}
SlurmdSpoolDir={self.root / 'spool'}
SlurmctldPidFile={self.root / 'slurmctld.pid'}
SlurmdPidFile={self.root / 'slurmd.pid'}
SlurmctldLogFile={logs / 'slurmctld.log'}
SlurmdLogFile={logs / 'slurmd.log'}
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mib} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
