"""How the capability cost and the edits move with the number of facts edited at once: one PNG from committed rows.

    python scripts/scale_figure.py --png docs/results/scale_kl.png \\
        --series "defaults (batch 32, 25 epochs, floor 400 steps)" \\
            docs/results/cpu_defaults_100.json:defaults-subject-last docs/results/cpu_scale300.json:defaults \\
            docs/results/cpu_defaults_1000.json:defaults \\
        --series "batch 96, 400 steps" docs/results/cpu_scale300_batch.json:batch96 ...

Each --series is a label followed by FILE:RUN entries (rows of `scripts/wild_ablation.py` / `ablation_table.py
--json`; only CounterFact rows are read). Left: held-out KL(base‖edited) per token, log scale, against the number
of edits, each segment labelled with its local exponent (KL ∝ n^p between the two runs); right: generated
reliability in the QA context and rephrase generalisation (QA, contains). Each point is
one run, one seed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--series", nargs="+", action="append", required=True, metavar="LABEL FILE:RUN",
                   help="a label, then the rows of that recipe as FILE:RUN")
    p.add_argument("--data", default="cf", help="which data set's rows to read (default cf)")
    p.add_argument("--png", required=True)
    p.add_argument("--title", default="SmolLM2-135M-Instruct, CrispEdit, layers 4-6 down-projections, 200-chunk "
                   "curvature; one seed per point")
    return p.parse_args()


def row(spec: str, data: str) -> dict:
    """The row of run RUN on `data` in FILE (a JSON list or JSONL); a clear error if it is not there."""
    path, name = spec.rsplit(":", 1)
    text = Path(path).read_text()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]
    hits = [r for r in rows if r["run"]["name"] == name and r["data"] == data]
    if not hits:
        raise SystemExit(f"{path}: no row with run name {name!r} on data {data!r}")
    return hits[-1]


def local_exponent(n0: float, k0: float, n1: float, k1: float) -> float:
    """p in KL ∝ n^p through two runs (n0, k0) and (n1, k1): the slope of the segment on log-log axes."""
    return math.log(k1 / k0) / math.log(n1 / n0)


def save_figure(fig, title: str, png: str) -> None:
    """The results figures' common ending: the title, a tight layout, the PNG (its folder made) and one line."""
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main() -> None:
    args = parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_rel) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (label, *specs) in enumerate(args.series):
        pts = sorted((r["n"], r["summary"]) for r in (row(s, args.data) for s in specs))
        n = [p[0] for p in pts]
        color = f"C{i}"
        ax_kl.plot(n, [s["kl_nats_per_token"] for _, s in pts], "o-", color=color, label=label)
        ax_rel.plot(n, [s["reliability_gen_qa"] for _, s in pts], "o-", color=color, label=f"{label}: rel QA")
        ax_rel.plot(n, [s["generalization_gen_qa_contains"] for _, s in pts], "s--", color=color,
                    label=f"{label}: rephrase QA ∋")
        for (n0, s0), (n1, s1) in zip(pts, pts[1:]):
            p = local_exponent(n0, s0["kl_nats_per_token"], n1, s1["kl_nats_per_token"])
            mid = (math.sqrt(n0 * n1), math.sqrt(s0["kl_nats_per_token"] * s1["kl_nats_per_token"]))
            ax_kl.annotate(f"∝ n^{p:.1f}", mid, textcoords="offset points", fontsize=7, color=color,
                           xytext=(-44, 4) if i % 2 == 0 else (6, -12))  # the two series' labels on opposite sides
        for x, s in pts:
            ax_kl.annotate(f"{s['perplexity_increase_pct']:+.0f} %", (x, s["kl_nats_per_token"]),
                           textcoords="offset points", xytext=(4, -10), fontsize=7, color=color)
    ax_kl.set(xscale="log", yscale="log", xlabel="facts edited at once (CounterFact)",
              ylabel="held-out KL(base‖edited), nats/token", title="capability cost (labels: Δ perplexity)")
    ax_rel.set(xscale="log", ylim=(0, 1.02), xlabel="facts edited at once (CounterFact)",
               ylabel="proportion (generated, greedy)", title="edits in the wild")
    for ax in (ax_kl, ax_rel):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    save_figure(fig, args.title, args.png)


if __name__ == "__main__":
    main()
