"""``flexunet search ...`` subcommands, registered into the ``flexunet`` command."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    search = commands.add_parser("search", help="run, watch and export Optuna studies over FlexUNet")
    search.add_subparsers(dest="search_command", required=True, metavar="SUBCOMMAND")
