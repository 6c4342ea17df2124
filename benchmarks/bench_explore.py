"""What the lazy transport plan (``ssa_dask.open_plan`` / ``ssa_dask.explore``) costs and how well it imputes.

Three measurements (issue 11, "What must be shown"), each written to ``results/explore/<name>.json``:

``heldout``
    Held-out-gene imputation on a shared single-cell-resolution slide, SSA against Tangram on the
    very same split. The slide is cut into grid spots (``ssa_dask.evaluation.simulate.bin_to_spots``, as the
    paper does), half of its cells (seeded) are the scRNA set (``sample_replicates``), and a seeded
    10 % of the genes (among genes expressed in both the cells and the spots) is removed from the
    spots. SSA (``heldout_gene_check``: align on the remaining genes, ``impute`` the held-out ones)
    and Tangram (``pp_adatas`` + ``map_cells_to_space(mode="cells")`` with its defaults, 1000
    epochs, CPU, then ``project_genes``) impute the held-out genes at the spots; the score of a gene
    is the Pearson correlation over spots of the imputed and the measured (spot-mean) values, one
    function for both methods. Tangram's ``project_genes`` returns plan-weighted *sums*
    (``M^T X``); its per-spot *mean* (divided by the spot's mapped cell mass, as SSA's ``impute``)
    is reported too.
``lam-sweep``
    SSA alone on the same split at several ``lam``, and a ceiling for any mapping: each spot's
    mean over the scRNA cells that truly lie in it.
``memory``
    Peak resident memory of ``impute`` as the number of imputed genes grows, on a synthetic atlas
    (``ssa_dask.evaluation.synth``): the data set is aligned once (result in Zarr), then every size runs in a
    fresh subprocess that opens the plan and imputes the first ``n`` genes; the child samples its
    own RSS during ``impute`` (``PeakMemory``) and the parent the child's whole-run peak.
``scale``
    Composition and imputation of 100 genes at ``--cells`` cells (1M by default): synth, align
    (kernel in a Zarr store under ``_work/``), then in a fresh subprocess ``open_plan``,
    ``composition`` and ``impute``, each timed with its peak RSS.

Usage::

    python benchmarks/bench_explore.py heldout --dataset seqfish_mouse_embryo --spot-size 0.2
    python benchmarks/bench_explore.py heldout --dataset xenium_breast_scider --spot-size 400 --log1p
    python benchmarks/bench_explore.py lam-sweep --dataset seqfish_mouse_embryo --spot-size 0.2
    python benchmarks/bench_explore.py memory --genes-sizes 10 100 1000
    python benchmarks/bench_explore.py scale --cells 1000000 --genes 2000 --spots 1000
    python benchmarks/bench_explore.py scale --cells 1000000        # 5,000 genes x 4,000 spots, 16 GB kernel
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from ssa_dask.explore import column_correlation

from _common import REPO_ROOT, RESULTS_DIR, WORK_DIR, PeakMemory, loadavg, print_table, run_child, write_result

DATA_DIR = REPO_ROOT.parent / "shared" / "data"
EXPLORE = "explore"


def summary(correlation: np.ndarray) -> dict[str, float]:
    """Median, quartiles, mean and count of the finite correlations."""
    finite = correlation[np.isfinite(correlation)]
    q1, med, q3 = np.percentile(finite, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "mean": float(finite.mean()),
            "n_genes": int(finite.size), "n_nan": int(correlation.size - finite.size)}


# ----------------------------------------------------------------------------- held-out genes
def prepare_split(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    """Spots of the whole slide, a seeded half of the cells, and the seeded held-out genes."""
    import anndata as ad
    import scipy.sparse as sp

    from ssa_dask.evaluation.simulate import bin_to_spots, sample_replicates

    adata = ad.read_h5ad(DATA_DIR / args.dataset / f"{args.dataset}.h5ad")
    adata.var_names = adata.var_names.astype(str)
    spots, cell_spot = bin_to_spots(adata, spot_size=args.spot_size, log1p=args.log1p)
    (cells,) = sample_replicates(adata, n_replicates=1, fraction=args.fraction, seed=args.seed, log1p=args.log1p,
                                 true_spot=cell_spot)

    def expressed(X: Any) -> np.ndarray:
        X = X.tocsc() if sp.issparse(X) else np.asarray(X)
        nonzero = np.diff(X.indptr) > 0 if sp.issparse(X) else (X != 0).any(axis=0)
        dense = X.toarray() if sp.issparse(X) else X
        return nonzero & (dense.std(axis=0) > 0)

    eligible = np.flatnonzero(expressed(cells.X) & expressed(spots.X))
    n_held = max(1, round(args.heldout_fraction * adata.n_vars))
    rng = np.random.default_rng(args.seed)
    held = sorted(str(g) for g in adata.var_names[rng.choice(eligible, size=n_held, replace=False)])
    return cells, spots, held


def run_ssa(cells: Any, spots: Any, held: list[str], args: argparse.Namespace) -> dict[str, Any]:
    import ssa_dask

    with PeakMemory(interval=0.1) as mem:
        t0 = time.perf_counter()
        check = ssa_dask.heldout_gene_check(cells, spots, held, lam=args.lam)
        seconds = time.perf_counter() - t0
    correlation = column_correlation(check["imputed"].values, check["measured"].values)
    own = check["correlation"].values
    return {"seconds": seconds, "peak_rss_gib": mem.peak_gib, "correlation": correlation,
            "max_abs_diff_vs_heldout_gene_check": float(np.nanmax(np.abs(correlation - own))),
            "n_genes_used": int(check.attrs["n_genes_used"]), "eps": float(check.attrs["eps"]),
            "lam": args.lam}


def run_tangram(cells: Any, spots: Any, held: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Tangram's own pipeline on the same split; returns per-gene correlations of ``project_genes`` (sums) and its per-spot means."""
    import tangram as tg
    import torch

    sc_t = cells.copy()
    sp_t = spots[:, ~spots.var_names.isin(held)].copy()
    measured = spots[:, held].X
    measured = measured.toarray() if hasattr(measured, "toarray") else np.asarray(measured)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        with PeakMemory(interval=0.1) as mem, contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            tg.pp_adatas(sc_t, sp_t, genes=None)
            t_map = time.perf_counter()
            ad_map = tg.map_cells_to_space(sc_t, sp_t, mode="cells", device="cpu", num_epochs=args.epochs,
                                           random_state=args.seed, verbose=False)
            map_seconds = time.perf_counter() - t_map
            genes_sp = tg.project_genes(ad_map, sc_t)
            seconds = time.perf_counter() - t0
    finally:
        root.setLevel(level)
    lower = [g.lower() for g in held]
    projected = np.asarray(genes_sp[:, lower].X, dtype=np.float64)
    mass = np.asarray(ad_map.X, dtype=np.float64).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = projected / mass[:, None]
    if not genes_sp.obs_names.equals(spots.obs_names):
        raise RuntimeError("Tangram reordered the spots")
    return {"seconds": seconds, "map_seconds": map_seconds, "peak_rss_gib": mem.peak_gib,
            "n_training_genes": len(sp_t.uns["training_genes"]), "epochs": args.epochs,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "correlation": column_correlation(projected, measured), "correlation_mean": column_correlation(mean, measured)}


def heldout(args: argparse.Namespace) -> None:
    load = loadavg()
    cells, spots, held = prepare_split(args)
    print(f"{args.dataset}: {cells.n_obs} cells, {spots.n_obs} spots, {spots.n_vars} genes, {len(held)} held out")
    methods = [m for m in ("ssa", "tangram") if m in args.methods]
    out: dict[str, Any] = {}
    for method in methods:
        print(f"  {method} ...", flush=True)
        out[method] = (run_ssa if method == "ssa" else run_tangram)(cells, spots, held, args)
        print(f"  {method}: {out[method]['seconds']:.1f} s, median r {np.nanmedian(out[method]['correlation']):.3f}")
    rows = []
    per_gene = {"gene": held}
    for method, res in out.items():
        for key in ("correlation", "correlation_mean"):
            if key in res:
                label = method if key == "correlation" else f"{method} (per-spot mean)"
                res[key.replace("correlation", "summary")] = s = summary(res[key])
                per_gene[label] = res[key]
                rows.append([label, s["median"], s["q1"], s["q3"], s["mean"], s["n_genes"], res["seconds"],
                             res["peak_rss_gib"]])
    print_table(f"held-out genes, {args.dataset}", ["method", "median r", "q1", "q3", "mean r", "genes", "seconds",
                                                  "peak RSS GiB"], rows)
    if "ssa" in out and "tangram" in out:
        diff = out["ssa"]["correlation"] - out["tangram"]["correlation"]
        out["ssa_minus_tangram"] = {"median_difference": float(np.nanmedian(diff)),
                                    "ssa_better_genes": int((diff > 0).sum()), "tangram_better_genes": int((diff < 0).sum())}
    for res in out.values():
        res.pop("correlation", None)
        res.pop("correlation_mean", None)
    payload = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "n_cells": cells.n_obs,
               "n_spots": spots.n_obs, "n_genes": spots.n_vars, "heldout_genes": held, "results": out,
               "per_gene_correlation": per_gene}
    write_result(f"{EXPLORE}/heldout_{args.dataset}", payload, load)


def true_position_correlation(cells: Any, spots: Any, held: list[str]) -> np.ndarray:
    """Reference: each spot's mean over the scRNA cells that truly lie in it (spots without one left out)."""
    import scipy.sparse as sp

    true_spot = cells.obs["true_spot"].to_numpy()
    counts = np.bincount(true_spot, minlength=spots.n_obs).astype(np.float64)
    indicator = sp.csr_matrix((np.ones(true_spot.size), (true_spot, np.arange(true_spot.size))),
                              shape=(spots.n_obs, true_spot.size))
    X = cells[:, held].X
    with np.errstate(invalid="ignore", divide="ignore"):
        imputed = np.asarray(indicator @ (X.toarray() if hasattr(X, "toarray") else X)) / counts[:, None]
    measured = spots[:, held].X
    return column_correlation(imputed, measured.toarray() if hasattr(measured, "toarray") else measured)


def lam_sweep(args: argparse.Namespace) -> None:
    """SSA alone on the same split at several ``lam`` (Tangram has no such knob to sweep here)."""
    load = loadavg()
    cells, spots, held = prepare_split(args)
    rows, out = [], {}
    for lam in args.lams:
        args.lam = lam
        res = run_ssa(cells, spots, held, args)
        res["summary"] = s = summary(res.pop("correlation"))
        out[str(lam)] = res
        rows.append([lam, res["eps"], s["median"], s["q1"], s["q3"], res["seconds"]])
    print_table(f"SSA held-out genes vs lam, {args.dataset}", ["lam", "eps", "median r", "q1", "q3", "seconds"], rows)
    reference = summary(true_position_correlation(cells, spots, held))
    print(f"true positions of the scRNA cells: median r {reference['median']:.3f} "
          f"(IQR {reference['q1']:.3f}-{reference['q3']:.3f})")
    payload = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "heldout_genes": held, "results": out,
               "true_positions": reference}
    write_result(f"{EXPLORE}/heldout_lam_sweep_{args.dataset}", payload, load)


# ----------------------------------------------------------------------------- memory vs genes
def _synth_dir(args: argparse.Namespace) -> Path:
    return WORK_DIR / f"explore_synth_{args.cells}x{args.genes}_s{args.spots}_d{args.density:g}_seed{args.seed}"


def ensure_synth_and_result(args: argparse.Namespace, storage: str = "auto") -> tuple[Path, dict[str, Any]]:
    """Write the synthetic data set and align it once (both skipped when already there)."""
    data = _synth_dir(args)
    info: dict[str, Any] = {}
    if not (data / "spots.zarr").exists():
        info["synth"] = _run_child(["synth-child", "--data", str(data), "--cells", str(args.cells), "--genes",
                                    str(args.genes), "--spots", str(args.spots), "--density", str(args.density),
                                    "--seed", str(args.seed)], data.parent / f"{data.name}.synth.json")
        print(f"  synth: {info['synth']['seconds']:.1f} s, peak RSS {info['synth']['peak_rss_gib']:.2f} GiB", flush=True)
    if not (data / "result.zarr").exists():
        info["align"] = _run_child(["align-child", "--data", str(data), "--storage", storage],
                                   data.parent / f"{data.name}.align.json")
        print(f"  align: {info['align']['seconds']:.1f} s, peak RSS {info['align']['peak_rss_gib']:.2f} GiB", flush=True)
    return data, info


def _synth_child(args: argparse.Namespace) -> None:
    from ssa_dask.evaluation.synth import SynthParams, write_synth

    params = SynthParams(n_cells=args.cells, n_genes=args.genes, n_spots=args.spots, density=args.density,
                         seed=args.seed)
    t0 = time.perf_counter()
    write_synth(args.data, params, overwrite=True)
    Path(args.result).write_text(json.dumps({"seconds": time.perf_counter() - t0}))


def _align_child(args: argparse.Namespace) -> None:
    import ssa_dask

    data = Path(args.data)
    kernel_path = WORK_DIR / "kernels"
    kernel_path.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ds = ssa_dask.align(str(data / "cells.zarr"), str(data / "spots.zarr"), kernel_storage=args.storage,
                        kernel_path=str(kernel_path))
    seconds = time.perf_counter() - t0
    ssa_dask.write_result(ds, str(data / "result.zarr"), overwrite=True)
    attrs = {k: v for k, v in ds.attrs.items() if k != "column_potential" and not isinstance(v, (list, np.ndarray))}
    Path(args.result).write_text(json.dumps({"seconds": seconds, "attrs": attrs}, default=str))


def _impute_child(args: argparse.Namespace) -> None:
    """Open the plan and impute the first ``--n-impute`` genes (or run the scale steps), timing each step."""
    import psutil

    import ssa_dask

    data = Path(args.data)
    steps: dict[str, Any] = {}

    def step(name: str, fn):
        rss0 = psutil.Process().memory_info().rss
        with PeakMemory(interval=0.05) as mem:
            t0 = time.perf_counter()
            value = fn()
            seconds = time.perf_counter() - t0
        steps[name] = {"seconds": seconds, "rss_before_gib": rss0 / 2**30, "peak_rss_gib": mem.peak_gib,
                       "rss_after_gib": psutil.Process().memory_info().rss / 2**30}
        return value

    plan = step("open_plan", lambda: ssa_dask.open_plan(str(data / "result.zarr"), str(data / "cells.zarr"),
                                                        str(data / "spots.zarr")))
    with plan:
        genes = list(plan.cells.genes[: args.n_impute])
        if args.composition:
            import anndata as ad
            import zarr

            obs = ad.io.read_elem(zarr.open_group(str(data / "cells.zarr"), mode="r")["obs"])
            comp = step("composition", lambda: ssa_dask.composition(plan, obs["cell_type"]))
            steps["composition"]["shape"] = list(comp["fraction"].shape)
        imputed = step("impute", lambda: ssa_dask.impute(plan, genes=genes))
    steps["impute"].update(n_genes=len(genes), finite_fraction=float(np.isfinite(imputed.values).mean()),
                           shape=list(imputed.shape))
    Path(args.result).write_text(json.dumps(steps))


def _run_child(argv: list[str], result: Path) -> dict[str, Any]:
    """Run this script as a child (see ``_common.run_child``); its log lies beside ``result``.

    ``process_peak_rss_gib`` is the whole child's peak; ``peak_rss_gib`` is kept only for children
    that time a single step (their JSON has ``seconds``), where the two coincide.
    """
    out = run_child(__file__, argv, result, result.with_suffix(".log"), interval=0.1)
    out["process_peak_rss_gib"] = out["peak_rss_gib"] if "seconds" in out else out.pop("peak_rss_gib")
    return out


def memory(args: argparse.Namespace) -> None:
    load = loadavg()
    data, prep = ensure_synth_and_result(args)
    rows, runs = [], []
    for n in args.genes_sizes:
        res = _run_child(["impute-child", "--data", str(data), "--n-impute", str(n)],
                         WORK_DIR / "explore" / f"impute_{n}.json")
        runs.append({"n_genes": n, **res})
        imp = res["impute"]
        rows.append([n, imp["seconds"], imp["rss_before_gib"], imp["peak_rss_gib"], imp["peak_rss_gib"] - imp["rss_before_gib"],
                     res["process_peak_rss_gib"]])
        print(f"  {n} genes: {imp['seconds']:.1f} s, impute peak {imp['peak_rss_gib']:.2f} GiB", flush=True)
    print_table("impute: memory vs genes", ["genes", "seconds", "RSS before GiB", "peak GiB", "peak - before GiB",
                                           "child peak GiB"], rows)
    payload = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "prepare": prep, "runs": runs}
    write_result(f"{EXPLORE}/impute_memory", payload, load)


def scale(args: argparse.Namespace) -> None:
    load = loadavg()
    data, prep = ensure_synth_and_result(args, storage="zarr")
    res = _run_child(["impute-child", "--data", str(data), "--n-impute", str(args.n_impute), "--composition"],
                     WORK_DIR / "explore" / f"scale_{args.cells}x{args.genes}_s{args.spots}.json")
    rows = [[name, s["seconds"], s["peak_rss_gib"]] for name, s in res.items() if isinstance(s, dict)]
    print_table(f"scale: {args.cells:,} cells", ["step", "seconds", "peak RSS GiB"], rows)
    payload = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "prepare": prep, "steps": res}
    write_result(f"{EXPLORE}/scale_{args.cells}x{args.genes}_s{args.spots}", payload, load)


# ----------------------------------------------------------------------------- CLI
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def split_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dataset", default="seqfish_mouse_embryo")
        p.add_argument("--spot-size", type=float, default=0.2)
        p.add_argument("--log1p", action="store_true", help="log(1+x) the cells and the spot means (raw counts)")
        p.add_argument("--fraction", type=float, default=0.5, help="share of the slide's cells used as scRNA")
        p.add_argument("--heldout-fraction", type=float, default=0.1)
        p.add_argument("--seed", type=int, default=0)

    h = sub.add_parser("heldout", help="held-out-gene imputation, SSA vs Tangram")
    split_options(h)
    h.add_argument("--lam", type=float, default=0.05)
    h.add_argument("--epochs", type=int, default=1000)
    h.add_argument("--methods", nargs="+", default=["ssa", "tangram"])
    h.set_defaults(func=heldout)

    w = sub.add_parser("lam-sweep", help="SSA alone on the held-out split at several lam")
    split_options(w)
    w.add_argument("--lams", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2])
    w.set_defaults(func=lam_sweep)

    def synth_options(p: argparse.ArgumentParser, cells: int, genes: int = 2000, spots: int = 1000) -> None:
        p.add_argument("--cells", type=int, default=cells)
        p.add_argument("--genes", type=int, default=genes)
        p.add_argument("--spots", type=int, default=spots)
        p.add_argument("--density", type=float, default=0.1)
        p.add_argument("--seed", type=int, default=0)

    m = sub.add_parser("memory", help="peak RSS of impute vs number of genes")
    synth_options(m, 50_000)
    m.add_argument("--genes-sizes", type=int, nargs="+", default=[10, 100, 1000])
    m.set_defaults(func=memory)

    s = sub.add_parser("scale", help="composition + impute(100 genes) at 1M cells")
    synth_options(s, 1_000_000, genes=5000, spots=4000)  # the size of `ssa-dask synth --cells 1000000`
    s.add_argument("--n-impute", type=int, default=100)
    s.set_defaults(func=scale)

    for name, func in (("synth-child", _synth_child), ("align-child", _align_child), ("impute-child", _impute_child)):
        c = sub.add_parser(name)
        synth_options(c, 0)
        c.add_argument("--data", required=True)
        c.add_argument("--result", required=True)
        c.add_argument("--storage", default="auto")
        c.add_argument("--n-impute", type=int, default=10)
        c.add_argument("--composition", action="store_true")
        c.set_defaults(func=func)

    args = ap.parse_args()
    (RESULTS_DIR / EXPLORE).mkdir(parents=True, exist_ok=True)
    args.func(args)


if __name__ == "__main__":
    main()
