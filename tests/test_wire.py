"""gradelab.boundary.wire: plain data round-trips, everything else is refused, forged payloads raise WireError."""

from __future__ import annotations

import enum
import json
import math
import os
import pickle
import random
import socket
import struct
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from gradelab.boundary.wire import MAX_BYTES, WireError, decode, describe_value, encode, recv_msg, send_msg

TORCH_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
                torch.int64, torch.uint8, torch.bool]
NUMPY_DTYPES = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                "uint64", "bool"]
SHAPES = [(), (0,), (5,), (2, 3), (0, 4), (2, 3, 4)]


def roundtrip(value: object) -> object:
    return decode(encode(value))


def forge(document: object, blobs: list[bytes] = (), *, magic: bytes = b"GLW1") -> bytes:
    """A message built by hand, as a hostile sandbox could send it."""
    text = json.dumps(document).encode()
    parts = [struct.pack("<4sIQ", magic, len(blobs), len(text)), text]
    for blob in blobs:
        parts += [struct.pack("<Q", len(blob)), blob]
    return b"".join(parts)


def sample_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=generator, dtype=dtype)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("value", [
    None, True, False, 0, -7, 2**100, 1.5, -0.0, math.inf, -math.inf, "", "héllo ☃ \x00", b"", b"\x00\xff" * 10,
    [], [1, [2, [3, "x"]]], (), (1, (2.5, None)), {}, {"a": 1, "b": [True, {"c": b"z"}]},
    {"__tensor__": 1, "__class__": "x", "plain": 2}, {"__dict__": {"__tuple__": []}},
])
def test_plain_values_roundtrip(value: object) -> None:
    out = roundtrip(value)
    assert out == value
    assert type(out) is type(value)


def test_nan_roundtrips() -> None:
    assert math.isnan(roundtrip(math.nan))


def test_tuple_and_list_types_are_kept() -> None:
    out = roundtrip({"t": (1, [2, (3,)]), "l": [(4,)]})
    assert type(out["t"]) is tuple and type(out["t"][1]) is list and type(out["t"][1][1]) is tuple
    assert type(out["l"][0]) is tuple


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tensors_roundtrip(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = sample_tensor(dtype, shape)
    out = roundtrip(tensor)
    assert type(out) is torch.Tensor
    assert out.dtype == dtype and out.shape == tensor.shape
    assert torch.equal(out, tensor)


def test_special_float_values_in_tensors_roundtrip() -> None:
    tensor = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e-45])
    out = roundtrip(tensor)
    assert torch.equal(out.view(torch.int32), tensor.view(torch.int32))  # bit-exact, NaN included


@pytest.mark.parametrize("make", [
    lambda x: x.t(),
    lambda x: x[:, ::2],
    lambda x: x[1],
    lambda x: x[:1].expand(4, 6),
    lambda x: x.permute(1, 0)[2:],
    lambda x: torch.ones(3, 4).requires_grad_() * 2,  # non-leaf with grad_fn
], ids=["transpose", "step", "row", "expand", "permute-slice", "grad-fn"])
def test_non_contiguous_and_autograd_tensors_roundtrip(make) -> None:
    tensor = make(torch.arange(24, dtype=torch.float32).reshape(4, 6))
    out = roundtrip(tensor)
    assert type(out) is torch.Tensor and not out.requires_grad
    assert torch.equal(out, tensor.detach())


def test_parameter_is_sent_as_plain_data() -> None:
    parameter = torch.nn.Parameter(torch.randn(3, 2))
    out = roundtrip(parameter)
    assert type(out) is torch.Tensor and not out.requires_grad
    assert torch.equal(out, parameter.detach())


def test_decoded_tensor_owns_its_memory() -> None:
    out = roundtrip(torch.zeros(4))
    out += 1  # a read-only or shared buffer would fail or alias
    assert out.tolist() == [1.0] * 4


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_numpy_arrays_roundtrip(dtype: str, shape: tuple[int, ...]) -> None:
    array = np.asarray(np.random.default_rng(0).standard_normal(shape) * 50).astype(dtype)
    out = roundtrip(array)
    assert type(out) is np.ndarray
    assert out.dtype == array.dtype and out.shape == array.shape
    assert np.array_equal(out, array)
    assert out.flags.writeable and out.flags.owndata


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=">f4").reshape(3, 4),  # big-endian
    np.arange(24, dtype=np.int64).reshape(4, 6)[:, ::3],
    np.arange(6.0).reshape(2, 3).T,
    np.array(3.5),
], ids=["big-endian", "strided", "transposed", "0-d"])
def test_unusual_numpy_layouts_roundtrip(array: np.ndarray) -> None:
    out = roundtrip(array)
    assert type(out) is np.ndarray and out.dtype.isnative
    assert np.array_equal(out, array)


@pytest.mark.parametrize("scalar, expected", [
    (np.float32(1.5), 1.5), (np.float64(-2.25), -2.25), (np.float16(0.5), 0.5), (np.int64(-3), -3),
    (np.uint8(200), 200), (np.longlong(7), 7), (np.bool_(True), True), (np.bool_(False), False),
])
def test_numpy_scalars_become_python_numbers(scalar: object, expected: object) -> None:
    out = roundtrip(scalar)
    assert out == expected and type(out) is type(expected)


# ---------------------------------------------------------------- refusals on the sending side


class AlwaysEq:
    def __eq__(self, other: object) -> bool:
        return True


class EvilInt(int):
    def __eq__(self, other: object) -> bool:
        return True


class EvilFloat(float):
    pass


class EvilStr(str):
    pass


class EvilDict(dict):
    pass


class Colour(enum.IntEnum):
    RED = 1


class EvilTensor(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return True


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/gradelab-wire-pwned",))


@pytest.mark.parametrize("value, type_name", [
    (AlwaysEq(), "AlwaysEq"), (EvilInt(3), "EvilInt"), (EvilFloat(1.0), "EvilFloat"), (EvilStr("x"), "EvilStr"),
    (EvilDict(a=1), "EvilDict"), (OrderedDict(a=1), "OrderedDict"), (Colour.RED, "Colour"), (Payload(), "Payload"),
    ({1, 2}, "set"), (frozenset(), "frozenset"), (1j, "complex"), (object(), "object"), (len, "builtin_function"),
    (range(3), "range"), (bytearray(b"x"), "bytearray"), ([1, AlwaysEq()], "AlwaysEq"),
    ({"k": (1, {"deep": AlwaysEq()})}, "AlwaysEq"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_non_plain_values_are_refused(value: object, type_name: str) -> None:
    with pytest.raises(WireError, match=rf"type {type_name}\w* cannot be sent \(only numbers, strings, lists"):
        encode(value)


def test_refusal_message_says_where() -> None:
    with pytest.raises(WireError, match=r"value\['k'\]\[1\]: type AlwaysEq cannot be sent"):
        encode({"k": [0, AlwaysEq()]})


def test_tensor_subclass_is_refused() -> None:
    evil = torch.zeros(3).as_subclass(EvilTensor)
    with pytest.raises(WireError, match="EvilTensor .*torch.Tensor subclass"):
        encode(evil)


@pytest.mark.parametrize("tensor, match", [
    (torch.zeros(2, dtype=torch.complex64), "dtype torch.complex64"),
    (torch.zeros(2, dtype=torch.uint16), "dtype torch.uint16"),
    (torch.zeros(3, 3).to_sparse(), "dense CPU"),
    (torch.zeros(2, device="meta"), "dense CPU"),
])
def test_unsupported_tensors_are_refused(tensor: torch.Tensor, match: str) -> None:
    with pytest.raises(WireError, match=match):
        encode(tensor)


@pytest.mark.parametrize("array", [
    np.array([1, "a"], dtype=object), np.zeros(2, dtype=[("a", "i4")]), np.zeros(2, dtype=np.complex64),
    np.array(["x"]), np.zeros((2, 2)).view(np.matrix),
], ids=["object", "structured", "complex", "unicode", "matrix-subclass"])
def test_unsupported_arrays_are_refused(array: np.ndarray) -> None:
    with pytest.raises(WireError):
        encode(array)


def test_non_string_dict_keys_are_refused() -> None:
    with pytest.raises(WireError, match="dict keys must be strings"):
        encode({1: "a"})


def test_too_deep_nesting_is_refused() -> None:
    value: list = []
    for _ in range(40):
        value = [value]
    with pytest.raises(WireError, match="nested more than"):
        encode(value)


def test_self_referencing_list_is_refused() -> None:
    loop: list = []
    loop.append(loop)
    with pytest.raises(WireError, match="nested more than"):
        encode(loop)


def test_oversized_value_is_refused() -> None:
    with pytest.raises(WireError, match="too large"):
        encode(torch.zeros((MAX_BYTES // 4) + 1))


# ---------------------------------------------------------------- forged payloads on the receiving side


def test_forge_helper_matches_the_real_format() -> None:
    assert decode(forge({"__tensor__": 0, "dtype": "int32", "shape": [2]}, [struct.pack("<2i", 7, 8)])).tolist() == [7, 8]


@pytest.mark.parametrize("document, blobs, match", [
    ({"__tensor__": 0, "dtype": "float32", "shape": [3]}, [b"\0" * 8], "needs 12"),
    ({"__tensor__": 0, "dtype": "float32", "shape": [2, 2]}, [b"\0" * 20], "needs 16"),
    ({"__tensor__": 0, "dtype": "complex64", "shape": [1]}, [b"\0" * 8], "not allowed"),
    ({"__tensor__": 0, "dtype": "torch.float32", "shape": [1]}, [b"\0" * 4], "not allowed"),
    ({"__tensor__": 0, "dtype": ["float32"], "shape": [1]}, [b"\0" * 4], "not allowed"),
    ({"__ndarray__": 0, "dtype": "object", "shape": [1]}, [b"\0" * 8], "not allowed"),
    ({"__ndarray__": 0, "dtype": "<f4", "shape": [1]}, [b"\0" * 4], "not allowed"),
    ({"__tensor__": 0, "dtype": "float32", "shape": [-1]}, [b"\0" * 4], "invalid dimension"),
    ({"__tensor__": 0, "dtype": "float32", "shape": [True]}, [b"\0" * 4], "invalid dimension"),
    ({"__tensor__": 0, "dtype": "float32", "shape": [1.0]}, [b"\0" * 4], "invalid dimension"),
    ({"__tensor__": 0, "dtype": "float32", "shape": 1}, [b"\0" * 4], "shape must be a list"),
    ({"__tensor__": 0, "dtype": "float32", "shape": [1] * 33}, [b"\0" * 4], "shape must be a list"),
    ({"__tensor__": 0, "dtype": "uint8", "shape": [0, 2**62, 2**62]}, [b""], "too large"),
    ({"__tensor__": 0, "dtype": "float64", "shape": [0] + [2**26] * 31}, [b""], "too large"),
    ({"__ndarray__": 0, "dtype": "float64", "shape": [0] + [2**26] * 31}, [b""], "too large"),
    ({"__tensor__": 0, "dtype": "bool", "shape": [2]}, [b"\x01\x02"], "bytes other than 0 and 1"),
    ({"__ndarray__": 0, "dtype": "bool", "shape": [1]}, [b"\xff"], "bytes other than 0 and 1"),
    ({"__tensor__": 1, "dtype": "uint8", "shape": [1]}, [b"\0"], "out of range"),
    ({"__tensor__": -1, "dtype": "uint8", "shape": [1]}, [b"\0"], "out of range"),
    ({"__tensor__": "0", "dtype": "uint8", "shape": [1]}, [b"\0"], "out of range"),
    ([{"__bytes__": 0}, {"__bytes__": 0}], [b"x" * 1000], "referenced twice"),
    ({"__bytes__": 0}, [b"a", b"b"], "nothing refers to"),
    ({"__tensor__": 0, "dtype": "uint8", "shape": [1], "extra": 1}, [b"\0"], "malformed tagged object"),
    ({"__tensor__": 0, "dtype": "uint8"}, [b"\0"], "malformed tagged object"),
    ({"__class__": "os.system"}, [], "malformed tagged object"),
    ({"__reduce__": ["os.system", ["id"]]}, [], "malformed tagged object"),
    ({"a": {"__import__": "os"}}, [], "malformed tagged object"),
    ({"__tuple__": {"a": 1}}, [], "must hold a list"),
    ({"__dict__": [1]}, [], "must hold an object"),
])
def test_forged_payloads_are_rejected(document: object, blobs: list[bytes], match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode(forge(document, blobs))


def test_bad_magic_is_rejected() -> None:
    with pytest.raises(WireError, match="bad magic"):
        decode(forge([1], magic=b"GLW2"))


@pytest.mark.parametrize("cut", [0, 3, 15, 17, 30, -9, -1])
def test_truncated_messages_are_rejected(cut: int) -> None:
    data = encode({"w": torch.arange(6, dtype=torch.float32), "b": b"xyz"})
    with pytest.raises(WireError):
        decode(data[:cut])


def test_trailing_bytes_are_rejected() -> None:
    with pytest.raises(WireError, match="trailing"):
        decode(encode([1, 2]) + b"\0")


@pytest.mark.parametrize("header", [
    struct.pack("<4sIQ", b"GLW1", 2**32 - 1, 2),  # absurd blob count
    struct.pack("<4sIQ", b"GLW1", 0, 2**63),  # absurd JSON length
])
def test_oversized_claims_are_rejected(header: bytes) -> None:
    with pytest.raises(WireError):
        decode(header + b"[]")


def test_oversized_blob_claim_is_rejected() -> None:
    data = forge({"__bytes__": 0}, [b"abc"])
    forged = data[:-11] + struct.pack("<Q", 2**60) + b"abc"
    with pytest.raises(WireError, match="truncated blob"):
        decode(forged)


def test_raised_max_bytes_admits_tensors_above_the_default() -> None:
    size = MAX_BYTES + (1 << 20)
    out = decode(forge({"__tensor__": 0, "dtype": "uint8", "shape": [size]}, [bytes(size)]), max_bytes=2 * MAX_BYTES)
    assert out.shape == (size,)


def test_message_over_max_bytes_is_rejected() -> None:
    with pytest.raises(WireError, match="exceeds"):
        decode(encode(b"x" * 2000), max_bytes=1000)


@pytest.mark.parametrize("text", [
    b"not json", b"\xff\xfe", b'{"a": 1, "a": 2}', b"[" * 100_000 + b"]" * 100_000, b"1" * 5000,
])
def test_malformed_json_is_rejected(text: bytes) -> None:
    with pytest.raises(WireError):
        decode(struct.pack("<4sIQ", b"GLW1", 0, len(text)) + text)


def test_too_deep_json_is_rejected() -> None:
    with pytest.raises(WireError, match="nested more than"):
        decode(forge(json.loads("[" * 40 + "]" * 40)))


def test_pickle_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Exploit())
    for data in (payload, struct.pack("<4sIQ", b"GLW1", 0, len(payload)) + payload):
        with pytest.raises(WireError):
            decode(data)
    assert not marker.exists()


def test_forged_tensor_decodes_as_plain_tensor() -> None:
    out = decode(forge({"__tensor__": 0, "dtype": "float32", "shape": [2]}, [struct.pack("<2f", 1, 2)]))
    assert type(out) is torch.Tensor and out.tolist() == [1.0, 2.0]


def test_random_corruption_only_ever_raises_wire_error() -> None:
    valid = encode({"x": torch.arange(12, dtype=torch.float32).reshape(3, 4), "a": np.arange(3),
                    "t": (1, "s", b"b", None, [True, 2.5]), "__k": {"n": np.float32(1)}})
    rng = random.Random(0)
    for _ in range(3000):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            choice = rng.random()
            position = rng.randrange(len(data))
            if choice < 0.6:
                data[position] = rng.randrange(256)
            elif choice < 0.8:
                del data[position:position + rng.randint(1, 8)]
            else:
                data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        try:
            decode(bytes(data))
        except WireError:
            pass


# ---------------------------------------------------------------- framing


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_send_and_recv_roundtrip(pair) -> None:
    a, b = pair
    value = {"loss": 0.25, "grad": torch.randn(50, 50), "names": ("w", "b")}
    send_msg(a, value)
    send_msg(a, [1])
    out = recv_msg(b, timeout=5)
    assert torch.equal(out["grad"], value["grad"]) and out["names"] == ("w", "b")
    assert recv_msg(b, timeout=5) == [1]


def test_large_message_crosses_the_socket(pair) -> None:
    a, b = pair
    tensor = torch.randn(1 << 20)  # 4 MiB: many recv() calls
    sender = threading.Thread(target=send_msg, args=(a, tensor))
    sender.start()
    out = recv_msg(b, timeout=10)
    sender.join()
    assert torch.equal(out, tensor)


def test_eof_before_a_message_raises_eof_error(pair) -> None:
    a, b = pair
    a.close()
    with pytest.raises(EOFError):
        recv_msg(b, timeout=5)


@pytest.mark.parametrize("sent", [b"\x10\0\0", struct.pack("<Q", 100) + b"partial"])
def test_eof_mid_message_raises_wire_error(pair, sent: bytes) -> None:
    a, b = pair
    a.sendall(sent)
    a.close()
    with pytest.raises(WireError, match="closed mid-message"):
        recv_msg(b, timeout=5)


def test_timeout_raises_timeout_error(pair) -> None:
    a, b = pair
    a.sendall(struct.pack("<Q", 100) + b"slow")
    with pytest.raises(TimeoutError):
        recv_msg(b, timeout=0.2)
    assert b.gettimeout() is None  # the socket's own timeout is restored


def test_oversized_length_prefix_is_rejected_without_reading(pair) -> None:
    a, b = pair
    a.sendall(struct.pack("<Q", 1 << 40))
    with pytest.raises(WireError, match="exceeds"):
        recv_msg(b, timeout=5, max_bytes=1 << 20)


def test_unsendable_value_sends_nothing(pair) -> None:
    a, b = pair
    with pytest.raises(WireError):
        send_msg(a, AlwaysEq())
    a.close()
    with pytest.raises(EOFError):
        recv_msg(b, timeout=5)


class Unsized:
    def __len__(self):  # never called: describe_value does not run a method of the value
        raise AssertionError("called")


@pytest.mark.parametrize("value, text", [
    (None, "None"), (5, "an int (5)"), (2.5, "a float (2.5)"), (True, "a bool (True)"),
    ("1 2 3", "a str ('1 2 3')"), ("x" * 60, "a str ('" + "x" * 36 + "...)"),
    ([1, 2], "a list of 2 items"), ({"a": 1}, "a dict of 1 item"),
    (torch.zeros(3, dtype=torch.int64), "a tensor of shape (3,) and dtype torch.int64"),
    (np.zeros((2, 1)), "a numpy array of shape (2, 1) and dtype float64"),
    (len, "a builtin_function_or_method"), (int, "a class"), (Unsized(), "an Unsized"),
])
def test_describe_value_says_what_a_value_is(value, text):
    assert describe_value(value) == text
