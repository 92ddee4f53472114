"""The layout the request path is built on: layers that import only downwards, no import loops,
`__all__` in every public module, and no test harness in the wheel."""

from __future__ import annotations

import ast
import importlib
import itertools
import pkgutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import segserve_client
import segserve_server
from tests.conftest import ROOT

SERVER = ROOT / "server" / "segserve_server"

# segserve_server's layers, lowest first: a module may import its own layer and those below.
LAYERS = {
    "segserve_server": 0,  # __init__ (the version)
    "segserve_server.errors": 0,
    "segserve_server.cpus": 0,
    "segserve_server.logs": 0,
    "segserve_server.auth": 1,  # tokens, scopes, rate limits: no transport (settings checks them)
    "segserve_server.settings": 1,
    "segserve_server.metrics": 1,
    "segserve_server.gpu_metrics": 1,
    "segserve_server.model_repository": 1,
    "segserve_server.model_parameters": 1,
    "segserve_server.priorities": 1,
    "segserve_server.backends": 2,
    "segserve_server.pipeline": 3,
    "segserve_server.core": 4,
    "segserve_server.adapters": 5,
    "segserve_server.server": 6,
    "segserve_server.settings_cli": 6,
    "segserve_server.cli": 7,
    "segserve_server.training": 6,  # offline tools: use the pipeline, never used by serving
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise AssertionError(f"{module} has no layer in LAYERS")


def module_name(path: Path) -> str:
    relative = path.relative_to(SERVER.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("segserve_server")}


def server_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SERVER.rglob("*.py"))}


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module `name` is, or the module it names an attribute of."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def test_every_module_imports_only_its_own_layer_or_below():
    known = server_modules()
    wrong = []
    for module, path in known.items():
        for imported in imports_of(path, top_level_only=False):
            target = resolve(imported, known)
            if target is not None and layer_of(target) > layer_of(module):
                wrong.append(f"{module} (layer {layer_of(module)}) imports {target}")
    assert not wrong, "\n".join(wrong)


def test_serving_never_imports_the_offline_tools():
    known = server_modules()
    for module, path in known.items():
        if module.startswith(("segserve_server.training", "segserve_server.cli")):
            continue
        for imported in imports_of(path, top_level_only=False):
            assert not imported.startswith("segserve_server.training"), (module, imported)


def test_no_import_loops():
    known = server_modules()
    graph = {
        module: {
            t
            for t in (resolve(i, known) for i in imports_of(path, top_level_only=True))
            if t is not None and t != module
        }
        for module, path in known.items()
    }
    # A package's __init__ importing its own submodules is how packages re-export, not a loop.
    state: dict[str, int] = {}
    loops: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                loop = [*trail[trail.index(target) :], target]
                if not any(
                    a.startswith(b + ".") or b.startswith(a + ".")
                    for a, b in itertools.pairwise(loop)
                ):
                    loops.append(loop)
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not loops, loops


def test_the_client_never_imports_the_server():
    for path in (ROOT / "clients" / "segserve_client").rglob("*.py"):
        assert "segserve_server" not in path.read_text(), path


def public_modules(package: object) -> list[str]:
    names = [package.__name__]  # type: ignore[attr-defined]
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):  # type: ignore[attr-defined]
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


@pytest.mark.parametrize(
    "module", public_modules(segserve_server) + public_modules(segserve_client)
)
def test_public_modules_declare_what_they_export(module):
    if module.startswith("segserve_server.training") or module == "segserve_server.__main__":
        pytest.importorskip("torch")
    loaded = importlib.import_module(module)
    exported = getattr(loaded, "__all__", None)
    assert exported is not None, f"{module} has no __all__"
    assert len(set(exported)) == len(exported), f"{module}.__all__ repeats a name"
    for name in exported:
        assert hasattr(loaded, name), f"{module}.__all__ names {name!r}, which it lacks"
    defined = [
        name
        for name, value in vars(loaded).items()
        if not name.startswith("_")
        and isinstance(value, type | type(len) | type(lambda: 0))
        and getattr(value, "__module__", None) == module
    ]
    missing = [name for name in defined if name not in exported]
    assert not missing, f"{module} defines public {missing} but leaves them out of __all__"


@pytest.mark.slow
def test_the_wheel_ships_no_test_harness(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("segserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("segserve_server/core/") for n in names)
    assert any(n.startswith("segserve_client/") for n in names)
    console = SERVER / "adapters" / "console"
    for static in sorted(console.iterdir()):  # the browser console's files are package data
        assert f"segserve_server/adapters/console/{static.name}" in names, static.name
    shipped = sorted({n.split("/")[0] for n in names})
    assert not any(n.startswith("tests/") for n in names), shipped
    for harness in ("synthetic_models", "triton_local", "python_backend", "conftest"):
        assert not any(harness in n for n in names), harness
