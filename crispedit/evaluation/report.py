"""Evaluation reports: one JSON per run (a flat `summary` that scripts compare, every metric with its
protocol below it, the run's configuration) plus a short Markdown summary beside it."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from crispedit.errors import CrispEditError
from crispedit.io import atomic_path, write_json, report_paths

REPORT_FORMAT = "crispedit-eval-report"
REPORT_VERSION = 1
# The generation contexts in the order reports list them: the WILD QA context, the chat template, the raw prompt.
GEN_CONTEXT_ORDER = ("qa", "chat", "raw")
HEADLINE_KEYS = ("reliability_gen_qa", "reliability_gen_chat_contains", "reliability_gen_raw",
                 "generalization_gen_qa_contains", "generalization_gen_chat_contains", "generalization_gen_raw",
                 "locality_gen_qa_first_token", "locality_gen_raw_first_token", "perplexity_base",
                 "perplexity_edited", "perplexity_increase_pct", "kl_nats_per_token")


@dataclass
class EvalReport:
    """`summary`: flat name -> number (None when not measured); `summary_protocol`: how each was measured;
    `metrics`: full results ("edit", "capability", "benchmarks"); `config`: the run's configuration
    (method, γ, layers, ...); `eval_config`: the evaluation settings; `meta`: versions, times."""

    summary: dict[str, Any]
    summary_protocol: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    eval_config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False)  # the file it was loaded from (not saved)

    @property
    def label(self) -> str:
        """A short run name for tables and plots: config 'label'/'name', else method and γ."""
        return run_label(self.config, self.source)

    def to_json(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "version": REPORT_VERSION, "summary": self.summary,
                "summary_protocol": self.summary_protocol, "metrics": self.metrics, "config": self.config,
                "eval_config": self.eval_config, "meta": self.meta}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "EvalReport":
        return cls(summary=dict(d["summary"]), summary_protocol=dict(d.get("summary_protocol") or {}),
                   metrics=dict(d.get("metrics") or {}), config=dict(d.get("config") or {}),
                   eval_config=dict(d.get("eval_config") or {}), meta=dict(d.get("meta") or {}))


def run_label(config: Mapping[str, Any], path: str | os.PathLike | None = None) -> str:
    for key in ("label", "name"):
        if config.get(key):
            return str(config[key])
    parts = []
    if config.get("method"):
        parts.append(str(config["method"]))
    if config.get("gamma") is not None:
        parts.append(f"γ={config['gamma']}")
    if parts:
        return " ".join(parts)
    return Path(path).stem if path else "run"


def _get(d: Mapping[str, Any] | None, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return d


def build_report(edit: Mapping[str, Any] | None = None, capability: Mapping[str, Any] | None = None,
                 benchmarks: Mapping[str, Mapping[str, Any]] | None = None, config: Mapping[str, Any] | None = None,
                 eval_config: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None) -> EvalReport:
    """Assemble a report from `evaluate_edits` output, `CapabilityResult.to_json()` and benchmark
    results ({task: result}); the summary lists the generated edit metrics first (per context: exact match, then
    contains/prefix; locality: first token and whole answer against the base), then capability, then the
    teacher-forced figures (`*_tf`)."""
    s: dict[str, Any] = {}
    p: dict[str, str] = {}
    agg = _get(edit, "aggregate") or {}
    # Generated answers first (what a user sees); teacher-forced figures follow with a _tf suffix.
    primary = _get(edit, "protocols", "generated", "judge") or "exact_match"
    contexts = _get(edit, "protocols", "generated", "contexts") or []
    for ctx in sorted(contexts, key=lambda c: GEN_CONTEXT_ORDER.index(c) if c in GEN_CONTEXT_ORDER else 99):
        for kind in ("reliability", "generalization"):
            key = f"{kind}_gen_{ctx}"
            s[key] = _get(agg, kind, "generated", ctx, primary)
            p[key] = f"generated (greedy, {ctx} context), scored by {primary}"
            for scorer, short in (("contains_match", "contains"), ("prefix_match", "prefix")):
                if primary != scorer and _get(agg, kind, "generated", ctx, scorer) is not None:
                    s[f"{key}_{short}"] = _get(agg, kind, "generated", ctx, scorer)
                    p[f"{key}_{short}"] = f"generated (greedy, {ctx} context), scored by {scorer}"
            if _get(agg, kind, "generated", ctx, "looping") is not None:
                s[f"{key}_looping"] = _get(agg, kind, "generated", ctx, "looping")
                p[f"{key}_looping"] = (f"generated ({ctx} context): share of answers in which a three-word sequence "
                                       "occurs three times or more (a loop; contains/prefix would count it)")
        s[f"locality_gen_{ctx}_first_token"] = _get(agg, "locality", "generated", ctx, "first_token_same")
        p[f"locality_gen_{ctx}_first_token"] = (f"generated ({ctx} context): the edited model's first generated "
                                                "token equals the base model's")
        s[f"locality_gen_{ctx}"] = _get(agg, "locality", "generated", ctx, "same_as_base")
        p[f"locality_gen_{ctx}"] = (f"generated ({ctx} context): edited generation equals the base generation "
                                    "(normalised)")
    cap = capability or {}
    s["perplexity_base"] = cap.get("perplexity_base")
    s["perplexity_edited"] = cap.get("perplexity_edited")
    s["kl_nats_per_token"] = cap.get("kl_nats_per_token")
    p["perplexity_base"] = p["perplexity_edited"] = "held-out capability text, exp(mean NLL per predicted token)"
    p["kl_nats_per_token"] = "mean KL(p_base || p_edited) of next-token distributions on the held-out text"
    if s["perplexity_base"] and s["perplexity_edited"] is not None:
        s["perplexity_increase_pct"] = 100.0 * (s["perplexity_edited"] / s["perplexity_base"] - 1.0)
        p["perplexity_increase_pct"] = "100 * (perplexity_edited / perplexity_base - 1)"
    s["reliability_tf"] = _get(agg, "reliability", "teacher_forced", "all_correct")
    p["reliability_tf"] = "teacher-forced: fraction of edit prompts whose target tokens are all the argmax"
    s["generalization_tf"] = _get(agg, "generalization", "teacher_forced", "all_correct")
    p["generalization_tf"] = "teacher-forced: as reliability_tf, on the rephrase prompts (macro over requests)"
    s["locality_tf"] = _get(agg, "locality", "teacher_forced", "agree_all")
    p["locality_tf"] = ("teacher-forced: fraction of locality prompts where the edited model's argmax tokens all "
                        "equal the base model's (on the dataset answer, else the base continuation)")
    for kind, key in (("reliability", "reliability_token_acc"), ("generalization", "generalization_token_acc")):
        v = _get(agg, kind, "teacher_forced", "token_acc")
        if v is not None:
            s[key] = v
            p[key] = f"teacher-forced: mean fraction of target tokens that are the argmax ({kind} prompts)"
    if _get(agg, "locality", "teacher_forced", "agree_token") is not None:
        s["locality_token_agree"] = agg["locality"]["teacher_forced"]["agree_token"]
        p["locality_token_agree"] = "teacher-forced: mean fraction of locality positions whose argmax equals the base's"
    for task, res in (benchmarks or {}).items():
        if "acc" in res:
            s[f"{task}_acc"] = res["acc"]
            s[f"{task}_acc_norm"] = res.get("acc_norm")
            p[f"{task}_acc"] = (f"{task}: log-likelihood MC accuracy (summed option log-prob), "
                                f"n={res.get('n')}, seed={res.get('seed')}")
            p[f"{task}_acc_norm"] = f"{task}: as {task}_acc with per-token mean option log-prob"
        elif "exact_match" in res:
            s[f"{task}_exact_match"] = res["exact_match"]
            p[f"{task}_exact_match"] = (f"{task}: greedy final-number exact match, n={res.get('n')}, "
                                        f"seed={res.get('seed')}")
    if edit is not None:
        s["n_requests"] = _get(edit, "protocols", "n_requests")
        p["n_requests"] = "edit requests evaluated"
    metrics = {"edit": dict(edit) if edit is not None else None,
               "capability": dict(capability) if capability is not None else None,
               "benchmarks": {k: dict(v) for k, v in (benchmarks or {}).items()}}
    full_meta = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **_versions(), **(meta or {})}
    return EvalReport(summary=s, summary_protocol=p, metrics=metrics, config=dict(config or {}),
                      eval_config=dict(eval_config or {}), meta=full_meta)


def _versions() -> dict[str, str]:
    import torch
    import transformers

    import crispedit

    return {"crispedit": crispedit.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


# ---------------------------------------------------------------------------------------------- files

def write_report(report: EvalReport, out_path: str | os.PathLike) -> tuple[Path, Path]:
    """Write the JSON atomically and a Markdown summary beside it (same stem, .md); return both paths."""
    out_path, md_path = report_paths(out_path)  # REPORT.md asked for: the JSON goes to REPORT.json
    write_json(out_path, report.to_json())
    with atomic_path(md_path) as tmp:
        tmp.write_text(report_markdown(report))
    return out_path, md_path


def load_report(path: str | os.PathLike) -> EvalReport:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CrispEditError(f"report not found: {path}") from e
    except json.JSONDecodeError as e:
        raise CrispEditError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict) or d.get("format") != REPORT_FORMAT or not isinstance(d.get("summary"), dict):
        raise CrispEditError(f"{path}: not a crispedit evaluation report (missing 'format' or 'summary')")
    rep = EvalReport.from_json(d)
    rep.source = str(path)
    return rep


def format_value(key: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if not isinstance(v, float):
        return str(v)
    if key.startswith("perplexity") and not key.endswith("pct"):
        return f"{v:.2f}"
    if key.endswith("pct"):
        return f"{v:+.1f}%"
    if key.startswith("kl"):
        return f"{v:.4g}"
    return f"{v:.3f}"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def report_markdown(report: EvalReport) -> str:
    lines = [f"# Evaluation: {report.label}", "", "| metric | value | protocol |", "|---|---|---|"]
    for k, v in report.summary.items():
        lines.append(f"| {k} | {format_value(k, v)} | {_cell(report.summary_protocol.get(k, ''))} |")
    if report.config:
        lines += ["", "## Run configuration", ""]
        lines += [f"- **{k}**: {json.dumps(v, default=str)}" for k, v in report.config.items()]
    if report.eval_config:
        lines += ["", "## Evaluation settings", ""]
        lines += [f"- **{k}**: {json.dumps(v, default=str)}" for k, v in report.eval_config.items()]
    wall = report.meta.get("wall_time_s")
    if wall:
        lines += ["", "## Wall time (s)", ""]
        lines += [f"- {k}: {v:.1f}" for k, v in wall.items() if isinstance(v, (int, float))]
    return "\n".join(lines) + "\n"


def _as_report(r: EvalReport | str | os.PathLike) -> EvalReport:
    return r if isinstance(r, EvalReport) else load_report(r)


def compare_reports(reports: Sequence[EvalReport | str | os.PathLike], keys: Sequence[str] | None = None) -> str:
    """A Markdown table with one column per run and one row per summary metric (headline keys first)."""
    reps = [_as_report(r) for r in reports]
    if not reps:
        raise CrispEditError("no reports to compare")
    labels = [r.label for r in reps]
    for i, lab in enumerate(labels):
        if labels.count(lab) > 1:
            path = reps[i].source
            labels[i] = f"{lab} ({Path(path).stem})" if path else f"{lab} #{i + 1}"
    if keys is None:
        keys = [k for k in HEADLINE_KEYS if any(k in r.summary for r in reps)]
        for r in reps:
            keys += [k for k in r.summary if k not in keys]
    lines = ["| metric | " + " | ".join(_cell(x) for x in labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(format_value(k, r.summary.get(k)) for r in reps) + " |")
    return "\n".join(lines) + "\n"
