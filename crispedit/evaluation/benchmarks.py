"""Capability benchmarks from local files: MMLU, ARC-Challenge, TruthfulQA-MC (log-likelihood), GSM8K.

Multiple choice is scored by log-likelihood, as lm-evaluation-harness does: each option is scored
by the sum (acc) and the per-token mean (acc_norm) of the log-probs of its tokens after the question
prompt; an item is correct when the right option's score is strictly the highest (a tie is wrong, so
a degenerate model cannot score by option order). Items are sampled with a fixed seed so that runs
are comparable. Data live in `../shared/data/benchmarks` (relative to the working directory), in
$CRISPEDIT_BENCHMARKS, or in a folder the caller names.
"""

from __future__ import annotations

import csv
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from crispedit.config import Benchmark
from crispedit.errors import CrispEditError
from crispedit.evaluation.generation import eval_mode, generate_greedy, model_device, pad_id_of
from crispedit.evaluation.logprobs import accepts_logits_to_keep, target_predictions
from crispedit.evaluation.text import extract_final_number
from crispedit.formatting import PromptFormat, collate, encode_pair
from crispedit.io import jsonl_records

ENV_ROOT = "CRISPEDIT_BENCHMARKS"
DEFAULT_ROOT = Path("..") / "shared" / "data" / "benchmarks"
MC_TASKS = Benchmark.values()


@dataclass(frozen=True)
class MCItem:
    """A multiple-choice question: the prompt the options continue, the options, the right index."""

    id: str
    prompt: str
    options: tuple[str, ...]
    answer: int


def benchmarks_root(root: str | os.PathLike | None = None) -> Path:
    """The benchmark folder: `root`, else $CRISPEDIT_BENCHMARKS, else ../shared/data/benchmarks."""
    if root is not None:
        return Path(root)
    if os.environ.get(ENV_ROOT):
        return Path(os.environ[ENV_ROOT])
    return Path.cwd() / DEFAULT_ROOT


def _need(path: Path) -> Path:
    if not path.exists():
        raise CrispEditError(f"benchmark data not found: {path} (pass a benchmarks folder or set ${ENV_ROOT})")
    return path


# ---------------------------------------------------------------------------------------------- loaders

def load_mmlu(root: str | os.PathLike | None = None, split: str = "test", subjects: Sequence[str] | None = None,
              style: str = "cloze") -> list[MCItem]:
    """MMLU from `mmlu/{split}/{subject}_{split}.csv` (`question,choice0..choice3,answer`).

    style "cloze" scores the option texts (meaningful for small models); "letters" lists the options
    as A-D in the prompt and scores the letters (the original MMLU format).
    """
    if style not in ("cloze", "letters"):
        raise ValueError(f"unknown MMLU style {style!r}; expected 'cloze' or 'letters'")
    folder = _need(benchmarks_root(root) / "mmlu" / split)
    files = sorted(folder.glob(f"*_{split}.csv"))
    if subjects is not None:
        files = [_need(folder / f"{s}_{split}.csv") for s in subjects]
    if not files:
        raise CrispEditError(f"no MMLU files *_{split}.csv in {folder}")
    items = []
    for f in files:
        subject = f.name[: -len(f"_{split}.csv")].replace("_", " ")
        with open(f, newline="", encoding="utf-8") as fh:
            for row_no, row in enumerate(csv.DictReader(fh), start=2):
                try:
                    q = row["question"]
                    choices = tuple(row[f"choice{k}"] for k in range(4))
                    answer = int(row["answer"])
                except (KeyError, TypeError, ValueError) as e:
                    raise CrispEditError(f"{f}, line {row_no}: bad MMLU row (question, choice0..3, answer): {e}") from e
                if not 0 <= answer < 4:
                    raise CrispEditError(f"{f}, line {row_no}: field 'answer' = {answer} is not in 0..3")
                if style == "cloze":
                    prompt = f"The following is a question about {subject}.\n\nQuestion: {q.strip()}\nAnswer:"
                    options = choices
                else:
                    listed = "\n".join(f"{'ABCD'[k]}. {c}" for k, c in enumerate(choices))
                    prompt = (f"The following is a multiple choice question about {subject}.\n\n"
                              f"{q.strip()}\n{listed}\nAnswer:")
                    options = ("A", "B", "C", "D")
                items.append(MCItem(f"mmlu/{f.stem}/{row_no}", prompt, options, answer))
    return items


def load_arc(root: str | os.PathLike | None = None, split: str = "test") -> list[MCItem]:
    """ARC-Challenge from `arc/ARC-Challenge-{Test,Dev}.jsonl` (AI2 schema)."""
    path = _need(benchmarks_root(root) / "arc" / f"ARC-Challenge-{split.capitalize()}.jsonl")
    items = []
    for line_no, d in jsonl_records(path.read_text(encoding="utf-8"), str(path)):
        try:
            stem = d["question"]["stem"]
            labels = [c["label"] for c in d["question"]["choices"]]
            texts = tuple(c["text"] for c in d["question"]["choices"])
            answer = labels.index(d["answerKey"])
        except (KeyError, TypeError, ValueError) as e:
            raise CrispEditError(f"{path}, line {line_no}: bad ARC record (question.stem, question.choices, "
                                 f"answerKey): {e}") from e
        items.append(MCItem(f"arc/{d.get('id', line_no)}", f"Question: {stem.strip()}\nAnswer:", texts, answer))
    return items


def load_truthfulqa_mc1(root: str | os.PathLike | None = None, seed: int = 0) -> list[MCItem]:
    """MC1-style TruthfulQA from `truthfulqa/TruthfulQA.csv`: the best answer against the incorrect
    answers (split on "; "), options in a seeded per-question order. An approximation of the official
    MC1 target sets, which this CSV does not contain."""
    path = _need(benchmarks_root(root) / "truthfulqa" / "TruthfulQA.csv")
    items = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row_no, row in enumerate(csv.DictReader(fh), start=2):
            try:
                q, best = row["Question"].strip(), row["Best Answer"].strip()
                wrong = [w.strip() for w in row["Incorrect Answers"].split(";") if w.strip()]
            except (KeyError, AttributeError) as e:
                raise CrispEditError(f"{path}, line {row_no}: bad TruthfulQA row (Question, Best Answer, "
                                     f"Incorrect Answers): {e}") from e
            if not q or not best or not wrong:
                raise CrispEditError(f"{path}, line {row_no}: empty Question, Best Answer or Incorrect Answers")
            options = [best] + wrong
            perm = list(range(len(options)))
            random.Random(f"{seed}:{row_no}").shuffle(perm)
            items.append(MCItem(f"truthfulqa/{row_no}", f"Q: {q}\nA:", tuple(options[k] for k in perm),
                                perm.index(0)))
    return items


def load_mc_task(name: str, root: str | os.PathLike | None = None, seed: int = 0) -> list[MCItem]:
    if name == "mmlu":
        return load_mmlu(root)
    if name == "arc":
        return load_arc(root)
    if name == "truthfulqa":
        return load_truthfulqa_mc1(root, seed)
    raise CrispEditError(f"unknown benchmark {name!r}; expected one of {MC_TASKS} (or gsm8k)")


def sample_items(items: Sequence[Any], limit: int | None, seed: int = 0) -> list[Any]:
    """`limit` items drawn without replacement with `seed`, kept in file order (all when limit is None)."""
    if limit is None or limit >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


# ---------------------------------------------------------------------------------------------- scoring

def score_multiple_choice(model, tokenizer, items: Sequence[MCItem], batch_size: int = 16,
                          show_progress: bool = False, desc: str = "multiple choice",
                          share_prompt: bool = True) -> dict[str, Any]:
    """Accuracy by summed (acc) and per-token mean (acc_norm) option log-likelihood.

    With `share_prompt` (and a model with a KV cache), each question is run once and its cache is
    reused by all its options, which is several times faster when the question is long and the
    options short; otherwise every prompt+option sequence is scored in padded batches. Both give the
    same log-probs (to float rounding).
    """
    encoded = []
    for it in items:
        pairs = [encode_pair(tokenizer, it.prompt, opt, PromptFormat("raw"), add_eos=False) for opt in it.options]
        for k, pair in enumerate(pairs):
            if not pair.target_ids:
                raise CrispEditError(f"{it.id}: option {k} has no tokens")
        encoded.append((pairs[0].prompt_ids, [pair.target_ids for pair in pairs]))
    option_lps: list[list[list[float]]] | None = None
    if share_prompt and encoded:
        option_lps = _shared_prompt_logprobs(model, encoded, pad_id_of(tokenizer), show_progress, desc)
    if option_lps is None:
        seqs = [(p, t) for p, opts in encoded for t in opts]
        flat = [lps for _, lps in target_predictions([model], seqs, pad_id_of(tokenizer), batch_size,
                                                     show_progress, desc)[0]]
        option_lps, k = [], 0
        for _, opts in encoded:
            option_lps.append(flat[k:k + len(opts)])
            k += len(opts)
    per_item, hits, hits_norm = [], 0, 0
    for it, lps in zip(items, option_lps):
        sums = [sum(x) for x in lps]
        means = [sum(x) / len(x) for x in lps]
        ok, ok_norm = _strict_best(sums, it.answer), _strict_best(means, it.answer)
        hits += ok
        hits_norm += ok_norm
        per_item.append({"id": it.id, "answer": it.answer, "pred": _argmax(sums), "pred_norm": _argmax(means),
                         "correct": ok, "correct_norm": ok_norm, "logprob_sums": sums})
    n = len(items)
    return {"acc": hits / n if n else None, "acc_norm": hits_norm / n if n else None, "n": n, "items": per_item}


def _shared_prompt_logprobs(model, encoded: Sequence[tuple[list[int], list[list[int]]]], pad_id: int,
                            show_progress: bool, desc: str) -> list[list[list[float]]] | None:
    """Per item, per option, the log-probs of the option tokens, running the prompt once per item and
    reusing its KV cache for the options; None when the model has no reusable cache."""
    dev = model_device(model)
    keep_last = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    out_all = []
    with eval_mode(model):
        for prompt, options in tqdm(encoded, desc=desc, disable=not show_progress, leave=False):
            if not prompt:
                raise CrispEditError("a multiple-choice prompt has no tokens")
            out = model(input_ids=torch.tensor([prompt], device=dev), use_cache=True, **keep_last)
            cache = getattr(out, "past_key_values", None)
            if cache is None or not hasattr(cache, "batch_repeat_interleave"):
                return None
            first = torch.log_softmax(out.logits[0, -1].float(), -1)
            lps = [[first[o[0]].item()] for o in options]
            longest = max(len(o) for o in options)
            if longest > 1:
                n, plen = len(options), len(prompt)
                cache.batch_repeat_interleave(n)
                # an option's last token predicts nothing, so it need not be fed
                batch = collate([o[:-1] or [pad_id] for o in options], pad_id, padding_side="right")
                mask = torch.cat([torch.ones(n, plen, dtype=torch.long), batch["attention_mask"]], 1)
                width = batch["input_ids"].shape[1]
                pos = torch.arange(plen, plen + width).expand(n, width)
                logits = model(input_ids=batch["input_ids"].to(dev), attention_mask=mask.to(dev),
                               position_ids=pos.to(dev), past_key_values=cache, use_cache=True).logits
                for k, o in enumerate(options):
                    if len(o) > 1:
                        lp = torch.log_softmax(logits[k, :len(o) - 1].float(), -1)
                        lps[k] += lp.gather(-1, torch.tensor(o[1:], device=lp.device)[:, None])[:, 0].tolist()
            out_all.append(lps)
    return out_all


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda k: xs[k])


def _strict_best(scores: Sequence[float], answer: int) -> bool:
    return all(scores[answer] > s for k, s in enumerate(scores) if k != answer)


def run_mc_benchmark(name: str, model, tokenizer, limit: int | None = 200, seed: int = 0,
                     root: str | os.PathLike | None = None, batch_size: int = 16,
                     show_progress: bool = False) -> dict[str, Any]:
    """Load `name` (mmlu / arc / truthfulqa), sample `limit` items with `seed`, score them."""
    items = load_mc_task(name, root, seed)
    n_total = len(items)
    items = sample_items(items, limit, seed)
    res = score_multiple_choice(model, tokenizer, items, batch_size, show_progress, desc=name)
    res.update({
        "task": name, "limit": limit, "seed": seed, "n_available": n_total,
        "data": str(benchmarks_root(root)),
        "protocol": "log-likelihood multiple choice, raw prompt, zero-shot; acc = summed option log-prob, "
                    "acc_norm = mean log-prob per option token; ties count as wrong",
    })
    return res


# ---------------------------------------------------------------------------------------------- GSM8K

_CALC = re.compile(r"<<[^>]*>>")


def load_gsm8k(root: str | os.PathLike | None = None, split: str = "test") -> list[dict[str, str]]:
    """GSM8K `{question, answer}` records; the answer's `<<calc>>` annotations are removed."""
    path = _need(benchmarks_root(root) / "gsm8k" / f"{split}.jsonl")
    out = []
    for line_no, d in jsonl_records(path.read_text(encoding="utf-8"), str(path)):
        try:
            out.append({"question": d["question"].strip(), "answer": _CALC.sub("", d["answer"]).strip()})
        except (KeyError, TypeError, AttributeError) as e:
            raise CrispEditError(f"{path}, line {line_no}: bad GSM8K record (question, answer): {e}") from e
    return out


def gsm8k_exact_match(model, tokenizer, limit: int | None = 50, seed: int = 0,
                      root: str | os.PathLike | None = None, num_fewshot: int = 4, max_new_tokens: int = 256,
                      batch_size: int = 8, show_progress: bool = False) -> dict[str, Any]:
    """Greedy chain-of-thought answers, `num_fewshot` fixed examples (the first of the train split),
    scored by exact match of the final number (after '####', else the last number)."""
    test = sample_items(load_gsm8k(root, "test"), limit, seed)
    shots = load_gsm8k(root, "train")[:num_fewshot] if num_fewshot else []
    header = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    prompts = [tokenizer(f"{header}Question: {t['question']}\nAnswer:")["input_ids"] for t in test]
    gens = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size,
                           stop_strings=("\n\n", "Question:"), show_progress=show_progress, desc="gsm8k")
    items, hits = [], 0
    for t, g in zip(test, gens):
        ref, pred = extract_final_number(t["answer"]), extract_final_number(g)
        ok = pred is not None and pred == ref
        hits += ok
        items.append({"reference": ref, "prediction": pred, "correct": ok, "generation": g})
    n = len(test)
    return {"task": "gsm8k", "exact_match": hits / n if n else None, "n": n, "limit": limit, "seed": seed,
            "num_fewshot": num_fewshot, "max_new_tokens": max_new_tokens, "data": str(benchmarks_root(root)),
            "protocol": "greedy generation, stop at blank line or 'Question:', final-number exact match",
            "items": items}


# ---------------------------------------------------------------------------------------------- lm-eval

def run_lm_eval(model_path: str | os.PathLike, tasks: Sequence[str], limit: int | float | None = None,
                batch_size: int | str = 8, device: str | None = None,
                num_fewshot: int | None = None) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks on a saved model folder (needs the `eval` extra and its data)."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval import simple_evaluate
    except ImportError as e:
        raise CrispEditError("lm-evaluation-harness is not installed; install the `eval` extra: "
                             "pip install 'crispedit[eval]'") from e
    try:
        res = simple_evaluate(model="hf", model_args=f"pretrained={model_path}", tasks=list(tasks), limit=limit,
                              batch_size=batch_size, device=device, num_fewshot=num_fewshot)
    except Exception as e:  # its failures (missing data offline, unknown task) are the user's to fix
        raise CrispEditError(f"lm-evaluation-harness failed on {list(tasks)} for {model_path}: {e}") from e
    return {"results": res.get("results", {}), "tasks": list(tasks), "limit": limit, "num_fewshot": num_fewshot,
            "protocol": "lm-evaluation-harness simple_evaluate, model=hf"}
