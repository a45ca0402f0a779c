"""Data-only codec for values that leave the sandbox.

The sandbox S (untrusted) calls `encode`; the trusted test runner T calls `decode`. Only plain data
crosses: None, bool, int, float, str, bytes, list, tuple, str-keyed dict, dense CPU tensors and numeric
numpy arrays. Nothing is ever unpickled, and `decode` only calls builtins and the torch/numpy
constructors, so an always-equal object, a tensor subclass with `__torch_function__` or a `__reduce__`
payload cannot reach T. `encode` runs under the student's control, so its checks only give helpful
messages; every guarantee is enforced again by `decode`.

Format (all integers little-endian):

    b"GLW1"  u32 blob count  u64 JSON length  JSON (UTF-8)  blob count x (u64 length, raw bytes)

In the JSON document, containers and values that JSON cannot carry are tagged objects:
{"__tensor__": i, "dtype": d, "shape": [...]}, {"__ndarray__": i, "dtype": d, "shape": [...]} and
{"__bytes__": i} refer to blob i (each blob is used exactly once), {"__tuple__": [...]} is a tuple, and
{"__dict__": {...}} is a dict whose keys are taken literally (used when a key starts with "__").
Floats use JSON's NaN/Infinity extension.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

import numpy as np
import torch

if sys.byteorder != "little":  # blobs are raw little-endian bytes; torch.frombuffer has no byte order
    raise ImportError("gradelab.boundary.wire needs a little-endian machine")

MAX_DEPTH = 32
MAX_BYTES = 64 << 20
MAX_VALUES = 1_000_000  # JSON values in one message
_MAX_DIMS = 32
_MAGIC = b"GLW1"
_HEADER = struct.Struct("<4sIQ")
_LENGTH = struct.Struct("<Q")
_ALLOWED = "only numbers, strings, lists, dicts, tensors and arrays"

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_TORCH_NAMES = {dtype: name for name, dtype in _TORCH_DTYPES.items()}
_NUMPY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                 "uint8", "uint16", "uint32", "uint64", "bool")
}
# np.longlong and np.ulonglong are distinct classes from np.int64 and np.uint64 on Linux.
_NUMPY_SCALARS: dict[type, type] = {
    np.bool_: bool,
    **{t: int for t in (np.int8, np.int16, np.int32, np.int64, np.longlong,
                        np.uint8, np.uint16, np.uint32, np.uint64, np.ulonglong)},
    **{t: float for t in (np.float16, np.float32, np.float64)},
}
_TAGS = {
    "__tensor__": {"__tensor__", "dtype", "shape"},
    "__ndarray__": {"__ndarray__", "dtype", "shape"},
    "__bytes__": {"__bytes__"},
    "__tuple__": {"__tuple__"},
    "__dict__": {"__dict__"},
}


class WireError(ValueError):
    """A value cannot be sent, or received data is malformed."""


class TruncatedMessage(WireError, EOFError):
    """The peer closed the connection in the middle of a message (it died while sending)."""


# ---------------------------------------------------------------- encoding (untrusted side)


def encode(value: object) -> bytes:
    """Serialize plain data; raise WireError with a student-readable message otherwise."""
    blobs: list[bytes] = []
    document = _to_json(value, blobs, depth=0, where="value")
    try:
        text = json.dumps(document, ensure_ascii=True, separators=(",", ":")).encode()
    except ValueError as exc:  # e.g. an int longer than sys.get_int_max_str_digits()
        raise WireError(f"value cannot be sent: {exc}") from None
    size = _HEADER.size + len(text) + sum(_LENGTH.size + len(b) for b in blobs)
    if size > MAX_BYTES:
        raise WireError(f"value too large to send ({size / 2**20:.1f} MiB > {MAX_BYTES >> 20} MiB)")
    parts = [_HEADER.pack(_MAGIC, len(blobs), len(text)), text]
    for blob in blobs:
        parts += [_LENGTH.pack(len(blob)), blob]
    return b"".join(parts)


def _type_name(value: object) -> str:
    try:
        return str(type(value).__qualname__)
    except Exception:
        return "<unknown>"


def describe_value(value: object) -> str:
    """What a value is, for a message to the student: "None", "an int (5)", "a str ('1 2 3')",
    "a list of 3 items", "a tensor of shape (3,) and dtype torch.int64", "a function". Never
    calls a method of the value (both sides use it; in the sandbox the value is the student's)."""
    kind = type(value)
    if value is None:
        return "None"
    if kind in (bool, int, float, str):
        text = repr(value)
        text = text if len(text) <= 40 else text[:37] + "..."
        return f"{'an' if kind is int else 'a'} {kind.__name__} ({text})"
    if kind in (list, tuple, dict):
        return f"a {kind.__name__} of {len(value)} item{'' if len(value) == 1 else 's'}"
    if kind is torch.Tensor or kind is np.ndarray:
        what = "tensor" if kind is torch.Tensor else "numpy array"
        return f"a {what} of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, type):
        return "a class"
    name = _type_name(value)
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _to_json(value: object, blobs: list[bytes], depth: int, where: str) -> object:
    if depth > MAX_DEPTH:
        raise WireError(f"{where}: nested more than {MAX_DEPTH} levels deep (or contains itself)")
    kind = type(value)  # exact types only: a subclass could override __eq__ and friends
    if value is None or kind is bool or kind is str:
        return value
    if kind is int or kind is float:
        return value
    if kind is bytes:
        blobs.append(value)
        return {"__bytes__": len(blobs) - 1}
    if kind is list or kind is tuple:
        items = [_to_json(v, blobs, depth + 1, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if kind is list else {"__tuple__": items}
    if kind is dict:
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                raise WireError(f"{where}: dict keys must be strings, not {_type_name(key)}")
            out[key] = _to_json(item, blobs, depth + 1, f"{where}[{key!r}]")
        return {"__dict__": out} if any(k.startswith("__") for k in out) else out
    if kind in _NUMPY_SCALARS:
        return _NUMPY_SCALARS[kind](value.item())
    if kind is torch.Tensor or kind is torch.nn.Parameter:
        return _tensor_to_json(value, blobs, where)
    if kind is np.ndarray:
        return _array_to_json(value, blobs, where)
    if isinstance(value, torch.Tensor):
        raise WireError(f"{where}: type {_type_name(value)} (a torch.Tensor subclass) cannot be sent; "
                        "return a plain tensor")
    raise WireError(f"{where}: type {_type_name(value)} cannot be sent ({_ALLOWED})")


def _tensor_to_json(tensor: torch.Tensor, blobs: list[bytes], where: str) -> dict:
    if tensor.layout != torch.strided or tensor.device.type != "cpu":
        raise WireError(f"{where}: only dense CPU tensors can be sent "
                        f"(got layout {tensor.layout}, device {tensor.device}); use .to_dense().cpu()")
    name = _TORCH_NAMES.get(tensor.dtype)
    if name is None:
        raise WireError(f"{where}: tensors of dtype {tensor.dtype} cannot be sent "
                        f"(allowed: {', '.join(_TORCH_DTYPES)})")
    try:
        flat = tensor.detach().resolve_neg().resolve_conj().contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy().tobytes()
    except Exception as exc:
        raise WireError(f"{where}: tensor cannot be sent: {exc}") from None
    blobs.append(raw)
    return {"__tensor__": len(blobs) - 1, "dtype": name, "shape": list(tensor.shape)}


def _array_to_json(array: np.ndarray, blobs: list[bytes], where: str) -> dict:
    name = array.dtype.name
    if name not in _NUMPY_DTYPES or array.dtype.fields is not None:
        raise WireError(f"{where}: arrays of dtype {array.dtype} cannot be sent "
                        f"(allowed: {', '.join(_NUMPY_DTYPES)})")
    little = np.ascontiguousarray(array, dtype=_NUMPY_DTYPES[name].newbyteorder("<"))
    blobs.append(little.tobytes())
    return {"__ndarray__": len(blobs) - 1, "dtype": name, "shape": list(array.shape)}


# ---------------------------------------------------------------- decoding (trusted side)


def decode(data: bytes | bytearray | memoryview, *, max_bytes: int = MAX_BYTES) -> object:
    """Rebuild a value from `encode` output; raise WireError on anything malformed. Each value is
    built once: JSON's containers are resolved in place, each tensor or array copied once."""
    if type(data) not in (bytes, bytearray, memoryview):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    data = memoryview(data).cast("B")
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < _HEADER.size:
        raise WireError("truncated header")
    magic, count, text_len = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise WireError("not a gradelab wire message (bad magic)")
    pos = _HEADER.size
    if text_len > len(data) - pos:
        raise WireError("truncated JSON document")
    text = bytes(data[pos:pos + text_len])
    pos += text_len
    if count > (len(data) - pos) // _LENGTH.size:
        raise WireError(f"claims {count} blobs, more than the message can hold")
    blobs: list[memoryview] = []
    for _ in range(count):
        if len(data) - pos < _LENGTH.size:
            raise WireError("truncated blob header")
        (size,) = _LENGTH.unpack_from(data, pos)
        pos += _LENGTH.size
        if size > len(data) - pos:
            raise WireError("truncated blob")
        blobs.append(data[pos:pos + size])
        pos += size
    if pos != len(data):
        raise WireError(f"{len(data) - pos} trailing bytes after the last blob")
    # Every value but the first follows a comma or opens a container: an upper bound on the
    # number of values, counted before any is built (a few MB of "[[],[],...]" is millions of lists).
    values = text.count(b",") + text.count(b"[") + text.count(b"{")
    if values > MAX_VALUES:
        raise WireError(f"message holds more than {MAX_VALUES} values")
    try:
        document = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise WireError(f"malformed JSON document: {exc}") from None
    used = [False] * len(blobs)
    value = _resolve(document, blobs, used, depth=0)
    if not all(used):
        raise WireError("message has blobs that nothing refers to")
    return value


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise WireError("duplicate key in a JSON object")
    return out


def _resolve(node: object, blobs: list[memoryview], used: list[bool], depth: int) -> object:
    """`node` with its tagged objects turned into the values they stand for; plain lists and
    dicts are resolved in place, not copied."""
    if depth > MAX_DEPTH:
        raise WireError(f"nested more than {MAX_DEPTH} levels deep")
    kind = type(node)
    if kind is not list and kind is not dict:
        return node  # None, bool, int, float, str: JSON's scalars
    tag = None if kind is list else next((key for key in node if key.startswith("__")), None)
    if tag is None:
        for key, item in (enumerate(node) if kind is list else node.items()):
            if type(item) in (list, dict):
                node[key] = _resolve(item, blobs, used, depth + 1)
        return node
    if tag not in _TAGS or set(node) != _TAGS[tag]:
        raise WireError(f"unknown or malformed tagged object with keys {sorted(node)[:8]}")
    if tag == "__tuple__":
        items = node[tag]
        if type(items) is not list:
            raise WireError("__tuple__ must hold a list")
        return tuple(_resolve(items, blobs, used, depth + 1))
    if tag == "__dict__":
        members = node[tag]
        if type(members) is not dict:
            raise WireError("__dict__ must hold an object")
        for key, item in members.items():  # keys taken literally: no tag lookup at this level
            if type(item) in (list, dict):
                members[key] = _resolve(item, blobs, used, depth + 2)
        return members
    blob = _take_blob(node[tag], blobs, used)
    if tag == "__bytes__":
        return bytes(blob)
    if tag == "__tensor__":
        return _tensor_from_blob(blob, node["dtype"], node["shape"])
    return _array_from_blob(blob, node["dtype"], node["shape"])


def _take_blob(index: object, blobs: list[memoryview], used: list[bool]) -> memoryview:
    if type(index) is not int or not 0 <= index < len(blobs):
        raise WireError(f"blob reference {index!r} out of range")
    if used[index]:
        raise WireError(f"blob {index} referenced twice")
    used[index] = True
    return blobs[index]


def _check_shape(shape: object, blob: memoryview, itemsize: int) -> list[int]:
    if type(shape) is not list or len(shape) > _MAX_DIMS:
        raise WireError(f"shape must be a list of at most {_MAX_DIMS} sizes")
    # With data, numel <= len(blob) bounds every dimension; a zero-size shape must not claim absurd
    # dimensions either, or torch's and numpy's stride computations overflow.
    limit = max(len(blob), MAX_BYTES)
    numel = extent = 1
    for size in shape:
        if type(size) is not int or size < 0:
            raise WireError(f"invalid dimension size {size!r}")
        numel *= size
        extent *= max(size, 1)
        if extent > limit:
            raise WireError(f"shape {shape[:8]} is too large")
    if numel * itemsize != len(blob):
        raise WireError(f"blob has {len(blob)} bytes, shape {shape} needs {numel * itemsize}")
    return shape


def _check_bool_bytes(blob: memoryview) -> None:
    # Any byte other than 0/1 would make an invalid bool tensor or array.
    if bytes(blob).translate(None, b"\x00\x01"):
        raise WireError("bool data holds bytes other than 0 and 1")


def _tensor_from_blob(blob: memoryview, dtype_name: object, shape: object) -> torch.Tensor:
    dtype = _TORCH_DTYPES.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None:
        raise WireError(f"tensor dtype {dtype_name!r} is not allowed")
    shape = _check_shape(shape, blob, dtype.itemsize)
    if dtype is torch.bool:
        _check_bool_bytes(blob)
    tensor = torch.empty(shape, dtype=dtype)  # owns its memory: the message can be freed
    if len(blob):
        tensor.view(-1).view(torch.uint8).numpy()[:] = np.frombuffer(blob, dtype=np.uint8)
    return tensor


def _array_from_blob(blob: memoryview, dtype_name: object, shape: object) -> np.ndarray:
    dtype = _NUMPY_DTYPES.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None:
        raise WireError(f"array dtype {dtype_name!r} is not allowed")
    shape = _check_shape(shape, blob, dtype.itemsize)
    if dtype.kind == "b":
        _check_bool_bytes(blob)
    little = np.frombuffer(blob, dtype=dtype.newbyteorder("<")).reshape(shape)
    return little.astype(dtype, copy=True)


# ---------------------------------------------------------------- framing over a SOCK_STREAM socket


def send_msg(sock: socket.socket, obj: object) -> None:
    """Send encode(obj) with an 8-byte little-endian length prefix."""
    data = encode(obj)
    sock.sendall(_LENGTH.pack(len(data)))
    sock.sendall(data)


def recv_msg(sock: socket.socket, *, timeout: float | None, max_bytes: int = MAX_BYTES) -> object:
    """Receive and decode one framed message.

    `timeout` bounds the whole message (None waits forever). Raises EOFError if the peer closed before
    sending anything, WireError on EOF mid-message or bad data, TimeoutError on timeout (after a timeout
    the stream is out of step: close the connection).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    old_timeout = sock.gettimeout()
    try:
        header = _recv_exactly(sock, _LENGTH.size, deadline, at_start=True)
        (size,) = _LENGTH.unpack(header)
        if size > max_bytes:
            raise WireError(f"message of {size} bytes exceeds the limit of {max_bytes}")
        body = _recv_exactly(sock, size, deadline, at_start=False)
    finally:
        sock.settimeout(old_timeout)
    return decode(body, max_bytes=max_bytes)


def _recv_exactly(sock: socket.socket, size: int, deadline: float | None, at_start: bool) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out waiting for a message")
            sock.settimeout(remaining)
        else:
            sock.settimeout(None)
        try:
            n = sock.recv_into(view[got:])
        except socket.timeout:
            raise TimeoutError("timed out waiting for a message") from None
        if n == 0:
            if at_start and got == 0:
                raise EOFError("connection closed")
            raise TruncatedMessage(f"connection closed mid-message ({got} of {size} bytes)")
        got += n
    return buffer
