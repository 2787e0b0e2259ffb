"""`crispedit demo`: the main job on the embedded defaults, end to end and offline.

SmolLM2-135M-Instruct, the embedded Wikipedia excerpt as capability corpus, a handful of counterfactual edits
(the first CounterFact records from ../shared/data when present, else the ones below). It builds or reuses the
curvature cache, edits with FT (at FT's own best learning rate) and with CrispEdit (the defaults) through the same
loop, evaluates base / FT / CrispEdit in the wild (generated answers in the WILD QA context, through the chat template
and after the raw prompt; rephrases; locality against the base model), prints before/after generations of a few
edits in every context and on a rephrase plus the summary metrics, and writes a report folder (JSON, Markdown, PNG).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from crispedit.config import DemoConfig
from crispedit.data.records import EditRequest, LocalityPrompt

logger = logging.getLogger(__name__)

FALLBACK_EDITS = [
    EditRequest("The Eiffel Tower is located in the city of", "Rome", ground_truth="Paris",
                rephrases=("Where is the Eiffel Tower? It is in the city of",),
                locality=(LocalityPrompt("The Colosseum is located in the city of", "Rome"),)),
    EditRequest("The mother tongue of Danielle Darrieux is", "English", ground_truth="French",
                rephrases=("Danielle Darrieux, a native speaker of",),
                locality=(LocalityPrompt("The mother tongue of Léon Blum is", "French"),)),
    EditRequest("The capital of Canada is", "Toronto", ground_truth="Ottawa",
                rephrases=("Canada's capital city is",),
                locality=(LocalityPrompt("The capital of France is", "Paris"),)),
    EditRequest("Apple A5 was created by", "Google", ground_truth="Apple",
                rephrases=("Apple A5 is developed by",),
                locality=(LocalityPrompt("iPhone was created by", "Apple"),)),
    EditRequest("The official language of Brazil is", "Spanish", ground_truth="Portuguese",
                rephrases=("In Brazil, people officially speak",),
                locality=(LocalityPrompt("The official language of Portugal is", "Portuguese"),)),
]
DEMO_KIND = "demo-report"
COUNTERFACT_CANDIDATES = ("../shared/data/counterfact/counterfact-edit.json",
                          "shared/data/counterfact/counterfact-edit.json")


def find_counterfact() -> Path | None:
    here = Path(__file__).resolve().parents[1]
    for c in COUNTERFACT_CANDIDATES:
        for base in (Path.cwd(), here):
            p = (base / c).resolve()
            if p.is_file():
                return p
    return None


def demo_requests(n: int) -> tuple[list[EditRequest], str]:
    from crispedit.data.readers import load_requests

    p = find_counterfact()
    if p is not None:
        return load_requests(p, limit=n), str(p)
    return FALLBACK_EDITS[:n], "built-in demo edits"


def cached_curvature(model, tok, cfg: DemoConfig, progress: bool = False):
    """Build the demo's curvature cache once (in the crispedit home folder) and reuse it; a cache that is stale
    or of another model (`CrispEditError`, `CacheMismatchError`) is rebuilt."""
    from crispedit.config import CurvatureConfig
    from crispedit.curvature.api import Curvature, collect_curvature
    from crispedit.data.corpus import build_corpus
    from crispedit.errors import CrispEditError
    from crispedit.models.home import crispedit_home
    from crispedit.models.runtime import pad_id_of

    path = crispedit_home() / "caches" / f"demo-smollm2-n{cfg.samples}-L{cfg.max_length}-s{cfg.seed}"
    if (path / "curvature.json").is_file():
        try:
            return Curvature.load(path, model=model), path, True
        except CrispEditError as e:  # CacheMismatchError included
            logger.info("rebuilding the demo's curvature cache %s: %s", path, e)
    corpus = build_corpus(tok, None, n_samples=cfg.samples, max_length=cfg.max_length, seed=cfg.seed)
    cur = collect_curvature(model, corpus, CurvatureConfig(seed=cfg.seed), pad_id=pad_id_of(tok), progress=progress)
    cur.save(path)
    return cur, path, False


def run_demo(cfg: DemoConfig | None = None, progress: bool = False,
             echo: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """The demo end to end; what it says goes to `echo` (default: this module's logger at INFO)."""
    from crispedit.config import EditConfig, EvalConfig
    from crispedit.data.corpus import build_corpus
    from crispedit.editing.run import edit_model
    from crispedit.evaluation.plots import plot_loss_curves, plot_tradeoff
    from crispedit.evaluation.report import HEADLINE_KEYS, compare_reports, write_report
    from crispedit.evaluation.runner import evaluate
    from crispedit.formatting import resolve_contexts
    from crispedit.io import atomic_dir, check_output_folder
    from crispedit.models.loading import EMBEDDED_MODEL, load_model

    cfg = cfg if cfg is not None else DemoConfig()
    echo = echo if echo is not None else logger.info
    t0 = time.perf_counter()
    check_output_folder(cfg.out, True, DEMO_KIND)  # only a previous demo report is ever replaced
    timings: dict[str, float] = {}
    echo(f"crispedit demo: {EMBEDDED_MODEL}, embedded Wikipedia excerpt, {cfg.n_edits} counterfactual edits")
    model, tok = load_model(EMBEDDED_MODEL, device=cfg.device, dtype=cfg.dtype)
    timings["load_model"] = time.perf_counter() - t0
    requests, source = demo_requests(cfg.n_edits)
    echo(f"edits from {source}")

    t = time.perf_counter()
    cur, cache_path, reused = cached_curvature(model, tok, cfg, progress)
    timings["curvature"] = time.perf_counter() - t
    echo(f"curvature cache {'reused' if reused else 'built'}: {cache_path} ({cur.record.get('n_tokens')} tokens, "
         f"{timings['curvature']:.0f} s)")
    heldout = build_corpus(tok, None, n_samples=cfg.heldout_samples, max_length=cfg.max_length, seed=cfg.seed,
                           split="heldout")
    base = copy.deepcopy(model)
    contexts = resolve_contexts(("auto",), tok)
    shown = _shown_prompts(requests[: cfg.show], contexts)
    gens = {"base": _generate(base, tok, shown)}
    ecfg = EvalConfig(generated_contexts=contexts, teacher_forced=True,
                      benchmarks=("mmlu", "arc") if cfg.benchmark_limit else (),
                      benchmark_limit=cfg.benchmark_limit or None, show_progress=progress)
    reports, losses, runs = {}, {}, {}
    reports["base"] = evaluate(base, None, tok, requests, heldout, ecfg, run_config={"label": "base", "method": "base"})
    # Each method at its own learning rate: FT's best in the README's sweeps (1e-3) is far gentler than the lr the
    # projected method needs, so comparing both at one lr would overstate the gap.
    for method, lr in (("ft", cfg.ft_lr), ("crispedit", cfg.lr)):
        t = time.perf_counter()
        ec = EditConfig(method=method, gamma=cfg.gamma, lr=lr, epochs=cfg.epochs, seed=cfg.seed)
        res = edit_model(model, tok, requests, cur, ec, progress=progress)
        timings[f"edit_{method}"] = time.perf_counter() - t
        losses[method] = res.step_losses
        gens[method] = _generate(model, tok, shown)
        t = time.perf_counter()
        label = f"FT lr={lr:g}" if method == "ft" else f"CrispEdit γ={cfg.gamma} lr={lr:g}"
        reports[method] = evaluate(model, base, tok, requests, heldout, ecfg,
                                   run_config=dict(ec.to_json(), label=label))
        timings[f"eval_{method}"] = time.perf_counter() - t
        runs[method] = {"steps": res.steps, "stopped": res.stopped, "final_loss": res.epoch_losses[-1],
                        "diagnostics": res.diagnostics, "training_sequences": res.delta.record.get("training_sequences")}
        res.delta.revert(model)

    rows = [f"| {_md(p['label'])} | {_md(p['target'])} | {_md(gens['base'][i])} | {_md(gens['ft'][i])} | "
            f"{_md(gens['crispedit'][i])} |" for i, p in enumerate(shown)]
    gen_table = "\n".join(["| asked as | new target | base | FT | CrispEdit |", "|---|---|---|---|---|", *rows])
    keys = [k for k in HEADLINE_KEYS if any(r.summary.get(k) is not None for r in reports.values())]
    table = compare_reports(list(reports.values()), keys=keys + ["reliability_tf", "locality_tf"])
    timings["total"] = time.perf_counter() - t0
    out = Path(cfg.out)
    with atomic_dir(out, overwrite=True, kind=DEMO_KIND) as tmp:
        for k, rep in reports.items():
            write_report(rep, tmp / f"{k}.json")
        plot_tradeoff([reports["ft"], reports["crispedit"]], tmp / "tradeoff.png",
                      y_key=("reliability_gen_qa", "locality_gen_qa_first_token"))
        plot_loss_curves(losses, tmp / "edit_loss.png", title="edit loss per step")
        summary = {"model": EMBEDDED_MODEL, "edits": source, "n_edits": len(requests), "config": cfg.to_dict(),
                   "curvature_cache": str(cache_path), "curvature_reused": reused, "timings_s": timings,
                   "runs": runs, "summary": {k: r.summary for k, r in reports.items()},
                   "generations": {"prompts": shown, **gens}}
        (tmp / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "README.md").write_text(
            "# crispedit demo\n\n## Generations (greedy), the edit prompt in each context and a rephrase\n\n"
            f"{gen_table}\n\n## Metrics (generated first; locality against the base model)\n\n{table}\n\nTimings (s): "
            + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + "\n")
    echo("\nGenerations (greedy) — the edit prompt in each context, and a rephrase:\n")
    for i, p in enumerate(shown):
        echo(f"  [{p['label']}] {p['prompt']!r} → target {p['target']!r}")
        for k in ("base", "ft", "crispedit"):
            echo(f"      {k:9s} {gens[k][i]!r}")
    echo("\n" + table)
    echo(f"\nreport folder: {out}/  (README.md, *.json, tradeoff.png, edit_loss.png); total {timings['total']:.0f} s")
    return summary


def _shown_prompts(requests, contexts) -> list[dict[str, str]]:
    """What the demo prints: each shown edit's prompt in every context, then its first rephrase (QA context)."""
    out = []
    for r in requests:
        for ctx in contexts:
            out.append({"label": f"{ctx} prompt", "context": ctx, "prompt": r.prompt, "target": r.target})
        if r.rephrases:
            out.append({"label": "rephrase (qa)", "context": "qa", "prompt": r.rephrases[0], "target": r.target})
    return out


def _generate(model, tok, shown) -> list[str]:
    from crispedit.evaluation.generation import generate_greedy
    from crispedit.formatting import PromptFormat, encode_prompt

    return [generate_greedy(model, tok, [encode_prompt(tok, p["prompt"], PromptFormat(p["context"]))],
                            max_new_tokens=24)[0] for p in shown]


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()
