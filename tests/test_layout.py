"""The package's layout keeps the architecture: who may import whom, read from the source with `ast`.

Every `import` and `from ... import` counts, also those inside functions (lazy imports) and under
`if TYPE_CHECKING:`: a lazy import runs in the same process as an eager one. Rules (README, "Layout"):
- gradelab.sandbox.* (the untrusted sandbox S and its launcher) imports of gradelab only
  gradelab.sandbox, gradelab.boundary and gradelab.errors;
- gradelab.boundary.* (shared by both sides) imports of gradelab only gradelab.boundary and
  gradelab.errors;
- gradelab.hidden.* (the trusted test side, Z and T) reaches neither gradelab.sandbox nor
  gradelab.grading, directly or through what it imports;
- of the trusted modules, only gradelab.grading.supervisor (the worker that forks S),
  gradelab.grading.environment (its check that the sandbox can read Python) and
  gradelab.grading.batch (the batch parent's probe of the isolation layers) import gradelab.sandbox;
- every imported gradelab module exists (a move leaves no stale import);
- no module is longer than MAX_LINES unless LONG_MODULES lists it with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gradelab"
MAX_LINES = 400

SANDBOX_MAY_IMPORT = ("gradelab.sandbox", "gradelab.boundary", "gradelab.errors")
BOUNDARY_MAY_IMPORT = ("gradelab.boundary", "gradelab.errors")
HIDDEN_MUST_NOT_REACH = ("gradelab.sandbox", "gradelab.grading")
TRUSTED_SANDBOX_IMPORTERS = ("gradelab.grading.supervisor", "gradelab.grading.environment",
                             "gradelab.grading.batch")

LONG_MODULES = {
    "gradelab/grading/collect.py": "one job, the reading of LMS downloads whose zip entries are student-controlled: "
                                   "every refusal (paths, links, sizes, nested archives) sits beside the extraction "
                                   "it guards, and its helpers have no other user",
}


def _within(module: str, packages: tuple[str, ...] | str) -> bool:
    packages = (packages,) if isinstance(packages, str) else packages
    return any(module == p or module.startswith(p + ".") for p in packages)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, *, is_package: bool, known: set[str]) -> set[str]:
    """The gradelab modules `source` (the text of `module`) imports, anywhere in the file.

    `from X import Y` counts as importing X, and X.Y when that is a module."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return {name for name in found if _within(name, "gradelab")}


def import_graph(root: Path = PACKAGE) -> tuple[dict[str, set[str]], dict[str, int]]:
    """Each module of the package -> the gradelab modules it imports; and each file's line count."""
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    known = set(files)
    graph, lines = {}, {}
    for module, path in files.items():
        text = path.read_text(encoding="utf-8")
        graph[module] = imports_of(text, module, is_package=path.name == "__init__.py", known=known)
        lines[path.relative_to(root.parent).as_posix()] = len(text.splitlines())
    return graph, lines


def _reach(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module `start` imports, directly or not, with one chain of imports that gets there."""
    chains = {start: [start]}
    todo = [start]
    while todo:
        current = todo.pop()
        for target in sorted(graph.get(current, ())):
            if target not in chains:
                chains[target] = chains[current] + [target]
                todo.append(target)
    return chains


def violations(graph: dict[str, set[str]]) -> list[str]:
    """One line per broken rule, naming the importer and what it imports."""
    found = []
    for module in sorted(graph):
        for target in sorted(graph[module]):
            if target not in graph:
                found.append(f"{module} imports {target}, which does not exist")
            elif _within(module, "gradelab.sandbox") and not _within(target, SANDBOX_MAY_IMPORT):
                found.append(f"{module} (sandbox side) imports {target}: only {', '.join(SANDBOX_MAY_IMPORT)}")
            elif _within(module, "gradelab.boundary") and not _within(target, BOUNDARY_MAY_IMPORT):
                found.append(f"{module} (boundary) imports {target}: only {', '.join(BOUNDARY_MAY_IMPORT)}")
            elif (_within(target, "gradelab.sandbox") and not _within(module, "gradelab.sandbox")
                  and module not in TRUSTED_SANDBOX_IMPORTERS):
                found.append(f"{module} (trusted) imports {target}: only {', '.join(TRUSTED_SANDBOX_IMPORTERS)} may")
        if _within(module, "gradelab.hidden"):
            for target, chain in sorted(_reach(graph, module).items()):
                if _within(target, HIDDEN_MUST_NOT_REACH):
                    found.append(f"{module} (trusted test side) reaches {target}: {' -> '.join(chain)}")
    return found


def too_long(lines: dict[str, int]) -> list[str]:
    found = [f"{path}: {count} lines, over {MAX_LINES} (split it, or list it in LONG_MODULES with the reason)"
             for path, count in sorted(lines.items()) if count > MAX_LINES and path not in LONG_MODULES]
    found += [f"{path} is listed in LONG_MODULES but has {lines.get(path, 0)} lines: remove it from the list"
              for path in sorted(LONG_MODULES) if lines.get(path, 0) <= MAX_LINES]
    return found


def _report(problems: list[str]) -> str:
    return f"{len(problems)} layout violation(s):\n  " + "\n  ".join(problems)


def test_import_graph_keeps_the_sides_apart():
    graph, _ = import_graph()
    assert "gradelab.sandbox.launch" in graph and "gradelab.hidden" in graph  # the package was read
    problems = violations(graph)
    assert not problems, _report(problems)


def test_no_module_is_too_long():
    _, lines = import_graph()
    problems = too_long(lines)
    assert not problems, _report(problems)


# ------------------------------------------------------------------ the checker itself


def test_the_reader_sees_lazy_relative_and_from_imports(tmp_path):
    package = tmp_path / "gradelab"
    (package / "sandbox").mkdir(parents=True)
    (package / "grading").mkdir()
    for init in (package, package / "sandbox", package / "grading"):
        (init / "__init__.py").write_text('"""doc"""\n')
    (package / "errors.py").write_text("")
    (package / "grading" / "batch.py").write_text("import json\n")
    (package / "sandbox" / "launch.py").write_text(
        "import os\n"
        "from . import executor\n"
        "def later():\n"
        "    from ..grading.batch import run\n"
        "    import gradelab.errors\n")
    (package / "sandbox" / "executor.py").write_text("from gradelab.grading import batch\n")
    graph, lines = import_graph(package)
    assert graph["gradelab.sandbox.launch"] == {"gradelab.sandbox", "gradelab.sandbox.executor",
                                                "gradelab.grading.batch", "gradelab.errors"}
    assert graph["gradelab.sandbox.executor"] == {"gradelab.grading", "gradelab.grading.batch"}
    assert lines["gradelab/sandbox/launch.py"] == 5
    assert violations(graph) == [
        "gradelab.sandbox.executor (sandbox side) imports gradelab.grading: only "
        "gradelab.sandbox, gradelab.boundary, gradelab.errors",
        "gradelab.sandbox.executor (sandbox side) imports gradelab.grading.batch: only "
        "gradelab.sandbox, gradelab.boundary, gradelab.errors",
        "gradelab.sandbox.launch (sandbox side) imports gradelab.grading.batch: only "
        "gradelab.sandbox, gradelab.boundary, gradelab.errors",
    ]


def test_the_checker_catches_each_rule():
    fake = {
        "gradelab.errors": set(),
        "gradelab.config": {"gradelab.errors"},
        "gradelab.boundary.wire": {"gradelab.errors", "gradelab.config"},    # boundary -> config
        "gradelab.sandbox.launch": {"gradelab.boundary.wire"},               # allowed
        "gradelab.sandbox.executor": {"gradelab.hidden.proxy"},              # sandbox -> trusted side
        "gradelab.hidden.proxy": {"gradelab.publish.api"},                   # reaches grading through publish
        "gradelab.publish.api": {"gradelab.grading.batch"},
        "gradelab.grading.batch": {"gradelab.sandbox.launch"},               # allowed importer
        "gradelab.grading.scoring": {"gradelab.sandbox.launch"},             # not an allowed importer
        "gradelab.cli": {"gradelab.grading.gone"},                           # stale import
    }
    assert violations(fake) == [
        "gradelab.boundary.wire (boundary) imports gradelab.config: only gradelab.boundary, gradelab.errors",
        "gradelab.cli imports gradelab.grading.gone, which does not exist",
        "gradelab.grading.scoring (trusted) imports gradelab.sandbox.launch: only gradelab.grading.supervisor, "
        "gradelab.grading.environment, gradelab.grading.batch may",
        "gradelab.hidden.proxy (trusted test side) reaches gradelab.grading.batch: "
        "gradelab.hidden.proxy -> gradelab.publish.api -> gradelab.grading.batch",
        "gradelab.hidden.proxy (trusted test side) reaches gradelab.sandbox.launch: "
        "gradelab.hidden.proxy -> gradelab.publish.api -> gradelab.grading.batch -> gradelab.sandbox.launch",
        "gradelab.sandbox.executor (sandbox side) imports gradelab.hidden.proxy: only "
        "gradelab.sandbox, gradelab.boundary, gradelab.errors",
    ]
    assert too_long({"gradelab/a.py": MAX_LINES, "gradelab/b.py": MAX_LINES + 1}) == [
        f"gradelab/b.py: {MAX_LINES + 1} lines, over {MAX_LINES} (split it, or list it in LONG_MODULES with the reason)",
        *[f"{path} is listed in LONG_MODULES but has 0 lines: remove it from the list" for path in sorted(LONG_MODULES)],
    ]
