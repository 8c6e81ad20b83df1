"""Binary encoding of plain data (dicts, lists, numbers, bytes, numpy arrays) with msgpack.

Used for Twinkle's native HTTP payloads and for results kept in the store: arrays travel as their
raw bytes plus dtype and shape, never as lists of floats, and decode straight into numpy.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

_NDARRAY = 1
CONTENT_TYPE = "application/x-msgpack"


def _default(obj: Any):
    if isinstance(obj, np.ndarray):
        array = np.ascontiguousarray(obj)
        header = msgpack.packb([array.dtype.str, list(array.shape)])
        return msgpack.ExtType(_NDARRAY, header + array.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="python")
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: bytes):
    if code == _NDARRAY:
        unpacker = msgpack.Unpacker()
        unpacker.feed(data)
        dtype, shape = next(unpacker)
        offset = unpacker.tell()
        return np.frombuffer(data, dtype=np.dtype(dtype), offset=offset).reshape(shape)
    return msgpack.ExtType(code, data)


def dumps(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def loads(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
