"""A curvature cache's summary as text: what it holds and what it implies for editing.

It reads only the JSON record (no tensors), so it is cheap for any cache: `Curvature.summary()`,
`crispedit curvature-info`, and the line printed after `crispedit curvature` and `curvature-merge`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crispedit.tables import format_table


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_summary(record: dict[str, Any], path: Path | None = None) -> str:
    """What a cache holds and what it implies for editing, from its JSON record (no tensors needed)."""
    m, coll = record.get("model", {}), record.get("collection", {})
    lines = []
    if path is not None:
        sizes = {f.name: f.stat().st_size for f in path.iterdir() if f.is_file()}
        lines.append(f"cache      {path} (format v{record.get('format_version')}, crispedit "
                     f"{record.get('crispedit_version')}, {sum(sizes.values()) / 1e6:.1f} MB, "
                     f"created {record.get('created', '?')})")
    n_params = m.get("num_parameters") or 0
    size = f"{n_params / 1e6:.1f} M" if n_params >= 1e6 else f"{n_params:,}"
    lines.append(f"model      {m.get('name_or_path')} ({m.get('model_type')}, {size} parameters, {m.get('dtype')}); "
                 f"targeted weights sha256 {str(m.get('weights_sha256'))[:12]}")
    n_mc = coll.get("mc_samples", 1)
    mc = f", {n_mc} sampled label{'s' if n_mc != 1 else ''} per position" if coll.get("labels") == "sampled" else ""
    lines.append(f"labels     {coll.get('labels')}{mc}; statistics in {record.get('stats_dtype', 'float64')}, "
                 f"model in {record.get('model_dtype')}")
    for c in record.get("corpora", []):
        extra = ", new sequences only" if c.get("excluded_previous") else ""
        lines.append(f"corpus     {c.get('source')} ({c.get('split', 'train')} split, held-out fraction "
                     f"{c.get('heldout_fraction')}): {c.get('n_samples')} sequences, {c.get('n_tokens', 0):,} tokens, "
                     f"max length {c.get('max_length')}, seed {c.get('seed')}{extra}; fingerprint "
                     f"{str(c.get('fingerprint'))[:12]}")
    sink = coll.get("sink_tokens", 0)
    sink_note = (f"; the first {sink} position(s) of each sequence kept apart as attention sinks" if sink
                 else "; no sink positions kept apart")
    lines.append(f"tokens     {record.get('n_tokens', 0):,} in A and S{sink_note}")

    kept = record.get("kept", {})
    gammas = list(kept)
    summary = record.get("summary", {})
    headers = ["target", "W (out x in)", "A top-1 %", "with sink %", "sink dirs"] + [f"γ={g}" for g in gammas]
    rows = []
    for t in record.get("targets", []):
        n, s = t["name"], summary.get(t["name"], {})
        row = [n, f"{t['d_out']}x{t['d_in']}", _pct(s.get("A_top1_energy")),
               _pct(s.get("A_top1_energy_if_sink_kept")), s.get("sink_directions_removed", "-")]
        for g in gammas:
            k = kept[g].get(n, {})
            row.append(f"{_pct(k.get('layer', {}).get('kept_fraction'))}/{_pct(k.get('global', {}).get('kept_fraction'))}")
        rows.append(row)
    lines.append("")
    lines.append(format_table(headers, rows))
    lines.append("")
    lines.append("γ=...: % of the weight directions (d_out·d_in) an edit may move in at energy threshold γ, "
                 "threshold per layer / global across the targets.")
    lines.append("A top-1: share of A's trace in its largest eigenvalue with the sink positions kept apart; "
                 "'with sink': if they were in A. Sink directions are never edited.")
    return "\n".join(lines)


__all__ = ["format_summary"]
