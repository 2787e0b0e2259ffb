"""Extending a curvature cache with corpus it has not seen yet.

Statistics are sums, so more text is added by collecting over new sequences and adding. What must not
happen is summing a sequence twice: the chunks earlier collections took from the same corpus are
reconstructed (selection is a deterministic function of corpus, seed and size, and the cache's record keeps
those and a hash of the sequences) and left out, so an extension is disjoint from what is already summed.

Settings left as None are inherited from the cache: the corpus, chunk length and held-out split of its last
corpus, and a seed one past the largest it used. The collection settings (labels, sink handling) and the
targets are the cache's own; asking for others is an error, because they would change what the sums mean.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from crispedit.config import CorpusConfig, CurvatureConfig
from crispedit.errors import CacheMismatchError, ConfigError, CrispEditError, CrispEditWarning

if TYPE_CHECKING:
    from crispedit.curvature.api import Curvature

logger = logging.getLogger(__name__)
WIKIPEDIA = "wikipedia"  # crispedit.data.corpus.WIKIPEDIA, without importing the tokenising code


def sequences_sha256(seqs: Sequence[Sequence[int]]) -> str:
    """Hash of token sequences, recorded so that a reconstruction can be checked."""
    return hashlib.sha256(json.dumps([list(s) for s in seqs]).encode()).hexdigest()


def corpus_record(corpus: Any, text_field: str | None = None) -> dict[str, Any]:
    """How a cache records a `CapabilityCorpus`: its description plus the .jsonl text field and the hash of
    its sequences (both needed to reconstruct it when the cache is extended)."""
    desc = corpus.describe()
    desc.update(text_field=text_field or getattr(corpus, "text_field", "text"),
                sequences_sha256=sequences_sha256(corpus.sequences))
    return desc


def absolute_source(source: str | None) -> str | None:
    """The corpus as caches name it: absolute paths, so that a record means the same from any folder."""
    if source is None or source == WIKIPEDIA:
        return source
    return str(Path(source).expanduser().resolve())


def plan_extension(record: Mapping[str, Any], n_samples: int, *, source: str | None = None,
                   max_length: int | None = None, heldout_fraction: float | None = None, seed: int | None = None,
                   text_field: str | None = None, collection: Mapping[str, Any] | None = None) -> CorpusConfig:
    """The corpus settings of an extension of the cache whose record is `record` (no model needed).

    Args:
        record: the cache's JSON record (`read_record(path)` or `Curvature.record`).
        n_samples: new sequences to add.
        source, max_length, heldout_fraction, seed, text_field: None inherits them (see the module docstring).
        collection: collection settings the caller asked for; each must equal the cache's.

    Raises:
        ConfigError: a collection setting differs from the cache's, or the held-out split would change.
    """
    cached = record.get("collection", {})
    for name, value in (collection or {}).items():
        if name in CurvatureConfig.COLLECTION_FIELDS and value != cached.get(name):
            raise ConfigError(f"{{{name}}} differs from the cache's {name}={cached.get(name)!r}; an extension keeps "
                              "the cache's collection settings", params={name: value}, field=name, value=value)
    corpora = list(record.get("corpora") or [])
    last = corpora[-1] if corpora else {}
    src = absolute_source(source) if source is not None else last.get("source")
    label = WIKIPEDIA if src is None else src
    same = [c for c in corpora if c.get("source") == label]
    defaults = CorpusConfig()
    if heldout_fraction is None:
        heldout_fraction = same[-1].get("heldout_fraction", defaults.heldout_fraction) if same else \
            defaults.heldout_fraction
    if any(c.get("heldout_fraction") != heldout_fraction for c in same):
        raise ConfigError(f"{{heldout_fraction}} differs from the one the cache used with corpus {label} "
                          f"({same[-1].get('heldout_fraction')}); changing it would move held-out documents into "
                          "the curvature", params={"heldout_fraction": heldout_fraction}, field="heldout_fraction",
                          value=heldout_fraction)
    if max_length is None:
        max_length = last.get("max_length", defaults.max_length)
    if seed is None:
        seed = max((int(c.get("seed", 0)) for c in corpora), default=-1) + 1
    if text_field is None:
        text_field = same[-1].get("text_field", defaults.text_field) if same else defaults.text_field
    return CorpusConfig(source=None if label == WIKIPEDIA else label, n_samples=n_samples, max_length=max_length,
                        seed=seed, heldout_fraction=heldout_fraction, text_field=text_field)


def _reconstructed(tokenizer, corpora: Sequence[Mapping[str, Any]]):
    """Each recorded corpus entry with the sequences it took, rebuilt from its source, seed and size: yields
    (index, entry, sequences), sequences None where the entry is not a text corpus (e.g. CrispEdit-Seq's edit
    statistics) or its rebuild does not match its recorded hash (the corpus changed). An entry that excluded
    earlier picks (an extension) excludes those of the entries before it with the same corpus and chunking."""
    from crispedit.data.corpus import build_corpus

    used: dict[tuple, set[tuple[int, ...]]] = {}
    ranked: dict[tuple, list[list[int]]] = {}
    for k, entry in enumerate(corpora):
        label = entry.get("source")
        if label is None or entry.get("split") != "train" or "max_length" not in entry:  # e.g. {"source": "edits"}
            yield k, entry, None
            continue
        max_length, split_seed = int(entry["max_length"]), int(entry.get("split_seed", 0))
        heldout = entry.get("heldout_fraction", CorpusConfig.heldout_fraction)
        text_field = entry.get("text_field", CorpusConfig.text_field)
        group = (label, max_length, heldout, split_seed, text_field)
        seed = int(entry.get("seed", 0))
        if group + (seed,) not in ranked:
            try:
                ranked[group + (seed,)] = build_corpus(
                    tokenizer, None if label == WIKIPEDIA else label, None, max_length, seed, heldout, "train",
                    split_seed=split_seed, text_field=text_field).sequences
            except CrispEditError:
                yield k, entry, None
                continue
        pool = ranked[group + (seed,)]
        seen = used.setdefault(group, set())
        if entry.get("excluded_previous"):
            pool = [s for s in pool if tuple(s) not in seen]
        picked = pool[: int(entry.get("n_samples", entry.get("n_sequences", 0)))]
        recorded = entry.get("sequences_sha256")
        if recorded is not None and sequences_sha256(picked) != recorded:
            yield k, entry, None
            continue
        seen.update(tuple(s) for s in picked)
        yield k, entry, picked


def used_sequences(tokenizer, corpora: Sequence[Mapping[str, Any]], plan: CorpusConfig) -> set[tuple[int, ...]]:
    """The sequences earlier collections took from the plan's corpus (same source, chunking and split),
    reconstructed from their seeds and sizes. An entry whose reconstruction does not match its recorded hash
    (the corpus changed) is skipped with a `CrispEditWarning`."""
    from crispedit.data.corpus import source_label

    label = source_label(plan.source)
    used: set[tuple[int, ...]] = set()
    for k, entry, picked in _reconstructed(tokenizer, corpora):
        if (entry.get("source"), entry.get("max_length"), entry.get("heldout_fraction"), entry.get("split"),
                entry.get("split_seed", 0)) != (label, plan.max_length, plan.heldout_fraction, "train", 0):
            continue
        if picked is None:
            warnings.warn(f"the sequences of the cache's corpus #{k + 1} ({label}, seed {entry.get('seed', 0)}) "
                          "cannot be reconstructed (the corpus changed?); the extension may repeat some of them",
                          CrispEditWarning, stacklevel=2)
            continue
        used.update(tuple(s) for s in picked)
    return used


def curvature_sequences(tokenizer, record: Mapping[str, Any], where: str = "the curvature") -> list[list[int]]:
    """Every sequence a cache's statistics were summed over, in its record's order, rebuilt from the record (the
    text it was collected on, to collect again at other weights).

    Raises:
        CrispEditError: an entry cannot be rebuilt (not a text corpus, or its hash no longer matches).
    """
    out: list[list[int]] = []
    for k, entry, picked in _reconstructed(tokenizer, record.get("corpora") or []):
        if picked is None:
            raise CrispEditError(f"{where}: its corpus #{k + 1} ({entry.get('source')!r}) cannot be rebuilt from its "
                                 "record (not a text corpus, or the text changed since it was collected)")
        out.extend(picked)
    if not out:
        raise CrispEditError(f"{where}: its record names no corpus to rebuild")
    return out


def unseen_sequences(tokenizer, record: Mapping[str, Any], plan: CorpusConfig,
                     where: str = "the cache") -> tuple[list[list[int]], dict[str, Any]]:
    """`plan.n_samples` chunks of the plan's corpus that the cache has not summed yet, ranked by the plan's
    seed, and their record entry."""
    from crispedit.data.corpus import build_corpus
    from crispedit.io import sha256_json

    ranked = build_corpus(tokenizer, plan.source, None, plan.max_length, plan.seed, plan.heldout_fraction, "train",
                          text_field=plan.text_field)
    used = used_sequences(tokenizer, record.get("corpora") or [], plan)
    fresh = [s for s in ranked.sequences if tuple(s) not in used]
    if len(fresh) < plan.n_samples:
        raise CrispEditError(f"corpus {ranked.source} has only {len(fresh)} chunks of ≤{plan.max_length} tokens in "
                             f"split 'train' that {where} does not hold yet, {plan.n_samples} asked; lower "
                             "{n_samples} or extend with another {source}",
                             params={"n_samples": ..., "source": ...})
    selected = fresh[: plan.n_samples]
    desc = corpus_record(ranked, plan.text_field)
    desc.update(n_samples=len(selected), n_tokens=sum(len(s) for s in selected), excluded_previous=True,
                n_excluded=len(used), sequences_sha256=sequences_sha256(selected))
    desc["fingerprint"] = sha256_json({"ranked": ranked.fingerprint, "n_samples": plan.n_samples,
                                       "excluded": sorted(used), "sequences": desc["sequences_sha256"]})
    return selected, desc


def extend_from_corpus(curvature: "Curvature", model, tokenizer, plan: CorpusConfig, *, targets: Any = None,
                       where: str = "curvature cache", pad_id: int | None = None, dist=None,
                       progress: bool = False) -> "Curvature":
    """`curvature` plus the statistics of `plan.n_samples` corpus chunks it has not seen (see `plan_extension`).

    Args:
        targets: a layer spec the caller asked for; it must select the cache's own targets.
        where: how messages name the cache (e.g. its path).
        pad_id: the padding id (default: the tokenizer's).

    Raises:
        CacheMismatchError: `model` is not the model the cache was computed for.
        ConfigError: `targets` selects other layers.
        CrispEditError: the corpus has fewer unseen chunks than asked.
    """
    from crispedit.models.runtime import pad_id_of
    from crispedit.models.targets import resolve_targets

    try:
        curvature.check_model(model, where=where)
    except CacheMismatchError as e:
        raise CacheMismatchError(f"cannot extend: {where} does not match this model ({'; '.join(e.diffs)}); "
                                 "extending needs the model the cache was computed for", diffs=e.diffs) from None
    if targets is not None and resolve_targets(model, targets) != curvature.targets:
        raise ConfigError(f"{{targets}} selects other layers than the cache's targets ({', '.join(curvature.targets)})"
                          "; an extension keeps the cache's targets", params={"targets": targets}, field="targets",
                          value=targets)
    seqs, desc = unseen_sequences(tokenizer, curvature.record, plan, where)
    logger.info("extending %s with %d new sequences (%s tokens) of %s", where, len(seqs), f"{desc['n_tokens']:,}",
                desc["source"])
    pad = pad_id_of(tokenizer) if pad_id is None else pad_id
    return curvature.extend(model, seqs, desc, pad_id=pad, dist=dist, progress=progress, checked=True)


__all__ = ["corpus_record", "curvature_sequences", "extend_from_corpus", "plan_extension", "sequences_sha256",
           "unseen_sequences"]
