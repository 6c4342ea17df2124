"""Structural checks of stored matrices: CSR blocks as they are read, and Zarr chunk completeness.

A damaged file must give an :class:`~ssa_dask.errors.SSAInputError` naming the file and the place,
never a segmentation fault in compiled code or a silently wrong matrix.  The checks here are cheap
and vectorised; they run inside every block-reading task, before SciPy or Numba see the arrays.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from itertools import product
from math import ceil
from pathlib import Path
from typing import Any

import numpy as np

from ssa_dask.errors import SSAInputError


def check_csr_layout(*, n_rows: int, n_indptr: int, first: int, last: int, nnz: int, n_data: int, where: str) -> None:
    """Check the whole-matrix invariants of a stored CSR matrix (lengths and end points of ``indptr``).

    Parameters
    ----------
    n_rows
        Rows of the matrix (from its ``shape``).
    n_indptr
        Length of the stored ``indptr``; must be ``n_rows + 1``.
    first, last
        ``indptr[0]`` (must be 0) and ``indptr[-1]`` (must be ``nnz``).
    nnz, n_data
        Lengths of the stored ``indices`` and ``data``; must be equal.
    where
        Names the file and element in the message.

    Raises
    ------
    SSAInputError
        When any invariant does not hold.
    """
    problems = []
    if n_indptr != n_rows + 1:
        problems.append(f"indptr has {n_indptr} entries for {n_rows} rows (expected {n_rows + 1})")
    if first != 0:
        problems.append(f"indptr starts at {first}, not 0")
    if nnz != n_data:
        problems.append(f"indices has {nnz} entries but data has {n_data}")
    if last != nnz:
        problems.append(f"indptr ends at {last} but there are {nnz} stored entries")
    if problems:
        raise SSAInputError(f"{where} is not a valid CSR matrix (damaged file?): " + "; ".join(problems))


def check_indptr_block(indptr: np.ndarray, *, n_cols: int, nnz: int, where: str) -> None:
    """Check one block's slice of ``indptr`` before any entry is read through it.

    The slice must be integer, non-decreasing, within ``[0, nnz]``, and no row may hold more than
    ``n_cols`` entries (which also bounds the memory the block can ask for).

    Raises
    ------
    SSAInputError
        Naming ``where`` and the first offending row of the block.
    """
    if indptr.dtype.kind not in "iu":
        raise SSAInputError(f"{where}: indptr has dtype {indptr.dtype}, expected integers (damaged file?)")
    counts = np.diff(indptr)
    bad = np.flatnonzero((counts < 0) | (counts > n_cols))
    if bad.size:
        row = int(bad[0])
        raise SSAInputError(
            f"{where}: indptr is corrupt at block row {row} ({int(indptr[row])} -> {int(indptr[row + 1])}; "
            f"rows must hold 0..{n_cols} entries)"
        )
    if indptr.size and (int(indptr[0]) < 0 or int(indptr[-1]) > nnz):
        raise SSAInputError(f"{where}: indptr points outside the {nnz} stored entries ({int(indptr[0])}..{int(indptr[-1])})")


def check_indices_block(indices: np.ndarray, *, n_cols: int, where: str) -> None:
    """Check that every column index of a block lies in ``[0, n_cols)``.

    One pass over the indices: viewed as unsigned, a negative index becomes larger than any
    valid one, so a single maximum decides.

    Raises
    ------
    SSAInputError
        Naming ``where``, the number of bad indices and one of them.
    """
    if indices.dtype.kind not in "iu":
        raise SSAInputError(f"{where}: indices have dtype {indices.dtype}, expected integers (damaged file?)")
    if indices.size == 0:
        return
    unsigned = indices.view(np.dtype(f"u{indices.dtype.itemsize}"))
    if int(unsigned.max()) >= n_cols:
        bad = (unsigned >= n_cols).nonzero()[0]
        raise SSAInputError(
            f"{where}: {bad.size} column index(es) outside [0, {n_cols}) (e.g. {int(indices[bad[0]])}); "
            "the file is damaged"
        )


def missing_zarr_chunks(array: Any) -> list[str]:
    """Storage keys of the chunks (or shards) of a Zarr array on a local store that have no file.

    Zarr reads an absent chunk as the fill value, so a deleted or never-copied chunk file would
    silently become zeros.  Only the array's own folder is listed (one directory walk).

    Parameters
    ----------
    array : zarr.Array
        An array opened from a local (directory) store.

    Returns
    -------
    list of str
        Missing keys relative to the array, e.g. ``["c/3/0"]``; empty when complete.
    """
    store_root = getattr(array.store_path.store, "root", None)
    if store_root is None:  # not a directory store: nothing to list
        return []
    grid = array.shards or array.chunks
    shape = tuple(array.shape)
    expected = (
        array.metadata.encode_chunk_key(coords) for coords in product(*(range(ceil(s / c)) for s, c in zip(shape, grid)))
    )
    root = Path(store_root, array.store_path.path)
    present = set(_relative_files(root))
    return [key for key in expected if key not in present]


def _relative_files(root: Path) -> Iterable[str]:
    for folder, _dirs, files in os.walk(root):
        relative = Path(folder).relative_to(root)
        for name in files:
            yield (relative / name).as_posix()


def check_zarr_complete(arrays: dict[str, Any], *, where: str) -> None:
    """Refuse Zarr arrays whose chunk files are missing, naming the store and the chunks.

    Parameters
    ----------
    arrays
        Arrays to check, by the name used in the message (e.g. ``"X/indices"``).
    where
        Names the store in the message.

    Raises
    ------
    SSAInputError
        When any chunk of any array has no file.
    """
    missing = {name: keys for name, array in arrays.items() if (keys := missing_zarr_chunks(array))}
    if not missing:
        return
    listed = "; ".join(f"{name}: {', '.join(keys[:5])}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                       for name, keys in missing.items())
    raise SSAInputError(
        f"{where}: chunk file(s) missing ({listed}); the store is incomplete (deleted or partly copied) and "
        "would read as zeros there. Copy it again, or rewrite it with `ssa-dask ingest`; a store written "
        "with zarr's write_empty_chunks=False must be rewritten with all chunks."
    )
