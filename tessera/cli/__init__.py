"""The top layer: argparse only. Each command parses its flags, builds its config and calls one library function."""

from tessera.cli.app import COMMANDS, add_config_arguments, main

__all__ = ["COMMANDS", "add_config_arguments", "main"]
