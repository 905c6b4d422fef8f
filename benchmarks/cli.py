"""Command-line options that choose parts of a benchmark (run.py's sections, soak.py's scenarios)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence


def names_of(known: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of some of ``known``; an unknown name is refused, naming it and the
    choices."""
    def parse(text: str) -> list[str]:
        names = text.split(",")
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown[0]!r}; expected some of {','.join(known)}")
        return names

    return parse
