"""The `tessera` command line: one table of subcommands, each a pair of functions in a tessera.cli module:
`add_<name>(parser)` declares its flags and `run_<name>(args) -> int | None` builds the config and calls one
library function.

Modules are imported only for the command being run, so `tessera --help` stays fast.
Errors caused by input (TesseraError) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from tessera import __version__
from tessera.cli.common import add_config_arguments
from tessera.core import portable
from tessera.core.errors import TesseraError

__all__ = ["COMMANDS", "GROUP_HELP", "add_config_arguments", "main"]

# (words) -> (tessera.cli module, function name, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str, str]] = {
    ("prep", "crawl"): ("tessera.cli.prep", "crawl", "download, filter, resize and shard a (url, caption) list"),
    ("prep", "tokenizer"): ("tessera.cli.prep", "tokenizer", "train a BPE tokenizer on the captions of shards"),
    ("prep", "encode"): ("tessera.cli.prep", "encode", "encode image shards to dVAE token shards"),
    ("prep", "synthetic"): ("tessera.cli.prep", "synthetic", "write the embedded synthetic shapes dataset and its url list"),
    ("train", "dvae"): ("tessera.cli.train", "dvae", "train the discrete VAE (image tokenizer)"),
    ("train", "transformer"): ("tessera.cli.train", "transformer", "train the sparse-attention transformer on token shards"),
    ("train", "clip"): ("tessera.cli.train", "clip", "train the small CLIP used for reranking and evaluation"),
    ("export",): ("tessera.cli.model", "export", "write a self-contained inference directory from a run"),
    ("sample",): ("tessera.cli.model", "sample", "sample images from an exported model"),
    ("eval",): ("tessera.cli.model", "eval", "FID, IS, CLIP score, PSNR/SSIM of generated or reconstructed images"),
    ("demo",): ("tessera.cli.demo", "demo", "run the whole pipeline end to end on the embedded dataset"),
    ("cluster", "submit-train"): ("tessera.cli.cluster", "submit_train", "render and submit a requeueable SLURM training job"),
    ("cluster", "submit-array"): ("tessera.cli.cluster", "submit_array", "render and submit a SLURM array job of prep crawl/encode parts"),
    ("status",): ("tessera.cli.status", "status", "step, loss, throughput, last checkpoint and SLURM job state of a run directory"),
    ("plan",): ("tessera.cli.plan", "plan", "size a training job: memory, FLOPs, communication, step time, days, advice"),
    ("plan", "crawl"): ("tessera.cli.plan", "plan_crawl", "project a crawl's time and storage from the measured crawler throughput"),
    ("config",): ("tessera.cli.config", "config", "print a resolved config, or every key with its type and documentation"),
}

# Commands whose figures must not depend on the machine: they run torch's AVX2 kernels on every x86 CPU
# (tessera.core.portable; set before the command's module imports torch).
PORTABLE_KERNELS = {("demo",)}

GROUP_HELP = {
    "prep": "data preparation: crawl, tokenizer, encode, synthetic",
    "train": "training: dvae, transformer, clip",
    "cluster": "SLURM jobs: submit-train, submit-array",
}


def _top_help() -> str:
    lines = [
        f"tessera {__version__}: train DALL-E style text-to-image models",
        "",
        "usage: tessera COMMAND [ARGS] (tessera COMMAND --help)",
        "",
        "commands:",
    ]
    for words, (_, _, help_) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<18} {help_}")
    return "\n".join(lines)


def _find_command(argv: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    for n in (2, 1):
        words = tuple(argv[:n])
        if words in COMMANDS:
            return words, argv[n:]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0
    if argv[0] == "--version":
        print(f"tessera {__version__}")
        return 0
    found = _find_command(argv)
    if found is None:
        if argv[0] in GROUP_HELP:
            subs = [w[1] for w in COMMANDS if w[0] == argv[0]]
            if len(argv) == 1 or argv[1] in ("-h", "--help"):
                print(f"usage: tessera {argv[0]} {{{','.join(subs)}}} ...\n\n{GROUP_HELP[argv[0]]}")
                return 0 if len(argv) > 1 else 2
            print(f"tessera: error: unknown command 'tessera {argv[0]} {argv[1]}'; choose one of: {', '.join(subs)}", file=sys.stderr)
            return 2
        print(f"tessera: error: unknown command '{argv[0]}'; run 'tessera --help' for the list", file=sys.stderr)
        return 2
    words, rest = found
    module_name, name, help_ = COMMANDS[words]
    parser = argparse.ArgumentParser(prog="tessera " + " ".join(words), description=help_)
    debug = os.environ.get("TESSERA_DEBUG") == "1"
    if words in PORTABLE_KERNELS:
        portable.pin()
    try:
        module = importlib.import_module(module_name)
        getattr(module, f"add_{name}")(parser)
        args = parser.parse_args(rest)
        code = getattr(module, f"run_{name}")(args)
        return int(code or 0)
    except TesseraError as e:
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"tessera: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tessera: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
