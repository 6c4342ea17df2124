"""Evaluation harness: simulated data with a known answer, peer methods, scores, tables and figures.

Nothing in the method (:func:`ssa_dask.align` and the modules it calls) imports this package; it
serves the tests, the benchmarks, ``ssa-dask demo``, ``simulate``, ``benchmark`` and ``synth``.

=============== ===========================================================================
module          job
=============== ===========================================================================
``simulate``    the paper's semi-simulation: a single-cell-resolution slide cut into grid
                spots (:func:`bin_to_spots`), replicate scRNA-seq sets (:func:`sample_replicates`),
                the truth (:func:`truth_table`, :func:`write_simulation`); and
                :func:`synthetic_tissue`, a small slide to feed it
``synth``       atlas-scale synthetic cells *and* spots, streamed to AnnData-on-Zarr
                (:class:`SynthParams`, :func:`write_synth`, :func:`synth_anndata`)
``peers``       the peer methods (and SSA) behind one interface
                (:func:`ssa_dask.evaluation.peers.run_method`)
``metrics``     accuracy of a cell -> spot mapping against the truth, paired Wilcoxon tests
``run``         the benchmark run: every method on every replicate, scored, plus SSA's
                ``lam`` / ``n_genes`` sweeps (:class:`BenchmarkConfig`, :func:`run_benchmark`)
``tables``      per-replicate, run-time and Wilcoxon tables of a run, rendered as Markdown
``report``      the files of a run: tables, figures, ``summary.md`` (:func:`write_outputs`)
``plot``        the figures (matplotlib, off-screen; imported only when figures are drawn)
=============== ===========================================================================

Two tissue simulators, on purpose. They answer different questions and neither can be a thin call
of the other without changing what it guarantees:

* :func:`synthetic_tissue` (``simulate``) makes the *slide* of the paper's protocol: raw
  negative-binomial (Gamma-Poisson) counts with varying library sizes, cells at uniform positions,
  types as contiguous domains drawn from smooth random fields with mixed borders, marker and
  spatial-gradient genes. It has no spots: :func:`bin_to_spots` makes them as the mean of the very
  cells that :func:`sample_replicates` then draws, which is what the semi-simulation scores. It is
  drawn at once, in memory, from one generator, so each ``(n_cells, seed)`` is its own data set; the
  demo and the benchmark tests rely on this fixed output (e.g. SSA beats the random floor on it).
* :mod:`~ssa_dask.evaluation.synth` makes *both sides* at any size, for scaling and cost benchmarks:
  a sparse matrix at a target density (expressed entries ``1 + Poisson``, Voronoi domains, plane-wave
  spatial genes), spots as sums of freshly drawn cells in their squares (so the number of spots is
  free of the number of cells), and a true spot per cell by construction. Cells come in seeded
  blocks, so rows do not depend on the chunk size, the peak memory is a few chunks whatever the size,
  and a data set of ``n`` cells is the first ``n`` cells of any larger one.

Merging them would either change :func:`synthetic_tissue`'s counts and domains (the model and the
draw order differ) or give up the streaming, prefix and density guarantees of ``synth``.
"""

from ssa_dask.evaluation.metrics import (
    kde_kl_divergence,
    mean_euclidean,
    mean_manhattan,
    paired_wilcoxon,
    per_type_kl,
    spot_accuracy,
    topk_accuracy,
)
from ssa_dask.evaluation.report import write_outputs
from ssa_dask.evaluation.run import (
    ALL_METHODS,
    BenchmarkConfig,
    BenchmarkResult,
    common_cell_filter,
    config_dict,
    run_benchmark,
    score_mapping,
)
from ssa_dask.evaluation.simulate import (
    bin_to_spots,
    cell_coordinates,
    sample_replicates,
    synthetic_tissue,
    truth_table,
    write_simulation,
)
from ssa_dask.evaluation.synth import SynthParams, synth_anndata, write_synth

__all__ = [
    "ALL_METHODS",
    "BenchmarkConfig",
    "BenchmarkResult",
    "SynthParams",
    "bin_to_spots",
    "cell_coordinates",
    "common_cell_filter",
    "config_dict",
    "kde_kl_divergence",
    "mean_euclidean",
    "mean_manhattan",
    "paired_wilcoxon",
    "per_type_kl",
    "run_benchmark",
    "sample_replicates",
    "score_mapping",
    "spot_accuracy",
    "synth_anndata",
    "synthetic_tissue",
    "topk_accuracy",
    "truth_table",
    "write_outputs",
    "write_simulation",
    "write_synth",
]
