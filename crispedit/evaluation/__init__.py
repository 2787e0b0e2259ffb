"""Evaluation: edit metrics (teacher-forced and generated), capability metrics, benchmarks, reports."""

from crispedit.evaluation.benchmarks import (
    MCItem,
    benchmarks_root,
    gsm8k_exact_match,
    load_arc,
    load_gsm8k,
    load_mmlu,
    load_truthfulqa_mc1,
    run_lm_eval,
    run_mc_benchmark,
    sample_items,
    score_multiple_choice,
)
from crispedit.evaluation.capability import CapabilityResult, capability_metrics, kl_divergence, perplexity
from crispedit.evaluation.edit_metrics import evaluate_edits
from crispedit.evaluation.generation import generate_greedy, generate_greedy_ids
from crispedit.evaluation.judges import ExactMatchJudge, HFJudge, Judge, OpenAIJudge, PrefixMatchJudge
from crispedit.evaluation.plots import plot_loss_curves, plot_tradeoff
from crispedit.evaluation.report import EvalReport, build_report, compare_reports, load_report, write_report
from crispedit.evaluation.runner import EvalConfig, evaluate
from crispedit.evaluation.text import contains_match, exact_match, normalize_answer, prefix_match

__all__ = [
    "CapabilityResult", "contains_match", "EvalConfig", "EvalReport", "ExactMatchJudge", "HFJudge", "Judge", "MCItem", "OpenAIJudge",
    "PrefixMatchJudge", "benchmarks_root", "build_report", "capability_metrics", "compare_reports", "evaluate",
    "evaluate_edits", "exact_match", "generate_greedy", "generate_greedy_ids", "gsm8k_exact_match", "kl_divergence",
    "load_arc", "load_gsm8k", "load_mmlu", "load_report", "load_truthfulqa_mc1", "normalize_answer",
    "perplexity", "plot_loss_curves", "plot_tradeoff", "prefix_match", "run_lm_eval", "run_mc_benchmark",
    "sample_items", "score_multiple_choice", "write_report",
]
