"""Pick the edit recipe from an ablation grid by a rule fixed before the grid ran (no looking at the results first).

Rule: among the CrispEdit runs measured on every data set, keep those whose held-out perplexity rose by at most
`--max-ppl` % and whose first-token neighbourhood locality (QA context) is at least `--min-locality` on every data
set; among them take the highest score = mean over data sets of the mean of (reliability in the QA context, exact;
reliability through the chat template, contains; generalisation to the rephrase in the QA context, contains).
Ties go to the earlier run in the grid file. If no run passes, the best-scoring run among those within the
perplexity limit is taken (and the output says so). Prints the chosen run as JSON (and writes it with --out).

    python scripts/select_recipe.py runs/grid.jsonl [--out chosen.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SCORE_KEYS = ("reliability_gen_qa", "reliability_gen_chat_contains", "generalization_gen_qa_contains")


def load(path: Path) -> list[dict]:
    if path.is_dir():
        return [json.loads(p.read_text()) for p in sorted(path.glob("*.json"))]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def select(rows: list[dict], max_ppl: float = 5.0, min_locality: float = 0.6,
           method: str = "crispedit") -> tuple[dict | None, list[dict]]:
    by_run: dict[str, dict[str, dict]] = {}
    order: list[str] = []
    for r in rows:
        name = r["run"]["name"]
        if r["run"].get("method", "crispedit") != method:
            continue
        if name not in by_run:
            order.append(name)
        by_run.setdefault(name, {})[r["data"]] = r
    datasets = sorted({r["data"] for r in rows})
    table = []
    for name in order:
        runs = by_run[name]
        if set(runs) != set(datasets):
            continue
        ok_ppl = all((runs[d]["summary"].get("perplexity_increase_pct") or 1e9) <= max_ppl for d in datasets)
        ok_loc = all((runs[d]["summary"].get("locality_gen_qa_first_token") or 0) >= min_locality
                     for d in datasets)
        score = sum(sum(runs[d]["summary"].get(k) or 0 for k in SCORE_KEYS) / len(SCORE_KEYS)
                    for d in datasets) / len(datasets)
        table.append({"name": name, "run": runs[datasets[0]]["run"], "score": score, "ppl_ok": ok_ppl,
                      "locality_ok": ok_loc})
    passing = [t for t in table if t["ppl_ok"] and t["locality_ok"]]
    pool = passing or [t for t in table if t["ppl_ok"]]
    if not pool:
        return None, table
    best = max(pool, key=lambda t: (t["score"], -table.index(t)))
    return dict(best, all_constraints_met=bool(passing)), table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--max-ppl", type=float, default=5.0)
    ap.add_argument("--min-locality", type=float, default=0.6)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    best, table = select(load(Path(a.results)), a.max_ppl, a.min_locality)
    for t in sorted(table, key=lambda t: -t["score"]):
        print(f"{t['name']:>28s} score {t['score']:.3f} ppl_ok {t['ppl_ok']} locality_ok {t['locality_ok']}")
    print(json.dumps(best))
    if a.out and best is not None:
        Path(a.out).write_text(json.dumps(best["run"]) + "\n")


if __name__ == "__main__":
    main()
