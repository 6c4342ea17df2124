"""Damaged inputs: every one gives an SSAInputError naming the file, never a crash or silent zeros."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import ssa_dask
from ssa_dask.errors import SSAInputError

N_ROWS, N_GENES = 3000, 200


def _adata(dense: bool = False) -> ad.AnnData:
    X = sp.random(N_ROWS, N_GENES, density=0.05, format="csr", random_state=0, dtype=np.float32) * 5
    obs = pd.DataFrame(index=[f"c{i}" for i in range(N_ROWS)])
    var = pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)])
    return ad.AnnData(X.toarray() if dense else X, obs=obs, var=var)


@pytest.fixture
def sparse_h5ad(tmp_path) -> Path:
    path = tmp_path / "cells.h5ad"
    _adata().write_h5ad(path)
    return path


def _garble_h5_dataset(path: Path, name: str, n_bytes: int = 4096) -> None:
    """Overwrite ``n_bytes`` random bytes inside the stored bytes of dataset ``name`` (chunked or not)."""
    with h5py.File(path, "r") as handle:
        dataset = handle[name]
        if dataset.chunks is None:
            offset, size = dataset.id.get_offset(), dataset.id.get_storage_size()
        else:
            info = dataset.id.get_chunk_info(dataset.id.get_num_chunks() // 2)
            offset, size = info.byte_offset, info.size
    with open(path, "r+b") as raw:
        raw.seek(offset)
        raw.write(np.random.default_rng(1).integers(0, 256, min(n_bytes, size), dtype=np.uint8).tobytes())


def _read_all(source: Path, **kwargs) -> None:
    # One block at a time: with threads, blocks still being read when the first one fails would keep
    # the file open, and the next step of a test (reopening it to damage it further) would race them.
    ssa_dask.read_expression(source, **kwargs).X.compute(scheduler="synchronous")


def _assert_named_input_error(excinfo: pytest.ExceptionInfo, path: Path) -> None:
    assert excinfo.type is SSAInputError
    assert str(path) in str(excinfo.value)


def test_garbled_h5ad_indices_are_refused_on_read_and_ingest_without_a_crash(sparse_h5ad, tmp_path):
    _garble_h5_dataset(sparse_h5ad, "X/indices")
    target = tmp_path / "copy.zarr"
    # In a subprocess: a segmentation fault would show as a negative return code instead of killing pytest.
    script = textwrap.dedent(f"""
        import ssa_dask
        from ssa_dask.errors import SSAInputError
        for step in ("read", "ingest"):
            try:
                if step == "read":
                    ssa_dask.read_expression({str(sparse_h5ad)!r}).X.compute()
                else:
                    ssa_dask.ingest({str(sparse_h5ad)!r}, {str(target)!r})
            except SSAInputError as exc:
                print(step, "refused:", exc)
            else:
                print(step, "ACCEPTED")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(ssa_dask.__file__).parents[1])})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(" ")[:2] for line in lines] == [["read", "refused:"], ["ingest", "refused:"]]
    assert all(str(sparse_h5ad) in line and "column index" in line for line in lines)
    assert not target.exists() and list(tmp_path.glob("*copy*")) == []


def test_out_of_range_and_negative_indices_are_refused(sparse_h5ad):
    for bad in (N_GENES, -1):
        with h5py.File(sparse_h5ad, "r+") as handle:
            handle["X/indices"][7] = bad
        with pytest.raises(SSAInputError, match=r"column index\(es\) outside \[0, 200\)") as excinfo:
            _read_all(sparse_h5ad, chunk_rows=1000)
        _assert_named_input_error(excinfo, sparse_h5ad)
        assert "rows 0-999" in str(excinfo.value)


def test_non_monotone_indptr_is_refused_naming_the_rows(sparse_h5ad):
    with h5py.File(sparse_h5ad, "r+") as handle:
        indptr = handle["X/indptr"]
        indptr[1510] = indptr[1512] + 3
    matrix = ssa_dask.read_expression(sparse_h5ad, chunk_rows=500)
    assert matrix.X.blocks[0].compute().nnz > 0  # blocks before the damage still read
    with pytest.raises(SSAInputError, match="indptr is corrupt at block row 10") as excinfo:
        matrix.X.blocks[3].compute()
    _assert_named_input_error(excinfo, sparse_h5ad)
    assert "rows 1500-1999" in str(excinfo.value)


def test_indptr_not_ending_at_nnz_is_refused_before_computing(sparse_h5ad):
    with h5py.File(sparse_h5ad, "r+") as handle:
        handle["X/indptr"][-1] = handle["X/indptr"][-1] + 10
    with pytest.raises(SSAInputError, match="indptr ends at") as excinfo:
        ssa_dask.read_expression(sparse_h5ad)
    _assert_named_input_error(excinfo, sparse_h5ad)


@pytest.fixture
def sparse_store(tmp_path, sparse_h5ad) -> Path:
    return ssa_dask.ingest(sparse_h5ad, tmp_path / "cells.zarr", chunk_rows=500)


@pytest.fixture
def dense_store(tmp_path) -> Path:
    source = tmp_path / "dense.h5ad"
    _adata(dense=True).write_h5ad(source)
    return ssa_dask.ingest(source, tmp_path / "dense.zarr", chunk_rows=500)


def test_ingested_stores_read_back_exactly(sparse_store, dense_store, sparse_h5ad):
    expected = ad.read_h5ad(sparse_h5ad).X.toarray()
    np.testing.assert_array_equal(ssa_dask.read_expression(sparse_store).X.compute().toarray(), expected)
    np.testing.assert_array_equal(ssa_dask.read_expression(dense_store).X.compute(), expected)


@pytest.mark.parametrize("array", ["X/indptr", "X/data"])
def test_a_deleted_chunk_of_a_sparse_store_is_named_before_computing(sparse_store, array):
    chunk = sorted((sparse_store / array / "c").iterdir())[-1]
    chunk.unlink()
    with pytest.raises(SSAInputError, match="chunk file.s. missing") as excinfo:
        ssa_dask.read_expression(sparse_store)
    _assert_named_input_error(excinfo, sparse_store)
    assert f"{array}: c/{chunk.name}" in str(excinfo.value)


def test_a_deleted_chunk_of_a_dense_store_is_named_not_read_as_zeros(dense_store):
    (dense_store / "X" / "c" / "2" / "0").unlink()
    with pytest.raises(SSAInputError, match="X: c/2/0") as excinfo:
        ssa_dask.read_expression(dense_store)
    _assert_named_input_error(excinfo, dense_store)


def test_an_all_zero_block_written_by_ingest_is_not_mistaken_for_a_missing_chunk(tmp_path):
    adata = _adata(dense=True)
    adata.X[:500] = 0  # a whole stored chunk of zeros: zarr would skip writing it by default
    adata.write_h5ad(tmp_path / "zeros.h5ad")
    store = ssa_dask.ingest(tmp_path / "zeros.h5ad", tmp_path / "zeros.zarr", chunk_rows=500)
    np.testing.assert_array_equal(ssa_dask.read_expression(store).X.compute(), adata.X)


@pytest.mark.parametrize("damage", ["garble", "truncate"])
@pytest.mark.parametrize("array", ["X/data", "X/indices", "X/indptr"])
def test_a_damaged_compressed_chunk_is_named(sparse_store, array, damage):
    chunk = sorted((sparse_store / array / "c").iterdir())[0]
    raw = chunk.read_bytes()
    if damage == "garble":
        middle = len(raw) // 2
        raw = raw[:middle] + bytes(255 - b for b in raw[middle : middle + 64]) + raw[middle + 64 :]
    else:
        raw = raw[: len(raw) // 2]
    chunk.write_bytes(raw)
    with pytest.raises(SSAInputError) as excinfo:
        _read_all(sparse_store)
    _assert_named_input_error(excinfo, sparse_store)


@pytest.mark.parametrize("metadata", ["zarr.json", "X/zarr.json", "X/indices/zarr.json", "obs/zarr.json"])
def test_broken_zarr_json_is_named(sparse_store, metadata):
    (sparse_store / metadata).write_text('{"zarr_format": 3, "node_type": ')
    with pytest.raises(SSAInputError) as excinfo:
        _read_all(sparse_store)
    _assert_named_input_error(excinfo, sparse_store)


def test_a_truncated_h5ad_is_named(sparse_h5ad):
    raw = sparse_h5ad.read_bytes()
    sparse_h5ad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SSAInputError) as excinfo:
        _read_all(sparse_h5ad)
    _assert_named_input_error(excinfo, sparse_h5ad)


def test_align_on_a_garbled_h5ad_exits_2_with_one_line_naming_the_file(sparse_h5ad, tmp_path):
    _garble_h5_dataset(sparse_h5ad, "X/indices")
    rng = np.random.default_rng(0)
    spots = ad.AnnData(
        rng.poisson(2, (40, N_GENES)).astype(np.float32),
        obs=pd.DataFrame({"x": rng.random(40), "y": rng.random(40)}, index=[f"s{i}" for i in range(40)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)]),
    )
    spots.write_h5ad(tmp_path / "spots.h5ad")
    out = tmp_path / "out.zarr"
    command = "from ssa_dask.cli import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", command, "align", str(sparse_h5ad), str(tmp_path / "spots.h5ad"), "-o", str(out),
         "--scheduler", "threads", "--n-genes", "50"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(ssa_dask.__file__).parents[1]), "COLUMNS": "400"},
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output
    error = next(line for line in output.splitlines() if line.startswith("error:"))
    assert str(sparse_h5ad) in error and "column index" in error
    assert not out.exists()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_deleted_chunk_of_a_plain_zarr_array_is_named(tmp_path, zarr_format):
    import zarr

    store = tmp_path / "plain.zarr"
    array = zarr.create_array(str(store), shape=(30, 4), chunks=(10, 4), dtype="float32", zarr_format=zarr_format)
    array[:] = 1.0
    array.attrs["genes"] = list("abcd")
    assert ssa_dask.read_expression(store).X.compute().sum() == 120.0
    key = "1.0" if zarr_format == 2 else "c/1/0"
    (store / key).unlink()
    with pytest.raises(SSAInputError, match=f"array: {key}") as excinfo:
        ssa_dask.read_expression(store)
    _assert_named_input_error(excinfo, store)
