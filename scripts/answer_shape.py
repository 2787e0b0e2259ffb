"""How do the edited model's answers end? Reads `wild_ablation.py` rows (with per-request generations) and prints,
per run and context, over the edit prompts and their rephrases:

* the mean answer length in words (after the evaluation's stop at a newline, period or end token),
* the share of answers that loop (`crispedit.evaluation.text.looping`; `crispedit eval` reports it too, as
  `*_looping`),
* the share whose answer contains the target but is not an exact match (the answer goes on after the new object).

"Contains the target" alone cannot tell a correct short answer from a loop that repeats the target; a judge (or a
user) can. This is the check that the contains scorer's figures are answers.

    python scripts/answer_shape.py runs/eos/rows100.jsonl [more.jsonl ...]
"""

from __future__ import annotations

import argparse
import json

from crispedit.evaluation.text import looping

CONTEXTS = ("qa", "chat", "raw")


def shape(per_request: list[dict], ctx: str) -> dict:
    answers = [req["reliability"]["generated"][ctx] for req in per_request]
    answers += [g["generated"][ctx] for req in per_request for g in req["generalization"]]
    n = max(len(answers), 1)
    return {"answers": len(answers),
            "mean_words": sum(len(a["generation"].split()) for a in answers) / n,
            "looping": sum(looping(a["generation"]) for a in answers) / n,
            "contains_not_exact": sum(bool(a["contains_match"]) and not a["exact_match"] for a in answers) / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("rows", nargs="+", help="JSONL rows written by wild_ablation.py without --slim")
    args = p.parse_args()
    print("| run | data | context | answers | mean words | looping | contains, not exact |")
    print("|---|---|---|---|---|---|---|")
    for path in args.rows:
        for line in open(path):
            row = json.loads(line)
            if not row.get("per_request"):
                continue
            for ctx in CONTEXTS:
                if ctx not in row["per_request"][0]["reliability"]["generated"]:
                    continue
                s = shape(row["per_request"], ctx)
                print(f"| {row['run']['name']} | {row['data']} | {ctx} | {s['answers']} | {s['mean_words']:.1f} | "
                      f"{s['looping']:.2f} | {s['contains_not_exact']:.2f} |")


if __name__ == "__main__":
    main()
