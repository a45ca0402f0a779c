"""The errors gradelab raises on purpose: problems a person can fix, each told in one line.

Every such error derives from `GradelabError`. The `gradelab` command catches them in one place,
prints `error: <message>` and exits with the error's `exit_code`:

    0  done
    1  the input or the files (GradelabError): no grading_config.yml, an unreadable roster or
       review sheet, no notebook in the submissions, `export` on a folder never graded
    2  usage, or a refusal (RefusedError): `--workers 0` (click's own usage errors exit 2),
       `--require-sandbox` where an isolation layer is missing
    3  the machine (GradingEnvironmentError): a sandbox that cannot start, Chromium failing to
       render the report

`validate` also exits 1 when the notebook has problems, and `grade` when it was interrupted or
lost a worker. Anything else escaping a command is a bug in gradelab and shows its traceback.
"""

from __future__ import annotations


class GradelabError(Exception):
    """A problem with the input or the files; the message says which file and what to do."""

    exit_code = 1


class RefusedError(GradelabError):
    """gradelab will not run as asked, e.g. `--require-sandbox` where a layer is missing."""

    exit_code = 2


class GradingEnvironmentError(GradelabError):
    """The machine lacks or fails at something gradelab needs (the sandbox, Chromium)."""

    exit_code = 3
