"""Tensor frame format: round trips, strict refusals, and a fuzzer that only sees ChannelError."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shieldtune.crypto.framing import (
    DTYPE_CODES,
    MAGIC,
    VERSION,
    FrameLimits,
    bytes_to_tensor,
    decode_frame,
    encode_frame,
    tensor_to_bytes,
)
from shieldtune.errors import ChannelError, ShieldtuneError

DTYPES = list(DTYPE_CODES)


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype in (torch.int64, torch.int32, torch.uint8, torch.int8):
        return torch.randint(0, 100, shape, dtype=dtype)
    return torch.randn(shape).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3, 4), (1, 0, 5)])
def test_round_trip_every_dtype_and_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    # Prepare
    tensor = _sample(dtype, shape)
    meta = {"op": "sum", "step": 3, "lr": 1e-4, "ok": True, "none": None, "ids": [1, 2, "x"]}
    # Execute
    frame = decode_frame(encode_frame(meta, {"x": tensor, "y": tensor.reshape(-1)[:1]}))
    # Assert
    assert frame.meta == meta
    assert frame.tensors["x"].dtype == dtype and frame.tensors["x"].shape == tensor.shape
    torch.testing.assert_close(frame.tensors["x"], tensor, rtol=0, atol=0)
    assert list(frame.tensors) == ["x", "y"]


def test_non_contiguous_tensor_round_trips_and_result_is_writable() -> None:
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    out = decode_frame(encode_frame(tensors={"t": tensor})).tensors["t"]
    torch.testing.assert_close(out, tensor)
    out += 1  # fresh, writable memory


def test_empty_frame_round_trips() -> None:
    frame = decode_frame(encode_frame())
    assert frame.meta == {} and frame.tensors == {}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:4] + bytes([VERSION + 1]) + b[5:], "version"),
        (lambda b: b[:5] + b"\x01" + b[6:], "flags"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\x00", "trailing"),
        (lambda b: b[:3], "truncated"),
    ],
    ids=["magic", "version", "flags", "truncated", "trailing", "short-header"],
)
def test_malformed_frames_are_refused_with_a_clear_message(mutate, message: str) -> None:
    # Prepare
    good = encode_frame({"a": 1}, {"t": torch.ones(2, 2)})
    # Execute / Assert
    with pytest.raises(ChannelError, match=message):
        decode_frame(mutate(good))


def _handmade(ndim: int, shape: list[int], data: bytes = b"", code: int = 1) -> bytes:
    meta = b"{}"
    head = struct.pack("<4sBBHI", MAGIC, VERSION, 0, 1, len(meta)) + meta
    return head + struct.pack(f"<B1sBB{ndim}Q", 1, b"t", code, ndim, *shape) + data


def test_absurd_shape_is_refused_before_allocating() -> None:
    huge = _handmade(2, [2**40, 2**40])
    with pytest.raises(ChannelError, match="max_elements"):
        decode_frame(huge)


def test_shape_larger_than_the_data_is_refused() -> None:
    with pytest.raises(ChannelError, match="truncated in tensor 't' data"):
        decode_frame(_handmade(1, [1000], b"\x00" * 16))


def test_too_many_dims_unknown_dtype_and_bad_bool_are_refused() -> None:
    with pytest.raises(ChannelError, match="max_ndim"):
        decode_frame(_handmade(9, [1] * 9, b"\x00" * 4))
    with pytest.raises(ChannelError, match="unknown dtype code 99"):
        decode_frame(_handmade(1, [1], b"\x00" * 4, code=99))
    with pytest.raises(ChannelError, match="bool"):
        decode_frame(_handmade(1, [2], b"\x01\x07", code=DTYPE_CODES[torch.bool]))


def test_limits_apply_on_both_ends() -> None:
    small = FrameLimits(max_bytes=1000, max_tensors=2, max_meta_bytes=64)
    with pytest.raises(ChannelError, match="max_bytes"):
        encode_frame(tensors={"t": torch.zeros(1000)}, limits=small)
    with pytest.raises(ChannelError, match="max_bytes"):
        decode_frame(encode_frame(tensors={"t": torch.zeros(1000)}), limits=small)
    with pytest.raises(ChannelError, match="max_tensors"):
        decode_frame(encode_frame(tensors={k: torch.zeros(1) for k in "abc"}), limits=small)
    with pytest.raises(ChannelError, match="max_meta_bytes"):
        decode_frame(encode_frame({"k": "v" * 100}), limits=small)


@pytest.mark.parametrize(
    "meta",
    [b"[]", b'{"a": {"b": 1}}', b'{"a": NaN}', b'{"a": 1, "a": 2}', b"\xff", b"", b"[" * 5000],
    ids=["list", "nested", "nan", "dup", "utf8", "empty", "deep"],
)
def test_bad_metadata_is_refused(meta: bytes) -> None:
    frame = struct.pack("<4sBBHI", MAGIC, VERSION, 0, 0, len(meta)) + meta
    with pytest.raises(ChannelError, match="metadata"):
        decode_frame(frame)


def test_encoder_refuses_unsupported_inputs() -> None:
    with pytest.raises(ChannelError, match="dtype"):
        encode_frame(tensors={"t": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ChannelError, match="name"):
        encode_frame(tensors={"": torch.zeros(2)})
    with pytest.raises(ChannelError, match="accepted"):
        encode_frame({"obj": {"nested": 1}})  # type: ignore[dict-item]
    with pytest.raises(ChannelError, match="non-finite"):
        encode_frame({"x": float("inf")})


# --------------------------------------------------------------------------- fuzzing

_FUZZ = settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_FUZZ_LIMITS = FrameLimits(max_bytes=1 << 16, max_elements=1 << 12)


def _parse_or_refuse(data: bytes) -> None:
    try:
        decode_frame(data, _FUZZ_LIMITS)
    except ChannelError as err:
        assert isinstance(err, ShieldtuneError) and str(err)


@pytest.mark.timeout(60)
@_FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_never_crash(data: bytes) -> None:
    _parse_or_refuse(data)


@pytest.mark.timeout(60)
@_FUZZ
@given(st.binary(max_size=256))
def test_fuzz_random_bytes_after_a_valid_header_never_crash(tail: bytes) -> None:
    _parse_or_refuse(MAGIC + bytes([VERSION, 0]) + tail)


_VALID = [
    encode_frame({"op": "x", "n": [1, 2]}, {"a": torch.arange(6, dtype=torch.int32).reshape(2, 3)}),
    encode_frame({}, {"b": torch.ones(3, dtype=torch.bool), "c": torch.zeros(2, 2).half()}),
    encode_frame({"s": "é"}, {"d": torch.randn(2, 2).bfloat16(), "e": torch.zeros(0, 4)}),
]


@pytest.mark.timeout(60)
@_FUZZ
@given(
    st.sampled_from(_VALID),
    st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 4096),
    st.binary(max_size=16),
)
def test_fuzz_mutated_valid_frames_never_crash(
    frame: bytes, flips: list[tuple[int, int]], cut: int, extra: bytes
) -> None:
    data = bytearray(frame)
    for pos, value in flips:
        data[pos % len(data)] = value
    _parse_or_refuse(bytes(data[: len(data) - cut % 8]) + extra)


def test_zero_element_shape_with_an_absurd_dimension_is_refused() -> None:
    # Found by the fuzzer: (0, 2**63) has no elements, but no tensor can have that shape.
    with pytest.raises(ChannelError, match="max_elements"):
        decode_frame(_handmade(2, [0, 2**63]))


def test_typed_metadata_accessors() -> None:
    frame = decode_frame(encode_frame({"n": 3, "lr": 0.5, "name": "x", "flag": True}))
    assert frame.meta_int("n") == 3 and frame.meta_float("lr") == 0.5
    assert frame.meta_float("n") == 3.0 and frame.meta_str("name") == "x"
    assert frame.meta_int("missing", 7) == 7
    with pytest.raises(ChannelError, match="'flag' must be an integer"):
        frame.meta_int("flag")
    with pytest.raises(ChannelError, match="'name' must be a number"):
        frame.meta_float("name")
    with pytest.raises(ChannelError, match="'missing' must be a string"):
        frame.meta_str("missing")


def test_bytes_tensor_helpers_round_trip() -> None:
    assert tensor_to_bytes(bytes_to_tensor(b"abc")) == b"abc"
    assert tensor_to_bytes(bytes_to_tensor(b"")) == b""
    with pytest.raises(ChannelError, match="1-D uint8"):
        tensor_to_bytes(torch.zeros(2, 2, dtype=torch.uint8))
