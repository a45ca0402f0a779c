"""Reading a submitted notebook (gradelab.grading.submission): locked cells as released, each
grade_id once, and BrokenNotebook, never another exception, for any malformed structure."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import nbformat
import pytest

from gradelab.grading.submission import BrokenNotebook, Submission, load_submission
from gradelab.grading.supervisor import Grader
from gradelab.project import Project
from student_notebooks import reference_notebook

ROOT = Path(__file__).resolve().parents[1]
RELEASE = nbformat.read(ROOT / "release/vanishing_gradients/vanishing_gradients.ipynb", as_version=4)
RELEASED_SOURCE = {c.metadata["nbgrader"]["grade_id"]: c.source for c in RELEASE.cells}
OLD_FORMAT = ROOT / "examples/submissions/old_format_v3.ipynb"
# The locked q1_2_plot cell drawing the right curves whatever my_sigmoid does.
FORGED_PLOT = RELEASED_SOURCE["q1_2_plot"].replace("my_sigmoid(x)", "torch.sigmoid(x)").replace(
    "my_sigmoid_grad(a)", "a * (1 - a)")


@pytest.fixture(scope="module")
def answered() -> dict:
    """The reference answers in the released notebook's layout, as the JSON a student uploads."""
    return json.loads(nbformat.writes(reference_notebook(ROOT)))


def cell_of(notebook: dict, grade_id: str) -> dict:
    return next(c for c in notebook["cells"] if c["metadata"].get("nbgrader", {}).get("grade_id") == grade_id)


def load(tmp_path: Path, notebook: dict) -> Submission:
    path = tmp_path / "submission.ipynb"
    path.write_text(json.dumps(notebook), encoding="utf-8")
    return load_submission(path, RELEASE)


def executed(submission: Submission, grade_id: str) -> list[tuple[int, str]]:
    """(index, source) of the cells run under `grade_id`."""
    indices = {c.index for c in submission.cells if c.grade_id == grade_id}
    return [(i, source) for i, source in submission.to_execute() if i in indices]


def test_the_reference_answers_load_without_a_problem(tmp_path, answered):
    submission = load(tmp_path, answered)
    assert submission.problems == []
    assert executed(submission, "q1_2_plot") == [(answered["cells"].index(cell_of(answered, "q1_2_plot")),
                                                  RELEASED_SOURCE["q1_2_plot"])]


@pytest.mark.parametrize("tamper", ["source", "source and metadata", "type"])
def test_a_changed_locked_plot_cell_runs_as_released_with_a_message(tmp_path, answered, tamper):
    """Drawing torch.sigmoid in the locked plot cell would pass the plot test with a wrong my_sigmoid."""
    notebook = copy.deepcopy(answered)
    cell = cell_of(notebook, "q1_2_plot")
    index = notebook["cells"].index(cell)
    if tamper == "type":
        cell.update(cell_type="markdown", source=FORGED_PLOT)
        del cell["outputs"], cell["execution_count"]
    else:
        cell["source"] = FORGED_PLOT
    if tamper == "source and metadata":  # the metadata claims an answer cell, which the student may edit
        cell["metadata"]["nbgrader"].update(locked=False, solution=True)
    submission = load(tmp_path, notebook)
    assert executed(submission, "q1_2_plot") == [(index, RELEASED_SOURCE["q1_2_plot"])]
    assert submission.problems == ["cell q1_2_plot is locked and was changed; the released version was run instead"]


def test_locked_metadata_edited_without_the_source_is_no_change(tmp_path, answered):
    notebook = copy.deepcopy(answered)
    cell_of(notebook, "q1_3_plot")["metadata"]["nbgrader"].update(locked=False, checksum="0" * 32)
    submission = load(tmp_path, notebook)
    assert submission.problems == []
    assert [c.kind for c in submission.cells if c.grade_id == "q1_3_plot"] == ["locked"]


def test_a_missing_locked_cell_is_named_and_not_run(tmp_path, answered):
    notebook = copy.deepcopy(answered)
    notebook["cells"].remove(cell_of(notebook, "q1_3_plot"))
    submission = load(tmp_path, notebook)
    assert executed(submission, "q1_3_plot") == []
    assert submission.problems == ["cell q1_3_plot is missing (deleted, or its metadata was removed): "
                                   "it was not run, and what it draws counts as missing"]


@pytest.mark.parametrize("grade_id", ["q1_2_plot", "q2_2_plot", "q1_2_sigmoid"])
@pytest.mark.parametrize("where", ["after", "before"])
def test_a_duplicated_grade_id_runs_and_is_graded_once_the_first(tmp_path, answered, grade_id, where):
    """A later copy drawing the expected plot (or redefining the answer) would be what the tests see."""
    notebook = copy.deepcopy(answered)
    original = cell_of(notebook, grade_id)
    forged = {**copy.deepcopy(original), "source": FORGED_PLOT}
    position = notebook["cells"].index(original) + (where == "after")
    notebook["cells"].insert(position, forged)
    first = notebook["cells"].index(original if where == "after" else forged)
    submission = load(tmp_path, notebook)
    expected_source = (RELEASED_SOURCE[grade_id] if grade_id == "q1_2_plot"  # locked: as released
                       else "".join(notebook["cells"][first]["source"]))
    assert executed(submission, grade_id) == [(first, expected_source)]
    assert [c.grade_id for c in submission.cells].count(grade_id) == 1
    assert all(i != notebook["cells"].index(forged if where == "after" else original)
               for i, _ in submission.to_execute())
    duplicate = f"cell {grade_id} appears 2 times; only the first was run and graded, the later copies were not run"
    assert duplicate in submission.problems


def test_a_duplicated_written_answer_is_graded_once_the_first(tmp_path, answered):
    notebook = copy.deepcopy(answered)
    original = cell_of(notebook, "q2_1_answer")
    original["source"] = "My own answer."
    notebook["cells"].append({**copy.deepcopy(original), "source": "Text copied from elsewhere."})
    submission = load(tmp_path, notebook)
    assert submission.answers["q2_1_answer"] == "My own answer."
    assert submission.problems == ["cell q2_1_answer appears 2 times; only the first was graded"]


def test_the_release_not_the_submission_says_which_cells_run(tmp_path, answered):
    """An answer cell whose metadata claims a public check is still run; a public check claiming
    to be an answer is still not."""
    notebook = copy.deepcopy(answered)
    cell_of(notebook, "q1_4_build_model")["metadata"]["nbgrader"].update(grade=True, solution=False, points=3)
    cell_of(notebook, "q1_4_check")["metadata"]["nbgrader"].update(grade=False, solution=True)
    submission = load(tmp_path, notebook)
    assert len(executed(submission, "q1_4_build_model")) == 1
    assert executed(submission, "q1_4_check") == []


def test_nbgrader_metadata_that_is_a_list_is_a_broken_notebook(tmp_path, answered):
    notebook = copy.deepcopy(answered)
    cell_of(notebook, "q1_1_tensors")["metadata"]["nbgrader"] = ["grade_id", "q1_1_tensors"]
    index = next(i for i, c in enumerate(notebook["cells"]) if isinstance(c["metadata"].get("nbgrader"), list))
    with pytest.raises(BrokenNotebook, match=f"metadata.nbgrader of cell {index} is not a JSON object"):
        load(tmp_path, notebook)


WRONG_SIGMOID = "def my_sigmoid(x):\n    return torch.tanh(x)\n\n\ndef my_sigmoid_grad(a):\n    return 1 - a ** 2\n"


@pytest.fixture(scope="module")
def grader():
    with Grader(Project.load(ROOT)) as grader:
        yield grader


@pytest.mark.slow
def test_tampering_with_the_plot_cell_does_not_raise_a_wrong_sigmoids_score(grader, tmp_path, answered):
    """A tanh for my_sigmoid, then the locked plot cell edited, or copied, to draw the sigmoid:
    graded as the same tanh without the tampering, with a message naming the cell."""
    wrong = copy.deepcopy(answered)
    cell_of(wrong, "q1_2_sigmoid")["source"] = WRONG_SIGMOID
    edited = copy.deepcopy(wrong)
    cell_of(edited, "q1_2_plot")["source"] = FORGED_PLOT
    copied = copy.deepcopy(wrong)
    plot = cell_of(copied, "q1_2_plot")
    copied["cells"].insert(copied["cells"].index(plot) + 1, {**copy.deepcopy(plot), "source": FORGED_PLOT})
    results = {}
    for name, notebook in {"wrong": wrong, "edited": edited, "copied": copied}.items():
        path = tmp_path / f"{name}.ipynb"
        path.write_text(json.dumps(notebook), encoding="utf-8")
        results[name] = grader.grade(path, name)
    plot_test = "the activation and gradient plot shows the sigmoid and its derivative"
    for name, result in results.items():
        assert result.status == "graded", name
        assert [t.status for t in result.tests if t.name == plot_test] == ["failed"], name
        assert ({q.id: q.score for q in result.questions}
                == {q.id: q.score for q in results["wrong"].questions}), name
    assert "cell q1_2_plot is locked and was changed; the released version was run instead" in results["edited"].messages
    assert any("cell q1_2_plot appears 2 times" in m for m in results["copied"].messages)


# ------------------------------------------------------------------ fuzzing the structure

WRONG_VALUES = [None, 0, -1, 2**70, 1.5, True, "", "x", [], [1], [None, "a"], ["a", 2], {}, {"a": 1}, {"cells": []}]


def json_paths(node, path=(), depth=5):
    """Every path to a value in `node`, down to `depth` levels (lists: their first six items)."""
    yield path
    if depth == 0:
        return
    if isinstance(node, dict):
        for key, value in node.items():
            yield from json_paths(value, (*path, key), depth - 1)
    elif isinstance(node, list):
        for index, value in enumerate(node[:6]):
            yield from json_paths(value, (*path, index), depth - 1)


def replaced(notebook: dict, path: tuple, value) -> dict:
    """`notebook` with the value at `path` replaced by `value` (or deleted, for the DELETE marker)."""
    if not path:
        return value
    mutated = copy.deepcopy(notebook)
    parent = mutated
    for key in path[:-1]:
        parent = parent[key]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = copy.deepcopy(value)
    return mutated


DELETE = object()


def assert_loads_or_is_broken(tmp_path: Path, notebook, what: str) -> None:
    path = tmp_path / "fuzzed.ipynb"
    path.write_text(json.dumps(notebook), encoding="utf-8")
    try:
        result = load_submission(path, RELEASE)
    except BrokenNotebook as exc:
        assert 0 < len(str(exc)) < 400, what
        return
    except Exception as exc:  # noqa: BLE001 -- the point of the test
        pytest.fail(f"{what}: {type(exc).__name__}: {exc}")
    assert isinstance(result, Submission), what
    assert all(type(c.source) is str and (c.grade_id is None or type(c.grade_id) is str) for c in result.cells), what


def fuzz_bases(answered: dict) -> dict[str, dict]:
    """Valid notebooks, each cut to the cells whose structure differs: one of each kind, and a v3 one."""
    kinds = ["setup", "q1_1_tensors", "q1_1_check", "q1_2_plot", "q2_1_answer", "intro"]
    trimmed = copy.deepcopy({**answered, "cells": [cell_of(answered, g) for g in kinds]})
    trimmed["cells"][1]["source"] = "".join(trimmed["cells"][1]["source"])  # text, besides Jupyter's lists of lines
    old = json.loads(OLD_FORMAT.read_text(encoding="utf-8"))
    old["worksheets"][0]["cells"] = old["worksheets"][0]["cells"][:4]
    return {"v4": trimmed, "v3": old}


def test_every_wrong_type_anywhere_loads_or_is_a_broken_notebook(tmp_path, answered):
    for name, base in fuzz_bases(answered).items():
        assert_loads_or_is_broken(tmp_path, base, f"{name} unchanged")
        paths = list(json_paths(base, depth=7 if name == "v3" else 5))
        assert len(paths) > 60
        for path in paths:
            for value in [*WRONG_VALUES, DELETE] if path else WRONG_VALUES:
                assert_loads_or_is_broken(tmp_path, replaced(base, path, value), f"{name} {path} = {value!r}")


def test_random_mutations_load_or_are_a_broken_notebook(tmp_path, answered):
    """Several wrong values at once, at random places (a fixed seed: the same cases every run)."""
    rng = random.Random(20260)
    for name, base in fuzz_bases(answered).items():
        paths = [p for p in json_paths(base, depth=8) if p]
        for case in range(150):
            notebook = base
            for _ in range(rng.randint(2, 4)):
                path = rng.choice(paths)
                try:
                    notebook = replaced(notebook, path, rng.choice([*WRONG_VALUES, DELETE]))
                except (KeyError, IndexError, TypeError):  # an earlier mutation removed the path
                    continue
            assert_loads_or_is_broken(tmp_path, notebook, f"{name} case {case}")
