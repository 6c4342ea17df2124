"""The on-disk store of kernel row blocks: safe under task retry, preemption and tampering.

A kernel store is a directory on a POSIX file system (local scratch, or a shared file system on a
multi-machine cluster) that holds uncompressed Zarr arrays with one chunk per row block: for a
float32 kernel, ``cost.zarr`` (``D``, written by the first construction pass) and ``kernel.zarr``
(``K = exp(-D/eps)``, written by the second); for a float16 or bfloat16 kernel
(:mod:`ssa_dask.kernel.precision`), ``kernel.zarr`` of uint16 bit patterns and
``kernel_log_scale.zarr``, one float64 log scale per row (an ``(n, 1)`` array), both written by
the second pass from a recomputed cost (no float32 copy of the cost is stored).  Every chunk file is written beside its final name
and renamed into place, and each pass is a pure function of its input chunk, so a task that
Dask retries (a lost worker, a preempted node) writes the same bytes again; the second pass reads
``cost`` and writes ``kernel`` (never in place) and removes the cost chunk only once the kernel
chunk is in place, so applying it twice is harmless.  A 16-bit block's scale chunk is written
before its bits chunk, and the block is complete only when both are.

Reading memory-maps a chunk file after checking that it exists and has the size of a full chunk:
a missing or truncated chunk raises :class:`KernelStoreError` naming the store, never reads as
zeros.  The arrays' codecs are checked to be the plain little-endian ``bytes`` codec, and their
dtypes those of the store's kernel dtype (recorded in ``manifest.json``), before any chunk is mapped.

``owner.json`` records the host and process that made the store, so stores of runs that died
(SIGKILL, a node that went away) are found and removed by the next run on that host
(:func:`sweep_stale_stores`).  A store kept for a checkpoint records that too and is reused by the
resumed run when its ``manifest.json`` says it is complete and matches the problem.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from ssa_dask.errors import SSAError, SSAInputError
from ssa_dask.kernel.precision import ENTRY_BYTES, HALF_DTYPES, HalfRows
from ssa_dask.paths import resolve_local_path

log = logging.getLogger(__name__)

#: Prefix of every kernel store directory.
STORE_PREFIX = "ssa-kernel-"
OWNER_FILE = "owner.json"
MANIFEST_FILE = "manifest.json"
COST_ARRAY = "cost.zarr"
KERNEL_ARRAY = "kernel.zarr"
SCALE_ARRAY = "kernel_log_scale.zarr"


class KernelStoreError(SSAError):
    """A kernel store on disk is missing, damaged or not of the expected layout."""


def local_directory(path: str | os.PathLike | None, what: str) -> Path | None:
    """``path`` as an absolute local directory path (None stays None); URLs are refused.

    Kernel blocks are memory-mapped, which needs a file system (local scratch, or a shared one such
    as NFS/Lustre/GPFS on a multi-machine cluster); an object-store URL would otherwise become a
    local folder named ``s3:``.

    Raises
    ------
    SSAInputError
        ``path`` is a URL or an existing non-directory.
    """
    if path is None:
        return None
    resolved = resolve_local_path(path, what)
    if resolved.exists() and not resolved.is_dir():
        raise SSAInputError(f"{what}: {resolved} exists and is not a directory")
    return resolved


def store_bytes(shape: tuple[int, int], kernel_dtype: str) -> int:
    """Peak size of a kernel store: one float32 copy of the cost (converted to the kernel in
    place), or the 16-bit kernel and its float64 row scales (the cost is not stored)."""
    n_rows, n_columns = shape
    if kernel_dtype in HALF_DTYPES:
        return n_rows * n_columns * ENTRY_BYTES[kernel_dtype] + n_rows * 8
    return n_rows * n_columns * 4


def check_free_space(directory: Path | None, kernel_bytes: int) -> None:
    """Refuse a kernel store that would not fit on the disk of ``directory`` (scratch by default).

    ``kernel_bytes`` is the store's peak (:func:`store_bytes`); 5 % is added for the chunks
    being converted.

    Raises
    ------
    SSAInputError
        Less free space than the store needs; the message says how much of each.
    """
    import tempfile

    folder = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    needed = kernel_bytes * 1.05
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise SSAInputError(
            f"the kernel store needs about {needed / 1e9:.1f} GB in {folder} but only {free / 1e9:.1f} GB are free; "
            "point kernel_path (--kernel-path) at larger scratch, or keep the kernel in memory on a cluster with "
            "enough of it"
        )


@dataclass(frozen=True)
class StoredBlock:
    """Rows ``start:stop`` of one array of a kernel store: one chunk file, read where it is needed.

    Attributes
    ----------
    store : str
        The kernel store directory (named in errors).
    array : str
        ``"cost.zarr"``, ``"kernel.zarr"`` or ``"kernel_log_scale.zarr"``.
    chunk : str
        The chunk key (file path relative to the array).
    start, stop : int
        Rows of the block.
    chunk_rows : int
        Rows of a full chunk (edge chunks are stored padded to it).
    n_columns : int
        Columns (spots; 1 for the row scales).
    dtype : str
        Little-endian NumPy dtype of the entries (``"<f4"``, ``"<u2"``, ``"<f8"``).
    """

    store: str
    array: str
    chunk: str
    start: int
    stop: int
    chunk_rows: int
    n_columns: int
    dtype: str = "<f4"

    @property
    def file(self) -> Path:
        """The chunk file."""
        return Path(self.store) / self.array / self.chunk

    @property
    def nbytes(self) -> int:
        """Size of a complete chunk file."""
        return self.chunk_rows * self.n_columns * np.dtype(self.dtype).itemsize

    def is_complete(self) -> bool:
        """Whether the chunk file exists with the size of a full chunk."""
        try:
            return self.file.stat().st_size == self.nbytes
        except FileNotFoundError:
            return False

    def load(self) -> np.ndarray:
        """The block's rows, memory-mapped read-only.

        Raises
        ------
        KernelStoreError
            The chunk file is missing or not of the size of a full chunk.
        """
        try:
            size = self.file.stat().st_size
        except FileNotFoundError:
            raise KernelStoreError(
                f"kernel store {self.store}: chunk {self.array}/{self.chunk} (rows {self.start}:{self.stop}) is missing; "
                "the store was removed or modified while the run used it"
            ) from None
        if size != self.nbytes:
            raise KernelStoreError(
                f"kernel store {self.store}: chunk {self.array}/{self.chunk} (rows {self.start}:{self.stop}) has "
                f"{size} bytes, expected {self.nbytes} (truncated or foreign file)"
            )
        mapped = np.memmap(self.file, dtype=self.dtype, mode="r", shape=(self.chunk_rows, self.n_columns))
        return mapped[: self.stop - self.start]

    def write(self, values: np.ndarray) -> None:
        """Write the block's rows atomically (beside the chunk file, then renamed into place)."""
        rows = self.stop - self.start
        if values.shape != (rows, self.n_columns):
            raise ValueError(f"block of shape {values.shape}, expected {(rows, self.n_columns)}")
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".{self.file.name}.partial-{uuid.uuid4().hex[:8]}")
        padded = np.zeros((self.chunk_rows, self.n_columns), dtype=self.dtype)
        padded[:rows] = values
        try:
            with open(tmp, "wb") as handle:
                handle.write(padded.data)
            os.replace(tmp, self.file)
        finally:
            tmp.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the chunk file (idempotent)."""
        self.file.unlink(missing_ok=True)


@dataclass(frozen=True)
class StoredHalfBlock:
    """One row block of a 16-bit kernel on disk: its bits chunk and its row-scale chunk.

    Attributes
    ----------
    bits : StoredBlock
        The uint16 chunk of ``kernel.zarr``.
    log_scale : StoredBlock
        The ``(rows, 1)`` float64 chunk of ``kernel_log_scale.zarr``.
    dtype : {"float16", "bfloat16"}
    """

    bits: StoredBlock
    log_scale: StoredBlock
    dtype: str

    def is_complete(self) -> bool:
        """Whether both chunk files exist with their full sizes."""
        return self.log_scale.is_complete() and self.bits.is_complete()

    def load(self) -> HalfRows:
        """The block's rows, memory-mapped read-only (see :meth:`StoredBlock.load`)."""
        return HalfRows(self.bits.load(), np.asarray(self.log_scale.load()[:, 0]), self.dtype)

    def write(self, rows: HalfRows) -> None:
        """Write the scales, then the bits, each atomically (a retry writes the same bytes)."""
        if rows.dtype != self.dtype:
            raise ValueError(f"{rows.dtype} rows for a {self.dtype} kernel store")
        self.log_scale.write(np.asarray(rows.log_scale, np.float64)[:, None])
        self.bits.write(rows.bits)

    def remove(self) -> None:
        """Delete both chunk files (idempotent)."""
        self.bits.remove()
        self.log_scale.remove()


class KernelStore:
    """A directory holding the cost and kernel arrays of one run.

    Parameters
    ----------
    root : Path
        The store directory (``ssa-kernel-*``).
    shape : (int, int)
        ``(n_cells, n_spots)``.
    bounds : array of int
        Row offsets of the blocks; every block but the last has ``chunk_rows`` rows.
    kernel_dtype : {"float32", "float16", "bfloat16"}
        Format of the kernel's entries.
    """

    def __init__(self, root: Path, shape: tuple[int, int], bounds: np.ndarray, kernel_dtype: str = "float32") -> None:
        self.root = root
        self.shape = (int(shape[0]), int(shape[1]))
        self.bounds = np.asarray(bounds, dtype=np.int64)
        self.chunk_rows = int(self.bounds[1] - self.bounds[0]) if len(self.bounds) > 1 else 1
        self.kernel_dtype = kernel_dtype
        self.extra_arrays: dict[str, tuple[str, int]] = {}

    @property
    def arrays(self) -> dict[str, tuple[str, int]]:
        """The store's arrays: name -> (NumPy dtype name, columns)."""
        if self.kernel_dtype in HALF_DTYPES:
            base = {KERNEL_ARRAY: ("uint16", self.shape[1]), SCALE_ARRAY: ("float64", 1)}
        else:
            base = {COST_ARRAY: ("float32", self.shape[1]), KERNEL_ARRAY: ("float32", self.shape[1])}
        return base | self.extra_arrays

    @classmethod
    def create(cls, parent: Path | None, shape: tuple[int, int], bounds: np.ndarray, *,
               checkpoint: str | None = None, kernel_dtype: str = "float32") -> KernelStore:
        """Make a new store under ``parent`` (the system's temporary directory by default).

        Stale stores of dead runs under ``parent`` are removed first.  With ``checkpoint`` the
        store is named after the checkpoint file, so a resumed run finds it.
        """
        import tempfile

        parent = parent or Path(tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_stores(parent)
        check_free_space(parent, store_bytes(shape, kernel_dtype))
        if checkpoint is not None:
            root = parent / checkpoint_store_name(checkpoint)
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
        else:
            root = parent / f"{STORE_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            root.mkdir()
        _write_json(root / OWNER_FILE, _owner_record(checkpoint))
        store = cls(root, shape, bounds, kernel_dtype)
        for name in store.arrays:
            store.create_array(name)
        return store

    @classmethod
    def open_complete(cls, parent: Path | None, checkpoint: str, fingerprint: str) -> tuple[KernelStore, dict] | None:
        """The complete store kept for ``checkpoint`` if it matches ``fingerprint``, else None."""
        import tempfile

        root = (parent or Path(tempfile.gettempdir())) / checkpoint_store_name(checkpoint)
        manifest_path = root / MANIFEST_FILE
        if not manifest_path.exists():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            return None
        if manifest.get("fingerprint") != fingerprint:
            log.info("kernel store %s is for another problem; rebuilding it", root)
            return None
        store = cls(root, tuple(manifest["shape"]), np.asarray(manifest["bounds"]),
                    manifest.get("kernel_dtype", "float32"))
        arrays = [COST_ARRAY] if manifest["log_domain"] else [name for name in store.arrays if name != COST_ARRAY]
        for name in arrays:
            store.check_layout(name)
        blocks = store.blocks(COST_ARRAY) if manifest["log_domain"] else store.kernel_blocks()
        incomplete = [b for b in blocks if not b.is_complete()]
        if incomplete:
            log.warning("kernel store %s lacks %d chunk(s); rebuilding it", root, len(incomplete))
            return None
        _write_json(root / OWNER_FILE, _owner_record(checkpoint))
        return store, manifest

    def create_array(self, name: str, dtype: str | None = None) -> None:
        """Create (or empty) array ``name``: one of the store's, or a new float32 kernel-shaped one
        (``dtype``) such as the refined mode's rewrite target."""
        import zarr

        if name not in self.arrays:
            self.extra_arrays[name] = (dtype or "float32", self.shape[1])
        dtype, columns = self.arrays[name]
        zarr.create_array(str(self.root / name), shape=(self.shape[0], columns), chunks=(self.chunk_rows, columns),
                          dtype=dtype, compressors=None, filters=None, fill_value=0, overwrite=True)
        self.check_layout(name)

    def check_layout(self, name: str) -> None:
        """Check that an array stores raw little-endian chunks of the blocks' shape and the expected dtype.

        Raises
        ------
        KernelStoreError
            Other codecs (compression, sharding), dtype or chunk shape: the chunk files could not be
            memory-mapped as raw rows.
        """
        import zarr
        from zarr.codecs import BytesCodec

        path = self.root / name
        dtype, columns = self.arrays.get(name, ("float32", self.shape[1]))
        try:
            array = zarr.open_array(str(path), mode="r")
        except Exception as exc:  # noqa: BLE001 - any failure to open means a damaged store
            raise KernelStoreError(f"kernel store {self.root}: cannot open {name}: {exc}") from exc
        meta = array.metadata
        codecs = getattr(meta, "codecs", ())
        plain = (len(codecs) == 1 and isinstance(codecs[0], BytesCodec)
                 and getattr(codecs[0].endian, "value", codecs[0].endian) == "little")
        chunk_shape = tuple(getattr(meta.chunk_grid, "chunk_shape", ()))
        if not plain or str(array.dtype) != dtype or chunk_shape != (self.chunk_rows, columns) \
                or tuple(array.shape) != (self.shape[0], columns):
            raise KernelStoreError(
                f"kernel store {self.root}/{name} has codecs {codecs}, dtype {array.dtype}, chunks {chunk_shape}, "
                f"shape {array.shape}; expected uncompressed little-endian {dtype} chunks of "
                f"{(self.chunk_rows, columns)} and shape {(self.shape[0], columns)}"
            )

    def blocks(self, name: str) -> list[StoredBlock]:
        """One :class:`StoredBlock` per row block of array ``name``."""
        import zarr

        dtype, columns = self.arrays[name]
        encode = zarr.open_array(str(self.root / name), mode="r").metadata.chunk_key_encoding.encode_chunk_key
        little = np.dtype(dtype).newbyteorder("<").str
        return [StoredBlock(str(self.root), name, encode((i, 0)), int(a), int(b), self.chunk_rows, columns, little)
                for i, (a, b) in enumerate(zip(self.bounds[:-1], self.bounds[1:]))]

    def kernel_blocks(self) -> list[StoredBlock] | list[StoredHalfBlock]:
        """The kernel's row blocks: float32 chunks, or 16-bit chunks with their row scales."""
        if self.kernel_dtype not in HALF_DTYPES:
            return self.blocks(KERNEL_ARRAY)
        return [StoredHalfBlock(bits, scale, self.kernel_dtype)
                for bits, scale in zip(self.blocks(KERNEL_ARRAY), self.blocks(SCALE_ARRAY))]

    def mark_complete(self, manifest: dict[str, Any]) -> None:
        """Record that the kernel is complete (for reuse by a resumed run)."""
        record = dict(manifest, shape=list(self.shape), bounds=self.bounds.tolist(), kernel_dtype=self.kernel_dtype,
                      completed=time.time())
        _write_json(self.root / MANIFEST_FILE, record)

    def remove(self) -> None:
        """Delete the whole store."""
        shutil.rmtree(self.root, ignore_errors=True)


def checkpoint_store_name(checkpoint: str) -> str:
    """Directory name of the kernel store kept for a checkpoint file (stable across runs)."""
    import hashlib

    digest = hashlib.sha1(str(Path(checkpoint).resolve()).encode()).hexdigest()[:12]
    return f"{STORE_PREFIX}checkpoint-{digest}"


def _owner_record(checkpoint: str | None) -> dict[str, Any]:
    process = psutil.Process()
    return {"host": socket.gethostname(), "pid": process.pid, "pid_started": process.create_time(),
            "created": time.time(), "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None}


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as handle:
        json.dump(record, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _owner_alive(owner: dict[str, Any]) -> bool:
    try:
        process = psutil.Process(int(owner["pid"]))
        return abs(process.create_time() - float(owner["pid_started"])) < 1.0
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def sweep_stale_stores(parent: Path) -> list[Path]:
    """Remove the kernel stores under ``parent`` left by runs that died on this host.

    A store is stale when its ``owner.json`` names this host and a process that no longer runs, and
    it is not kept for a checkpoint file that still exists (a preempted run resumes from it).
    Stores of other hosts (on a shared file system) are left alone.

    Returns
    -------
    list of Path
        The stores removed.
    """
    removed = []
    host = socket.gethostname()
    for root in parent.glob(f"{STORE_PREFIX}*"):
        try:
            owner = json.loads((root / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if owner.get("host") != host or _owner_alive(owner):
            continue
        if owner.get("checkpoint") and Path(owner["checkpoint"]).exists():
            continue
        shutil.rmtree(root, ignore_errors=True)
        removed.append(root)
        log.info("removed the kernel store of a run that ended without cleaning up: %s", root)
    return removed
