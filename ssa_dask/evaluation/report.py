"""The files of a benchmark run: tables (CSV, Markdown), figures and ``summary.md``.

:func:`write_outputs` takes the :class:`~ssa_dask.evaluation.run.BenchmarkResult` of
:func:`~ssa_dask.evaluation.run.run_benchmark`, builds the tables with
:mod:`ssa_dask.evaluation.tables` and draws the figures with :mod:`ssa_dask.evaluation.plot`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ssa_dask.evaluation.run import BenchmarkResult
from ssa_dask.evaluation.tables import (
    format_number,
    markdown_table,
    method_status,
    per_replicate_table,
    runtime_table,
    wilcoxon_table,
)

__all__ = ["write_outputs"]

_SWEEP_LABEL = "mean Euclidean distance (grid units)"


def write_outputs(result: BenchmarkResult, out_dir: str | Path) -> dict[str, Path]:
    """Write the tables, figures and ``summary.md`` of a benchmark run.

    Files (in ``out_dir``): ``metrics.csv`` (long); ``table_euclidean.{csv,md}`` and
    ``table_manhattan.{csv,md}`` (per replicate, grid units, best in bold; the paper's Tables 1-2)
    and ``table_euclidean_coord.{csv,md}`` / ``table_manhattan_coord.{csv,md}`` (coordinate
    units); ``table_accuracy.csv``; ``runtime_memory.{csv,md}``;
    ``wilcoxon_euclidean.{csv,md}`` and ``wilcoxon_manhattan.{csv,md}`` (paired two-sided p-values
    across replicates, grid units); ``per_type_kl.csv`` and ``per_type_kl_skipped.csv``;
    ``sweeps.csv``; figures ``spot_map.png``, ``pred_vs_true.png``, ``kl_boxplot.png``,
    ``lambda_sweep.png``, ``n_genes_sweep.png``; ``summary.md``.

    Parameters
    ----------
    result
        From :func:`~ssa_dask.evaluation.run.run_benchmark`.
    out_dir
        Output folder (created).

    Returns
    -------
    dict
        Name -> path of every file written.
    """
    from ssa_dask.evaluation import plot

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg, metrics = result.config, result.metrics
    methods = list(cfg.methods)
    status = method_status(metrics, methods)
    files: dict[str, Path] = {}

    def write(name: str, text: str) -> None:
        files[name] = out / name
        files[name].write_text(text)

    metrics.to_csv(out / "metrics.csv", index=False)
    files["metrics.csv"] = out / "metrics.csv"
    tables = {}
    for value, stem, unit in (
        ("euclidean_grid", "table_euclidean", "grid units"),
        ("manhattan_grid", "table_manhattan", "grid units"),
        ("euclidean", "table_euclidean_coord", "coordinate units"),
        ("manhattan", "table_manhattan_coord", "coordinate units"),
    ):
        table = per_replicate_table(metrics, value, methods)
        tables[value] = table
        table.to_csv(out / f"{stem}.csv", index_label="replicate")
        files[f"{stem}.csv"] = out / f"{stem}.csv"
        md_table = pd.concat([table.astype(object), pd.DataFrame([status], index=["status"])])
        title = f"Mean {value.split('_')[0].capitalize()} distance between predicted and true spots ({unit}); best in bold.\n\n"
        write(f"{stem}.md", title + markdown_table(md_table, bold="min", digits=3 if unit == "grid units" else 2))
    acc = per_replicate_table(metrics, "accuracy", methods)
    acc.to_csv(out / "table_accuracy.csv", index_label="replicate")
    files["table_accuracy.csv"] = out / "table_accuracy.csv"

    runtime = runtime_table(metrics, methods)
    runtime.to_csv(out / "runtime_memory.csv")
    files["runtime_memory.csv"] = out / "runtime_memory.csv"
    write(
        "runtime_memory.md",
        "Wall time and peak resident-memory increase of each method's own mapping code per replicate.\n\n"
        + markdown_table(runtime, digits=2, index_name="method"),
    )

    pvalues = {}
    for value, stem in (("euclidean_grid", "wilcoxon_euclidean"), ("manhattan_grid", "wilcoxon_manhattan")):
        p, n_replicates = wilcoxon_table(metrics, value, methods)
        pvalues[value] = p
        p.to_csv(out / f"{stem}.csv")
        files[f"{stem}.csv"] = out / f"{stem}.csv"
        write(
            f"{stem}.md",
            f"Paired two-sided Wilcoxon signed-rank p-values of the per-replicate {value} between methods "
            f"({n_replicates} replicates).\n\n" + markdown_table(p, digits=4, index_name="method"),
        )

    result.kl.to_csv(out / "per_type_kl.csv", index=False)
    result.kl_skipped.to_csv(out / "per_type_kl_skipped.csv", index=False)
    files["per_type_kl.csv"] = out / "per_type_kl.csv"
    files["per_type_kl_skipped.csv"] = out / "per_type_kl_skipped.csv"
    if not result.sweeps.empty:
        result.sweeps.to_csv(out / "sweeps.csv", index=False)
        files["sweeps.csv"] = out / "sweeps.csv"

    sim = result.spots.uns["ssa_simulation"]
    plot.plot_spot_map(result.spots.obs, sim["spot_size"], sim["origin"], out / "spot_map.png",
                       title=f"{result.dataset['name']}: {result.spots.n_obs} spots, side {sim['spot_size']:.4g}")
    files["spot_map.png"] = out / "spot_map.png"
    ex = result.example
    preds = {m: ex[[f"{m}_x", f"{m}_y"]].to_numpy() for m in methods if f"{m}_x" in ex}
    if preds:
        plot.plot_pred_vs_true(ex[["x", "y"]].to_numpy(), preds, ex["cell_type"].astype(str).to_numpy(),
                               out / "pred_vs_true.png", jitter=0.8 * sim["spot_size"],
                               title=f"{result.dataset['name']}, replicate 0: true vs predicted positions")
        files["pred_vs_true.png"] = out / "pred_vs_true.png"
    kl_mean = result.kl.groupby(["method", "cell_type"], as_index=False)["kl"].mean()
    if not kl_mean.empty:
        plot.plot_kl_boxplot(kl_mean, out / "kl_boxplot.png",
                             title=f"{result.dataset['name']}: per-cell-type KL (mean over replicates)")
        files["kl_boxplot.png"] = out / "kl_boxplot.png"
    sw = result.sweeps
    if not sw.empty and "euclidean_grid" in sw:
        lam = sw[(sw["sweep"] == "lambda") & (sw["status"] == "ok")]
        if not lam.empty:
            plot.plot_lambda_sweep(lam, out / "lambda_sweep.png", ylabel=_SWEEP_LABEL)
            files["lambda_sweep.png"] = out / "lambda_sweep.png"
        genes = sw[(sw["sweep"] == "n_genes") & (sw["status"] == "ok")]
        if not genes.empty:
            # the genes left after dropping constant ones can differ by replicate: plot each requested
            # n_genes at the median number actually used
            genes = genes.assign(n_genes_used=genes.groupby("n_genes")["n_genes_used"].transform("median"))
            plot.plot_ngenes_sweep(genes, out / "n_genes_sweep.png", ylabel=_SWEEP_LABEL)
            files["n_genes_sweep.png"] = out / "n_genes_sweep.png"

    write("summary.md", _summary(result, tables, pvalues, runtime, kl_mean, status, files))
    return files


def _summary(result, tables, pvalues, runtime, kl_mean, status, files) -> str:
    cfg, spots = result.config, result.spots
    sim = spots.uns["ssa_simulation"]
    methods = list(cfg.methods)
    n_per = spots.obs["n_cells"]
    lines = [
        f"# Semi-simulation benchmark: {result.dataset['name']}",
        "",
        f"- Slide: {result.dataset['n_cells']:,} cells x {result.dataset['n_genes']:,} genes.",
        _filter_line(result.dataset.get("cell_filter")),
        (
            f"- Grid: side {sim['spot_size']:.6g} coordinate units -> {spots.n_obs} non-empty spots, "
            f"{n_per.median():.0f} cells per spot (median; mean {n_per.mean():.1f}, range {n_per.min()}-{n_per.max()})."
        ),
        (
            f"- Replicates: {cfg.n_replicates} x {int(result.metrics['n_cells'].iloc[0]):,} cells (seed {cfg.seed}); "
            f"log(A+1) {'applied to replicates and spot means' if cfg.log1p else 'not applied (input already log-normalised)'}."
        ),
        f"- Methods: {', '.join(methods)}. Run time {result.seconds / 60:.1f} min.",
        "",
        (
            "Distances: *grid units* are distances between the grid indices (i, j) of the predicted and the true "
            "square (adjacent squares are 1 apart; the unit of the paper's Tables 1-2); *coordinate units* are "
            "distances between the centroids of the predicted and true spots in the slide's own units."
        ),
        "",
        "## Mean over replicates (± sd)",
        "",
    ]
    head = pd.DataFrame(index=methods)
    for value, label in (
        ("euclidean_grid", "Euclidean (grid)"),
        ("manhattan_grid", "Manhattan (grid)"),
        ("euclidean", "Euclidean (coord)"),
        ("manhattan", "Manhattan (coord)"),
    ):
        t = tables[value]
        head[label] = [
            "—" if not np.isfinite(t.loc["mean", m]) else f"{t.loc['mean', m]:.3f} ± {format_number(t.loc['sd', m])}" for m in methods
        ]
    acc = result.metrics[result.metrics["status"] == "ok"].groupby("method")["accuracy"].mean()
    head["exact-spot accuracy"] = [format_number(acc.get(m, np.nan)) for m in methods]
    med_kl = kl_mean.groupby("method")["kl"].median() if not kl_mean.empty else pd.Series(dtype=float)
    head["median per-type KL"] = [format_number(med_kl.get(m, np.nan)) for m in methods]
    head["seconds"] = [format_number(runtime["seconds_mean"].get(m, np.nan), 2) if m in runtime.index else "—" for m in methods]
    head["status"] = [status[m] for m in methods]
    lines.append(markdown_table(head, index_name="method"))
    means = tables["euclidean_grid"].loc["mean"].dropna()
    if not means.empty:
        best = means.idxmin()
        lines.append(f"Lowest mean Euclidean distance: **{best}** ({means[best]:.3f} grid units).")
        lines.append("")
    if "ssa" in means.index:
        p = pvalues["euclidean_grid"]
        lines += ["## SSA against each method (Euclidean, grid units; paired Wilcoxon across replicates)", ""]
        for m in means.index:
            if m == "ssa":
                continue
            diff = means[m] - means["ssa"]
            pv = p.loc["ssa", m] if "ssa" in p.index and m in p.columns else np.nan
            verdict = "SSA closer" if diff > 0 else ("peer closer" if diff < 0 else "equal")
            lines.append(f"- {m}: {means[m]:.3f} vs SSA {means['ssa']:.3f} ({verdict}; p = {format_number(pv, 4)})")
        lines.append("")
    sw = result.sweeps
    if not sw.empty and "euclidean_grid" in sw:
        lines += ["## SSA sweeps (mean Euclidean, grid units, first replicates)", ""]
        lam = sw[(sw["sweep"] == "lambda") & (sw["status"] == "ok")]
        if not lam.empty:
            agg = lam.groupby("lam")["euclidean_grid"].mean()
            lines.append("- lambda: " + ", ".join(f"{k:g} -> {v:.3f}" for k, v in agg.items()))
        genes = sw[(sw["sweep"] == "n_genes") & (sw["status"] == "ok")]
        if not genes.empty:
            agg = genes.groupby("n_genes").agg(
                d=("euclidean_grid", "mean"), lo=("n_genes_used", "min"), hi=("n_genes_used", "max")
            )
            used = [f"{r.lo}" if r.lo == r.hi else f"{r.lo}-{r.hi}" for r in agg.itertuples()]
            lines.append(
                "- n_genes (genes used): "
                + ", ".join(f"{k} ({u}) -> {r.d:.3f}" for (k, r), u in zip(agg.iterrows(), used))
            )
        failed = sw[sw["status"] != "ok"]
        if not failed.empty:
            lines.append(f"- {len(failed)} sweep runs failed: {sorted(set(failed['status']))}")
        lines.append("")
    skipped = result.kl_skipped
    if not skipped.empty:
        lines.append(
            f"Per-type KL skipped {skipped['cell_type'].nunique()} cell types in some runs (fewer than 3 mapped cells or "
            "a degenerate predicted point set); see per_type_kl_skipped.csv."
        )
        lines.append("")
    lines += ["## Files", ""] + [f"- [{name}]({name})" for name in sorted(files) if name != "summary.md"]
    return "\n".join(lines) + "\n"


def _filter_line(record: dict | None) -> str:
    if not record or not record["n_cells_removed"]:
        return "- Cell filter: no cell removed (none has zero or non-finite total expression)."
    return (f"- Cell filter: {record['n_cells_removed']:,} of {record['n_cells_input']:,} cells removed for every method "
            f"before binning and sampling (zero or non-finite total expression; e.g. {', '.join(record['removed'][:5])}).")
