"""``ssa-dask align`` refuses bad options and bad output locations up front: exit 2, one line, nothing written."""

from __future__ import annotations

import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from ssa_dask.cli import app


@pytest.fixture
def inputs(tmp_path, counts_problem) -> tuple[Path, Path]:
    sc, spots = counts_problem
    genes = [f"g{i}" for i in range(sc.shape[1])]
    sc_path, spots_path = tmp_path / "sc.h5ad", tmp_path / "spots.h5ad"
    ad.AnnData(sc.astype(np.float32), var=pd.DataFrame(index=genes)).write_h5ad(sc_path)
    ad.AnnData(spots.astype(np.float32), var=pd.DataFrame(index=genes)).write_h5ad(spots_path)
    return sc_path, spots_path


def run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["align", *args], env={"COLUMNS": "250"})
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, pattern: str) -> None:
    import re

    assert code == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert re.search(pattern, errors[0]), errors[0]


BAD_OPTIONS = [
    (["--max-iter", "0"], r"--max-iter must be a positive integer, got 0"),
    (["--max-iter", "-5"], r"--max-iter must be a positive integer"),
    (["--tol", "0"], r"--tol must be a positive finite number, got 0"),
    (["--tol", "-1e-6"], r"--tol must be a positive"),
    (["--lam", "0"], r"--lam must be a positive"),
    (["--eps", "-1"], r"--eps must be a positive"),
    (["--block-rows", "0"], r"--block-rows must be a positive integer, got 0"),
    (["--top-k", "0"], r"--top-k must be a positive integer"),
    (["--top-k", "26"], r"--top-k 26 exceeds the number of spots \(25\)"),
    (["--memory-limit", "12"], r"--memory-limit '12' is 12 bytes per worker; give a unit"),
    (["--memory-limit", "lots"], r"--memory-limit 'lots' is not a size"),
    (["--n-workers", "0"], r"--n-workers must be a positive integer"),
    (["--scheduler", "bogus"], r"unknown scheduler 'bogus'"),
    (["--kernel-path", "s3://bucket/scratch"], r"--kernel-path: URLs are not supported"),
    (["--tls-cert", "cert.pem"], r"TLS needs all of --tls-ca-file, --tls-cert and --tls-key"),
    (["--scheduler", "tls://127.0.0.1:1"], r"needs TLS credentials"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_OPTIONS, ids=[" ".join(e) for e, _ in BAD_OPTIONS])
def test_bad_options_are_refused_before_any_work(inputs, tmp_path, extra, message):
    sc, spots = inputs
    out = tmp_path / "out.zarr"
    start = time.perf_counter()
    code, output = run([str(sc), str(spots), "-o", str(out), "--scheduler", "threads", *extra])
    assert_one_line_error(code, output, message)
    assert time.perf_counter() - start < 10
    assert not out.exists()
    assert "running on" not in output and "scRNA:" not in output  # nothing started, nothing read


def test_output_under_a_regular_file_is_refused_before_compute(inputs, tmp_path):
    sc, spots = inputs
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    code, output = run([str(sc), str(spots), "-o", str(blocker / "out.zarr"), "--scheduler", "threads"])
    assert_one_line_error(code, output, r"not_a_dir")
    assert "scRNA:" not in output


def test_unwritable_output_location_is_refused_before_compute(inputs):
    sc, spots = inputs
    code, output = run([str(sc), str(spots), "-o", "/proc/ssa-dask-test/out.zarr", "--scheduler", "threads"])
    assert_one_line_error(code, output, r"/proc/ssa-dask-test")
    assert "scRNA:" not in output


def test_obs_out_equal_to_out_is_refused(inputs, tmp_path):
    sc, spots = inputs
    out = tmp_path / "same"
    code, output = run([str(sc), str(spots), "-o", str(out), "--obs-out", str(out), "--scheduler", "threads"])
    assert_one_line_error(code, output, r"--obs-out: .* is -o")
    assert not out.exists()


def test_existing_output_is_refused_without_overwrite(inputs, tmp_path):
    sc, spots = inputs
    out = tmp_path / "out.zarr"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, output = run([str(sc), str(spots), "-o", str(out), "--scheduler", "threads"])
    assert_one_line_error(code, output, r"exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_input_is_reported_before_a_cluster_starts(inputs, tmp_path):
    _, spots = inputs
    start = time.perf_counter()
    code, output = run([str(tmp_path / "absent.h5ad"), str(spots), "-o", str(tmp_path / "o.zarr"), "--scheduler", "local"])
    assert_one_line_error(code, output, r"absent.h5ad")
    assert "running on" not in output and "dashboard" not in output
    assert time.perf_counter() - start < 10


def test_unreachable_scheduler_is_one_line_and_fast(inputs, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sc, spots = inputs
    start = time.perf_counter()
    code, output = run([str(sc), str(spots), "-o", str(tmp_path / "o.zarr"), "--scheduler", f"tcp://127.0.0.1:{port}",
                        "--connect-timeout", "3"])
    assert_one_line_error(code, output, rf"cannot connect to the Dask scheduler at tcp://127.0.0.1:{port}")
    assert time.perf_counter() - start < 20


def test_strict_exits_3_when_sinkhorn_does_not_converge(inputs, tmp_path):
    sc, spots = inputs
    out = tmp_path / "out.zarr"
    code, output = run([str(sc), str(spots), "-o", str(out), "--scheduler", "threads", "--n-genes", "30",
                        "--max-iter", "3", "--tol", "1e-12", "--strict"])
    assert code == 3, output
    assert "did not converge in 3 iterations (--strict)" in output
    assert out.exists()  # the result is still written, and said so
    code, output = run([str(sc), str(spots), "-o", str(tmp_path / "lenient.zarr"), "--scheduler", "threads",
                        "--n-genes", "30", "--max-iter", "3", "--tol", "1e-12"])
    assert code == 0, output


def test_drop_empty_leaves_empty_cells_unassigned(tmp_path, counts_problem):
    import xarray as xr

    sc, spots = counts_problem
    sc = sc.copy()
    sc[[3, 17]] = 0.0
    genes = [f"g{i}" for i in range(sc.shape[1])]
    sc_path, spots_path = tmp_path / "sc.h5ad", tmp_path / "spots.h5ad"
    ad.AnnData(sc.astype(np.float32), var=pd.DataFrame(index=genes)).write_h5ad(sc_path)
    ad.AnnData(spots.astype(np.float32), var=pd.DataFrame(index=genes)).write_h5ad(spots_path)
    out = tmp_path / "out.zarr"
    code, output = run([str(sc_path), str(spots_path), "-o", str(out), "--scheduler", "threads", "--n-genes", "30"])
    assert_one_line_error(code, output, r"2 row\(s\) with zero total expression.*--drop-empty")
    code, output = run([str(sc_path), str(spots_path), "-o", str(out), "--scheduler", "threads", "--n-genes", "30",
                        "--drop-empty"])
    assert code == 0, output
    assert "2 empty cell(s) left unassigned" in output
    result = xr.open_zarr(out)
    assert int(result["assigned"].sum()) == sc.shape[0] - 2
    assert list(np.flatnonzero(~result["assigned"].values)) == [3, 17]


def test_string_spot_coordinates_are_refused_with_a_message(tmp_path, counts_problem):
    sc, spots = counts_problem
    genes = [f"g{i}" for i in range(sc.shape[1])]
    sc_path, spots_path = tmp_path / "sc.h5ad", tmp_path / "spots.h5ad"
    ad.AnnData(sc.astype(np.float32), var=pd.DataFrame(index=genes)).write_h5ad(sc_path)
    obs = pd.DataFrame({"x": [f"row{i}" for i in range(spots.shape[0])], "y": "north"},
                       index=[f"s{i}" for i in range(spots.shape[0])])
    ad.AnnData(spots.astype(np.float32), var=pd.DataFrame(index=genes), obs=obs).write_h5ad(spots_path)
    code, output = run([str(sc_path), str(spots_path), "-o", str(tmp_path / "o.zarr"), "--scheduler", "threads"])
    assert_one_line_error(code, output, r"spots: the coordinates in obs columns x, y are not numbers")


def test_a_full_disk_at_the_last_write_keeps_the_result_and_names_it(inputs, tmp_path, monkeypatch):
    import errno
    import tempfile

    import xarray as xr

    sc, spots = inputs
    out = tmp_path / "results" / "out.zarr"
    rescue_dir = tmp_path / "tmp"
    rescue_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(rescue_dir))
    real_to_zarr = xr.Dataset.to_zarr

    def full_disk_for_out(self, store, *args, **kwargs):
        if str(store).startswith(str(out.parent)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_to_zarr(self, store, *args, **kwargs)

    monkeypatch.setattr(xr.Dataset, "to_zarr", full_disk_for_out)
    code, output = run([str(sc), str(spots), "-o", str(out), "--scheduler", "threads", "--n-genes", "30"])
    assert_one_line_error(code, output, r"cannot write .*out.zarr: No space left on device; the computed result "
                                        r"was saved to .*ssa-result-out-")
    assert not out.exists() and list(out.parent.iterdir()) == []  # nothing half-written
    (kept,) = rescue_dir.glob("ssa-result-out-*.zarr")
    assert xr.open_zarr(kept).sizes["cell"] == 300


DATA_PROBLEMS = {
    # found while the kernel store is being written: the store must not be left behind
    "constant_cell": r"cell\(s\) have a constant z-profile over the selected genes \(first: row 5\)",
    "two_genes": r"n_genes=2.*at least 3",
    "one_spot": r"1 spot",
    "case_only_mismatch": r"share no gene names.*match when case is ignored",
    "duplicated_genes": r"duplicated gene names",
}


@pytest.mark.parametrize("problem", list(DATA_PROBLEMS))
def test_data_problems_exit_2_with_one_line_and_leave_no_scratch(tmp_path, counts_problem, problem):
    sc, spots = (m.copy() for m in counts_problem)
    genes = [f"g{i}" for i in range(sc.shape[1])]
    spot_genes = list(genes)
    extra: list[str] = []
    if problem == "constant_cell":
        sc[5] = np.delete(sc, 5, axis=0).mean(0)  # every gene at its mean: the z-profile is all zeros
    elif problem == "two_genes":
        extra = ["--n-genes", "2"]
    elif problem == "one_spot":
        spots = spots[:1]
    elif problem == "case_only_mismatch":
        spot_genes = [g.upper() for g in genes]
    else:
        genes[1] = genes[0]
    sc_path, spots_path = tmp_path / "sc.h5ad", tmp_path / "spots.h5ad"
    ad.AnnData(sc.astype(np.float32), var=pd.DataFrame(index=genes)).write_h5ad(sc_path)
    ad.AnnData(spots.astype(np.float32), var=pd.DataFrame(index=spot_genes)).write_h5ad(spots_path)
    out, scratch = tmp_path / "out.zarr", tmp_path / "scratch"
    code, output = run([str(sc_path), str(spots_path), "-o", str(out), "--scheduler", "threads", "--kernel-storage",
                        "zarr", "--kernel-path", str(scratch), *extra])
    assert_one_line_error(code, output, DATA_PROBLEMS[problem])
    assert not out.exists()
    assert not scratch.exists() or list(scratch.iterdir()) == []
