"""Bleed or change of manner? Reads `wild_ablation.py` rows (with per-request generations) and prints, per context:

* first-token locality (the neighbour's first generated token is the base model's),
* bleed: the edit's new object appears in the neighbour's generated answer,
* how often the edited and the base model's answers start with the dataset's neighbourhood answer,
* the base and edited models' commonest answer openings (the base often answers the QA context with "" or "A:").

A low first-token locality with low bleed and a higher dataset-answer rate than the base is a change of manner
(the edited model answers where the base did not), not a leaked edit.

    python scripts/locality_manner.py runs/s300/defaults.jsonl [more.jsonl ...]
"""

from __future__ import annotations

import argparse
import collections
import json


def profile(rows: list[dict], ctx: str) -> dict:
    n = bleed = same = ans = ans_base = 0
    opening, opening_base = collections.Counter(), collections.Counter()
    for req in rows:
        target = req["reliability"]["target"].strip().lower()
        for loc in req["locality"]:
            g = loc["generated"][ctx]
            n += 1
            bleed += target in g["generation"].lower()
            same += bool(g["first_token_same"])
            ans += bool(g["answer_prefix_match"])
            ans_base += g["base_generation"].strip().lower().startswith(loc["answer"].strip().lower())
            opening[g["generation"][:20]] += 1
            opening_base[g["base_generation"][:20]] += 1
    return {"neighbours": n, "first_token_locality": same / n, "bleed": bleed / n,
            "answer_start_edited": ans / n, "answer_start_base": ans_base / n,
            "openings_edited": opening.most_common(5), "openings_base": opening_base.most_common(5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rows", nargs="+", help="JSONL files written by wild_ablation.py --jsonl (without --slim)")
    ap.add_argument("--contexts", default="qa,chat,raw")
    a = ap.parse_args()
    for path in a.rows:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if not r.get("per_request"):
                    continue
                print(f"== {path} {r['run'].get('name')} ({r['n']} requests)")
                for ctx in a.contexts.split(","):
                    print(ctx, json.dumps(profile(r["per_request"], ctx)))


if __name__ == "__main__":
    main()
