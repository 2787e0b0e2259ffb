"""Edit metrics — reliability, generalization, locality — under two protocols that are never mixed.

* teacher-forced: the prompt followed by the target tokens is fed in one pass; a target token counts
  as correct when it is the argmax next token after the true prefix. This scaffolds both the content
  and the length of the answer, so it overstates what a user would see (paper §4.2).
* generated (WILD-style): greedy decoding, at most `max_new_tokens`, stopped at newline, period or
  EOS, under a context (raw prompt, the QA context, or the chat template), scored by normalised exact
  match, target-prefix match and, optionally, a judge.

Reliability uses the edit prompt, generalization the rephrases, and locality the locality prompts,
where the edited model is compared with the BASE model (and, where the dataset gives an answer,
also with that answer). Aggregates are macro-averages: the mean over requests of each request's mean
over its prompts (requests without prompts of a kind are left out of that kind).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from crispedit.data.records import EditRequest, check_requests
from crispedit.errors import CrispEditError
from crispedit.evaluation.generation import DEFAULT_STOP_STRINGS, generate_greedy_ids, pad_id_of
from crispedit.evaluation.judges import Judge
from crispedit.evaluation.logprobs import target_predictions
from crispedit.evaluation.text import contains_match, exact_match, looping, prefix_match, truncate_at_stop
from crispedit.formatting import CONTEXTS, PromptFormat, encode_pair, encode_prompt

TF_REFERENCE_NOTE = (
    "teacher-forced locality: positions are the dataset answer's tokens where an answer is given, "
    "else the base model's greedy continuation (same context, up to max_new_tokens, up to and including "
    "the stop); agree_token = fraction of those positions where the edited model's argmax equals the "
    "base model's; agree_all = all positions agree"
)


@dataclass(frozen=True)
class _Prompt:
    """One prompt to score: which request, which kind, and its reference answer (if any)."""

    request: int
    kind: str  # "reliability" | "generalization" | "locality"
    prompt: str
    target: str | None


def teacher_forced_score(argmax: Sequence[int], target_ids: Sequence[int], target_logprobs: Sequence[float]
                         ) -> dict[str, Any]:
    """token_acc = fraction of target tokens that are the argmax; all_correct = every one is;
    target_nll = mean negative log-prob per target token."""
    hits = [int(a == t) for a, t in zip(argmax, target_ids)]
    return {
        "token_acc": sum(hits) / len(hits),
        "all_correct": all(hits),
        "target_nll": -sum(target_logprobs) / len(target_logprobs),
        "n_tokens": len(hits),
    }


def _mean(xs: Sequence[float]) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _macro(per_request: list[list[float]]) -> float | None:
    """Mean over requests (that have values) of the per-request mean."""
    return _mean([_mean(v) for v in per_request if v])


def _validate(requests: Sequence[EditRequest], contexts: Sequence[str], tokenizer) -> None:
    if requests:  # an evaluation without edit requests is allowed (capability only)
        check_requests(requests)
    for i, r in enumerate(requests):
        for j, q in enumerate(r.rephrases):
            if not q.strip():
                raise CrispEditError(f"request {i} (case_id={r.case_id}): field 'rephrases[{j}]' is empty")
        for j, loc in enumerate(r.locality):
            if not loc.prompt.strip():
                raise CrispEditError(f"request {i} (case_id={r.case_id}): field 'locality[{j}].prompt' is empty")
    for c in contexts:
        if c not in CONTEXTS:
            raise CrispEditError(f"unknown generation context {c!r}; expected one of {CONTEXTS}")
        if c == "chat" and getattr(tokenizer, "chat_template", None) is None:
            raise CrispEditError("generation context 'chat' needs a tokenizer with a chat template; "
                                 "use 'raw' or 'qa'")


def _flatten(requests: Sequence[EditRequest]) -> list[_Prompt]:
    items = []
    for i, r in enumerate(requests):
        items.append(_Prompt(i, "reliability", r.prompt, r.target))
        items.extend(_Prompt(i, "generalization", q, r.target) for q in r.rephrases)
        items.extend(_Prompt(i, "locality", loc.prompt, loc.answer if loc.answer and loc.answer.strip() else None)
                     for loc in r.locality)
    return items


def evaluate_edits(edited_model, tokenizer, requests: Sequence[EditRequest], base_model=None, *,
                   teacher_forced: bool = True, teacher_forced_context: str = "raw",
                   generated_contexts: Sequence[str] = ("raw", "qa"), judge: Judge | None = None,
                   max_new_tokens: int = 40, stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS,
                   batch_size: int = 16, generation_batch_size: int = 16,
                   show_progress: bool = False, base_memo: dict | None = None) -> dict[str, Any]:
    """Reliability, generalization and locality of `edited_model` on `requests`.

    `base_model=None` means the model evaluated IS the base: locality against the base is 1 by
    definition (recorded as such, not computed). Returns {"protocols", "aggregate", "per_request"}.

    Teacher-forced targets are `encode_pair(..., add_eos=False)` in `teacher_forced_context` (the
    EOS is not scored: a generated answer may go on after the target). Generated answers are scored
    by exact_match, prefix_match and contains_match (crispedit.evaluation.text) and by `judge` if given
    (reliability and generalization only; locality is judged against the base generation).
    """
    contexts = tuple(generated_contexts)
    _validate(requests, contexts + ((teacher_forced_context,) if teacher_forced else ()), tokenizer)
    items = _flatten(requests)
    pad = pad_id_of(tokenizer)
    same_model = base_model is None or base_model is edited_model
    per_item: list[dict[str, Any]] = [{"prompt": it.prompt} for it in items]
    for it, rec in zip(items, per_item):
        rec["answer" if it.kind == "locality" else "target"] = it.target

    if teacher_forced:
        _teacher_forced(edited_model, base_model, tokenizer, items, per_item, teacher_forced_context,
                        same_model, pad, batch_size, generation_batch_size, max_new_tokens, stop_strings,
                        show_progress)
    for ctx in contexts:
        _generated(edited_model, base_model, tokenizer, items, per_item, ctx, same_model, judge,
                   max_new_tokens, stop_strings, generation_batch_size, show_progress, base_memo)

    scorers = ["exact_match", "prefix_match", "contains_match"] + ([judge.name] if judge is not None else [])
    protocols = {
        "teacher_forced": {"enabled": teacher_forced, "context": teacher_forced_context,
                           "target_eos_scored": False,
                           "headline": "all_correct (every target token is the argmax after the true prefix)",
                           "locality": TF_REFERENCE_NOTE} if teacher_forced else {"enabled": False},
        "generated": {"contexts": list(contexts), "decoding": "greedy", "max_new_tokens": max_new_tokens,
                      "stop": [*stop_strings, "EOS"], "scorers": scorers,
                      "judge": judge.name if judge is not None else None,
                      "locality": "same_as_base = normalised edited generation equals normalised base "
                                  "generation; first_token_same = the first generated token is the base "
                                  "model's; answer_* = scorers against the dataset answer"},
        "aggregation": "macro: mean over requests of the per-request mean over its prompts",
        "base_model": "same model (locality vs base = 1 by definition)" if same_model else "separate base model",
        "n_requests": len(requests),
        "n_prompts": {k: sum(it.kind == k for it in items) for k in ("reliability", "generalization", "locality")},
        "n_requests_with": {k: len({it.request for it in items if it.kind == k})
                            for k in ("reliability", "generalization", "locality")},
    }
    per_request = _per_request(requests, items, per_item)
    aggregate = _aggregate(requests, items, per_item, teacher_forced, contexts, scorers)
    return {"protocols": protocols, "aggregate": aggregate, "per_request": per_request}


def _teacher_forced(edited, base, tokenizer, items, per_item, context, same_model, pad, batch_size,
                    gen_batch_size, max_new_tokens, stop_strings, show_progress) -> None:
    fmt = PromptFormat(context)
    seqs: list[tuple[list[int], list[int]]] = []
    ref_kind: list[str] = []
    # Locality prompts without a dataset answer are scored on the base model's own continuation.
    no_answer = [k for k, it in enumerate(items) if it.kind == "locality" and it.target is None]
    continuations: dict[int, list[int]] = {}
    if no_answer:
        prompt_ids = [encode_prompt(tokenizer, items[k].prompt, fmt) for k in no_answer]
        gens = generate_greedy_ids(base if not same_model else edited, tokenizer, prompt_ids, max_new_tokens,
                                   gen_batch_size, stop_strings, show_progress=show_progress,
                                   desc="base continuations", include_stop=True)
        continuations = dict(zip(no_answer, gens))
    for k, it in enumerate(items):
        if it.target is not None:
            pair = encode_pair(tokenizer, it.prompt, it.target, fmt, add_eos=False)
            seqs.append((pair.prompt_ids, pair.target_ids))
            ref_kind.append("answer")
        else:
            seqs.append((encode_prompt(tokenizer, it.prompt, fmt), continuations[k]))
            ref_kind.append("base_continuation")
    for k, (p, t) in enumerate(seqs):
        if not p or not t:
            it = items[k]
            raise CrispEditError(f"request {it.request}: {it.kind} prompt {it.prompt!r} or its reference "
                                 f"has no tokens")
    loc = [k for k, it in enumerate(items) if it.kind == "locality"]
    edits = [k for k, it in enumerate(items) if it.kind != "locality"]
    # the base model is only needed on the locality prompts (both models see the same batches)
    preds = target_predictions([edited], [seqs[k] for k in edits], pad, batch_size, show_progress)[0]
    for k, (argmax, lps) in zip(edits, preds):
        per_item[k]["teacher_forced"] = teacher_forced_score(argmax, seqs[k][1], lps)
    models = [edited] if same_model else [edited, base]
    loc_preds = target_predictions(models, [seqs[k] for k in loc], pad, batch_size, show_progress,
                                   desc="teacher-forced locality")
    for j, k in enumerate(loc):
        argmax, _ = loc_preds[0][j]
        base_argmax, _ = loc_preds[-1][j]
        _, t = seqs[k]
        agree = [int(a == b) for a, b in zip(argmax, base_argmax)]
        rec = {"reference": ref_kind[k], "n_tokens": len(t),
               "agree_token": 1.0 if same_model else sum(agree) / len(agree),
               "agree_all": True if same_model else all(agree)}
        if ref_kind[k] == "answer":
            rec["answer_correct"] = all(a == x for a, x in zip(argmax, t))
            rec["answer_correct_base"] = all(a == x for a, x in zip(base_argmax, t))
        per_item[k]["teacher_forced"] = rec


def _generate_texts(model, tokenizer, prompt_ids, max_new_tokens, batch_size, stop_strings, show_progress, desc,
                    memo: dict | None = None, memo_key: tuple = ()) -> list[list[int]]:
    """Greedy continuations (token ids, cut at the first stop) of each prompt; `memo` (a dict the caller keeps)
    reuses earlier continuations of the same model on the same prompts (the base model's, across runs)."""
    keys = [memo_key + (tuple(p),) for p in prompt_ids]
    todo = [k for k, key in enumerate(keys) if memo is None or key not in memo]
    fresh = generate_greedy_ids(model, tokenizer, [prompt_ids[k] for k in todo], max_new_tokens, batch_size,
                                stop_strings, show_progress=show_progress, desc=desc)
    if memo is None:
        return fresh
    for k, row in zip(todo, fresh):
        memo[keys[k]] = row
    return [memo[key] for key in keys]


def _as_text(tokenizer, row: list[int], stop_strings) -> str:
    return truncate_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop_strings)


def _generated(edited, base, tokenizer, items, per_item, ctx, same_model, judge, max_new_tokens, stop_strings,
               batch_size, show_progress, base_memo=None) -> None:
    fmt = PromptFormat(ctx)
    prompt_ids = [encode_prompt(tokenizer, it.prompt, fmt) for it in items]
    ids = _generate_texts(edited, tokenizer, prompt_ids, max_new_tokens, batch_size, stop_strings, show_progress,
                          f"generate ({ctx})")
    gens = [_as_text(tokenizer, row, stop_strings) for row in ids]
    loc = [k for k, it in enumerate(items) if it.kind == "locality"]
    if same_model:
        base_ids = {k: ids[k] for k in loc}
    else:
        bi = _generate_texts(base, tokenizer, [prompt_ids[k] for k in loc], max_new_tokens, batch_size, stop_strings,
                             show_progress, f"base generate ({ctx})", base_memo, ("base", ctx, max_new_tokens,
                                                                                  tuple(stop_strings)))
        base_ids = dict(zip(loc, bi))
    for k, it in enumerate(items):
        g = gens[k]
        if it.kind == "locality":
            bg = _as_text(tokenizer, base_ids[k], stop_strings)
            first, base_first = ids[k][:1], base_ids[k][:1]
            rec: dict[str, Any] = {"generation": g, "base_generation": bg,
                                   "same_as_base": True if same_model else exact_match(g, bg),
                                   "first_token_same": True if same_model else first == base_first}
            if it.target is not None:
                rec["answer_exact_match"] = exact_match(g, it.target)
                rec["answer_prefix_match"] = prefix_match(g, it.target)
                rec["answer_exact_match_base"] = exact_match(bg, it.target)
        else:
            rec = {"generation": g, "exact_match": exact_match(g, it.target),
                   "prefix_match": prefix_match(g, it.target), "contains_match": contains_match(g, it.target),
                   "looping": looping(g)}
            if judge is not None:
                rec[judge.name] = float(judge.score(it.prompt, it.target, g))
        per_item[k].setdefault("generated", {})[ctx] = rec


def _per_request(requests, items, per_item) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(requests):
        mine = [(it, rec) for it, rec in zip(items, per_item) if it.request == i]
        rel = next(rec for it, rec in mine if it.kind == "reliability")
        out.append({
            "index": i, "case_id": r.case_id, "subject": r.subject,
            "reliability": rel,
            "generalization": [rec for it, rec in mine if it.kind == "generalization"],
            "locality": [rec for it, rec in mine if it.kind == "locality"],
        })
    return out


def _collect(requests, items, per_item, kind, getter) -> list[list[float]]:
    """Per request, the values of `getter(record)` over its prompts of `kind` (None values dropped)."""
    vals: list[list[float]] = [[] for _ in requests]
    for it, rec in zip(items, per_item):
        if it.kind == kind:
            v = getter(rec)
            if v is not None:
                vals[it.request].append(float(v))
    return vals


def _aggregate(requests, items, per_item, teacher_forced, contexts, scorers) -> dict[str, Any]:
    agg: dict[str, Any] = {}
    for kind in ("reliability", "generalization"):
        block: dict[str, Any] = {}
        n_req = sum(1 for v in _collect(requests, items, per_item, kind, lambda r: 1) if v)
        if teacher_forced:
            block["teacher_forced"] = {
                m: _macro(_collect(requests, items, per_item, kind, lambda r, m=m: r["teacher_forced"][m]))
                for m in ("all_correct", "token_acc", "target_nll")
            } | {"n_requests": n_req}
        block["generated"] = {
            ctx: {s: _macro(_collect(requests, items, per_item, kind,
                                     lambda r, s=s, ctx=ctx: r["generated"][ctx][s]))
                  for s in [*scorers, "looping"]}
            | {"n_requests": n_req}
            for ctx in contexts
        }
        agg[kind] = block
    kind = "locality"
    n_req = sum(1 for v in _collect(requests, items, per_item, kind, lambda r: 1) if v)
    n_ans = sum(1 for v in _collect(requests, items, per_item, kind,
                                    lambda r: 1 if r["answer"] is not None else None) if v)
    block = {}
    if teacher_forced:
        tf = {m: _macro(_collect(requests, items, per_item, kind, lambda r, m=m: r["teacher_forced"].get(m)))
              for m in ("agree_all", "agree_token", "answer_correct", "answer_correct_base")}
        block["teacher_forced"] = tf | {"n_requests": n_req, "n_requests_with_answer": n_ans}
    block["generated"] = {
        ctx: {m: _macro(_collect(requests, items, per_item, kind, lambda r, m=m, ctx=ctx: r["generated"][ctx].get(m)))
              for m in ("same_as_base", "first_token_same", "answer_exact_match", "answer_prefix_match",
                        "answer_exact_match_base")}
        | {"n_requests": n_req, "n_requests_with_answer": n_ans}
        for ctx in contexts
    }
    agg[kind] = block
    return agg

