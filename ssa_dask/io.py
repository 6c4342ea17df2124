"""Read expression matrices lazily, ingest h5ad into chunked Zarr, write results atomically.

Every input becomes an :class:`ExpressionMatrix`: a row-chunked Dask array (chunks stay
``scipy.sparse.csr_matrix`` when the input is sparse) plus its gene names, row names, optional
2-D coordinates and the row annotations.  Files are opened lazily, so a matrix on disk is read
chunk by chunk when a computation needs it, on whichever Dask worker runs that chunk: paths are
made absolute first, and every block is checked as it is read (see :mod:`ssa_dask.validate`).

:func:`ingest` writes through :func:`ssa_dask.paths.write_atomically`, which results also use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ssa_dask.errors import SSAInputError
from ssa_dask.paths import check_writable, resolve_local_path, write_atomically
from ssa_dask.validate import check_csr_layout, check_indices_block, check_indptr_block, check_zarr_complete

log = logging.getLogger(__name__)

#: Default number of rows per chunk when the input does not bring its own chunking.
DEFAULT_CHUNK_ROWS = 8192
#: Attribute of a sparse ``X`` group recording the rows per chunk that :func:`ingest` wrote.
CHUNK_ROWS_ATTR = "ssa_dask_chunk_rows"
#: Duplicated row names listed in the warning.
_NAMES_SHOWN = 5


@dataclass(frozen=True)
class ExpressionMatrix:
    """A (rows x genes) expression matrix held lazily as a Dask array.

    Attributes
    ----------
    X : dask.array.Array
        Shape ``(n_rows, n_genes)``, chunked along rows only; chunks are NumPy arrays or
        ``scipy.sparse.csr_matrix``.
    genes : pandas.Index
        Gene names, one per column, unique.
    names : pandas.Index
        Row names (cell or spot barcodes).
    coords : numpy.ndarray or None
        ``(n_rows, 2)`` spatial coordinates when known (obs ``x``/``y`` or obsm ``spatial``).
    obs : pandas.DataFrame
        Row annotations (may be empty).
    """

    X: da.Array
    genes: pd.Index
    names: pd.Index
    coords: np.ndarray | None = None
    obs: pd.DataFrame | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_rows, n_genes)``."""
        return (int(self.X.shape[0]), int(self.X.shape[1]))

    @property
    def is_sparse(self) -> bool:
        """Whether the chunks are SciPy sparse matrices."""
        return sp.issparse(self.X._meta)

    def rechunk_rows(self, block_rows: int) -> ExpressionMatrix:
        """Return the same matrix with row chunks of ``block_rows`` (one chunk across genes)."""
        return replace(self, X=self.X.rechunk((block_rows, self.X.shape[1])))

    def select_genes(self, genes: Sequence[str]) -> ExpressionMatrix:
        """Return the matrix restricted to ``genes``, in that order (lazy column take)."""
        idx = self.genes.get_indexer(pd.Index(genes))
        if (idx < 0).any():
            missing = pd.Index(genes)[idx < 0]
            raise SSAInputError(f"genes not present in the matrix: {list(missing[:5])}")
        X = self.X.map_blocks(_take_columns, idx, chunks=(self.X.chunks[0], (len(idx),)), meta=self.X._meta)
        return replace(self, X=X, genes=pd.Index(genes))


def _take_columns(block: Any, idx: np.ndarray) -> Any:
    """Columns ``idx`` of a dense or CSR block (CSR stays CSR)."""
    out = block[:, idx]
    return out.tocsr() if sp.issparse(out) else out


def _log1p_block(block: Any) -> Any:
    """``log(1 + x)`` of a dense or CSR block, keeping sparsity."""
    return block.log1p() if sp.issparse(block) else np.log1p(block)


def read_expression(
    source: Any,
    *,
    layer: str | None = None,
    gene_key: str | None = None,
    genes: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    chunk_rows: int | None = None,
    log1p: bool = False,
    role: str = "matrix",
) -> ExpressionMatrix:
    """Open an expression matrix lazily from any supported source.

    Parameters
    ----------
    source
        One of: a path to an AnnData ``.h5ad`` file, an AnnData-on-Zarr store, or a plain Zarr
        array / group (array ``X`` plus gene names in attrs ``genes`` or an array ``genes``);
        an in-memory ``anndata.AnnData``; a NumPy array; a SciPy sparse matrix; a Dask array;
        or an :class:`ExpressionMatrix` (returned as is).
    layer
        AnnData layer to read instead of ``X``.
    gene_key
        Column of ``var`` holding the gene names (default: the ``var`` index).
    genes, names
        Gene and row names for array inputs (default: ``gene_0..``, ``row_0..``).
    chunk_rows
        Rows per chunk (default: the file's own chunking, else ``DEFAULT_CHUNK_ROWS``).
    log1p
        Apply ``log(1 + x)`` lazily.
    role
        ``"scRNA"`` or ``"spots"``; used only in error messages.

    Returns
    -------
    ExpressionMatrix

    Raises
    ------
    SSAInputError
        When the source cannot be read, is a URL, is damaged (checked as far as possible before
        computing: CSR layout, missing Zarr chunks; every block again as it is read), or is not a
        2-D matrix with matching, unique gene names.  Duplicated row names are logged as a warning.
    """
    if isinstance(source, ExpressionMatrix):
        matrix = source
    elif isinstance(source, (str, os.PathLike)):
        path = resolve_local_path(source, role)
        matrix = _read_path(path, layer=layer, gene_key=gene_key, chunk_rows=chunk_rows, role=role)
    elif _is_anndata(source):
        matrix = _from_anndata(source, layer=layer, gene_key=gene_key, chunk_rows=chunk_rows, role=role)
    elif isinstance(source, (np.ndarray, da.Array)) or sp.issparse(source):
        matrix = _from_array(source, genes=genes, names=names, chunk_rows=chunk_rows, role=role)
    else:
        raise SSAInputError(
            f"{role}: cannot read input of type {type(source).__name__}; give an AnnData, a path to "
            ".h5ad or .zarr, a NumPy array or a SciPy sparse matrix"
        )
    if genes is not None and not isinstance(source, (np.ndarray, da.Array)) and not sp.issparse(source):
        matrix = replace(matrix, genes=_check_names(genes, matrix.shape[1], "gene names", role))
    if log1p:
        matrix = replace(matrix, X=matrix.X.map_blocks(_log1p_block, dtype=np.result_type(matrix.X.dtype, np.float32), meta=matrix.X._meta))
    return matrix


def _is_anndata(obj: Any) -> bool:
    return type(obj).__name__ == "AnnData" and hasattr(obj, "var_names")


def _check_names(values: Sequence[str] | pd.Index, n: int, what: str, role: str) -> pd.Index:
    index = pd.Index([str(v) for v in values])
    if len(index) != n:
        raise SSAInputError(f"{role}: {len(index)} {what} given for a matrix with {n} of them (wrong shape)")
    if index.has_duplicates:
        dup = index[index.duplicated()].unique()
        if what == "gene names":
            raise SSAInputError(f"{role}: duplicated gene names {list(dup[:_NAMES_SHOWN])}; make them unique first")
        log.warning("%s: %d duplicated %s (e.g. %s); results are indexed by name, so make them unique "
                    "(AnnData: obs_names_make_unique())", role, len(dup), what, list(dup[:_NAMES_SHOWN]))
    return index


def _coords_from_obs(obs: pd.DataFrame | None, obsm: Any, role: str = "matrix") -> np.ndarray | None:
    """Spatial coordinates from obs ``x``/``y`` or obsm ``spatial``; numbers required."""
    if obs is not None and {"x", "y"} <= set(obs.columns):
        values, where = obs[["x", "y"]], "obs columns x, y"
    elif obsm is not None and "spatial" in obsm:
        values, where = obsm["spatial"], "obsm['spatial']"
    else:
        return None
    try:
        coords = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SSAInputError(f"{role}: the coordinates in {where} are not numbers ({exc})") from None
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise SSAInputError(f"{role}: the coordinates in {where} have shape {coords.shape}; expected (rows, 2)")
    return coords[:, :2]


def _row_chunked(X: da.Array, chunk_rows: int | None) -> da.Array:
    rows = chunk_rows or (X.chunks[0][0] if X.chunks[0] else DEFAULT_CHUNK_ROWS)
    return X.rechunk((rows, X.shape[1]))


def _from_array(source: Any, *, genes, names, chunk_rows, role) -> ExpressionMatrix:
    if source.ndim != 2:
        raise SSAInputError(f"{role}: expected a 2-D (rows x genes) matrix, got shape {source.shape}")
    n, g = source.shape
    if isinstance(source, da.Array):
        X = source.rechunk((chunk_rows or source.chunks[0][0], g))
    elif sp.issparse(source):
        X = _sparse_to_dask(sp.csr_matrix(source), chunk_rows or DEFAULT_CHUNK_ROWS)
    else:
        X = da.from_array(np.asarray(source), chunks=(chunk_rows or DEFAULT_CHUNK_ROWS, g))
    gene_index = _check_names(genes if genes is not None else [f"gene_{i}" for i in range(g)], g, "gene names", role)
    row_index = _check_names(names if names is not None else [f"{role}_{i}" for i in range(n)], n, "row names", role)
    return ExpressionMatrix(X=X, genes=gene_index, names=row_index, obs=pd.DataFrame(index=row_index))


def _sparse_to_dask(matrix: sp.csr_matrix, chunk_rows: int) -> da.Array:
    """Row-chunked Dask array whose chunks are CSR slices of ``matrix``."""
    return da.from_array(matrix, chunks=(chunk_rows, matrix.shape[1]), asarray=False, meta=matrix[:0])


def _from_anndata(adata: Any, *, layer, gene_key, chunk_rows, role) -> ExpressionMatrix:
    X = adata.layers[layer] if layer is not None else adata.X
    if X is None:
        raise SSAInputError(f"{role}: the AnnData has no X" + (f" layer {layer!r}" if layer else ""))
    if isinstance(X, da.Array):
        Xd = _row_chunked(X, chunk_rows)
    elif sp.issparse(X):
        Xd = _sparse_to_dask(sp.csr_matrix(X), chunk_rows or DEFAULT_CHUNK_ROWS)
    else:
        Xd = da.from_array(np.asarray(X), chunks=(chunk_rows or DEFAULT_CHUNK_ROWS, X.shape[1]))
    genes = adata.var[gene_key] if gene_key is not None else adata.var_names
    obs = adata.obs if isinstance(adata.obs, pd.DataFrame) else pd.DataFrame(index=adata.obs_names)
    return ExpressionMatrix(
        X=Xd,
        genes=_check_names(genes, Xd.shape[1], "gene names", role),
        names=_check_names(adata.obs_names, Xd.shape[0], "row names", role),
        coords=_coords_from_obs(obs, adata.obsm, role),
        obs=obs,
    )


def _read_path(path: Path, *, layer, gene_key, chunk_rows, role) -> ExpressionMatrix:
    if not path.exists():
        raise SSAInputError(f"{role}: no such file or directory: {path}")
    backend = "hdf5" if path.suffix == ".h5ad" or (path.is_file() and _looks_like_hdf5(path)) else "zarr"
    try:
        with _open_root(path, backend) as root:
            return _from_root(root, path, backend, layer=layer, gene_key=gene_key, chunk_rows=chunk_rows, role=role)
    except (SSAInputError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - any reader or codec failure means "unreadable"
        raise SSAInputError(f"{role}: cannot read {path}: {type(exc).__name__}: {exc}") from exc


@contextmanager
def _open_root(path: Path, backend: str) -> Iterator[Any]:
    """The root group (or array) of an HDF5 file or Zarr store, closed on exit where that applies."""
    if backend == "hdf5":
        import h5py

        with h5py.File(path, "r") as handle:
            yield handle
    else:
        import zarr

        yield zarr.open(str(path), mode="r")


def _looks_like_hdf5(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89HDF\r\n\x1a\n"


def _from_root(root: Any, path: Path, backend: str, *, layer, gene_key, chunk_rows, role) -> ExpressionMatrix:
    if not hasattr(root, "keys"):  # a Zarr array at the root of the store
        return _from_plain_array(root, path, backend, chunk_rows=chunk_rows, role=role)
    if "obs" not in root or "var" not in root:
        if "X" in root:
            return _from_plain_array(root["X"], path, backend, chunk_rows=chunk_rows, role=role, parent=root)
        raise SSAInputError(f"{role}: {path} is neither an AnnData store nor a Zarr array with an 'X'")
    return _from_anndata_store(root, path, backend, layer=layer, gene_key=gene_key, chunk_rows=chunk_rows, role=role)


def _from_anndata_store(group: Any, path: Path, backend: str, *, layer, gene_key, chunk_rows, role) -> ExpressionMatrix:
    import anndata.io as aio

    name = f"layers/{layer}" if layer is not None else "X"
    if name not in group:
        raise SSAInputError(f"{role}: {path} has no " + (f"layer {layer!r}" if layer else "X"))
    stored = _stored_matrix(group[name], path, backend, name, role)
    rows = chunk_rows or _stored_chunk_rows(group[name]) or DEFAULT_CHUNK_ROWS
    obs = aio.read_elem(group["obs"])
    var = aio.read_elem(group["var"])
    obsm = {"spatial": aio.read_elem(group["obsm"]["spatial"])} if "obsm" in group and "spatial" in group["obsm"] else None
    if gene_key is not None and gene_key not in var.columns:
        raise SSAInputError(f"{role}: var has no column {gene_key!r} (columns: {list(var.columns)})")
    genes = var[gene_key] if gene_key is not None else var.index
    return ExpressionMatrix(
        X=stored.lazy(rows),
        genes=_check_names(genes, stored.shape[1], "gene names", role),
        names=_check_names(obs.index, stored.shape[0], "row names", role),
        coords=_coords_from_obs(obs, obsm, role),
        obs=obs,
    )


def _stored_matrix(elem: Any, path: Path, backend: str, name: str, role: str) -> StoredMatrix:
    """Describe a stored dense array or CSR group, checking what can be checked without reading it."""
    encoding = elem.attrs.get("encoding-type") if hasattr(elem, "attrs") else None
    where = f"{role}: {path} ({name or 'array'})"
    if encoding == "csc_matrix":
        raise SSAInputError(f"{where} is stored column-major (CSC); store it as CSR: adata.X = adata.X.tocsr()")
    if encoding == "csr_matrix":
        shape = tuple(int(s) for s in elem.attrs["shape"])
        indptr, indices, data = elem["indptr"], elem["indices"], elem["data"]
        if backend == "zarr":  # before reading indptr: a missing chunk would read as zeros
            check_zarr_complete({f"{name}/indptr": indptr, f"{name}/indices": indices, f"{name}/data": data},
                                where=f"{role}: {path}")
        n_indptr = int(indptr.shape[0])
        check_csr_layout(
            n_rows=shape[0], n_indptr=n_indptr, first=int(indptr[0]) if n_indptr else 0,
            last=int(indptr[n_indptr - 1]) if n_indptr else 0, nnz=int(indices.shape[0]), n_data=int(data.shape[0]),
            where=where,
        )
        stored = StoredMatrix(path, name, backend, True, shape, np.dtype(data.dtype), int(indices.shape[0]), role)
    elif hasattr(elem, "shape") and hasattr(elem, "dtype"):
        if len(elem.shape) != 2:
            raise SSAInputError(f"{where} has shape {tuple(elem.shape)}, expected (rows x genes)")
        if backend == "zarr":
            check_zarr_complete({name or "array": elem}, where=f"{role}: {path}")
        stored = StoredMatrix(path, name, backend, False, tuple(int(s) for s in elem.shape), np.dtype(elem.dtype), 0, role)
    else:
        raise SSAInputError(f"{where} has encoding {encoding!r}; expected a dense array or a CSR matrix")
    return stored


@dataclass(frozen=True)
class StoredMatrix:
    """Where a 2-D matrix lives on disk; small and picklable, re-opened by every block-reading task.

    Every block is checked as it is read (CSR structure, see :mod:`ssa_dask.validate`), and any
    reader or codec failure becomes an :class:`SSAInputError` naming the file and the rows, so a
    damaged file never reaches SciPy or Numba and never surfaces as a raw traceback.

    Attributes
    ----------
    path : pathlib.Path
        Absolute path of the ``.h5ad`` file or Zarr store (absolute, so workers in any directory
        read the same file).
    element : str
        Path of the matrix inside the file (``"X"``, ``"layers/counts"``; ``""`` for a root array).
    backend : str
        ``"hdf5"`` or ``"zarr"``.
    sparse : bool
        CSR group (``indptr``/``indices``/``data``) rather than a dense array.
    shape : tuple of int
        ``(n_rows, n_genes)``.
    dtype : numpy.dtype
        Value type.
    nnz : int
        Stored entries (sparse only).
    role : str
        Names the input in messages.
    """

    path: Path
    element: str
    backend: str
    sparse: bool
    shape: tuple[int, int]
    dtype: np.dtype
    nnz: int
    role: str

    def lazy(self, chunk_rows: int) -> da.Array:
        """The matrix as a Dask array of ``chunk_rows``-row blocks, each read by its own task."""
        n_rows, n_genes = self.shape
        row_chunks = tuple(min(chunk_rows, n_rows - start) for start in range(0, n_rows, chunk_rows)) or (0,)
        meta = sp.csr_matrix((0, 0), dtype=self.dtype) if self.sparse else np.empty((0, 0), dtype=self.dtype)
        return da.map_blocks(_read_block, self, chunks=(row_chunks, (n_genes,)), dtype=self.dtype, meta=meta)

    def read_rows(self, start: int, stop: int) -> np.ndarray | sp.csr_matrix:
        """Rows ``start:stop``, checked; raises :class:`SSAInputError` naming the file and rows."""
        where = f"{self.role}: {self.path} ({self.element or 'array'}, rows {start}-{stop - 1})"
        try:
            with _open_root(self.path, self.backend) as root:
                elem = root[self.element] if self.element else root
                return self._read_csr(elem, start, stop, where) if self.sparse else np.asarray(elem[start:stop])
        except (SSAInputError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - reader and codec errors of a damaged file
            raise SSAInputError(f"{where}: cannot read: {type(exc).__name__}: {exc} (damaged file?)") from exc

    def _read_csr(self, elem: Any, start: int, stop: int, where: str) -> sp.csr_matrix:
        n_cols = self.shape[1]
        indptr = self._read_part(elem, "indptr", start, stop + 1, where)
        if indptr.size != stop - start + 1:
            raise SSAInputError(f"{where}: indptr holds {indptr.size} entries for {stop - start} rows (truncated file?)")
        check_indptr_block(indptr, n_cols=n_cols, nnz=self.nnz, where=where)
        low, high = int(indptr[0]), int(indptr[-1])
        indices = self._read_part(elem, "indices", low, high, where)
        check_indices_block(indices, n_cols=n_cols, where=where)
        data = self._read_part(elem, "data", low, high, where)
        if data.size != indices.size:
            raise SSAInputError(f"{where}: {data.size} values for {indices.size} column indices (truncated file?)")
        return sp.csr_matrix((data, indices, indptr - low), shape=(stop - start, n_cols))

    def _read_part(self, elem: Any, part: str, low: int, high: int, where: str) -> np.ndarray:
        """Entries ``low:high`` of one array of a CSR group; errors name the array and its chunks."""
        try:
            return np.asarray(elem[part][low:high])
        except (SSAInputError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - reader and codec errors of a damaged file
            size = (elem[part].chunks or (0,))[0] if self.backend == "zarr" else 0
            chunks = f", chunk(s) {low // size}-{max(high - 1, low) // size}" if size else ""
            raise SSAInputError(
                f"{where}: cannot read {self.element}/{part}[{low}:{high}]{chunks}: {type(exc).__name__}: {exc} "
                "(damaged file?)"
            ) from exc


def _read_block(stored: StoredMatrix, block_info: dict | None = None) -> np.ndarray | sp.csr_matrix:
    """Dask task: read the rows of one block of ``stored`` (its location comes from ``block_info``)."""
    (start, stop), _ = block_info[None]["array-location"]
    return stored.read_rows(start, stop)


def _stored_chunk_rows(elem: Any) -> int | None:
    """Rows per stored chunk: of a dense array, or of a CSR group written by :func:`ingest`."""
    chunks = getattr(elem, "chunks", None)
    if chunks and len(chunks) == 2:
        return int(chunks[0])
    rows = elem.attrs.get(CHUNK_ROWS_ATTR) if hasattr(elem, "attrs") else None
    return int(rows) if rows else None


def _from_plain_array(array: Any, path: Path, backend: str, *, chunk_rows, role, parent: Any = None) -> ExpressionMatrix:
    name = array.name.strip("/") if parent is not None else ""
    stored = _stored_matrix(array, path, backend, name, role)
    genes = array.attrs.get("genes")
    if genes is None and parent is not None and "genes" in parent:
        genes = _as_strings(parent["genes"][:])
    if genes is None:
        raise SSAInputError(f"{role}: the array in {path} has no gene names (attrs 'genes' or array 'genes')")
    names = array.attrs.get("names")
    if names is None and parent is not None and "names" in parent:
        names = _as_strings(parent["names"][:])
    X = stored.lazy(chunk_rows or _stored_chunk_rows(array) or DEFAULT_CHUNK_ROWS)
    return _from_array(X, genes=genes, names=names, chunk_rows=None, role=role)


def _as_strings(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def ingest(
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    layer: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    overwrite: bool = False,
) -> Path:
    """Rewrite an ``.h5ad`` file into a row-chunked AnnData-on-Zarr store, chunk by chunk.

    The matrix is streamed: no more than a few row chunks are in memory at once, so files larger
    than memory can be ingested.  Every block is checked as it is read, so a damaged file is
    refused instead of copied.  ``obs``, ``var`` and ``obsm`` are copied.  The store is written
    next to ``target`` and moved into place only when complete (see :func:`write_atomically`).
    Every chunk is written, even all-zero ones, so that a missing chunk file always means damage,
    and carries a CRC32C checksum, so that damaged bytes are found when read.

    Parameters
    ----------
    source
        Path of the ``.h5ad`` (or AnnData-Zarr) file to read.
    target
        Path of the Zarr store to create.
    layer
        Layer to store as ``X`` (default: ``X``).
    chunk_rows
        Rows per chunk in the new store.
    overwrite
        Replace ``target`` if it exists.

    Returns
    -------
    pathlib.Path
        ``target``, absolute.

    Raises
    ------
    SSAInputError
        The source is unreadable or damaged, or ``target`` cannot be written.
    OutputExistsError
        ``target`` exists (or appeared while writing) and ``overwrite`` is false.
    """
    import anndata as ad
    import anndata.io as aio
    import zarr
    from zarr.codecs import Crc32cCodec, ZstdCodec

    target = check_writable(target, overwrite=overwrite, what="ingest output")
    matrix = read_expression(resolve_local_path(source, "ingest"), layer=layer, chunk_rows=chunk_rows, role="ingest")

    codecs = {"compressors": (ZstdCodec(), Crc32cCodec())}

    def write(tmp: Path) -> None:
        # Explicit chunking (no zarr v3 auto-sharding: one file per chunk, and no warning about it).
        with ad.settings.override(auto_shard_zarr_v3=False), zarr.config.set({"array.write_empty_chunks": True}):
            group = zarr.open_group(str(tmp), mode="w")
            X = matrix.X.rechunk((chunk_rows, matrix.shape[1]))
            if matrix.is_sparse:
                aio.write_elem(group, "X", X, dataset_kwargs=codecs)
                group["X"].attrs[CHUNK_ROWS_ATTR] = chunk_rows
            else:
                X.to_zarr(str(tmp / "X"), overwrite=True, **codecs)
                group["X"].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
            obs = matrix.obs if matrix.obs is not None else pd.DataFrame(index=matrix.names)
            aio.write_elem(group, "obs", obs, dataset_kwargs=codecs)
            aio.write_elem(group, "var", pd.DataFrame(index=matrix.genes), dataset_kwargs=codecs)
            obsm = {"spatial": matrix.coords} if matrix.coords is not None else {}
            aio.write_elem(group, "obsm", obsm, dataset_kwargs=codecs)
            group.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})

    return write_atomically(target, write, overwrite=overwrite)
