"""The `gradelab` command line: a thin layer over the library (see README for the workflows)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gradelab.errors import GradelabError

# nbformat imports jsonschema, which loads rfc3987_syntax when installed (the Jupyter stack installs
# it) just to check the "iri" string format, which no notebook schema uses; that module builds a
# parser at import time: 1.7 s in every process that reads a notebook (this one, each pool worker,
# every Gradescope run). Blocking it leaves jsonschema without that one format checker.
sys.modules.setdefault("rfc3987_syntax", None)

console = Console(stderr=True)
PROJECT_OPTION = click.option("--project", type=click.Path(file_okay=False, path_type=Path), default=".",
                              show_default=True, help="The assignment repository (holds grading_config.yml).")


class _Commands(click.Group):
    """Every command's GradelabError ends here: one `error:` line, and the error's exit code
    (the table in gradelab/errors.py)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GradelabError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
            ctx.exit(exc.exit_code)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """gradelab: release, grade, report and export an auto-graded PyTorch assignment.

    \b
    Instructor workflow:  gradelab release → hand out release/ → gradelab grade SUBMISSIONS --out DIR
                          → gradelab report/export --from DIR
    Student workflow:     open the release notebook in JupyterLab → check("q1_2") cells
                          → python public_checks.py NOTEBOOK (public checks) → submit
    `gradelab validate NOTEBOOK` is the instructors' check: the hidden tests, as graded.
    """


@main.command()
@PROJECT_OPTION
def release(project: Path) -> None:
    """Make release/, solutions/ and autograder/ from source/ (byte-identical on every run)."""
    from gradelab.release.build import release as do_release

    report = do_release(project)
    console.print(f"[green]released[/] {len(report.files)} files in {report.seconds:.1f} s")


def _print_result(result) -> None:
    table = Table(title=f"{result.student_id}: {result.score:g} / {result.max_score:g} ({result.status})")
    for column in ("question", "score", "tests passed", "note"):
        table.add_column(column)
    for q in result.questions:
        note = "manual part to grade" if q.needs_manual else ""
        table.add_row(f"{q.id} {q.title}", f"{q.score:g} / {q.max_score:g}", f"{q.passed}/{q.total}", note)
    console.print(table)
    for test in result.tests:
        if test.status != "passed" and test.visibility != "hidden":
            console.print(f"  [red]{test.question}[/] {test.name}: {test.output}")
    for message in result.messages:
        console.print(f"  [yellow]note:[/] {message}")


@main.command()
@click.argument("notebook", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@PROJECT_OPTION
@click.option("--require-sandbox", is_flag=True, help="Refuse to run unless every isolation layer is available.")
def validate(notebook: Path, project: Path, require_sandbox: bool) -> None:
    """Run NOTEBOOK top to bottom as the grader would and report every question.

    Exits non-zero when a question is not answered, a cell fails or times out, or a check
    fails, so it works as a pre-submit check and in CI.
    """
    from gradelab.grading.supervisor import Grader
    from gradelab.project import Project

    with Grader(Project.load(project), require_sandbox=require_sandbox) as grader:
        result = grader.grade(notebook, notebook.stem)
    _print_result(result)
    auto_max = sum(q.points for q in grader.config.questions)
    failed = result.status != "graded" or any(t.status != "passed" for t in result.tests)
    console.print(f"[{'red' if failed else 'green'}]{'problems found' if failed else 'all checks passed'}[/] "
                  f"(automatic part: {result.score:g} of {auto_max:g})")
    sys.exit(1 if failed else 0)


def _tls_options(role: str):
    """--tls-ca-file/--tls-cert/--tls-key; each defaults to the config's cluster.tls_*."""
    def decorate(command):
        for name, what in (("--tls-key", f"the {role}'s private key (PEM), unless --tls-cert holds it"),
                           ("--tls-cert", f"the {role}'s TLS certificate (PEM)"),
                           ("--tls-ca-file", "the certificate authority the cluster's certificates are signed by")):
            command = click.option(name, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                                   help=f"{what[0].upper()}{what[1:]}; default: cluster.{name[2:].replace('-', '_')} "
                                        "in the config.")(command)
        return command
    return decorate


@main.command()
@click.argument("submissions", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder: <student>/results.json, gradebook.sqlite, summary.")
@PROJECT_OPTION
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Parallel workers, at least 1 (default: one per core).")
@click.option("--student", "only", multiple=True, help="Regrade only this student id (repeatable).")
@click.option("--force", is_flag=True, help="Regrade even when the submission did not change.")
@click.option("--require-sandbox", is_flag=True, help="Refuse to grade unless every isolation layer is available.")
@click.option("--scheduler", metavar="ADDRESS", help="Grade on the Dask cluster of this scheduler (tls://host:port).")
@click.option("--cluster", "local", metavar="local:N", help="Grade on a loopback Dask cluster of N worker processes.")
@_tls_options("client")
def grade(submissions: Path, out_dir: Path, project: Path, workers: int | None, only: tuple[str, ...],
          force: bool, require_sandbox: bool, scheduler: str | None, local: str | None,
          tls_ca_file: Path | None, tls_cert: Path | None, tls_key: Path | None) -> None:
    """Grade SUBMISSIONS (a notebook, a folder, an LMS zip or an nbgrader tree) into --out.

    With --scheduler or --cluster the submissions are graded by Dask workers (`gradelab worker`)
    instead of the local pool; results are written here all the same."""
    from gradelab.grading.batch import grade_batch

    summary = grade_batch(submissions, out_dir, project=project, workers=workers, only=set(only),
                          force=force, require_sandbox=require_sandbox, console=console,
                          cluster=_cluster_target(project, workers, require_sandbox, scheduler, local,
                                                  tls_ca_file, tls_cert, tls_key))
    sys.exit(0 if summary.ok else 1)


def _cluster_target(project, workers, require_sandbox, scheduler, local, tls_ca_file, tls_cert, tls_key):
    """The ClusterTarget of `grade`'s options, or None for the local pool."""
    if not (scheduler or local):
        return None
    from gradelab.errors import RefusedError
    from gradelab.grading.cluster import ClusterTarget, parse_local, require_tls, tls_security

    if scheduler and local:
        raise RefusedError("--scheduler and --cluster exclude each other")
    if workers:
        raise RefusedError("--workers sizes the local pool; a cluster's size is its workers'")
    if scheduler and require_sandbox:
        raise RefusedError("with --scheduler, each worker checks its sandbox: start them with "
                           "`gradelab worker --require-sandbox`")
    if local:
        return ClusterTarget(local_workers=parse_local(local))
    return ClusterTarget(address=require_tls(scheduler),
                         security=tls_security(project, tls_ca_file, tls_cert, tls_key, role="client"))


@main.command()
@click.option("--scheduler", metavar="ADDRESS", required=True, help="The Dask scheduler (tls://host:port).")
@PROJECT_OPTION
@_tls_options("worker")
@click.option("--host", help="The address this worker listens on (default: Dask's choice).")
@click.option("--name", help="The worker's name on the cluster.")
@click.option("--require-sandbox", is_flag=True, help="Refuse to grade unless every isolation layer is available.")
def worker(scheduler: str, project: Path, tls_ca_file: Path | None, tls_cert: Path | None, tls_key: Path | None,
           host: str | None, name: str | None, require_sandbox: bool) -> None:
    """Serve the scheduler as one grading worker of the assignment in --project.

    It imports torch and collects the hidden tests once, grades the reference notebook (it must
    score full marks), and only then takes submissions, one at a time. Run it on a host students
    cannot reach; it holds the hidden tests and the reference solutions."""
    from gradelab.grading.cluster import require_tls, tls_security
    from gradelab.grading.worker import run_worker
    from gradelab.project import Project

    security = tls_security(project, tls_ca_file, tls_cert, tls_key, role="worker")
    run_worker(require_tls(scheduler), Project.load(project).root, security, host=host, name=name, require_sandbox=require_sandbox)


FROM_OPTION = click.option("--from", "results_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
                           required=True, help="A `gradelab grade --out` folder.")


@main.command()
@FROM_OPTION
@PROJECT_OPTION
def report(results_dir: Path, project: Path) -> None:
    """Write feedback pages, the instructor report and the manual-review sheets for a graded batch."""
    from gradelab.publish import write_reports

    paths = write_reports(results_dir, project)
    for label, path in paths.items():
        console.print(f"{label}: {path}")


@main.command("review")
@click.argument("sheets", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@FROM_OPTION
def review(sheets: tuple[Path, ...], results_dir: Path) -> None:
    """Import filled-in review sheets (review_<question>.csv) as manual scores.

    Manual scores are kept apart from automatic ones: a later regrade never overwrites them.
    """
    from gradelab.publish import import_review_sheets

    count = import_review_sheets(results_dir, sheets)
    console.print(f"imported {count} manual scores into {results_dir}")


@main.command()
@FROM_OPTION
@click.option("--to", "target", type=click.Choice(["canvas", "moodle", "blackboard", "gradescope", "csv"]),
              required=True, help="The gradebook format.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="File (or folder, for gradescope) to write.")
@click.option("--roster", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Canvas gradebook export, Moodle participants export or a plain CSV of students.")
@PROJECT_OPTION
def export(results_dir: Path, target: str, out: Path, roster: Path | None, project: Path) -> None:
    """Export grades (after late penalties, with manual scores) in a format the LMS imports as is."""
    from gradelab.publish import export_grades

    report_ = export_grades(results_dir, target, out, roster=roster, project=project)
    console.print(f"[green]{target}[/]: {report_.rows} rows → {', '.join(map(str, report_.files))}")
    for note in report_.notes:
        console.print(f"  note: {note}")
    for error in report_.errors:
        console.print(f"  [red]left out:[/] {error}")
    for sub in report_.unmatched_submissions:
        console.print(f"  [yellow]submission without a roster match:[/] {sub.student_id}")
    for entry in report_.missing_students:
        console.print(f"  [yellow]no submission:[/] {entry.name}")


@main.command()
@PROJECT_OPTION
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("out"),
              show_default=True, help="Folder for everything the demo writes.")
def demo(project: Path, out_dir: Path) -> None:
    """The main job on the bundled example batch: release → grade → export → report."""
    from gradelab.grading.batch import grade_batch
    from gradelab.publish import export_grades, write_reports
    from gradelab.release.build import release as do_release

    report_ = do_release(project)
    console.print(f"[green]1. released[/] {len(report_.files)} files in {report_.seconds:.1f} s "
                  f"(release/, solutions/, autograder/)")
    console.print("[green]2. grading[/] examples/submissions/")
    grade_batch(project / "examples" / "submissions", out_dir, project=project, force=True, console=console)
    roster = project / "examples" / "roster.csv"
    for target, name in (("canvas", "canvas_import.csv"), ("moodle", "moodle_import.csv"),
                         ("blackboard", "blackboard_import.csv"), ("csv", "grades.csv"), ("gradescope", "gradescope")):
        exported = export_grades(out_dir, target, out_dir / name, roster=roster, project=project)
        console.print(f"[green]3. exported[/] {target}: {', '.join(map(str, exported.files[:1]))}"
                      + (f" (+{len(exported.files) - 1} more)" if len(exported.files) > 1 else ""))
    for label, path in write_reports(out_dir, project).items():
        console.print(f"[green]4. {label}:[/] {path}")


@main.command()
@click.option("--project", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The assignment project inside the bundle (/autograder/source/gradelab).")
@click.option("--submission", type=click.Path(path_type=Path), required=True,
              help="Gradescope's submission folder (/autograder/submission), or one notebook.")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write results.json (/autograder/results/results.json).")
def gradescope(project: Path, submission: Path, results: Path) -> None:
    """Grade a Gradescope submission and write its results.json (the bundle's run_autograder calls this).

    Any failure to grade (no notebook, several, a broken file, the grader's own error) still
    writes a results.json: a score of 0 and a message that says why.
    """
    from gradelab.grading.gradescope import grade_for_gradescope, write_results

    document = grade_for_gradescope(project, submission)
    write_results(document, results)
    console.print(f"score {document['score']:g} → {results}" + (f"\n{document['output']}" if document["output"] else ""))


if __name__ == "__main__":
    main()
