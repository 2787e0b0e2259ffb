"""`crispedit curvature` (build or extend a cache), `curvature-merge` and `curvature-info`.

Every check that needs no model (option values, the output path, the corpus path, the cache to extend)
runs before the model is loaded, so a mistake costs no time and writes nothing. The cache is written
by rank 0 only, in one atomic rename (see `crispedit.curvature.cache`).

`--extend` adds sequences the cache has not seen: the chunks earlier collections took from the same
corpus are reconstructed (selection is a deterministic function of corpus, seed and size, and the
record keeps those) and left out, so an extension is disjoint from what is already summed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from crispedit.cli.common import (
    Command,
    UsageError,
    add_model_options,
    echo,
    explicit,
    format_table,
    fraction,
    nonnegative_int,
    positive_int,
)
from crispedit.cli.targets_cmd import LAYERS_HELP
from crispedit.errors import CrispEditError

LABELS = ("sampled", "empirical")
WIKIPEDIA = "wikipedia"  # crispedit.data.corpus.WIKIPEDIA (not imported here: keeps --help fast)
# Settings that define what a cache's sums mean: an extension must use the cache's own.
COLLECTION_OPTIONS = ("labels", "mc_samples", "sink_tokens", "sink_energy")


# ------------------------------------------------------------------------------------------ arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--layers", metavar="SPEC", help=LAYERS_HELP)
    p.add_argument("--corpus", metavar="PATH",
                   help="capability corpus: a .txt file (one document per non-empty line), a .jsonl file "
                        "(a text field per line), a folder of those, a MediaWiki .xml.bz2 dump, or 'wikipedia' "
                        "(default: the embedded Wikipedia excerpt)")
    p.add_argument("--text-field", default="text", help="the field holding the text in .jsonl corpora")
    p.add_argument("--samples", type=positive_int, default=200, help="corpus chunks (sequences) to collect over")
    p.add_argument("--max-length", type=positive_int, default=256, help="tokens per chunk, at most")
    p.add_argument("--labels", choices=LABELS, default="sampled",
                   help="sampled: labels drawn from the model (Gauss-Newton/true Fisher, the paper's curvature); "
                        "empirical: the corpus's next tokens")
    p.add_argument("--mc-samples", type=positive_int, default=1, help="sampled labels per position")
    p.add_argument("--sink-tokens", type=nonnegative_int, default=1,
                   help="leading positions per sequence kept out of A (attention sinks); their input "
                        "directions are never edited")
    p.add_argument("--sink-energy", type=fraction(high_open=False), default=0.99,
                   help="share of the sink positions' energy whose directions are removed")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward/backward pass")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="chooses the corpus chunks and sampled labels")
    p.add_argument("--heldout-fraction", type=fraction(low_open=False), default=0.1,
                   help="share of the corpus's documents kept out of the curvature for evaluation")
    p.add_argument("--out", required=True, metavar="CACHE", help="the cache folder to write")
    p.add_argument("--extend", action="store_true", default=False,
                   help="add more corpus to the existing cache CACHE (same model, same collection settings; "
                        "sequences already in it are left out)")
    p.add_argument("--force", action="store_true", default=False, help="overwrite an existing cache")


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("caches", nargs="*", metavar="CACHE", help="two or more caches of the same model and targets")
    p.add_argument("--out", required=True, metavar="CACHE", help="the merged cache to write")
    p.add_argument("--force", action="store_true", default=False, help="overwrite an existing cache")


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache", nargs="?", metavar="CACHE", help="a curvature cache folder")
    p.add_argument("--json", action="store_true", default=False, help="print the whole JSON record")


# ------------------------------------------------------------------------------------------ checks


def check_writable(out: Path) -> None:
    """The cache is written beside `out` and renamed into place: its nearest existing ancestor must be
    writable (checked now rather than after a long collection)."""
    import os

    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CrispEditError(f"cannot write the curvature cache {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CrispEditError(f"cannot write the curvature cache {out}: no write permission in {parent}")


def check_output(out: Path, force: bool) -> None:
    """Refuse to replace anything but a curvature cache, and a cache without --force."""
    from crispedit.curvature.cache import RECORD

    check_writable(out)
    if not out.exists() and not out.is_symlink():
        return
    if not (out.is_dir() and (out / RECORD).is_file()):
        raise CrispEditError(f"refusing to write a curvature cache to {out}: it exists and is not a crispedit "
                             "curvature cache; choose another --out")
    if not force:
        raise CrispEditError(f"curvature cache {out} already exists; pass --force to overwrite it, or --extend "
                             "to add more corpus to it")


def check_corpus_path(corpus: str | None) -> None:
    if corpus is None or corpus == WIKIPEDIA:
        return
    if not Path(corpus).expanduser().exists():
        raise CrispEditError(f"corpus not found: {corpus} (expected a .txt or .jsonl file, a folder of them, "
                             f"a MediaWiki .xml.bz2 dump, or {WIKIPEDIA!r})")


def corpus_source(corpus: str | None) -> str | None:
    """The corpus as build_corpus and the cache record name it: absolute paths, so that the record means
    the same from any working directory."""
    if corpus is None or corpus == WIKIPEDIA:
        return corpus
    return str(Path(corpus).expanduser().resolve())


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def extension_settings(args: argparse.Namespace, record: dict[str, Any]) -> dict[str, Any]:
    """Corpus settings for --extend: the user's where given, else those of the cache's last corpus; the
    collection settings must be the cache's (they define what the sums mean)."""
    collection = record.get("collection", {})
    for dest in COLLECTION_OPTIONS:
        if explicit(args, dest) and getattr(args, dest) != collection.get(dest):
            raise UsageError(f"{_flag(dest)} {getattr(args, dest)} differs from the cache's {dest}="
                             f"{collection.get(dest)!r}; --extend keeps the cache's collection settings")
    corpora = record.get("corpora") or []
    last = corpora[-1] if corpora else {}
    source = corpus_source(args.corpus) if explicit(args, "corpus") else last.get("source", args.corpus)
    label = WIKIPEDIA if source is None else source
    same = [c for c in corpora if c.get("source") == label]
    heldout = args.heldout_fraction
    if not explicit(args, "heldout_fraction") and same:
        heldout = same[-1].get("heldout_fraction", heldout)
    if any(c.get("heldout_fraction") != heldout for c in same):
        raise UsageError(f"--heldout-fraction {heldout} differs from the one the cache used with corpus {label} "
                         f"({same[-1].get('heldout_fraction')}); changing it would move held-out documents "
                         "into the curvature")
    max_length = args.max_length if explicit(args, "max_length") else last.get("max_length", args.max_length)
    seed = args.seed if explicit(args, "seed") else max((int(c.get("seed", 0)) for c in corpora), default=-1) + 1
    return {"source": None if label == WIKIPEDIA else source, "max_length": int(max_length),
            "heldout_fraction": float(heldout), "seed": int(seed)}


# ------------------------------------------------------------------------------------------ corpus


def sequences_sha256(seqs: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(seqs).encode()).hexdigest()


def describe_corpus(corpus, text_field: str) -> dict[str, Any]:
    desc = corpus.describe()
    desc.update(text_field=text_field, sequences_sha256=sequences_sha256(corpus.sequences))
    return desc


def previously_used(tokenizer, corpora: list[dict[str, Any]], source: str | None, max_length: int,
                    heldout_fraction: float, text_field: str) -> set[tuple[int, ...]]:
    """The sequences earlier collections took from this corpus (same source, chunking and split),
    reconstructed from their seeds and sizes; an entry whose reconstruction does not match its recorded
    hash (the corpus file changed) is skipped with a warning."""
    from crispedit.data.corpus import build_corpus, source_label

    label = source_label(source)
    used: set[tuple[int, ...]] = set()
    ranked_by_seed: dict[int, list[list[int]]] = {}
    for k, entry in enumerate(corpora):
        if (entry.get("source"), entry.get("max_length"), entry.get("heldout_fraction"), entry.get("split"),
                entry.get("split_seed", 0)) != (label, max_length, heldout_fraction, "train", 0):
            continue
        seed = int(entry.get("seed", 0))
        if seed not in ranked_by_seed:
            ranked_by_seed[seed] = build_corpus(tokenizer, source, None, max_length, seed, heldout_fraction,
                                                "train", text_field=text_field).sequences
        pool = ranked_by_seed[seed]
        if entry.get("excluded_previous"):
            pool = [s for s in pool if tuple(s) not in used]
        picked = pool[: int(entry.get("n_samples", entry.get("n_sequences", 0)))]
        recorded = entry.get("sequences_sha256")
        if recorded is not None and sequences_sha256(picked) != recorded:
            echo(f"warning: the sequences of the cache's corpus #{k + 1} ({label}, seed {seed}) cannot be "
                 "reconstructed (the corpus changed?); the extension may repeat some of them", file=sys.stderr)
            continue
        used.update(tuple(s) for s in picked)
    return used


def extension_corpus(tokenizer, record: dict[str, Any], settings: dict[str, Any], n_samples: int,
                     text_field: str, where: Path) -> tuple[list[list[int]], dict[str, Any]]:
    """n_samples chunks of the corpus that the cache has not seen, ranked by the extension's seed."""
    from crispedit.data.corpus import build_corpus
    from crispedit.io import sha256_json

    src, L, hf, seed = settings["source"], settings["max_length"], settings["heldout_fraction"], settings["seed"]
    ranked = build_corpus(tokenizer, src, None, L, seed, hf, "train", text_field=text_field)
    used = previously_used(tokenizer, record.get("corpora") or [], src, L, hf, text_field)
    fresh = [s for s in ranked.sequences if tuple(s) not in used]
    if len(fresh) < n_samples:
        raise CrispEditError(f"corpus {ranked.source} has only {len(fresh)} chunks of ≤{L} tokens in split 'train' "
                             f"that {where} does not hold yet, {n_samples} asked; lower --samples or extend with "
                             "another --corpus")
    selected = fresh[:n_samples]
    desc = describe_corpus(ranked, text_field)
    desc.update(n_samples=len(selected), n_tokens=sum(len(s) for s in selected), excluded_previous=True,
                n_excluded=len(used), sequences_sha256=sequences_sha256(selected))
    desc["fingerprint"] = sha256_json({"ranked": ranked.fingerprint, "n_samples": n_samples,
                                       "excluded": sorted(used), "sequences": desc["sequences_sha256"]})
    return selected, desc


# ------------------------------------------------------------------------------------------ summaries


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_summary(record: dict[str, Any], path: Path | None = None) -> str:
    """What a cache holds and what it implies for editing, from its JSON record (no tensors needed)."""
    m, coll = record.get("model", {}), record.get("collection", {})
    lines = []
    if path is not None:
        sizes = {f.name: f.stat().st_size for f in path.iterdir() if f.is_file()}
        lines.append(f"cache      {path} (format v{record.get('format_version')}, crispedit "
                     f"{record.get('crispedit_version')}, {sum(sizes.values()) / 1e6:.1f} MB, "
                     f"created {record.get('created', '?')})")
    n_params = m.get("num_parameters") or 0
    size = f"{n_params / 1e6:.1f} M" if n_params >= 1e6 else f"{n_params:,}"
    lines.append(f"model      {m.get('name_or_path')} ({m.get('model_type')}, {size} parameters, {m.get('dtype')}); "
                 f"targeted weights sha256 {str(m.get('weights_sha256'))[:12]}")
    n_mc = coll.get("mc_samples", 1)
    mc = f", {n_mc} sampled label{'s' if n_mc != 1 else ''} per position" if coll.get("labels") == "sampled" else ""
    lines.append(f"labels     {coll.get('labels')}{mc}; statistics in {record.get('stats_dtype', 'float64')}, "
                 f"model in {record.get('model_dtype')}")
    for c in record.get("corpora", []):
        extra = ", new sequences only" if c.get("excluded_previous") else ""
        lines.append(f"corpus     {c.get('source')} ({c.get('split', 'train')} split, held-out fraction "
                     f"{c.get('heldout_fraction')}): {c.get('n_samples')} sequences, {c.get('n_tokens', 0):,} tokens, "
                     f"max length {c.get('max_length')}, seed {c.get('seed')}{extra}; fingerprint "
                     f"{str(c.get('fingerprint'))[:12]}")
    sink = coll.get("sink_tokens", 0)
    sink_note = (f"; the first {sink} position(s) of each sequence kept apart as attention sinks" if sink
                 else "; no sink positions kept apart")
    lines.append(f"tokens     {record.get('n_tokens', 0):,} in A and S{sink_note}")

    kept = record.get("kept", {})
    gammas = list(kept)
    summary = record.get("summary", {})
    headers = ["target", "W (out x in)", "A top-1 %", "with sink %", "sink dirs"] + [f"γ={g}" for g in gammas]
    rows = []
    for t in record.get("targets", []):
        n, s = t["name"], summary.get(t["name"], {})
        row = [n, f"{t['d_out']}x{t['d_in']}", _pct(s.get("A_top1_energy")),
               _pct(s.get("A_top1_energy_if_sink_kept")), s.get("sink_directions_removed", "-")]
        for g in gammas:
            k = kept[g].get(n, {})
            row.append(f"{_pct(k.get('layer', {}).get('kept_fraction'))}/{_pct(k.get('global', {}).get('kept_fraction'))}")
        rows.append(row)
    lines.append("")
    lines.append(format_table(headers, rows))
    lines.append("")
    lines.append("γ=...: % of the weight directions (d_out·d_in) an edit may move in at energy threshold γ, "
                 "threshold per layer / global across the targets.")
    lines.append("A top-1: share of A's trace in its largest eigenvalue with the sink positions kept apart; "
                 "'with sink': if they were in A. Sink directions are never edited.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ commands


def _strip_override_hint(e: CrispEditError) -> str:
    text = str(e)
    return text.split("; recompute it, or pass --allow-cache-mismatch")[0]


def run_curvature(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    out = Path(args.out).expanduser()
    if args.extend and args.force:
        raise UsageError("--extend adds to the cache in place; it cannot be combined with --force")
    check_corpus_path(args.corpus)
    record = None
    settings = {"source": corpus_source(args.corpus), "max_length": args.max_length,
                "heldout_fraction": args.heldout_fraction, "seed": args.seed}
    if args.extend:
        from crispedit.curvature.cache import read_record

        if not out.exists():
            raise CrispEditError(f"--extend: curvature cache {out} does not exist; run without --extend to create it")
        record = read_record(out)
        check_writable(out)
        settings = extension_settings(args, record)
        check_corpus_path(settings["source"])
    else:
        check_output(out, args.force)

    from crispedit.cli.common import load_model_from_args
    from crispedit.curvature.api import Curvature, CurvatureConfig
    from crispedit.curvature.cache import CacheMismatchError, read_record
    from crispedit.curvature.distributed import init_distributed, is_main, shutdown
    from crispedit.data.corpus import build_corpus
    from crispedit.models import resolve_targets

    ctx = init_distributed(device=args.device)
    try:
        if ctx.world_size > 1 and args.device_map:
            raise UsageError("--device-map cannot be used under torchrun: each rank holds a whole model on its "
                             "own device")
        model, tokenizer = load_model_from_args(args, device=str(ctx.device) if args.device_map is None else None)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if args.extend:
            cur = Curvature.load(out, allow_mismatch=True)
            try:
                cur.check_model(model, where=str(out))
            except CacheMismatchError as e:
                raise CacheMismatchError(f"cannot extend: {_strip_override_hint(e)}; --extend needs the model "
                                         "the cache was computed for") from None
            if args.layers and resolve_targets(model, args.layers) != cur.targets:
                raise UsageError(f"--layers {args.layers!r} selects other layers than the cache's targets "
                                 f"({', '.join(cur.targets)}); --extend keeps the cache's targets")
            seqs, desc = extension_corpus(tokenizer, record, settings, args.samples, args.text_field, out)
            echo(f"extending {out} with {len(seqs)} new sequences ({desc['n_tokens']:,} tokens) of {desc['source']}")
            t_collect = time.perf_counter()
            cur = cur.extend(model, seqs, desc, pad_id=pad_id, dist=ctx, progress=is_main(ctx))
        else:
            targets = resolve_targets(model, args.layers)
            corpus = build_corpus(tokenizer, settings["source"], args.samples, args.max_length, args.seed,
                                  args.heldout_fraction, "train", text_field=args.text_field)
            cfg = CurvatureConfig(labels=args.labels, mc_samples=args.mc_samples, seed=args.seed,
                                  sink_tokens=args.sink_tokens, sink_energy=args.sink_energy,
                                  batch_size=args.batch_size)
            echo(f"collecting curvature of {len(targets)} target(s) over {corpus.n_samples} sequences "
                 f"({corpus.n_tokens:,} tokens) of {corpus.source}, {args.labels} labels")
            t_collect = time.perf_counter()
            cur = Curvature.compute(model, targets, corpus.sequences, describe_corpus(corpus, args.text_field),
                                    cfg, pad_id=pad_id, dist=ctx, progress=is_main(ctx))
        collect_s = time.perf_counter() - t_collect
        if is_main(ctx):
            cur.save(out, overwrite=True)
            saved = read_record(out)
            echo(format_summary(saved, out))
            procs = f" on {ctx.world_size} processes" if ctx.world_size > 1 else ""
            echo(f"\nwrote {out} in {time.perf_counter() - t_start:.1f} s (collection and eigendecomposition "
                 f"{collect_s:.1f} s{procs})")
    finally:
        shutdown(ctx)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from crispedit.curvature.api import Curvature
    from crispedit.curvature.cache import read_record

    t0 = time.perf_counter()
    if len(args.caches) < 2:
        raise UsageError("curvature-merge needs at least two caches (see `crispedit curvature-merge --help`)")
    out = Path(args.out).expanduser()
    for c in args.caches:
        read_record(c)  # every input is a readable cache before anything is loaded
    check_output(out, args.force)
    merged = Curvature.load(args.caches[0])
    for c in args.caches[1:]:
        merged = merged.merge(Curvature.load(c))
    merged.save(out, overwrite=True)
    echo(format_summary(read_record(out), out))
    echo(f"\nmerged {len(args.caches)} caches into {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from crispedit.curvature.cache import read_record

    if not args.cache:
        raise UsageError("missing CACHE (see `crispedit curvature-info --help`)")
    path = Path(args.cache).expanduser()
    record = read_record(path)
    echo(json.dumps(record, indent=2) if args.json else format_summary(record, path))
    return 0


COMMANDS = [
    Command("curvature", "collect a capability curvature cache (K-FAC statistics and eigenbases)", add_arguments,
            run_curvature,
            description="Collect K-FAC statistics of the target layers over the training split of a capability "
                        "corpus, decompose them and write a cache. Under `torchrun --nproc_per_node N -m "
                        "crispedit curvature ...` the ranks share the corpus and rank 0 writes the cache."),
    Command("curvature-merge", "merge curvature caches of the same model (sums and token counts add)",
            add_merge_arguments, run_merge, spellings=(("curvature", "merge"),)),
    Command("curvature-info", "print what a curvature cache holds", add_info_arguments, run_info,
            spellings=(("curvature", "info"),)),
]
