"""Checks run before a command connects to a cluster or computes anything.

A long alignment must never be lost to a problem that could have been seen at the start: an
output location that cannot be written, two outputs at one path, an option out of range, a
kernel store that will not fit on its disk.  Each check raises an :class:`SSAInputError` whose
message names the problem and the option.
"""

from __future__ import annotations

import math
from typing import Any

from ssa_dask.errors import SSAInputError

#: Smallest memory limit per worker accepted on the command line (a bare "12" is 12 bytes).
MIN_WORKER_MEMORY = 256 * 2**20


def positive(value: float | None, option: str, *, integer: bool = False) -> None:
    """Refuse a value that is not a finite number above zero (``None`` means "not given")."""
    if value is None:
        return
    if not math.isfinite(value) or value <= 0 or (integer and int(value) != value):
        kind = "a positive integer" if integer else "a positive finite number"
        raise SSAInputError(f"{option} must be {kind}, got {value}")


def memory_limit(text: str | None) -> None:
    """Refuse a worker memory limit that does not parse or is too small to be meant."""
    if text is None or text == "auto":
        return
    from dask.utils import parse_bytes

    try:
        value = parse_bytes(text)
    except (ValueError, TypeError):
        raise SSAInputError(f"--memory-limit {text!r} is not a size; write e.g. 8GiB or 16GB") from None
    if value < MIN_WORKER_MEMORY:
        raise SSAInputError(
            f"--memory-limit {text!r} is {value} bytes per worker; give a unit, e.g. {text}GiB (at least 256MiB)"
        )


def cluster_size(n_workers: int | None, threads_per_worker: int | None) -> None:
    """Refuse non-positive worker counts."""
    positive(n_workers, "--n-workers", integer=True)
    positive(threads_per_worker, "--threads-per-worker", integer=True)


def numeric_options(values: dict[str, Any]) -> None:
    """Refuse out-of-range numeric options of ``ssa-dask align`` (keys are the option names)."""
    for option in ("--lam", "--eps", "--tol", "--refine-eta"):
        positive(values.get(option), option)
    for option in ("--max-iter", "--top-k", "--block-rows", "--n-genes", "--refine-inner"):
        positive(values.get(option), option, integer=True)


def refine_steps(text: str | None) -> int | str | None:
    """``--refine``: a positive number of steps or ``auto`` (None when not given), as ``align`` takes it."""
    if text is None or text == "auto":
        return text
    try:
        steps = int(text)
    except ValueError:
        steps = 0
    if steps < 1 or str(steps) != text.strip():
        raise SSAInputError(f"--refine must be a positive number of steps or 'auto', got {text!r}")
    return steps
