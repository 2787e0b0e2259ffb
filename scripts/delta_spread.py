"""How saved deltas spread over the kept eigen-coordinates of a curvature cache, beside what a random walk of
Adam's steps would give (lr·√steps per coordinate, from the delta's record).

    python scripts/delta_spread.py --cache runs/cache-L4-6 runs/s300/deltas/*-cf [--other-cache C] [--out F]
    python scripts/delta_spread.py --cache runs/cache-L4-6 --other-cache runs/cache-L4-6-s800 [--gamma 0.9]


Per target: ‖ΔW‖, the kept coordinates' RMS, the share of ‖ΔW‖² in their largest tenth (0.44 for a Gaussian
spread), and the walk's RMS √(Σ lr_t²) over the run's steps. With `--other-cache` (the same targets, e.g. a
curvature from more text): the share of ‖ΔW‖² that the other cache's projector (same γ, scope) would remove, and the
K-FAC quadratic form ½ΔᵀFΔ under each cache: how much the kept subspace depends on the sample it came from.
With `--other-cache` and no deltas: per target, each cache's kept share and the share of each cache's kept subspace
that the other keeps too (`crispedit.curvature.projector.kept_overlap`, exact).
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from crispedit.curvature.api import Curvature
from crispedit.editing.config import EditConfig
from crispedit.editing.delta import EditDelta
from crispedit.curvature.projector import kept_overlap
from crispedit.editing.engine import kfac_quadratic_form, planned_steps, scheduled_lr, spread_of_kept


def walk_rms(record: dict) -> float:
    """√(Σ lr_t²) over the run's steps: the RMS a ±lr-per-step random walk of each coordinate reaches."""
    cfg = EditConfig.from_dict(record["config"], source="the delta's record")
    budget = record.get("lr_schedule", {}).get("budget_steps") or planned_steps(record["training_sequences"], cfg)
    return math.sqrt(sum(scheduled_lr(cfg, t, budget) ** 2 for t in range(record["steps"])))


def compare_caches(cur: Curvature, other: Curvature, gamma: float) -> list[dict]:
    """Per target: each cache's kept share at γ and the share of each one's kept subspace the other keeps."""
    scope = EditConfig().scope
    a = cur.projectors(gamma, scope, kind="kfac", dtype=torch.float64, device="cpu")
    b = other.projectors(gamma, scope, kind="kfac", dtype=torch.float64, device="cpu")
    rows = []
    for n in a:
        row = {"target": n, "gamma": gamma, "kept_fraction": a[n].kept_fraction,
               "other_kept_fraction": b[n].kept_fraction, "kept_by_other": kept_overlap(a[n], b[n]),
               "other_kept_by_this": kept_overlap(b[n], a[n])}
        print(f"{n}  kept {row['kept_fraction']:.3f} (other {row['other_kept_fraction']:.3f})  of this cache's kept "
              f"subspace the other keeps {row['kept_by_other']:.3f}; of the other's, this keeps "
              f"{row['other_kept_by_this']:.3f}")
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True)
    p.add_argument("deltas", nargs="*")
    p.add_argument("--gamma", type=float, default=EditConfig().gamma, help="γ of the cache-only comparison")
    p.add_argument("--other-cache", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cur = Curvature.load(args.cache, allow_mismatch=True)
    other = Curvature.load(args.other_cache, allow_mismatch=True) if args.other_cache else None
    if not args.deltas and other is None:
        p.error("give deltas, or --other-cache to compare two caches' kept subspaces")
    rows = [] if args.deltas else compare_caches(cur, other, args.gamma)
    for path in args.deltas:
        delta = EditDelta.load(path)
        cfg = delta.record["config"]
        projs = cur.projectors(cfg["gamma"], cfg["scope"], kind="kfac", dtype=torch.float64, device="cpu")
        walk = walk_rms(delta.record)
        other_projs = other.projectors(cfg["gamma"], cfg["scope"], kind="kfac", dtype=torch.float64,
                                       device="cpu") if other else None
        for n, d in delta.deltas.items():
            d64 = d.double()
            row = {"delta": path, "target": n, "norm": float(d64.norm()), "walk_rms": walk,
                   **spread_of_kept(projs[n].rotate(d64)[projs[n].keep]), "kfac_quadratic_form": kfac_quadratic_form(cur, n, d64)}
            line = (f"{path}  {n}  ‖ΔW‖ {row['norm']:.1f}  kept RMS {row['kept_coordinate_rms']:.3f}  "
                    f"√Σlr² {walk:.3f}  top tenth {row['top_tenth_energy_share']:.2f}  "
                    f"½ΔᵀFΔ {row['kfac_quadratic_form']:.4f}")
            if other_projs is not None:
                removed = other_projs[n].removed_part(d64)
                row.update(other_removed_share=float(removed.norm() ** 2 / d64.norm() ** 2),
                           other_kfac_quadratic_form=kfac_quadratic_form(other, n, d64),
                           kept_fraction=projs[n].kept_fraction, other_kept_fraction=other_projs[n].kept_fraction)
                line += (f"  | other cache: kept {row['other_kept_fraction']:.3f} (this {row['kept_fraction']:.3f}), "
                         f"removes {row['other_removed_share']:.3f} of ‖ΔW‖², ½ΔᵀFΔ "
                         f"{row['other_kfac_quadratic_form']:.4f}")
            rows.append(row)
            print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
