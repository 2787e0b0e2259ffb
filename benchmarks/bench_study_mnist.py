"""Benchmark: the full MNIST → Fashion-MNIST sweep (docs/study-mnist.md), wall time printed.

    python benchmarks/bench_study_mnist.py --out docs                  # the paper's head (84), 3 seeds
    python benchmarks/bench_study_mnist.py --out docs --hidden 16      # the small head (second row)
    python benchmarks/bench_study_mnist.py --out /tmp/s --quick        # the reduced sweep of the tests
    python benchmarks/bench_study_mnist.py --solvers                   # eigensolver routes at θ0 (84 units)

Not a timed test: it prints the total and the per-stage times (pretraining is cached in the crispedit
home folder after the first run; its time is reported separately), the machine's load average before and
after (the machine may be shared), and fails only if the sweep fails. `--threads N` runs N worker
processes with one thread each.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def solvers(hidden: int) -> None:
    """Time the exact-curvature routes on the pretrained head at θ0 (curvature sample of seed 0)."""
    from crispedit.study.curvatures import exact_basis
    from crispedit.study.data import load_study_data
    from crispedit.study.lenet import PretrainConfig, features, load_or_pretrain
    from crispedit.study.sweep import Features, full_config

    torch.set_num_threads(1)
    cfg = full_config(hidden)
    d = load_study_data()
    model, _ = load_or_pretrain(d.mnist_train, d.mnist_test, PretrainConfig(hidden=hidden), progress=False)
    pool = Features(features(model, d.mnist_train.images), d.mnist_train.labels, *([torch.empty(0)] * 6))
    x, y = pool.curvature_sample(cfg.curvature_size, 0)
    for kind in ("ggn", "hessian"):
        t = time.perf_counter()
        b = exact_basis(kind, model.head, x, y, (1 - 1e-7,))
        print(f"{kind}: tridiagonal route for k=7 (all γ) {time.perf_counter() - t:.1f} s, live {b.info['n_live']}")
        for k in (0.5, 1, 2, 3, 4):
            g = 1 - 10 ** -k
            r = b.n_removed(g)
            for cap in (None, 10 ** 9):  # the route exact_basis picks; Lanczos forced where it did not
                t = time.perf_counter()
                bl = exact_basis(kind, model.head, x, y, (g,), hint=r, cap=cap)
                print(f"   k={k:<4} r={r:<5} {bl.spectrum.solver:<12} {time.perf_counter() - t:6.1f} s"
                      f"{'  (Lanczos forced)' if cap else ''}")
                if bl.spectrum.solver == "lanczos":
                    break
    print("load average", os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs", help="folder for study_mnist*.json / study_mnist.png")
    ap.add_argument("--quick", action="store_true", help="the reduced sweep (tests)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden units (default 84)")
    ap.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="worker processes (one thread each)")
    ap.add_argument("--cache-dir", default=None, help="LeNet-5 cache folder (default: crispedit home)")
    ap.add_argument("--budget-s", type=float, default=1800.0, help="print whether the sweep fit this budget")
    ap.add_argument("--solvers", action="store_true", help="time the eigensolver routes instead of sweeping")
    args = ap.parse_args()
    if args.solvers:
        solvers(args.hidden or 84)
        return

    from crispedit.study.sweep import run_study

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    res = run_study(args.out, quick=args.quick, cache_dir=args.cache_dir, threads=args.threads,
                    hidden=args.hidden, seeds=args.seeds)
    wall = time.perf_counter() - t0
    t = res["timing"]
    print(f"\nhidden {res['hidden']}, seeds {res['config']['seeds']}, workers {t['workers']} × 1 thread, "
          f"cpus {t['cpu_count']}, torch {t['torch']}")
    print(f"load average before {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f}, after "
          f"{t['load_average_at_end'][0]:.1f} / {t['load_average_at_end'][1]:.1f} / {t['load_average_at_end'][2]:.1f}")
    print(f"pretrain      {t['pretrain_s']:8.1f} s  (cached: {t['pretrain_cached']})")
    print(f"features      {t['features_s']:8.1f} s")
    for key, info in t["basis_at_theta0"].items():
        print(f"basis θ0 {key:<30} {info['seconds']:8.1f} s  {info.get('solver', '')}")
    for m, s in t["finetune_s_by_method"].items():
        n = sum(len(p["runs"]) for p in res["points"] if p["method"] == m)
        rec = sum(r["recomputes"] for p in res["points"] if p["method"] == m for r in p["runs"])
        print(f"fine-tune {m:<21} {s:8.1f} s  ({n} runs, {rec} projector recomputations, "
              f"{t['recompute_s_by_method'][m]:.1f} s of them)")
    print(f"sweep (parallel part) {t['sweep_s']:.1f} s wall; CPU s per worker "
          f"{', '.join(f'{c:.0f}' for c in t['sweep_cpu_s_by_worker'])} (total {t['sweep_cpu_s_total']:.0f}): "
          f"on idle cores ≈ {t['sweep_cpu_s_by_worker'][0] + t['pretrain_s'] + t['features_s']:.0f} s in all")
    verdict = "within" if wall <= args.budget_s else "OVER"
    print(f"TOTAL WALL TIME {wall:.1f} s ({wall / 60:.1f} min) — {verdict} the {args.budget_s / 60:.0f}-minute budget")


if __name__ == "__main__":
    main()
