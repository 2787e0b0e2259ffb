"""One call that evaluates an edited model against its base and returns a report."""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Sequence

from crispedit.config import EvalConfig
from crispedit.data.records import EditRequest
from crispedit.errors import ConfigError
from crispedit.evaluation.benchmarks import gsm8k_exact_match, run_lm_eval, run_mc_benchmark
from crispedit.evaluation.capability import capability_metrics
from crispedit.evaluation.edit_metrics import evaluate_edits
from crispedit.evaluation.judges import Judge
from crispedit.evaluation.report import EvalReport, build_report
from crispedit.errors import CrispEditError
from crispedit.formatting import resolve_contexts
from crispedit.models.runtime import pad_id_of

logger = logging.getLogger(__name__)


def evaluate(edited_model, base_model, tokenizer, requests: Sequence[EditRequest], heldout_sequences: Any = None,
             config: EvalConfig | None = None, run_config: Mapping[str, Any] | None = None,
             judge: Judge | None = None, edited_path: str | None = None) -> EvalReport:
    """Edit metrics, capability metrics and benchmarks of `edited_model`, as an `EvalReport`.

    `base_model=None` evaluates the base itself: locality = 1, KL = 0 and perplexity_edited =
    perplexity_base by definition (the report says so). `heldout_sequences` is a list of token-id
    lists or an object with `.sequences` (and optionally `.describe()`), e.g. a CapabilityCorpus;
    None skips perplexity and KL. `run_config` is the run's configuration, stored in the report.
    `edited_path` is the edited model's folder, needed by `config.lm_eval_tasks` (lm-evaluation-harness reads
    the model from disk).
    """
    cfg = config or EvalConfig()
    if cfg.lm_eval_tasks and edited_path is None:
        raise ConfigError("EvalConfig.lm_eval_tasks: lm-evaluation-harness reads the edited model from a folder",
                          field="lm_eval_tasks", value=cfg.lm_eval_tasks, hint={"edited_path": ...})
    same = base_model is None or base_model is edited_model
    wall: dict[str, float] = {}
    t_all = time.perf_counter()

    edit = None
    if requests:
        t = time.perf_counter()
        try:
            contexts = resolve_contexts(cfg.generated_contexts, tokenizer)
        except ValueError as e:
            raise CrispEditError(str(e)) from None
        edit = evaluate_edits(
            edited_model, tokenizer, requests, None if same else base_model,
            teacher_forced=cfg.teacher_forced, teacher_forced_context=cfg.teacher_forced_context,
            generated_contexts=contexts, judge=judge, max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size, generation_batch_size=cfg.generation_batch_size,
            show_progress=cfg.show_progress)
        wall["edit_metrics"] = time.perf_counter() - t

    capability = None
    if heldout_sequences is not None:
        t = time.perf_counter()
        seqs = getattr(heldout_sequences, "sequences", heldout_sequences)
        res = capability_metrics(edited_model if same else base_model, None if same else edited_model, seqs,
                                 cfg.capability_batch_size, cfg.show_progress, pad_id_of(tokenizer))
        capability = res.to_json()
        describe = getattr(heldout_sequences, "describe", None)
        if callable(describe):
            capability["corpus"] = describe()
        wall["capability"] = time.perf_counter() - t

    benchmarks: dict[str, Any] = {}
    targets = [("", edited_model)] + ([("_base", base_model)] if cfg.benchmarks_on_base and not same else [])
    for suffix, model in targets:
        for task in cfg.benchmarks:
            t = time.perf_counter()
            benchmarks[task + suffix] = run_mc_benchmark(task, model, tokenizer, cfg.benchmark_limit,
                                                         cfg.benchmark_seed, cfg.benchmarks_root, cfg.batch_size,
                                                         cfg.show_progress)
            wall[f"benchmark_{task}{suffix}"] = time.perf_counter() - t
        if cfg.gsm8k:
            t = time.perf_counter()
            benchmarks["gsm8k" + suffix] = gsm8k_exact_match(model, tokenizer, cfg.gsm8k_limit, cfg.benchmark_seed,
                                                             cfg.benchmarks_root,
                                                             batch_size=cfg.generation_batch_size,
                                                             show_progress=cfg.show_progress)
            wall[f"gsm8k{suffix}"] = time.perf_counter() - t
    if cfg.lm_eval_tasks:
        t = time.perf_counter()
        device = str(next(edited_model.parameters()).device)
        benchmarks["lm_eval"] = run_lm_eval(edited_path, cfg.lm_eval_tasks, limit=cfg.benchmark_limit,
                                            batch_size=cfg.batch_size, device=device)
        wall["lm_eval"] = time.perf_counter() - t
    wall["total"] = time.perf_counter() - t_all
    logger.info("evaluation: %s", ", ".join(f"{k} {v:.1f} s" for k, v in wall.items()))

    meta = {"wall_time_s": wall, "base_model_given": not same,
            "judge": getattr(judge, "name", None), "device": str(next(edited_model.parameters()).device)}
    return build_report(edit=edit, capability=capability, benchmarks=benchmarks, config=dict(run_config or {}),
                        eval_config=cfg.to_json(), meta=meta)
