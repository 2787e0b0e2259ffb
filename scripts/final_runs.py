"""The final comparison runs for a chosen recipe: CrispEdit with it, FT (lr 1e-3, FT's best in the README's sweeps)
and Adam-NSCL with the same training contexts, prefixes and layers, and the base model. Prints a runs JSON list for
scripts/wild_ablation.py.

    python scripts/final_runs.py chosen.json > final.json
"""

from __future__ import annotations

import json
import sys

chosen = json.loads(open(sys.argv[1]).read())
recipe = {k: v for k, v in chosen.items() if k not in ("name", "method", "lr", "gamma", "max_kl")}
runs = [
    {"name": "base", "method": "none"},
    dict(chosen, name="crispedit_" + chosen["name"]),
    dict(recipe, name="ft_lr1e-3_" + chosen["name"], method="ft", lr=1e-3),
    dict(recipe, name="nscl_" + chosen["name"], method="adam-nscl"),
]
print(json.dumps(runs, indent=1))
