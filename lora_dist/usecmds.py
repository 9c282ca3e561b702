"""The commands that use what was trained: ``serve`` (many adapters over one base, OpenAI-compatible
HTTP on Ray Serve) and ``merge`` (W0 + s·BA written as a standard Hugging Face model directory).

Kept apart from ``cli.py`` so that each command's arguments sit beside the function that runs
it; nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import argparse


def add_commands(sub) -> None:
    """Register ``serve`` and ``merge`` on the ``lora-dist`` parser's subcommands."""
    add_merge(sub)
    add_serve(sub)


# --- merge ----------------------------------------------------------------------------------------

def add_merge(sub) -> None:
    pass


# --- serve ----------------------------------------------------------------------------------------

def add_serve(sub) -> None:
    pass


def _unused(_: argparse.Namespace) -> None:  # placeholder until the commands land
    pass
