"""`crispedit demo`: curvature → FT and CrispEdit edits → evaluation → report folder, on the embedded defaults."""

from __future__ import annotations

import argparse

from crispedit.cli.common import Command, add_config_options, config_from_args, echo
from crispedit.config import DemoConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_options(p, DemoConfig)


def run(args: argparse.Namespace) -> int:
    from crispedit.demo import run_demo

    run_demo(config_from_args(args, DemoConfig), progress=True, echo=echo)
    return 0


COMMANDS = [Command("demo", "the main job on the embedded defaults (SmolLM2, Wikipedia, CounterFact)", add_arguments, run)]
