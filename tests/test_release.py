"""The release's guarantees."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest

from gradelab.release.build import release
from gradelab.release.checks import ReleaseError, check_source
from gradelab.config import load_config

ARTEFACTS = ("release", "solutions", "autograder")
RELEASE_INPUTS = ("source", "grading_config.yml", "pyproject.toml", "README.md", "gradelab")


def _copy_project(root: Path, copy: Path) -> Path:
    """What a release reads, copied to `copy`."""
    copy.mkdir(parents=True, exist_ok=True)
    for name in RELEASE_INPUTS:
        (shutil.copytree if (root / name).is_dir() else shutil.copy)(root / name, copy / name)
    return copy


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, root) -> Path:
    """A copy of the project, released anew."""
    copy = _copy_project(root, tmp_path_factory.mktemp("project"))
    release(copy)
    return copy


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_committed_artefacts_match_a_fresh_release(fresh, root):
    """CI fails when source/ changed and the artefacts were not regenerated (`gradelab release`)."""
    for name in ARTEFACTS:
        committed, regenerated = _tree(root / name), _tree(fresh / name)
        assert committed.keys() == regenerated.keys(), name
        stale = [f for f in committed if committed[f] != regenerated[f]]
        assert not stale, f"{name}: {stale} differ from a fresh `gradelab release`: run it and commit"


def test_release_is_byte_identical_twice(fresh):
    first = {n: _tree(fresh / n) for n in ARTEFACTS}
    release(fresh)
    assert first == {n: _tree(fresh / n) for n in ARTEFACTS}


@pytest.mark.slow
def test_release_is_byte_identical_with_another_cpus_kernels(tmp_path, root, kernel_environments):
    """`gradelab release` with this machine's kernels and with another CPU's (OTHER_KERNELS in
    conftest.py), in two processes side by side: the same bytes, and the reference data committed."""
    inputs = _copy_project(root, tmp_path / "inputs")  # one copy: both releases read the same files
    runs = {}
    for label, env in kernel_environments.items():
        copy = _copy_project(inputs, tmp_path / label)
        runs[label] = copy, subprocess.Popen([sys.executable, "-m", "gradelab.cli", "release"], cwd=copy, env=env,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for label, (_, process) in runs.items():
        _, errors = process.communicate(timeout=600)
        assert process.returncode == 0, f"release with the {label} kernels failed: {errors[-2000:]}"
    native, other = ({name: _tree(copy / name) for name in ARTEFACTS} for copy, _ in runs.values())
    for name in ARTEFACTS:
        assert native[name].keys() == other[name].keys(), name
        differ = [f for f in native[name] if native[name][f] != other[name][f]]
        assert not differ, f"{name}: {differ} depend on the CPU's kernels"
    assert native["solutions"]["reference_data.json"] == (root / "solutions" / "reference_data.json").read_bytes(), \
        "solutions/reference_data.json differs from a fresh `gradelab release`: run it and commit"


def _solution_lines(source: nbformat.NotebookNode) -> tuple[list[str], set[str]]:
    """Lines inside solution/hidden-test regions, and the lines outside them (public by design)."""
    lines, public = [], set()
    for cell in source.cells:
        for begin, end in (("### BEGIN SOLUTION", "### END SOLUTION"), ("### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS")):
            inside = False
            for line in cell.source.splitlines():
                if line.strip() == begin:
                    inside = True
                elif line.strip() == end:
                    inside = False
                elif inside and len(line.strip()) > 12:
                    lines.append(line.strip())
                elif not inside:
                    public.add(line.strip())
    return lines, public


def test_nothing_leaks_into_the_release(fresh):
    source = nbformat.read(fresh / "source/vanishing_gradients/vanishing_gradients.ipynb", as_version=4)
    released = "\n".join(p.read_text() for p in (fresh / "release").rglob("*") if p.is_file())
    helpers = "\n".join(p.read_text() for p in (fresh / "source/vanishing_gradients").glob("*.py"))
    secret, public = _solution_lines(source)
    # A solution line that also stands in the given code or the helpers is not a leak.
    leaked = [line for line in secret if line in released and line not in public and line not in helpers]
    assert not leaked, leaked
    assert "BEGIN SOLUTION" not in released and "HIDDEN TESTS" not in released
    for test in (fresh / "autograder" / "tests").glob("test_*.py"):
        for name in re.findall(r"^def (test_\w+)", test.read_text(), re.M):
            assert name not in released, f"hidden test {name} appears in release/"


def test_release_notebook_is_valid_and_locked(fresh):
    nb = nbformat.read(fresh / "release/vanishing_gradients/vanishing_gradients.ipynb", as_version=4)
    nbformat.validate(nb)
    stubs = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution") and c.cell_type == "code"]
    assert stubs and all('raise NotImplementedError("q' in c.source for c in stubs)
    locked = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("locked")]
    assert locked and all(c.metadata.get("editable") is False for c in locked)
    assert all("checksum" in c.metadata["nbgrader"] for c in nb.cells if c.metadata["nbgrader"].get("grade")
               or c.metadata["nbgrader"].get("solution") or c.metadata["nbgrader"].get("locked"))
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("mutation, message", [
    (lambda nb: nb.cells[5].__setitem__("source", nb.cells[5].source.replace("### END SOLUTION", "")),
     r"vanishing_gradients.ipynb, cell 5, line \d+: ### BEGIN SOLUTION is never closed"),
    (lambda nb: nb.cells[8].metadata.nbgrader.__setitem__("grade_id", nb.cells[5].metadata.nbgrader.grade_id),
     r"cell 8: grade_id 'q1_1_tensors' is also used by cell 5"),
    (lambda nb: nb.cells[6].metadata.nbgrader.__setitem__("points", 5),
     r"question q1_1 has 5 test-cell points .* grading_config.yml says 2"),
])
def test_mistakes_in_source_stop_the_release(root, mutation, message):
    config = load_config(root / "grading_config.yml")
    nb = nbformat.read(root / "source/vanishing_gradients/vanishing_gradients.ipynb", as_version=4)
    assert nb.cells[5].metadata.nbgrader.grade_id == "q1_1_tensors"
    mutation(nb)
    with pytest.raises(ReleaseError, match=message):
        check_source(nb, config, notebook_path=Path("vanishing_gradients.ipynb"), tests_dir=root / "source/hidden_tests")


def test_only_locked_demonstrations_may_be_skipped_when_grading(root):
    config = load_config(root / "grading_config.yml")
    nb = nbformat.read(root / "source/vanishing_gradients/vanishing_gradients.ipynb", as_version=4)
    assert config.skip_when_grading == ["q3_3_train"]
    check_source(nb, config, notebook_path=Path("vanishing_gradients.ipynb"), tests_dir=root / "source/hidden_tests")
    for answer_or_check in ("q1_2_sigmoid", "q1_2_check", "no_such_cell"):
        config.skip_when_grading = [answer_or_check]
        with pytest.raises(ReleaseError, match=f"skip_when_grading lists '{answer_or_check}'"):
            check_source(nb, config, notebook_path=Path("vanishing_gradients.ipynb"),
                         tests_dir=root / "source/hidden_tests")


def test_question_without_tests_stops_the_release(root, tmp_path):
    config = load_config(root / "grading_config.yml")
    nb = nbformat.read(root / "source/vanishing_gradients/vanishing_gradients.ipynb", as_version=4)
    for test in (root / "source/hidden_tests").glob("*.py"):
        if test.name != "test_bonus.py":
            shutil.copy(test, tmp_path / test.name)
    with pytest.raises(ReleaseError, match="question qb_1 .* no test"):
        check_source(nb, config, notebook_path=Path("vanishing_gradients.ipynb"), tests_dir=tmp_path)


def test_gradescope_bundle_layout(fresh):
    with zipfile.ZipFile(fresh / "autograder/gradescope_autograder.zip") as bundle:
        names = bundle.namelist()
        assert {"setup.sh", "run_autograder"} <= set(names)
        assert "gradelab/grading_config.yml" in names and "gradelab/solutions/reference_data.json" in names
        assert bundle.getinfo("run_autograder").external_attr >> 16 & 0o111


@pytest.mark.slow
def test_gradescope_run_autograder_writes_results(fresh, tmp_path, root):
    """Run the bundle's run_autograder here on a submission, as Gradescope would."""
    home = tmp_path / "autograder"
    with zipfile.ZipFile(fresh / "autograder/gradescope_autograder.zip") as bundle:
        bundle.extractall(home / "source")
    (home / "submission").mkdir()
    shutil.copy(fresh / "release/vanishing_gradients/vanishing_gradients.ipynb", home / "submission" / "student.ipynb")
    run = home / "source" / "run_autograder"
    run.chmod(0o755)
    venv = Path(sys.executable).parent.parent
    done = subprocess.run(["bash", str(run)], env={"AUTOGRADER_ROOT": str(home), "GRADELAB_VENV": str(venv),
                                                     "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((home / "results" / "results.json").read_text())
    assert results["score"] == 0 and results["tests"]
    assert all(t["status"] == "failed" and t["tags"] for t in results["tests"])
    assert any("not answered" in t["output"] for t in results["tests"])
