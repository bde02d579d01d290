"""The routing build on a CUDA GPU at sizes the interpreter cannot reach: the per-expert kernel
and the chunked one give exactly the sort path's offsets and stable slot order, into poisoned
outputs, for balanced, skewed and one-expert routings of up to 163840 ids.

Run: ``python -m pytest -m gpu tests/ops/test_routing_gpu.py -q``.
"""

from __future__ import annotations

import pytest
import torch

from moe_tune.ops import routing as routing_mod
from moe_tune.ops.routing import build_routing, random_routing

pytestmark = pytest.mark.gpu

# name, T, E, k, skew
CASES = [
    ("qwen3-30b-a3b-4096", 4096, 128, 8, 0.0),
    ("qwen3-30b-a3b-16384", 16384, 128, 8, 0.0),
    ("qwen3-next-16384", 16384, 512, 10, 0.0),  # E_POW2 512, 160 chunks of 1024
    ("skewed", 9000, 64, 6, 3.0),  # most rows on a few experts, a ragged last chunk
    ("gpt-oss-odd-tokens", 12345, 32, 4, 0.0),
    ("one-expert", 20000, 1, 1, 0.0),
]


@pytest.mark.parametrize("method", ["kernel", "chunks"])
@pytest.mark.parametrize("name,T,E,k,skew", CASES, ids=[c[0] for c in CASES])
def test_kernels_match_the_sort_path(name, T, E, k, skew, method, monkeypatch):
    index = random_routing(T, E, k, device="cuda", skew=skew)
    if name == "one-expert":
        index = torch.zeros(T, k, dtype=torch.int32, device="cuda")
    ref = build_routing(index, E, method="sort")
    real_empty = torch.empty
    monkeypatch.setattr(routing_mod.torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(-7))
    r = build_routing(index, E, method=method)
    assert torch.equal(r.expert_offsets, ref.expert_offsets)
    assert torch.equal(r.sorted_slots, ref.sorted_slots)
