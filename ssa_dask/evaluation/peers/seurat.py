"""Seurat v3+ anchors (Stuart et al. 2019, Cell) through ``Rscript``, with the spot as the label.

As in the SSA paper's comparison, every spot is its own class: the spots are Seurat's reference,
the cells the query; ``FindTransferAnchors`` (reference PCA projected onto the query) and
``TransferData`` give every cell a prediction score per spot, and each cell goes to the spot of
largest score (Seurat's ``predicted.id``).

Data travel through a temporary directory: ``sc.mtx`` and ``spots.mtx`` (MatrixMarket, genes x
observations, the shared genes in the same order, values as given: already log-normalised) in,
``scores.bin`` (cells x spots float64) out. The R side is the package-data script
``seurat_transfer.R`` beside this module.

Install (Debian 12): ``apt-get install -y --no-install-recommends r-base-core r-cran-seurat``
(Seurat 4.3). Time and memory include starting R and loading Seurat (about 3 s).
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import scipy.sparse as sp

from ssa_dask.evaluation.peers.base import PeerProblem, assignment_from_plan

NAME = "seurat"
DENSE_INPUT = True

_INSTALL = "apt-get install -y --no-install-recommends r-base-core r-cran-seurat"


def _script() -> Path:
    return Path(str(resources.files("ssa_dask.evaluation.peers").joinpath("seurat_transfer.R")))


@functools.lru_cache(maxsize=1)
def _seurat_reason(rscript: str) -> str | None:
    probe = 'cat(nzchar(system.file(package = "Seurat")))'
    try:
        out = subprocess.run([rscript, "--vanilla", "-e", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"Rscript could not be run ({err})"
    if out.returncode != 0 or out.stdout.strip() != "TRUE":
        return f"the R package Seurat is not installed ({_INSTALL})"
    return None


def unavailable() -> str | None:
    """``None`` when ``Rscript`` is on the PATH and the R package Seurat is installed.

    The Seurat check runs one quick ``Rscript`` (``system.file``, no package loaded), cached.
    """
    rscript = shutil.which("Rscript")
    if rscript is None:
        return f"Rscript is not on the PATH ({_INSTALL})"
    if not _script().is_file():
        return f"the R script {_script().name} is missing from the installed package"
    return _seurat_reason(rscript)


def load() -> None:
    """Nothing to import in Python (R is started inside the timed mapping)."""


def map_cells(
    problem: PeerProblem,
    *,
    seed: int = 0,
    top_k: int = 1,
    npcs: int = 30,
    k_anchor: int = 5,
    k_filter: int = 200,
    k_score: int = 30,
    k_weight: int = 50,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Map cells with Seurat's FindTransferAnchors + TransferData, spot identity as the label.

    The defaults are Seurat's; the R script caps them to fit few spots: ``npcs <= m - 1``,
    ``k.anchor, k.score <= m - 1``, anchor filtering off (``k.filter = NA``) when
    ``k_filter >= m``, ``k.weight <= n_anchors - 1``. Deterministic (``seed`` unused: the PCA is
    exact, ``approx = FALSE``).

    Parameters
    ----------
    problem
        The prepared problem.
    seed
        Unused.
    top_k
        Best spots per cell to keep.
    npcs, k_anchor, k_filter, k_score, k_weight
        Seurat's ``npcs``/``dims``, ``k.anchor``, ``k.filter``, ``k.score``, ``k.weight``.
    timeout
        Seconds before the R process is killed (``None``: no limit).

    Returns
    -------
    dict
        ``spot`` (Seurat's ``predicted.id``), ``probability`` (its prediction score, the scores of a
        cell summing to 1), ``top_spots``, and ``info`` (the parameters actually used).
    """
    sc, spots = problem.dense()
    rscript = shutil.which("Rscript")
    with tempfile.TemporaryDirectory(prefix="ssa_seurat_") as tmp:
        scipy.io.mmwrite(str(Path(tmp, "sc.mtx")), sp.csc_matrix(sc.T))
        scipy.io.mmwrite(str(Path(tmp, "spots.mtx")), sp.csc_matrix(spots.T))
        opts = dict(npcs=npcs, k_anchor=k_anchor, k_filter=k_filter, k_score=k_score, k_weight=k_weight)
        cmd = [rscript, "--vanilla", str(_script()), tmp, *(f"{k}={int(v)}" for k, v in opts.items())]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"Seurat (Rscript) failed with exit code {out.returncode}:\n{out.stderr[-2000:]}")
        scores = np.fromfile(Path(tmp, "scores.bin"), dtype="<f8")
        info = dict(line.split("=", 1) for line in Path(tmp, "info.txt").read_text().split())
    scores = scores.reshape(problem.n_cells, problem.n_spots)
    result = assignment_from_plan(scores, top_k)
    result["info"] = info
    return result
