"""Errors that reach the user as one line (the CLI prints them and exits with code 2)."""


class TesseraError(Exception):
    """An error caused by the user's input: printed as one line, no traceback, exit code 2."""


class ConfigError(TesseraError):
    """An unknown config key, a value of the wrong type, or an invalid combination of values."""


class InputError(TesseraError):
    """A missing, empty, corrupt or hostile input file or URL list."""


class CheckpointError(TesseraError):
    """A checkpoint that is truncated, corrupt, or of another kind than the one asked for."""
