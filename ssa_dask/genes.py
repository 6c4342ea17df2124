"""Gene selection: rank genes by variance over cells, keep those shared with the spots."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ssa_dask.errors import SSAInputError

log = logging.getLogger(__name__)

#: Fewest genes SSA accepts after selection.  With two genes every z-scored profile, centred over
#: the genes, is +-(1, -1)/sqrt(2), so every |rho| is exactly 1, D is 0 up to rounding and
#: ``eps = lam * max D`` is built from rounding noise; three genes is the first size where the
#: correlation can take values other than +-1.
MIN_GENES = 3


@dataclass(frozen=True)
class GeneSelection:
    """The genes SSA compares cells and spots on, and why others were dropped.

    Attributes
    ----------
    genes : pandas.Index
        Selected genes, in decreasing order of scRNA variance.
    missing_in_spots : list of str
        Top-variance genes absent from the spot matrix.
    constant : list of str
        Top-variance genes dropped because they are constant in the cells or in the spots.
    """

    genes: pd.Index
    missing_in_spots: list[str] = field(default_factory=list)
    constant: list[str] = field(default_factory=list)


def top_variance_genes(genes: pd.Index, variance: np.ndarray, n_genes: int) -> pd.Index:
    """The ``n_genes`` genes of largest variance (all genes if fewer), largest first.

    Ties keep the input order (stable sort).

    Parameters
    ----------
    genes : pandas.Index
        Gene names, one per entry of ``variance``.
    variance : (G,) array
        Per-gene variance over cells.
    n_genes : int
        How many to keep.
    """
    if n_genes < 1:
        raise SSAInputError(f"n_genes must be at least 1, got {n_genes}")
    order = np.argsort(-np.asarray(variance), kind="stable")[:n_genes]
    return genes[order]


def select_genes(
    sc_genes: pd.Index,
    sc_variance: np.ndarray,
    spot_genes: pd.Index,
    spot_variance: np.ndarray,
    n_genes: int,
) -> GeneSelection:
    """SSA's gene selection: top-variance scRNA genes, present and non-constant in both matrices.

    Parameters
    ----------
    sc_genes, spot_genes : pandas.Index
        Gene names of the scRNA and spot matrices.
    sc_variance, spot_variance : arrays
        Per-gene variance over cells and over spots.
    n_genes : int
        Number of top-variance scRNA genes to start from (method default 5,000).

    Returns
    -------
    GeneSelection

    Raises
    ------
    SSAInputError
        No gene is shared (with a hint when names match up to case), or fewer than
        ``MIN_GENES`` usable genes remain.
    """
    shared = sc_genes.intersection(spot_genes)
    if len(shared) == 0:
        raise SSAInputError(
            f"gene mismatch: the scRNA matrix ({len(sc_genes)} genes, e.g. {list(sc_genes[:3])}) and the spot "
            f"matrix ({len(spot_genes)} genes, e.g. {list(spot_genes[:3])}) share no gene names; "
            "check gene identifiers (symbols vs Ensembl IDs) or pass gene_key" + _case_hint(sc_genes, spot_genes)
        )
    top = top_variance_genes(sc_genes, sc_variance, n_genes)
    in_spots = top.isin(spot_genes)
    missing = list(top[~in_spots])
    kept = top[in_spots]
    sc_var = pd.Series(np.asarray(sc_variance), index=sc_genes)
    spot_var = pd.Series(np.asarray(spot_variance), index=spot_genes)
    constant_mask = (sc_var.reindex(kept).to_numpy() <= 0) | (spot_var.reindex(kept).to_numpy() <= 0)
    constant = list(kept[constant_mask])
    kept = kept[~constant_mask]
    if missing:
        log.warning("%d of the top %d variance genes are not in the spots and were dropped (e.g. %s)",
                    len(missing), len(top), missing[:5])
    if constant:
        log.warning("%d gene(s) constant in the cells or the spots were dropped (e.g. %s)",
                    len(constant), constant[:5])
    if len(kept) < MIN_GENES:
        raise SSAInputError(
            f"only {len(kept)} usable gene(s) remain after selection (n_genes={n_genes}, {len(missing)} missing in "
            f"spots, {len(constant)} constant with zero variance); SSA needs at least {MIN_GENES}: with 2 genes every "
            "|Pearson correlation| is 1 and the cost carries no information"
        )
    return GeneSelection(genes=kept, missing_in_spots=missing, constant=constant)


def _case_hint(sc_genes: pd.Index, spot_genes: pd.Index) -> str:
    """A hint when the gene names match once case is ignored (e.g. mouse ``Actb`` vs human-style ``ACTB``)."""
    sc_upper = pd.Index(sc_genes.astype(str).str.upper())
    matches = sc_upper.isin(pd.Index(spot_genes.astype(str).str.upper()))
    if not matches.any():
        return ""
    first = str(sc_genes[np.flatnonzero(matches)[0]])
    partner = next(g for g in spot_genes.astype(str) if g.upper() == first.upper())
    return (f"; {int(matches.sum())} gene names match when case is ignored (e.g. {first!r} vs {partner!r}): make the "
            "case agree in both matrices (e.g. upper-case both)")

