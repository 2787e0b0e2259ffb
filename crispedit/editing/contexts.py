"""Training variants of an edit: the same (prompt → target) presented under several contexts.

An edit trained on one string binds to that string: the edited model answers with the new target after the exact
raw prompt, and with the old answer when the same question comes inside the WILD QA context, through the chat
template or after other text. Presenting each request under several contexts makes the cheapest solution the one
that ties the target to the subject and relation instead:

* the named contexts of `crispedit.formatting` — `raw`, the WILD QA context `qa`, the tokenizer's `chat` template;
* short prefixes written by the model itself (the "context templates" of ROME/MEMIT): a few sampled tokens after
  generic openings ("The", "Therefore", ...), put before the raw prompt.

Only the request's own prompt is ever used. Its rephrases and locality prompts are the test of generalisation and
locality; a generated prefix that happens to contain one of them is dropped (`drop_leaking_prefixes`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from crispedit.config import TargetEnd
from crispedit.data.records import EditRequest
from crispedit.evaluation.text import normalize_answer
from crispedit.formatting import EncodedPair, PromptFormat, encode_pair, encode_prompt, render_prompt, span_tokens

# ROME's openings for its context templates (Meng et al. 2022): generic starts that lead anywhere.
PREFIX_OPENINGS = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class TrainingSequence:
    """One training sequence: which request, under which variant (a context name or `prefix:i`)."""

    request: int
    variant: str
    pair: EncodedPair
    subject_positions: tuple[int, ...] | None = None  # the subject's token positions in pair.input_ids


def subject_token_positions(tokenizer, text: str, subject: str | None, fmt: PromptFormat, prompt_ids: Sequence[int],
                            prompt_start: int = 0) -> tuple[int, ...] | None:
    """Positions of the tokens that spell `subject` in `prompt_ids` (= `encode_prompt(tokenizer, text, fmt)`): its
    last occurrence in `text[prompt_start:]`, the request's own prompt (a prefix before it may name the subject
    too), as MEMIT locates it. None when there is no subject, it is not in the prompt, or the tokenizer cannot map
    tokens to characters (a slow tokenizer)."""
    at = text.rfind(subject, prompt_start) if subject else -1
    rendered = render_prompt(tokenizer, text, fmt)
    where = rendered.rfind(text)
    if at < 0 or where < 0:
        return None
    try:
        ids, pos = span_tokens(tokenizer, rendered, (where + at, where + at + len(subject)),
                               add_special_tokens=fmt.context != "chat")
    except NotImplementedError:
        return None
    return pos if pos and ids == list(prompt_ids) else None


def generate_prefixes(model, tokenizer, n: int, max_new_tokens: int = 10, seed: int = 0) -> list[str]:
    """`n` distinct short texts sampled from `model` (top-k 5) after the generic openings, each ending with a
    sentence end, so that "{prefix} {prompt}" reads as a new sentence after some unrelated text."""
    from crispedit.evaluation.generation import eval_mode, pad_id_of

    if n <= 0:
        return []
    device = next(model.parameters()).device
    out: list[str] = []
    seen: set[str] = set()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(model):
        torch.manual_seed(seed)
        for attempt in range(8):
            for opening in PREFIX_OPENINGS:
                ids = tokenizer(opening, return_tensors="pt")["input_ids"].to(device)
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad_id_of(tokenizer),
                                     num_return_sequences=max(1, n // len(PREFIX_OPENINGS) + 1))
                for row in gen:
                    text = _clean(tokenizer.decode(row, skip_special_tokens=True))
                    if text and text not in seen:
                        seen.add(text)
                        out.append(text)
            if len(out) >= n:
                break
    return out[:n]


def _clean(text: str) -> str:
    """One line, stripped, ending with a sentence end."""
    text = " ".join(text.split("\n")[0].split()).strip()
    if not text:
        return ""
    return text if text[-1] in ".!?" else text + "."


def drop_leaking_prefixes(prefixes: Sequence[str], requests: Sequence[EditRequest]) -> list[str]:
    """The prefixes that contain none of the requests' rephrase or locality prompts (normalised text)."""
    held_out = {normalize_answer(q) for r in requests for q in r.rephrases}
    held_out |= {normalize_answer(loc.prompt) for r in requests for loc in r.locality}
    held_out.discard("")
    keep = []
    for p in prefixes:
        norm = f" {normalize_answer(p)} "
        if not any(f" {h} " in norm for h in held_out):
            keep.append(p)
    return keep


def with_prefix(prefix: str, prompt: str) -> str:
    return f"{prefix} {prompt}"


def target_ending(target: str, fmt: PromptFormat, end: TargetEnd | str) -> tuple[bool, str]:
    """(append the end token?, text to append to the target) for a target under `fmt` (`EditConfig.target_end`)."""
    end = TargetEnd(end)
    chat = fmt.context == "chat"
    if end == TargetEnd.EOS:
        return True, ""
    if end == TargetEnd.NONE:
        return False, ""
    if chat:
        return True, ""
    if end == TargetEnd.PERIOD and not target.rstrip().endswith((".", "!", "?")):
        return False, "."
    return False, ""


def _pair(tokenizer, prompt: str, target: str, fmt: PromptFormat, end: TargetEnd | str):
    add_eos, suffix = target_ending(target, fmt, end)
    return encode_pair(tokenizer, prompt, target, fmt, add_eos, suffix)


def training_sequences(tokenizer, requests: Sequence[EditRequest], contexts: Sequence[str] = ("raw",),
                       prefixes: Sequence[str] = (), prefixes_per_request: int = 0,
                       seed: int = 0, end: TargetEnd | str = TargetEnd.EOS) -> list[TrainingSequence]:
    """Every request under every named context, plus `prefixes_per_request` distinct prefixes (drawn for each
    request from `prefixes` with a seeded generator) before its raw prompt; prompt + target (+ its ending,
    `target_ending`), loss on the target only (FT-M)."""
    if prefixes_per_request > len(prefixes):
        raise ValueError(f"{prefixes_per_request} prefixes per request asked for, but only {len(prefixes)} are "
                         "available")
    rng = random.Random(seed)
    out: list[TrainingSequence] = []
    for i, r in enumerate(requests):
        for ctx in contexts:
            fmt = PromptFormat(ctx)
            pair = _pair(tokenizer, r.prompt, r.target, fmt, end)
            pos = subject_token_positions(tokenizer, r.prompt, r.subject, fmt, pair.prompt_ids)
            out.append(TrainingSequence(i, ctx, pair, pos))
        for j in rng.sample(range(len(prefixes)), prefixes_per_request):
            text = with_prefix(prefixes[j], r.prompt)
            pair = _pair(tokenizer, text, r.target, PromptFormat("raw"), end)
            pos = subject_token_positions(tokenizer, text, r.subject, PromptFormat("raw"), pair.prompt_ids,
                                          len(text) - len(r.prompt))
            out.append(TrainingSequence(i, f"prefix:{j}", pair, pos))
    return out


@dataclass(frozen=True)
class Anchor:
    """A prompt whose next-token distribution must stay the base model's: request `request`'s prompt with its
    subject swapped for another request's, under `context`."""

    request: int
    context: str
    prompt: str
    prompt_ids: tuple[int, ...]


def swap_subject(prompt: str, subject: str, other: str) -> str | None:
    """`prompt` with the first occurrence of `subject` replaced by `other` (None when the subject is absent)."""
    i = prompt.find(subject)
    if not subject or i < 0:
        return None
    return prompt[:i] + other + prompt[i + len(subject):]


def anchor_prompts(tokenizer, requests: Sequence[EditRequest], contexts: Sequence[str] = ("raw",), per_request: int = 1,
                   seed: int = 0) -> list[Anchor]:
    """Locality anchors: for each request with a subject found in its prompt, `per_request` prompts of the same
    form about other requests' subjects (different subject text), under each context. They teach the edit to bind
    to its subject: the same relation asked about someone else keeps the base model's answer. Anchors that are
    an edit prompt, or contain a request's rephrase or locality prompt, are dropped (those are the test)."""
    rng = random.Random(seed)
    subjects = [r.subject for r in requests if r.subject]
    forbidden = {normalize_answer(r.prompt) for r in requests}
    held_out = {normalize_answer(q) for r in requests for q in r.rephrases}
    held_out |= {normalize_answer(loc.prompt) for r in requests for loc in r.locality}
    held_out.discard("")
    out: list[Anchor] = []
    for i, r in enumerate(requests):
        if not r.subject or r.subject not in r.prompt:
            continue
        others = [s for s in dict.fromkeys(subjects) if s != r.subject and s not in r.subject and r.subject not in s]
        for other in rng.sample(others, min(per_request, len(others))):
            text = swap_subject(r.prompt, r.subject, other)
            norm = normalize_answer(text)
            if norm in forbidden or any(f" {h} " in f" {norm} " for h in held_out):
                continue
            for ctx in contexts:
                ids = encode_prompt(tokenizer, text, PromptFormat(ctx))
                out.append(Anchor(i, ctx, text, tuple(ids)))
    return out
