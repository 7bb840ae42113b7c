"""Imports point one way: cli -> commands' core modules -> factory -> catalogue/checkpoints/store.

The import graph is read from the source files with ast (imports inside functions included, as they
are dependencies all the same), so these tests need nothing imported. Modules are put in groups by
name, so that modules which do not exist yet (a split in progress) are simply absent from a group.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "resnetcli"

#: The file store: the cache folder, its records, locks, downloads and inventory. Torch-free.
STORE = {"cache", "store", "partials", "download", "downloads", "inventory", "urls"}
#: The model side: torchvision's catalogue, checkpoint reading, the factory that builds models.
MODEL = {"registry", "catalogue", "factory", "checkpoints"}
MODEL_LIBRARIES = {"torch", "torchvision", "timm"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between the package's modules, top-level external packages each module imports)."""
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    package = root.name
    edges: dict[str, set[str]] = {name: set() for name in files}
    external: dict[str, set[str]] = {name: set() for name in files}

    def target(name: str) -> str | None:
        """The package module `name` lands on: itself, or the nearest enclosing module that exists."""
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            imported: list[str] = []
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    module = f"{base}.{node.module}" if node.module else base
                else:
                    module = node.module or ""
                # `from pkg import sub` imports the module pkg.sub when there is one.
                imported = [
                    f"{module}.{alias.name}" if f"{module}.{alias.name}" in files else module for alias in node.names
                ]
            for full in imported:
                if full == package or full.startswith(package + "."):
                    landed = target(full)
                    if landed and landed != name:
                        edges[name].add(landed)
                else:
                    external[name].add(full.split(".")[0])
    return edges, external


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (or a module importing itself), as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in edges.get(node, ()):
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def direction_problems(root: Path) -> list[str]:
    """Every breach of the import rules in the package at `root`, one line each."""
    edges, external = import_graph(root)
    package = root.name
    cli = f"{package}.cli"
    problems = [f"import circle: {' <-> '.join(group)}" for group in cycles(edges)]
    # The core: every module but the package itself, its entry point (__main__) and the CLI.
    core = [n for n in edges if n not in (package, f"{package}.__main__") and not (n == cli or n.startswith(cli + "."))]
    for name in core:
        for landed in sorted(edges[name]):
            if landed == cli or landed.startswith(cli + "."):
                problems.append(f"core module {name} imports {landed}")
    for name in sorted(edges):
        if name.rpartition(".")[2] not in STORE or name.count(".") != 1:
            continue
        for landed in sorted(reachable(edges, name) | {name}):
            if landed.rpartition(".")[2] in MODEL:
                problems.append(f"file store {name} imports the model side: {landed}")
            for library in sorted(external[landed] & MODEL_LIBRARIES):
                problems.append(
                    f"file store {name} imports {library}" + ("" if landed == name else f" (through {landed})")
                )
    return problems


def test_imports_point_one_way():
    assert direction_problems(PACKAGE) == []


def write_package(root: Path, modules: dict[str, str]) -> Path:
    package = root / "pkg"
    for name, source in {"__init__": "", **modules}.items():
        path = package / (name.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    (package / "cli" / "__init__.py").touch()
    return package


def test_a_planted_circle_is_found_even_through_a_function_level_import(tmp_path):
    package = write_package(
        tmp_path,
        {
            "errors": "",
            "factory": "from pkg import errors\nfrom pkg.checkpoints import read\n",
            "checkpoints": "def read():\n    from . import catalogue\n",
            "catalogue": "import pkg.factory as factory\n",
            "cli.app": "from pkg.factory import build\n",
        },
    )
    assert direction_problems(package) == ["import circle: pkg.catalogue <-> pkg.checkpoints <-> pkg.factory"]
    (package / "catalogue.py").write_text("from pkg import errors\n")
    assert direction_problems(package) == []


def test_core_importing_the_cli_and_a_store_importing_the_model_side_are_found(tmp_path):
    package = write_package(
        tmp_path,
        {
            "errors": "",
            "urls": "def load():\n    import torch.hub\n",
            "store": "from pkg.urls import load\n",
            "cache": "from pkg.store import *\n\ndef labels():\n    from pkg.catalogue import names\n",
            "catalogue": "import torchvision\n",
            "predict": "from pkg.cli.output import render\n",
            "cli.output": "from pkg import predict\n",
        },
    )
    assert direction_problems(package) == [
        "import circle: pkg.cli.output <-> pkg.predict",
        "core module pkg.predict imports pkg.cli.output",
        "file store pkg.cache imports the model side: pkg.catalogue",
        "file store pkg.cache imports torchvision (through pkg.catalogue)",
        "file store pkg.cache imports torch (through pkg.urls)",
        "file store pkg.store imports torch (through pkg.urls)",
        "file store pkg.urls imports torch",
    ]


def test_no_help_imports_torch():
    """`resnet --help` and every command's --help answer without importing torch or torchvision."""
    code = textwrap.dedent(
        """
        import sys
        import typer.main
        from resnetcli.cli import app

        def paths(command, prefix=()):
            yield prefix
            for name, sub in (getattr(command, "commands", None) or {}).items():
                yield from paths(sub, (*prefix, name))

        for path in list(paths(typer.main.get_command(app))):
            try:
                app([*path, "--help"], prog_name="resnet")
            except SystemExit as done:
                assert done.code in (0, None), (path, done.code)
        print(sorted(m for m in ("torch", "torchvision", "timm", "onnxruntime") if m in sys.modules), file=sys.stderr)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Usage: resnet cache rm" in done.stdout
    assert done.stderr.strip().splitlines()[-1] == "[]"
