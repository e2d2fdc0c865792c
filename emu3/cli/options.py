"""Command-line options that are checked as they are parsed.

`ArgumentParser` reports a bad option as one `error: argument --x: ...` line with exit status 2
(through emu3.cli.errors.command) instead of argparse's usage block. `integer` and `real` make
argparse types that refuse NaN, infinities, fractions where a count is needed and values out of
range, so every number is checked before anything is loaded.
"""

import argparse
import os
import sys

from emu3 import checks


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        command = os.path.basename(sys.argv[0])
        if command.startswith("emu3-"):  # a console script (pyproject.toml): name what the user typed
            self.prog = command

    def error(self, message):
        raise ValueError(f"{message} (see {self.prog} --help)")


def integer(low=None, high=None):
    """An argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(checks.problem(text, True, low, high)) from None
        found = checks.problem(value, True, low, high)
        if found:
            raise argparse.ArgumentTypeError(found)
        return value

    return parse


def real(low=None, high=None, low_open: bool = False):
    """An argparse type: a finite number in [low, high] ((low, high] when `low_open`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(checks.problem(text, False, low, high, low_open)) from None
        found = checks.problem(value, False, low, high, low_open)
        if found:
            raise argparse.ArgumentTypeError(found)
        return value

    return parse


def add_sampling_arguments(parser: argparse.ArgumentParser, top_k: int, when: str = "") -> None:
    """--top-k, --top-p, --temperature and --seed, each checked as it is parsed; `when` prefixes
    their help (e.g. "with --sample: ")."""
    parser.add_argument("--top-k", type=integer(low=0), default=top_k,
                        help=f"{when}keep the k likeliest tokens; 0: all (default {top_k})")
    parser.add_argument("--top-p", type=real(low=0.0, high=1.0, low_open=True), default=1.0,
                        help=f"{when}nucleus sampling threshold in (0, 1] (default 1.0: off)")
    parser.add_argument("--temperature", type=real(low=0.0, low_open=True), default=1.0,
                        help=f"{when}sampling temperature, > 0 (default 1.0)")
    parser.add_argument("--seed", type=integer(low=0), default=42,
                        help=f"{when}sampling seed: same seed, same output (default 42)")
