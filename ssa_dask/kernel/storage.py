"""Where the kernel's row blocks live: the storage interface behind :class:`~ssa_dask.kernel.Kernel`.

A storage holds one handle per row block and knows two things the solver must not: which tasks
should take which blocks (:meth:`KernelStorage.task_groups`), and how to let go of them
(:meth:`KernelStorage.close`).  Every block handle resolves to its rows with
:func:`ssa_dask.kernel._block_math.load_block`, in whichever process runs the task.

- :class:`MemoryBlocks`: NumPy arrays in this process, or ``distributed`` futures whose data sit
  in the workers' memory (computed from the task graph, so a lost worker's blocks are recomputed).
- :class:`DiskBlocks`: chunks of a kernel store on a file system
  (:class:`~ssa_dask.kernel.store.KernelStore`), memory-mapped by the task that reads them.

Either storage holds float32 blocks, or float16/bfloat16 blocks with per-row scales
(:class:`~ssa_dask.kernel.precision.HalfRows`, ``dtype``).  An approximate (low-rank, multiscale,
truncated) storage is one more class with these members.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from ssa_dask.cluster import Executor
from ssa_dask.kernel.store import KernelStore, StoredBlock, StoredHalfBlock

#: Names of the storages ``build_kernel`` can make.
Storage = Literal["memory", "zarr"]


@runtime_checkable
class KernelStorage(Protocol):
    """What :class:`~ssa_dask.kernel.Kernel` needs from a storage of row blocks.

    Attributes
    ----------
    name : str
        ``"memory"`` or ``"zarr"`` (recorded in results).
    blocks : list
        One handle per row block, in row order.
    bounds : (n_blocks + 1,) int array
        Row offsets of the blocks.
    n_spots : int
        Columns of every block.
    reused : bool
        Whether the blocks were found complete on disk instead of built (a resumed run).
    dtype : str
        Format of the kernel entries: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (recorded in results).
    """

    name: str
    blocks: list[Any]
    bounds: np.ndarray
    n_spots: int
    reused: bool
    dtype: str

    def task_groups(self, executor: Executor) -> list[list[int]]:
        """Block indices per task, so that an iteration is a handful of tasks."""
        ...

    def close(self, keep: bool = False) -> None:
        """Release the blocks (``keep``: leave what is on disk for a resumed run)."""
        ...


def split_runs(indices: list[int], parts: int) -> list[list[int]]:
    """``indices`` in at most ``parts`` contiguous, nearly equal, non-empty runs."""
    runs = np.array_split(np.asarray(indices, dtype=int), max(1, min(parts, len(indices))))
    return [run.tolist() for run in runs if len(run)]


@dataclass
class MemoryBlocks:
    """Row blocks in memory: NumPy arrays here, or futures held by the workers of a cluster.

    On a cluster each task takes the blocks held by the worker it runs on (grouped once, by
    ``who_has``), so no block moves between workers during the iterations.
    """

    blocks: list[Any]
    bounds: np.ndarray
    n_spots: int
    name: str = "memory"
    reused: bool = False
    dtype: str = "float32"
    _groups: list[list[int]] | None = field(default=None, repr=False)

    def task_groups(self, executor: Executor) -> list[list[int]]:
        """Contiguous runs of blocks, one per thread; on a cluster, per holding worker and thread.

        Fixed at the first call, so the partial sums are added in the same order every iteration.
        """
        if self._groups is None:
            indices = list(range(len(self.blocks)))
            if executor.distributed:
                who_has = executor.client.who_has(self.blocks)
                threads = executor.client.nthreads()
                by_worker: dict[str, list[int]] = {}
                for index, block in zip(indices, self.blocks):
                    holders = who_has.get(block.key) or ["?"]
                    by_worker.setdefault(holders[0], []).append(index)
                self._groups = [part for worker, held in by_worker.items()
                                for part in split_runs(held, threads.get(worker, 1))]
            else:
                self._groups = split_runs(indices, executor.n_threads())
        return self._groups

    def close(self, keep: bool = False) -> None:
        """Drop the references to the blocks (futures are released on the workers)."""
        self.blocks = []
        self._groups = None


@dataclass
class DiskBlocks:
    """Row blocks in a kernel store on disk, memory-mapped by whichever task reads them."""

    blocks: list[StoredBlock] | list[StoredHalfBlock]
    bounds: np.ndarray
    n_spots: int
    store: KernelStore
    reused: bool = False
    name: str = "zarr"
    dtype: str = "float32"
    _groups: list[list[int]] | None = field(default=None, repr=False)

    def task_groups(self, executor: Executor) -> list[list[int]]:
        """Contiguous runs of blocks, one per worker thread (any worker reads any chunk).

        Fixed at the first call: the partial sums are then added in the same order every
        iteration, so a run that loses a worker gives bit-identical results.
        """
        if self._groups is None:
            self._groups = split_runs(list(range(len(self.blocks))), executor.n_threads())
        return self._groups

    def close(self, keep: bool = False) -> None:
        """Drop the handles and remove the store, unless ``keep`` (a checkpointed run that did not finish)."""
        self.blocks = []
        self._groups = None
        if not keep:
            self.store.remove()
