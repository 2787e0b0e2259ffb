"""Batched greedy decoding (left padding, KV cache) that gives exactly the one-by-one outputs.

Evaluating edits "in the wild" means letting the model write its own answer: greedy decoding, at
most 40 new tokens, stopping at a newline, a period or the end-of-sequence token.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from crispedit.evaluation.text import contains_stop, truncate_at_stop
from crispedit.formatting import END_OF_TURN_TOKENS, collate
from crispedit.models.runtime import pad_id_of  # noqa: F401 - re-exported (evaluation modules import it here)

DEFAULT_STOP_STRINGS: tuple[str, ...] = ("\n", ".")
# A generation also ends at GPT-style end-of-text, which is not a chat end-of-turn token.
_END_OF_TURN = END_OF_TURN_TOKENS + ("<|endoftext|>",)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(*models) -> Iterator[None]:
    """Put models in eval mode (no dropout) under no_grad, restoring their training flags afterwards."""
    flags = [(m, m.training) for m in models if m is not None]
    for m, _ in flags:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, was_training in flags:
            m.train(was_training)


def default_stop_ids(tokenizer) -> list[int]:
    """EOS plus any end-of-turn token the vocabulary has (chat models end their answer with it)."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    unk = tokenizer.unk_token_id
    vocab = tokenizer.get_vocab()
    for tok in _END_OF_TURN:
        tid = vocab.get(tok)
        if tid is not None and tid != unk and tid not in ids:
            ids.append(int(tid))
    return ids


class _StopOnStrings(StoppingCriteria):
    """Per-row stop once the new text contains a stop string (saves decoding 40 tokens for 'Paris.')."""

    def __init__(self, tokenizer, prompt_len: int, stop_strings: Sequence[str]):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.stop_strings = tuple(stop_strings)

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len:].tolist()
        done = [contains_stop(self.tokenizer.decode(row, skip_special_tokens=True), self.stop_strings)
                for row in new]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate_greedy_ids(model, tokenizer, prompts_ids: Sequence[Sequence[int]], max_new_tokens: int = 40,
                        batch_size: int = 16, stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS,
                        stop_ids: Iterable[int] | None = None, show_progress: bool = False,
                        desc: str = "generate", include_stop: bool = False) -> list[list[int]]:
    """Greedy continuations (new token ids) of each prompt, ending with the token that completes a
    stop string, or just before the first stop id (just after it with `include_stop`).

    Prompts are sorted by length and left-padded; `model.generate` derives position ids from the
    attention mask, so a prompt's continuation does not depend on its batch-mates (rows that finished
    early are padded by `generate`; the cut removes that padding).
    """
    if not prompts_ids:
        return []
    if any(len(p) == 0 for p in prompts_ids):
        raise ValueError("cannot generate from an empty prompt")
    stop_ids = list(default_stop_ids(tokenizer) if stop_ids is None else stop_ids)
    stop_set = set(stop_ids)
    pad = pad_id_of(tokenizer)
    device = model_device(model)
    order = sorted(range(len(prompts_ids)), key=lambda i: len(prompts_ids[i]))
    out: list[list[int]] = [[] for _ in prompts_ids]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with eval_mode(model):
        for idx in tqdm(batches, desc=desc, disable=not show_progress, leave=False):
            batch = collate([prompts_ids[i] for i in idx], pad, padding_side="left")
            input_ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            criteria = StoppingCriteriaList()
            if stop_strings:
                criteria.append(_StopOnStrings(tokenizer, input_ids.shape[1], stop_strings))
            gen = model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                num_beams=1, temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                eos_token_id=stop_ids or None, stopping_criteria=criteria, use_cache=True,
            )
            for row, i in zip(gen[:, input_ids.shape[1]:].tolist(), idx):
                out[i] = _cut(tokenizer, row, stop_set, stop_strings, include_stop)
    return out


def _cut(tokenizer, row: list[int], stop_set: set[int], stop_strings: Sequence[str],
         include_stop: bool) -> list[int]:
    """The row up to its first stop id (excluded unless `include_stop`) or up to and including the
    token that completes the first stop string, whichever comes first."""
    end = next((k for k, t in enumerate(row) if t in stop_set), None)
    kept = row if end is None else row[:end + 1 if include_stop else end]
    text_part = row if end is None else row[:end]
    if not stop_strings or not contains_stop(tokenizer.decode(text_part, skip_special_tokens=True), stop_strings):
        return kept
    # the shortest prefix whose text contains a stop string (containment only grows with the prefix)
    lo, hi = 1, len(text_part)
    while lo < hi:
        mid = (lo + hi) // 2
        if contains_stop(tokenizer.decode(text_part[:mid], skip_special_tokens=True), stop_strings):
            hi = mid
        else:
            lo = mid + 1
    return text_part[:lo]


def generate_greedy(model, tokenizer, prompts_ids: Sequence[Sequence[int]], max_new_tokens: int = 40,
                    batch_size: int = 16, stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS,
                    stop_ids: Iterable[int] | None = None, show_progress: bool = False,
                    desc: str = "generate") -> list[str]:
    """Greedy answers as text: decoded new tokens, cut before the first stop string.

    Stops: EOS / end-of-turn ids (`stop_ids`, default: the tokenizer's) and `stop_strings` (default
    newline and period). Leading whitespace is stripped before looking for a stop string.
    """
    ids = generate_greedy_ids(model, tokenizer, prompts_ids, max_new_tokens, batch_size, stop_strings,
                              stop_ids, show_progress, desc)
    return [truncate_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop_strings) for row in ids]
