"""The untrusted side: the sandbox process S that runs a student's notebook, and its launcher.

Which process runs each module:

- launch: the grading worker (the parent side). It leases a host-wide slot (slots: the sandbox's
  uid, locked against other gradelab processes), creates the cgroups (cgroups; delegation first
  takes over a delegated cgroup v2 subtree), forks the sandbox, reads its layer report, waits for,
  kills and cleans up after it.
- layers, confinement: the forked children. The intermediate process C joins the cgroups and
  unshares the namespaces (a user namespace first, without root); the sandbox process S (pid 1 of
  its pid namespace) mounts its private views, sets rlimits, drops to its uid and enters Landlock
  and seccomp (confinement) before it runs the target.
- executor, running, rpc, capture: the sandbox S, once its layers are in place. executor runs the
  notebook's cells (running: seeding, capped output, error descriptions) and captures figures
  (capture); rpc then answers the trusted test runner's requests.

These modules import only gradelab.sandbox.*, gradelab.boundary.* and gradelab.errors; the worker
imports them all before it forks, so S never reads gradelab's files.
"""
