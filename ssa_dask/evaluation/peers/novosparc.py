"""novoSpaRc (Nitzan et al. 2019, Nature) with the spots as target locations and as the atlas.

``novosparc.cm.Tissue`` reconstructs with a fused Gromov-Wasserstein transport between cells
and locations: the structured term compares shortest-path distances on a k-nearest-neighbour
graph of the cells' expression with those on a k-NN graph of the spot positions, the linear
("atlas") term is the Euclidean distance between each cell's and each spot's expression of the
marker genes (here all shared genes, each matrix divided by its maximum); ``alpha_linear``
weighs the atlas term. Marginals are uniform. Each cell goes to the location of largest
transport ``tissue.gw[i, j]``.

Install: ``pip install novosparc``.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from ssa_dask.evaluation.peers.base import (
    PeerProblem,
    assignment_from_plan,
    check_dense_memory,
    not_installed,
)

NAME = "novosparc"
DENSE_INPUT = True


def unavailable() -> str | None:
    """``None`` when novosparc is installed (looked up, not imported)."""
    return not_installed({"novosparc": "novosparc"}, "pip install novosparc")


def load() -> None:
    """Import novosparc before the timed mapping."""
    import novosparc  # noqa: F401


def map_cells(
    problem: PeerProblem,
    *,
    seed: int = 0,
    top_k: int = 1,
    alpha_linear: float = 0.5,
    epsilon: float = 5e-3,
    num_neighbors_s: int = 5,
    num_neighbors_t: int = 5,
) -> dict[str, Any]:
    """Map cells with ``Tissue.setup_reconstruction`` + ``Tissue.reconstruct``.

    Parameters
    ----------
    problem
        The prepared problem (needs spot coordinates).
    seed
        Unused: ``random_ini=False`` makes novoSpaRc deterministic.
    top_k
        Best spots per cell to keep.
    alpha_linear
        Weight of the atlas (expression) term, 0.5 as in novoSpaRc's atlas tutorials.
    epsilon
        Entropic regularisation (novoSpaRc raises it tenfold on numerical errors, as it does itself).
    num_neighbors_s, num_neighbors_t
        k of the k-NN graphs over cells (expression) and over spots (positions); novoSpaRc's 5.

    Returns
    -------
    dict
        ``spot``, ``probability`` (row-normalised transport), ``top_spots``, ``info`` (epsilon used).
    """
    import novosparc

    sc, spots = problem.dense()
    xy = problem.require_xy("novosparc")
    n, m = problem.n_cells, problem.n_spots
    check_dense_memory("novosparc", 4 * n * n + 6 * n * m + 4 * m * m)
    dataset = ad.AnnData(X=sc.copy(), var=pd.DataFrame(index=pd.Index([str(g) for g in problem.genes])))
    tissue = novosparc.cm.Tissue(
        dataset=dataset, locations=xy, atlas_matrix=spots, markers_to_use=np.arange(sc.shape[1])
    )
    with contextlib.redirect_stdout(io.StringIO()):
        tissue.setup_reconstruction(
            num_neighbors_s=min(num_neighbors_s, problem.n_cells),
            num_neighbors_t=min(num_neighbors_t, problem.n_spots),
            verbose=False,
        )
        tissue.reconstruct(alpha_linear=alpha_linear, epsilon=epsilon, verbose=False, random_ini=False)
    result = assignment_from_plan(np.asarray(tissue.gw, dtype=np.float64), top_k)
    result["info"] = {"epsilon": float(tissue.epsilon)}
    return result
