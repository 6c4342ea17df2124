"""float16 / bfloat16 kernel storage: exact decoding, the format's error bound on every kernel
operation in every storage, the same assignments as float32, refusal in the log domain, the auto choice.

Bounds are derived from the format.  An entry ``K~ = K / max_l K_il`` (relative to its row's
maximum) is stored with error ``E <= u K~ (+ 2^-40 for float16: its subnormal floor, rows being
stored with a maximum of 2^15)``, ``u = 2^-11`` (float16) or ``2^-8`` (bfloat16).  A row sum ``R_i = sum_j K~_ij b_j`` then errs by at most
``delta_i R_i`` with ``delta_i = sum_j E_ij b_j / R_i``, so the plan entry
``p_i K~_ij b_j / R_i`` errs by at most ``p_i b_j (E_ij + K~_ij delta_i) / (R_i (1 - delta_i))``,
the row potential ``f_i = eps log(p_i / ...)`` by ``-eps log(1 - delta_i)``, and ``K v`` (v >= 0)
by ``scale_i sum_j E_ij v_j``.  float32 arithmetic adds ``FLOAT32_RTOL`` (the float32 storage test's
tolerance).
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

import ssa_dask
from ssa_dask.align import _choose_kernel_dtype
from ssa_dask.cluster import Executor
from ssa_dask.errors import SSAInputError
from ssa_dask.kernel.build import build_kernel, kernel_from_array
from ssa_dask.kernel.precision import (
    FLOAT16_SUBNORMAL_FLOOR,
    UNIT_ROUNDOFF,
    ROW_MAX,
    HalfRows,
    choose_kernel_dtype,
    encode_bits,
    half_rows_from_kernel,
)
from ssa_dask.kernel.store import KERNEL_ARRAY, SCALE_ARRAY, KernelStore, KernelStoreError
from ssa_dask.evaluation.simulate import bin_to_spots, synthetic_tissue
from ssa_dask.kernel._sweeps import decode_half

FLOAT32_RTOL = 2e-5
DTYPES = ["float32", "float16", "bfloat16"]
STORAGES = ["array", "memory", "zarr"]


def entry_error(scaled: np.ndarray, dtype: str) -> np.ndarray:
    """Largest storage error of each row-scaled entry ``K~`` in ``dtype`` (0 for float32)."""
    if dtype == "float32":
        return np.zeros_like(scaled)
    floor = FLOAT16_SUBNORMAL_FLOOR if dtype == "float16" else 0.0
    return UNIT_ROUNDOFF[dtype] * scaled + floor


def test_decode_is_exact_for_every_16_bit_pattern():
    bits = np.arange(2**16, dtype=np.uint16).reshape(256, 256)
    float16 = bits.view(np.float16).astype(np.float32)  # NumPy's conversion, the reference
    np.testing.assert_array_equal(decode_half(bits, False).view(np.uint32), float16.view(np.uint32))
    bfloat16 = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    np.testing.assert_array_equal(decode_half(bits, True).view(np.uint32), bfloat16.view(np.uint32))
    # negative control: the two formats are not the same decoding
    assert not np.array_equal(decode_half(bits, False).view(np.uint32), bfloat16.view(np.uint32))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_row_scaled_encoding_rounds_within_the_format_bound(dtype):
    rng = np.random.default_rng(0)
    K = np.exp(-rng.uniform(0, 30, size=(64, 512))).astype(np.float32) * np.float32(1e-3)  # 1e-16 .. 1e-3
    rows = half_rows_from_kernel(K, dtype)
    decoded = rows.scaled_rows().astype(np.float64) * np.exp(rows.log_scale)[:, None]
    row_max = K.max(axis=1, keepdims=True).astype(np.float64)
    error = np.abs(decoded - K) / row_max
    bound = entry_error(K / row_max, dtype) + 2.0**-24 * K / row_max  # + float32 rounding of the scaling
    assert np.all(error <= bound)
    assert (error / (K / row_max)).max() > 0.5 * UNIT_ROUNDOFF[dtype]  # the bound is nearly reached
    # negative controls: truncating instead of rounding, or float16 without the row scale, break the bound
    word = (K / row_max).astype(np.float32).view(np.uint32)
    shift = np.uint32(16 if dtype == "bfloat16" else 13)
    truncated = ((word >> shift) << shift).view(np.float32).astype(np.float64)
    assert np.any(np.abs(truncated - K / row_max) > bound)
    if dtype == "float16":
        unscaled = decode_half(encode_bits(K / row_max, dtype), False).astype(np.float64)
        assert np.any(np.abs(unscaled - K / row_max) > bound)


def _kernel(storage: str, dtype: str, cost: np.ndarray, eps: float, block_rows: int, tmp_path):
    if storage == "array":
        return kernel_from_array(np.exp(-cost / eps), eps=eps, block_rows=block_rows, kernel_dtype=dtype)
    return build_kernel(da.from_array(cost.astype(np.float32), chunks=(block_rows, -1)), Executor(), eps=eps,
                        storage=storage, path=tmp_path, kernel_dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("storage", STORAGES)
def test_every_storage_and_dtype_is_within_the_format_bound(tmp_path, kernel_problem, storage, dtype):
    cost, p, q, eps = kernel_problem
    executor = Executor()
    kernel = _kernel(storage, dtype, cost, eps, 50, tmp_path)
    assert kernel.storage.dtype == dtype and kernel.storage.name == ("zarr" if storage == "zarr" else "memory")
    K = np.exp(-cost / eps)
    scale = K.max(axis=1)
    scaled = K / scale[:, None]
    error = entry_error(scaled, dtype)
    rng = np.random.default_rng(1)
    g = rng.normal(size=cost.shape[1]) * eps
    b = np.exp((g - g.max()) / eps)
    R = scaled @ b
    delta = (error @ b) / R
    plan = p[:, None] * scaled * b[None, :] / R[:, None]
    entry_bound = p[:, None] * b[None, :] * (error + scaled * delta[:, None]) / (R * (1 - delta))[:, None]

    column = kernel.column_marginal(p, g, executor)
    assert np.all(np.abs(column - plan.sum(0)) <= entry_bound.sum(0) + FLOAT32_RTOL * plan.sum(0))

    index, probability, f = kernel.top_k(p, g, 3, executor)
    rows = plan / plan.sum(1, keepdims=True)
    row_bound = entry_bound / plan.sum(1, keepdims=True)
    taken = np.take_along_axis(rows, index, axis=1)
    assert np.all(np.abs(probability - taken) <= np.take_along_axis(row_bound, index, axis=1) + FLOAT32_RTOL * taken)
    order = np.argsort(-rows, axis=1)
    first, second = order[:, 0], order[:, 1]
    ar = np.arange(len(rows))
    clear = rows[ar, first] - rows[ar, second] > row_bound[ar, first] + row_bound[ar, second] + FLOAT32_RTOL
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(index[clear, 0], first[clear])
    f_dense = eps * (np.log(p) - np.log(K @ np.exp(g / eps)))
    assert np.all(np.abs(f - f_dense) <= -eps * np.log1p(-delta) + FLOAT32_RTOL * eps)

    v_cells, v_spots = np.arange(cost.shape[0], dtype=float), np.arange(cost.shape[1], dtype=float)
    rows_product, columns_product = K @ v_spots, K.T @ v_cells
    assert np.all(np.abs(kernel.apply(v_spots, 1, executor) - rows_product)
                  <= scale * (error @ v_spots) + FLOAT32_RTOL * rows_product)
    assert np.all(np.abs(kernel.apply(v_cells, 0, executor) - columns_product)
                  <= (scale * v_cells) @ error + FLOAT32_RTOL * columns_product)
    if dtype != "float32":  # negative control: 16-bit storage is measurably coarser than float32's tolerance
        assert np.abs(column / plan.sum(0) - 1).max() > FLOAT32_RTOL
    kernel.close()


def test_sixteen_bit_kernel_store_layout_and_damage(tmp_path, kernel_problem):
    cost, p, q, eps = kernel_problem
    kernel = _kernel("zarr", "float16", cost, eps, 50, tmp_path)
    store = kernel.storage.store
    import zarr

    assert str(zarr.open_array(str(store.root / KERNEL_ARRAY), mode="r").dtype) == "uint16"
    assert zarr.open_array(str(store.root / SCALE_ARRAY), mode="r").shape == (cost.shape[0], 1)
    assert not (store.root / "cost.zarr").exists()  # no float32 copy of the cost
    loaded = kernel.blocks[0].load()
    assert isinstance(loaded, HalfRows) and loaded.bits.dtype == np.uint16
    np.testing.assert_allclose(loaded.log_scale, -cost[:50].min(axis=1) / eps - np.log(ROW_MAX["float16"]), rtol=1e-6)
    with pytest.raises(KernelStoreError, match="expected uncompressed little-endian float32"):
        KernelStore(store.root, store.shape, store.bounds, "float32").check_layout(KERNEL_ARRAY)
    kernel.blocks[1].log_scale.file.write_bytes(b"\0" * 8)  # a truncated scale chunk
    with pytest.raises(KernelStoreError, match="truncated"):
        kernel.column_marginal(p, np.zeros(cost.shape[1]), Executor())
    kernel.close()


def test_align_with_16_bit_kernels_assigns_like_float32(tmp_path):
    tissue = synthetic_tissue(n_cells=1500, n_genes=120, seed=2)
    spots, _ = bin_to_spots(tissue, n_spots=150)
    runs = {dtype: ssa_dask.align(tissue, spots, n_genes=120, log1p=True, kernel_dtype=dtype, kernel_storage=storage,
                                  kernel_path=str(tmp_path), tol=1e-7)
            for dtype, storage in (("float32", "memory"), ("float16", "memory"), ("bfloat16", "zarr"))}
    reference = runs["float32"]["spot"].values
    for dtype, result in runs.items():
        assert result.attrs["kernel_dtype"] == dtype and result.attrs["converged"]
        changed = np.mean(result["spot"].values != reference)
        assert changed <= 0.005, (dtype, changed)
    # negative control: a different regularisation does change assignments beyond that share
    other = ssa_dask.align(tissue, spots, n_genes=120, log1p=True, lam=0.2)
    assert np.mean(other["spot"].values != reference) > 0.005


def test_log_domain_refuses_16_bit_kernels_before_any_compute(kernel_problem):
    cost, p, q, eps = kernel_problem

    def never(block):
        raise AssertionError("the cost was computed")

    lazy = da.from_array(cost.astype(np.float32), chunks=(50, -1)).map_blocks(never, dtype=np.float32)
    for dtype in ("float16", "bfloat16"):
        with pytest.raises(SSAInputError, match=f"kernel_dtype='{dtype}'.*log domain"):
            build_kernel(lazy, Executor(), eps=eps, log_domain=True, kernel_dtype=dtype)
        with pytest.raises(SSAInputError, match="log domain"):
            build_kernel(lazy, Executor(), lam=0.01, kernel_dtype=dtype)  # auto domain at small lam
        with pytest.raises(SSAInputError, match="log domain"):
            kernel_from_array(cost, eps=eps, log_domain=True, kernel_dtype=dtype)
    # known only once max D is: an absolute eps that makes lam small
    with pytest.raises(SSAInputError, match="log domain"):
        build_kernel(da.from_array(cost.astype(np.float32), chunks=(50, -1)), Executor(), eps=0.001,
                     kernel_dtype="float16")
    # auto keeps float32 there, and float32 is accepted
    kernel = build_kernel(da.from_array(cost.astype(np.float32), chunks=(50, -1)), Executor(), eps=0.001,
                          kernel_dtype="auto")
    assert kernel.log_domain and kernel.storage.dtype == "float32"
    with pytest.raises(SSAInputError, match="kernel_dtype must be one of"):
        build_kernel(lazy, Executor(), eps=eps, kernel_dtype="float64")


def test_auto_picks_float16_only_when_float32_does_not_fit_but_float16_does(counts_problem):
    n = 1000
    assert choose_kernel_dtype("auto", n, 4 * n) == "float32"  # float32 fits
    assert choose_kernel_dtype("auto", n, 3 * n) == "float16"  # only half fits
    assert choose_kernel_dtype("auto", n, n) == "float32"  # neither: streamed from disk in float32
    assert choose_kernel_dtype("bfloat16", n, 4 * n) == "bfloat16"  # an explicit choice stands
    assert _choose_kernel_dtype("auto", "zarr", "auto", 0.05, None, n, 6 * n) == "float32"
    assert _choose_kernel_dtype("auto", "auto", True, 0.05, None, n, 6 * n) == "float32"  # log domain
    assert _choose_kernel_dtype("auto", "auto", "auto", 0.01, None, n, 6 * n) == "float32"  # small lam: log domain
    assert _choose_kernel_dtype("auto", "auto", "auto", 0.05, None, n, 6 * n) == "float16"
    sc, spots = counts_problem
    n_entries = sc.shape[0] * spots.shape[0]
    tight = ssa_dask.align(sc, spots, n_genes=40, memory_budget=int(6 * n_entries))  # 50 %: 3 bytes per entry
    assert tight.attrs["kernel_dtype"] == "float16" and tight.attrs["kernel_storage"] == "memory"
    roomy = ssa_dask.align(sc, spots, n_genes=40, memory_budget=int(20 * n_entries))
    assert roomy.attrs["kernel_dtype"] == "float32"


def test_cli_kernel_dtype_is_recorded_and_refused_in_the_log_domain(tmp_path, counts_problem):
    import anndata as ad
    import pandas as pd
    from typer.testing import CliRunner

    from ssa_dask.cli import app

    sc, spots = counts_problem
    genes = pd.DataFrame(index=[f"g{i}" for i in range(sc.shape[1])])
    paths = [str(tmp_path / "sc.h5ad"), str(tmp_path / "spots.h5ad")]
    for matrix, path in zip((sc, spots), paths):
        ad.AnnData(matrix.astype(np.float32), var=genes).write_h5ad(path)
    out = tmp_path / "out.zarr"
    refused = CliRunner().invoke(app, ["align", *paths, "-o", str(out), "--kernel-dtype", "float16", "--log-domain", "log"],
                                 env={"COLUMNS": "250"})
    assert refused.exit_code == 2 and "log domain" in refused.output and not out.exists()
    done = CliRunner().invoke(app, ["align", *paths, "-o", str(out), "--kernel-dtype", "bfloat16", "--n-genes", "40",
                                    "--scheduler", "threads"], env={"COLUMNS": "250"})
    assert done.exit_code == 0, done.output
    assert ssa_dask.read_result(str(out)).attrs["kernel_dtype"] == "bfloat16"


def test_16_bit_blocks_held_by_cluster_workers_give_the_local_results(kernel_problem, cluster_client):
    cost, p, q, eps = kernel_problem
    local, cluster = Executor(), Executor(cluster_client)
    g = np.random.default_rng(4).normal(size=cost.shape[1]) * eps
    for dtype in ("float16", "bfloat16"):
        here = build_kernel(da.from_array(cost.astype(np.float32), chunks=(50, -1)), local, eps=eps, kernel_dtype=dtype)
        there = build_kernel(da.from_array(cost.astype(np.float32), chunks=(50, -1)), cluster, eps=eps, kernel_dtype=dtype)
        given = kernel_from_array(np.exp(-cost / eps), eps=eps, block_rows=50, kernel_dtype=dtype, executor=cluster)
        assert there.storage.dtype == given.storage.dtype == dtype
        expected = here.column_marginal(p, g, local)
        np.testing.assert_allclose(there.column_marginal(p, g, cluster), expected, rtol=1e-12)
        np.testing.assert_allclose(given.column_marginal(p, g, cluster), expected, rtol=4 * UNIT_ROUNDOFF[dtype])
        np.testing.assert_array_equal(there.top_k(p, g, 2, cluster)[0], here.top_k(p, g, 2, local)[0])
        for kernel in (here, there, given):
            kernel.close()
