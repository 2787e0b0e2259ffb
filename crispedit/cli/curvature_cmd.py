"""`crispedit curvature` (build or extend a cache), `curvature-merge` and `curvature-info`.

Every check that needs no model (option values, the output path, the corpus path, the cache to extend and
the extension's settings) runs before the model is loaded, so a mistake costs no time and writes nothing. The
cache is written by rank 0 only, in one atomic rename (see `crispedit.curvature.cache`). `--extend` is
`crispedit.curvature.extend`: settings not given are inherited from the cache.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from crispedit.cli.common import (
    Command,
    UsageError,
    add_config_options,
    add_model_options,
    config_from_args,
    echo,
    given,
)
from crispedit.config import CorpusConfig, CurvatureConfig
from crispedit.errors import CrispEditError

WIKIPEDIA = "wikipedia"  # crispedit.data.corpus.WIKIPEDIA (not imported here: keeps --help fast)


# ------------------------------------------------------------------------------------------ arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_config_options(p, CurvatureConfig)
    add_config_options(p, CorpusConfig, exclude=("seed",))  # --seed (CurvatureConfig) also picks the chunks
    p.add_argument("--out", required=True, metavar="CACHE", help="the cache folder to write")
    p.add_argument("--extend", action="store_true", default=False,
                   help="add more corpus to the existing cache CACHE (same model, same collection settings; "
                        "sequences already in it are left out; corpus settings not given are the cache's)")
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
    """The cache is written beside `out` and renamed into place: checked now rather than after a long collection."""
    from crispedit.io import check_writable as probe

    probe(out, "curvature cache")


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


# ------------------------------------------------------------------------------------------ commands


def run_curvature(args: argparse.Namespace) -> int:
    from crispedit.curvature.extend import absolute_source, plan_extension

    t_start = time.perf_counter()
    out = Path(args.out).expanduser()
    if args.extend and args.force:
        raise UsageError("--extend adds to the cache in place; it cannot be combined with --force")
    cfg = config_from_args(args, CurvatureConfig)
    corpus_cfg = config_from_args(args, CorpusConfig, source=absolute_source(args.source))
    check_corpus_path(corpus_cfg.source)
    plan = None
    if args.extend:
        from crispedit.curvature.cache import read_record

        if not out.exists():
            raise CrispEditError(f"--extend: curvature cache {out} does not exist; run without --extend to create it")
        record = read_record(out)
        check_writable(out)
        chosen = given(args, CorpusConfig)
        plan = plan_extension(record, corpus_cfg.n_samples, **{k: v for k, v in chosen.items() if k != "n_samples"},
                              collection=given(args, CurvatureConfig))
        check_corpus_path(plan.source)
    else:
        check_output(out, args.force)
    from crispedit.io import check_apart_from_inputs
    from crispedit.models.loading import model_source_path

    check_apart_from_inputs(out, [model_source_path(args.model), corpus_cfg.source], "curvature cache")

    from crispedit.cli.common import load_model_from_args
    from crispedit.curvature.api import Curvature
    from crispedit.curvature.cache import read_record
    from crispedit.curvature.distributed import init_distributed, is_main, shutdown
    from crispedit.curvature.extend import corpus_record, extend_from_corpus
    from crispedit.curvature.summary import format_summary
    from crispedit.data.corpus import build_corpus
    from crispedit.models import resolve_targets
    from crispedit.models.runtime import pad_id_of

    ctx = init_distributed(device=args.device)
    try:
        if ctx.world_size > 1 and args.device_map:
            raise UsageError("--device-map cannot be used under torchrun: each rank holds a whole model on its "
                             "own device")
        model, tokenizer = load_model_from_args(args, device=str(ctx.device) if args.device_map is None else None)
        progress = is_main(ctx)
        if plan is not None:
            cur = Curvature.load(out, allow_mismatch=True)
            t_collect = time.perf_counter()
            cur = extend_from_corpus(cur, model, tokenizer, plan, targets=cfg.targets, where=str(out),
                                     pad_id=pad_id_of(tokenizer), dist=ctx, progress=progress)
            new = cur.record["corpora"][-1]
            echo(f"extended {out} with {new['n_samples']} new sequences ({new['n_tokens']:,} tokens) of "
                 f"{new['source']}")
        else:
            targets = resolve_targets(model, cfg.targets)
            corpus = build_corpus(tokenizer, corpus_cfg.source, corpus_cfg.n_samples, corpus_cfg.max_length,
                                  cfg.seed, corpus_cfg.heldout_fraction, "train", text_field=corpus_cfg.text_field,
                                  progress=progress)
            echo(f"collecting curvature of {len(targets)} target(s) over {corpus.n_samples} sequences "
                 f"({corpus.n_tokens:,} tokens) of {corpus.source}, {cfg.labels} labels")
            t_collect = time.perf_counter()
            cur = Curvature.compute(model, targets, corpus.sequences, corpus_record(corpus, corpus_cfg.text_field),
                                    cfg, pad_id=pad_id_of(tokenizer), dist=ctx, progress=progress)
        collect_s = time.perf_counter() - t_collect
        if is_main(ctx):
            cur.save(out, overwrite=True)
            echo(format_summary(read_record(out), out))
            procs = f" on {ctx.world_size} processes" if ctx.world_size > 1 else ""
            echo(f"\nwrote {out} in {time.perf_counter() - t_start:.1f} s (collection and eigendecomposition "
                 f"{collect_s:.1f} s{procs})")
    finally:
        shutdown(ctx)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from crispedit.curvature.api import Curvature
    from crispedit.curvature.cache import read_record
    from crispedit.curvature.summary import format_summary

    t0 = time.perf_counter()
    if len(args.caches) < 2:
        raise UsageError("curvature-merge needs at least two caches (see `crispedit curvature-merge --help`)")
    out = Path(args.out).expanduser()
    for c in args.caches:
        read_record(c)  # every input is a readable cache before anything is loaded
    check_output(out, args.force)
    from crispedit.io import check_apart_from_inputs

    check_apart_from_inputs(out, args.caches, "merged cache")
    merged = Curvature.load(args.caches[0])
    for c in args.caches[1:]:
        merged = merged.merge(Curvature.load(c))
    merged.save(out, overwrite=True)
    echo(format_summary(read_record(out), out))
    echo(f"\nmerged {len(args.caches)} caches into {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from crispedit.curvature.cache import read_record
    from crispedit.curvature.summary import format_summary

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
