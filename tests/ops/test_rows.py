"""The row kernels around the grouped GEMMs (``moe_tune.ops.rows``) against float64 references,
in Triton's interpreter: fresh random inputs, NaN-poisoned outputs."""

from __future__ import annotations

import pytest
import torch

from moe_tune.ops import rows

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests; GPU has its own")

# dtype: relative bound of the slot sum (float32 accumulation, one rounding to the dtype)
TOLERANCES = {torch.float16: 1e-3, torch.float32: 1e-6}

# name, T, k, W, tile (elements, widest chunk, warps)
SUM_CASES = [
    ("one-token-one-slot", 1, 1, 16, rows.ROWS_TILE),  # T=1, k=1: a copy
    ("ragged-width", 7, 3, 33, rows.ROWS_TILE),  # W not a multiple of 16: masked columns
    ("qwen-k", 5, 8, 64, rows.ROWS_TILE),  # k=8 as Qwen3-30B-A3B
    ("wide-rows", 3, 2, 1000, (256, 128, 4)),  # W over the chunk: several column programs
    ("tokens-over-block", 37, 4, 24, (128, 32, 4)),  # T over BLOCK_T: ragged last token block
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("name,T,k,W,tile", SUM_CASES, ids=[c[0] for c in SUM_CASES])
@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
def test_slot_sum_matches_float64(name, T, k, W, tile, dtype, accumulate):
    slot_rows = torch.randn(T * k, W).to(dtype)
    start = torch.randn(T, W).to(dtype)
    out = start.clone() if accumulate else torch.full((T, W), float("nan"), dtype=dtype)
    result = rows.slot_sum(slot_rows, k, out, accumulate=accumulate, tile=tile)
    assert result is out
    ref = slot_rows.double().view(T, k, W).sum(1) + (start.double() if accumulate else 0)
    assert torch.isfinite(out).all()
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < TOLERANCES[dtype], err


def test_slot_sum_of_no_tokens_returns_empty():
    assert rows.slot_sum(torch.empty(0, 8), 4).shape == (0, 8)


# name, source rows S, destination rows R, W, div, tile
GATHER_CASES = [
    ("one-row", 1, 1, 16, 1, rows.ROWS_TILE),
    ("expert-order-k8", 6, 48, 40, 8, rows.ROWS_TILE),  # every token's row eight times
    ("wide-rows", 4, 9, 700, 2, (256, 128, 4)),  # several column programs, ragged last one
    ("rows-over-block", 20, 61, 24, 3, (128, 32, 4)),  # R over BLOCK_R: ragged last row block
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name,S,R,W,div,tile", GATHER_CASES, ids=[c[0] for c in GATHER_CASES])
def test_gather_rows_copies_exactly(name, S, R, W, div, tile, dtype):
    src = torch.randn(S, W).to(dtype)
    slots = torch.randperm(S * div)[:R].to(torch.int32) if R <= S * div else torch.randint(0, S * div, (R,), dtype=torch.int32)
    out = torch.full((R, W), float("nan"), dtype=dtype)
    rows.gather_rows(src, slots, div, out, tile=tile)
    assert torch.equal(out, src[slots.long() // div])


def test_gather_rows_reads_an_expanded_source():
    """An output gradient can arrive expanded (``loss = out.sum()``: every stride 0)."""
    grad = torch.randn(1, 1).expand(5, 24)
    slots = torch.randint(0, 10, (13,), dtype=torch.int32)
    assert torch.equal(rows.gather_rows(grad, slots, 2), grad.contiguous()[slots.long() // 2])


def test_gather_rows_of_no_rows_returns_empty():
    assert rows.gather_rows(torch.randn(3, 8), torch.empty(0, dtype=torch.int32), 1).shape == (0, 8)


# name, shapes and dtypes of the (source, destination) pairs, tile (elements, warps)
COPY_CASES = [
    ("graph-inputs", [((7, 24), torch.float16), ((7, 3), torch.int64), ((7, 3), torch.float32)], rows.COPY_TILE),
    ("ragged-blocks", [((5, 33), torch.float32), ((5, 2), torch.int32), ((1, 1), torch.float16)], (64, 4)),
    ("two-pairs", [((9, 40), torch.bfloat16), ((9, 4), torch.float16)], (128, 4)),
    ("one-pair", [((3, 50), torch.float16)], (32, 4)),
]


def _random(shape, dtype):
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(-2**30, 2**30, shape, dtype=dtype)


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan") if dtype.is_floating_point else -7, dtype=dtype)


@pytest.mark.parametrize("bind", ["sources", "destinations"])
@pytest.mark.parametrize("name,pairs,tile", COPY_CASES, ids=[c[0] for c in COPY_CASES])
def test_bound_copies_copy_every_element_each_call(name, pairs, tile, bind):
    # rows.bind_copies: one launch for up to three copies, the bound side fixed, the other new
    # each call (a graphed block's inputs in, its input gradients out).
    bound_side = [_poisoned(shape, dtype) for shape, dtype in pairs]
    placeholders = [torch.empty(shape, dtype=dtype) for shape, dtype in pairs]
    if bind == "sources":
        copy = rows.bind_copies(tuple(placeholders), tuple(bound_side), bind, tile)
    else:
        copy = rows.bind_copies(tuple(bound_side), tuple(placeholders), bind, tile)
    for _ in range(2):
        fresh = [_random(shape, dtype) if bind == "sources" else _poisoned(shape, dtype) for shape, dtype in pairs]
        if bind == "destinations":
            for t, (shape, dtype) in zip(bound_side, pairs):
                t.copy_(_random(shape, dtype))
        copy(*fresh)
        for src, dst in (zip(fresh, bound_side) if bind == "sources" else zip(bound_side, fresh)):
            assert torch.equal(dst, src)


def test_bind_copies_refuses_more_than_three_pairs_or_an_unknown_side():
    t = torch.empty(2)
    with pytest.raises(ValueError, match="one to three"):
        rows.bind_copies((t,) * 4, (t,) * 4, "sources")
    with pytest.raises(ValueError, match="bind must be"):
        rows.bind_copies((t,), (t,), "both")
