"""Tensor <-> protobuf ``Tensor``: raw C-contiguous little-endian bytes, validated on decode.

Decoding never unpickles and copies at most once (``np.frombuffer`` is zero-copy
but read-only). Every problem raises ``TensorError`` with a message a person can
act on; the server maps it to INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from collafuse.v1 import tensor_pb2

_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "uint8": np.dtype("u1"),
}
MAX_ELEMENTS = 1 << 28
MAX_DIMS = 8


class TensorError(ValueError):
    """A tensor on the wire is malformed or outside what the receiver accepts."""


def encode(tensor: torch.Tensor | np.ndarray) -> tensor_pb2.Tensor:
    array = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
    name = next((n for n, dt in _DTYPES.items() if dt == array.dtype.newbyteorder("<") or dt == array.dtype), None)
    if name is None:
        raise TensorError(f"dtype {array.dtype} cannot travel; use one of {sorted(_DTYPES)}")
    wire = np.ascontiguousarray(array, dtype=_DTYPES[name])
    return tensor_pb2.Tensor(dtype=name, shape=list(wire.shape), data=wire.tobytes())


def decode(
    message: tensor_pb2.Tensor,
    *,
    what: str = "tensor",
    dtypes: Sequence[str] = ("float32",),
    shape: Sequence[int | None] | None = None,
    finite: bool = True,
    value_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Validate and decode. ``shape`` entries of None accept any size on that axis."""
    if message.dtype not in _DTYPES:
        raise TensorError(f"{what}: unknown dtype {message.dtype!r}; send one of {sorted(_DTYPES)}")
    if message.dtype not in dtypes:
        raise TensorError(f"{what}: dtype {message.dtype} is not accepted here; send {', '.join(dtypes)}")
    if len(message.shape) > MAX_DIMS:
        raise TensorError(f"{what}: {len(message.shape)} dimensions exceed the limit of {MAX_DIMS}")
    dims = [int(d) for d in message.shape]
    if any(d < 0 for d in dims):
        raise TensorError(f"{what}: negative dimension in shape {dims}")
    # Each axis on its own first (a zero elsewhere must not admit a 2^62 axis), then the product
    # in Python integers: int64 arithmetic wraps ([2^62 + 1, 1, 8, 8] would "hold" 64 elements).
    if any(d > MAX_ELEMENTS for d in dims) or (count := math.prod(dims)) > MAX_ELEMENTS:
        raise TensorError(f"{what}: shape {dims} exceeds the limit of {MAX_ELEMENTS} elements")
    if shape is not None and (
        len(dims) != len(shape) or any(want is not None and want != got for want, got in zip(shape, dims))
    ):
        expected = ["*" if s is None else s for s in shape]
        raise TensorError(f"{what}: shape {dims} does not match the expected {expected}")
    dtype = _DTYPES[message.dtype]
    # Read the field once: every access of a protobuf bytes field copies the whole payload.
    data = message.data
    if len(data) != count * dtype.itemsize:
        raise TensorError(
            f"{what}: {len(data)} bytes do not fit shape {dims} of {message.dtype} "
            f"({count * dtype.itemsize} bytes expected)"
        )
    array = np.frombuffer(data, dtype=dtype).reshape(dims)
    if finite and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise TensorError(f"{what}: contains NaN or Inf values")
    if value_range is not None and array.size:
        low, high = value_range
        if float(array.min()) < low or float(array.max()) > high:
            raise TensorError(f"{what}: values outside the accepted range [{low}, {high}]")
    # One copy: frombuffer views are read-only and torch wants writable memory.
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))
