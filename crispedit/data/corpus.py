"""The capability corpus: text whose loss the edit must not change.

Its training split feeds the curvature (K-FAC) statistics; its held-out split, which the curvature
never sees, measures what an edit did to the model (perplexity, KL). Both are deterministic
functions of (documents, seeds, sizes), summarised by a fingerprint that caches are keyed on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

from tqdm.auto import tqdm

from crispedit.config import CorpusConfig
from crispedit.errors import CrispEditError
from crispedit.io import jsonl_records, sha256_json

WIKIPEDIA = "wikipedia"
SPLITS = ("train", "heldout")
DOCUMENT_SUFFIXES = (".txt", ".jsonl")
MIN_CHUNK_TOKENS = 8
_TOKENIZE_BATCH = 256

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# documents


def _read_txt(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CrispEditError(f"{path}: cannot read as UTF-8 text: {e}") from e
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CrispEditError(f"{path}: cannot read as UTF-8 text: {e}") from e
    for lineno, rec in jsonl_records(text, path.name):
        if not isinstance(rec, dict):
            raise CrispEditError(f"{path.name}: line {lineno}: expected a JSON object with a {text_field!r} field, "
                                 f"got {type(rec).__name__}")
        if text_field not in rec:
            raise CrispEditError(f"{path.name}: line {lineno}: field {text_field!r} is missing")
        value = rec[text_field]
        if not isinstance(value, str):
            raise CrispEditError(f"{path.name}: line {lineno}: field {text_field!r} must be a string, "
                                 f"got {type(value).__name__}")
        if value.strip():
            docs.append(value.strip())
    return docs


def _is_wiki_dump(path: Path) -> bool:
    return path.name.endswith((".xml", ".xml.bz2"))


def load_documents(source: str | os.PathLike | None, text_field: str = CorpusConfig.text_field) -> list[str]:
    """Documents of a corpus source.

    `None` or "wikipedia": the embedded Wikipedia excerpt (paragraphs of ≥ 200 characters);
    `.txt`: one document per non-empty line; `.jsonl`: the `text_field` of each line;
    `.xml`/`.xml.bz2`: paragraphs of a MediaWiki dump; a folder: all its .txt/.jsonl files, sorted by name.
    """
    from crispedit.data import wiki  # only needed for Wikipedia sources

    if source is None or str(source) == WIKIPEDIA:
        docs = wiki.wikipedia_paragraphs()
    else:
        path = Path(source)
        if not path.exists():
            raise CrispEditError(f"corpus source not found: {path} (expected a .txt or .jsonl file, "
                                 f"a folder of them, a MediaWiki .xml.bz2 dump, or {WIKIPEDIA!r})")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in DOCUMENT_SUFFIXES)
            if not files:
                raise CrispEditError(f"corpus folder {path} contains no .txt or .jsonl files")
            docs = [d for f in files for d in load_documents(f, text_field)]
        elif path.suffix == ".txt":
            docs = _read_txt(path)
        elif path.suffix == ".jsonl":
            docs = _read_jsonl(path, text_field)
        elif _is_wiki_dump(path):
            docs = wiki.wikipedia_paragraphs(path)
        else:
            raise CrispEditError(f"unsupported corpus file {path}: expected .txt (one document per line), "
                                 f".jsonl (a {text_field!r} field per line), a folder of those, or .xml(.bz2)")
    if not docs:
        raise CrispEditError(f"corpus {source_label(source)} contains no documents")
    return docs


def source_label(source: str | os.PathLike | None) -> str:
    """How a source is named in messages and reports."""
    return WIKIPEDIA if source is None else str(source)


# ---------------------------------------------------------------------------------------------
# splits and shards


def _unit_hash(*parts: Any) -> float:
    """A number in [0, 1) determined by the parts (stable across runs, machines and Python versions)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_documents(docs: Sequence[str], heldout_fraction: float = CorpusConfig.heldout_fraction,
                    seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, heldout): each document goes to held-out iff hash(seed, text) < heldout_fraction.

    Deciding per document (not by shuffling the list) means adding documents never moves the
    others, and identical texts always land on the same side, so the split cannot leak.
    Order within each part is the input order.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise CrispEditError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    train, heldout = [], []
    for doc in docs:
        (heldout if _unit_hash("split", seed, doc) < heldout_fraction else train).append(doc)
    return train, heldout


def shard(seqs: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's round-robin share of `seqs`; the shards of all ranks are disjoint and cover `seqs`."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise CrispEditError(f"invalid distributed rank {rank} for world size {world_size}")
    return list(seqs[rank::world_size])


# ---------------------------------------------------------------------------------------------
# tokenised corpus


@dataclass
class CapabilityCorpus:
    """Token sequences (each ≤ max_length, special tokens included) and how they were made."""

    source: str
    split: str
    seed: int
    max_length: int
    heldout_fraction: float
    split_seed: int
    n_documents: int
    n_chunks_available: int
    sequences: list[list[int]] = field(repr=False)
    fingerprint: str = ""

    @property
    def n_samples(self) -> int:
        return len(self.sequences)

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    def __len__(self) -> int:
        return len(self.sequences)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "split": self.split,
            "n_samples": self.n_samples,
            "n_tokens": self.n_tokens,
            "max_length": self.max_length,
            "seed": self.seed,
            "heldout_fraction": self.heldout_fraction,
            "split_seed": self.split_seed,
            "n_documents": self.n_documents,
            "n_chunks_available": self.n_chunks_available,
            "fingerprint": self.fingerprint,
        }


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds by default before and after a text (e.g. BOS for Llama, none for GPT-2)."""
    text = "The capital of France is Paris."
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(text)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    raise CrispEditError("cannot tell which special tokens this tokenizer adds: the default encoding of a "
                         "text does not contain its encoding without special tokens")


def chunk_document(ids: Sequence[int], max_length: int, prefix: Sequence[int] = (), suffix: Sequence[int] = (),
                   min_tokens: int = MIN_CHUNK_TOKENS) -> list[list[int]]:
    """Cut a document's ids into consecutive pieces, each wrapped in the special tokens to ≤ max_length.

    Every piece thus looks like a text the tokenizer encoded by default (a Llama chunk starts with BOS
    even in the middle of a document). Pieces with fewer than `min_tokens` text tokens are dropped.
    """
    body = max_length - len(prefix) - len(suffix)
    if body < 1:
        raise CrispEditError(f"max_length {max_length} leaves no room for text after the tokenizer's "
                             f"{len(prefix) + len(suffix)} special tokens")
    out = []
    for start in range(0, len(ids), body):
        piece = list(ids[start:start + body])
        if len(piece) >= min_tokens:
            out.append(list(prefix) + piece + list(suffix))
    return out


def _tokenize(tokenizer, docs: Sequence[str], progress: bool = False) -> list[list[int]]:
    out: list[list[int]] = []
    batches = range(0, len(docs), _TOKENIZE_BATCH)
    for start in tqdm(batches, desc="tokenising corpus", unit="batch", disable=not progress or len(batches) < 8,
                      leave=False):
        enc = tokenizer(list(docs[start:start + _TOKENIZE_BATCH]), add_special_tokens=False, verbose=False)
        out.extend(list(ids) for ids in enc["input_ids"])
    return out


def _selection_key(seed: int, index: int, chunk: Sequence[int]) -> tuple[str, int]:
    digest = hashlib.sha256(f"select\x1f{seed}\x1f".encode() + ",".join(map(str, chunk)).encode()).hexdigest()
    return digest, index


def build_corpus(tokenizer, source: str | os.PathLike | None = None, n_samples: int | None = None,
                 max_length: int = CorpusConfig.max_length, seed: int = CorpusConfig.seed,
                 heldout_fraction: float = CorpusConfig.heldout_fraction, split: str = "train",
                 split_seed: int = 0, text_field: str = CorpusConfig.text_field,
                 min_chunk_tokens: int = MIN_CHUNK_TOKENS, progress: bool = False) -> CapabilityCorpus:
    """Tokenise, chunk and select `n_samples` sequences (all if None) of one split of a corpus.

    `seed` chooses which chunks are taken; `split_seed` chooses the train/held-out split and is kept
    separate on purpose: changing the sampling seed must never move documents between the curvature's
    training data and the held-out evaluation data. `progress` shows a tokenising bar on large corpora.
    """
    if split not in SPLITS:
        raise CrispEditError(f"unknown corpus split {split!r}; expected one of {', '.join(SPLITS)}")
    if n_samples is not None and n_samples < 1:
        raise CrispEditError(f"n_samples must be a positive integer, got {n_samples}")
    if max_length < 1:
        raise CrispEditError(f"max_length must be a positive integer, got {max_length}")
    label = source_label(source)
    docs = load_documents(source, text_field)
    train, heldout = split_documents(docs, heldout_fraction, split_seed)
    part = train if split == "train" else heldout
    if not part:
        raise CrispEditError(f"corpus {label} has no documents in split {split!r} "
                             f"({len(docs)} documents, heldout_fraction={heldout_fraction})")

    prefix, suffix = special_tokens_around(tokenizer)
    chunks: list[list[int]] = []
    short = 0  # documents that give no chunk: fewer than min_chunk_tokens tokens
    for ids in _tokenize(tokenizer, part, progress):
        pieces = chunk_document(ids, max_length, prefix, suffix, min_chunk_tokens)
        short += not pieces
        chunks.extend(pieces)
    if n_samples is not None and len(chunks) < n_samples:
        dropped = (f"; {short} of its {len(part)} documents were dropped as shorter than {min_chunk_tokens} "
                   "tokens" if short else "")
        raise CrispEditError(f"corpus {label} has only {len(chunks)} chunks of ≤{max_length} tokens in split "
                             f"{split!r}, {n_samples} asked{dropped}")
    # Rank chunks by a seeded hash of their content: deterministic, and adding documents to the corpus
    # does not change the relative order of the chunks already there.
    order = sorted(range(len(chunks)), key=lambda i: _selection_key(seed, i, chunks[i]))
    selected = [chunks[i] for i in order[: n_samples if n_samples is not None else len(chunks)]]

    fingerprint = sha256_json({
        "documents": sha256_json(docs),
        "split": split,
        "split_seed": split_seed,
        "heldout_fraction": heldout_fraction,
        "seed": seed,
        "max_length": max_length,
        "min_chunk_tokens": min_chunk_tokens,
        "n_samples": n_samples,
        "sequences": hashlib.sha256(json.dumps(selected).encode()).hexdigest(),
    })
    return CapabilityCorpus(
        source=label, split=split, seed=seed, max_length=max_length, heldout_fraction=heldout_fraction,
        split_seed=split_seed, n_documents=len(part), n_chunks_available=len(chunks), sequences=selected,
        fingerprint=fingerprint,
    )


def corpus_of_curvature(tokenizer, curvature, split: str, n_samples: int, seed: int = 0) -> CapabilityCorpus:
    """`n_samples` chunks of one split of the corpus `curvature` was collected on (its record's first corpus, cut
    the same way; the embedded Wikipedia excerpt when `curvature` is None or names none). The held-out split is
    text the curvature never saw; the training split is the text it is estimated from."""
    first = ((curvature.record.get("corpora") or [{}])[0] if curvature is not None else {}) or {}
    source = None if first.get("source") in (None, "wikipedia") else first["source"]
    defaults = CorpusConfig()
    return build_corpus(tokenizer, source, n_samples=n_samples, seed=seed, split=split,
                        max_length=first.get("max_length", defaults.max_length),
                        heldout_fraction=first.get("heldout_fraction", defaults.heldout_fraction),
                        split_seed=first.get("split_seed", 0), text_field=first.get("text_field", defaults.text_field))
