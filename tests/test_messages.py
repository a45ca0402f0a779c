"""The typed messages between gradelab's processes (gradelab.boundary.messages), the codec's bounds
under them, and what the trusted side keeps of what a sandbox sends."""

from __future__ import annotations

import json
import math
import socket
import struct
import tracemalloc

import numpy as np
import pytest
import torch

from gradelab.boundary import messages, wire
from gradelab.boundary.figures import FigureData
from gradelab.boundary.messages import (MAX_FIGURES, SANDBOX_EVENT, CellEnd, CellOutcome, FigureError,
                                        MalformedMessage, Ready, RpcReply, validate)
from gradelab.grading.execution import MAX_KEPT_OUTPUT, Execution, weakest


def _png(width: int = 4, height: int = 3) -> bytes:
    return wire_png_header(width, height) + b"\0" * 16


def wire_png_header(width: int, height: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", width, height)


def _capture(cell: int = 3, index: int = 0, **changes) -> dict:
    capture = {"cell": cell, "index": index, "helper": None, "size_inches": [4.0, 3.0], "dpi": 80.0,
               "suptitle": "", "figure_images": 0, "png": _png(), "axes": [], "gradient_data": None, "names": []}
    return {**capture, **changes}


def _cell_end(**cell) -> dict:
    return {"event": "cell_end", "cell": {"index": 2, "status": "ok", "output": "", "seconds": 0.5,
                                          "render_seconds": 0.0, "error": None, **cell}}


@pytest.mark.parametrize("cell, problem", [
    ({"seconds": math.nan}, "seconds"),
    ({"seconds": math.inf}, "seconds"),
    ({"seconds": -1.0}, "seconds"),
    ({"index": "2"}, "index"),
    ({"index": -1}, "index"),
    ({"index": 10 ** 9}, "index"),
    ({"error": "boom"}, "error"),
    ({"error": {"type": "E", "message": "m" * 100_000}}, "error.message"),
    ({"status": "passed"}, "status"),
    ({"output": "x" * (messages.MAX_OUTPUT_CHARS + 1000)}, "output"),
    ({"score": 100}, "score"),
])
def test_a_forged_cell_report_is_malformed(cell: dict, problem: str) -> None:
    with pytest.raises(MalformedMessage, match=problem):
        validate(_cell_end(**cell), SANDBOX_EVENT)


def test_an_honest_cell_report_validates() -> None:
    event = validate(_cell_end(status="error", error={"type": "ValueError", "message": "bad", "traceback": "t"}),
                     SANDBOX_EVENT)
    assert isinstance(event, CellEnd) and event.cell.error.type == "ValueError" and event.cell.seconds == 0.5


@pytest.mark.parametrize("message", [None, [], "cell_end", {"event": "cell_end"}, {"event": "shutdown"},
                                     {"event": "ready", "figures": "all"}])
def test_anything_else_on_the_control_socket_is_malformed(message) -> None:
    with pytest.raises(MalformedMessage):
        validate(message, SANDBOX_EVENT)


def test_an_unreadable_figure_costs_that_figure_only() -> None:
    ready = validate({"event": "ready", "figures": [_capture(), _capture(index=1, dpi=-1.0),
                                                    {"cell": 4, "index": 0, "error": "cannot draw", "names": ["f"]}]},
                     SANDBOX_EVENT)
    good, bad, undrawable = ready.figures
    assert isinstance(good, FigureData) and good.cell == 3
    assert isinstance(bad, FigureError) and bad.index == 1 and "dpi" in bad.error
    assert isinstance(undrawable, FigureError) and undrawable.names == ["f"]


@pytest.mark.parametrize("figures", [
    [{"cell": "one", "index": 0, "error": "forged"}],  # no cell to charge the figure to
    [_capture(cell="one")],
    [_capture(index=k) for k in range(MAX_FIGURES + 1)],
])
def test_figures_past_the_limits_are_malformed(figures: list) -> None:
    with pytest.raises(MalformedMessage):
        validate({"event": "ready", "figures": figures}, SANDBOX_EVENT)


def test_figures_bytes_are_bounded_in_total() -> None:
    big = _png() + b"\0" * (messages.MAX_FIGURE_BYTES // 10)
    with pytest.raises(MalformedMessage, match="bytes of images"):
        validate({"event": "ready", "figures": [_capture(index=k, png=big) for k in range(11)]}, Ready)


def test_the_sandboxes_own_figure_limits_keep_an_honest_ready_message_valid() -> None:
    from gradelab.sandbox.executor import _sendable

    many = [_capture(index=k, png=_png() + bytes(1 << 20)) for k in range(MAX_FIGURES + 20)]
    kept = _sendable(many)
    ready = validate({"event": "ready", "figures": kept}, SANDBOX_EVENT)
    assert len(ready.figures) == MAX_FIGURES
    assert any(isinstance(f, FigureError) and "not kept" in f.error for f in ready.figures)
    assert len(wire.encode({"event": "ready", "figures": kept})) <= messages.MAX_READY_BYTES


@pytest.mark.parametrize("reply", [
    {"ok": True, "value": 1.0, "seconds": -5.0},
    {"ok": "yes"},
    {"ok": True, "error": {"type": "E", "message": "m"}},
    {"ok": False},
    {"ok": False, "error": "boom"},
    {"ok": True, "seconds": math.nan},
])
def test_a_forged_rpc_reply_is_malformed(reply: dict) -> None:
    with pytest.raises(MalformedMessage):
        validate(reply, messages.RPC_REPLY)


def test_records_round_trip_through_the_wire() -> None:
    reply = RpcReply(ok=True, value={"a": (1, 2), "t": torch.arange(3), "n": np.ones(2)}, seconds=0.25)
    back = validate(wire.decode(wire.encode(reply.to_wire())), messages.RPC_REPLY)
    assert back.value["a"] == (1, 2) and torch.equal(back.value["t"], torch.arange(3)) and back.seconds == 0.25
    request = messages.ModuleDrawsRequest(op="module_draws", seed=7, name="build_model", args=[torch.ones(1)],
                                          seeds=[1, 2])
    again = validate(wire.decode(wire.encode(request.to_wire())), messages.RPC_REQUEST)
    assert isinstance(again, messages.ModuleDrawsRequest) and again.seeds == [1, 2]


def test_requests_are_bounded() -> None:
    with pytest.raises(MalformedMessage, match="seeds"):
        validate({"op": "module_draws", "seed": 1, "name": "f", "seeds": list(range(messages.MAX_SEEDS + 1))},
                 messages.RPC_REQUEST)
    with pytest.raises(MalformedMessage):
        validate({"op": "exec", "seed": 1}, messages.RPC_REQUEST)


def test_a_frame_larger_than_the_limit_is_refused_before_it_is_read() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack("<Q", 100 << 30))  # claims 100 GiB, sends nothing more
        with pytest.raises(MalformedMessage, match="exceeds the limit"):
            messages.receive(b, SANDBOX_EVENT, timeout=5, max_bytes=messages.MAX_EVENT_BYTES)


def test_a_sender_that_dies_mid_frame_is_an_end_not_malformed_data() -> None:
    a, b = socket.socketpair()
    with b:
        a.sendall(struct.pack("<Q", 100) + b"partial")
        a.close()
        with pytest.raises(EOFError):
            messages.receive(b, SANDBOX_EVENT, timeout=5)


# ---------------------------------------------------------------- the codec's bounds


def _forged(document: object) -> bytes:
    text = json.dumps(document).encode()
    return struct.pack("<4sIQ", b"GLW1", 0, len(text)) + text


def test_a_message_of_too_many_values_is_refused_before_any_is_built() -> None:
    with pytest.raises(wire.WireError, match="more than"):
        wire.decode(_forged([[] for _ in range(wire.MAX_VALUES + 1)]))


def test_decoding_builds_each_value_once() -> None:
    # 300,000 lists: decoding them twice over (as JSON and again as values) would hold both at once.
    data = _forged([[i] for i in range(300_000)])
    tracemalloc.start()
    try:
        value = wire.decode(data)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(value) == 300_000 and value[-1] == [299_999]
    assert peak < 1.5 * kept, (peak, kept)


def test_tensors_do_not_keep_the_message_alive() -> None:
    blob = bytes(range(256)) * 4
    text = json.dumps({"__tensor__": 0, "dtype": "uint8", "shape": [1024]}).encode()
    data = struct.pack("<4sIQ", b"GLW1", 1, len(text)) + text + struct.pack("<Q", len(blob)) + blob
    tensor = wire.decode(bytearray(data))
    assert tensor.untyped_storage().nbytes() == 1024 and bytes(tensor.numpy()) == blob


# ---------------------------------------------------------------- what the supervisor keeps


def test_kept_output_is_bounded_per_submission() -> None:
    execution = Execution()
    for index in range(40):
        execution.keep(CellOutcome(index=index, status="ok", output="x" * 64 * 1024, seconds=0.1))
    assert execution.output_chars <= MAX_KEPT_OUTPUT
    assert "output not kept" in execution.cells[39].output and execution.cells[0].output == "x" * 64 * 1024
    assert execution.student_seconds == pytest.approx(4.0)


def test_a_layer_counts_as_applied_only_if_every_box_applied_it() -> None:
    first = {"namespaces": "available", "cgroup_memory": "available"}
    second = {"namespaces": "available", "cgroup_memory": "failed: cgroup busy"}
    assert weakest(first, second) == second
    assert weakest(second, first) == second
    assert weakest({}, first) == first


def test_a_trusted_process_under_its_memory_limit_fails_one_allocation_not_the_machine() -> None:
    import subprocess
    import sys

    program = """
from gradelab.memory import limit_address_space
limit_address_space(256)
try:
    bytearray(1 << 30)
except MemoryError:
    print("refused")
print(len(bytearray(64 << 20)) >> 20)
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["refused", "64"]
