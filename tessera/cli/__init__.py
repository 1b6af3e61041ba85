"""The top layer: argparse only. Each command parses its flags, builds its config and calls one library function."""

from tessera.cli.app import COMMANDS, main
from tessera.cli.common import add_config_arguments

__all__ = ["COMMANDS", "add_config_arguments", "main"]
