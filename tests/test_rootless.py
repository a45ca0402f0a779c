"""The sandbox and `gradelab grade` run by an unprivileged user: the sandbox then starts in a user
namespace and keeps its layers from inside it. Run as root, these tests create throwaway users
(one with a subordinate uid range, one without) and run, as each, the sandbox's attack tests
(tests/test_sandbox.py) and, as the first, `gradelab grade` on the hostile fork-bomb and
memory-bomb examples, from a copy of the checkout they can read: once plainly, once started in
cgroup v1 memory and pids cgroups delegated (chowned) to the user.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("gradelab", "tests", "source", "release", "solutions", "autograder", "grading_config.yml")
BOMBS = ("hostile_fork_bomb", "hostile_memory_bomb")
PROBE = """
import json, os, socket
from gradelab.sandbox.launch import Sandbox, SandboxLimits, probe_layers
ours, theirs = socket.socketpair()
def target():
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    theirs.sendall(json.dumps({"uid": os.getuid(), "pid": os.getpid(), "caps": status["CapEff"].strip()}).encode())
    return 0
box = Sandbox.spawn(target, limits=SandboxLimits(), slot=0, keep_fds=[theirs.fileno()])
theirs.close()
inside = json.loads(ours.recv(4096))
print(json.dumps({"probe": probe_layers(), "layers": box.layers, "inside": inside, "status": box.wait(30)}))
box.cleanup()
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="creating an unprivileged user needs root"),
    pytest.mark.skipif(shutil.which("useradd") is None or shutil.which("runuser") is None,
                       reason="useradd and runuser are needed"),
]


@pytest.fixture(scope="module")
def checkout() -> Path:
    """What grading needs, copied to a world-readable folder outside /tmp (the sandbox's /tmp is
    its own), with a home and an output folder for the users."""
    directory = Path(tempfile.mkdtemp(prefix="gradelab-rootless-", dir="/var/tmp"))
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, directory / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, directory / name)
    (directory / "submissions").mkdir()
    for name in BOMBS:
        shutil.copy2(ROOT / "examples" / "submissions" / f"{name}.ipynb", directory / "submissions")
    subprocess.run(["chmod", "-R", "a+rX", str(directory)], check=True)
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


def make_user(name: str, subordinate_ids: bool) -> None:
    subprocess.run(["userdel", name], capture_output=True)  # left over from an interrupted run
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    present = any(line.startswith(f"{name}:") for line in _read("/etc/subuid").splitlines())
    if subordinate_ids and not present:
        subprocess.run(["usermod", "--add-subuids", "300000-365535", "--add-subgids", "300000-365535", name],
                       check=True)
    elif not subordinate_ids and present:
        for kind in ("uid", "gid"):
            start, count = next(line.split(":")[1:] for line in _read(f"/etc/sub{kind}").splitlines()
                                if line.startswith(f"{name}:"))
            subprocess.run(["usermod", f"--del-sub{kind}s", f"{start}-{int(start) + int(count) - 1}", name],
                           check=True)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return ""


@pytest.fixture(scope="module", params=["subordinate_ids", "own_uid_only"])
def user(request, checkout: Path) -> dict:
    with_range = request.param == "subordinate_ids"
    if with_range and shutil.which("newuidmap") is None:
        pytest.skip("newuidmap is not installed (Debian: apt-get install uidmap)")
    name = f"glr{'s' if with_range else 'o'}{os.getpid() % 100000}"
    make_user(name, with_range)
    home = checkout / f"home-{name}"
    home.mkdir()
    shutil.chown(home, name)
    uid = pwd.getpwnam(name).pw_uid
    try:
        if run_as(name, home, checkout, ["unshare", "-Ur", "true"]).returncode != 0:
            pytest.skip("unprivileged user namespaces are not allowed here")
        yield {"name": name, "home": home, "subordinate_ids": with_range}
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        shutil.rmtree(f"/var/tmp/gradelab-{uid}", ignore_errors=True)  # the user's slot locks


def run_as(name: str, home: Path, cwd: Path, command: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    environment = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": str(cwd),
                   "LANG": "C.UTF-8"}
    return subprocess.run(["runuser", "-u", name, "--", "env", "-i", *(f"{k}={v}" for k, v in environment.items()),
                           *command], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_the_sandbox_keeps_its_layers_without_root(user: dict, checkout: Path) -> None:
    done = run_as(user["name"], user["home"], checkout, [sys.executable, "-c", PROBE])
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    for key in ("namespaces", "rlimits", "landlock", "seccomp", "no_new_privs"):
        assert seen["probe"][key] == seen["layers"][key] == "available", seen
    for key in ("cgroup_memory", "cgroup_pids"):  # root's cgroups, which this user cannot write
        assert seen["layers"][key] == seen["probe"][key] and seen["layers"][key].startswith("unavailable: "), seen
    assert seen["inside"]["pid"] == 1 and seen["inside"]["caps"] == "0000000000000000" and seen["status"] == 0
    if user["subordinate_ids"]:
        assert seen["layers"]["uid"] == "available"
        assert seen["inside"]["uid"] >= 61000  # a uid of the slot's own, mapped to a subordinate one
    else:
        assert seen["layers"]["uid"].startswith("unavailable: ") and "no range in /etc/subuid" in seen["layers"]["uid"]
        assert seen["inside"]["uid"] == 0  # the user's own uid, as root of its namespace without capabilities


def test_the_attacks_fail_and_sandboxes_die_with_their_worker_without_root(user: dict, checkout: Path) -> None:
    done = run_as(user["name"], user["home"], checkout,
                  [sys.executable, "-m", "pytest", "tests/test_sandbox.py", "tests/test_sandbox_lifecycle.py", "-q",
                   "-p", "no:cacheprovider", "-rs"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary, done.stdout[-3000:]
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    # Only what needs every layer, root's cgroups or (without a range) subordinate uids may be skipped:
    # without a pids cgroup, the fork bomb is stopped by RLIMIT_NPROC in the user namespace.
    allowed = ["cgroup_memory", "not every layer"] + ([] if user["subordinate_ids"] else ["no dedicated uid",
                                                                                          "subordinate ids"])
    assert all(any(reason in line for reason in allowed) for line in skipped), skipped


def grade(command_prefix: list[str], checkout: Path, out: Path, cgroups: Sequence[Path] = ()) -> dict:
    """Grade the bombs into `out` (the command started in `cgroups`, as root writes it there)."""
    def join_cgroups() -> None:
        for directory in cgroups:
            (directory / "cgroup.procs").write_text(str(os.getpid()))

    done = subprocess.run([*command_prefix, "grade", "submissions", "--out", str(out), "--project", ".",
                           "--workers", "1"], cwd=checkout, capture_output=True, text=True, timeout=600,
                          preexec_fn=join_cgroups if cgroups else None)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    return {name: json.loads((out / name / "submission.json").read_text()) for name in BOMBS}


CLI = [sys.executable, "-c", "import sys; from gradelab.cli import main; sys.argv[0] = 'gradelab'; sys.exit(main())"]


def as_user(user: dict, checkout: Path) -> list[str]:
    """The command prefix that runs CLI as `user`, in a clean environment, on `checkout`."""
    return ["runuser", "-u", user["name"], "--", "env", "-i", f"HOME={user['home']}", f"PYTHONPATH={checkout}",
            "PATH=/usr/bin:/bin", "LANG=C.UTF-8", *CLI]


def output_folder(user: dict, checkout: Path, name: str) -> Path:
    out = checkout / f"{name}-{user['name']}"
    out.mkdir()
    shutil.chown(out, user["name"])
    return out


def test_grading_without_root_contains_the_bombs_and_grades_as_root_does(user: dict, checkout: Path) -> None:
    if not user["subordinate_ids"]:
        pytest.skip("graded once, by the user with a subordinate uid range")
    rootless = grade(as_user(user, checkout), checkout, output_folder(user, checkout, "out"))
    as_root = grade(["env", f"PYTHONPATH={checkout}", *CLI], checkout, checkout / "out-root")
    for name in BOMBS:
        result = rootless[name]
        assert result["status"] == "graded", result["messages"]
        layers = result["sandbox_layers"]
        assert all(layers[key] == "available" for key in ("namespaces", "uid", "rlimits", "landlock", "seccomp",
                                                          "no_new_privs")), layers
        assert layers["cgroup_memory"].startswith("unavailable: ") and layers["cgroup_pids"].startswith("unavailable: ")
        assert {q["id"]: q["score"] for q in result["questions"]} == \
            {q["id"]: q["score"] for q in as_root[name]["questions"]}, name
    # The memory bomb's cell ends (RLIMIT_AS, or the cell's time limit) and scores nothing; the rest grades.
    memory_bomb = {q["id"]: q["score"] for q in rootless["hostile_memory_bomb"]["questions"]}
    assert memory_bomb["q3_2"] == 0 and memory_bomb["q3_1"] > 0


@pytest.fixture
def delegated_cgroups(user: dict) -> dict[str, Path]:
    """A memory and a pids cgroup v1 under this process's own, delegated to the user as an administrator
    does (the directories and their files chowned to it); removed afterwards, with anything left in them."""
    from gradelab.sandbox import cgroups

    if not user["subordinate_ids"]:
        pytest.skip("graded once, by the user with a subordinate uid range")
    made: dict[str, Path] = {}
    try:
        for controller in ("memory", "pids"):
            # Only on cgroup v1: on v2, asking for our own cgroup could take over the test's cgroup.
            mounted = Path(f"/sys/fs/cgroup/{controller}/tasks").exists()
            parent, reason = cgroups._own_cgroup_dir(controller) if mounted else (None, "not mounted at /sys/fs/cgroup")
            if parent is None or cgroups.is_v2(parent):
                pytest.skip(f"no cgroup v1 {controller} hierarchy here: {reason or 'cgroup v2'}")
            made[controller] = parent / f"gradelab-delegated-{os.getpid()}"
            made[controller].mkdir()
            for path in [made[controller], *made[controller].iterdir()]:
                shutil.chown(path, user["name"])
        yield made
    finally:
        for directory in made.values():
            for child in [d for d in directory.iterdir() if d.is_dir()]:
                cgroups.remove(child)
            cgroups.remove(directory)


def test_a_cgroup_delegated_to_the_user_bounds_the_bombs_without_root(user: dict, checkout: Path,
                                                                      delegated_cgroups: dict[str, Path]) -> None:
    """Started in cgroup v1 subtrees the user owns, the rootless grader gives each sandbox memory and
    pids cgroups of its own there: the memory bomb is killed by its memory cgroup (an OOM kill it
    counts), not stopped by RLIMIT_AS, and no sandbox cgroup outlives the grading."""
    graded = grade(as_user(user, checkout), checkout, output_folder(user, checkout, "out-delegated"),
                   cgroups=list(delegated_cgroups.values()))
    for name in BOMBS:
        assert graded[name]["status"] == "graded", graded[name]["messages"]
        assert all(state == "available" for state in graded[name]["sandbox_layers"].values()), graded[name]
    assert any("out of memory, limit" in m for m in graded["hostile_memory_bomb"]["messages"]), \
        graded["hostile_memory_bomb"]["messages"]
    memory_bomb = {q["id"]: q["score"] for q in graded["hostile_memory_bomb"]["questions"]}
    assert memory_bomb["q3_2"] == 0 and memory_bomb["q3_1"] > 0
    assert [d.name for directory in delegated_cgroups.values() for d in directory.iterdir() if d.is_dir()] == []
