"""Grouped-GEMM kernels against the float64 references, in Triton's CPU interpreter.

Every case draws fresh random inputs and routing, poisons the output with NaN before the launch
(an element the kernel forgets to write fails), and compares ‖out − ref‖ / ‖ref‖.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from moe_tune.errors import ConfigError, InvalidInputError
from moe_tune.ops import grouped_gemm as gg
from moe_tune.ops.routing import build_routing, random_routing
from moe_tune.problem import KernelConfig
from moe_tune.reference import reference_dw, reference_dx, reference_forward, relative_error

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests; GPU has its own")

# dtype, relative-error bound (outputs are rounded to the dtype; fp32 dots are exact in the interpreter)
TOLERANCES = {torch.float16: 2e-3, torch.float32: 1e-5}

PLAIN = KernelConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)
TMA = KernelConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1, TMA_LOAD=True)
TMA_ALL = dataclasses.replace(TMA, TMA_STORE=True)

# gather, scatter, weighted: the two GEMMs of an MoE layer plus every other combination
FLAGS = [
    (True, False, False),  # up (gate_up): token-order input
    (False, True, True),  # down: slot-order output times routing weight
    (False, False, False),  # both sides in expert order
    (True, True, False),
    (True, False, True),
    (False, True, False),
    (False, False, True),
    (True, True, True),
]


def make_routing(num_tokens, num_experts, topk, mode="random"):
    if mode == "random":
        idx = random_routing(num_tokens, num_experts, topk)
    elif mode == "skewed":  # leaves most experts empty, one or two crowded
        idx = random_routing(num_tokens, num_experts, topk, skew=6.0)
    elif mode == "subset":  # experts 0 and E-1 get nothing
        inner = torch.stack([torch.randperm(num_experts - 2)[:topk] + 1 for _ in range(num_tokens)])
        idx = inner
    elif mode == "one":  # every row on one expert (topk == 1)
        idx = torch.full((num_tokens, topk), int(torch.randint(num_experts, ())), dtype=torch.long)
    else:
        raise AssertionError(mode)
    return build_routing(idx, num_experts)


def make_inputs(T, E, N, K, topk, dtype, gather, scatter, weighted, mode="random"):
    routing = make_routing(T, E, topk, mode)
    M = T * topk
    x = torch.randn(T if gather else M, K, dtype=dtype)
    w = (torch.randn(E, N, K) / K**0.5).to(dtype)
    dy = torch.randn(M, N, dtype=dtype)
    weights = torch.rand(M, dtype=torch.float32) if weighted else None
    return routing, x, w, dy, weights


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def run_three_passes(cfg, T, E, N, K, topk, dtype, flags, mode="random", dx_cfg=None):
    gather, scatter, weighted = flags
    routing, x, w, dy, weights = make_inputs(T, E, N, K, topk, dtype, gather, scatter, weighted, mode)
    tol = TOLERANCES[dtype]
    M = T * topk
    kw = dict(gather=gather, scatter=scatter, weights=weights)

    y = gg.forward(x, w, routing, config=cfg, out=nan_like((M, N), dtype), **kw)
    assert relative_error(y, reference_forward(x, w, routing, **kw)) < tol

    dx = gg.backward_dx(dy, w, routing, config=dx_cfg or cfg, out=nan_like((M, K), dtype), **kw)
    assert relative_error(dx, reference_dx(dy, w, routing, **kw)) < tol

    dw = gg.backward_dw(dy, x, w.shape, routing, config=cfg, out=nan_like(w.shape, dtype), **kw)
    assert relative_error(dw, reference_dw(dy, x, routing, **kw)) < tol


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "gather{:d}-scatter{:d}-weighted{:d}".format(*f))
def test_every_flag_combination(flags):
    # N, K not multiples of the 16-wide blocks: exercises the column and reduction masks.
    run_three_passes(PLAIN, T=23, E=5, N=40, K=24, topk=2, dtype=torch.float16, flags=flags)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("flags", FLAGS[:2], ids=["up", "down"])
def test_tma_loads(dtype, flags):
    run_three_passes(TMA, T=19, E=4, N=64, K=48, topk=2, dtype=dtype, flags=flags)


def test_tma_store_where_rows_are_contiguous():
    # Forward output in expert order and dW go through the TMA store; dx of a gathered input is
    # scattered, so it needs a config without it.
    run_three_passes(TMA_ALL, T=21, E=4, N=64, K=32, topk=2, dtype=torch.float16,
                     flags=(False, False, True), dx_cfg=TMA_ALL)
    run_three_passes(TMA_ALL, T=21, E=4, N=64, K=32, topk=2, dtype=torch.float16,
                     flags=(True, False, False), dx_cfg=TMA)


@pytest.mark.parametrize(
    "T, E, topk, mode, cfg",
    [
        (1, 4, 2, "random", PLAIN),  # T = 1: two rows in all
        (1, 8, 1, "random", TMA),  # a single routed row
        (40, 6, 2, "subset", PLAIN),  # empty experts (first and last): dW must be zero there
        (30, 4, 1, "one", PLAIN),  # every row on one expert, others empty
        (30, 4, 1, "one", TMA_ALL),
        (9, 8, 2, "random", KernelConfig(64, 16, 16, num_stages=1)),  # experts far below BLOCK_M
        (64, 16, 4, "skewed", TMA),  # Zipf-like router: crowded and empty experts together
    ],
    ids=["T1", "T1-one-row", "empty-experts", "one-expert", "one-expert-tma", "rows<BLOCK_M", "skewed"],
)
@pytest.mark.parametrize("flags", FLAGS[:2], ids=["up", "down"])
def test_edge_cases(T, E, topk, mode, cfg, flags):
    if cfg.TMA_STORE and flags[1]:
        cfg_fwd = dataclasses.replace(cfg, TMA_STORE=False)
    else:
        cfg_fwd = cfg
    dx_cfg = dataclasses.replace(cfg, TMA_STORE=False)
    run_three_passes(cfg_fwd, T=T, E=E, N=32, K=32, topk=topk, dtype=torch.float32, flags=flags, mode=mode,
                     dx_cfg=dx_cfg)


@pytest.mark.parametrize("programs", [2, 3])
@pytest.mark.parametrize("mode", ["random", "subset"])
@pytest.mark.parametrize("flags", FLAGS[:2], ids=["up", "down"])
def test_several_programs_per_sm_cover_every_tile_once(programs, mode, flags):
    # A grid of PROGRAMS_PER_SM × SMs programs strides the tiles by that count: every tile is
    # written (NaN-poisoned outputs), including where the grid outnumbers the tiles.
    cfg = dataclasses.replace(PLAIN, PROGRAMS_PER_SM=programs)
    run_three_passes(cfg, T=random.randint(20, 48), E=6, N=40, K=24, topk=2, dtype=torch.float32, flags=flags,
                     mode=mode)
    tma = dataclasses.replace(TMA, PROGRAMS_PER_SM=programs)
    run_three_passes(tma, T=random.randint(20, 48), E=4, N=64, K=32, topk=2, dtype=torch.float16, flags=flags,
                     mode=mode)


def test_empty_expert_weight_gradient_is_zero_not_garbage():
    routing, x, w, dy, _ = make_inputs(12, 5, 32, 16, 2, torch.float32, True, False, False, "subset")
    dw = gg.backward_dw(dy, x, w.shape, routing, gather=True, config=PLAIN, out=nan_like(w.shape, torch.float32))
    assert torch.equal(dw[0], torch.zeros_like(dw[0]))
    assert torch.equal(dw[-1], torch.zeros_like(dw[-1]))


def test_no_rows_at_all():
    routing = build_routing(torch.empty(0, 2, dtype=torch.long), 4)
    w = torch.randn(4, 16, 16, dtype=torch.float16)
    y = gg.forward(torch.empty(0, 16, dtype=torch.float16), w, routing, gather=True, config=PLAIN)
    assert y.shape == (0, 16)
    dw = gg.backward_dw(torch.empty(0, 16, dtype=torch.float16), torch.empty(0, 16, dtype=torch.float16),
                        w.shape, routing, gather=True, config=PLAIN)
    assert torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("flags", [(True, False, True), (False, True, True)], ids=["up", "down"])
@pytest.mark.parametrize("weights_need_grad", [False, True])
def test_autograd_matches_reference_gradients(flags, weights_need_grad):
    gather, scatter, weighted = flags
    T, E, N, K, topk = 17, 4, 32, 24, 2
    routing, x, w, dy, weights = make_inputs(T, E, N, K, topk, torch.float32, gather, scatter, weighted)
    x.requires_grad_(True)
    w.requires_grad_(True)
    weights.requires_grad_(weights_need_grad)
    y = gg.grouped_gemm(x, w, routing, gather=gather, scatter=scatter, routing_weights=weights,
                        configs={"forward": PLAIN, "dx": PLAIN, "dw": TMA})
    y.backward(dy)

    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    weights64 = weights.detach().double().requires_grad_(weights_need_grad)
    ref = reference_forward(x64, w64, routing, gather=gather, scatter=scatter, weights=weights64)
    ref.backward(dy.double())

    assert relative_error(y.detach(), ref.detach()) < 1e-5
    assert relative_error(x.grad, x64.grad) < 1e-5
    assert relative_error(w.grad, w64.grad) < 1e-5
    if weights_need_grad:
        assert relative_error(weights.grad, weights64.grad) < 1e-5
    else:
        assert weights.grad is None


def test_default_config_is_used_when_none_given():
    # The heuristic default (interpreter: 32-wide tiles) must produce correct results too.
    run_three_passes(None, T=13, E=3, N=48, K=40, topk=2, dtype=torch.float16, flags=(True, False, False))


# ------------------------------------------------------------------------------------------------
# Bad input: a clear ValueError, never a Triton stack trace
# ------------------------------------------------------------------------------------------------


def _good():
    routing, x, w, dy, weights = make_inputs(8, 4, 16, 16, 2, torch.float16, True, False, True)
    return routing, x, w, weights


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r, x, w, wt: (r, x[:, :8], w, wt), "x must have shape"),
        (lambda r, x, w, wt: (r, x.float(), w, wt), "x must be torch.float16"),
        (lambda r, x, w, wt: (r, x, w[:, :, :8], wt), "must be contiguous"),
        (lambda r, x, w, wt: (r, x, w.double(), wt), "w must be bfloat16, float16 or float32"),
        (lambda r, x, w, wt: (r, x, w[0], wt), "w must be a [E, N, K] tensor"),
        (lambda r, x, w, wt: (r, x, w, wt[:3]), "weights must have shape"),
        (lambda r, x, w, wt: (dataclasses.replace(r, expert_offsets=r.expert_offsets.long()), x, w, wt),
         "expert_offsets must be torch.int32"),
        (lambda r, x, w, wt: (dataclasses.replace(r, expert_offsets=r.expert_offsets[:-1]), x, w, wt),
         "routing covers 3 experts"),
        (lambda r, x, w, wt: (dataclasses.replace(r, sorted_slots=r.sorted_slots + 100), x, w, wt),
         "sorted_slots must hold slot ids"),
        (lambda r, x, w, wt: (dataclasses.replace(r, expert_offsets=r.expert_offsets.flip(0).contiguous()), x, w, wt),
         "expert_offsets must rise"),
    ],
    ids=["x-shape", "x-dtype", "w-noncontiguous", "w-dtype", "w-rank", "weights-shape", "offsets-dtype",
         "offsets-length", "slots-range", "offsets-order"],
)
def test_bad_input_raises_value_error(mutate, message):
    routing, x, w, weights = mutate(*_good())
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        gg.forward(x, w, routing, gather=True, weights=weights, config=PLAIN)
    assert isinstance(info.value, InvalidInputError)


def test_illegal_config_is_a_config_error():
    routing, x, w, weights = _good()
    too_big = KernelConfig(256, 256, 256, num_stages=8)
    with pytest.raises(ConfigError, match="shared memory"):
        gg.forward(x, w, routing, gather=True, config=too_big)
    scattered_tma_store = dataclasses.replace(TMA, TMA_STORE=True)
    with pytest.raises(ConfigError, match="TMA_STORE cannot write scattered rows"):
        gg.forward(x, w, routing, gather=True, scatter=True, config=scattered_tma_store)
    with pytest.raises(InvalidInputError, match="config must be a KernelConfig"):
        gg.forward(x, w, routing, gather=True, config={"BLOCK_M": 16})


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "gather{:d}-scatter{:d}-weighted{:d}".format(*f))
def test_gather_copy_dw(flags):
    # GATHER_COPY re-lays the gathered operand(s) out in expert order before the dW kernel; with
    # nothing gathered the config is refused rather than silently ignored.
    gather, scatter, weighted = flags
    cfg = dataclasses.replace(TMA_ALL, GATHER_COPY=True)
    routing, x, w, dy, weights = make_inputs(21, 5, 48, 32, 2, torch.float16, gather, scatter, weighted, "subset")
    kw = dict(gather=gather, scatter=scatter, weights=weights)
    if not (gather or scatter):
        with pytest.raises(ConfigError, match="GATHER_COPY applies to a gathered operand"):
            gg.backward_dw(dy, x, w.shape, routing, config=cfg, **kw)
        return
    dw = gg.backward_dw(dy, x, w.shape, routing, config=cfg, out=nan_like(w.shape, torch.float16), **kw)
    assert relative_error(dw, reference_dw(dy, x, routing, **kw)) < TOLERANCES[torch.float16]


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "gather{:d}-scatter{:d}-weighted{:d}".format(*f))
@pytest.mark.parametrize("mode, T, E, topk", [("subset", 21, 5, 2), ("one", 12, 4, 1), ("random", 1, 3, 1)],
                         ids=["empty-experts", "one-expert", "one-row"])
def test_gather_copy_forward_and_dx(flags, mode, T, E, topk):
    # A forward or dx whose A rows are gathered may copy them to expert order first (the kernel then
    # reads A through TMA); with A already in expert order the config is refused, not ignored.
    gather, scatter, weighted = flags
    dtype = torch.float16
    routing, x, w, dy, weights = make_inputs(T, E, 48, 40, topk, dtype, gather, scatter, weighted, mode)
    kw = dict(gather=gather, scatter=scatter, weights=weights)
    M = T * topk
    for cfg in (dataclasses.replace(TMA, GATHER_COPY=True), dataclasses.replace(PLAIN, GATHER_COPY=True)):
        if gather:
            y = gg.forward(x, w, routing, config=cfg, out=nan_like((M, 48), dtype), **kw)
            assert relative_error(y, reference_forward(x, w, routing, **kw)) < TOLERANCES[dtype]
        else:
            with pytest.raises(ConfigError, match="GATHER_COPY applies to a gathered operand"):
                gg.forward(x, w, routing, config=cfg, **kw)
        if scatter:  # dx gathers dY's slot rows where the forward scattered
            dx = gg.backward_dx(dy, w, routing, config=cfg, out=nan_like((M, 40), dtype), **kw)
            assert relative_error(dx, reference_dx(dy, w, routing, **kw)) < TOLERANCES[dtype]
        else:
            with pytest.raises(ConfigError, match="GATHER_COPY applies to a gathered operand"):
                gg.backward_dx(dy, w, routing, config=cfg, **kw)


def test_routing_weight_gradient_uses_the_weighted_problems_config(monkeypatch):
    # With weights that need a gradient the forward runs unweighted; it must still look up the
    # weighted problem (the one the sweep tunes), or it would always miss the cache.
    from moe_tune import runtime

    asked = []
    real = runtime.get_config

    def recording(problem, num_tokens, device=None):
        asked.append(problem)
        return real(problem, num_tokens, device=device)

    monkeypatch.setattr(runtime, "get_config", recording)
    routing, x, w, dy, weights = make_inputs(9, 4, 32, 16, 2, torch.float32, False, True, True)
    weights.requires_grad_(True)
    gg.grouped_gemm(x, w, routing, scatter=True, routing_weights=weights)
    forward_problems = [p for p in asked if p.pass_ == "forward"]
    assert forward_problems and all(p.weighted for p in forward_problems)


def test_relative_error_in_chunks_matches_the_whole_tensor_formula(monkeypatch):
    """``relative_error`` sums squares a chunk at a time (a float64 copy of a large dW ran a GPU
    out of memory): the same number as the one-pass formula, NaN or inf anywhere gives inf."""
    from moe_tune.reference import grouped_mm as ref_mod

    monkeypatch.setattr(ref_mod, "RELATIVE_ERROR_CHUNK", 7)  # several chunks and a ragged last one
    ref = torch.randn(5, 9, 4, dtype=torch.float64)
    out = (ref + 1e-3 * torch.randn_like(ref)).to(torch.float32)
    whole = ((out.double() - ref).norm() / ref.norm()).item()
    assert ref_mod.relative_error(out, ref) == pytest.approx(whole, rel=1e-12)
    assert ref_mod.relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
    for bad in (float("nan"), float("inf")):
        poisoned = out.clone()
        poisoned.view(-1)[torch.randint(0, poisoned.numel(), (1,)).item()] = bad
        assert ref_mod.relative_error(poisoned, ref) == float("inf")
    with pytest.raises(ValueError, match="shapes differ"):
        ref_mod.relative_error(out, ref[:1])


@pytest.mark.parametrize("matmul_precision", ["highest", "high", "medium"])
def test_float32_products_follow_torchs_tf32_setting(matmul_precision):
    """float32 runs tl.dot as three TF32 products unless torch allows TF32 in float32 matmuls (as
    torch's own matmul decides); bf16/fp16 keep Triton's default, so their kernels are unchanged
    (benchmarks/sm90_sass.py shows the same sm90 SASS as before the setting existed)."""
    from moe_tune.ops.launch import dot_precision

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)
    try:
        assert dot_precision(torch.float32) == ("tf32x3" if matmul_precision == "highest" else "tf32")
        assert dot_precision(torch.bfloat16) == dot_precision(torch.float16) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


WARP_SPEC = dataclasses.replace(TMA_ALL, WARP_SPEC=True)


@pytest.mark.parametrize("mode, T, E, topk", [("random", 29, 5, 2), ("subset", 40, 6, 2), ("one", 30, 4, 1),
                                              ("skewed", 64, 16, 4), ("random", 1, 8, 1)],
                         ids=["random", "empty-experts", "one-expert", "skewed", "one-row"])
def test_warp_specialised_launches_walk_the_row_block_table(mode, T, E, topk):
    # WARP_SPEC reads each row block's expert and first row from the routing's table instead of
    # searching registers: every pass it admits (nothing gathered, TMA store) against float64,
    # on routings with empty experts, one crowded expert and rows fewer than one block.
    routing, x, w, dy, _ = make_inputs(T, E, 64, 32, topk, torch.float16, False, False, False, mode)
    tol = TOLERANCES[torch.float16]
    M = T * topk
    y = gg.forward(x, w, routing, config=WARP_SPEC, out=nan_like((M, 64), torch.float16))
    assert relative_error(y, reference_forward(x, w, routing)) < tol
    dx = gg.backward_dx(dy, w, routing, config=WARP_SPEC, out=nan_like((M, 32), torch.float16))
    assert relative_error(dx, reference_dx(dy, w, routing)) < tol
    dw = gg.backward_dw(dy, x, w.shape, routing, config=WARP_SPEC, out=nan_like(w.shape, torch.float16))
    assert relative_error(dw, reference_dw(dy, x, routing)) < tol


def test_warp_specialised_dw_reads_gathered_rows_after_the_copy():
    routing, x, w, dy, weights = make_inputs(21, 5, 64, 32, 2, torch.float16, True, False, False, "subset")
    cfg = dataclasses.replace(WARP_SPEC, GATHER_COPY=True)
    dw = gg.backward_dw(dy, x, w.shape, routing, gather=True, config=cfg, out=nan_like(w.shape, torch.float16))
    assert relative_error(dw, reference_dw(dy, x, routing, gather=True)) < TOLERANCES[torch.float16]


@pytest.mark.parametrize("mode", ["subset", "one"])
def test_warp_specialised_forward_and_dx_read_gathered_rows_after_the_copy(mode):
    # The experts blocks' up forward (token rows gathered) and down dx (dY's slot rows gathered):
    # with GATHER_COPY their A is in expert order, so the warp-specialised loop may run them.
    topk = 1 if mode == "one" else 2
    cfg = dataclasses.replace(WARP_SPEC, GATHER_COPY=True)
    tol = TOLERANCES[torch.float16]
    routing, x, w, dy, _ = make_inputs(21, 5, 64, 32, topk, torch.float16, True, False, False, mode)
    y = gg.forward(x, w, routing, gather=True, config=cfg, out=nan_like((21 * topk, 64), torch.float16))
    assert relative_error(y, reference_forward(x, w, routing, gather=True)) < tol
    routing, x, w, dy, weights = make_inputs(21, 5, 64, 32, topk, torch.float16, False, True, True, mode)
    dx = gg.backward_dx(dy, w, routing, scatter=True, config=cfg, out=nan_like((21 * topk, 32), torch.float16))
    assert relative_error(dx, reference_dx(dy, w, routing, scatter=True)) < tol
    # Triton 3.6 computes the routing weight in a warp-specialised epilogue wrong: refused.
    with pytest.raises(ConfigError, match="WARP_SPEC does not combine with the routing weight"):
        gg.backward_dx(dy, w, routing, scatter=True, weights=weights, config=cfg)


@pytest.mark.parametrize("why, flags, dtype, change", [
    ("A in expert order", (True, False, False), torch.float16, {}),  # gathered forward input
    ("TMA_STORE", (False, False, False), torch.float16, {"TMA_STORE": False}),
    ("num_warps=4", (False, False, False), torch.float16, {"num_warps": 8}),
    ("at most 4 stages", (False, False, False), torch.float16, {"num_stages": 5}),
    ("16-bit", (False, False, False), torch.float32, {}),
    ("routing weight", (False, False, True), torch.float16, {}),
])
def test_warp_spec_outside_what_compiles_is_a_config_error(why, flags, dtype, change):
    gather, scatter, weighted = flags
    routing, x, w, _, weights = make_inputs(9, 4, 64, 32, 2, dtype, gather, scatter, weighted)
    with pytest.raises(ConfigError, match=f"WARP_SPEC.*{why}"):
        gg.forward(x, w, routing, gather=gather, weights=weights, config=dataclasses.replace(WARP_SPEC, **change))


def test_warp_spec_dw_tiles_must_not_straddle_experts():
    routing, x, _, dy, _ = make_inputs(9, 4, 48, 32, 2, torch.float16, False, False, False)
    with pytest.raises(ConfigError, match="BLOCK_N to divide"):
        gg.backward_dw(dy, x, (4, 48, 32), routing, config=WARP_SPEC)


@pytest.mark.parametrize("cfg", [PLAIN, TMA_ALL], ids=["pointers", "tma"])
def test_a_bound_dw_launch_writes_each_fresh_output(cfg):
    # launch.bind_grouped_mm_dw: the operands fixed at binding, a fresh output per call (a graphed
    # backward's weight gradients). Each call writes the whole poisoned output, from the operands'
    # values at call time.
    from moe_tune.device import query_device
    from moe_tune.ops import launch

    T, E, N, K, topk = 19, 5, 48, 32, 2
    routing = make_routing(T, E, topk, "subset")  # two experts get no rows: their dW is zero
    M = T * topk
    dy, x = torch.randn(M, N, dtype=torch.float16), torch.randn(M, K, dtype=torch.float16)
    template = torch.empty(E, N, K, dtype=torch.float16)
    bound = launch.bind_grouped_mm_dw(dy, x, template, routing, cfg, query_device(torch.device("cpu")))
    for _ in range(3):
        dy.copy_(torch.randn(M, N))
        x.copy_(torch.randn(M, K))
        dw = nan_like((E, N, K), torch.float16)
        bound(dw)
        assert relative_error(dw, reference_dw(dy, x, routing)) < TOLERANCES[torch.float16]
