"""Attacks against gradelab.sandbox.launch: each one must fail while ordinary torch + matplotlib work still runs.

Every sandboxed target writes one JSON observation to a socketpair kept open in the child. A test is
skipped only when probe_layers() says that every layer able to stop its attack is unavailable here.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import posix
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from gradelab.sandbox.launch import SandboxLimits, Sandbox, probe_layers  # noqa: E402

LAYERS = probe_layers()
SLOT = 1000 + os.getpid() % 1000  # a uid of our own, even if another test run shares the machine
CLONE_NEWUSER = 0x10000000
PTRACE_ATTACH, PTRACE_DETACH = 16, 17
WALL = 0x40000000  # waitpid flag __WALL: also wait for a process we trace but did not fork
SECRET = "GRADELAB_SECRET"
MINIMAL_ENV = {"PATH", "HOME", "MPLCONFIGDIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONDONTWRITEBYTECODE", "LANG"}


def needs_any(*layers: str) -> pytest.MarkDecorator:
    """Skip unless at least one of `layers` is available here."""
    missing = [f"{name}: {LAYERS[name]}" for name in layers if LAYERS[name] != "available"]
    return pytest.mark.skipif(len(missing) == len(layers), reason="; ".join(missing))


@pytest.fixture(scope="module", autouse=True)
def zygote() -> None:
    """Make this process a zygote as P does: one torch thread before any op, then warm up torch and Agg."""
    torch.set_num_threads(1)
    model = torch.nn.Linear(8, 2)
    model(torch.randn(4, 8)).sum().backward()
    figure = plt.figure()
    plt.plot([0, 1], [1, 0])
    figure.canvas.draw()
    plt.close(figure)


@dataclass
class Outcome:
    observation: dict | None  # None: the target died before reporting
    status: int
    oom_killed: bool
    layers: dict[str, str]


def benign_work() -> dict:
    """What a normal submission does: a forward/backward pass and a PNG in the private /tmp."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    loss = model(torch.randn(64, 16)).pow(2).mean()
    loss.backward()
    figure = plt.figure()
    plt.plot(range(10), [i * i for i in range(10)])
    figure.savefig("/tmp/plot.png")
    plt.close(figure)
    return {"loss": loss.item(), "grad_norm": model[0].weight.grad.norm().item(),
            "png_bytes": os.path.getsize("/tmp/plot.png")}


def run_attack(attack: Callable[[], object], *, limits: SandboxLimits = SandboxLimits(), hide: tuple[Path, ...] = (),
               timeout: float = 30) -> Outcome:
    ours, theirs = socket.socketpair()

    def target() -> int:
        observation: dict = {}
        try:
            observation["attack"] = attack()
        except BaseException as exc:
            observation["attack"] = f"raised {type(exc).__name__}: {exc}"
        observation["benign"] = benign_work()
        theirs.sendall(json.dumps(observation, default=repr).encode())
        return 0

    sandbox = Sandbox.spawn(target, limits=limits, slot=SLOT, keep_fds=[theirs.fileno()], hide=hide)
    theirs.close()
    try:
        ours.settimeout(timeout)
        data = b""
        while chunk := ours.recv(1 << 16):
            data += chunk
        status = sandbox.wait(timeout)
        assert status is not None, "sandbox did not exit"
        oom_killed = sandbox.oom_killed
    finally:
        sandbox.cleanup()
        ours.close()
    return Outcome(json.loads(data) if data else None, status, oom_killed, sandbox.layers)


def assert_benign_ran(outcome: Outcome) -> None:
    assert outcome.status == 0, outcome
    benign = outcome.observation["benign"]
    assert benign["loss"] == benign["loss"] and benign["grad_norm"] > 0  # finite loss, gradients flowed
    assert benign["png_bytes"] > 1000


def error_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno, str(exc.errno))


@pytest.fixture
def scratch() -> Path:
    """A world-readable, world-writable directory outside /tmp, so only the sandbox layers protect it."""
    directory = Path(tempfile.mkdtemp(prefix="gradelab-sandbox-test-", dir="/var/tmp"))
    directory.chmod(0o777)
    yield directory
    shutil.rmtree(directory)


def test_probe_reports_every_layer() -> None:
    assert set(LAYERS) == {"namespaces", "uid", "rlimits", "cgroup_memory", "cgroup_pids", "landlock", "seccomp",
                           "no_new_privs"}
    assert all(v == "available" or v.startswith("unavailable: ") for v in LAYERS.values())


@pytest.mark.skipif(any(v != "available" for v in LAYERS.values()), reason=f"not every layer available: {LAYERS}")
def test_require_succeeds_with_every_layer_active() -> None:
    ours, theirs = socket.socketpair()

    def target() -> int:
        theirs.sendall(json.dumps(benign_work()).encode())
        return 0

    sandbox = Sandbox.spawn(target, limits=SandboxLimits(), slot=SLOT, keep_fds=[theirs.fileno()], require=True)
    theirs.close()
    try:
        assert sandbox.layers == {key: "available" for key in LAYERS}
        assert sandbox.wait(30) == 0
        assert json.loads(ours.recv(1 << 16))["png_bytes"] > 1000
    finally:
        sandbox.cleanup()
        ours.close()



@pytest.mark.skipif(any(v != "available" for v in LAYERS.values()), reason=f"not every layer available: {LAYERS}")
def test_every_layer_applies_with_code_in_a_folder_only_root_enters(monkeypatch) -> None:
    """A read tree under a folder the sandbox uid may not enter (a checkout in root's 0700 home, or in
    `mktemp -d`) is opened for Landlock before the uid is dropped: the layer still applies."""
    private = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="gradelab-private-"))  # mode 0700, outside /tmp
    try:
        (private / "lib").mkdir()
        monkeypatch.syspath_prepend(str(private / "lib"))
        sandbox = Sandbox.spawn(lambda: 0, limits=SandboxLimits(), slot=SLOT, require=True)
        try:
            assert sandbox.layers == {key: "available" for key in LAYERS}
            assert sandbox.wait(30) == 0
        finally:
            sandbox.cleanup()
    finally:
        shutil.rmtree(private)

def test_benign_work_dataloader_and_threads() -> None:
    def attack() -> dict:
        torch.set_num_threads(2)
        data = TensorDataset(torch.arange(64, dtype=torch.float32).reshape(32, 2))
        total = sum(batch[0].sum().item() for batch in DataLoader(data, batch_size=4, num_workers=2))
        results = []
        worker = threading.Thread(target=lambda: results.append(torch.ones(100, 100).matmul(torch.ones(100)).sum()))
        worker.start()
        worker.join()
        return {"total": total, "thread": float(results[0])}

    outcome = run_attack(attack)
    assert outcome.observation["attack"] == {"total": float(sum(range(64))), "thread": 10000.0}
    assert_benign_ran(outcome)


def test_target_exception_exits_70() -> None:
    def target() -> int:
        raise ValueError("boom")

    sandbox = Sandbox.spawn(target, limits=SandboxLimits(), slot=SLOT)
    try:
        assert sandbox.wait(30) == 70
    finally:
        sandbox.cleanup()


@needs_any("namespaces", "seccomp")
def test_network_to_loopback_listener_fails() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    client = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'stolen')"

    def attack() -> dict:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).sendall(b"stolen")
            direct = "connected"
        except OSError as exc:
            direct = error_name(exc)
        child = subprocess.run(["python3", "-c", client], capture_output=True, timeout=20)
        return {"direct": direct, "subprocess_rc": child.returncode, "subprocess_stderr": child.stderr.decode()[-300:]}

    try:
        outcome = run_attack(attack)
        listener.settimeout(0.2)  # a connection that got through would already wait in the backlog
        try:
            connection, _ = listener.accept()
            with connection:
                leaked = f"a connection arrived and sent {len(connection.recv(1 << 16))} bytes"
        except TimeoutError:
            leaked = None
    finally:
        listener.close()
    attack_result = outcome.observation["attack"]
    assert attack_result["direct"] in ("EPERM", "ENETUNREACH", "ECONNREFUSED"), attack_result
    assert attack_result["subprocess_rc"] != 0, attack_result
    assert leaked is None
    assert_benign_ran(outcome)


@needs_any("namespaces", "landlock")
def test_hidden_directory_is_unreadable(scratch: Path) -> None:
    hidden = scratch / "hidden_tests"
    hidden.mkdir(mode=0o755)
    (hidden / "reference.py").write_text("ANSWER = 42\n")
    (hidden / "reference.py").chmod(0o644)

    def attack() -> dict:
        try:
            return {"read": open(hidden / "reference.py").read()}
        except OSError as exc:
            return {"read": error_name(exc)}

    outcome = run_attack(attack, hide=(hidden,))
    assert outcome.observation["attack"]["read"] in ("ENOENT", "EACCES"), outcome.observation
    assert_benign_ran(outcome)


@needs_any("landlock")
def test_unlisted_world_readable_file_is_unreadable(scratch: Path) -> None:
    secret = scratch / "world_readable.txt"
    secret.write_text("not for students\n")
    secret.chmod(0o644)

    def attack() -> dict:
        try:
            return {"read": secret.read_text()}
        except OSError as exc:
            return {"read": error_name(exc)}

    outcome = run_attack(attack)
    assert outcome.observation["attack"]["read"] == "EACCES", outcome.observation
    assert_benign_ran(outcome)


@needs_any("landlock")
def test_writes_outside_tmp_fail(scratch: Path) -> None:
    targets = [scratch / "results.json", Path(torch.__file__).parent / "gradelab_evil.py",
               Path(__file__).parent / "conftest_evil.py"]

    def attack() -> dict:
        results = {}
        for path in targets:
            try:
                with open(path, "w") as file:
                    file.write('{"score": 100}')
                results[str(path)] = "written"
            except OSError as exc:
                results[str(path)] = error_name(exc)
        return results

    try:
        outcome = run_attack(attack)
        # ENOENT: a checkout inside a private (0700) folder, as CI's, cannot even be looked up.
        assert set(outcome.observation["attack"].values()) <= {"EACCES", "EROFS", "EPERM", "ENOENT"}, \
            outcome.observation
        assert not any(path.exists() for path in targets)
    finally:  # should the sandbox fail, leave nothing behind in the venv or the checkout
        for path in targets:
            path.unlink(missing_ok=True)
    assert_benign_ran(outcome)


# Without root the sandbox has a user namespace of its own, in which RLIMIT_NPROC counts its processes alone.
@pytest.mark.skipif(LAYERS["cgroup_pids"] != "available" and LAYERS["uid"] != "available"
                    and not (os.geteuid() != 0 and LAYERS["namespaces"] == "available"),
                    reason="no pids cgroup, dedicated uid or user namespace")
def test_fork_bomb_is_stopped() -> None:
    def attack() -> dict:
        children = []
        error = None
        for _ in range(300):
            try:
                pid = os.fork()
            except OSError as exc:
                error = error_name(exc)
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children.append(pid)
        for pid in children:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        return {"forked": len(children), "error": error}

    outcome = run_attack(attack)
    assert outcome.observation["attack"]["error"] == "EAGAIN", outcome.observation
    assert outcome.observation["attack"]["forked"] < SandboxLimits().pids
    assert_benign_ran(outcome)


@needs_any("rlimits")
def test_huge_allocation_raises_memory_error() -> None:
    outcome = run_attack(lambda: len(bytearray(6 << 30)))
    assert outcome.observation["attack"].startswith("raised MemoryError"), outcome.observation
    assert_benign_ran(outcome)


@needs_any("cgroup_memory")
def test_growing_memory_is_oom_killed() -> None:
    def attack() -> int:
        hoard = []
        for _ in range(128):  # up to 4 GiB, far above the limit
            hoard.append(b"x" * (32 << 20))
        return len(hoard)

    outcome = run_attack(attack, limits=SandboxLimits(memory_mb=512))  # a sandbox still alive after 30 s fails it
    assert outcome.observation is None
    assert outcome.status == -9
    assert outcome.oom_killed


@needs_any("namespaces", "uid")
def test_parent_processes_are_out_of_reach() -> None:
    test_pid = os.getpid()

    def attack() -> dict:
        try:
            os.kill(test_pid, 0)  # signal 0: probes permission without harming pytest if it got through
            kill = "allowed"
        except OSError as exc:
            kill = error_name(exc)
        return {"kill": kill, "ppid": os.getppid(), "proc": sorted(int(n) for n in os.listdir("/proc") if n.isdigit())}

    outcome = run_attack(attack)
    observed = outcome.observation["attack"]
    assert observed["kill"] in ("ESRCH", "EPERM"), observed
    if LAYERS["namespaces"] == "available":
        assert observed["ppid"] == 0  # the parent lives outside the pid namespace
        assert observed["proc"] == [1]
    assert_benign_ran(outcome)


@needs_any("seccomp", "uid")
def test_ptrace_of_parent_fails() -> None:
    test_pid = os.getpid()

    def attack() -> dict:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.ptrace(PTRACE_ATTACH, test_pid, 0, 0)
        if result == 0:  # it worked: let pytest go (wait for its ptrace-stop, detach, continue), then report
            os.waitpid(test_pid, WALL)
            libc.ptrace(PTRACE_DETACH, test_pid, 0, 0)
            os.kill(test_pid, signal.SIGCONT)
        return {"result": result, "errno": errno.errorcode.get(ctypes.get_errno())}

    outcome = run_attack(attack)
    assert outcome.observation["attack"]["result"] == -1, outcome.observation
    assert_benign_ran(outcome)


def test_environment_is_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET, "hunter2")

    def attack() -> dict:
        try:
            raw = open("/proc/self/environ", "rb").read().decode(errors="replace")
        except OSError as exc:
            raw = error_name(exc)
        return {"environ": dict(os.environ), "posix": [k.decode() for k in posix.environ], "raw": raw}

    outcome = run_attack(attack)
    observed = outcome.observation["attack"]
    assert set(observed["environ"]) == MINIMAL_ENV
    assert SECRET not in observed["posix"]
    assert "hunter2" not in observed["raw"]
    assert_benign_ran(outcome)


@needs_any("rlimits")
def test_big_file_write_fails() -> None:
    def attack() -> dict:
        written = 0
        try:
            with open("/tmp/big", "wb") as file:
                for _ in range(100):
                    written += file.write(b"\0" * (1 << 20))
                    file.flush()
        except OSError as exc:
            return {"written": written, "error": error_name(exc)}
        return {"written": written, "error": None}

    outcome = run_attack(attack)
    observed = outcome.observation["attack"]
    assert observed["error"] in ("EFBIG", "ENOSPC"), observed
    assert observed["written"] <= 64 << 20
    assert_benign_ran(outcome)


@needs_any("rlimits")
def test_open_files_stop_at_the_limit() -> None:
    def attack() -> dict:
        files = []
        try:
            for _ in range(10_000):
                files.append(open("/dev/null"))
        except OSError as exc:
            return {"opened": len(files), "error": error_name(exc)}
        finally:
            for file in files:
                file.close()
        return {"opened": len(files), "error": None}

    outcome = run_attack(attack)
    observed = outcome.observation["attack"]
    assert observed["error"] == "EMFILE", observed
    assert observed["opened"] < SandboxLimits().open_files
    assert_benign_ran(outcome)


@needs_any("seccomp")
def test_new_user_namespace_is_refused() -> None:
    def attack() -> dict:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.unshare(CLONE_NEWUSER)
        return {"result": result, "errno": errno.errorcode.get(ctypes.get_errno())}

    outcome = run_attack(attack)
    assert outcome.observation["attack"] == {"result": -1, "errno": "EPERM"}
    assert_benign_ran(outcome)


def v1_cgroup_dirs(pid: int) -> list[Path]:
    """The cgroup v1 memory/pids directories that `pid` belongs to (empty if not on cgroup v1)."""
    found = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in ("memory", "pids"):
            if controller in controllers.split(",") and Path("/sys/fs/cgroup", controller).is_dir():
                found.append(Path(f"/sys/fs/cgroup/{controller}{path}"))
    return found


def test_infinite_loop_is_killed_and_cgroups_removed() -> None:
    def target() -> int:
        while True:
            pass

    sandbox = Sandbox.spawn(target, limits=SandboxLimits(), slot=SLOT)
    try:
        dirs = [d for d in v1_cgroup_dirs(sandbox.pid) if d.name.startswith("gradelab-")]
        assert sandbox.wait(timeout=1) is None
        sandbox.kill()
        assert sandbox.wait(timeout=0) == -9
    finally:
        sandbox.cleanup()
    sandbox.cleanup()  # idempotent
    expected = sum(LAYERS[key] == "available" for key in ("cgroup_memory", "cgroup_pids"))
    if any(Path("/sys/fs/cgroup", c).is_dir() for c in ("memory", "pids")):
        assert len(dirs) == expected
    assert not any(d.exists() for d in dirs)
