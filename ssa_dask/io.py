"""Read expression matrices lazily, ingest h5ad into chunked Zarr, write results atomically.

Every input becomes an :class:`ExpressionMatrix`: a row-chunked Dask array (chunks stay
``scipy.sparse.csr_matrix`` when the input is sparse) plus its gene names, row names, optional
2-D coordinates and the row annotations.  Files are opened lazily, so a matrix on disk is read
chunk by chunk when a computation needs it, on whichever Dask worker runs that chunk.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ssa_dask.errors import OutputExistsError, SSAInputError

log = logging.getLogger(__name__)

#: Default number of rows per chunk when the input does not bring its own chunking.
DEFAULT_CHUNK_ROWS = 8192
#: Attribute of a sparse ``X`` group recording the rows per chunk that :func:`ingest` wrote.
CHUNK_ROWS_ATTR = "ssa_dask_chunk_rows"


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
        When the source cannot be read or is not a 2-D matrix with matching names.
    """
    if isinstance(source, ExpressionMatrix):
        matrix = source
    elif isinstance(source, (str, os.PathLike)):
        matrix = _read_path(Path(source), layer=layer, gene_key=gene_key, chunk_rows=chunk_rows, role=role)
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
    if what == "gene names" and index.has_duplicates:
        dup = index[index.duplicated()].unique()[:5]
        raise SSAInputError(f"{role}: duplicated gene names {list(dup)}; make them unique first")
    return index


def _coords_from_obs(obs: pd.DataFrame | None, obsm: Any) -> np.ndarray | None:
    if obs is not None and {"x", "y"} <= set(obs.columns):
        return obs[["x", "y"]].to_numpy(dtype=np.float64)
    if obsm is not None and "spatial" in obsm:
        spatial = np.asarray(obsm["spatial"], dtype=np.float64)
        return spatial[:, :2]
    return None


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
        names=pd.Index(adata.obs_names.astype(str)),
        coords=_coords_from_obs(obs, adata.obsm),
        obs=obs,
    )


def _read_path(path: Path, *, layer, gene_key, chunk_rows, role) -> ExpressionMatrix:
    if not path.exists():
        raise SSAInputError(f"{role}: no such file or directory: {path}")
    try:
        if path.suffix == ".h5ad" or (path.is_file() and _looks_like_hdf5(path)):
            import h5py

            group = h5py.File(path, "r")
        else:
            import zarr

            group = zarr.open(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - any reader failure means "unreadable"
        raise SSAInputError(f"{role}: cannot read {path}: {exc}") from exc
    import zarr

    if isinstance(group, zarr.Array):
        return _from_plain_zarr_array(group, path, chunk_rows=chunk_rows, role=role)
    if "obs" not in group or "var" not in group:
        if "X" in group:
            return _from_plain_zarr_array(group["X"], path, chunk_rows=chunk_rows, role=role, parent=group)
        raise SSAInputError(f"{role}: {path} is neither an AnnData store nor a Zarr array with an 'X'")
    return _from_anndata_store(group, path, layer=layer, gene_key=gene_key, chunk_rows=chunk_rows, role=role)


def _looks_like_hdf5(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89HDF\r\n\x1a\n"


def _from_anndata_store(group: Any, path: Path, *, layer, gene_key, chunk_rows, role) -> ExpressionMatrix:
    import anndata.io as aio
    from anndata.experimental import read_elem_lazy

    try:
        elem = group["layers"][layer] if layer is not None else group["X"]
    except KeyError as exc:
        raise SSAInputError(f"{role}: {path} has no " + (f"layer {layer!r}" if layer else "X")) from exc
    n_genes = _elem_shape(elem)[1]
    rows = chunk_rows or _stored_chunk_rows(elem) or DEFAULT_CHUNK_ROWS
    try:
        X = read_elem_lazy(elem, chunks=(rows, n_genes))
        obs = aio.read_elem(group["obs"])
        var = aio.read_elem(group["var"])
        obsm = {"spatial": aio.read_elem(group["obsm"]["spatial"])} if "obsm" in group and "spatial" in group["obsm"] else None
    except Exception as exc:  # noqa: BLE001
        raise SSAInputError(f"{role}: cannot read the AnnData store {path}: {exc}") from exc
    if gene_key is not None and gene_key not in var.columns:
        raise SSAInputError(f"{role}: var has no column {gene_key!r} (columns: {list(var.columns)})")
    genes = var[gene_key] if gene_key is not None else var.index
    return ExpressionMatrix(
        X=X,
        genes=_check_names(genes, n_genes, "gene names", role),
        names=pd.Index(obs.index.astype(str)),
        coords=_coords_from_obs(obs, obsm),
        obs=obs,
    )


def _elem_shape(elem: Any) -> tuple[int, int]:
    shape = elem.attrs.get("shape") if hasattr(elem, "attrs") else None
    return tuple(int(s) for s in (shape if shape is not None else elem.shape))


def _stored_chunk_rows(elem: Any) -> int | None:
    """Rows per stored chunk: of a dense array, or of a CSR group written by :func:`ingest`."""
    chunks = getattr(elem, "chunks", None)
    if chunks and len(chunks) == 2:
        return int(chunks[0])
    rows = elem.attrs.get(CHUNK_ROWS_ATTR) if hasattr(elem, "attrs") else None
    return int(rows) if rows else None


def _from_plain_zarr_array(array: Any, path: Path, *, chunk_rows, role, parent: Any = None) -> ExpressionMatrix:
    if array.ndim != 2:
        raise SSAInputError(f"{role}: the Zarr array in {path} has shape {array.shape}, expected (rows x genes)")
    genes = array.attrs.get("genes")
    if genes is None and parent is not None and "genes" in parent:
        genes = [str(g) for g in parent["genes"][:]]
    if genes is None:
        raise SSAInputError(f"{role}: the Zarr array in {path} has no gene names (attrs 'genes' or array 'genes')")
    names = array.attrs.get("names")
    if names is None and parent is not None and "names" in parent:
        names = [str(n) for n in parent["names"][:]]
    X = da.from_zarr(array)
    return _from_array(X.rechunk((chunk_rows or array.chunks[0], array.shape[1])), genes=genes, names=names, chunk_rows=None, role=role)


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
    than memory can be ingested.  ``obs``, ``var`` and ``obsm`` are copied.  The store is written
    next to ``target`` and renamed into place only when complete.

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
        ``target``.
    """
    import anndata.io as aio
    import zarr

    matrix = read_expression(source, layer=layer, chunk_rows=chunk_rows, role="ingest")

    def write(tmp: Path) -> None:
        group = zarr.open_group(str(tmp), mode="w")
        X = matrix.X.rechunk((chunk_rows, matrix.shape[1]))
        if matrix.is_sparse:
            aio.write_elem(group, "X", X)
            group["X"].attrs[CHUNK_ROWS_ATTR] = chunk_rows
        else:
            X.to_zarr(str(tmp / "X"), overwrite=True)
            group["X"].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        obs = matrix.obs if matrix.obs is not None else pd.DataFrame(index=matrix.names)
        aio.write_elem(group, "obs", obs)
        aio.write_elem(group, "var", pd.DataFrame(index=matrix.genes))
        obsm = {"spatial": matrix.coords} if matrix.coords is not None else {}
        aio.write_elem(group, "obsm", obsm)
        group.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})

    return write_atomically(target, write, overwrite=overwrite)


def write_atomically(target: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Run ``write(tmp)`` on a temporary sibling of ``target``, then rename it into place.

    A failure inside ``write`` leaves ``target`` untouched and removes the partial output.

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
        ``target``.

    Raises
    ------
    OutputExistsError
        ``target`` exists and ``overwrite`` is false.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            _remove(tmp)
    log.info("wrote %s", target)
    return target


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
