"""Data that crosses a process boundary, shared by the untrusted and the trusted side."""
