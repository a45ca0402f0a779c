"""Data that crosses a process boundary, shared by the untrusted sandbox S and the trusted
processes (worker W, test-runner zygote Z and runner T, batch parent, instructor's CLI).

Imports nothing of gradelab but itself and gradelab.errors, so either side may import it.
- wire.py: the data-only codec (S encodes, T decodes; never pickle).
- modelspec.py: models as plain data (S describes a student's model, T rebuilds it).
- figures.py: captured figures (records, size limits, the PNG rendering both sides use).
- records.py: result records, from T to the worker, the gradebook, exports and reports.
"""
