"""`crispedit study mnist`: the paper's controlled study (MNIST → Fashion-MNIST, exact vs approximate curvature)."""

from __future__ import annotations

import argparse

from crispedit.cli.common import Command, UsageError, echo


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", choices=("mnist",), help="the study to run")
    p.add_argument("--out", default="study-mnist", help="folder for study_mnist*.json and study_mnist.png")
    p.add_argument("--quick", action="store_true", default=False, help="the reduced sweep (a smoke run)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU cores to use: that many worker processes, one thread each")
    p.add_argument("--hidden", type=_positive_int, default=None,
                   help="hidden units of the fine-tuned head (default 84, the paper's; 16: the small study)")
    p.add_argument("--seeds", type=_positive_int, default=None, help="fine-tuning seeds per point (default 3)")


def run(args: argparse.Namespace) -> int:
    from crispedit.study.sweep import json_name, run_study

    if args.which != "mnist":
        raise UsageError(f"unknown study {args.which!r}")

    res = run_study(args.out, quick=args.quick, progress=True, threads=args.threads, hidden=args.hidden,
                    seeds=args.seeds)
    echo(f"{len(res.get('points', []))} points → {args.out}/{json_name(res['hidden'])} (+ study_mnist.png)")
    return 0


COMMANDS = [Command("study", "controlled curvature study: `crispedit study mnist`", add_arguments, run)]
