"""The package's shape, read from its source: imports run one way and httpx stays at the edge.

A change that makes a helper reach back into the client, adds an import cycle or imports httpx
outside the HTTP boundary fails here, so the layout cannot drift back without anyone noticing.
"""

from __future__ import annotations

import ast
import pathlib

import amp_cohorts_async

PACKAGE = pathlib.Path(amp_cohorts_async.__file__).parent
# The one module that talks httpx (the in-process test transport in testing/ does too).
HTTPX_MODULES = {"amp_cohorts_async._http"}
# Public signatures name httpx types; these may import httpx for annotations only.
HTTPX_ANNOTATIONS_ONLY = {"amp_cohorts_async._client", "amp_cohorts_async._exceptions"}
# Layers above the client, which may use it (mirror_cohort drives two clients; the blocking
# client and the dlt source wrap one).
ABOVE_THE_CLIENT = ("amp_cohorts_async.cli", "amp_cohorts_async._client",
                    "amp_cohorts_async.dlt", "amp_cohorts_async._mirror",
                    "amp_cohorts_async.blocking")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> dict[str, ast.Module]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name.startswith("amp_cohorts_async.testing"):
            continue  # the emulator is a client of the library, not part of its layers
        modules[name] = ast.parse(path.read_text("utf-8"))
    return modules


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def imports(module: str, tree: ast.Module) -> list[tuple[str, bool, bool]]:
    """(imported module, under TYPE_CHECKING, inside a function) for every import."""
    found: list[tuple[str, bool, bool]] = []
    package = module if module_is_package(module) else module.rpartition(".")[0]

    def visit(node: ast.AST, typing_only: bool, deferred: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_typing = typing_only or is_type_checking_block(child)
            child_deferred = deferred or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((alias.name, typing_only, deferred) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package
                    for _ in range(child.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                if child.module is None or base == package:
                    # "from . import x" / "from .pkg import x": x may be a module of its own
                    found.extend((f"{base}.{alias.name}", typing_only, deferred)
                                 for alias in child.names)
                found.append((base, typing_only, deferred))
            visit(child, child_typing, child_deferred)

    visit(tree, False, False)
    return found


def module_is_package(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").exists()


def test_no_import_cycle_among_library_modules() -> None:
    modules = library_modules()
    graph = {
        name: {target for target, _, _ in imports(name, tree) if target in modules
               and target != name}
        for name, tree in modules.items()
    }
    # A package's __init__ re-exports its modules; the edge from a module to its own
    # package (for a sibling) would be a false cycle, so packages are reached through modules.
    state: dict[str, int] = {}
    path: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target):], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                walk(target)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name)


def test_httpx_is_imported_only_by_the_boundary() -> None:
    for name, tree in library_modules().items():
        for target, typing_only, _ in imports(name, tree):
            if target.split(".")[0] != "httpx" or name in HTTPX_MODULES:
                continue
            allowed = typing_only and name in HTTPX_ANNOTATIONS_ONLY
            assert allowed, f"{name} imports httpx; only {sorted(HTTPX_MODULES)} may"


def test_opentelemetry_is_imported_only_by_the_telemetry_module() -> None:
    for name, tree in library_modules().items():
        for target, typing_only, deferred in imports(name, tree):
            if target.split(".")[0] != "opentelemetry":
                continue
            if name == "amp_cohorts_async._telemetry":
                # Lazily: importing the library never imports opentelemetry.
                assert typing_only or deferred, f"{name} imports {target} at import time"
            else:
                # The client names the provider types in its signature, for annotations only.
                allowed = typing_only and name == "amp_cohorts_async._client"
                assert allowed, f"{name} imports {target}; only amp_cohorts_async._telemetry may"


def test_nothing_below_the_client_knows_the_client() -> None:
    for name, tree in library_modules().items():
        if name == "amp_cohorts_async" or name.startswith(ABOVE_THE_CLIENT):
            continue
        for target, _, _ in imports(name, tree):
            assert target != "amp_cohorts_async._client", f"{name} imports the client"
        for node in ast.walk(tree):
            if isinstance(node, ast.Name | ast.Attribute):
                ident = node.id if isinstance(node, ast.Name) else node.attr
                assert ident != "CohortsClient", f"{name} refers to CohortsClient"


def test_no_private_attribute_of_the_client_is_read_outside_it() -> None:
    for name, tree in library_modules().items():
        if name == "amp_cohorts_async._client":
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id == "client"):
                raise AssertionError(f"{name} reads client.{node.attr}")


def test_no_deferred_import_of_a_library_module() -> None:
    for name, tree in library_modules().items():
        for target, _, deferred in imports(name, tree):
            assert not (deferred and target.startswith("amp_cohorts_async")), (
                f"{name} imports {target} inside a function"
            )


def test_one_retry_loop() -> None:
    """Only the send path loops over attempts; the retry policy itself only decides."""
    loops = []
    for name, tree in library_modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                source = ast.unparse(node)
                if "decide(" in source and ("while " in source or "for " in source):
                    loops.append(f"{name}.{node.name}")
    assert loops == ["amp_cohorts_async._send.retrying"]
    counting = sorted(name for name, tree in library_modules().items()
                      if "max_attempts" in ast.unparse(tree))
    assert counting == ["amp_cohorts_async._config", "amp_cohorts_async._retry",
                        "amp_cohorts_async._send"]
