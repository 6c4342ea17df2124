"""SSA itself, run through the peer interface so that it is timed and measured like the others."""

from __future__ import annotations

from typing import Any

import numpy as np

from ssa_dask.evaluation.peers.base import PeerProblem

NAME = "ssa"
DENSE_INPUT = False


def unavailable() -> str | None:
    """``None`` when :func:`ssa_dask.align` can be imported."""
    try:
        from ssa_dask import align  # noqa: F401
    except ImportError as err:
        return f"ssa_dask.align cannot be imported ({err})"
    return None


def load() -> None:
    """Import :func:`ssa_dask.align` before the timed mapping."""
    from ssa_dask import align  # noqa: F401


def map_cells(problem: PeerProblem, *, seed: int = 0, top_k: int = 1, **options: Any) -> dict[str, Any]:
    """Run :func:`ssa_dask.align` on the caller's AnnData objects.

    SSA applies the same gene rule as :func:`~ssa_dask.evaluation.peers.base.shared_genes` itself, so it
    receives the AnnData objects and ``n_genes`` unchanged. SSA is deterministic (``seed`` unused).

    Parameters
    ----------
    problem
        The prepared problem (its ``sc_adata``, ``spots_adata`` and ``n_top_genes`` are used).
    seed
        Unused.
    top_k
        Passed to ``align`` as ``top_k``.
    **options
        Any keyword of :func:`ssa_dask.align` (``lam``, ``eps``, ``marginals``, ``client``, ...).

    Returns
    -------
    dict
        ``spot``, ``probability`` (the row-normalised plan entry of the chosen spot) and
        ``top_spots`` from the returned Dataset.
    """
    from ssa_dask import align

    options.setdefault("n_genes", problem.n_top_genes)
    ds = align(problem.sc_adata, problem.spots_adata, top_k=int(top_k), **options)
    return {
        "spot": np.asarray(ds["spot"].values, dtype=np.int64),
        "probability": np.asarray(ds["probability"].values, dtype=np.float64),
        "top_spots": np.asarray(ds["top_spot"].values, dtype=np.int64),
    }
