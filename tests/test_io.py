"""Lazy reading of h5ad / AnnData-Zarr / Zarr arrays, ingest, and atomic writes."""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

import ssa_dask
from ssa_dask.errors import OutputExistsError, SSAInputError
from ssa_dask.paths import check_outputs, check_writable, resolve_local_path, write_atomically


@pytest.fixture
def small_adata() -> ad.AnnData:
    rng = np.random.default_rng(0)
    X = sp.random(120, 30, density=0.3, format="csr", random_state=2, dtype=np.float32) * 5
    obs = pd.DataFrame({"x": rng.random(120), "y": rng.random(120)}, index=[f"c{i}" for i in range(120)])
    var = pd.DataFrame({"symbol": [f"S{i}" for i in range(30)]}, index=[f"ENSG{i}" for i in range(30)])
    adata = ad.AnnData(X, obs=obs, var=var)
    adata.layers["counts"] = X * 2
    return adata


def test_h5ad_is_read_lazily_with_layer_gene_key_and_coordinates(tmp_path, small_adata):
    path = tmp_path / "a.h5ad"
    small_adata.write_h5ad(path)
    matrix = ssa_dask.read_expression(str(path), layer="counts", gene_key="symbol", chunk_rows=50)
    assert matrix.is_sparse and matrix.X.chunks[0] == (50, 50, 20)
    assert list(matrix.genes[:2]) == ["S0", "S1"]
    np.testing.assert_allclose(matrix.X.compute().toarray(), small_adata.layers["counts"].toarray())
    np.testing.assert_allclose(matrix.coords, small_adata.obs[["x", "y"]].to_numpy())


def test_ingest_streams_h5ad_into_row_chunked_zarr(tmp_path, small_adata):
    source = tmp_path / "a.h5ad"
    small_adata.write_h5ad(source)
    target = ssa_dask.ingest(source, tmp_path / "a.zarr", chunk_rows=40)
    back = ad.read_zarr(target)
    np.testing.assert_allclose(back.X.toarray(), small_adata.X.toarray())
    assert list(back.obs_names) == list(small_adata.obs_names)
    lazy = ssa_dask.read_expression(str(target))
    assert lazy.X.chunks[0] == (40, 40, 40)
    np.testing.assert_allclose(lazy.coords, small_adata.obs[["x", "y"]].to_numpy())
    with pytest.raises(ssa_dask.OutputExistsError):
        ssa_dask.ingest(source, target)


def test_ingest_of_a_real_dataset_keeps_values(tmp_path, shared_dataset):
    path = shared_dataset("xenium_breast_scider")
    target = ssa_dask.ingest(path, tmp_path / "xenium.zarr", chunk_rows=4096)
    original = ad.read_h5ad(path)
    lazy = ssa_dask.read_expression(str(target))
    assert lazy.shape == original.shape
    np.testing.assert_array_equal(lazy.X.compute().toarray(), original.X.toarray())


def test_plain_zarr_array_with_gene_names(tmp_path):
    values = np.arange(60, dtype=np.float32).reshape(12, 5)
    array = zarr.create_array(str(tmp_path / "m.zarr"), shape=values.shape, chunks=(5, 5), dtype="float32")
    array[:] = values
    array.attrs["genes"] = list("abcde")
    matrix = ssa_dask.read_expression(str(tmp_path / "m.zarr"))
    assert list(matrix.genes) == list("abcde") and matrix.X.chunks[0] == (5, 5, 2)
    np.testing.assert_array_equal(matrix.X.compute(), values)
    del array.attrs["genes"]
    with pytest.raises(ssa_dask.SSAInputError, match="no gene names"):
        ssa_dask.read_expression(str(tmp_path / "m.zarr"))


def test_failed_write_leaves_nothing_and_keeps_the_old_output(tmp_path):
    target = tmp_path / "out.zarr"

    def broken(tmp):
        tmp.mkdir()
        (tmp / "half").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomically(target, broken)
    assert list(tmp_path.iterdir()) == []
    write_atomically(target, lambda tmp: tmp.mkdir())
    with pytest.raises(RuntimeError):
        write_atomically(target, broken, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out.zarr"]


@pytest.mark.parametrize("kind", ["h5ad", "sparse_zarr", "dense_zarr", "plain_zarr"])
def test_relative_paths_read_the_same_file_from_another_directory(tmp_path, monkeypatch, small_adata, kind):
    """Workers of an external scheduler run in another directory: the graph must carry absolute paths."""
    data = tmp_path / "data"
    data.mkdir()
    expected = small_adata.X.toarray()
    if kind == "h5ad":
        small_adata.write_h5ad(data / "a.h5ad")
        name = "a.h5ad"
    elif kind == "plain_zarr":
        array = zarr.create_array(str(data / "a.zarr"), shape=expected.shape, chunks=(50, 30), dtype="float32")
        array[:] = expected
        array.attrs["genes"] = list(small_adata.var_names)
        name = "a.zarr"
    else:
        dense = small_adata.copy()
        if kind == "dense_zarr":
            dense.X = expected
        dense.write_h5ad(data / "source.h5ad")
        ssa_dask.ingest(data / "source.h5ad", data / "a.zarr", chunk_rows=50)
        name = "a.zarr"
    monkeypatch.chdir(data)
    matrix = ssa_dask.read_expression(name)
    elsewhere = tmp_path / "worker"
    (elsewhere / name).mkdir(parents=True)  # an empty store of the same name where the worker runs
    monkeypatch.chdir(elsewhere)
    values = matrix.X.compute()
    np.testing.assert_array_equal(values.toarray() if sp.issparse(values) else values, expected)


def test_ingest_takes_relative_paths(tmp_path, monkeypatch, small_adata):
    small_adata.write_h5ad(tmp_path / "a.h5ad")
    monkeypatch.chdir(tmp_path)
    target = ssa_dask.ingest("a.h5ad", "a.zarr")
    assert target == tmp_path / "a.zarr" and target.is_absolute()
    np.testing.assert_array_equal(ssa_dask.read_expression(target).X.compute().toarray(), small_adata.X.toarray())


@pytest.mark.parametrize("url", ["s3://bucket/cells.zarr", "gs://bucket/cells.h5ad", "https://host/cells.h5ad",
                                 Path("s3://bucket/cells.zarr"), "file:///data/cells.zarr"])
def test_urls_are_refused_and_make_no_local_folder(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    message = "URLs are not supported .* copy the store to a file system every worker mounts"
    with pytest.raises(SSAInputError, match=message):
        ssa_dask.read_expression(url)
    with pytest.raises(SSAInputError, match=message):
        ssa_dask.ingest(tmp_path / "missing.h5ad", url)
    with pytest.raises(SSAInputError, match="--kernel-path: URLs are not supported"):
        resolve_local_path(url, "--kernel-path")
    assert list(tmp_path.iterdir()) == []


def test_resolve_local_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_local_path("out/result.zarr", "-o") == tmp_path / "out" / "result.zarr"
    assert resolve_local_path("C:/x", "-o") == tmp_path / "C:" / "x"  # one-letter "scheme": a path


def test_duplicated_row_names_are_warned_and_kept(caplog, small_adata):
    small_adata.obs_names = ["c0", "c1", "c0", "c1"] + [f"c{i}" for i in range(4, 120)]
    with caplog.at_level(logging.WARNING, logger="ssa_dask.io"):
        matrix = ssa_dask.read_expression(small_adata, role="scRNA")
    assert matrix.names[:4].tolist() == ["c0", "c1", "c0", "c1"]
    assert "scRNA: 2 duplicated row names (e.g. ['c0', 'c1'])" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ssa_dask.io"):
        ssa_dask.read_expression(small_adata.X, genes=list(small_adata.var_names))
    assert caplog.text == ""


def _slow_writer(barrier: threading.Barrier, payload: str, as_store: bool):
    def write(tmp: Path) -> None:
        if as_store:
            tmp.mkdir()
            (tmp / "zarr.json").write_text(payload)
        else:
            tmp.write_text(payload)
        barrier.wait(timeout=30)  # both runs have passed the up-front exists-check and finished writing

    return write


@pytest.mark.parametrize("as_store", [False, True], ids=["file", "store"])
def test_two_runs_to_the_same_output_never_replace_each_other(tmp_path, as_store):
    target = tmp_path / ("out.zarr" if as_store else "out.h5ad")
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def run(payload: str) -> None:
        try:
            outcomes[payload] = write_atomically(target, _slow_writer(barrier, payload, as_store))
        except OutputExistsError as exc:
            outcomes[payload] = exc

    threads = [threading.Thread(target=run, args=(payload,)) for payload in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    winners = [p for p, o in outcomes.items() if isinstance(o, Path)]
    losers = [p for p, o in outcomes.items() if isinstance(o, OutputExistsError)]
    assert len(winners) == 1 and len(losers) == 1
    final = target / "zarr.json" if as_store else target
    assert final.read_text() == winners[0]
    message = str(outcomes[losers[0]])
    kept = next(p for p in tmp_path.iterdir() if ".ssa-result-" in p.name)
    assert str(target) in message and str(kept) in message
    assert (kept / "zarr.json" if as_store else kept).read_text() == losers[0]
    assert kept.suffix == target.suffix
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, kept.name])


def test_overwrite_replaces_a_store_but_never_a_folder_that_is_not_one(tmp_path):
    target = tmp_path / "out.zarr"
    write_atomically(target, lambda tmp: (tmp.mkdir(), (tmp / "zarr.json").write_text("old")))
    write_atomically(target, lambda tmp: (tmp.mkdir(), (tmp / "zarr.json").write_text("new")), overwrite=True)
    assert (target / "zarr.json").read_text() == "new"
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(SSAInputError, match="not a Zarr store"):
        write_atomically(home, lambda tmp: tmp.mkdir(), overwrite=True)
    with pytest.raises(SSAInputError, match="not a Zarr store"):
        check_writable(home, overwrite=True, what="-o")
    assert (home / "thesis.tex").read_text() == "precious"


def test_a_file_system_error_while_writing_is_one_named_error_and_leaves_nothing(tmp_path):
    def full_disk(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(ssa_dask.errors.OutputWriteError, match="cannot write .*out.h5ad: No space left on device"):
        write_atomically(tmp_path / "out.h5ad", full_disk)
    assert list(tmp_path.iterdir()) == []


def test_check_writable_creates_the_parent_and_leaves_no_probe(tmp_path):
    target = check_writable(tmp_path / "new" / "deeper" / "out.zarr", overwrite=False, what="-o")
    assert target.parent.is_dir() and list(target.parent.iterdir()) == []
    (tmp_path / "exists.h5ad").write_text("x")
    with pytest.raises(OutputExistsError, match="--obs-out: .*exists.h5ad exists"):
        check_writable(tmp_path / "exists.h5ad", overwrite=False, what="--obs-out")
    assert check_writable(tmp_path / "exists.h5ad", overwrite=True, what="--obs-out") == tmp_path / "exists.h5ad"


def test_check_writable_refuses_a_parent_that_is_a_regular_file(tmp_path):
    (tmp_path / "results").write_text("a file")
    with pytest.raises(SSAInputError, match=r"-o: cannot write .*: .*results is a regular file, not a folder"):
        check_writable(tmp_path / "results" / "run1" / "out.zarr", overwrite=False, what="-o")


def test_check_writable_refuses_an_unwritable_folder_even_as_root():
    # chmod does not stop root, so use a folder no one can create files in: /proc.
    with pytest.raises(SSAInputError, match="-o: cannot write in /proc"):
        check_writable("/proc/out.zarr", overwrite=False, what="-o")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; /proc covers it above")
def test_check_writable_refuses_a_read_only_folder(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(SSAInputError, match="Permission denied"):
            check_writable(folder / "out.zarr", overwrite=False, what="-o")
    finally:
        folder.chmod(0o755)


def test_check_outputs_refuses_the_same_path_twice_and_an_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SSAInputError, match="--obs-out: .*out.h5ad is -o"):
        check_outputs({"-o": "out.h5ad", "--obs-out": tmp_path / "out.h5ad"}, overwrite=False)
    with pytest.raises(SSAInputError, match="--obs-out: .* overlaps -o"):
        check_outputs({"-o": "out.zarr", "--obs-out": "out.zarr/obs.h5ad"}, overwrite=False)
    with pytest.raises(SSAInputError, match="-o: .*cells.zarr is an input"):
        check_outputs({"-o": "cells.zarr"}, overwrite=True, inputs=["cells.zarr"])
    paths = check_outputs({"-o": "out.zarr", "--obs-out": "obs.h5ad", "--unused": None}, overwrite=False)
    assert paths == {"-o": tmp_path / "out.zarr", "--obs-out": tmp_path / "obs.h5ad"}


@pytest.mark.parametrize("dense", [False, True])
def test_ingest_is_quiet(tmp_path, small_adata, dense, recwarn, capfd):
    if dense:
        small_adata.X = small_adata.X.toarray()
    small_adata.write_h5ad(tmp_path / "a.h5ad")
    recwarn.clear()
    ssa_dask.ingest(tmp_path / "a.h5ad", tmp_path / "a.zarr", chunk_rows=40)
    assert [str(w.message) for w in recwarn] == []
    assert capfd.readouterr() == ("", "")


def test_a_failure_to_move_the_result_into_place_keeps_it_and_says_where(tmp_path, monkeypatch):
    def refuse(*args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, "link", refuse)  # simulated: root cannot be refused by file permissions
    with pytest.raises(SSAInputError, match="cannot move the finished result into place .*Permission denied") as excinfo:
        write_atomically(tmp_path / "out.h5ad", lambda tmp: tmp.write_text("result"))
    kept = Path(str(excinfo.value).rsplit("kept at ", 1)[1])
    assert kept.read_text() == "result" and not (tmp_path / "out.h5ad").exists()


def test_opening_reads_no_matrix_data_and_the_graph_stays_small(tmp_path):
    """"Lazy" made testable: opening a 32 MB matrix allocates almost nothing, and its task graph
    carries a description of where the data are (path, rows), never the data."""
    import pickle
    import tracemalloc

    rng = np.random.default_rng(0)
    dense = rng.random((16_000, 500)).astype(np.float32)
    path = tmp_path / "big.h5ad"
    ad.AnnData(dense).write_h5ad(path)
    tracemalloc.start()
    matrix = ssa_dask.read_expression(str(path), chunk_rows=2000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < dense.nbytes / 8, peak  # measured 2.2 MB (metadata, obs, imports) for 32 MB of data
    graph_bytes = len(pickle.dumps(dict(matrix.X.__dask_graph__())))
    assert graph_bytes < 100_000, graph_bytes
    np.testing.assert_array_equal(matrix.X[4000:4010].compute(), dense[4000:4010])


def test_ingest_holds_a_few_chunks_not_the_matrix(tmp_path):
    """"Streams" made testable: ingesting a 64 MB matrix in 2 MB chunks peaks far below its size."""
    import tracemalloc

    rng = np.random.default_rng(1)
    dense = rng.random((32_000, 500)).astype(np.float32)
    source = tmp_path / "big.h5ad"
    ad.AnnData(dense).write_h5ad(source)
    del dense
    tracemalloc.start()
    ssa_dask.ingest(source, tmp_path / "big.zarr", chunk_rows=1000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64e6 / 4, peak
    back = ssa_dask.read_expression(str(tmp_path / "big.zarr"))
    assert back.X.chunks[0][0] == 1000 and back.shape == (32_000, 500)
