"""The kernel ``K = exp(-D / eps)``, ``eps = lam * max D``: its build, its storage, its per-block maths.

The solver sees a :class:`Kernel` and a storage of row blocks behind it, as ott-jax's solvers see a
``Geometry`` and never where it keeps its cost: the storage interface (:class:`KernelStorage`)
says which tasks take which blocks and how to let go of them, and every block resolves to its rows
in whichever process runs the task.

- ``core``: :class:`Kernel`, the operations the solver needs (the plan's column marginal, top-k
  entries of each row, kernel-vector products), one pass over the blocks each;
- ``storage``: :class:`KernelStorage` and its two dense storages, :class:`MemoryBlocks` (this
  process or the workers' memory) and :class:`DiskBlocks` (a kernel store on disk);
- ``store``: the kernel store on disk, safe under task retry, preemption and tampering
  (:class:`KernelStore`, :class:`KernelStoreError`);
- ``build``: cost blocks -> ``eps`` -> kernel blocks (:func:`build_kernel`, :func:`kernel_from_array`);
- ``precision``: float16/bfloat16 rows with a per-row scale (:class:`HalfRows`);
- ``multiscale``: a sparse kernel for slides too large for a dense one, each cell's nearest spots
  plus a far field (:func:`build_multiscale_kernel`, :class:`SparseKernel`, :class:`SparseBlocks`);
- ``_block_math`` and ``_sparse_block_math``: what one task does to one dense or sparse row block;
- ``_sweeps`` and ``_sparse_sweeps``: the compiled (Numba) per-block Sinkhorn sweeps.
"""

from ssa_dask.kernel.core import Kernel
from ssa_dask.kernel.storage import DiskBlocks, KernelStorage, MemoryBlocks
from ssa_dask.kernel.store import KernelStore, KernelStoreError
from ssa_dask.kernel.precision import HalfRows
from ssa_dask.kernel.build import build_kernel, kernel_from_array
from ssa_dask.kernel.multiscale import (ApproximationWarning, SparseBlocks, SparseKernel, build_multiscale_kernel,
                                        check_support)

__all__ = [
    "ApproximationWarning",
    "DiskBlocks",
    "HalfRows",
    "Kernel",
    "KernelStorage",
    "KernelStore",
    "KernelStoreError",
    "MemoryBlocks",
    "SparseBlocks",
    "SparseKernel",
    "build_kernel",
    "build_multiscale_kernel",
    "check_support",
    "kernel_from_array",
]
