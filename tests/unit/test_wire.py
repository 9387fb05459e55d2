"""Wire codec round-trips and rejection of malformed Tensor messages."""

import pytest
import torch

from asymkd.v1 import teacher_pb2 as pb
from asymkd.wire import WireError, tensor_from_proto, tensor_to_proto


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8]
)
def test_round_trip_preserves_dtype_shape_values(dtype):
    x = (torch.randn(3, 5, 2) * 50).to(dtype)
    y = tensor_from_proto(tensor_to_proto(x))
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, x)


def test_round_trip_non_contiguous_and_special_values():
    x = torch.tensor([[float("-inf"), 0.0, float("nan")], [1.5, -2.0, float("inf")]]).t()
    y = tensor_from_proto(tensor_to_proto(x))
    assert torch.equal(torch.isnan(y), torch.isnan(x))
    assert torch.equal(y.nan_to_num(0.0), x.nan_to_num(0.0))


def test_empty_tensor_round_trips():
    y = tensor_from_proto(tensor_to_proto(torch.empty(0, 4, dtype=torch.int32)))
    assert y.shape == (0, 4) and y.dtype == torch.int32


def test_data_is_little_endian_c_order():
    t = tensor_to_proto(torch.tensor([[1, 2], [3, 4]], dtype=torch.int32))
    assert t.data[:8] == (1).to_bytes(4, "little") + (2).to_bytes(4, "little")


def test_size_mismatch_names_field():
    t = pb.Tensor(dtype=pb.FLOAT32, shape=[2, 3], data=b"\0" * 20)
    with pytest.raises(WireError, match=r"at_ids\.data"):
        tensor_from_proto(t, field="at_ids")


def test_unknown_dtype_rejected():
    with pytest.raises(WireError, match=r"\.dtype"):
        tensor_from_proto(pb.Tensor(dtype=0, shape=[1], data=b"\0" * 4))
