"""PNG plots where a picture says more than a table: edit success against capability change across
runs (methods, γ values), and per-edit / per-step loss curves. Matplotlib's Agg canvas, no display."""

from __future__ import annotations

import math

import os
from pathlib import Path
from typing import Mapping, Sequence

from crispedit.evaluation.report import EvalReport, _as_report
from crispedit.io import atomic_path


def _figure(figsize: tuple[float, float]):
    """A figure on its own Agg canvas: no pyplot state, no change to the user's backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_png: str | os.PathLike) -> Path:
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return out_png


def _spread_x(ax, xs: Sequence[float]) -> None:
    """Symmetric-log x axis when the values span more than two decades (one damaging run would otherwise
    squeeze every careful one against zero)."""
    pos = [abs(x) for x in xs if x != 0]
    if len(pos) >= 2 and max(pos) > 100 * min(pos):
        ax.set_xscale("symlog", linthresh=10 ** math.floor(math.log10(min(pos))))


def plot_tradeoff(reports: Sequence[EvalReport | str | os.PathLike], out_png: str | os.PathLike,
                  y_key: str | Sequence[str] = "reliability_gen_qa",
                  x_keys: Sequence[str] = ("perplexity_increase_pct", "kl_nats_per_token"),
                  labels: Sequence[str] | None = None, title: str | None = None) -> Path:
    """One panel per (edit metric in `y_key`, capability-change metric in `x_keys`), one labelled point per run.

    Runs of the same method share a colour and are joined in γ order (a sweep reads as a curve).
    Runs lacking a metric are left out of that panel (not plotted at zero).
    """
    y_keys = [y_key] if isinstance(y_key, str) else list(y_key)
    reps = [_as_report(r) for r in reports]
    names = list(labels) if labels is not None else [r.label for r in reps]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(reps):
        groups.setdefault(str(r.config.get("method") or names[i]), []).append(i)
    fig = _figure((5.2 * len(x_keys), 4.2 * len(y_keys)))
    axes = fig.subplots(len(y_keys), len(x_keys), squeeze=False)
    for row, yk in zip(axes, y_keys):
        for ax, xk in zip(row, x_keys):
            for gi, (method, idx) in enumerate(groups.items()):
                pts = [(reps[i].config.get("gamma"), reps[i].summary.get(xk), reps[i].summary.get(yk), names[i])
                       for i in idx]
                pts = [p for p in pts if p[1] is not None and p[2] is not None]
                if not pts:
                    continue
                if all(isinstance(p[0], (int, float)) for p in pts):
                    pts.sort(key=lambda p: p[0])
                color = f"C{gi % 10}"
                ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", ms=6, lw=1 if len(pts) > 1 else 0,
                        color=color, label=method)
                for _, x, y, name in pts:
                    ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
            _spread_x(ax, [float(r.summary[xk]) for r in reps if isinstance(r.summary.get(xk), (int, float))])
            ax.set_xlabel(xk.replace("_", " "))
            ax.set_ylabel(yk.replace("_", " "))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(title or f"{' and '.join(y_keys)} vs capability change")
    return _save(fig, out_png)


def plot_loss_curves(losses: Mapping[str, Sequence[float]] | Sequence[Sequence[float]], out_png: str | os.PathLike,
                     xlabel: str = "step", ylabel: str = "loss", title: str | None = None,
                     log_y: bool = True) -> Path:
    """Loss curves: a mapping name -> values, or a list of per-edit curves (drawn thin, with their mean
    in bold when there are more than 10). Log scale when every value is positive and `log_y`."""
    curves = dict(losses) if isinstance(losses, Mapping) else {f"edit {i}": list(c) for i, c in enumerate(losses)}
    fig = _figure((6.4, 4.2))
    ax = fig.subplots()
    many = len(curves) > 10
    for name, ys in curves.items():
        ys = [float(y) for y in ys]
        if many:
            ax.plot(range(len(ys)), ys, lw=0.6, alpha=0.35, color="tab:blue")
        else:
            ax.plot(range(len(ys)), ys, lw=1.5, label=str(name))
    if many:
        n = max(len(c) for c in curves.values())
        mean = []
        for t in range(n):
            vals = [float(c[t]) for c in curves.values() if len(c) > t]
            mean.append(sum(vals) / len(vals))
        ax.plot(range(n), mean, lw=2.2, color="black", label=f"mean of {len(curves)}")
    values = [float(y) for c in curves.values() for y in c]
    if log_y and values and min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if curves:
        ax.legend(fontsize=8)
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    return _save(fig, out_png)
