"""Figure and tables of the MNIST → Fashion-MNIST sweep (from the JSON written by sweep.run_study).

Every point of the JSON aggregates the runs of several fine-tuning seeds: `mnist_acc` / `fashion_acc` are
{"mean", "std", "min", "max"} and `runs` holds the per-seed records. The frontier ("best Fashion accuracy
while MNIST stays ≥ t") is computed per seed — each seed's own curve — and then summarised over the seeds,
so its spread is the seed-to-seed spread of the quantity the text compares. Differences between methods
are paired by seed (same batch order, same curvature sample).

The sweep's γ grid is coarse where a curve is steep (the K-FAC family between k = 2 and 3), so the frontier
read at the grid points can jump by tens of points when one seed's MNIST accuracy lands just under t. The
*interpolated* frontier reads each seed's curve as the polyline through its (MNIST, Fashion) points in k
order and takes the best Fashion accuracy on it with MNIST ≥ t (grid points and crossings of MNIST = t).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from crispedit.io import atomic_path

STYLE = {
    "hessian": ("Hessian", "tab:red", "o"),
    "ggn": ("Gauss-Newton", "tab:blue", "s"),
    "kfac": ("K-FAC (CrispEdit)", "tab:green", "^"),
    "ekfac": ("EK-FAC", "tab:olive", "v"),
    "activation-covariance": ("activation covariance (Adam-NSCL)", "tab:purple", "D"),
    "ft": ("unconstrained FT", "black", "*"),
}
THRESHOLDS = (0.95, 0.97, 0.98)
PAIRS = (("ggn", "hessian"), ("ggn", "kfac"), ("ggn", "ekfac"), ("ggn", "activation-covariance"),
         ("kfac", "activation-covariance"), ("ekfac", "kfac"), ("hessian", "kfac"))


def _by_method(points: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in points:
        out.setdefault(p["method"], []).append(p)
    for pts in out.values():
        pts.sort(key=lambda p: (p["k"] is None, p["k"] or 0.0))
    return out


def _mean(p: dict, key: str) -> float:
    v = p[key]
    return v["mean"] if isinstance(v, dict) else float(v)


def _std(p: dict, key: str) -> float:
    v = p[key]
    return v["std"] if isinstance(v, dict) else 0.0


# ------------------------------------------------------------------------------------------ frontier

def _seed_frontier(points: list[dict], seed: int, t: float, interpolate: bool = False) -> float | None:
    curve = [(r["mnist_acc"], r["fashion_acc"]) for p in points for r in p["runs"] if r["seed"] == seed]
    vals = [f for m, f in curve if m >= t]
    if interpolate:  # `points` are in k order: add where the polyline crosses MNIST = t
        for (m1, f1), (m2, f2) in zip(curve, curve[1:]):
            if (m1 - t) * (m2 - t) < 0:
                vals.append(f1 + (t - m1) * (f2 - f1) / (m2 - m1))
    return max(vals) if vals else None


def _seeds(result: dict) -> list[int]:
    return sorted({r["seed"] for p in result["points"] for r in p["runs"]})


def frontier(result: dict, thresholds: tuple[float, ...] = THRESHOLDS,
             interpolate: bool = False) -> dict[str, dict[str, dict]]:
    """Per method and threshold t: each seed's best Fashion-MNIST accuracy among its runs with MNIST ≥ t
    (`by_seed`, None where no run qualifies; interpolate: along the seed's curve, see the module docstring)
    and mean / std / min / max over the seeds that reach t."""
    seeds = _seeds(result)
    out: dict[str, dict[str, dict]] = {}
    for method, pts in _by_method(result["points"]).items():
        out[method] = {}
        for t in thresholds:
            by_seed = {str(s): _seed_frontier(pts, s, t, interpolate) for s in seeds}
            vals = [v for v in by_seed.values() if v is not None]
            cell: dict = {"by_seed": by_seed, "seeds_reaching": len(vals), "seeds": len(seeds)}
            if vals:
                cell.update(mean=statistics.fmean(vals), std=statistics.stdev(vals) if len(vals) > 1 else 0.0,
                            min=min(vals), max=max(vals))
            out[method][f"{t:g}"] = cell
    return out


def paired_differences(result: dict, thresholds: tuple[float, ...] = THRESHOLDS,
                       pairs: tuple[tuple[str, str], ...] = PAIRS, interpolate: bool = False) -> dict[str, dict[str, dict]]:
    """Frontier of A minus frontier of B, seed by seed (only seeds where both reach t): mean, std, and
    how many seeds have A ahead."""
    fr = frontier(result, thresholds, interpolate)
    out: dict[str, dict[str, dict]] = {}
    for a, b in pairs:
        if a not in fr or b not in fr:
            continue
        key = f"{a} - {b}"
        out[key] = {}
        for t in thresholds:
            fa, fb = fr[a][f"{t:g}"]["by_seed"], fr[b][f"{t:g}"]["by_seed"]
            diffs = [fa[s] - fb[s] for s in fa if fa[s] is not None and fb.get(s) is not None]
            cell: dict = {"n": len(diffs)}
            if diffs:
                cell.update(mean=statistics.fmean(diffs), std=statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                            a_ahead=sum(d > 0 for d in diffs))
            out[key][f"{t:g}"] = cell
    return out


# ------------------------------------------------------------------------------------------ figure

def sibling_results(folder: str | os.PathLike, current: dict | None = None) -> list[dict]:
    """`current` and every other study_mnist*.json in folder with a different head size, widest first."""
    found: dict[int, dict] = {}
    for path in sorted(Path(folder).glob("study_mnist*.json")):
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        pts = res.get("points") or []
        if "hidden" in res and pts and isinstance(pts[0].get("mnist_acc"), dict):
            found[int(res["hidden"])] = res
    if current is not None:
        found[int(current["hidden"])] = current
    return [found[h] for h in sorted(found, reverse=True)]


def _draw_tradeoff(ax, groups: dict[str, list[dict]], pre: dict | None, legend: bool) -> None:
    for method, pts in groups.items():
        label, color, marker = STYLE.get(method, (method, None, "o"))
        fx = [100 * _mean(p, "fashion_acc") for p in pts]
        my = [100 * _mean(p, "mnist_acc") for p in pts]
        ex = [100 * _std(p, "fashion_acc") for p in pts]
        ey = [100 * _std(p, "mnist_acc") for p in pts]
        if method == "ft":
            ax.errorbar(fx, my, xerr=ex, yerr=ey, fmt=marker, ms=12, color=color, label=label, zorder=5, capsize=3)
        else:
            ax.errorbar(fx, my, xerr=ex, yerr=ey, fmt="-" + marker, color=color, label=label, lw=1.3, ms=4,
                        elinewidth=0.9, capsize=2)
    if pre:
        ax.scatter([100 * pre["fashion_acc"]], [100 * pre["mnist_acc"]], marker="X", s=90, color="gray",
                   label="pretrained (θ0)", zorder=5)
    ax.set_xlabel("Fashion-MNIST test accuracy (%)  — edit efficacy")
    ax.set_ylabel("MNIST test accuracy (%)  — capability kept")
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7, loc="lower left")


def _draw_vs_k(bx, groups: dict[str, list[dict]]) -> None:
    for method, pts in groups.items():
        label, color, marker = STYLE.get(method, (method, None, "o"))
        if method == "ft":
            bx.axhline(100 * _mean(pts[0], "mnist_acc"), color=color, ls=":", lw=1)
            bx.axhline(100 * _mean(pts[0], "fashion_acc"), color=color, ls="--", lw=1)
            continue
        ks = [p["k"] for p in pts]
        bx.errorbar(ks, [100 * _mean(p, "mnist_acc") for p in pts], yerr=[100 * _std(p, "mnist_acc") for p in pts],
                    fmt="-" + marker, color=color, lw=1.3, ms=4, capsize=2, label=label)
        bx.errorbar(ks, [100 * _mean(p, "fashion_acc") for p in pts],
                    yerr=[100 * _std(p, "fashion_acc") for p in pts], fmt="--" + marker, color=color, lw=1, ms=4,
                    mfc="none", capsize=2)
    bx.set_xlabel("k  (γ = 1 − 10^(−k))")
    bx.set_ylabel("test accuracy (%)")
    bx.grid(alpha=0.3)


def plot_study(results: list[dict], path: str | os.PathLike) -> Path:
    """One row per head size: (a) MNIST vs Fashion-MNIST test accuracy, one curve per method (γ grows from
    the bottom right to the top left), mean over seeds with ± 1 std error bars on both axes; (b) the same,
    zoomed on the high-preservation corner; (c) both accuracies against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(results)
    fig, axes = plt.subplots(rows, 3, figsize=(18, 5.4 * rows), squeeze=False)
    for row, res in enumerate(results):
        ax, zx, bx = axes[row]
        groups = _by_method(res["points"])
        pre = res.get("reference", {}).get("pretrained")
        cfg = res.get("config", {})
        n_seeds = len(cfg.get("seeds", [])) or len(_seeds(res))
        tag = (f"{res['hidden']} hidden units, {cfg.get('tuned_parameters', {}).get('count', '?')} weights, "
               f"{n_seeds} seeds")
        _draw_tradeoff(ax, groups, pre, legend=True)
        ax.set_title(f"(a) trade-off — {tag}", fontsize=10)
        _draw_tradeoff(zx, groups, pre, legend=False)
        fmax = max(100 * _mean(p, "fashion_acc") for pts in groups.values() for p in pts)
        zx.set_ylim(93, 100)
        zx.set_xlim(40, fmax + 2)
        zx.set_title("(b) zoom: MNIST ≥ 93 %, Fashion ≥ 40 %  (bars: ± 1 std over seeds)", fontsize=10)
        _draw_vs_k(bx, groups)
        bx.set_title("(c) MNIST (solid), Fashion (dashed) vs k; black: FT", fontsize=10)
    fig.suptitle("LeNet-5 MNIST → Fashion-MNIST: projected fine-tuning of the head (fc2 + fc3 weights)",
                 fontsize=12)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def plot_tradeoff(result: dict, path: str | os.PathLike) -> Path:
    """The figure of one sweep (one row)."""
    return plot_study([result], path)


# ------------------------------------------------------------------------------------------ tables

def _pm(mean: float, std: float, digits: int = 1) -> str:
    return f"{100 * mean:.{digits}f} ± {100 * std:.{digits}f}"


def summarise(result: dict) -> dict:
    """The JSON's `summary`: frontiers (grid and interpolated) and their paired differences."""
    return {"best_fashion_acc_at_mnist_acc": frontier(result),
            "best_fashion_acc_at_mnist_acc_interpolated": frontier(result, interpolate=True),
            "paired_frontier_differences": paired_differences(result),
            "paired_frontier_differences_interpolated": paired_differences(result, interpolate=True)}


def frontier_table(result: dict, thresholds: tuple[float, ...] = THRESHOLDS, interpolate: bool = False) -> str:
    """Markdown: per method, the per-seed frontier as mean ± std over seeds (n/N when not every seed
    reaches the threshold)."""
    fr = frontier(result, thresholds, interpolate)
    rows = ["| method | " + " | ".join(f"MNIST ≥ {100 * t:g} %" for t in thresholds) + " |",
            "|---|" + "---:|" * len(thresholds)]
    for m in STYLE:
        if m not in fr:
            continue
        cells = []
        for t in thresholds:
            c = fr[m][f"{t:g}"]
            if not c["seeds_reaching"]:
                cells.append("—")
            else:
                s = _pm(c["mean"], c["std"])
                cells.append(s if c["seeds_reaching"] == c["seeds"] else f"{s} ({c['seeds_reaching']}/{c['seeds']})")
        rows.append(f"| {STYLE[m][0]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def paired_table(result: dict, thresholds: tuple[float, ...] = THRESHOLDS, interpolate: bool = False) -> str:
    """Markdown: paired frontier differences (points of Fashion accuracy), mean ± std, seeds with A ahead."""
    diffs = paired_differences(result, thresholds, interpolate=interpolate)
    rows = ["| A − B | " + " | ".join(f"MNIST ≥ {100 * t:g} %" for t in thresholds) + " |",
            "|---|" + "---:|" * len(thresholds)]
    for key, cells in diffs.items():
        a, b = key.split(" - ")
        out = []
        for t in thresholds:
            c = cells[f"{t:g}"]
            out.append("—" if not c["n"] else f"{_pm(c['mean'], c['std'])} ({c['a_ahead']}/{c['n']})")
        rows.append(f"| {STYLE[a][0]} − {STYLE[b][0]} | " + " | ".join(out) + " |")
    return "\n".join(rows)


def markdown_table(result: dict) -> str:
    """One row per k, cells 'MNIST / Fashion' mean accuracy (%) with the larger of the two stds."""
    groups = _by_method(result["points"])
    methods = [m for m in STYLE if m in groups and m != "ft"]
    ks = sorted({p["k"] for p in result["points"] if p["k"] is not None})
    head = "| k | γ | " + " | ".join(STYLE[m][0] for m in methods) + " |"
    sep = "|---|---|" + "---|" * len(methods)
    rows = [head, sep]

    def cell(p: dict) -> str:
        s = max(_std(p, "mnist_acc"), _std(p, "fashion_acc"))
        return f"{100 * _mean(p, 'mnist_acc'):.1f} / {100 * _mean(p, 'fashion_acc'):.1f} (±{100 * s:.1f})"

    for k in ks:
        cells = []
        for m in methods:
            p = next((q for q in groups[m] if q["k"] == k), None)
            cells.append("—" if p is None else cell(p))
        rows.append(f"| {k:g} | {1 - 10 ** (-k):.7g} | " + " | ".join(cells) + " |")
    if "ft" in groups:
        rows.append(f"| FT | — | {cell(groups['ft'][0])} (unconstrained) |" + " |" * (len(methods) - 1))
    return "\n".join(rows)


def kept_table(result: dict) -> str:
    """Markdown: mean kept fraction at θ0 (%) per k and method."""
    groups = _by_method(result["points"])
    methods = [m for m in STYLE if m in groups and m != "ft"]
    ks = sorted({p["k"] for p in result["points"] if p["k"] is not None})
    rows = ["| k | " + " | ".join(STYLE[m][0] for m in methods) + " |", "|---|" + "---:|" * len(methods)]
    for k in ks:
        cells = []
        for m in methods:
            p = next((q for q in groups[m] if q["k"] == k), None)
            cells.append("—" if p is None else f"{100 * _mean(p, 'kept_fraction'):.1f}")
        rows.append(f"| {k:g} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Redraw the figure / print the tables from committed JSONs:
    python -m crispedit.study.report docs/study_mnist.json docs/study_mnist_h16.json --png docs/study_mnist.png"""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("jsons", nargs="+")
    ap.add_argument("--png", default=None, help="write the figure (one row per JSON) here")
    ap.add_argument("--update-summary", action="store_true",
                    help="recompute each JSON's `summary` from its points and rewrite the file")
    args = ap.parse_args(argv)
    results = []
    for path in args.jsons:
        res = json.loads(Path(path).read_text())
        if args.update_summary:
            from crispedit.io import write_json

            res["summary"] = summarise(res)
            write_json(Path(path), res)
        results.append(res)
        print(f"\n## {path}: {res.get('hidden')} hidden units\n")
        print(markdown_table(res), "\n")
        for interp in (False, True):
            print(f"frontier{' (interpolated)' if interp else ''}:\n")
            print(frontier_table(res, interpolate=interp), "\n")
            print(paired_table(res, interpolate=interp), "\n")
        print(kept_table(res))
    if args.png:
        plot_study(sorted(results, key=lambda r: -int(r.get("hidden", 0))), args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
