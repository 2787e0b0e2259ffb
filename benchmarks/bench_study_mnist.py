"""Benchmark: the full MNIST → Fashion-MNIST sweep (docs/study-mnist.md), wall time printed.

    python benchmarks/bench_study_mnist.py --out docs            # the committed sweep
    python benchmarks/bench_study_mnist.py --out /tmp/s --quick  # the reduced sweep of the tests

Not a timed test: it prints the total and the per-stage times (pretraining is cached in the crispedit
home folder after the first run; its time is reported separately) and fails only if the sweep fails.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs", help="folder for study_mnist.json / study_mnist.png")
    ap.add_argument("--quick", action="store_true", help="the reduced sweep (tests)")
    ap.add_argument("--cache-dir", default=None, help="LeNet-5 cache folder (default: crispedit home)")
    ap.add_argument("--budget-s", type=float, default=1800.0, help="print whether the sweep fit this budget")
    args = ap.parse_args()

    from crispedit.study.sweep import run_study

    t0 = time.perf_counter()
    res = run_study(args.out, quick=args.quick, cache_dir=args.cache_dir)
    wall = time.perf_counter() - t0
    t = res["timing"]
    print(f"\nthreads {torch.get_num_threads()}, cpus {t['cpu_count']}, torch {t['torch']}")
    print(f"pretrain      {t['pretrain_s']:8.1f} s  (cached: {t['pretrain_cached']})")
    print(f"features      {t['features_s']:8.1f} s")
    for m, info in t["basis_at_theta0"].items():
        print(f"basis θ0 {m:<22} {info['seconds']:8.1f} s")
    for m, s in t["finetune_s_by_method"].items():
        n = sum(1 for p in res["points"] if p["method"] == m)
        rec = sum(p["recomputes"] for p in res["points"] if p["method"] == m)
        print(f"fine-tune {m:<21} {s:8.1f} s  ({n} runs, {rec} projector recomputations)")
    verdict = "within" if wall <= args.budget_s else "OVER"
    print(f"TOTAL WALL TIME {wall:.1f} s ({wall / 60:.1f} min) — {verdict} the {args.budget_s / 60:.0f}-minute budget")


if __name__ == "__main__":
    main()
