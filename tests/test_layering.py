"""The floors of the package import only downwards, and the top floors only public APIs.

cache -> compress -> attention -> models -> engine -> entry points (CLI, offline LLM,
OpenAI server), with bench and eval beside the entry points. ``kvcompress.errors`` is shared
by every floor. Read from the source (every import statement, those inside functions too),
so a lazy import cannot hide a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kvcompress

PACKAGE = Path(kvcompress.__file__).parent
SHARED = {"kvcompress.errors"}
# What may be imported from below, by floor. Prefix match on the module path.
ALLOWED: dict[str, set[str]] = {
    "cache": {"kvcompress.cache"},
    "compress": {"kvcompress.cache", "kvcompress.compress"},
    "attention": {"kvcompress.cache", "kvcompress.compress", "kvcompress.attention"},
    "models": {"kvcompress.models", "kvcompress.attention"},
    "engine": {
        "kvcompress.cache",
        "kvcompress.compress",
        "kvcompress.attention",
        "kvcompress.models",
        "kvcompress.engine",
    },
}
# Public APIs: package roots only, never their submodules.
PUBLIC = {
    "kvcompress",
    "kvcompress.attention",  # backends and step metadata: the kernel benchmark drives them
    "kvcompress.cache",
    "kvcompress.compress",
    "kvcompress.engine",
    "kvcompress.errors",
    "kvcompress.report",
}
TOOLS = {"bench", "eval"}
# Engine internals that the floors above must not reach into.
INTERNALS = {"cache", "scheduler", "runner", "compressor", "backend", "sampler", "_requests"}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            # `from kvcompress.x import y` may name a submodule y.
            found.update(f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}"))
    return {name for name in found if name == "kvcompress" or name.startswith("kvcompress.")}


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def _within(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


MODULES = _modules()


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_imports_point_down(module: str, path: Path) -> None:
    floor = _floor(module)
    imports = _imports(module, path) - SHARED
    if floor in ALLOWED:
        bad = {name for name in imports if not _within(name, ALLOWED[floor])}
    elif floor in TOOLS:
        own = {f"kvcompress.{floor}"}
        other = TOOLS - {floor}
        bad = {
            name
            for name in imports
            if not _within(name, own) and name not in PUBLIC | {f"kvcompress.{t}" for t in other}
        }
    elif floor == "entrypoints":
        bad = {
            name
            for name in imports
            if not _within(name, {"kvcompress.entrypoints", "kvcompress.bench", "kvcompress.eval"})
            and name not in PUBLIC
        }
    else:  # the package root (public API face) and modules every floor shares
        bad = set()
        if module not in {"kvcompress"}:
            bad = {name for name in imports if name not in SHARED}
    assert not bad, f"{module} imports {sorted(bad)}"


def test_nothing_but_the_cli_imports_bench_or_eval() -> None:
    for module, path in MODULES:
        floor = _floor(module)
        if floor in TOOLS or module.startswith("kvcompress.entrypoints.cli"):
            continue
        tools = {
            n for n in _imports(module, path) if _within(n, {"kvcompress.bench", "kvcompress.eval"})
        }
        assert not tools, f"{module} imports {sorted(tools)}"


@pytest.mark.parametrize(
    ("module", "path"),
    [(m, p) for m, p in MODULES if _floor(m) in TOOLS | {"entrypoints"}],
    ids=[m for m, _ in MODULES if _floor(m) in TOOLS | {"entrypoints"}],
)
def test_top_floors_do_not_reach_into_engine_internals(module: str, path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    touched = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr in INTERNALS
        and not (isinstance(node.value, ast.Name) and node.value.id == "functools")
    }
    assert not touched, f"{module} uses engine internals {sorted(touched)}"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The import reader finds lazy and relative imports (else the tests above prove nothing)."""
    source = tmp_path / "m.py"
    source.write_text(
        "def f():\n    from kvcompress.engine.scheduler import Scheduler\n"
        "from ..server import app\n",
        encoding="utf-8",
    )
    found = _imports("kvcompress.cache.m", source)
    assert "kvcompress.engine.scheduler" in found and "kvcompress.server" in found
