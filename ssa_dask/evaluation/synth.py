"""Atlas-scale synthetic data: sparse cells and spots written chunk by chunk to AnnData-on-Zarr.

The generative model (all of it fixed by one integer seed):

* **Slide and spots.** ``S`` spots sit on a square grid of spacing ``h = 1 / ceil(sqrt(S))``
  (row-major, the last row may be partial). Spot ``s`` owns the square of side ``h`` centred on it.
* **Domains.** ``n_domains`` seed points are drawn uniformly on the slide; a location belongs to the
  domain of its nearest seed, and every domain carries one of ``n_types`` cell types
  (domain ``d`` has type ``perm[d mod n_types]``).
* **Cells.** Cell ``i`` gets a true spot ``s_i`` uniform over the spots and a position uniform in
  that spot's square, so ``s_i`` is also the spot nearest to the cell. Its type is the type of its
  domain, except with probability ``mix`` when it is a uniform random type.
* **Expression.** Each gene ``g`` has a baseline weight ``b_g ~ LogNormal(0, 0.5)``; each type has
  ``marker_frac * G`` marker genes whose weight is multiplied by ``marker_boost``. The probability
  that cell ``i`` of type ``t`` at ``(x, y)`` expresses gene ``g`` is

  .. math:: P_{ig} = \\min\\Big(0.95,\\; d\\, \\frac{b_g m_{tg}}{\\overline{b m_{t\\cdot}}}\\, w_g(x, y)\\Big),

  where ``d`` is the target density and ``w_g(x, y) = 1 + a \\sin(2\\pi k_g \\cdot (x, y) + \\phi_g)``
  is a plane wave for the ``spatial_frac * G`` spatial genes (``w_g = 1`` otherwise), so that
  expression also encodes position within a domain. An expressed entry has count
  ``1 + Poisson(r_{tg} \\, \\ell_i)`` with a per-type rate ``r`` and a library-size factor
  ``\\ell_i ~ LogNormal(0, 0.3)``. About a fraction ``d`` of the entries are non-zero.
* **Spots.** The expression of spot ``s`` is the **sum** of ``cells_per_spot`` cells drawn from the
  same model at uniform positions in the spot's square.

Randomness is split with :class:`numpy.random.SeedSequence`: ``SeedSequence(seed, spawn_key=(k,))``
is the ``k``-th child of ``SeedSequence(seed).spawn`` (0: the model, 1: cells, 2: spots), and block
``b`` of a stream uses the grandchild ``spawn_key=(k, b)``. Cells are generated in fixed blocks of
:data:`CELL_BLOCK` rows, so the output does not depend on how many rows are written at a time, and
the model does not depend on ``n_cells``, so a data set of ``n`` cells is the first ``n`` cells of
any larger one with the same other parameters (e.g. a 50,000-cell subset of the 1M-cell set).

On disk (:func:`write_synth`), ``OUT`` is a directory holding two AnnData-on-Zarr stores,
``OUT/cells.zarr`` (``N x G``) and ``OUT/spots.zarr`` (``S x G``), plus ``OUT/synth.json`` with
the parameters. ``X`` is anndata's ``csr_matrix`` encoding (``data`` float32, ``indices`` int32,
``indptr`` int64) and is appended chunk by chunk, so the peak memory is a few chunks whatever ``N``.
Cells carry ``obs`` columns ``x``, ``y``, ``cell_type``, ``domain`` and ``true_spot`` (row index
into the spots) and ``obsm["spatial"]``; spots carry ``x``, ``y``, ``domain``,
``dominant_cell_type``, ``n_cells`` and ``obsm["spatial"]``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from anndata.io import sparse_dataset, write_elem

from ssa_dask.errors import OutputExistsError, SSAInputError

__all__ = [
    "CELL_BLOCK",
    "SynthModel",
    "SynthParams",
    "SynthPaths",
    "generate_cells",
    "generate_spots",
    "iter_cell_chunks",
    "synth_anndata",
    "write_synth",
]

#: Cells are drawn in blocks of this many rows, each block from its own seed.
CELL_BLOCK = 1000
#: Rows per vectorised draw inside a block (bounds the dense ``rows x genes`` scratch arrays).
_DRAW_ROWS = 500
#: Spots are drawn in blocks of this many spots, each block from its own seed.
_SPOT_BLOCK = 200
_MAX_PROB = 0.95


@dataclass(frozen=True)
class SynthParams:
    """Parameters of the synthetic data set (see the module docstring for the model).

    Parameters
    ----------
    n_cells, n_genes, n_spots
        Matrix sizes: cells ``N``, genes ``G``, spots ``S``.
    density
        Target fraction of non-zero entries in the cell matrix, in ``(0, 0.9]``.
    seed
        Seed of every random draw.
    n_types
        Number of cell types.
    n_domains
        Number of spatial domains (Voronoi regions); ``None`` gives ``2 * n_types``.
    cells_per_spot
        Cells summed into each spot's expression.
    mix
        Probability that a cell's type is random instead of its domain's type.
    marker_frac, marker_boost
        Fraction of genes that mark each type, and the factor on their expression probability.
    spatial_frac, spatial_amplitude
        Fraction of genes modulated by a spatial plane wave, and the wave's amplitude ``a < 1``.
    """

    n_cells: int
    n_genes: int = 5000
    n_spots: int = 4000
    density: float = 0.1
    seed: int = 0
    n_types: int = 8
    n_domains: int | None = None
    cells_per_spot: int = 10
    mix: float = 0.2
    marker_frac: float = 0.05
    marker_boost: float = 4.0
    spatial_frac: float = 0.1
    spatial_amplitude: float = 0.8

    def __post_init__(self) -> None:
        for name in ("n_cells", "n_genes", "n_spots", "n_types", "cells_per_spot"):
            if int(getattr(self, name)) < 1:
                raise SSAInputError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_domains is not None and self.n_domains < 1:
            raise SSAInputError(f"n_domains must be a positive integer, got {self.n_domains!r}")
        if not 0.0 < self.density <= 0.9:
            raise SSAInputError(f"density must be in (0, 0.9], got {self.density!r}")
        if not 0.0 <= self.mix <= 1.0:
            raise SSAInputError(f"mix must be in [0, 1], got {self.mix!r}")
        if not 0.0 <= self.spatial_amplitude < 1.0:
            raise SSAInputError(f"spatial_amplitude must be in [0, 1), got {self.spatial_amplitude!r}")
        if not (0.0 <= self.marker_frac <= 1.0 and 0.0 <= self.spatial_frac <= 1.0):
            raise SSAInputError("marker_frac and spatial_frac must be in [0, 1]")
        if self.seed < 0:
            raise SSAInputError(f"seed must be >= 0, got {self.seed!r}")


def _rng(seed: int, *key: int) -> np.random.Generator:
    """Generator of the ``key`` child of ``SeedSequence(seed)`` (same as ``.spawn`` indexing)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


class SynthModel:
    """The fixed part of the model: spot grid, domains and gene programmes.

    Parameters
    ----------
    params
        The data set parameters; the model is drawn from ``SeedSequence(params.seed)`` child 0.
    """

    def __init__(self, params: SynthParams) -> None:
        self.params = params
        p = params
        rng = _rng(p.seed, 0)
        n_side = int(np.ceil(np.sqrt(p.n_spots)))
        self.spacing = 1.0 / n_side
        k = np.arange(p.n_spots)
        #: ``(S, 2)`` spot centres.
        self.spot_xy = np.column_stack([(k % n_side + 0.5), (k // n_side + 0.5)]) * self.spacing
        n_domains = p.n_domains if p.n_domains is not None else 2 * p.n_types
        extent = self.spot_xy.max(axis=0) + self.spacing / 2
        self.domain_xy = rng.random((n_domains, 2)) * extent
        type_perm = rng.permutation(p.n_types)
        self.domain_type = type_perm[np.arange(n_domains) % p.n_types]

        g = p.n_genes
        base = rng.lognormal(0.0, 0.5, size=g)
        weight = np.tile(base, (p.n_types, 1))
        n_markers = int(round(p.marker_frac * g))
        #: ``(G,)`` type whose marker the gene is (last one wins), -1 for none.
        self.marker_of = np.full(g, -1, dtype=np.int64)
        for t in range(p.n_types):
            markers = rng.choice(g, size=n_markers, replace=False)
            weight[t, markers] *= p.marker_boost
            self.marker_of[markers] = t
        weight /= weight.mean(axis=1, keepdims=True)
        #: ``(T, G)`` expression probability before the spatial wave.
        self.prob = np.minimum(p.density * weight, _MAX_PROB).astype(np.float32)
        rate = rng.lognormal(0.0, 0.7, size=(p.n_types, g))
        rate *= np.where(weight > 1.5, 2.0, 1.0)
        #: ``(T, G)`` Poisson rate of an expressed entry (count is ``1 + Poisson``).
        self.rate = rate.astype(np.float32)

        n_spatial = int(round(p.spatial_frac * g))
        #: ``(G_s,)`` indices of the spatially modulated genes.
        self.spatial_genes = np.sort(rng.choice(g, size=n_spatial, replace=False))
        angle = rng.uniform(0, 2 * np.pi, size=n_spatial)
        freq = rng.uniform(1.0, 3.0, size=n_spatial)
        self.wave_k = np.column_stack([np.cos(angle), np.sin(angle)]) * freq[:, None]
        self.wave_phase = rng.uniform(0, 2 * np.pi, size=n_spatial)

    # ------------------------------------------------------------------ layout
    def domain_of(self, xy: np.ndarray) -> np.ndarray:
        """Domain (index of the nearest domain seed) of each ``(n, 2)`` location."""
        d2 = ((xy[:, None, :] - self.domain_xy[None, :, :]) ** 2).sum(axis=2)
        return d2.argmin(axis=1)

    def layout(self, rng: np.random.Generator, spots: np.ndarray) -> dict[str, np.ndarray]:
        """Place one cell in each given spot's square and give it a domain and a type.

        Parameters
        ----------
        rng
            Random generator (advanced in place).
        spots
            ``(n,)`` spot index of each cell.

        Returns
        -------
        dict
            ``x``, ``y`` (float64), ``domain``, ``type`` and ``true_spot`` (int64), each ``(n,)``.
        """
        n = spots.shape[0]
        xy = self.spot_xy[spots] + (rng.random((n, 2)) - 0.5) * self.spacing
        domain = self.domain_of(xy)
        cell_type = self.domain_type[domain].copy()
        flip = rng.random(n) < self.params.mix
        cell_type[flip] = rng.integers(0, self.params.n_types, size=int(flip.sum()))
        return {"x": xy[:, 0], "y": xy[:, 1], "domain": domain, "type": cell_type, "true_spot": spots}

    # -------------------------------------------------------------- expression
    def counts(self, rng: np.random.Generator, layout: dict[str, np.ndarray]) -> sp.csr_matrix:
        """Draw the sparse counts of the cells described by ``layout``.

        Parameters
        ----------
        rng
            Random generator (advanced in place).
        layout
            Output of :meth:`layout` for ``n`` cells.

        Returns
        -------
        scipy.sparse.csr_matrix
            ``(n, G)`` float32 counts, sorted column indices (int32), int64 ``indptr``.
        """
        types, x, y = layout["type"], layout["x"], layout["y"]
        n, g = types.shape[0], self.params.n_genes
        library = rng.lognormal(0.0, 0.3, size=n).astype(np.float32)
        amp = self.params.spatial_amplitude
        row_nnz, all_cols, all_vals = [], [], []
        for lo in range(0, n, _DRAW_ROWS):
            hi = min(lo + _DRAW_ROWS, n)
            prob = self.prob[types[lo:hi]]
            if self.spatial_genes.size:
                phase = 2 * np.pi * (np.outer(x[lo:hi], self.wave_k[:, 0]) + np.outer(y[lo:hi], self.wave_k[:, 1]))
                wave = 1.0 + amp * np.sin(phase + self.wave_phase)
                prob[:, self.spatial_genes] *= wave.astype(np.float32)
            hit = rng.random((hi - lo, g), dtype=np.float32) < prob
            rows, cols = np.nonzero(hit)
            lam = self.rate[types[lo + rows], cols] * library[lo + rows]
            vals = 1.0 + rng.poisson(lam).astype(np.float32)
            row_nnz.append(np.bincount(rows, minlength=hi - lo))
            all_cols.append(cols.astype(np.int32))
            all_vals.append(vals.astype(np.float32))
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.concatenate(row_nnz), out=indptr[1:])
        return sp.csr_matrix((np.concatenate(all_vals), np.concatenate(all_cols), indptr), shape=(n, g))


# ---------------------------------------------------------------------- cells
def _cell_block(model: SynthModel, block: int) -> tuple[sp.csr_matrix, dict[str, np.ndarray]]:
    """Block ``block``: always drawn whole, then cut at ``n_cells``, so that a data set is a prefix
    of any larger one with the same parameters."""
    p = model.params
    n = min(CELL_BLOCK, p.n_cells - block * CELL_BLOCK)
    rng = _rng(p.seed, 1, block)
    layout = model.layout(rng, rng.integers(0, p.n_spots, size=CELL_BLOCK))
    X = model.counts(rng, layout)
    return (X[:n], {k: v[:n] for k, v in layout.items()}) if n < CELL_BLOCK else (X, layout)


def generate_cells(model: SynthModel, start: int, stop: int) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """Rows ``start:stop`` of the cell matrix and their ``obs``.

    The rows are the same whatever range they are asked in (cells are drawn in fixed blocks of
    :data:`CELL_BLOCK`; a range that cuts a block draws the whole block and slices it).

    Parameters
    ----------
    model
        The model.
    start, stop
        Row range, ``0 <= start < stop <= n_cells``.

    Returns
    -------
    X : scipy.sparse.csr_matrix
        ``(stop - start, G)`` float32 counts.
    obs : pandas.DataFrame
        ``x``, ``y``, ``cell_type`` (categorical), ``domain``, ``true_spot``; index ``cell_<i>``.
    """
    n_cells = model.params.n_cells
    if not 0 <= start < stop <= n_cells:
        raise SSAInputError(f"row range [{start}, {stop}) is outside [0, {n_cells})")
    first, last = start // CELL_BLOCK, (stop - 1) // CELL_BLOCK
    mats, layouts = zip(*(_cell_block(model, b) for b in range(first, last + 1)), strict=True)
    offset = first * CELL_BLOCK
    X = sp.vstack(mats, format="csr")[start - offset : stop - offset]
    X.indptr = X.indptr.astype(np.int64)
    cols = {k: np.concatenate([lay[k] for lay in layouts])[start - offset : stop - offset] for k in layouts[0]}
    return X, _cell_obs(model, cols, start)


def _type_names(n_types: int) -> list[str]:
    return [f"type_{t}" for t in range(n_types)]


def _cell_obs(model: SynthModel, cols: dict[str, np.ndarray], start: int) -> pd.DataFrame:
    n = cols["x"].shape[0]
    names = _type_names(model.params.n_types)
    return pd.DataFrame(
        {
            "x": cols["x"],
            "y": cols["y"],
            "cell_type": pd.Categorical.from_codes(cols["type"], categories=names),
            "domain": cols["domain"].astype(np.int64),
            "true_spot": cols["true_spot"].astype(np.int64),
        },
        index=pd.Index([f"cell_{i}" for i in range(start, start + n)], dtype=object),
    )


def iter_cell_chunks(model: SynthModel, chunk_rows: int) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
    """Yield the cell matrix as consecutive row chunks of ``chunk_rows`` rows (the last may be shorter)."""
    if chunk_rows < 1:
        raise SSAInputError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    for start in range(0, model.params.n_cells, chunk_rows):
        yield generate_cells(model, start, min(start + chunk_rows, model.params.n_cells))


# ---------------------------------------------------------------------- spots
def generate_spots(model: SynthModel) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """The spot matrix: each spot sums ``cells_per_spot`` cells drawn in its square.

    Returns
    -------
    X : scipy.sparse.csr_matrix
        ``(S, G)`` float32 summed counts.
    obs : pandas.DataFrame
        ``x``, ``y``, ``domain`` (at the centre), ``dominant_cell_type`` (most frequent type among
        the summed cells), ``n_cells``; index ``spot_<s>``.
    """
    p = model.params
    c = p.cells_per_spot
    mats, dominant = [], []
    for b, lo in enumerate(range(0, p.n_spots, _SPOT_BLOCK)):
        spots = np.arange(lo, min(lo + _SPOT_BLOCK, p.n_spots))
        rng = _rng(p.seed, 2, b)
        layout = model.layout(rng, np.repeat(spots, c))
        cells = model.counts(rng, layout)
        pool = sp.csr_matrix(
            (np.ones(cells.shape[0], dtype=np.float32), np.arange(cells.shape[0]), np.arange(0, cells.shape[0] + 1, c)),
            shape=(spots.size, cells.shape[0]),
        )
        mats.append((pool @ cells).tocsr())
        tally = np.zeros((spots.size, p.n_types), dtype=np.int64)
        np.add.at(tally, (np.repeat(np.arange(spots.size), c), layout["type"]), 1)
        dominant.append(tally.argmax(axis=1))
    X = sp.vstack(mats, format="csr").astype(np.float32)
    X.sort_indices()
    X.indptr = X.indptr.astype(np.int64)
    X.indices = X.indices.astype(np.int32)
    names = _type_names(p.n_types)
    obs = pd.DataFrame(
        {
            "x": model.spot_xy[:, 0],
            "y": model.spot_xy[:, 1],
            "domain": model.domain_of(model.spot_xy).astype(np.int64),
            "dominant_cell_type": pd.Categorical.from_codes(np.concatenate(dominant), categories=names),
            "n_cells": np.full(p.n_spots, c, dtype=np.int64),
        },
        index=pd.Index([f"spot_{s}" for s in range(p.n_spots)], dtype=object),
    )
    return X, obs


def _var(model: SynthModel) -> pd.DataFrame:
    g = model.params.n_genes
    spatial = np.zeros(g, dtype=bool)
    spatial[model.spatial_genes] = True
    return pd.DataFrame(
        {"marker_of": model.marker_of, "spatial": spatial},
        index=pd.Index([f"gene_{i:05d}" for i in range(g)], dtype=object),
    )


def _with_spatial(adata: ad.AnnData) -> ad.AnnData:
    adata.obsm["spatial"] = adata.obs[["x", "y"]].to_numpy()
    return adata


def synth_anndata(params: SynthParams) -> tuple[ad.AnnData, ad.AnnData]:
    """The whole data set in memory, as ``(cells, spots)`` AnnData (for small ``n_cells``).

    Parameters
    ----------
    params
        Data set parameters.

    Returns
    -------
    cells, spots : anndata.AnnData
        Same content as the stores written by :func:`write_synth` with these parameters.
    """
    model = SynthModel(params)
    X, obs = generate_cells(model, 0, params.n_cells)
    var = _var(model)
    cells = _with_spatial(ad.AnnData(X=X, obs=obs, var=var))
    sX, sobs = generate_spots(model)
    spots = _with_spatial(ad.AnnData(X=sX, obs=sobs, var=var.copy()))
    cells.uns["synth"] = spots.uns["synth"] = _params_dict(params)
    return cells, spots


def _params_dict(params: SynthParams) -> dict:
    return {k: v for k, v in asdict(params).items() if v is not None}


# ---------------------------------------------------------------------- disk
@dataclass(frozen=True)
class SynthPaths:
    """Where :func:`write_synth` put the data set."""

    root: Path
    cells: Path
    spots: Path
    params: Path


def _finish_store(group: zarr.Group, obs: pd.DataFrame, var: pd.DataFrame, uns: dict) -> None:
    """Write every AnnData element except ``X`` into ``group`` and mark it as an AnnData."""
    adata = _with_spatial(ad.AnnData(obs=obs, var=var))
    write_elem(group, "obs", adata.obs)
    write_elem(group, "var", adata.var)
    write_elem(group, "obsm", dict(adata.obsm))
    for key in ("varm", "obsp", "varp", "layers"):
        write_elem(group, key, {})
    write_elem(group, "uns", uns)
    group.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    zarr.consolidate_metadata(group.store)


def _csr_kwargs(chunk_elems: int) -> dict:
    return {"chunks": (int(max(chunk_elems, 1 << 16)),), "indptr_dtype": np.int64}


def write_synth(
    out: str | Path,
    params: SynthParams,
    *,
    chunk_rows: int = 10_000,
    overwrite: bool = False,
    on_chunk: Callable[[int, int], None] | None = None,
) -> SynthPaths:
    """Generate the data set and write it chunk by chunk to ``out/cells.zarr`` and ``out/spots.zarr``.

    Only ``chunk_rows`` cells are held at a time (plus ``obs``, ~50 bytes a cell), so the peak
    memory is a few chunks of the sparse matrix whatever ``n_cells``.

    Parameters
    ----------
    out
        Output directory (created; it must not exist unless ``overwrite``).
    params
        Data set parameters.
    chunk_rows
        Cells generated and appended per step; also sets the Zarr chunk length of ``X/data`` and
        ``X/indices`` (about ``chunk_rows * n_genes * density`` entries). The data do not depend on it.
    overwrite
        Replace ``out`` when it exists.
    on_chunk
        Called as ``on_chunk(rows_done, n_cells)`` after each chunk.

    Returns
    -------
    SynthPaths
        Paths of the two stores and of ``synth.json``.
    """
    if chunk_rows < 1:
        raise SSAInputError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    root = Path(out)
    if root.exists():
        if not overwrite:
            raise OutputExistsError(f"{root} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    model = SynthModel(params)
    var = _var(model)
    uns = {"synth": _params_dict(params)}
    fmt = ad.settings.zarr_write_format
    kwargs = _csr_kwargs(int(chunk_rows * params.n_genes * params.density))

    cells_group = zarr.open_group(root / "cells.zarr", mode="w", zarr_format=fmt)
    obs_parts = []
    for X, obs in iter_cell_chunks(model, chunk_rows):
        if "X" in cells_group:
            sparse_dataset(cells_group["X"]).append(X)
        else:
            write_elem(cells_group, "X", X, dataset_kwargs=kwargs)
        obs_parts.append(obs)
        if on_chunk is not None:
            on_chunk(int(cells_group["X"].attrs["shape"][0]), params.n_cells)
    _finish_store(cells_group, pd.concat(obs_parts), var, uns)
    del obs_parts

    spots_group = zarr.open_group(root / "spots.zarr", mode="w", zarr_format=fmt)
    sX, sobs = generate_spots(model)
    write_elem(spots_group, "X", sX, dataset_kwargs=_csr_kwargs(sX.nnz))
    _finish_store(spots_group, sobs, var.copy(), uns)

    params_path = root / "synth.json"
    params_path.write_text(json.dumps({**uns["synth"], "chunk_rows": chunk_rows}, indent=2) + "\n")
    return SynthPaths(root=root, cells=root / "cells.zarr", spots=root / "spots.zarr", params=params_path)
