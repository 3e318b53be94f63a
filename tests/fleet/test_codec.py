"""Properties of the update codec: what decode returns, the norm bound, error feedback, bounds."""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fleet.codec import (
    CodecLimits,
    Quantization,
    decode,
    decode_varints,
    encode,
    encode_varints,
    l2_norm,
    topk_count,
)
from fleet.errors import CodecError, ResidualError, TooLarge
from fleet.tensors import TensorLimits
from tests.fleet.samples import small_update

Params = dict[str, Any]
Arrays = dict[str, np.ndarray]

values = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def updates(draw: st.DrawFn) -> dict[str, np.ndarray]:
    count = draw(st.integers(1, 3))
    out = {}
    for i in range(count):
        shape = draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=12))
        out[f"t{i}.lora_B"] = draw(hnp.arrays(np.float32, shape, elements=values))
    return out


params = st.fixed_dictionaries(
    {
        "norm_bound": st.floats(1e-3, 1e3),
        "topk_fraction": st.floats(0.01, 1.0),
        "quantization": st.sampled_from(Quantization),
    }
)


def _flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays.values()])


@settings(max_examples=120, deadline=None)
@given(update=updates(), p=params)
def test_decode_returns_the_clipped_topk_quantized_update(update: Arrays, p: Params) -> None:
    encoded = encode(update, **p)
    decoded = decode(encoded.data)
    assert list(decoded) == list(update)
    for name, array in update.items():
        assert decoded[name].dtype == np.float32
        assert decoded[name].shape == array.shape
        np.testing.assert_array_equal(decoded[name], encoded.sent[name])

    # The reference, computed independently: clip, top-k by magnitude, scale to the bound.
    x = _flat(update)
    norm = math.sqrt(float(np.sum(x * x)))
    clipped = x * (p["norm_bound"] / norm) if norm > p["norm_bound"] else x
    sent = _flat(decoded)
    k = topk_count(x.size, p["topk_fraction"])
    kth = np.sort(np.abs(clipped))[::-1][k - 1]
    assert np.count_nonzero(sent) <= k
    assert encoded.nnz == np.count_nonzero(sent)
    assert np.all(np.abs(clipped[sent != 0]) >= kth * (1 - 1e-9))  # only top-k entries are sent
    # Sent values keep their sign and never grow (rounding toward zero)...
    assert np.all(sent * clipped >= 0)
    assert np.all(np.abs(sent) <= np.abs(clipped) * (1 + 1e-6) + 1e-30)
    # ...and differ from the (bound-scaled) top-k values by at most one quantization step.
    top = np.abs(clipped) >= kth
    top_norm = math.sqrt(float(np.sum(clipped[top] ** 2)))
    bound = p["norm_bound"] * (1 - 2**-20)  # the encoder's margin against float32 rounding
    factor = min(1.0, bound / top_norm) if top_norm > 0 else 1.0
    target = np.where(top, clipped * factor, 0.0)
    if p["quantization"] is Quantization.INT8:
        tolerance = np.full_like(target, np.abs(target).max() / 127 * 1.0001 + 1e-12)  # one step
    else:
        tolerance = np.abs(target) * 2**-10 * 1.0001 + 6e-8  # one fp16 ulp
    sent_mask = sent != 0
    assert np.all(np.abs(sent - target)[sent_mask] <= tolerance[sent_mask])


@settings(max_examples=120, deadline=None)
@given(update=updates(), residual=updates(), p=params)
def test_every_sent_update_obeys_the_norm_bound(update: Arrays, residual: Arrays, p: Params) -> None:
    residual = {name: np.resize(residual[next(iter(residual))], a.shape) for name, a in update.items()}
    encoded = encode(update, residual, **p)
    assert l2_norm(decode(encoded.data)) <= p["norm_bound"]
    assert encoded.sent_norm <= p["norm_bound"]


@settings(max_examples=40, deadline=None)
@given(
    rounds=st.lists(updates(), min_size=1, max_size=6),
    p=params,
    shape_seed=st.integers(0, 2**16),
)
def test_error_feedback_loses_nothing(rounds: list[Arrays], p: Params, shape_seed: int) -> None:
    """Over rounds, what was sent plus the final residual plus what the bound cut off equals the sum of
    the clipped updates."""
    layout = {name: a.shape for name, a in rounds[0].items()}
    rng = np.random.default_rng(shape_seed)
    inputs = [
        {n: (rng.standard_normal(s) * rng.uniform(0.01, 10)).astype(np.float32) for n, s in layout.items()}
    ]
    inputs += [{n: np.resize(r[next(iter(r))], s) for n, s in layout.items()} for r in rounds[1:]]
    residual: Arrays | None = None
    total_sent = np.zeros(sum(math.prod(s) for s in layout.values()))
    total_clipped = np.zeros_like(total_sent)
    for update in inputs:
        encoded = encode(update, residual, **p)
        residual = encoded.residual
        total_sent = total_sent + _flat(decode(encoded.data)) + _flat(encoded.dropped)
        x = _flat(update)
        norm = math.sqrt(float(np.sum(x * x)))
        total_clipped = total_clipped + (x * (p["norm_bound"] / norm) if norm > p["norm_bound"] else x)
    assert residual is not None
    scale = p["norm_bound"] * len(inputs)
    np.testing.assert_allclose(total_sent + _flat(residual), total_clipped, rtol=0, atol=scale * 1e-5)


def test_a_device_saturating_the_bound_keeps_a_bounded_residual() -> None:
    """The same large update every round (a device far from the fleet's average): what the bound cuts
    off is dropped, so the residual settles instead of growing round after round."""
    rng = np.random.default_rng(3)
    update = {"b": (rng.standard_normal((64, 8)) * 5).astype(np.float32)}
    residual = None
    norms = []
    for _ in range(200):
        encoded = encode(update, residual, norm_bound=1.0, topk_fraction=0.05)
        residual = encoded.residual
        norms.append(l2_norm(residual))
    assert max(norms[100:]) <= 1.05 * max(norms[:100])
    assert norms[-1] < 20.0  # a few rounds' worth of unsent entries, not 200


def test_error_feedback_eventually_sends_everything() -> None:
    update = small_update()
    zero = {name: np.zeros_like(a) for name, a in update.items()}
    first = encode(update, norm_bound=1e3, topk_fraction=0.1)
    residual = first.residual
    sent = _flat(first.sent)
    for _ in range(60):
        step = encode(zero, residual, norm_bound=1e3, topk_fraction=0.1)
        residual = step.residual
        sent += _flat(step.sent)
    np.testing.assert_allclose(sent, _flat(update), atol=1e-3)


def test_sizes_are_what_top_k_promises() -> None:
    rng = np.random.default_rng(1)
    update = {f"layers.{i}.q_proj.lora_B": rng.standard_normal((256, 8)).astype(np.float32) for i in range(8)}
    dense = sum(a.nbytes for a in update.values())
    encoded = encode(update, norm_bound=1.0, topk_fraction=0.01)
    assert encoded.nnz == topk_count(8 * 256 * 8, 0.01)
    assert len(encoded.data) < dense / 50


@pytest.mark.parametrize(
    ("update", "residual", "error"),
    [
        ({}, None, CodecError),
        ({"a": np.array([np.nan], np.float32)}, None, CodecError),
        ({"a": np.array([1], np.int32)}, None, CodecError),
        ({"a b": np.ones(2, np.float32)}, None, CodecError),
        ({"a": np.ones((1, 1, 1, 1, 1), np.float32)}, None, CodecError),
        ({"a": np.ones(2, np.float32)}, {"a": np.ones(3, np.float32)}, ResidualError),
        ({"a": np.ones(2, np.float32)}, {"b": np.ones(2, np.float32)}, ResidualError),
    ],
)
def test_bad_inputs_to_encode(update: Arrays, residual: Arrays | None, error: type[Exception]) -> None:
    with pytest.raises(error):
        encode(update, residual, norm_bound=1.0, topk_fraction=0.5)


def test_decode_checks_the_expected_layout() -> None:
    update = small_update()
    data = encode(update, norm_bound=1.0, topk_fraction=0.2).data
    layout = {name: a.shape for name, a in update.items()}
    assert set(decode(data, expected=layout)) == set(layout)
    with pytest.raises(CodecError, match="shape"):
        decode(data, expected={**layout, "layers.0.v_proj.lora_B": (4, 8)})
    with pytest.raises(CodecError, match="names"):
        decode(data, expected={"other": (16, 4)})


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=50))
def test_varints_round_trip(numbers: list[int]) -> None:
    array = np.array(numbers, dtype=np.uint64)
    assert decode_varints(encode_varints(array), len(numbers)).tolist() == numbers


@pytest.mark.parametrize(
    ("data", "count"),
    [
        (b"\x80\x00", 1),
        (b"\x80", 1),
        (b"\x01\x02", 1),
        (b"\x01", 2),
        (b"\xff\xff\xff\xff\x7f", 1),
        (b"\x01", 0),
    ],
)
def test_bad_varints(data: bytes, count: int) -> None:
    with pytest.raises(CodecError):
        decode_varints(data, count)


def _blob(body: bytes, *, quant: int = 1, declared: int | None = None) -> bytes:
    size = len(body) if declared is None else declared
    return b"PPCU" + struct.pack("<BBI", 1, quant, size) + zstandard.ZstdCompressor().compress(body)


def _body(
    names: list[str], shapes: list[tuple[int, ...]], nnz: int = 0, gaps: bytes = b"", tail: bytes = b""
) -> bytes:
    joined = "\n".join(names).encode()
    dims = [d for s in shapes for d in s]
    return (
        struct.pack("<II", len(names), len(joined))
        + joined
        + bytes(len(s) for s in shapes)
        + struct.pack(f"<{len(dims)}I", *dims)
        + struct.pack("<II", nnz, len(gaps))
        + gaps
        + tail
    )


def test_huge_declared_shapes_are_refused_before_allocating() -> None:
    import tracemalloc

    limits = CodecLimits(tensors=TensorLimits(max_total_elements=1 << 16))
    attacks = [
        _blob(_body(["a"], [(0x7FFFFFFF, 0x7FFFFFFF)]), declared=None),
        _blob(_body(["a", "b"], [(60000, 1), (60000, 1)])),
        _blob(b"\xff\xff\xff\x7f" + b"\x00" * 8),
        _blob(_body(["a"], [(4,)], nnz=1 << 30, tail=b"")),
        b"PPCU" + struct.pack("<BBI", 1, 1, 0xFFFFFFFF) + b"\x00" * 8,
    ]
    tracemalloc.start()
    try:
        for blob in attacks:
            with pytest.raises((CodecError, TooLarge)):
                decode(blob, limits=limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize(
    "blob",
    [
        _blob(_body(["a"], [(4,)], 1, b"\x04", b"\x00\x00\x80\x3f\x01")),  # index 4 of 4
        _blob(_body(["a"], [(4,)], 2, b"\x01\x00", b"\x00\x00\x80\x3f\x01\x01")[:-1]),  # value missing
        _blob(_body(["a"], [(4,)], 1, b"\x01", b"\x00\x00\xc0\x7f\x01")),  # NaN scale
        _blob(_body(["a"], [(4,)], 1, b"\x01", b"\x00\x00\x80\x3f\x80")),  # -128
        _blob(_body(["a"], [(4,)], 1, b"\x01", b"\x00\x7c"), quant=2),  # fp16 inf
        _blob(_body(["a"], [(4,)], 1, b"\x01", b"\x00\x00\x80\x3f\x01"), quant=9),
        _blob(_body(["a", "a"], [(4,), (4,)])),
        _blob(_body(["a"], [(4,)]), declared=3),
        _blob(_body(["a"], [(4,)]))[:-1],
        _blob(_body(["a"], [(4,)])) + b"\x00",
        b"PPCU\x02\x01\x00\x00\x00\x00",
        b"XXXX\x01\x01\x00\x00\x00\x00",
    ],
)
def test_malformed_blobs_are_refused(blob: bytes) -> None:
    with pytest.raises(CodecError):
        decode(blob)
