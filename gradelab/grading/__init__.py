"""The trusted grading side: one submission in a warm grading worker W, whole batches in the
batch parent B (the CLI process of `gradelab grade`).

- supervisor.py (W): `Grader`, forks the sandbox S and follows the notebook's execution.
- session.py (W; `_zygote_main` in Z): forks the test-runner zygote and talks to its runners T.
- scoring.py (W): question scores and the result files of a student.
- submission.py (W): reading a submitted notebook (JSON only).
- environment.py (W): can the sandbox read the Python it runs.
- batch.py (B; its worker entry in W), collect.py (B), gradebook.py (B writes; publish reads).
- names.py (B; publish reads): who a file is, from the names an LMS download gives it.
- cluster.py (B): a batch on a Dask cluster; worker.py (a Dask worker, and its grading process W).
- gradescope.py: Gradescope's run_autograder, grading in its own process (then W).
Only supervisor, environment and batch (`probe_layers`) import gradelab.sandbox.
"""
