"""DistMap (Karaiskos et al. 2017, Science): binarised expression, Matthews correlation, best spot.

DistMap was built for a binary in-situ atlas (on/off per gene and bin). Here the reference is the
spot matrix, so it is binarised first; the cells are then binarised exactly as DistMap's
``binarizeSingleCellData`` does, and every cell goes to the spot with the largest Matthews
correlation coefficient (MCC), as in DistMap's ``mapCells``.

Threshold rules (``X`` = the expression given to the peer, i.e. after the protocol's log1p):

* spots: gene ``g`` is *on* in spot ``j`` iff ``S[j, g] > mean_j' S[j', g]`` (above the gene's
  mean over the spots; a gene constant over the spots is off everywhere);
* cells (DistMap's rule): for a quantile ``q``, the threshold of gene ``g`` is the ``q``-quantile
  of the gene's *positive* values over the cells, and ``g`` is on in cell ``c`` iff
  ``X[c, g] > t_g(q)`` (a gene never positive is off everywhere). ``q`` is chosen in
  ``quantiles`` (default 0.15, 0.16, ..., 0.50, as DistMap's published scripts) to minimise the
  root-mean-square difference between the lower triangles of the gene-gene Pearson correlation
  matrices of the binarised spots and the binarised cells (undefined correlations count as 0).

Cost: choosing ``q`` costs ``O(Q n G^2)`` for ``Q`` quantiles and ``G`` genes (DistMap had 84
genes); the MCC is ``O(n m G)`` as one matrix product per block of cells.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ssa_dask.evaluation.peers.base import PeerProblem, assignment_from_plan

NAME = "distmap"
DENSE_INPUT = True

DEFAULT_QUANTILES = tuple(np.round(np.arange(0.15, 0.5 + 1e-9, 0.01), 2))


def unavailable() -> str | None:
    """Always available (NumPy only)."""
    return None


def binarize_spots(spots: np.ndarray) -> np.ndarray:
    """``(m, G)`` bool: ``S[j, g] > mean_j S[j, g]``."""
    return spots > spots.mean(axis=0, keepdims=True)


def _gene_correlation(b: np.ndarray) -> np.ndarray:
    """Gene-gene Pearson correlation of a binary ``(n, G)`` matrix, 0 where undefined."""
    x = b.astype(np.float64)
    x -= x.mean(axis=0, keepdims=True)
    norm = np.linalg.norm(x, axis=0)
    x = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    return x.T @ x


def binarize_cells(sc: np.ndarray, spots_binary: np.ndarray, quantiles=DEFAULT_QUANTILES) -> tuple[np.ndarray, float]:
    """DistMap's ``binarizeSingleCellData``: per-gene quantile thresholds, ``q`` matched to the atlas.

    Parameters
    ----------
    sc
        ``(n, G)`` cell expression.
    spots_binary
        ``(m, G)`` binarised reference.
    quantiles
        Candidate quantiles ``q``.

    Returns
    -------
    binary : numpy.ndarray
        ``(n, G)`` bool.
    q : float
        The chosen quantile.
    """
    quantiles = np.asarray(quantiles, dtype=np.float64)
    if quantiles.size == 0 or np.any((quantiles < 0) | (quantiles > 1)):
        raise ValueError("quantiles must be a non-empty sequence of numbers in [0, 1]")
    lower = np.tril_indices(sc.shape[1], k=-1)
    reference = _gene_correlation(spots_binary)[lower]
    positive = [np.sort(sc[:, g][sc[:, g] > 0]) for g in range(sc.shape[1])]

    def thresholds(q: float) -> np.ndarray:
        return np.array([np.quantile(p, q) if p.size else np.inf for p in positive])

    scores = [np.sqrt(np.mean((reference - _gene_correlation(sc > thresholds(q))[lower]) ** 2)) for q in quantiles]
    best = float(quantiles[int(np.argmin(scores))])
    return sc > thresholds(best), best


def mcc_matrix(cells: np.ndarray, spots: np.ndarray) -> np.ndarray:
    """Matthews correlation of every binary cell row with every binary spot row.

    With ``TP = B_c B_s^T``, ``FP = |c| - TP``, ``FN = |s| - TP``, ``TN = G - TP - FP - FN``:
    ``MCC = (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``, 0 where the denominator is 0.

    Parameters
    ----------
    cells
        ``(n, G)`` bool.
    spots
        ``(m, G)`` bool.

    Returns
    -------
    numpy.ndarray
        ``(n, m)`` float64 in ``[-1, 1]``.
    """
    g = cells.shape[1]
    c = cells.astype(np.float64)
    s = spots.astype(np.float64)
    tp = c @ s.T
    fp = c.sum(axis=1, keepdims=True) - tp
    fn = s.sum(axis=1)[None, :] - tp
    tn = g - tp - fp - fn
    den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return np.divide(tp * tn - fp * fn, den, out=np.zeros_like(tp), where=den > 0)


def load() -> None:
    """Nothing to import beforehand."""


def map_cells(
    problem: PeerProblem,
    *,
    seed: int = 0,
    top_k: int = 1,
    quantiles=DEFAULT_QUANTILES,
    block_rows: int = 4096,
) -> dict[str, Any]:
    """Map cells to the spot of largest MCC, as DistMap.

    The score matrix is DistMap's ``exp(MCC)``; ``probability`` is ``exp(MCC)`` of the chosen spot
    over its row sum. Ties go to the lowest spot index. Deterministic (``seed`` unused).

    Parameters
    ----------
    problem
        The prepared problem.
    seed
        Unused (the method is deterministic).
    top_k
        Best spots per cell to keep.
    quantiles
        Candidate quantiles of the cell binarisation (see module docstring).
    block_rows
        Cells scored at once (bounds the memory of the ``(block, m)`` MCC matrices).

    Returns
    -------
    dict
        ``spot``, ``probability``, ``top_spots`` and ``info`` (the chosen quantile ``q``).
    """
    sc, spots = problem.dense()
    spots_binary = binarize_spots(spots)
    cells_binary, q = binarize_cells(sc, spots_binary, quantiles)
    parts = []
    for start in range(0, sc.shape[0], max(1, int(block_rows))):
        score = np.exp(mcc_matrix(cells_binary[start : start + block_rows], spots_binary))
        parts.append(assignment_from_plan(score, top_k))
    out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    out["info"] = {"quantile": q}
    return out
