"""Release time, on the instructor's machine (the `gradelab release` CLI process): source/ in,
release/, solutions/ and autograder/ out; never sees a submission.

- build.py: `release()`, the whole release, and its report.
- checks.py: checks of the source (solution and hidden-test markers, grade ids, points against
  the config, a test for every question); `ReleaseError` names file, cell and line.
- student.py: the student notebook (nbgrader's preprocessors) and the reference module extracted
  from the solution cells.
- refdata.py: reference data computed from the reference (the dying depths), byte-identical on
  every CPU.
- gradescope.py: the Gradescope autograder zip (setup.sh, run_autograder, the project).
"""
