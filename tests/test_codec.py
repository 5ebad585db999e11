"""Tensor codec: round trips and rejection of malformed tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from collafuse.common.codec import TensorError, decode, encode
from collafuse.v1 import tensor_pb2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.int32, torch.uint8])
def test_round_trip(dtype: torch.dtype) -> None:
    tensor = (torch.randn(3, 1, 4, 5) * 10).to(dtype)
    message = encode(tensor)
    assert list(message.shape) == [3, 1, 4, 5]
    name = str(dtype).removeprefix("torch.")
    back = decode(message, dtypes=(name,))
    assert back.dtype == dtype and torch.equal(back, tensor)
    back[0] = 0  # decoded tensors are writable


def test_wire_bytes_are_little_endian_c_contiguous() -> None:
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # non-contiguous view
    message = encode(tensor)
    assert message.data == np.ascontiguousarray(tensor.numpy()).astype("<f4").tobytes()


def test_rejects_bad_dtype_shape_and_values() -> None:
    good = encode(torch.zeros(2, 1, 4, 4))
    with pytest.raises(TensorError, match="unknown dtype"):
        decode(tensor_pb2.Tensor(dtype="complex64", shape=[1], data=b"\0" * 8))
    with pytest.raises(TensorError, match="not accepted"):
        decode(encode(torch.zeros(2, dtype=torch.int64)))
    with pytest.raises(TensorError, match="does not match"):
        decode(good, shape=[None, 3, 4, 4])
    with pytest.raises(TensorError, match="bytes do not fit"):
        decode(tensor_pb2.Tensor(dtype="float32", shape=[2, 2], data=b"\0" * 12))
    with pytest.raises(TensorError, match="negative"):
        decode(tensor_pb2.Tensor(dtype="float32", shape=[-1], data=b""))
    with pytest.raises(TensorError, match="NaN or Inf"):
        decode(encode(torch.tensor([1.0, float("nan")])))
    with pytest.raises(TensorError, match="NaN or Inf"):
        decode(encode(torch.tensor([float("inf")])))
    with pytest.raises(TensorError, match="outside the accepted range"):
        decode(encode(torch.tensor([100.0])), value_range=(-50, 50))
    with pytest.raises(TensorError, match="cannot travel"):
        encode(torch.zeros(2, dtype=torch.complex64))


@pytest.mark.parametrize(
    "shape",
    [
        [2**62 + 1, 1, 8, 8],  # wraps to 64 elements in int64 arithmetic
        [2**61, 2**3],  # wraps to 0
        [0, 2**62],  # zero elements, yet no array can have that axis
        [2**31, 2**31, 4],
        [1] * 9,  # more axes than any tensor CollaFuse sends
    ],
)
def test_rejects_shapes_whose_element_count_overflows(shape: list[int]) -> None:
    for data in (b"", b"\0" * 256):
        with pytest.raises(TensorError):  # the codec's own error, never numpy's ValueError
            decode(tensor_pb2.Tensor(dtype="float32", shape=shape, data=data), shape=None)
