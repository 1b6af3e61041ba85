"""The layers of docs/ARCHITECTURE.md, enforced: every module of the package has a layer, imports only from its own
layer and those below, imports nothing inside a function but the optional heavy dependencies, takes part in no
import cycle, and keeps argparse in the CLI layer.

Imports are read with `ast` from the source files (lazy ones included), not by importing anything; a call of
`importlib.import_module("tessera....")` with a literal name counts as an import too.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# where each part of the `tessera` package lives in the repository (setup.cfg's package_dir)
PACKAGE_DIRS = {
    "tessera": REPO / "tessera",
    "tessera.trainer": REPO / "trainer",
    "tessera.kernels": REPO / "kernels",
    "tessera.dataprep": REPO / "dataprep",
    "tessera.cluster": REPO / "cluster",
}
# bottom to top; a module may import from its own layer and the layers before it (docs/ARCHITECTURE.md)
LAYERS: list[tuple[str, list[str]]] = [
    (
        "core",
        [
            "tessera",
            "tessera.core",
            "tessera.core.*",
            "tessera.trainer",
            "tessera.kernels",
            "tessera.dataprep",
            "tessera.cluster",
            "tessera.trainer.config",
            "tessera.dataprep.config",
            "tessera.cluster.config",
        ],
    ),
    ("kernels", ["tessera.kernels.*"]),
    (
        "data",
        [
            "tessera.dataprep.shards",
            "tessera.dataprep.storage",
            "tessera.dataprep.readers",
            "tessera.dataprep.imaging",
            "tessera.dataprep.bpe",
            "tessera.dataprep.tokenizer",
            "tessera.dataprep.synthetic",
            "tessera.dataprep.detector",
            "tessera.dataprep.writer",
            "tessera.dataprep.filters",
            "tessera.dataprep.download",
            "tessera.trainer.data",
            "tessera.trainer.token_data",
            "tessera.trainer.image_metrics",
        ],
    ),
    (
        "models",
        [
            "tessera.trainer.dvae",
            "tessera.trainer.transformer",
            "tessera.trainer.clip",
            "tessera.trainer.openclip",
            "tessera.trainer.inception",
            "tessera.trainer.similarity",
            "tessera.trainer.sample",
        ],
    ),
    ("distributed", ["tessera.cluster.*"]),
    (
        "training",
        [
            "tessera.trainer.fit",
            "tessera.trainer.loop_state",
            "tessera.trainer.dvae_objective",
            "tessera.trainer.transformer_eval",
            "tessera.trainer.tasks",
            "tessera.trainer.tasks.*",
            "tessera.trainer.*_task",
            "tessera.trainer.*_train",
            "tessera.trainer.rundir",
            "tessera.trainer.ema",
            "tessera.trainer.schedules",
            "tessera.trainer.precision",
            "tessera.trainer.codebook_init",
            "tessera.trainer.grad_scale*",
        ],
    ),
    (
        "pipeline",
        [
            "tessera.dataprep.crawl",
            "tessera.dataprep.crawl_worker",
            "tessera.dataprep.encode",
            "tessera.trainer.export",
            "tessera.trainer.inference",
            "tessera.trainer.evaluate",
            "tessera.demo",
            "tessera.status",
            "tessera.plan",
        ],
    ),
    ("cli", ["tessera.cli", "tessera.cli.*"]),
]
LAZY_ALLOWED = {"deepspeed", "triton", "mpi4py", "boto3", "botocore"}
# heavy parts of torch that most processes never use: FSDP2 and DTensor (~1.3 s of import on machine A, sympy
# included) only in the sharded layout, TensorBoard (~0.5 s) only in the process that logs
LAZY_ALLOWED_MODULES = ("torch.distributed.fsdp", "torch.distributed.tensor", "torch.utils.tensorboard")


def modules() -> dict[str, Path]:
    out = {}
    for pkg, root in PACKAGE_DIRS.items():
        for f in root.rglob("*.py"):
            rel = f.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if any(name.startswith(other + ".") or name == other for other in PACKAGE_DIRS if other != pkg and other.startswith(pkg + ".")):
                continue  # e.g. a stray tessera/trainer/ folder: not this package's
            out[name] = f
    return out


MODULES = modules()


def layer_of(name: str) -> int | None:
    # the most specific pattern wins (an exact name beats a wildcard), so "tessera.cluster.config" is core
    best = None
    for i, (_, patterns) in enumerate(LAYERS):
        for p in patterns:
            if fnmatch.fnmatchcase(name, p):
                score = (0 if "*" in p else 1, len(p))
                if best is None or score > best[0]:
                    best = (score, i)
    return None if best is None else best[1]


def resolve(name: str) -> str | None:
    """The package module a dotted import name refers to (the longest prefix that is a module)."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in MODULES:
            return cand
        parts.pop()
    return None


class Imports(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package = module, is_package
        self.depth = 0
        self.edges: list[tuple[str, int, bool]] = []  # (target module, line, inside a function)
        self.lazy_external: list[tuple[str, int]] = []
        self.argparse: list[int] = []

    def _func(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _func

    def _add(self, name: str, line: int) -> None:
        if name.split(".")[0] == "argparse":
            self.argparse.append(line)
        if name.split(".")[0] == "tessera":
            target = resolve(name)
            if target is not None and target != self.module:
                self.edges.append((target, line, self.depth > 0))
        elif self.depth > 0 and name.split(".")[0] not in LAZY_ALLOWED and not name.startswith(LAZY_ALLOWED_MODULES):
            self.lazy_external.append((name, line))

    def visit_Import(self, node):
        for a in node.names:
            self._add(a.name, node.lineno)

    def visit_ImportFrom(self, node):
        if node.level:
            base = self.module.split(".")
            base = base if self.is_package else base[:-1]
            base = base[: len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        for a in node.names:  # `from tessera.trainer import evaluate` imports the submodule
            full = f"{mod}.{a.name}"
            self._add(full if full in MODULES else mod, node.lineno)

    def visit_Call(self, node):
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            self._add(node.args[0].value, node.lineno)
        self.generic_visit(node)


def scan() -> dict[str, Imports]:
    out = {}
    for name, path in MODULES.items():
        v = Imports(name, path.name == "__init__.py")
        v.visit(ast.parse(path.read_text(), filename=str(path)))
        out[name] = v
    return out


SCAN = scan()


def where(name: str, line: int) -> str:
    return f"{MODULES[name].relative_to(REPO)}:{line}"


def test_every_module_has_a_layer():
    missing = sorted(n for n in MODULES if layer_of(n) is None)
    assert not missing, f"modules without a layer (add them to LAYERS and docs/ARCHITECTURE.md): {missing}"


def test_no_upward_import():
    bad = []
    for name, v in SCAN.items():
        lo = layer_of(name)
        for target, line, _ in v.edges:
            lt = layer_of(target)
            if lo is not None and lt is not None and lt > lo:
                bad.append(f"{where(name, line)}: {name} ({LAYERS[lo][0]}) imports {target} ({LAYERS[lt][0]})")
    assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


def test_no_lazy_imports_but_the_optional_heavy_dependencies():
    bad = [f"{where(n, line)}: {t}" for n, v in SCAN.items() for t, line, lazy in v.edges if lazy]
    bad += [f"{where(n, line)}: {t}" for n, v in SCAN.items() for t, line in v.lazy_external]
    assert not bad, f"imports inside functions (only {sorted(LAZY_ALLOWED)} may be lazy):\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {n: sorted({t for t, _, _ in v.edges}) for n, v in SCAN.items()}
    index, low, stack, on, sccs = {}, {}, [], set(), []

    def strong(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    assert not sccs, f"import cycles: {sccs}"


def test_argparse_only_in_the_cli_layer():
    cli = len(LAYERS) - 1
    bad = [where(n, line) for n, v in SCAN.items() for line in v.argparse if layer_of(n) != cli]
    assert not bad, f"argparse outside tessera.cli: {bad}"


@pytest.mark.parametrize("doc", ["docs/ARCHITECTURE.md"])
def test_the_layers_are_written_down(doc):
    text = (REPO / doc).read_text()
    for layer, _ in LAYERS:
        assert f"**{layer}**" in text, f"{doc} does not describe the layer '{layer}'"


def test_no_function_longer_than_80_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{where(name, node.lineno)}: {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def test_one_training_loop_of_at_most_150_lines():
    fit = next(n for n in ast.parse(MODULES["tessera.trainer.fit"].read_text()).body if isinstance(n, ast.FunctionDef) and n.name == "fit")
    assert fit.end_lineno - fit.lineno + 1 <= 150
    # no trainer holds a loop of its own: the dVAE, transformer and CLIP entry points call fit
    for task in ("dvae", "transformer", "clip"):
        assert "tessera.trainer.fit" in {t for t, _, _ in SCAN[f"tessera.trainer.{task}_train"].edges}, task
