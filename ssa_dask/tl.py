"""scanpy-style tools: align two AnnData objects and write the plan's summary into both.

``ssa_dask.tl.align(adata_sc, adata_sp)`` is :func:`ssa_dask.align` followed by
:func:`ssa_dask.open_plan` and :func:`ssa_dask.write_plan_summary`: one call that leaves the
assignments, their uncertainty, the spots' composition and imputed genes in the AnnData objects,
ready for :mod:`ssa_dask.pl` (or scanpy's plotting).  The functional API is unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from ssa_dask.align import align as _align
from ssa_dask.cluster import connect
from ssa_dask.errors import SSAInputError
from ssa_dask.explore import DEFAULT_BATCH_GENES
from ssa_dask.plan import open_plan
from ssa_dask.summary import DEFAULT_TOP_K, write_plan_summary

__all__ = ["align"]

log = logging.getLogger(__name__)


def align(
    adata_sc: Any,
    adata_sp: Any,
    *,
    key_added: str = "ssa",
    labels_key: str | None = None,
    impute_genes: Sequence[str] | bool | None = None,
    top_k: int = DEFAULT_TOP_K,
    spatial_key: str | None = "spatial",
    batch_genes: int = DEFAULT_BATCH_GENES,
    client: Any = None,
    **align_options: Any,
) -> xr.Dataset:
    """Align the cells of ``adata_sc`` to the spots of ``adata_sp`` and annotate both in place.

    Runs :func:`ssa_dask.align`, opens the result's plan (:func:`ssa_dask.open_plan`, no second
    Sinkhorn) and writes its summary (:func:`ssa_dask.write_plan_summary`) into both AnnData
    objects under ``key_added``, plus the run record in ``adata_sc.uns[key_added]``.  The keys
    written are logged (logger ``ssa_dask.tl``, level INFO) and listed in the module docstring of
    :mod:`ssa_dask.summary`.

    Parameters
    ----------
    adata_sc : anndata.AnnData
        Cells x genes (the scRNA atlas).
    adata_sp : anndata.AnnData
        Spots x genes, with coordinates (``obs["x"]``/``obs["y"]`` or ``obsm["spatial"]``) for the
        spatial keys.
    key_added : str
        Prefix of every key written.
    labels_key : str, optional
        ``adata_sc.obs`` column of cell categories: the spots get their composition.
    impute_genes : sequence of str or True, optional
        scRNA genes to impute at the spots (``True``: every gene of ``adata_sc``).
    top_k : int
        Spots per cell in ``obsm[f"{key_added}_top_k"]`` (and in the result's ``top_spot``).
    spatial_key : str or None
        ``adata_sc.obsm`` key that also receives the assigned spots' coordinates (``None``: only
        ``obsm[f"{key_added}_spatial"]``).
    batch_genes : int
        Genes imputed per pass over the plan.
    client
        Where everything runs, as for :func:`ssa_dask.align`; one backend serves the alignment
        and the passes over the plan.
    **align_options
        Passed to :func:`ssa_dask.align` (``n_genes``, ``lam``, ``log1p``, ``sc_layer``,
        ``spots_layer``, ``gene_key``, ``drop_empty``, ``progress``...).

    Returns
    -------
    xarray.Dataset
        The result of :func:`ssa_dask.align`.

    Raises
    ------
    SSAInputError
        ``labels_key`` not in ``adata_sc.obs``, genes to impute not in ``adata_sc``, or input that
        cannot be aligned; checked before the alignment where it can be.
    """
    if labels_key is not None and labels_key not in adata_sc.obs:
        raise SSAInputError(f"adata_sc: labels_key {labels_key!r} is not an obs column (columns: "
                            f"{list(adata_sc.obs.columns)[:10]})")
    genes = _genes_to_impute(adata_sc, impute_genes, align_options.get("gene_key"))
    read_options = {name: align_options[name] for name in ("sc_layer", "spots_layer", "gene_key", "log1p")
                    if name in align_options}
    progress = bool(align_options.get("progress", False))
    with connect(client, progress=progress) as executor:
        result = _align(adata_sc, adata_sp, top_k=top_k, client=executor.client,
                        **align_options)
        with open_plan(result, adata_sc, adata_sp, client=executor.client,
                       progress=progress, **read_options) as plan:
            labels = None if labels_key is None else adata_sc.obs[labels_key]
            write_plan_summary(plan, adata_sc=adata_sc, adata_sp=adata_sp, key_added=key_added,
                               spatial_key=spatial_key, labels=labels, genes=genes, top_k=top_k,
                               batch_genes=batch_genes)
    adata_sc.uns[key_added] = _run_record(result)
    log.info("cells: added uns[%r] (the run record)", key_added)
    return result


def _genes_to_impute(adata_sc: Any, impute_genes: Sequence[str] | bool | None,
                     gene_key: str | None) -> list[str] | None:
    if impute_genes is None or impute_genes is False:
        return None
    names = adata_sc.var[gene_key] if gene_key is not None else adata_sc.var_names
    available = [str(g) for g in names]
    if impute_genes is True:
        return available
    wanted = [impute_genes] if isinstance(impute_genes, str) else [str(g) for g in impute_genes]
    absent = sorted(set(wanted).difference(available))
    if absent:
        raise SSAInputError(f"adata_sc: genes to impute not in the cells: {absent[:5]} ({len(absent)} in all)")
    return wanted


def _run_record(result: xr.Dataset) -> dict[str, Any]:
    """The result's attrs as ``uns`` can store them (no ``None``; sequences as arrays)."""
    record: dict[str, Any] = {}
    for name, value in result.attrs.items():
        if value is None:
            continue
        record[name] = np.asarray(value) if isinstance(value, (list, tuple)) else value
    record["genes_used"] = np.asarray(result["gene"].values.astype(str), dtype=object)
    return record
