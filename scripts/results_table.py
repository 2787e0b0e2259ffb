"""Markdown tables for the README's results section from a `scripts/results_counterfact.sh` folder.

Joins each evaluation report (RUNS/<name>.json) with its edit record (RUNS/<name>/delta/delta.json: steps,
final loss, seconds, K-FAC diagnostics) and prints two tables, edit metrics and capability metrics, one row
per run, the base model first.

    python scripts/results_table.py runs [--json runs/results.json] > runs/results.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METHOD_NAMES = {"ft": "FT", "adam-nscl": "Adam-NSCL", "crispedit": "CrispEdit"}
EDIT_COLUMNS = [
    ("reliability", "rel TF"), ("generalization", "gen TF"), ("locality", "loc TF"),
    ("reliability_token_acc", "rel tok"), ("generalization_token_acc", "gen tok"), ("locality_token_agree", "loc tok"),
    ("reliability_gen_raw", "rel gen raw"), ("generalization_gen_raw", "gen gen raw"), ("locality_gen_raw", "loc gen raw"),
    ("reliability_gen_qa", "rel gen QA"), ("generalization_gen_qa", "gen gen QA"), ("locality_gen_qa", "loc gen QA"),
]
CAPABILITY_COLUMNS = [
    ("perplexity_edited", "held-out ppl"), ("perplexity_increase_pct", "Δ ppl"), ("kl_nats_per_token", "KL nats/tok"),
    ("mmlu_acc", "MMLU"), ("mmlu_acc_norm", "MMLU norm"), ("arc_acc", "ARC-C"), ("arc_acc_norm", "ARC-C norm"),
]


def _fmt(key: str, v) -> str:
    if v is None:
        return "–"
    if key == "perplexity_increase_pct":
        return f"{v:+.1f} %"
    if key == "kl_nats_per_token":
        return f"{v:.4f}"
    if key.startswith("perplexity"):
        return f"{v:.2f}"
    if key.startswith(("mmlu", "arc")):
        return f"{v:.3f}"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _reliability_by_chunk(rep: dict, rec: dict | None) -> list[float] | None:
    """Sequential runs: teacher-forced reliability of each chunk's requests, in editing order."""
    if not rec or not rec.get("sequential") or not rec.get("chunks"):
        return None
    per = rep["metrics"]["edit"]["per_request"]
    out, start = [], 0
    for c in rec["chunks"]:
        part = per[start : start + c["n_edits"]]
        out.append(sum(bool(r["reliability"]["teacher_forced"]["all_correct"]) for r in part) / max(len(part), 1))
        start += c["n_edits"]
    return out


def load_runs(folder: Path) -> list[dict]:
    rows = []
    for report in sorted(folder.glob("*.json")):
        rep = json.loads(report.read_text())
        if "summary" not in rep:
            continue
        delta_json = folder / report.stem / "delta" / "delta.json"
        rec = json.loads(delta_json.read_text()) if delta_json.is_file() else None
        rows.append({"name": report.stem, "summary": rep["summary"], "record": rec,
                     "wall": rep.get("meta", {}).get("wall_time_s", {}),
                     "by_chunk": _reliability_by_chunk(rep, rec)})
    # Base first, then by method and γ.
    order = {"ft": 1, "adam-nscl": 2, "crispedit": 3}
    rows.sort(key=lambda r: (0, r["name"]) if r["record"] is None else
              (order.get(r["record"]["config"]["method"], 9), r["record"]["config"]["gamma"],
               r["record"]["config"]["lr"], bool(r["record"].get("sequential")),
               (r["record"].get("chunks") or [{}])[0].get("edit_weight", 1)))
    return rows


def describe(row: dict) -> list[str]:
    rec = row["record"]
    if rec is None:
        return [f"base ({row['name']})", "–", "–", "–", "–", "–", "–"]
    cfg = rec["config"]
    method = cfg["method"]
    gamma = "–" if method == "ft" else f"{cfg['gamma']:g}"
    diag = rec.get("diagnostics", {})
    quad = sum(d.get("kfac_quadratic_form", 0.0) for d in diag.values()) if diag else None
    loss = rec["epoch_losses"][-1] if rec.get("epoch_losses") else rec.get("final_loss")
    name = METHOD_NAMES.get(method, method)
    if rec.get("sequential"):
        chunks = rec.get("chunks") or []
        weight = chunks[0].get("edit_weight", 1) if chunks else 1
        name += f"-Seq ({len(chunks)}×{chunks[0]['n_edits'] if chunks else '?'}, edit weight {weight})"
    return [name, gamma, f"{cfg['lr']:g}", str(rec["steps"]),
            "–" if loss is None else f"{loss:.3f}", "–" if quad is None else f"{quad:.3g}", f"{rec['seconds']:.0f}"]


def table(rows: list[dict], columns: list[tuple[str, str]], lead: list[str], lead_idx: list[int]) -> str:
    head = lead + [c for _, c in columns]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        d = describe(r)
        cells = [d[i] for i in lead_idx] + [_fmt(k, r["summary"].get(k)) for k, _ in columns]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def base_table(folder: Path) -> str:
    """The base model on each data set: how far the edit targets are from what it predicts, and how often it
    answers the locality questions right (the dataset answers), in both protocols."""
    head = ["data set", "n", "rel TF", "rel tok", "rel NLL", "gen TF", "gen tok", "rel gen raw EM/prefix/contains",
            "rel gen QA EM/prefix/contains", "loc answer TF", "loc answer gen raw EM", "loc answer gen QA EM",
            "eval s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for report in sorted(folder.glob("base*.json")):
        rep = json.loads(report.read_text())
        agg = rep["metrics"]["edit"]["aggregate"]
        rel, gen, loc = agg["reliability"], agg["generalization"], agg["locality"]

        def triple(block: dict) -> str:
            return "/".join(f"{block[k]:.2f}" for k in ("exact_match", "prefix_match", "contains_match"))

        out.append("| " + " | ".join([
            report.stem, str(rep["summary"]["n_requests"]),
            f"{rel['teacher_forced']['all_correct']:.2f}", f"{rel['teacher_forced']['token_acc']:.3f}",
            f"{rel['teacher_forced']['target_nll']:.2f}",
            f"{gen['teacher_forced']['all_correct']:.2f}", f"{gen['teacher_forced']['token_acc']:.3f}",
            triple(rel["generated"]["raw"]), triple(rel["generated"]["qa"]),
            f"{loc['teacher_forced']['answer_correct']:.2f}",
            f"{loc['generated']['raw']['answer_exact_match']:.2f}", f"{loc['generated']['qa']['answer_exact_match']:.2f}",
            f"{rep['meta']['wall_time_s']['total']:.0f}",
        ]) + " |")
    return "\n".join(out)


def summaries(folder: Path) -> dict:
    """What the tables show, as JSON: per run its summary, edit configuration and record (no per-step data)."""
    out = {}
    for r in load_runs(folder):
        rec = r["record"]
        out[r["name"]] = {
            "summary": r["summary"],
            "eval_wall_time_s": r["wall"],
            "reliability_by_chunk": r["by_chunk"],
            "edit": None if rec is None else {k: rec[k] for k in ("config", "steps", "epochs", "stopped", "seconds",
                                                                    "diagnostics", "n_requests") if k in rec}
            | {"final_epoch_loss": rec["epoch_losses"][-1] if rec.get("epoch_losses") else rec.get("final_loss"),
               "chunks": rec.get("chunks")},
        }
    return out


def main() -> None:
    args = sys.argv[1:]
    if "--json" in args:
        i = args.index("--json")
        Path(args[i + 1]).write_text(json.dumps(summaries(Path(args[0] if i else "runs")), indent=1) + "\n")
        del args[i : i + 2]
    folder = Path(args[0] if args else "runs")
    print("Base model (TF = teacher-forced all-tokens-correct, tok = token accuracy, NLL = mean target NLL in "
          "nats; generated: exact / prefix / contains match; locality answers = the dataset's answers):\n")
    print(base_table(folder) + "\n")
    rows = [r for r in load_runs(folder) if r["summary"].get("n_requests") and "zsre" not in r["name"]]
    print("Edit metrics (100 CounterFact requests; TF = teacher-forced, all target tokens argmax; tok = token "
          "accuracy; gen = generated, exact match; locality = agreement with the base model):\n")
    print(table(rows, EDIT_COLUMNS, ["method", "γ", "lr", "steps", "final loss"], [0, 1, 2, 3, 4]))
    print("\nCapability (held-out Wikipedia perplexity and KL(base‖edited); 200-question MMLU and ARC-Challenge "
          "samples, log-likelihood accuracy; ½ΔᵀGΔ = predicted capability-loss increase under K-FAC):\n")
    print(table(rows, CAPABILITY_COLUMNS, ["method", "γ", "lr", "½ΔᵀGΔ", "edit s"], [0, 1, 2, 5, 6]))
    seq = [r for r in rows if r.get("by_chunk")]
    if seq:
        print("\nSequential runs: teacher-forced reliability of each chunk's requests at the end (first chunk "
              "edited first):\n")
        n = max(len(r["by_chunk"]) for r in seq)
        print("| run | " + " | ".join(f"chunk {i + 1}" for i in range(n)) + " |")
        print("|" + "---|" * (n + 1))
        for r in seq:
            print(f"| {describe(r)[0]} | " + " | ".join(f"{v:.2f}" for v in r["by_chunk"]) + " |")


if __name__ == "__main__":
    main()
