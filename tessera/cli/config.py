"""`tessera config`: print a resolved config as TOML, or every key with type, default and documentation."""

from __future__ import annotations

import argparse

from tessera.cli.common import add_config_arguments
from tessera.core import config as C
from tessera.core.root_config import TesseraConfig, load_root


def add_config(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--keys", action="store_true", help="list every key with its type, default and documentation")


def run_config(args: argparse.Namespace) -> int:
    if args.keys:
        print(C.format_keys(TesseraConfig), end="")
        return 0
    cfg = load_root(args.config, args.overrides)
    print(C.dumps_toml(cfg), end="")
    return 0
