"""Local paths: made absolute for every worker, checked before work starts, written atomically.

Inputs and outputs must be paths every Dask worker can open, so they are made absolute before any
task graph is built, and URLs are refused (:func:`resolve_local_path`).  Output locations are
checked up front (:func:`check_writable`, :func:`check_outputs`), and outputs are written next to
their target and moved into place at the end without ever replacing an existing output unless
asked (:func:`write_atomically`): a finished result is never thrown away at the last step.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ssa_dask.errors import OutputExistsError, OutputWriteError, SSAInputError

log = logging.getLogger(__name__)

#: ``scheme://`` (or ``scheme:/`` once :class:`pathlib.Path` has collapsed the slashes) of a URL.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def resolve_local_path(path: str | os.PathLike, what: str) -> Path:
    """Absolute form of a local path; URLs are refused.

    Every Dask worker must open the same file: a relative path would be resolved against each
    worker's own directory (on an external scheduler, an empty or wrong store), so paths are made
    absolute before any task graph is built.

    Parameters
    ----------
    path
        A file-system path, relative or absolute; ``~`` is expanded.
    what
        Names the path in the error message (e.g. ``"--kernel-path"``).

    Returns
    -------
    pathlib.Path
        The absolute path (symbolic links resolved).

    Raises
    ------
    SSAInputError
        When ``path`` is a URL (``s3://``, ``gs://``, ``https://``, any ``scheme://``).
    """
    text = os.fspath(path)
    if _URL.match(text):
        raise SSAInputError(
            f"{what}: URLs are not supported ({text}): copy the store to a file system every worker mounts "
            "and give its path"
        )
    return Path(text).expanduser().resolve()


def check_writable(target: str | os.PathLike, *, overwrite: bool, what: str = "output") -> Path:
    """Check, before any work, that ``target`` can be written; create its parent folder.

    Probe-writes (and removes) a file in the parent, so read-only folders, full or read-only file
    systems and permission problems are found up front rather than after the computation.

    Parameters
    ----------
    target
        The output path (file or directory store).
    overwrite
        Whether an existing ``target`` may be replaced.
    what
        Names the output in messages (e.g. ``"-o"``, ``"--obs-out"``).

    Returns
    -------
    pathlib.Path
        ``target``, absolute.

    Raises
    ------
    OutputExistsError
        ``target`` exists and ``overwrite`` is false.
    SSAInputError
        ``target`` is a URL; its parent cannot be created (a path component is a regular file) or
        written; or ``overwrite`` would replace a folder that is not a Zarr store.
    """
    target = resolve_local_path(target, what)
    if os.path.lexists(target):
        if not overwrite:
            raise OutputExistsError(f"{what}: {target} exists; pass overwrite=True (CLI: --overwrite) to replace it")
        _check_replaceable(target, what)
    parent = target.parent
    blocker = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise SSAInputError(f"{what}: cannot write {target}: {blocker} is a regular file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{target.name}.probe-"):
            pass
    except OSError as exc:
        raise SSAInputError(f"{what}: cannot write in {parent}: {exc.strerror or exc}") from exc
    return target


def check_outputs(
    outputs: Mapping[str, str | os.PathLike | None],
    *,
    overwrite: bool,
    inputs: Sequence[str | os.PathLike] = (),
) -> dict[str, Path]:
    """Check several outputs up front: each writable (:func:`check_writable`), all distinct.

    Parameters
    ----------
    outputs
        Output paths by the name used in messages (``{"-o": out, "--obs-out": obs_out}``);
        ``None`` entries are skipped.
    overwrite
        Whether existing outputs may be replaced.
    inputs
        Input paths no output may be, contain or lie inside.

    Returns
    -------
    dict
        The absolute paths, by name.

    Raises
    ------
    SSAInputError
        Two outputs are the same path or one lies inside another, an output is an input or
        overlaps one, or an output cannot be written.
    OutputExistsError
        An output exists and ``overwrite`` is false.
    """
    resolved = {name: resolve_local_path(path, name) for name, path in outputs.items() if path is not None}
    taken: dict[Path, str] = {resolve_local_path(path, "input"): "an input" for path in inputs}
    for name, path in resolved.items():
        for other, other_name in taken.items():
            if path == other or other in path.parents or path in other.parents:
                relation = "is" if path == other else "overlaps"
                raise SSAInputError(f"{name}: {path} {relation} {other_name} ({other}); give distinct paths")
        taken[path] = name
    return {name: check_writable(path, overwrite=overwrite, what=name) for name, path in resolved.items()}


def write_atomically(target: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Run ``write(tmp)`` on a temporary sibling of ``target``, then move it into place.

    The output is fsynced before it is moved.  Without ``overwrite`` the move itself refuses to
    replace anything (a hard link for files, a rename onto a non-empty folder for stores), so two
    runs writing the same target never silently replace one another: the one that finishes second
    raises and keeps its finished result under a name the message gives.  A failure inside
    ``write`` leaves ``target`` untouched and removes the partial output.

    Parameters
    ----------
    target
        Final path (file or directory store).
    write
        Callable writing the complete output at the path it is given.
    overwrite
        Replace an existing ``target``; without it an existing target raises.

    Returns
    -------
    pathlib.Path
        ``target``, absolute.

    Raises
    ------
    OutputExistsError
        ``target`` exists (checked first, and again atomically at the end) and ``overwrite`` is
        false; when found at the end, the message names where the result was kept.
    OutputWriteError
        The output could not be written (file-system error, e.g. a full disk): nothing is left.
    SSAInputError
        The finished output could not be moved into place: the message says where it was kept.
    """
    target = resolve_local_path(target, "output")
    if os.path.lexists(target):
        if not overwrite:
            raise OutputExistsError(f"{target} exists; pass overwrite=True (CLI: --overwrite) to replace it")
        _check_replaceable(target, "output")
    run_id = uuid.uuid4().hex[:8]
    tmp = target.with_name(f".{target.name}.partial-{run_id}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        _fsync_tree(tmp)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError):
            raise OutputWriteError(f"cannot write {target}: {exc.strerror or exc}") from exc
        raise
    kept = target.with_name(f"{target.stem}.ssa-result-{run_id}{target.suffix}")
    try:
        moved = _replace(tmp, target) if overwrite else _move_no_replace(tmp, target)
        if not moved:
            os.rename(tmp, kept)
        _fsync_dir(target.parent)
    except OSError as exc:
        where = tmp if os.path.lexists(tmp) else kept
        raise SSAInputError(
            f"cannot move the finished result into place at {target} ({exc.strerror or exc}); it was kept at {where}"
        ) from exc
    if not moved:
        raise OutputExistsError(
            f"{target} was written by someone else while this run was writing it; this run's result was kept "
            f"at {kept} (move it into place, or rerun with --overwrite)"
        )
    log.debug("wrote %s", target)
    return target


def _check_replaceable(target: Path, what: str) -> None:
    """Refuse to replace a folder that is not a Zarr store (``-o .`` must not delete a directory)."""
    if target.is_dir() and not target.is_symlink() and any(target.iterdir()):
        if not any((target / marker).exists() for marker in ("zarr.json", ".zgroup", ".zarray")):
            raise SSAInputError(f"{what}: refusing to replace {target}: it is a folder that is not a Zarr store")


def _move_no_replace(tmp: Path, target: Path) -> bool:
    """Move ``tmp`` to ``target`` unless something is there; ``False`` (``tmp`` kept) when it is."""
    if tmp.is_dir():
        if os.path.lexists(target) and not (target.is_dir() and not any(target.iterdir())):
            return False
        try:
            os.rename(tmp, target)  # fails when target is a non-empty folder or a file
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                return False
            raise
        return True
    try:
        os.link(tmp, target)  # atomic, and never replaces
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(target):  # no hard links here: check, then rename
            return False
        os.rename(tmp, target)
        return True
    os.unlink(tmp)
    return True


def _replace(tmp: Path, target: Path) -> bool:
    """Move ``tmp`` onto ``target``, replacing whatever is there (a folder is moved aside first)."""
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        os.replace(tmp, target)
        _remove(old)
    else:
        os.replace(tmp, target)
    return True


def _fsync_tree(path: Path) -> None:
    """Flush a written file, or every file and folder of a written store, to disk."""
    if not path.is_dir():
        _fsync(path, os.O_RDONLY)
        return
    for folder, _dirs, files in os.walk(path):
        for name in files:
            _fsync(Path(folder, name), os.O_RDONLY)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    _fsync(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()
