"""Markdown tables of `scripts/wild_ablation.py` results: one row per run, the generated metrics first.

    python scripts/ablation_table.py runs/ablate [more folders or JSONL files] [--data cf] [--json out.json]

Rows are sorted by data set, then in the order they were found (a run name repeated later replaces the earlier).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = [
    ("reliability_gen_qa", "rel QA"), ("reliability_gen_qa_contains", "rel QA ∋"),
    ("reliability_gen_chat_contains", "rel chat ∋"), ("reliability_gen_raw", "rel raw"),
    ("generalization_gen_qa_contains", "gen QA ∋"), ("generalization_gen_chat_contains", "gen chat ∋"),
    ("generalization_gen_raw_contains", "gen raw ∋"),
    ("locality_gen_qa_first_token", "loc QA 1st"), ("locality_gen_chat_first_token", "loc chat 1st"),
    ("locality_gen_raw_first_token", "loc raw 1st"),
    ("locality_gen_qa", "loc QA all"), ("perplexity_increase_pct", "Δppl %"), ("kl_nats_per_token", "KL"),
]


def load(folder: Path) -> list[dict]:
    if folder.suffix == ".json" and folder.is_file():  # the rows a previous --json wrote
        return json.loads(folder.read_text())
    if folder.is_file():  # a JSONL file, one run per line
        return [json.loads(line) for line in folder.read_text().splitlines() if line.strip()]
    out = []
    for p in sorted(folder.glob("*.json")):
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(d, dict) and "summary" in d and "run" in d:
            out.append(d)
    return out


def fmt(key: str, v) -> str:
    if v is None:
        return "–"
    if key == "perplexity_increase_pct":
        return f"{v:+.1f}"
    if key == "kl_nats_per_token":
        return f"{v:.3f}"
    return f"{v:.2f}"


def table(rows: list[dict], data: str | None) -> str:
    rows = [r for r in rows if data is None or r["data"] == data]
    head = ["run", "data", "n"] + [c[1] for c in COLUMNS] + ["steps", "loss", "edit s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["summary"]
        cells = [r["run"]["name"], r["data"], str(r["n"])] + [fmt(k, s.get(k)) for k, _ in COLUMNS]
        loss = r.get("final_loss")
        cells += [str(r.get("steps")), "–" if loss is None else f"{loss:.3f}", f"{r.get('edit_seconds', 0):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folder", nargs="+", help="folders of run JSON files or JSONL files")
    p.add_argument("--data", default=None)
    p.add_argument("--runs", default=None, help="comma list of run names to show, in this order")
    p.add_argument("--json", default=None, help="also write the rows' summaries as JSON")
    a = p.parse_args()
    found: dict = {}
    for f in a.folder:
        for r in load(Path(f)):
            found[(r["data"], r["run"]["name"])] = r
    rows = sorted(found.values(), key=lambda r: r["data"])
    if a.runs:
        order = a.runs.split(",")
        rows = sorted([r for r in rows if r["run"]["name"] in order],
                      key=lambda r: (r["data"], order.index(r["run"]["name"])))
    print(table(rows, a.data))
    if a.json:
        slim = [{"run": r["run"], "data": r["data"], "n": r["n"], "summary": r["summary"], "steps": r.get("steps"),
                 "final_loss": r.get("final_loss"), "edit_seconds": r.get("edit_seconds"),
                 "budget": r.get("budget")} for r in rows]
        Path(a.json).write_text(json.dumps(slim, indent=1) + "\n")


if __name__ == "__main__":
    main()
