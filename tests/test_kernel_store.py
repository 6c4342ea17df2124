"""The on-disk kernel store: idempotent construction, damage detection, stale-store sweeping, resume."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import zarr

import ssa_dask
from ssa_dask.cluster import Executor
from ssa_dask.cost import PearsonCost, cost_blocks
from ssa_dask.errors import SSAInputError
from ssa_dask.kernel.build import _exp_stored_block, _store_block, build_kernel
from ssa_dask.kernel.store import (
    COST_ARRAY,
    KERNEL_ARRAY,
    OWNER_FILE,
    KernelStore,
    KernelStoreError,
    sweep_stale_stores,
)


@pytest.fixture
def store(tmp_path) -> KernelStore:
    return KernelStore.create(tmp_path, (10, 3), np.array([0, 4, 8, 10]))


def _block_info(index: int) -> list[dict]:
    return [{"chunk-location": (index, 0)}]


def test_retried_construction_tasks_write_the_same_bytes(store):
    rng = np.random.default_rng(0)
    cost = rng.random((2, 3)).astype(np.float32)  # the short last block
    costs, kernels = store.blocks(COST_ARRAY), store.blocks(KERNEL_ARRAY)
    _store_block(cost, costs, block_info=_block_info(2))
    first = costs[2].file.read_bytes()
    _store_block(cost, costs, block_info=_block_info(2))  # a retried pass-one task
    assert costs[2].file.read_bytes() == first
    _exp_stored_block(costs[2], kernels[2], eps=0.1)
    kernel_bytes = kernels[2].file.read_bytes()
    assert not costs[2].file.exists()  # the cost chunk goes once its kernel chunk is in place
    _exp_stored_block(costs[2], kernels[2], eps=0.1)  # a retried pass-two task: no exp(-K/eps)
    assert kernels[2].file.read_bytes() == kernel_bytes
    np.testing.assert_allclose(kernels[2].load(), np.exp(-cost / 0.1), rtol=1e-6)


def test_retry_after_an_interrupted_second_pass(store):
    """Killed after the kernel chunk was renamed into place but before the cost chunk was removed."""
    cost = np.full((4, 3), 0.5, np.float32)
    costs, kernels = store.blocks(COST_ARRAY), store.blocks(KERNEL_ARRAY)
    _store_block(cost, costs, block_info=_block_info(0))
    kernels[0].write(np.exp(-cost / 0.2))
    _exp_stored_block(costs[0], kernels[0], eps=0.2)
    np.testing.assert_allclose(kernels[0].load(), np.exp(-2.5), rtol=1e-6)
    assert not costs[0].file.exists()


def test_missing_and_truncated_chunks_raise_naming_the_store(store):
    block = store.blocks(KERNEL_ARRAY)[1]
    with pytest.raises(KernelStoreError, match=f"kernel store {store.root}.*chunk kernel.zarr/c/1/0.*missing"):
        block.load()
    block.write(np.ones((4, 3), np.float32))
    with open(block.file, "r+b") as handle:
        handle.truncate(20)
    with pytest.raises(KernelStoreError, match="has 20 bytes, expected 48"):
        block.load()


def test_compressed_or_sharded_arrays_are_refused_before_mapping(store):
    shutil.rmtree(store.root / KERNEL_ARRAY)
    zarr.create_array(str(store.root / KERNEL_ARRAY), shape=(10, 3), chunks=(4, 3), dtype="float32")  # zstd by default
    with pytest.raises(KernelStoreError, match="expected uncompressed little-endian float32"):
        store.check_layout(KERNEL_ARRAY)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _owner(root: Path, **changes) -> None:
    owner = json.loads((root / OWNER_FILE).read_text())
    owner.update(changes)
    (root / OWNER_FILE).write_text(json.dumps(owner))


def test_stale_stores_of_dead_runs_are_swept(tmp_path):
    bounds = np.array([0, 2])
    checkpoint = tmp_path / "run.ckpt.npz"
    checkpoint.write_bytes(b"")
    dead, alive, other_host = (KernelStore.create(tmp_path, (2, 2), bounds) for _ in range(3))
    kept = KernelStore.create(tmp_path, (2, 2), bounds, checkpoint=str(checkpoint))
    _owner(dead.root, pid=_dead_pid())
    _owner(other_host.root, host=socket.gethostname() + "-elsewhere", pid=_dead_pid())
    _owner(kept.root, pid=_dead_pid())
    removed = sweep_stale_stores(tmp_path)
    assert removed == [dead.root]
    assert alive.root.exists() and other_host.root.exists() and kept.root.exists()
    checkpoint.unlink()  # its run finished or the user removed it: the store is stale now
    assert sweep_stale_stores(tmp_path) == [kept.root]


def test_kernel_path_url_is_refused_without_creating_a_folder(tmp_path, counts_problem, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sc, spots = counts_problem
    with pytest.raises(SSAInputError, match="URLs are not supported"):
        ssa_dask.align(sc, spots, n_genes=30, kernel_storage="zarr", kernel_path="s3://bucket/scratch")
    assert list(tmp_path.iterdir()) == []


def test_kernel_store_that_does_not_fit_is_refused_before_writing(tmp_path, counts_problem, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    sc, spots = counts_problem
    with pytest.raises(SSAInputError, match="kernel store needs about .* GB in .* but only 0.0 GB are free"):
        ssa_dask.align(sc, spots, n_genes=30, kernel_storage="zarr", kernel_path=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_threads_and_retried_cluster_build_give_identical_kernel_bytes(tmp_path, counts_problem):
    sc, spots = counts_problem
    cost = PearsonCost.from_statistics(sc.mean(0), sc.std(0), spots, spots.mean(0), spots.std(0))
    X = ssa_dask.read_expression(sc, chunk_rows=64).X
    one = build_kernel(cost_blocks(X, cost), Executor(), lam=0.05, storage="zarr", path=tmp_path / "a")
    two = build_kernel(cost_blocks(X, cost), Executor(), lam=0.05, storage="zarr", path=tmp_path / "b")
    # a retried second pass over every block changes nothing
    costs = two.storage.store.blocks(COST_ARRAY)
    for cost_block, kernel_block in zip(costs, two.blocks):
        _exp_stored_block(cost_block, kernel_block, eps=two.eps)
    for a, b in zip(one.blocks, two.blocks):
        assert a.file.read_bytes() == b.file.read_bytes()
    one.close()
    two.close()
    assert not one.storage.store.root.exists() and not two.storage.store.root.exists()


def test_checkpointed_run_keeps_and_reuses_its_kernel_store(tmp_path, counts_problem):
    sc, spots = counts_problem
    scratch, checkpoint = tmp_path / "scratch", tmp_path / "run.npz"
    options = dict(n_genes=30, kernel_storage="zarr", kernel_path=str(scratch), block_rows=77, tol=1e-7)
    with pytest.warns(ssa_dask.ConvergenceWarning):
        cut = ssa_dask.align(sc, spots, max_iter=10, checkpoint=str(checkpoint), **options)
    assert cut.attrs["converged"] == 0 and checkpoint.exists()
    kept = list(scratch.glob("ssa-kernel-checkpoint-*"))
    assert len(kept) == 1 and (kept[0] / "manifest.json").exists()
    resumed = ssa_dask.align(sc, spots, max_iter=5000, checkpoint=str(checkpoint), **options)
    assert resumed.attrs["kernel_reused"] == 1 and resumed.attrs["converged"] == 1
    straight = ssa_dask.align(sc, spots, max_iter=5000, **options)
    np.testing.assert_array_equal(resumed["spot"].values, straight["spot"].values)
    np.testing.assert_allclose(resumed["probability"].values, straight["probability"].values, rtol=1e-5)
    assert not checkpoint.exists() and list(scratch.iterdir()) == []  # finished: nothing left behind
    # a run of a different problem does not reuse the kept store, and its checkpoint is refused
    with pytest.warns(ssa_dask.ConvergenceWarning):
        ssa_dask.align(sc, spots, max_iter=10, checkpoint=str(checkpoint), **options)
    (store,) = scratch.glob("ssa-kernel-checkpoint-*")
    before = json.loads((store / "manifest.json").read_text())["fingerprint"]
    with pytest.raises(SSAInputError, match="checkpoint .* holds a potential of shape .25,. and eps=.*remove it"):
        ssa_dask.align(sc * np.linspace(1, 3, sc.shape[1]), spots, max_iter=5000, checkpoint=str(checkpoint), **options)
    assert json.loads((store / "manifest.json").read_text())["fingerprint"] != before
