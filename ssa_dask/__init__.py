"""ssa_dask: SSA single-cell to spatial alignment, out of core on Dask.

The pipeline, one module a step::

    io.read_expression -> standardize.summarize -> genes.select_genes -> cost.PearsonCost
    -> kernel.build_kernel -> sinkhorn.sinkhorn -> assign.assignment_dataset

:func:`align` runs it end to end.
"""

from ssa_dask.align import align
from ssa_dask.assign import add_to_anndata, assignment_dataset, column_potential, open_result, read_result, write_result
from ssa_dask.cluster import Executor, connect
from ssa_dask.cost import PearsonCost, cost_blocks
from ssa_dask.errors import ConvergenceWarning, OutputExistsError, SSAClusterError, SSAError, SSAInputError
from ssa_dask.explore import composition, heldout_gene_check, impute, uncertainty
from ssa_dask.genes import GeneSelection, select_genes, top_variance_genes
from ssa_dask.io import ExpressionMatrix, ingest, read_expression
from ssa_dask.kernel import Kernel
from ssa_dask.kernel_build import build_kernel, kernel_from_array
from ssa_dask.kernel_storage import DiskBlocks, KernelStorage, MemoryBlocks
from ssa_dask.kernel_store import KernelStoreError
from ssa_dask.plan import TransportPlan, open_plan
from ssa_dask.reference import ssa_dense
from ssa_dask.progress import SinkhornProgress
from ssa_dask.sinkhorn import Checkpoint, SavedState, SinkhornNumericalError, SinkhornResult, sinkhorn
from ssa_dask.standardize import MatrixSummary, summarize

__version__ = "0.1.0"

__all__ = [
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
    "TransportPlan",
    "add_to_anndata",
    "align",
    "assignment_dataset",
    "build_kernel",
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
    "read_expression",
    "read_result",
    "select_genes",
    "sinkhorn",
    "ssa_dense",
    "summarize",
    "top_variance_genes",
    "uncertainty",
    "write_result",
]
