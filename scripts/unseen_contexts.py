"""Do edits hold under prompt formats they were never trained in? Generated answers of a saved edit under
templates outside the training contexts (raw, the WILD QA context, the chat template with its default system
prompt, model-written prefixes), against the base model.

A scorer written apart from this project will not phrase its questions exactly as the training contexts do. This
asks each edit prompt and its rephrases under a few common formats — another QA wording, a one-shot QA prompt,
the chat template with a system prompt of its own, the chat template around the WILD QA context — and scores
greedy answers with the same "contains the target" scorer and the same first-token locality as `crispedit eval`.
The trained contexts are measured beside them as the reference.

    python scripts/unseen_contexts.py --delta runs/ctx/deltas/defaults-cf \
        --data ../shared/data/counterfact/counterfact-edit.json:100 --out runs/ctx/unseen.json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch

from crispedit.data.readers import load_requests
from crispedit.editing.delta import EditDelta, materialize
from crispedit.evaluation.generation import DEFAULT_STOP_STRINGS, generate_greedy_ids
from crispedit.evaluation.text import contains_match, truncate_at_stop
from crispedit.formatting import QA_CONTEXT
from crispedit.models.loading import load_model
from crispedit.models.targets import target_weight

SYSTEM = "You are a concise assistant. Answer with a few words."


def chat(tok, user: str, system: str | None = None) -> str:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def formats(tok) -> dict[str, tuple[Callable[[str], str], bool, bool]]:
    """name -> (render, uses the chat template, trained in). Raw-prompt formats add the tokenizer's special
    tokens; a rendered chat template already has them."""
    return {
        "qa (trained)": (lambda q: QA_CONTEXT.format(q=q), False, True),
        "chat (trained)": (lambda q: chat(tok, q), True, True),
        "raw (trained)": (lambda q: q, False, True),
        "question/answer": (lambda q: f"Question: {q}\nAnswer:", False, False),
        "one-shot QA": (lambda q: f"Q: What is the capital of France?\nA: Paris\n\nQ: {q}\nA:", False, False),
        "chat, own system prompt": (lambda q: chat(tok, q, SYSTEM), True, False),
        "chat around the QA context": (lambda q: chat(tok, QA_CONTEXT.format(q=q)), True, False),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--delta", required=True)
    p.add_argument("--data", required=True, help="PATH:N (the requests the delta was trained on)")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--neighbours", type=int, default=2, help="neighbourhood prompts per request, at most")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first LIMIT of the trained requests only")
    p.add_argument("--formats", default=None, help="comma list of format names to run (default: all)")
    p.add_argument("--with-trained", action="store_true", help="also the trained contexts (crispedit eval has them)")
    p.add_argument("--answers", action="store_true", help="keep the edited model's answers to the edit prompts")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path, _, n = args.data.rpartition(":")
    requests = load_requests(path, limit=int(n))
    model, tok = load_model(args.model)
    delta = EditDelta.load(args.delta)
    if delta.record.get("n_requests") not in (None, len(requests)):
        raise SystemExit(f"{args.delta}: trained on {delta.record['n_requests']} requests, --data gives "
                         f"{len(requests)}")
    requests = requests[:args.limit] if args.limit else requests
    base = {n_: target_weight(model, n_).detach().clone() for n_ in delta.targets}
    edited = {n_: materialize(b, delta.deltas[n_].to(b.dtype)) for n_, b in base.items()}

    def use(weights) -> None:
        with torch.no_grad():
            for n_, w in weights.items():
                target_weight(model, n_).copy_(w)

    edits = [(i, r.prompt, r.target) for i, r in enumerate(requests)]
    rephrases = [(i, q, r.target) for i, r in enumerate(requests) for q in r.rephrases]
    neighbours = [(i, lp.prompt) for i, r in enumerate(requests) for lp in r.locality[:args.neighbours]]
    rows: dict = {"delta": args.delta, "data": args.data, "system_prompt": SYSTEM, "neighbours": args.neighbours,
                  "scorers": "reliability/rephrase: the greedy answer contains the target (macro over requests); "
                             "locality: the first generated token is the base model's", "formats": {}}
    for name, (render, is_chat, trained) in formats(tok).items():
        if (trained and not args.with_trained) or (args.formats and name not in args.formats.split(",")):
            continue
        t0 = time.perf_counter()

        def gen(texts: list[str]) -> list[list[int]]:
            ids = [tok(render(t), add_special_tokens=not is_chat)["input_ids"] for t in texts]
            return generate_greedy_ids(model, tok, ids, batch_size=args.batch)

        def text(row: list[int]) -> str:
            return truncate_at_stop(tok.decode(row, skip_special_tokens=True), DEFAULT_STOP_STRINGS)

        def macro(items, answers) -> float:  # mean over requests of the per-request mean (as crispedit eval)
            per: dict[int, list[float]] = {}
            for (i, _, target), a in zip(items, answers):
                per.setdefault(i, []).append(float(contains_match(text(a), target)))
            return sum(sum(v) / len(v) for v in per.values()) / max(len(per), 1)

        res: dict = {"trained": trained}
        for who, weights in (("base", base), ("edited", edited)):
            use(weights)
            answers = gen([q for _, q, _ in edits])
            res[f"{who}_reliability"] = macro(edits, answers)
            # an empty answer (EOS or a newline first) is the format's manner, not the edit's: SmolLM2 answers
            # "Question: ...\nAnswer:" with EOS for most prompts before and after editing
            res[f"{who}_answered"] = sum(bool(text(a).strip()) for a in answers) / max(len(answers), 1)
            if args.answers and who == "edited":
                res["edited_answers"] = [tok.decode(a, skip_special_tokens=False) for a in answers]
            res[f"{who}_rephrase"] = macro(rephrases, gen([q for _, q, _ in rephrases]))
            res[f"_{who}_neighbour_answers"] = gen([q for _, q in neighbours])
        same: dict[int, list[float]] = {}  # the first generated token is the base model's (as crispedit eval)
        for (i, _), a, b in zip(neighbours, res.pop("_edited_neighbour_answers"), res.pop("_base_neighbour_answers")):
            same.setdefault(i, []).append(float(a[:1] == b[:1]))
        res["locality_first_token"] = sum(sum(v) / len(v) for v in same.values()) / max(len(same), 1)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        rows["formats"][name] = res
        use(base)
        print(f"{name:28s} rel {res['base_reliability']:.2f} -> {res['edited_reliability']:.2f}  "
              f"answered {res['base_answered']:.2f} -> {res['edited_answered']:.2f}  "
              f"rephrase {res['base_rephrase']:.2f} -> {res['edited_rephrase']:.2f}  "
              f"locality {res['locality_first_token']:.2f}  ({res['seconds']} s)", flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
