"""`crispedit demo`: curvature → FT and CrispEdit edits → evaluation → report folder, on the embedded defaults."""

from __future__ import annotations

import argparse

from crispedit.cli.common import Command, echo, fraction, nonnegative_int, positive_float, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="crispedit-demo", help="report folder")
    p.add_argument("--edits", type=positive_int, default=10, dest="n_edits", help="number of edits")
    p.add_argument("--samples", type=positive_int, default=32, help="Wikipedia chunks for the curvature")
    p.add_argument("--max-length", type=positive_int, default=128)
    p.add_argument("--heldout-samples", type=positive_int, default=16)
    p.add_argument("--gamma", type=fraction(), default=0.9)
    p.add_argument("--lr", type=positive_float, default=5e-3)
    p.add_argument("--epochs", type=positive_int, default=25)
    p.add_argument("--benchmark-limit", type=nonnegative_int, default=0, help="MMLU/ARC items (0: skip)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from crispedit.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=args.out, n_edits=args.n_edits, samples=args.samples, max_length=args.max_length,
                     heldout_samples=args.heldout_samples, gamma=args.gamma, lr=args.lr, epochs=args.epochs,
                     benchmark_limit=args.benchmark_limit, device=args.device, dtype=args.dtype, seed=args.seed)
    run_demo(cfg, echo=echo)
    return 0


COMMANDS = [Command("demo", "the main job on the embedded defaults (SmolLM2, Wikipedia, CounterFact)", add_arguments, run)]
