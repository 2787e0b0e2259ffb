"""How saved deltas spread over the kept eigen-coordinates of a curvature cache, beside what a random walk of
Adam's steps would give (lr·√steps per coordinate, from the delta's record).

    python scripts/delta_spread.py --cache runs/cache-L4-6 runs/s300/deltas/*-cf [--out spread.json]

Per target: ‖ΔW‖, the kept coordinates' RMS, the share of ‖ΔW‖² in their largest tenth (0.44 for a Gaussian
spread), and the walk's RMS lr·√steps (a schedule's lr is averaged as √mean(lr²), the walk's own scale).
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from crispedit.curvature.api import Curvature
from crispedit.editing.config import EditConfig
from crispedit.editing.delta import EditDelta
from crispedit.editing.engine import planned_steps, scheduled_lr, spread_of_kept


def walk_rms(record: dict) -> float:
    """√(Σ lr_t²) over the run's steps: the RMS a ±lr-per-step random walk of each coordinate reaches."""
    cfg = EditConfig.from_dict(record["config"], source="the delta's record")
    budget = record.get("lr_schedule", {}).get("budget_steps") or planned_steps(record["training_sequences"], cfg)
    return math.sqrt(sum(scheduled_lr(cfg, t, budget) ** 2 for t in range(record["steps"])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True)
    p.add_argument("deltas", nargs="+")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cur = Curvature.load(args.cache, allow_mismatch=True)
    rows = []
    for path in args.deltas:
        delta = EditDelta.load(path)
        cfg = delta.record["config"]
        projs = cur.projectors(cfg["gamma"], cfg["scope"], kind="kfac", dtype=torch.float64, device="cpu")
        walk = walk_rms(delta.record)
        for n, d in delta.deltas.items():
            d64 = d.double()
            row = {"delta": path, "target": n, "norm": float(d64.norm()), "walk_rms": walk,
                   **spread_of_kept(projs[n].rotate(d64)[projs[n].keep])}
            rows.append(row)
            print(f"{path}  {n}  ‖ΔW‖ {row['norm']:.1f}  kept RMS {row['kept_coordinate_rms']:.3f}  "
                  f"lr·√steps {walk:.3f}  top tenth {row['top_tenth_energy_share']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
