"""gradelab: release, grade, report and export an auto-graded PyTorch assignment.

Which process runs what (README, "Layout"; tests/test_layout.py checks the import rules):

    instructor's CLI  release/ (release time), publish/ (after grading)
      `gradelab grade`  batch parent B: grading.batch, collect, gradebook (no torch)
        └─ grading worker W, one per core, warm: grading.supervisor, session, scoring
             ├─ fork → sandbox S (untrusted): sandbox.* runs the student's notebook
             └─ fork, once → test-runner zygote Z: hidden.* collects the hidden tests
                  └─ fork → test runner T per submission: hidden.* talks to S over RPC

boundary.* (codec, model specs, figure and result records) is what crosses between them, and the
only gradelab code besides errors that both sides import. project.py names every path.
"""
