"""Routing metadata (``build_routing``): the counting-sort kernels, per expert and in chunks
(Triton's interpreter), and the torch sort path give the same offsets and the same stable slot
order, checked against a plain Python bucket sort, with poisoned outputs."""

from __future__ import annotations

import pytest
import torch

from moe_tune.ops import routing as routing_mod
from moe_tune.ops.routing import build_routing

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests")


def python_routing(ids: torch.Tensor, E: int):
    flat = ids.flatten().tolist()
    buckets = [[s for s, e in enumerate(flat) if e == x] for x in range(E)]
    offsets = [0]
    for b in buckets:
        offsets.append(offsets[-1] + len(b))
    return offsets, [s for b in buckets for s in b]


# name, T, k, E, id dtype
CASES = [
    ("one-token", 1, 2, 8, torch.int64),  # most experts empty
    ("one-expert", 5, 1, 1, torch.int64),  # E=1: every slot on expert 0
    ("one-chunk-padded", 700, 3, 6, torch.int32),  # 2100 ids in one 4096-id chunk, int32 ids
    ("two-chunks", 4500, 4, 6, torch.int64),  # 18000 ids: two 16384-id chunks, the second ragged
    ("empty", 0, 2, 4, torch.int64),  # no tokens: offsets all zero
    ("chunks-many-experts", 700, 4, 300, torch.int32),  # 2800 ids in six 512-id chunks, E_POW2 512
]
METHODS = ["kernel", "chunks", "sort"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name, T, k, E, dtype", CASES, ids=[c[0] for c in CASES])
def test_routing_matches_bucket_sort(name, T, k, E, dtype, method, monkeypatch):
    if method == "chunks" and T * k > 4096:
        pytest.skip("the interpreter sorts a 512-id chunk in seconds; the smaller cases cover ragged chunks")
    real_empty = torch.empty
    monkeypatch.setattr(routing_mod.torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(-7))
    ids = (torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.zeros(0, k)).to(dtype)
    r = build_routing(ids, E, method=method)
    offsets, slots = python_routing(ids, E)
    assert r.expert_offsets.dtype == torch.int32 and r.sorted_slots.dtype == torch.int32
    assert r.expert_offsets.tolist() == offsets
    assert r.sorted_slots.tolist() == slots


@pytest.mark.parametrize("num_ids, experts, method", [(1, 128, "kernel"), (16384, 128, "kernel"),
                                                      (16385, 128, "chunks"), (4096, 512, "kernel"),
                                                      (4097, 512, "chunks")])
def test_default_method_by_ids_and_work(num_ids, experts, method, monkeypatch):
    """Up to KERNEL_MAX_IDS ids and KERNEL_MAX_WORK ids × experts, one launch; above, the chunks."""
    from moe_tune.kernels import routing as kernels
    from moe_tune.ops import launch

    seen = []  # (the launches are recorded, not run)
    monkeypatch.setattr(launch, "launch_kernel", lambda kernel, *args: seen.append(kernel))
    build_routing(torch.zeros(num_ids, 1, dtype=torch.int32), experts)
    assert seen == ([kernels.routing_kernel] if method == "kernel"
                    else [kernels.routing_count_kernel, kernels.routing_place_kernel])


@pytest.mark.parametrize("num_ids, experts, chunk", [
    (1, 128, 512), (65536, 512, 512), (65537, 128, 1024), (163840, 512, 1024), (196608, 64, 512),
    (262144, 64, 512), (262144, 128, 1024), (262145, 64, 2048), (10**7, 128, 2048),
])
def test_chunk_sizes_follow_the_measured_rule(num_ids, experts, chunk):
    count, place = routing_mod._chunks_launch(num_ids, experts)
    assert count["CHUNK"] == place["CHUNK"] == chunk
    assert place["COUNT_ROWS"] * place["E_POW2"] == 4096


@pytest.mark.parametrize("num_ids, block", [(1, 1024), (1024, 1024), (1025, 2048), (32768, 16384), (10**6, 16384)])
def test_routing_chunk_covers_the_ids_up_to_16384(num_ids, block):
    """The kernel's chunk: the id count rounded up to a power of two, within [1024, 16384]."""
    assert routing_mod._routing_launch(num_ids) == dict(BLOCK=block, num_warps=8)


@pytest.mark.parametrize("method", ["kernel", "chunks"])
def test_skewed_routing_kernel(method):
    # 90% of slots on one expert: a long run for one program (or for every chunk), short ones for the rest
    T, k, E = 1400, 2, 7
    ids = torch.where(torch.rand(T, k) < 0.9, torch.zeros(T, k, dtype=torch.long), torch.randint(1, E, (T, k)))
    r = build_routing(ids, E, method=method)
    offsets, slots = python_routing(ids, E)
    assert r.expert_offsets.tolist() == offsets and r.sorted_slots.tolist() == slots


@pytest.mark.parametrize("method", ["kernel", "sort"])  # the table reads the offsets alone
@pytest.mark.parametrize("name, T, k, E, dtype", CASES + [("many-experts", 90, 4, 300, torch.int64)],
                         ids=[c[0] for c in CASES] + ["many-experts"])
@pytest.mark.parametrize("block_m", [1, 4, 64])
def test_row_block_table_lists_every_block(name, T, k, E, dtype, method, block_m, monkeypatch):
    # The warp-specialised GEMM's table: the count, then (expert, first row) per block of
    # block_m rows, experts in order; memory past the count is never read, so it stays poisoned.
    real_empty = torch.empty
    monkeypatch.setattr(routing_mod.torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(-7))
    ids = (torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.zeros(0, k)).to(dtype)
    r = build_routing(ids, E, method=method)
    offsets, _ = python_routing(ids, E)
    expected = [(e, row) for e in range(E) for row in range(offsets[e], offsets[e + 1], block_m)]
    table = r.block_table(block_m)
    assert table.dtype == torch.int32 and table.numel() == 1 + 2 * (T * k // block_m + E)
    assert int(table[0]) == len(expected)
    assert table[1:1 + 2 * len(expected)].view(-1, 2).tolist() == [list(p) for p in expected]
    assert (table[1 + 2 * len(expected):] == -7).all()
    assert r.block_table(block_m) is table  # built once per routing and BLOCK_M
