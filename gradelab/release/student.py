"""What the release derives from the instructor notebook: the student notebook (nbgrader's own
preprocessors, one job each, in the order of nbgrader's `generate_assignment`) and the reference
module (extracted from the solution cells, not written twice)."""

from __future__ import annotations

import ast
import json

import nbformat
from nbgrader.preprocessors import (CheckCellMetadata, ClearHiddenTests, ClearMarkScheme, ClearOutput,
                                    ClearSolutions, ComputeChecksums, LockCells)

from gradelab.config import question_of


class ClearSolutionsWithHint(ClearSolutions):
    """nbgrader's ClearSolutions, with a stub that names the question to answer."""

    def preprocess_cell(self, cell, resources, index):
        qid = question_of(cell.metadata.get("nbgrader", {}).get("grade_id", "")) or "this cell"
        self.code_stub = {"python": f'# YOUR CODE HERE\nraise NotImplementedError("{qid}: replace this line with your answer")'}
        return super().preprocess_cell(cell, resources, index)


# nbgrader's generate_assignment order, without the steps that need its database.
RELEASE_PREPROCESSORS = (LockCells, ClearSolutionsWithHint, ClearOutput, CheckCellMetadata, ComputeChecksums,
                         ClearHiddenTests, ClearMarkScheme, ComputeChecksums, CheckCellMetadata)


def student_notebook(source: nbformat.NotebookNode) -> nbformat.NotebookNode:
    nb = nbformat.from_dict(json.loads(json.dumps(source)))
    resources: dict = {"nbgrader": {}}
    for step in RELEASE_PREPROCESSORS:
        nb, resources = step().preprocess(nb, resources)
    return nb


def reference_module(source: nbformat.NotebookNode) -> str:
    """Imports of the setup cell and the function and class definitions of the solution cells."""
    chunks = ['"""Reference solutions, extracted from source/ by `gradelab release`. Do not edit."""']
    for cell in source.cells:
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type != "code" or not (meta.get("solution") or meta.get("grade_id") == "setup"):
            continue
        code = "\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith(("%", "!")))
        tree = ast.parse(code)
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)):
                if isinstance(node, ast.ImportFrom) and node.module == "public_checks":
                    continue
                chunks.append(ast.get_source_segment(code, node))
    return "\n\n\n".join(chunks) + "\n"
