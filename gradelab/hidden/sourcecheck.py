"""Checks of a submission's code as submitted: what the sandbox cannot forge.

The trusted supervisor reads each cell's source from the submitted file, so a check of that
source does not depend on anything the sandbox reports. `torch_only_problems` backs a property
the sandbox could otherwise only claim, e.g. that a function computes with torch (which autograd
needs) and not with numpy or math: a hostile sandbox can forge the reply of an autograd call,
not the code the student submitted.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Sequence

# Libraries whose functions compute on numbers or numpy arrays, outside autograd.
NUMERIC_MODULES = frozenset({"numpy", "math", "cmath", "scipy"})
# Their constants are plain numbers, fine in a torch computation (`math.e ** -x`).
NUMERIC_CONSTANTS = frozenset({"e", "pi", "tau", "inf", "nan", "euler_gamma"})
# Tensor methods and torch modes whose results leave autograd's graph.
LEAVES_AUTOGRAD = frozenset({"numpy", "tolist", "item", "detach", "detach_", "data", "no_grad", "inference_mode"})
# Code that runs or rebinds what the source does not show.
DYNAMIC_NAMES = frozenset({"exec", "eval", "compile", "__import__", "globals", "locals", "vars", "setattr",
                           "importlib", "builtins", "sys", "gc", "get_ipython"})
# Attributes that reach a function's code or a namespace past the source shown.
DYNAMIC_ATTRIBUTES = frozenset({"__code__", "__globals__", "__dict__", "__builtins__", "__closure__"})

Cell = tuple[int, str]  # (cell index in the notebook, source)


def torch_only_problems(cells: Sequence[Cell], name: str) -> list[str]:
    """Why the function `name`, as the last cell binding it defines it, may not compute with torch
    alone; empty when it does. The definition is checked with the notebook functions it calls:
    no call into numpy, math or scipy (their constants are allowed), no tensor-to-number
    conversion or detaching (.numpy(), .item(), .detach(), torch.no_grad), no dynamic code
    (exec, eval, globals, sys, ...). A cell that does not parse is skipped: it did not run. Not
    seen: a later cell that rebinds `name` through dynamic code (globals() and the like have
    honest uses in other cells, so they are not held against this answer)."""
    trees = [(index, tree) for index, source in cells if (tree := _parse(source)) is not None]
    bindings: dict[str, tuple[int, ast.AST]] = {}
    for index, tree in trees:
        for bound, node in _bindings(tree):
            bindings[bound] = (index, node)
    if name not in bindings:
        return [f"no cell defines `{name}` with `def` or an assignment, so its code cannot be checked"]
    numeric = {"np", *NUMERIC_MODULES} | {alias for _, tree in trees for alias in _numeric_aliases(tree)}
    problems: list[str] = []
    checked: set[str] = set()
    pending = [name]
    while pending:
        current = pending.pop()
        if current in checked or current not in bindings:
            continue
        checked.add(current)
        index, node = bindings[current]
        problems += [f"`{current}` {what} (cell {index}, line {line})"
                     for what, line in _node_problems(node, current, numeric)]
        # The notebook's functions (and aliases such as `f = torch.exp`) it uses, not its own
        # variables, nor values such as a tensor it reads.
        local = _local_names(node)
        pending += [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id not in local
                    and n.id not in numeric and isinstance(bindings.get(n.id, (0, None))[1], _FOLLOWED)]
    return problems


_FOLLOWED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.Name, ast.Attribute,
             ast.Import, ast.ImportFrom)


def _parse(source: str) -> ast.Module | None:
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError):
        pass
    from IPython.core.inputtransformer2 import TransformerManager  # magics (%matplotlib), as the sandbox runs them

    try:
        return ast.parse(TransformerManager().transform_cell(source))
    except (SyntaxError, ValueError):
        return None


def _bindings(tree: ast.Module) -> Iterator[tuple[str, ast.AST]]:
    """The names a cell binds in the notebook's namespace, each with the node that binds it: the
    definition, the assigned value, or the statement itself (import, for, with, :=)."""
    def scope(statements: list[ast.stmt]) -> Iterator[tuple[str, ast.AST]]:
        for statement in statements:
            if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield statement.name, statement
                continue
            if isinstance(statement, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
                for target in targets:
                    for n in ast.walk(target):
                        if isinstance(n, ast.Name):
                            yield n.id, statement.value if statement.value is not None else statement
            elif isinstance(statement, (ast.Import, ast.ImportFrom)):
                for alias in statement.names:
                    yield (alias.asname or alias.name).split(".")[0], statement
            elif isinstance(statement, (ast.For, ast.AsyncFor, ast.With, ast.AsyncWith)):
                targets = ([statement.target] if isinstance(statement, (ast.For, ast.AsyncFor))
                           else [item.optional_vars for item in statement.items if item.optional_vars])
                for target in targets:
                    for n in ast.walk(target):
                        if isinstance(n, ast.Name):
                            yield n.id, statement
            for child in ast.iter_child_nodes(statement):  # its expressions, not the statements inside it
                if not isinstance(child, (ast.stmt, ast.ExceptHandler)):
                    yield from ((n.target.id, n) for n in ast.walk(child) if isinstance(n, ast.NamedExpr))
            for field in ("body", "orelse", "finalbody", "handlers"):
                nested = getattr(statement, field, None)
                if isinstance(nested, list):
                    yield from scope([s for s in nested if isinstance(s, ast.stmt)] +
                                     [s for h in nested if isinstance(h, ast.ExceptHandler) for s in h.body])

    yield from scope(tree.body)


def _numeric_aliases(tree: ast.Module) -> Iterator[str]:
    """Names a cell binds to a numeric library or to one of its functions (`np`, `exp`, ...)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in NUMERIC_MODULES:
                    yield (alias.asname or alias.name).split(".")[0]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in NUMERIC_MODULES:
            for alias in node.names:
                if alias.name not in NUMERIC_CONSTANTS:
                    yield alias.asname or alias.name


def _node_problems(node: ast.AST, bound: str, numeric: set[str]) -> Iterator[tuple[str, int]]:
    """What is wrong with `node`, which binds the name `bound`: (problem, line) pairs."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        alias = next(a for a in node.names if (a.asname or a.name).split(".")[0] == bound)
        module = (node.module or ".") if isinstance(node, ast.ImportFrom) else alias.name
        if module.split(".")[0] != "torch":
            yield f"is imported from {module}", node.lineno
        return
    if isinstance(node, (ast.For, ast.AsyncFor, ast.With, ast.AsyncWith, ast.NamedExpr)):
        yield "is bound by a loop, `with` or `:=`, not defined with `def`", node.lineno
        return
    constants = {id(n.value) for n in ast.walk(node) if isinstance(n, ast.Attribute) and n.attr in NUMERIC_CONSTANTS}
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and n.id in numeric and id(n) not in constants:
            yield f"uses {_shown(n, node)}, which computes outside torch", n.lineno
        elif isinstance(n, ast.Attribute) and n.attr in LEAVES_AUTOGRAD:
            yield f"uses .{n.attr}, which leaves autograd's graph", n.lineno
    yield from _dynamic_uses(node)


def _local_names(node: ast.AST) -> set[str]:
    """The parameters and local variables of the functions in `node`: not the notebook's names."""
    return ({a.arg for a in ast.walk(node) if isinstance(a, ast.arg)}
            | {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)})


def _dynamic_uses(node: ast.AST) -> Iterator[tuple[str, int]]:
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and n.id in DYNAMIC_NAMES:
            yield f"uses {n.id}, which runs code the grader cannot read", n.lineno
        elif isinstance(n, ast.Attribute) and n.attr in DYNAMIC_ATTRIBUTES:
            yield f"uses .{n.attr}, which reaches past the code shown", n.lineno


def _shown(name: ast.Name, within: ast.AST) -> str:
    """`np.exp` rather than `np`: the attribute chain that starts at `name`, when there is one."""
    for n in ast.walk(within):
        if isinstance(n, ast.Attribute) and n.value is name:
            return ast.unparse(n)[:60]
    return name.id
