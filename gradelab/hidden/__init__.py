"""The trusted test side: the hidden-test API, its pytest plugin and the test runner.

This package runs in the test-runner zygote Z and the runners T it forks: trusted processes,
never the sandbox. It never imports gradelab.sandbox. Hidden tests are plain pytest files that
reach the student's work only through the `student` fixture (proxy.StudentProxy), whose replies
are plain, validated data; nothing the student wrote runs here.

    from gradelab.hidden import assert_tensor_close

    @pytest.mark.question("q1_2", weight=2)
    def test_sigmoid_values(student, rng):
        x = torch.randn(50, generator=rng, dtype=torch.float64)
        got = student.call("my_sigmoid", x)
        assert_tensor_close(got, torch.sigmoid(x), "my_sigmoid(x)")

Below, the API for hidden-test authors. The modules: proxy (the `student` fixture's proxy and
the StudentProblem family), assertions, distributions, plotcheck, training, sourcecheck (checks
of the code as submitted), plugin (fixtures, hooks, verdicts) and runner (the zygote and its runners).
"""

from gradelab.boundary.modelspec import activations_between, layer, linear_shapes
from gradelab.hidden.assertions import assert_tensor_close, expect_number, expect_tensor, seed_torch
from gradelab.hidden.distributions import Normal, Uniform, assert_distribution
from gradelab.hidden.plotcheck import check_gradient_plot, check_line_plot, compare_images, figures_in_cell
from gradelab.hidden.proxy import StudentProblem, StudentProxy, describe_standard
from gradelab.hidden.training import train_logits_batched

__all__ = [
    "Normal", "StudentProblem", "StudentProxy", "Uniform", "activations_between", "assert_distribution",
    "assert_tensor_close", "check_gradient_plot", "check_line_plot", "compare_images", "describe_standard",
    "expect_number", "expect_tensor", "figures_in_cell", "layer", "linear_shapes", "seed_torch",
    "train_logits_batched",
]
