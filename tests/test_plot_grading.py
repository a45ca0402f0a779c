"""Gradient plots graded by content, on real submissions run through the engine.

Each case is the reference notebook with only the q2_2 plot cell rewritten, so the other
questions keep full marks and the q2_2 verdicts show what the plot checks decide.
"""

from __future__ import annotations

import nbformat
import pytest

from gradelab.grading.supervisor import Grader
from gradelab.project import Project

pytestmark = pytest.mark.slow

CASES = {
    "plot_grad helper": ("model_sig = build_model(activation=nn.Sigmoid())\nfig_sig = plot_grad(model_sig)", True, None),
    "plain matplotlib, other colours": ("""
from vanishing_helpers import gradient_data
model_sig = build_model(activation=nn.Sigmoid())
grads = gradient_data(model_sig)
fig_sig, ax = plt.subplots(figsize=(5, 3))
parts = ax.violinplot(list(grads.values()), positions=[1, 2, 3, 4], showmedians=True)
for body in parts["bodies"]:
    body.set_facecolor("darkorange")
ax.set_xlabel("layer"); ax.set_ylabel("weight gradient")
""", True, None),
    "wrong model": ("""
model_sig = build_model(activation=nn.Sigmoid())
fig_sig = plot_grad(build_model(activation=nn.ReLU()))
""", False, "gradients"),
    "empty figure": ("model_sig = build_model(activation=nn.Sigmoid())\nfig_sig, ax = plt.subplots()", False, "violin"),
    "pasted image": ("""
import io
model_sig = build_model(activation=nn.Sigmoid())
buffer = io.BytesIO()
plot_grad(build_model(activation=nn.Sigmoid())).savefig(buffer, format="png")
plt.close("all")
buffer.seek(0)
fig_sig, ax = plt.subplots()
ax.imshow(plt.imread(buffer)); ax.axis("off")
""", False, "image"),
    "never produced": ("model_sig = build_model(activation=nn.Sigmoid())", False, "no figure"),
    "axes not labelled": ("""
from vanishing_helpers import gradient_data
model_sig = build_model(activation=nn.Sigmoid())
fig_sig, ax = plt.subplots()
ax.violinplot(list(gradient_data(model_sig).values()))
""", False, "label"),
}


@pytest.fixture(scope="module")
def graded(root, tmp_path_factory):
    source = nbformat.read(root / "source/vanishing_gradients/vanishing_gradients.ipynb", as_version=4)
    folder = tmp_path_factory.mktemp("plots")
    results = {}
    with Grader(Project.load(root)) as grader:
        for name, (code, _, _) in CASES.items():
            nb = nbformat.from_dict(source)
            for cell in nb.cells:
                if cell.metadata.get("nbgrader", {}).get("grade_id") == "q2_2_plot":
                    cell.source = code.strip()
            path = folder / f"{name.replace(' ', '_').replace(',', '')}.ipynb"
            nbformat.write(nb, path)
            results[name] = grader.grade(path, path.stem, out_dir=folder / "out")
    return results


@pytest.mark.parametrize("case", CASES)
def test_plot_verdict(graded, case):
    _, should_pass, message = CASES[case]
    result = graded[case]
    q2_2 = next(q for q in result.questions if q.id == "q2_2")
    content = [t for t in result.tests if t.question == "q2_2" and "gradient plot" in t.name]
    assert len(content) == 1
    if should_pass:
        assert q2_2.score == pytest.approx(2.0), [(t.name, t.output) for t in result.tests if t.question == "q2_2"]
    else:
        assert content[0].status == "failed"
        assert message in content[0].output.lower(), content[0].output
    others = [q for q in result.questions if q.id not in ("q2_2",) and q.kind != "manual"]
    assert all(q.score == pytest.approx(q.max_score - {"q2_4": 1, "q2_6": 1, "q2_8": 2, "q3_2": 1}.get(q.id, 0))
               for q in others), [(q.id, q.score) for q in others]
