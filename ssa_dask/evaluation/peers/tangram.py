"""Tangram (Biancalani et al. 2021, Nat Methods) through the real ``tangram-sc`` package, on CPU.

``tangram.map_cells_to_space(mode="cells")`` learns a cell x spot matrix ``M`` (softmax over spots
per cell) by gradient descent on Tangram's loss (gene-wise cosine similarity of the predicted and
measured spot expression, plus the spot-density KL term with the default ``rna_count_based``
prior). Each cell goes to the spot of largest ``M``.

Install: ``pip install torch==2.13.0`` (a CPU build; make sure pip does not fetch a CUDA build)
then ``pip install tangram-sc``.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ssa_dask.evaluation.peers.base import PeerProblem, assignment_from_plan, not_installed

NAME = "tangram"
DENSE_INPUT = True

_INSTALL = "pip install torch==2.13.0 tangram-sc (CPU torch is enough)"


def unavailable() -> str | None:
    """``None`` when torch and tangram-sc are installed (looked up, not imported)."""
    return not_installed({"torch": "torch", "tangram-sc": "tangram"}, _INSTALL)


def load() -> None:
    """Import torch and tangram before the timed mapping."""
    import tangram  # noqa: F401
    import torch  # noqa: F401


def map_cells(
    problem: PeerProblem,
    *,
    seed: int = 0,
    top_k: int = 1,
    num_epochs: int = 500,
    learning_rate: float = 0.1,
    density_prior: str = "rna_count_based",
    device: str = "cpu",
    torch_threads: int | None = None,
) -> dict[str, Any]:
    """Map cells with ``tangram.map_cells_to_space(mode="cells")``.

    The shared-gene matrices are handed to ``tangram.pp_adatas`` (which drops all-zero genes and
    sets the density priors) as fresh AnnData objects. The NumPy and torch global generators are
    seeded with ``seed`` for the run and restored afterwards (Tangram's own ``random_state`` ignores
    a seed of 0).

    Parameters
    ----------
    problem
        The prepared problem.
    seed
        Seed of the initial mapping matrix and of torch.
    top_k
        Best spots per cell to keep.
    num_epochs
        Gradient steps (Tangram's default is 1000; 500 is usually converged on small problems).
    learning_rate
        Adam learning rate (Tangram default 0.1).
    density_prior
        ``"rna_count_based"`` (Tangram default) or ``"uniform"``.
    device
        torch device, ``"cpu"`` by default.
    torch_threads
        If given, ``torch.set_num_threads`` for the run (restored afterwards); on a busy machine
        one thread can be several times faster than torch's default of one per core.

    Returns
    -------
    dict
        ``spot``, ``probability`` (Tangram's per-cell softmax), ``top_spots``.
    """
    import tangram as tg
    import torch

    sc, spots = problem.dense()
    var = pd.DataFrame(index=pd.Index([str(g) for g in problem.genes]))
    adata_sc = ad.AnnData(X=sp.csr_matrix(sc, dtype=np.float32), var=var.copy())
    adata_sp = ad.AnnData(X=spots.astype(np.float32), var=var.copy())
    state = np.random.get_state()
    quiet = logging.getLogger()
    level = quiet.level
    threads = torch.get_num_threads()
    try:
        if torch_threads is not None:
            torch.set_num_threads(int(torch_threads))
        np.random.seed(seed)
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):
            torch.manual_seed(seed)
            quiet.setLevel(max(level, logging.WARNING))
            tg.pp_adatas(adata_sc, adata_sp, genes=None)
            ad_map = tg.map_cells_to_space(
                adata_sc,
                adata_sp,
                mode="cells",
                device=device,
                num_epochs=int(num_epochs),
                learning_rate=learning_rate,
                density_prior=density_prior,
                random_state=seed,
                verbose=False,
            )
    finally:
        np.random.set_state(state)
        quiet.setLevel(level)
        torch.set_num_threads(threads)
    plan = np.asarray(ad_map.X, dtype=np.float64)
    return assignment_from_plan(plan, top_k)
