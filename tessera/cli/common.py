"""Flags shared by the config-driven commands."""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """`--config PRESET_OR_FILE` and trailing `key.sub=value` overrides (CLI > TOML > defaults)."""
    parser.add_argument(
        "--config",
        default=default,
        help="a preset name from configs/ (e.g. demo, dalle-12b) or a TOML file" + (f" (default: {default})" if default else ""),
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, e.g. dvae.train.steps=100 transformer.model.n_layers=4",
    )
