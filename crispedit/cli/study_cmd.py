"""`crispedit study mnist`: the paper's controlled study (MNIST → Fashion-MNIST, exact vs approximate curvature)."""

from __future__ import annotations

import argparse

from crispedit.cli.common import Command, UsageError, echo


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", choices=("mnist",), help="the study to run")
    p.add_argument("--out", default="study-mnist", help="folder for study_mnist.json and study_mnist.png")
    p.add_argument("--quick", action="store_true", default=False, help="the reduced sweep (a smoke run)")
    p.add_argument("--threads", type=_threads, default=None, help="torch threads for the dense matrices")


def run(args: argparse.Namespace) -> int:
    from crispedit.study.sweep import run_study

    if args.which != "mnist":
        raise UsageError(f"unknown study {args.which!r}")
    res = run_study(args.out, quick=args.quick, progress=True, threads=args.threads)
    echo(f"{len(res.get('points', []))} points → {args.out}/study_mnist.json (+ study_mnist.png)")
    return 0


COMMANDS = [Command("study", "controlled curvature study: `crispedit study mnist`", add_arguments, run)]
