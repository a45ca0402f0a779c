"""Reference renders kept across a worker's submissions (gradelab.hidden.renders): exact
memoisation by content, carried runner -> supervisor -> zygote as validated records."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradelab.boundary import messages
from gradelab.boundary.messages import MAX_RENDERS, Done, RunnerJob
from gradelab.grading.supervisor import Grader
from gradelab.hidden.renders import RenderCache, content_key
from gradelab.project import Project

KEY = "ab" * 32


def test_equal_inputs_have_one_key_and_any_difference_another() -> None:
    weights = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    layers = [{"type": "Linear", "in": 3, "out": 2}]
    key = content_key("plot_grad", 80, layers, [weights])
    assert key == content_key("plot_grad", 80, [dict(layers[0])], [weights.clone()])
    different = [
        content_key("plot_grad", 72, layers, [weights]),  # resolution
        content_key("plot_grad", 80, [{"type": "Linear", "in": 3, "out": 3}], [weights]),  # architecture
        content_key("plot_grad", 80, layers, [weights.to(torch.float64)]),  # dtype, same values
        content_key("plot_grad", 80, layers, [weights.reshape(3, 2)]),  # shape, same bytes
        content_key("plot_grad", 80, layers, [weights + torch.tensor(1e-7)]),  # one ulp-sized change
        content_key("plot_grad", 80, layers, [weights.numpy()]),  # an array is not a tensor
        content_key("plot_grad", 80, layers, [torch.where(weights == 0, -0.0, weights)]),  # -0.0 draws alike but is other data
    ]
    assert len({key, *different}) == len(different) + 1
    with pytest.raises(TypeError):
        content_key(object())  # hashed by repr, two different objects could collide: refused


def test_a_render_is_made_once_then_served_and_the_oldest_is_forgotten() -> None:
    cache, calls = RenderCache(limit=3), []

    def make(n: int):
        return lambda: calls.append(n) or b"png%d" % n

    assert cache.get_or_make("k1", make(1)) == b"png1"
    assert cache.get_or_make("k1", make(99)) == b"png1"  # served, not drawn again
    for n in (2, 3):
        cache.get_or_make(f"k{n}", make(n))
    cache.get_or_make("k1", make(99))  # used: k2 is now the oldest
    cache.get_or_make("k4", make(4))
    assert calls == [1, 2, 3, 4] and len(cache) == 3
    assert cache.get_or_make("k2", make(22)) == b"png22"  # forgotten, drawn again
    assert set(cache.made) == {"k1", "k2", "k3", "k4"}  # what this runner drew, for the supervisor

    inherited = RenderCache()
    inherited.add({"k1": b"png1"})
    assert inherited.get_or_make("k1", make(99)) == b"png1" and not inherited.made


@pytest.mark.parametrize("renders, problem", [
    ({"not-a-sha256": b"png"}, "pattern"),
    ({KEY.upper(): b"png"}, "pattern"),
    ({KEY: "png"}, "bytes"),
    ({f"{n:064x}": b"png" for n in range(MAX_RENDERS + 1)}, "at most"),
    ({KEY: b"x" * (messages.MAX_RENDER_BYTES + 1)}, "at most"),
])
def test_renders_that_are_not_what_a_runner_makes_are_refused(renders, problem) -> None:
    done = {"op": "done", "student_seconds": 0.0, "call_timeouts": 0, "renders": renders}
    with pytest.raises(messages.MalformedMessage, match=problem):
        messages.validate(done, messages.RUNNER_EVENT)
    job = {"seed": 1, "cells": [], "figures": [], "call_timeout": 1.0, "renders": renders}
    with pytest.raises(messages.MalformedMessage, match=problem):
        messages.validate(job, RunnerJob)
    assert messages.validate({**done, "renders": {KEY: b"png"}}, messages.RUNNER_EVENT) == Done(
        op="done", student_seconds=0.0, call_timeouts=0, renders={KEY: b"png"})


@pytest.mark.slow
def test_the_next_submission_gets_the_references_drawn_for_the_last(root, tmp_path) -> None:
    """Through the real processes: the first runner draws the six gradient plots' references and
    hands them on; the next runner of the same notebook draws none, with the same verdicts and
    the same reference images; a figure of another model still fails against its own model's."""
    reference = root / "source/vanishing_gradients/vanishing_gradients.ipynb"
    with Grader(Project.load(root)) as grader:
        first = grader.grade(reference, "first", out_dir=tmp_path / "first")
        drawn = dict(grader.runners.pending_renders)
        assert len(drawn) == 6  # one per gradient plot; both tests of a plot share it
        second = grader.grade(reference, "second", out_dir=tmp_path / "second")
        assert grader.runners.pending_renders == {}  # every reference came from the zygote

        wrong = grader.grade(root / "examples/submissions/wrong_linear_xor_plot_of_wrong_model.ipynb", "wrong",
                             out_dir=tmp_path / "wrong")

    def verdicts(result):
        return [(t.name, t.status, t.score) for t in result.tests]

    assert verdicts(first) == verdicts(second) and first.score == second.score
    assert {t.status for t in first.tests} == {"passed"}
    references = sorted((tmp_path / "first").rglob("*_reference.png"))
    assert len(references) == 6 and {p.read_bytes() for p in references} == set(drawn.values())
    again = {p.name: p.read_bytes() for p in (tmp_path / "second").rglob("*_reference.png")}
    assert again == {p.name: p.read_bytes() for p in references}
    plots = {t.name: t.status for t in wrong.tests if "fig_tanh" in t.name or "tanh model's gradient plot" in t.name}
    assert plots and set(plots.values()) == {"failed"}, plots
    assert np.isclose(next(q.score for q in wrong.questions if q.id == "q2_4"), 0)
