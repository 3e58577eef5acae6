"""Properties of the gradient codecs: sizes, error bounds, unbiasedness, error feedback."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collabtrain_trainer.codecs import (
    BFloat16Codec,
    BlockQuantCodec,
    Codec,
    ErrorFeedback,
    Float16Codec,
    NoneCodec,
    PowerSGD,
    TopKCodec,
    make_codec,
)
from collabtrain_trainer.codecs.powersgd import matrix_shape, plan_blocks
from collabtrain_trainer.config import CompressionConfig

FAST = settings(max_examples=25, deadline=None)

# The documented payload size of every codec, written out independently of the code.
FORMULAS: dict[str, tuple[Callable[[], Codec], Callable[[int], int]]] = {
    "none": (NoneCodec, lambda n: 4 * n),
    "fp16": (Float16Codec, lambda n: 4 + 2 * n),
    "bf16": (BFloat16Codec, lambda n: 2 * n),
    "int8/64": (lambda: BlockQuantCodec(8, 64), lambda n: 4 * math.ceil(n / 64) + n),
    "int4/32": (
        lambda: BlockQuantCodec(4, 32),
        lambda n: 4 * math.ceil(n / 32) + math.ceil(n / 2),
    ),
    # Positions: two-byte indices (chunks of at most 32768) or a bitmap, the smaller.
    "topk/0.05": (
        lambda: TopKCodec(0.05),
        lambda n: 4 * math.ceil(0.05 * n) + min(2 * math.ceil(0.05 * n), math.ceil(n / 8)),
    ),
    "topk/0.3/q8": (
        lambda: TopKCodec(0.3, value_bits=8),
        lambda n: 4 + math.ceil(0.3 * n) + min(2 * math.ceil(0.3 * n), math.ceil(n / 8)),
    ),
    # SparseLoCo's shape: the top tenth of every 64 elements, 4-bit values, a scale each.
    "topk/0.1/chunk64/q4": (
        lambda: TopKCodec(0.1, chunk_size=64, value_bits=4),
        lambda n: _chunked_topk_bytes(n, 0.1, 64, 4),
    ),
}


def _chunked_topk_bytes(n: int, ratio: float, chunk: int, bits: int) -> int:
    count, length = (math.ceil(n / chunk), chunk) if n > chunk else (1, n)
    k = math.ceil(ratio * length)
    values = (4 * count if bits < 32 else 0) + math.ceil(count * k * bits / 8)
    return values + min(2 * count * k, math.ceil(count * length / 8))


def vectors(min_size: int = 1, max_size: int = 600) -> st.SearchStrategy[torch.Tensor]:
    """Flat fp32 tensors: a seed, a length and a magnitude spanning many decades."""
    return st.builds(
        lambda seed, n, exponent, sparse: _vector(seed, n, 10.0**exponent, sparse),
        st.integers(0, 2**31 - 1),
        st.integers(min_size, max_size),
        st.integers(-6, 6),
        st.booleans(),
    )


def _vector(seed: int, n: int, magnitude: float, sparse: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * magnitude
    if sparse:  # zeros and whole zero blocks are edge cases for scales
        x[torch.rand(n, generator=g) < 0.7] = 0.0
    return x


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("label", sorted(FORMULAS))
@FAST
@given(x=vectors())
def test_payload_is_uint8_of_the_documented_size(label: str, x: torch.Tensor) -> None:
    factory, formula = FORMULAS[label]
    codec = factory()
    payload = codec.encode(x, gen())
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    assert payload.numel() == codec.wire_bytes(x.numel()) == formula(x.numel())
    assert codec.decode(payload, x.numel()).shape == x.shape


@FAST
@given(x=vectors())
def test_none_is_exact(x: torch.Tensor) -> None:
    codec = NoneCodec()
    assert torch.equal(codec.decode(codec.encode(x), x.numel()), x)


@FAST
@given(x=vectors())
def test_fp16_error_is_half_precision_relative(x: torch.Tensor) -> None:
    codec = Float16Codec()
    decoded = codec.decode(codec.encode(x), x.numel())
    absmax = float(x.abs().max())
    # fp16 rounding (2^-11 relative), fp32 scaling noise, and fp16 subnormals near zero.
    bound = x.abs() * (2.0**-11 + 2.0**-20) + absmax * 2.0**-38
    assert bool(((decoded - x).abs() <= bound).all())


def test_fp16_does_not_overflow_on_large_gradients() -> None:
    x = torch.randn(1000, generator=gen(1)) * 1e6
    x[0] = 3e6  # far beyond fp16's 65504
    decoded = Float16Codec().decode(Float16Codec().encode(x), x.numel())
    assert bool(torch.isfinite(decoded).all())
    assert bool(((decoded - x).abs() <= x.abs() * 2.0**-10 + 1e-3).all())


@FAST
@given(x=vectors())
def test_bf16_error_is_bfloat_relative(x: torch.Tensor) -> None:
    codec = BFloat16Codec()
    decoded = codec.decode(codec.encode(x), x.numel())
    assert bool(((decoded - x).abs() <= x.abs() * 2.0**-8).all())


@pytest.mark.parametrize(("bits", "block"), [(8, 16), (8, 64), (4, 16), (4, 32)])
@FAST
@given(x=vectors(), seed=st.integers(0, 1000))
def test_block_quantization_error_is_below_one_step_of_its_block(
    bits: int, block: int, x: torch.Tensor, seed: int
) -> None:
    codec = BlockQuantCodec(bits, block)
    decoded = codec.decode(codec.encode(x, gen(seed)), x.numel())
    n = x.numel()
    padded = torch.nn.functional.pad(x, (0, -n % block)).view(-1, block)
    step = (padded.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)).expand_as(padded)
    step = step.reshape(-1)[:n]
    assert bool(((decoded - x).abs() <= step * (1 + 1e-5)).all())
    # A zero input stays exactly zero: no noise is invented where there was nothing.
    assert bool((decoded[x == 0] == 0).all())


@pytest.mark.parametrize(
    "codec",
    [
        BlockQuantCodec(8, 16),
        BlockQuantCodec(4, 16),
        TopKCodec(1.0, value_bits=8),
        TopKCodec(1.0, chunk_size=16, value_bits=4),
    ],
    ids=["int8", "int4", "topk-q8", "topk-chunk16-q4"],
)
def test_stochastic_rounding_is_unbiased(codec: Codec) -> None:
    x = torch.randn(48, generator=gen(7))
    draws = 2000
    g = gen(11)
    total = torch.zeros_like(x)
    for _ in range(draws):
        total += codec.decode(codec.encode(x, g), x.numel())
    mean = total / draws
    # A decode is within one step of x, so its std is at most step / 2; allow 5 sigma.
    # Round-to-nearest would miss by up to half a step, about 10x this bound.
    bits = codec.bits if isinstance(codec, BlockQuantCodec) else getattr(codec, "value_bits", 8)
    levels = 7 if bits == 4 else 127
    step = x.abs().max() / levels
    assert float((mean - x).abs().max()) <= 5 * float(step) / (2 * math.sqrt(draws))


@FAST
@given(x=vectors(min_size=8), ratio=st.sampled_from([0.01, 0.05, 0.2, 0.5, 1.0]))
def test_topk_keeps_exactly_the_largest_magnitudes(x: torch.Tensor, ratio: float) -> None:
    codec = TopKCodec(ratio)
    decoded = codec.decode(codec.encode(x), x.numel())
    k = math.ceil(ratio * x.numel())
    kth_largest = float(torch.topk(x.abs(), k).values.min())
    # Kept values are sent exactly; whatever was dropped is no larger than what was kept.
    nonzero = decoded != 0
    assert bool((decoded[nonzero] == x[nonzero]).all())
    assert int(nonzero.sum()) <= k
    assert float(torch.cat([x[~nonzero].abs(), torch.zeros(1)]).max()) <= kth_largest


@pytest.mark.parametrize(
    ("numel", "ratio", "bitmap", "index_bytes"),
    [
        (1000, 0.01, False, 2),  # k=10: 20 index bytes < 125 bitmap bytes
        (1000, 0.1, True, 2),  # k=100: 200 index bytes > 125 bitmap bytes
        (1024, 1 / 16, False, 2),  # k=64: 128 bytes either way, indices on a tie
        (1024, 0.0625001, True, 2),  # k=65: 130 index bytes > 128 bitmap bytes
        (40000, 0.001, False, 4),  # past 32768 elements an index takes four bytes
    ],
)
def test_topk_picks_the_smaller_position_encoding(
    numel: int, ratio: float, bitmap: bool, index_bytes: int
) -> None:
    codec = TopKCodec(ratio)
    k = math.ceil(ratio * numel)
    assert codec.uses_bitmap(numel) is bitmap
    position_bytes = math.ceil(numel / 8) if bitmap else index_bytes * k
    assert codec.wire_bytes(numel) == 4 * k + position_bytes
    x = torch.randn(numel, generator=gen(3))
    decoded = codec.decode(codec.encode(x), numel)
    kept = torch.topk(x.abs(), k).indices
    assert torch.equal(decoded[kept], x[kept])
    assert int((decoded != 0).sum()) == k


@FAST
@given(
    x=vectors(min_size=8),
    chunk=st.sampled_from([8, 50, 64]),
    ratio=st.sampled_from([0.05, 0.2, 0.5]),
    bits=st.sampled_from([32, 8, 4]),
)
def test_chunked_topk_keeps_the_largest_of_every_chunk(
    x: torch.Tensor, chunk: int, ratio: float, bits: int
) -> None:
    codec = TopKCodec(ratio, chunk_size=chunk, value_bits=bits)
    decoded = codec.decode(codec.encode(x, gen(1)), x.numel())
    assert len(codec.encode(x, gen(1))) == _chunked_topk_bytes(x.numel(), ratio, chunk, bits)
    fp32 = TopKCodec(ratio, chunk_size=chunk)
    exact = fp32.decode(fp32.encode(x), x.numel())
    length = chunk if x.numel() > chunk else x.numel()
    k = math.ceil(ratio * length)
    for start in range(0, x.numel(), length):
        mine, sent = x[start : start + length], decoded[start : start + length]
        padded = torch.nn.functional.pad(mine.abs(), (0, length - len(mine)))
        kth_largest = float(torch.topk(padded, k).values.min())
        arrived = sent != 0
        assert int(arrived.sum()) <= k
        if bits == 32:  # the chunk's top k arrive exact, nothing larger stays behind
            assert torch.equal(sent[arrived], mine[arrived])
            assert float(torch.cat([mine[~arrived].abs(), torch.zeros(1)]).max()) <= kth_largest
        else:  # the same picks as fp32, each within one step of the chunk's scale
            assert not bool((arrived & (exact[start : start + length] == 0)).any())
            largest = int(mine.abs().argmax())  # its code is ±levels: it always arrives
            assert float(sent[largest]) * float(mine[largest]) > 0 or mine[largest] == 0
            step = float(padded.max()) / (7 if bits == 4 else 127)
            error = torch.cat([(sent - mine)[arrived].abs(), torch.zeros(1)])
            assert float(error.max()) <= step * (1 + 1e-5)


def test_make_codec_builds_the_configured_topk() -> None:
    config = CompressionConfig(codec="topk", ratio=1 / 32, chunk_size=4096, value_bits=4)
    codec = make_codec(config)
    assert isinstance(codec, TopKCodec)
    assert (codec.ratio, codec.chunk_size, codec.value_bits) == (1 / 32, 4096, 4)
    # 128 of every 4096 elements: 4-bit values, two-byte positions, a scale per chunk.
    assert codec.wire_bytes(8192) == 2 * 4 + 256 // 2 + 2 * 256


def test_error_feedback_decay_fades_the_residual() -> None:
    codec = TopKCodec(0.1)
    feedback = ErrorFeedback(codec, decay=0.5)
    g = gen(4)
    old = torch.zeros(100)
    for _ in range(3):
        x = torch.randn(100, generator=g)
        decoded = codec.decode(feedback.compress("grad", x), 100)
        new = feedback.residual("grad", x)
        torch.testing.assert_close(decoded + new, x + 0.5 * old)
        old = new.clone()


@pytest.mark.parametrize("label", sorted(FORMULAS))
def test_decode_accepts_a_misaligned_slice(label: str) -> None:
    """The exchange decodes payloads straight out of a shared receive buffer."""
    codec = FORMULAS[label][0]()
    x = torch.randn(37, generator=gen(5))
    payload = codec.encode(x, gen(6))
    buffer = torch.cat([torch.zeros(3, dtype=torch.uint8), payload])
    assert torch.equal(codec.decode(buffer[3:], 37), codec.decode(payload, 37))


LOSSY = [k for k in sorted(FORMULAS) if k != "none"]


@pytest.mark.parametrize("label", LOSSY)
@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 300))
def test_error_feedback_carries_exactly_what_the_payload_missed(
    label: str, seed: int, n: int
) -> None:
    codec = FORMULAS[label][0]()
    feedback = ErrorFeedback(codec)
    g = gen(seed)
    old = torch.zeros(n)  # a fresh instance starts from zero residual
    for _ in range(3):
        x = torch.randn(n, generator=g)
        payload = feedback.compress("grad", x, g)
        new = feedback.residual("grad", x)
        decoded = codec.decode(payload, n)
        torch.testing.assert_close(decoded + new, x + old, rtol=1e-5, atol=1e-5)
        old = new.clone()
    feedback.reset()
    assert not bool(feedback.residual("grad", old).any())


def test_error_feedback_sum_tracks_the_sum_of_inputs() -> None:
    """Top-k at 1% drops 99% of each input, yet the running sums stay one residual apart."""
    codec = TopKCodec(0.01)
    feedback = ErrorFeedback(codec)
    g = gen(9)
    sent = torch.zeros(500)
    given_ = torch.zeros(500)
    for _ in range(200):
        x = torch.randn(500, generator=g)
        given_ += x
        sent += codec.decode(feedback.compress("grad", x), 500)
    residual = feedback.residual("grad", sent)
    torch.testing.assert_close(sent + residual, given_, rtol=1e-4, atol=1e-3)
    # Without feedback, the sent sum would hold only the top 1% of each step.
    assert float((sent - given_).norm()) < 0.5 * float(given_.norm())


def test_error_feedback_rejects_a_residual_of_another_shape() -> None:
    feedback = ErrorFeedback(BlockQuantCodec(8, 16))
    feedback.compress("grad", torch.randn(10))
    with pytest.raises(ValueError, match="reset"):
        feedback.compress("grad", torch.randn(11))


@FAST
@given(numel=st.integers(1, 100_000))
def test_powersgd_matrix_is_near_square_and_holds_everything(numel: int) -> None:
    rows, cols = matrix_shape(numel)
    assert rows * cols >= numel
    assert rows * (cols - 1) < numel  # no wasted column
    assert 0 <= rows - cols <= 1


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(16, 900), rank=st.integers(1, 4))
def test_powersgd_recovers_a_low_rank_gradient_in_one_step(seed: int, n: int, rank: int) -> None:
    rows, cols = matrix_shape(n)
    g = gen(seed)
    low_rank = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    # Cutting to n elements zeroes part of the last row: at most one more rank.
    x = low_rank.reshape(-1)[:n].clone()
    # At most rank + 1 after the cut; one spare column on top keeps P = M Q well enough
    # conditioned for float32 (with none spare, seed 1419, n 477, rank 4 missed the bound).
    psgd = PowerSGD(rank=rank + 2, error_feedback=False)
    decoded = psgd.compress_locally(x)
    # A random Q of rank + 2 columns spans the whole column space: one step is exact.
    torch.testing.assert_close(decoded, x, rtol=1e-3, atol=1e-3 * float(x.abs().max()))


@FAST
@given(x=vectors(min_size=4, max_size=400), rank=st.integers(1, 3))
def test_powersgd_is_a_projection_and_feeds_back_its_error(x: torch.Tensor, rank: int) -> None:
    psgd = PowerSGD(rank=rank)
    decoded = psgd.compress_locally(x)
    assert float(decoded.norm()) <= float(x.norm()) * (1 + 1e-4)
    assert psgd.residual is not None
    torch.testing.assert_close(
        decoded + psgd.residual, x, rtol=1e-4, atol=1e-5 * float(x.abs().max())
    )
    second = torch.randn(x.numel(), generator=gen(1)) * float(x.abs().max())
    old = psgd.residual.clone()
    decoded = psgd.compress_locally(second)
    torch.testing.assert_close(
        decoded + psgd.residual, second + old, rtol=1e-4, atol=1e-4 * float(second.abs().max())
    )


def test_powersgd_plans_one_block_per_matrix_and_merges_the_rest() -> None:
    shapes = [(64, 32), (32,), (8,), (16, 3, 3, 3), (2, 100), (50,)]
    blocks = plan_blocks(2048 + 32 + 8 + 432 + 200 + 50, 4, shapes)
    assert [(b.start, b.numel, b.rows, b.cols, b.rank) for b in blocks] == [
        (0, 2048, 64, 32, 4),
        (2048, 40, 0, 0, 0),  # the two vectors, one plain block
        (2088, 432, 16, 27, 4),  # a conv kernel: out channels x the rest
        (2520, 250, 0, 0, 0),  # 2 x 100 gains nothing from rank 2 factors: plain
    ]
    with pytest.raises(ValueError, match="shapes holding 2048 elements for a gradient of 2049"):
        plan_blocks(2049, 4, [(64, 32)])


@FAST
@given(seed=st.integers(0, 2**31 - 1), rank=st.integers(1, 3))
def test_powersgd_per_layer_is_exact_on_low_rank_layers(seed: int, rank: int) -> None:
    g = gen(seed)
    shapes = [(30, 20), (20,), (12, 40)]
    parts = [
        (torch.randn(30, rank, generator=g) @ torch.randn(rank, 20, generator=g)).reshape(-1),
        torch.randn(20, generator=g),
        (torch.randn(12, rank, generator=g) @ torch.randn(rank, 40, generator=g)).reshape(-1),
    ]
    x = torch.cat(parts)
    # One spare column, as in the single-matrix test: with exactly `rank` random columns
    # P = M Q can be ill-conditioned enough for float32 to miss the bound (seed 1468).
    r = rank + 1
    psgd = PowerSGD(rank=r, error_feedback=True, shapes=shapes)
    assert psgd.wire_elements(x.numel()) == (30 + 20) * r + 20 + (12 + 40) * r
    decoded = psgd.compress_locally(x)
    torch.testing.assert_close(decoded, x, rtol=1e-3, atol=1e-3 * float(x.abs().max()))
    assert psgd.residual is not None
    torch.testing.assert_close(decoded + psgd.residual, x, rtol=1e-4, atol=1e-5)


def test_powersgd_cold_start_is_the_same_everywhere() -> None:
    a = PowerSGD(rank=2, seed=5).initial_query(1000, torch.device("cpu"))
    b = PowerSGD(rank=2, seed=5).initial_query(1000, torch.device("cpu"))
    c = PowerSGD(rank=2, seed=6).initial_query(1000, torch.device("cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("none", NoneCodec),
        ("fp16", Float16Codec),
        ("bf16", BFloat16Codec),
        ("int8", BlockQuantCodec),
        ("int4", BlockQuantCodec),
        ("topk", TopKCodec),
    ],
)
def test_make_codec_follows_the_config(name: str, kind: type[Codec]) -> None:
    codec = make_codec(CompressionConfig(codec=name, block_size=32, ratio=0.1))  # type: ignore[arg-type]
    assert isinstance(codec, kind) and codec.name == name


def test_make_codec_points_powersgd_elsewhere() -> None:
    with pytest.raises(ValueError, match="PowerSGD"):
        make_codec(CompressionConfig(codec="powersgd"))


def test_all_gather_with_powersgd_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"all_gather \(allGather in a job.s spec\) does not"):
        CompressionConfig(codec="powersgd", all_gather=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("label", sorted(FORMULAS))
def test_codecs_run_on_cuda_and_match_cpu_sizes(label: str) -> None:
    codec = FORMULAS[label][0]()
    x = torch.randn(1000, generator=gen(2)).cuda()
    payload = codec.encode(x, torch.Generator(device="cuda").manual_seed(0))
    assert payload.device == x.device and payload.numel() == codec.wire_bytes(1000)
    decoded = codec.decode(payload, 1000)
    assert decoded.device == x.device
    assert float((decoded - x).abs().max()) <= float(x.abs().max())
