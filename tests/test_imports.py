"""No import cycles between sevhook's modules, read from the source with `ast` (nothing is imported).

Every import that runs counts, wherever it is: at the top or inside a function (a deferred import
only hides a cycle from Python until the next refactoring moves it to the top, and then a module is
used half-initialised), and so does the __init__ of every package a submodule import enters. Imports
under `if TYPE_CHECKING:` never run and only name types for annotations, so they are not edges."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "sevhook"
PACKAGE = PACKAGE_DIR.name


def module_name(path: Path) -> str:
    """sevhook/sim/argv.py -> sevhook.sim.argv; a package's __init__.py is the package itself."""
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def _absolute_base(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The module a `from ... import` names, relative imports resolved against the importer."""
    if node.level == 0:
        return node.module or ""
    anchor = importer.split(".")
    if not is_package:
        anchor.pop()
    if node.level > 1:
        anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join([*anchor, node.module] if node.module else anchor)


def _is_type_checking_guard(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement outside the body of an `if TYPE_CHECKING:` (its else branch runs)."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking_guard(node):
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))
    return found


def imported_modules(importer: str, path: Path, known: set[str]) -> set[str]:
    """The package's own modules this file imports: `from pkg import sub` names the submodule when
    `sub` is one, else `pkg` itself (whose __init__ then runs)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in _runtime_imports(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute_base(node, importer, path.name == "__init__.py")
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in known:
                    found.add(submodule)
                elif base in known:
                    found.add(base)
    found |= {package for module in found for package in _packages_initialised_by(module, importer, known)}
    found.discard(importer)
    return found


def _packages_initialised_by(module: str, importer: str, known: set[str]) -> set[str]:
    """Importing a.b.c first runs a/__init__ and a/b/__init__; those of the importer's own packages
    are already running when it runs, so only the others are edges."""
    parts = module.split(".")
    own = importer.split(".")
    return {
        ".".join(parts[:depth])
        for depth in range(1, len(parts))
        if ".".join(parts[:depth]) in known and parts[:depth] != own[:depth]
    }


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index_of: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index_of:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        index_of[root] = lowlink[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, pending = work[-1]
            if pending:
                child = pending.pop()
                if child not in index_of:
                    index_of[child] = lowlink[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, sorted(graph.get(child, ()))))
                elif child in on_stack:
                    lowlink[node] = min(lowlink[node], index_of[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                lowlink[parent] = min(lowlink[parent], lowlink[node])
            if lowlink[node] == index_of[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_the_package_has_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 50, "the package's modules were not found"
    found = cycles(graph)
    described = [" <-> ".join(component) for component in found]
    assert not found, "import cycles between sevhook modules:\n  " + "\n  ".join(described)


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b", "d"}, "b": {"a"}, "d": {"e"}, "e": {"d"}}, [["d", "e"], ["a", "b"]]),
    ],
)
def test_the_cycle_finder_finds_exactly_the_cycles(edges: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert sorted(cycles(edges)) == sorted(expected)


def test_every_kind_of_import_is_an_edge(tmp_path: Path) -> None:
    """Top-level, function-level and relative imports count; those only for the type checker do not."""
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import sevhook.errors\n"
        "from . import argv\n"
        "from ..encoding import decode_base64\n"
        "if TYPE_CHECKING:\n"
        "    from sevhook.sim.platform import SoftwarePlatform\n"
        "else:\n"
        "    from sevhook.sim import state\n"
        "def later():\n"
        "    from sevhook.sim import proxy\n"
    )
    known = {"sevhook.errors", "sevhook.sim.argv", "sevhook.encoding", "sevhook.sim.platform", "sevhook.sim.proxy",
             "sevhook.sim.state", "sevhook.sim"}
    assert imported_modules("sevhook.sim.mod", source, known) == {
        "sevhook.errors", "sevhook.sim.argv", "sevhook.encoding", "sevhook.sim.proxy", "sevhook.sim.state",
    }


def test_importing_a_submodule_runs_its_packages_init(tmp_path: Path) -> None:
    """sevhook.sim.x importing sevhook.qemu_cmdline.options also runs sevhook/qemu_cmdline/__init__.py;
    its own package's __init__ is already running and is no edge."""
    source = tmp_path / "x.py"
    source.write_text("from sevhook.qemu_cmdline.options import iter_options\nfrom sevhook.sim import state\n")
    known = {"sevhook", "sevhook.qemu_cmdline", "sevhook.qemu_cmdline.options", "sevhook.sim", "sevhook.sim.state"}
    assert imported_modules("sevhook.sim.x", source, known) == {
        "sevhook.qemu_cmdline", "sevhook.qemu_cmdline.options", "sevhook.sim.state"}


FOUNDATION = {"errors", "encoding", "files", "console", "config", "virt", "status", "_paths"}
# docs/architecture.md's table: what each package may import besides the foundation ("pkg.module" allows
# only that module of pkg). A change here is a change of the architecture: update the document with it.
ALLOWED: dict[str, set[str]] = {
    "sev": set(),
    "xml": {"sev"},
    "qemu_cmdline": {"sev", "xml"},
    "monitor": {"sev"},
    "launch": {"monitor", "sev", "xml", "broker.client"},
    "broker": {"sev", "xml"},
    "hook": {"launch", "monitor", "sev", "xml"},
    "interpose": {"sim.argv", "sim.qmp_protocol", "sim.qmp_server"},
    "wrapper": {"hook", "interpose", "launch", "monitor", "qemu_cmdline", "sev", "xml", "sim.argv",
                "sim.qmp_protocol", "sim.qmp_server"},
    "sim": {"broker", "hook.prepare", "interpose", "qemu_cmdline", "sev", "xml"},
    "flow": {"broker", "hook", "launch", "monitor", "qemu_cmdline", "sev", "sim", "xml", "wrapper.config"},
    "doctor": {"monitor", "sev"},
}


def _unit(module: str) -> tuple[str, str]:
    """sevhook.sim.argv -> ("sim", "sim.argv"); sevhook.errors -> ("errors", "errors")."""
    parts = module.split(".")[1:] or ["sevhook"]
    return parts[0], ".".join(parts[:2])


def test_packages_import_only_what_the_architecture_allows() -> None:
    wrong = []
    for importer, imported in import_graph().items():
        package, _ = _unit(importer)
        if package in ("commands", "cli", "__main__", "sevhook"):
            continue  # the command line may use everything
        allowed = FOUNDATION if package in FOUNDATION else ALLOWED[package] | FOUNDATION
        for module in imported:
            target, unit = _unit(module)
            if target in (package, "sevhook") or target in allowed or unit in allowed:
                continue
            if module == f"sevhook.{target}" and any(entry.startswith(f"{target}.") for entry in allowed):
                continue  # the package's __init__, which importing an allowed module of it runs
            wrong.append(f"{importer} imports {module}")
    assert not wrong, "imports docs/architecture.md does not allow:\n  " + "\n  ".join(sorted(wrong))
