"""Benchmark of curvature collection on the embedded SmolLM2-135M (not a test: it prints measurements).

What it measures, in one run so that all numbers share the machine's conditions:
  (a) plain forward+backward tokens/s: `loss.backward()` with every parameter requiring grad, as
      fine-tuning does (the cost the issue compares against);
  (b) K-FAC collection tokens/s with `sampled` and with `empirical` labels (crispedit's collector:
      frozen parameters, gradients w.r.t. the target layers' outputs only), and the ratio
      collection / plain for each (target >= 0.85);
  (c) eigendecomposition time per target, as the cache stores it (float64 eigh of S, and of A with the
      sink directions split off);
  (d) cache bytes on disk against sum over targets of (d_in^2 + d_out^2) * 8 bytes (the two float64 factors),
      for the statistics file alone and for statistics + eigenbases (the sink sum A_sink is stored as a
      low-rank factor; its rank is printed);
  (e) the largest probability tensor the collector forms when it builds output gradients (a chunk of
      `SOFTMAX_CHUNK` logits) against the float32 [batch, length, vocabulary] tensor an unchunked softmax
      would hold.

The machine may be shared with other processes, so the three methods are interleaved batch by batch
(each batch runs plain, sampled, empirical back to back) after a warm-up, and the figures reported are
medians over batches and repeats; the collection/plain ratio is the median of the per-batch paired ratios.

    python benchmarks/bench_curvature.py [--chunks 64] [--length 256] [--batch-size 8] [--repeats 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from crispedit import __version__
from crispedit.curvature.api import Curvature, CurvatureConfig
from crispedit.curvature.cache import EIGEN, RECORD, STATS, sink_factor
from crispedit.curvature.collect import SOFTMAX_CHUNK, CollectConfig, collect_lm_stats, empty_stats
from crispedit.curvature.eigen import eigendecompose
from crispedit.data.corpus import build_corpus
from crispedit.models import EMBEDDED_MODEL, load_model, resolve_targets

METHODS = ("plain", "sampled", "empirical")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_curvature.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--chunks", type=int, default=64, help="number of Wikipedia chunks (default 64)")
    p.add_argument("--length", type=int, default=256, help="tokens per chunk (default 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="passes over the data per method (default 1)")
    p.add_argument("--eigh-repeats", type=int, default=3)
    p.add_argument("--sink-tokens", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    for name in ("chunks", "length", "batch_size", "repeats", "eigh_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def full_length_chunks(tokenizer, n: int, length: int) -> list[list[int]]:
    """n chunks of exactly `length` tokens from the embedded Wikipedia excerpt's training split, so every
    batch has the same shape and no padding (tokens/s then compares like with like)."""
    corpus = build_corpus(tokenizer, None, n_samples=None, max_length=length, seed=0)
    full = [s for s in corpus.sequences if len(s) == length]
    if len(full) < n:
        raise SystemExit(f"only {len(full)} Wikipedia chunks of {length} tokens; ask for fewer --chunks")
    return full[:n]


def plain_step(model, ids: torch.Tensor) -> None:
    """One fine-tuning style step without the optimizer: mean next-token loss, backward into every .grad."""
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    out.loss.backward()
    model.zero_grad(set_to_none=True)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_load = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_s = time.perf_counter() - t_load
    targets = resolve_targets(model, None)
    seqs = full_length_chunks(tokenizer, args.chunks, args.length)
    batches = [seqs[i:i + args.batch_size] for i in range(0, len(seqs), args.batch_size)]
    modules = {n: model.get_submodule(n) for n in targets}
    cfgs = {m: CollectConfig(labels=m, seed=0, sink_tokens=args.sink_tokens) for m in ("sampled", "empirical")}
    stats = {m: empty_stats(modules, sink=args.sink_tokens > 0) for m in cfgs}

    def collect(method: str, batch: list[list[int]], first: int) -> None:
        # Global sequence indices: each sequence draws its own labels (as in one collection over all chunks).
        collect_lm_stats(model, batch, targets, cfgs[method], batch_size=len(batch), max_tokens=None,
                         stats=stats[method], progress=False, indices=range(first, first + len(batch)))

    def run(method: str, batch: list[list[int]], first: int = 0) -> float:
        if method == "plain":
            return timed(lambda: plain_step(model, torch.tensor(batch)))
        return timed(lambda: collect(method, batch, first))

    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, loaded in "
          f"{load_s:.1f} s), targets {', '.join(targets)}", flush=True)
    print(f"data: {len(seqs)} Wikipedia chunks x {args.length} tokens in {len(batches)} batches of "
          f"{args.batch_size}; torch threads {torch.get_num_threads()}", flush=True)

    # Warm-up on a short batch (allocators, kernels), discarded: its statistics go to throwaway sums.
    warm = [s[: min(64, args.length)] for s in batches[0][:2]]
    saved = {m: s for m, s in stats.items()}
    stats = {m: empty_stats(modules, sink=args.sink_tokens > 0) for m in cfgs}
    for method in METHODS:
        run(method, warm)
    stats = saved

    times: dict[str, list[float]] = {m: [] for m in METHODS}
    ratios: dict[str, list[float]] = {m: [] for m in ("sampled", "empirical")}
    tokens_per_batch = []
    for rep in range(args.repeats):
        for b, batch in enumerate(batches):
            row = {}
            for method in METHODS:
                row[method] = run(method, batch, b * args.batch_size)
                times[method].append(row[method])
            tokens_per_batch.append(sum(len(s) for s in batch))
            for m in ratios:
                ratios[m].append(row["plain"] / row[m])  # tokens/s ratio = inverse time ratio (same tokens)
            print(f"  repeat {rep + 1} batch {b + 1}/{len(batches)}: " +
                  ", ".join(f"{m} {row[m]:.1f} s" for m in METHODS), flush=True)

    tps = {m: [tok / t for tok, t in zip(tokens_per_batch, times[m])] for m in METHODS}
    throughput = {m: {"median_tokens_per_s": statistics.median(v), "min": min(v), "max": max(v),
                      "total_s": sum(times[m])} for m, v in tps.items()}
    ratio = {m: {"median_paired_ratio": statistics.median(v), "min": min(v), "max": max(v),
                 "meets_0.85": statistics.median(v) >= 0.85} for m, v in ratios.items()}

    # (c) eigendecomposition per target (on the empirical statistics; the cost does not depend on labels)
    model.zero_grad(set_to_none=True)
    eig = {}
    for name, s in stats["empirical"].items():
        ts = [timed(lambda: eigendecompose(s)) for _ in range(args.eigh_repeats)]
        eig[name] = {"d_in": s.d_in, "d_out": s.d_out, "median_s": statistics.median(ts), "all_s": ts}

    # (d) cache bytes on disk against the two float64 factors per target
    record = {"collection": dataclasses.asdict(CurvatureConfig(labels="empirical", sink_tokens=args.sink_tokens)),
              "targets": [{"name": n, "d_in": s.d_in, "d_out": s.d_out} for n, s in stats["empirical"].items()]}
    cur = Curvature.from_stats(stats["empirical"], record)
    factors = sum((s.d_in ** 2 + s.d_out ** 2) * 8 for _, s in stats["empirical"].items())
    with tempfile.TemporaryDirectory() as tmp:
        path = cur.save(Path(tmp) / "cache")
        sizes = {f: (path / f).stat().st_size for f in (STATS, EIGEN, RECORD)}
    sink_rank = {n: int(sink_factor(s.A_sink).shape[1]) for n, s in stats["empirical"].items()
                 if s.A_sink is not None}
    cache = {
        "sink_factor_rank": sink_rank,
        "factor_bytes": factors,
        "stats_bytes": sizes[STATS],
        "eigen_bytes": sizes[EIGEN],
        "record_bytes": sizes[RECORD],
        "stats_over_factors": sizes[STATS] / factors,
        "stats_plus_eigen_over_factors": (sizes[STATS] + sizes[EIGEN]) / factors,
        "note": ("stats.safetensors also holds the sink positions' sum as a d_in x rank factor (or whole when "
                 "that is not smaller); eigen.safetensors holds U_A, U_S (same sizes as A, S) and the eigenvalues"),
    }
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = max(1, SOFTMAX_CHUNK // vocab)
    softmax = {"vocabulary": vocab, "chunk_positions": rows, "chunk_bytes_float32": rows * vocab * 4,
               "unchunked_bytes_float32": args.batch_size * args.length * vocab * 4}

    result = {
        "crispedit_version": __version__,
        "torch": torch.__version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch_threads": torch.get_num_threads()},
        "model": args.model,
        "targets": targets,
        "data": {"chunks": len(seqs), "length": args.length, "batch_size": args.batch_size,
                 "repeats": args.repeats, "tokens_per_pass": sum(tokens_per_batch[: len(batches)])},
        "throughput": throughput,
        "collection_over_plain": ratio,
        "eigendecompose": eig,
        "cache": cache,
        "output_gradient_softmax": softmax,
        "raw_batch_seconds": times,
    }
    print()
    print(f"{'method':<12}{'tokens/s (median)':>20}{'min':>10}{'max':>10}{'collection/plain':>20}")
    for m in METHODS:
        r = f"{ratio[m]['median_paired_ratio']:.2f}" if m in ratio else "-"
        t = throughput[m]
        print(f"{m:<12}{t['median_tokens_per_s']:>20.1f}{t['min']:>10.1f}{t['max']:>10.1f}{r:>20}")
    print()
    print(f"{'target':<36}{'W shape':>14}{'eigendecompose s (median)':>28}")
    for name, e in eig.items():
        print(f"{name:<36}{str(e['d_out']) + 'x' + str(e['d_in']):>14}{e['median_s']:>28.3f}")
    print()
    print(f"cache bytes: stats {sizes[STATS]:,} ({cache['stats_over_factors']:.2f}x the factors' "
          f"{factors:,}); stats+eigen {sizes[STATS] + sizes[EIGEN]:,} "
          f"({cache['stats_plus_eigen_over_factors']:.2f}x); record {sizes[RECORD]:,}; sink factor rank "
          + ", ".join(str(r) for r in sink_rank.values()))
    print(f"output gradients: probabilities formed {rows} positions at a time ({softmax['chunk_bytes_float32'] / 1e6:.1f} MB "
          f"float32) instead of a [{args.batch_size}, {args.length}, {vocab}] tensor "
          f"({softmax['unchunked_bytes_float32'] / 1e6:.0f} MB)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
