"""Every method's edit against its capability cost, one panel per batch size: one PNG from committed rows.

    python scripts/method_figure.py --png docs/results/methods_tradeoff.png \\
        --point CrispEdit docs/results/cpu_defaults_100.json:defaults-subject-last \\
        --point MEMIT docs/results/cpu_memit_wild_cf100.json:memit \\
        --point CrispEdit docs/results/cpu_k1000_batch96_steps400.json:b96-s400 ...

Each --point is a method label and one FILE:RUN row (`scripts/wild_ablation.py` records; CounterFact rows by
default). Points are grouped into panels by the row's number of edits. x: held-out KL(base‖edited) per token (log);
y: generated reliability in the QA context (filled) and rephrase generalisation in the QA context, contains
(hollow), joined by a line, so a method that is up and to the left edits more for less. A method's label is
coloured the same in every panel. One seed per point.
"""

from __future__ import annotations

import argparse

from scale_figure import row, save_figure  # the scale figure's row reader and ending (scripts/ is on sys.path when run)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--point", nargs=2, action="append", required=True, metavar=("LABEL", "FILE:RUN"),
                   help="a method label and its row as FILE:RUN")
    p.add_argument("--data", default="cf", help="which data set's rows to read (default cf)")
    p.add_argument("--png", required=True)
    p.add_argument("--title", default="SmolLM2-135M-Instruct, CounterFact dev, generated answers (greedy); "
                   "one seed per point")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    points = [(label, row(spec, args.data)) for label, spec in args.point]  # every row found before plotting
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    sizes = sorted({r["n"] for _, r in points})
    colors = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(label for label, _ in points))}
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4.2), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for label, r in points:
            if r["n"] != n:
                continue
            s, c = r["summary"], colors[label]
            kl, rel, gen = s["kl_nats_per_token"], s["reliability_gen_qa"], s["generalization_gen_qa_contains"]
            ax.plot([kl, kl], [gen, rel], "-", color=c, alpha=0.5)
            ax.plot(kl, rel, "o", color=c)
            ax.plot(kl, gen, "o", color=c, markerfacecolor="none")
            ax.annotate(label, (kl, rel), textcoords="offset points", xytext=(5, 3), fontsize=7, color=c)
        judged = sorted({r.get("n_judged", r["n"]) for _, r in points if r["n"] == n})
        ax.set(xscale="log", ylim=(-0.02, 1.05), xlabel="held-out KL(base‖edited), nats/token (log)",
               ylabel="proportion: rel QA (●), rephrase QA ∋ (○)",
               title=f"{n:,} edits at once (judged: {', '.join(map(str, judged))})")
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.margins(x=0.2)  # room for the labels of the rightmost points
        lo, hi = ax.get_xlim()
        if hi / lo < 10:  # under a decade the major ticks alone leave the axis unlabelled
            ax.xaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
            ax.tick_params(axis="x", which="minor", labelsize=6)
        else:
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(alpha=0.3, which="both")
    save_figure(fig, args.title, args.png)


if __name__ == "__main__":
    main()
