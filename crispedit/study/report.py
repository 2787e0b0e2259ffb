"""Figure and table of the MNIST → Fashion-MNIST sweep (from the JSON written by sweep.run_study)."""

from __future__ import annotations

import os
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


def _by_method(points: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in points:
        out.setdefault(p["method"], []).append(p)
    for pts in out.values():
        pts.sort(key=lambda p: (p["k"] is None, p["k"] or 0.0))
    return out


def _draw_tradeoff(ax, groups: dict[str, list[dict]], pre: dict | None, legend: bool) -> None:
    for method, pts in groups.items():
        label, color, marker = STYLE.get(method, (method, None, "o"))
        fx = [100 * p["fashion_acc"] for p in pts]
        my = [100 * p["mnist_acc"] for p in pts]
        if method == "ft":
            ax.scatter(fx, my, marker=marker, s=160, color=color, label=label, zorder=5)
        else:
            ax.plot(fx, my, marker=marker, color=color, label=label, lw=1.5, ms=5)
    if pre:
        ax.scatter([100 * pre["fashion_acc"]], [100 * pre["mnist_acc"]], marker="X", s=90, color="gray",
                   label="pretrained (θ0)", zorder=5)
    ax.set_xlabel("Fashion-MNIST test accuracy (%)  — edit efficacy")
    ax.set_ylabel("MNIST test accuracy (%)  — capability kept")
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8, loc="lower left")


def plot_tradeoff(result: dict, path: str | os.PathLike) -> Path:
    """Three panels: (a) MNIST test accuracy vs Fashion-MNIST test accuracy, one curve per method (γ grows
    from the bottom right to the top left); (b) the same, zoomed on MNIST ≥ 90 %; (c) both accuracies
    against k, γ = 1 − 10^(−k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _by_method(result["points"])
    pre = result.get("reference", {}).get("pretrained")
    fig, (ax, zx, bx) = plt.subplots(1, 3, figsize=(18, 5.4))
    _draw_tradeoff(ax, groups, pre, legend=True)
    ax.set_title("(a) trade-off, one point per γ = 1 − 10^(−k)")
    _draw_tradeoff(zx, groups, pre, legend=False)
    zx.set_ylim(90, 100)
    zx.set_title("(b) zoom: MNIST ≥ 90 %")
    for method, pts in groups.items():
        label, color, marker = STYLE.get(method, (method, None, "o"))
        if method == "ft":
            bx.axhline(100 * pts[0]["mnist_acc"], color=color, ls=":", lw=1)
            bx.axhline(100 * pts[0]["fashion_acc"], color=color, ls="--", lw=1)
            continue
        ks = [p["k"] for p in pts]
        bx.plot(ks, [100 * p["mnist_acc"] for p in pts], marker=marker, color=color, lw=1.5, ms=4, label=label)
        bx.plot(ks, [100 * p["fashion_acc"] for p in pts], marker=marker, color=color, lw=1, ms=4, ls="--",
                mfc="none")
    bx.set_xlabel("k  (γ = 1 − 10^(−k))")
    bx.set_ylabel("test accuracy (%)")
    bx.set_title("(c) MNIST (solid), Fashion (dashed) vs k; black: FT")
    bx.grid(alpha=0.3)
    cfg = result.get("config", {})
    fig.suptitle(f"LeNet-5 MNIST → Fashion-MNIST: projected fine-tuning of the head "
                 f"({cfg.get('tuned_parameters', {}).get('count', '?')} weights)", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def frontier(result: dict, thresholds: tuple[float, ...] = (0.95, 0.97, 0.98)) -> dict[str, dict[str, float | None]]:
    """Per method, the best Fashion-MNIST accuracy among its points whose MNIST accuracy is ≥ t."""
    out: dict[str, dict[str, float | None]] = {}
    for method, pts in _by_method(result["points"]).items():
        out[method] = {}
        for t in thresholds:
            ok = [p["fashion_acc"] for p in pts if p["mnist_acc"] >= t]
            out[method][f"{t:g}"] = max(ok) if ok else None
    return out


def frontier_table(result: dict, thresholds: tuple[float, ...] = (0.95, 0.97, 0.98)) -> str:
    fr = frontier(result, thresholds)
    rows = ["| method | " + " | ".join(f"best Fashion acc. with MNIST ≥ {100 * t:g} %" for t in thresholds) + " |",
            "|---|" + "---|" * len(thresholds)]
    for m in STYLE:
        if m in fr:
            cells = ["—" if fr[m][f"{t:g}"] is None else f"{100 * fr[m][f'{t:g}']:.1f}" for t in thresholds]
            rows.append(f"| {STYLE[m][0]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def markdown_table(result: dict) -> str:
    """One row per k, columns 'MNIST / Fashion' accuracy (%) per method."""
    groups = _by_method(result["points"])
    methods = [m for m in STYLE if m in groups and m != "ft"]
    ks = sorted({p["k"] for p in result["points"] if p["k"] is not None})
    head = "| k | γ | " + " | ".join(STYLE[m][0] for m in methods) + " |"
    sep = "|---|---|" + "---|" * len(methods)
    rows = [head, sep]
    for k in ks:
        cells = []
        for m in methods:
            p = next((q for q in groups[m] if q["k"] == k), None)
            cells.append("—" if p is None else f"{100 * p['mnist_acc']:.1f} / {100 * p['fashion_acc']:.1f}")
        rows.append(f"| {k:g} | {1 - 10 ** (-k):.7g} | " + " | ".join(cells) + " |")
    if "ft" in groups:
        p = groups["ft"][0]
        rows.append(f"| FT | — | {100 * p['mnist_acc']:.1f} / {100 * p['fashion_acc']:.1f} (unconstrained) |"
                    + " |" * (len(methods) - 1))
    return "\n".join(rows)
