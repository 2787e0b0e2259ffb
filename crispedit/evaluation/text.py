"""Answer normalisation and string scorers shared by the generated-edit metrics and GSM8K.

Generated answers are compared after SQuAD-style normalisation so that case, punctuation, articles
and spacing never decide whether an edit "worked".
"""

from __future__ import annotations

import re
import string
import unicodedata
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"‘", "’", "“", "”", "–", "—", "…"}


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if ch in _PUNCT else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(generation: str, target: str) -> bool:
    """The normalised generation equals the normalised target."""
    return normalize_answer(generation) == normalize_answer(target)


def prefix_match(generation: str, target: str) -> bool:
    """The normalised generation starts with the normalised target, at a word boundary.

    ("Paris, France" matches "Paris"; "Parisian" does not.) An empty normalised target only matches
    an empty generation, as for exact match.
    """
    gen, tgt = normalize_answer(generation), normalize_answer(target)
    if not tgt:
        return not gen
    return gen == tgt or gen.startswith(tgt + " ")


def contains_match(generation: str, target: str) -> bool:
    """The normalised target occurs in the normalised generation as whole words ("It is in Paris"
    contains "Paris"): lenient, for answers given as sentences (chat context) when no judge is used."""
    gen, tgt = normalize_answer(generation), normalize_answer(target)
    if not tgt:
        return not gen
    return f" {tgt} " in f" {gen} "


def looping(generation: str, n: int = 3, times: int = 3) -> bool:
    """Some `n`-word sequence occurs `times` times or more: a degenerate answer. Contains and prefix scorers count
    "Paris Paris Paris ..." as a hit; this flag lets a report say how many of its hits are loops."""
    words = generation.split()
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= times:
            return True
    return False


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Cut `text` before the first stop string, ignoring leading whitespace.

    Leading whitespace (including newlines) is dropped first, so a model that begins its answer on a
    new line is not scored as having answered nothing.
    """
    text = text.lstrip()
    cut = len(text)
    for s in stop_strings:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut].strip()


def contains_stop(text: str, stop_strings: Sequence[str]) -> bool:
    """Whether generation may stop: a stop string occurs after the leading whitespace."""
    text = text.lstrip()
    return any(s and s in text for s in stop_strings)


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def extract_final_number(text: str) -> str | None:
    """The answer number of a GSM8K-style solution: after '####' if present, else the last number.

    Commas, dollar signs and a trailing '.0…' are removed so that '1,000.00' and '1000' compare equal.
    """
    if "####" in text:
        text = text.split("####", 1)[1]
        found = _NUMBER.findall(text)
        found = found[:1]
    else:
        found = _NUMBER.findall(text)[-1:]
    if not found:
        return None
    num = found[0].replace(",", "").replace("$", "")
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    return num or None
