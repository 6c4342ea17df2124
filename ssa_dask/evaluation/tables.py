"""Tables of a benchmark run: per-replicate metric tables, run time and memory, Wilcoxon p-values, Markdown.

Every function takes the long metrics table of :func:`ssa_dask.evaluation.run.run_benchmark`
(one row per replicate and method) and returns a :class:`pandas.DataFrame`;
:func:`markdown_table` renders any of them for :mod:`ssa_dask.evaluation.report`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ssa_dask.evaluation.metrics import paired_wilcoxon

__all__ = [
    "format_number",
    "markdown_table",
    "method_status",
    "per_replicate_table",
    "runtime_table",
    "wilcoxon_table",
]


def format_number(value: float, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, or an em dash when it is not finite.

    Parameters
    ----------
    value
        Number to write.
    digits
        Decimals.

    Returns
    -------
    str
    """
    return "—" if not np.isfinite(value) else f"{value:.{digits}f}"


def markdown_table(
    frame: pd.DataFrame,
    *,
    bold: str | None = None,
    digits: int = 3,
    index_name: str = "",
    no_bold_rows: Sequence[str] = ("sd",),
) -> str:
    """Render a numeric table as Markdown, bolding the best value of each row.

    Parameters
    ----------
    frame
        Table to render (index becomes the first column); non-numeric cells are written as they are.
    bold
        ``"min"`` or ``"max"``: bold the best finite value of every row; None: no bold.
    digits
        Decimals of floats.
    index_name
        Header of the index column.
    no_bold_rows
        Index labels of rows never bolded (e.g. the standard deviation).

    Returns
    -------
    str
    """
    header = [index_name or (frame.index.name or "")] + [str(c) for c in frame.columns]
    integer = [pd.api.types.is_integer_dtype(frame[c]) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for idx, row in frame.iterrows():
        numeric = pd.to_numeric(row, errors="coerce").to_numpy(dtype=float)
        best = None
        if bold and idx not in no_bold_rows and np.isfinite(numeric).any():
            best = np.nanmin(numeric) if bold == "min" else np.nanmax(numeric)
        cells = []
        for value, num, is_int in zip(row, numeric, integer):
            if isinstance(value, str):
                cells.append(value)
                continue
            text = format_number(num, 0 if is_int else digits)
            cells.append(f"**{text}**" if best is not None and np.isfinite(num) and np.isclose(num, best) else text)
        lines.append("| " + " | ".join([str(idx)] + cells) + " |")
    return "\n".join(lines) + "\n"


def per_replicate_table(metrics: pd.DataFrame, value: str, methods: Sequence[str]) -> pd.DataFrame:
    """Wide table of ``value``: rows = replicates then ``mean`` and ``sd``, columns = methods.

    Parameters
    ----------
    metrics
        :attr:`~ssa_dask.evaluation.run.BenchmarkResult.metrics`.
    value
        Metric column.
    methods
        Column order.

    Returns
    -------
    pandas.DataFrame
    """
    ok = metrics[metrics["status"] == "ok"]
    wide = ok.pivot_table(index="replicate", columns="method", values=value, aggfunc="mean")
    wide = wide.reindex(index=sorted(metrics["replicate"].unique()), columns=list(methods))
    wide.index = [f"replicate {r}" for r in wide.index]
    summary = pd.DataFrame({"mean": wide.mean(), "sd": wide.std(ddof=1)}).T
    return pd.concat([wide, summary])


def method_status(metrics: pd.DataFrame, methods: Sequence[str]) -> dict[str, str]:
    """One status per method: ``ok``, or ``"<n ok>/<runs> ok (<reasons>)"`` when some runs were not ok.

    Parameters
    ----------
    metrics
        :attr:`~ssa_dask.evaluation.run.BenchmarkResult.metrics`.
    methods
        Methods to report.

    Returns
    -------
    dict
        Method -> status text.
    """
    status = {}
    for m in methods:
        sub = metrics[metrics["method"] == m]
        n_ok = int((sub["status"] == "ok").sum())
        if n_ok == len(sub):
            status[m] = "ok"
        else:
            reasons = "; ".join(sorted(set(sub.loc[sub["status"] != "ok", "reason"].astype(str))))
            status[m] = f"{n_ok}/{len(sub)} ok ({reasons})"
    return status


def runtime_table(metrics: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame:
    """Wall time and peak memory of each method over its successful runs.

    Parameters
    ----------
    metrics
        :attr:`~ssa_dask.evaluation.run.BenchmarkResult.metrics`.
    methods
        Row order (methods without a successful run are left out).

    Returns
    -------
    pandas.DataFrame
        Indexed by method: ``seconds_mean``, ``seconds_sd``, ``peak_memory_mib_mean``,
        ``peak_memory_mib_max`` and ``runs``.
    """
    ok = metrics[metrics["status"] == "ok"]
    runtime = ok.groupby("method").agg(
        seconds_mean=("seconds", "mean"),
        seconds_sd=("seconds", "std"),
        peak_memory_mib_mean=("peak_memory_mib", "mean"),
        peak_memory_mib_max=("peak_memory_mib", "max"),
        runs=("seconds", "size"),
    )
    return runtime.reindex([m for m in methods if m in runtime.index])


def wilcoxon_table(metrics: pd.DataFrame, value: str, methods: Sequence[str]) -> tuple[pd.DataFrame, int]:
    """Paired two-sided Wilcoxon p-values of the per-replicate ``value`` between methods.

    Parameters
    ----------
    metrics
        :attr:`~ssa_dask.evaluation.run.BenchmarkResult.metrics`; only successful runs are used.
    value
        Metric column.
    methods
        Row and column order (methods without a successful run are left out).

    Returns
    -------
    pvalues : pandas.DataFrame
        Method x method, from :func:`ssa_dask.evaluation.metrics.paired_wilcoxon`.
    n_replicates : int
        Replicates with at least one successful run.
    """
    ok = metrics[metrics["status"] == "ok"]
    wide = ok.pivot_table(index="replicate", columns="method", values=value, aggfunc="mean")
    wide = wide[[m for m in methods if m in wide.columns]]
    return paired_wilcoxon(wide), len(wide)
