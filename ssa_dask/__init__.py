"""ssa_dask: SSA single-cell to spatial alignment, out of core on Dask.

The method's flow, one module a step::

    io -> genes -> standardize -> cost -> kernel -> sinkhorn -> assign -> align

- ``io``: :func:`read_expression` reads both matrices lazily (AnnData, h5ad, Zarr, arrays);
- ``genes``: :func:`select_genes` keeps the top-variance cell genes shared with the spots (the
  variances come from ``standardize.summarize``, one pass over each matrix);
- ``standardize``: per-gene mean and standard deviation, row totals (the Sinkhorn masses), z-scoring;
- ``cost``: :class:`PearsonCost`, ``D = 1 - |rho|`` block by block;
- ``kernel`` (a package): ``K = exp(-D / eps)``, ``eps = lam * max D`` (``kernel.build``), its row
  blocks in memory or on disk (``kernel.storage``, ``kernel.store``), the per-block maths and Numba
  sweeps (``kernel._block_math``, ``kernel._sweeps``), 16-bit rows (``kernel.precision``) and the
  sparse kernel of whole slides (``kernel.multiscale``);
- ``sinkhorn``: :func:`sinkhorn` with checkpoints (``progress`` draws its bar);
- ``assign``: each cell to its largest plan entry, as an xarray Dataset;
- ``align``: :func:`align` runs it end to end.

After an alignment: ``plan`` (the whole plan, lazily), ``explore``, ``summary``, ``tl`` and ``pl``
(scanpy-style). Beside the flow: ``cluster`` (Dask clusters: local, SLURM, Kubernetes), ``cli``
(``ssa-dask``), ``errors``, ``paths`` and ``validate`` (checks before work starts), ``reference``
(a dense NumPy version of the whole method), and ``evaluation`` (simulated data, peer methods,
metrics and the paper's benchmark; the method never imports it).
"""

from ssa_dask.align import align
from ssa_dask.assign import add_to_anndata, assignment_dataset, column_potential, open_result, read_result, write_result
from ssa_dask.cluster import Executor, connect
from ssa_dask.cost import PearsonCost, cost_blocks
from ssa_dask.errors import ConvergenceWarning, OutputExistsError, SSAClusterError, SSAError, SSAInputError
from ssa_dask.explore import composition, heldout_gene_check, impute, uncertainty
from ssa_dask.genes import GeneSelection, select_genes, top_variance_genes
from ssa_dask.io import ExpressionMatrix, ingest, read_expression
from ssa_dask.kernel import (ApproximationWarning, DiskBlocks, Kernel, KernelStorage, KernelStoreError, MemoryBlocks,
                             SparseBlocks, SparseKernel, build_kernel, build_multiscale_kernel, check_support,
                             kernel_from_array)
from ssa_dask.plan import TransportPlan, open_plan
from ssa_dask.reference import refine_dense, ssa_dense
from ssa_dask.progress import SinkhornProgress
from ssa_dask.sinkhorn import Checkpoint, SavedState, SinkhornNumericalError, SinkhornResult, sinkhorn
from ssa_dask.standardize import MatrixSummary, summarize
from ssa_dask.summary import plan_summary, read_plan_summary, top_k_matrix, write_plan_summary
from ssa_dask import tl  # noqa: E402  (scanpy-style namespace: ssa_dask.tl.align)

__version__ = "0.1.0"



def __getattr__(name: str):
    """``ssa_dask.pl``: plotting, imported on first use (matplotlib takes about a second)."""
    if name == "pl":
        import importlib

        return importlib.import_module("ssa_dask.pl")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ApproximationWarning",
    "Checkpoint",
    "ConvergenceWarning",
    "Executor",
    "ExpressionMatrix",
    "GeneSelection",
    "DiskBlocks",
    "Kernel",
    "KernelStorage",
    "KernelStoreError",
    "MatrixSummary",
    "MemoryBlocks",
    "OutputExistsError",
    "PearsonCost",
    "SSAClusterError",
    "SSAError",
    "SSAInputError",
    "SavedState",
    "SinkhornNumericalError",
    "SinkhornProgress",
    "SinkhornResult",
    "SparseBlocks",
    "SparseKernel",
    "TransportPlan",
    "add_to_anndata",
    "align",
    "assignment_dataset",
    "build_kernel",
    "build_multiscale_kernel",
    "check_support",
    "column_potential",
    "composition",
    "connect",
    "cost_blocks",
    "heldout_gene_check",
    "impute",
    "ingest",
    "kernel_from_array",
    "open_plan",
    "open_result",
    "pl",
    "plan_summary",
    "read_plan_summary",
    "read_expression",
    "read_result",
    "refine_dense",
    "select_genes",
    "sinkhorn",
    "ssa_dense",
    "summarize",
    "tl",
    "top_k_matrix",
    "top_variance_genes",
    "uncertainty",
    "write_plan_summary",
    "write_result",
]
