"""The gpt-oss experts block (``moe_tune.ops.gptoss``) against the float64 plain-torch reference,
in Triton's CPU interpreter: forward, every gradient (biases and routing weights included), values
on both sides of each clamp and exactly at the limits, partial gradients, the registered ops under
``opcheck`` and the block under ``torch.compile(fullgraph=True)``.

Fresh random inputs and routing per case; every buffer the bodies write through a kernel starts as
NaN (``gptoss._alloc`` is poisoned), so an element a kernel forgets fails the comparison. The
gradients are checked against the reference with x·W1 rounded as the kernels store it
(``gptoss_reference``: the clamps' step makes that one rounding an all-or-nothing change).
"""

from __future__ import annotations

import functools

import pytest
import torch
import triton.runtime.interpreter
from alloc_tracking import alive_at_each_dw, track_allocations
from gptoss_reference import reference_rounded_h
from torch._subclasses.fake_tensor import FakeTensorMode

from moe_tune.errors import InvalidInputError
from moe_tune.ops import gptoss
from moe_tune.ops.gptoss import gptoss_experts
from moe_tune.ops.routing import build_routing
from moe_tune.problem import KernelConfig, MoeShape
from moe_tune.reference import relative_error
from moe_tune.reference.gptoss import reference_gptoss_experts, routing_weight_grad_scale

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests; GPU has its own"),
    # Tiny shapes have no tuned cache entry: the runtime's heuristic-default warning is expected.
    pytest.mark.filterwarnings("ignore::moe_tune.errors.CacheWarning"),
]

# dtype, relative-error bound: fp16 rounds H, A, dA_raw and the down output once each; fp32 is
# exact up to summation order in the interpreter.
TOLERANCES = {torch.float16: 5e-3, torch.float32: 1e-5}
# The routing-weight gradient is a dot product whose terms can cancel: bounded per slot against
# the sum of its terms' magnitudes, a few units of the dtype's precision (fp16: 2^-11 ≈ 4.9e-4).
WEIGHT_GRAD_TOLERANCES = {torch.float16: 3e-3, torch.float32: 1e-5}

# A limit well inside the pre-activations' spread (std ≈ 2.4 below): about a third of the gate
# values and half of the up values land beyond a limit, on each side.
LIMIT, ALPHA = 1.5, 1.702

# name, T, H, I, E, k
SHAPES = [
    ("one-token", 1, 32, 16, 4, 2),  # T=1: most experts empty, M=2 rows
    ("empty-expert", 6, 32, 16, 4, 2),  # expert E-1 never routed: its weight and bias grads are zero
    ("ragged", 7, 48, 24, 3, 3),  # H, I not multiples of the 32-wide blocks; k = E
    ("top-1", 9, 32, 32, 5, 1),  # one slot per token: the combine is a copy plus the bias
    ("one-expert", 5, 32, 16, 1, 1),  # E=1, k=1: every row on the only expert
    ("odd-dims", 5, 20, 12, 3, 2),  # H, I not multiples of 16; 2I=24 splits an interleaved pair per tile edge
]

NAMES = ("hidden", "gate_up_w", "gate_up_b", "down_w", "down_b", "top_k_index", "top_k_weights")
DIFFERENTIABLE = ("hidden", "gate_up_w", "gate_up_b", "down_w", "down_b", "top_k_weights")


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    def nan_alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(gptoss, "_alloc", nan_alloc)


def make_block(T, H, I, E, k, dtype, *, leave_last_expert_empty=True, weights_dtype=None):
    experts = E - 1 if leave_last_expert_empty and k < E else E
    return dict(
        hidden=torch.randn(T, H, dtype=dtype),
        # std of x·W1 ≈ 2: the clamps at ±LIMIT cut both tails
        gate_up_w=(2 * torch.randn(E, H, 2 * I) / H**0.5).to(dtype),
        gate_up_b=torch.randn(E, 2 * I).to(dtype),
        down_w=(torch.randn(E, I, H) / I**0.5).to(dtype),
        down_b=torch.randn(E, H).to(dtype),
        top_k_index=torch.stack([torch.randperm(experts)[:k] for _ in range(T)]),
        top_k_weights=torch.rand(T, k, dtype=weights_dtype or dtype),
    )


def run_block(fn, inputs, grad_out, trainable=DIFFERENTIABLE, **kwargs):
    leaves = {name: t.clone().requires_grad_(name in trainable) for name, t in inputs.items()}
    out = fn(*(leaves[n] for n in NAMES), limit=kwargs.pop("limit", LIMIT), alpha=kwargs.pop("alpha", ALPHA))
    grads = torch.autograd.grad(out, [leaves[n] for n in trainable], grad_out.to(out.dtype))
    return out, dict(zip(trainable, grads))


def reference(inputs, grad_out, trainable=DIFFERENTIABLE, *, exact_h=False, **kwargs):
    """(out, grads) in float64; unless ``exact_h``, with x·W1 rounded to ``hidden``'s dtype, as the
    kernels store it."""
    ref_inputs = {n: t.double() if t.is_floating_point() else t for n, t in inputs.items()}
    fn = reference_gptoss_experts if exact_h else functools.partial(reference_rounded_h,
                                                                    h_dtype=inputs["hidden"].dtype)
    return run_block(fn, ref_inputs, grad_out.double(), trainable, **kwargs)


def assert_weight_grad_close(grad, ref_grad, inputs, grad_out, dtype, limit=LIMIT):
    scale = routing_weight_grad_scale(*(inputs[n] for n in NAMES[:6]), grad_out, limit=limit, alpha=ALPHA)
    assert torch.isfinite(grad).all()
    worst = ((grad.double() - ref_grad.double()).abs() / scale.clamp_min(1e-30)).max().item()
    assert worst < WEIGHT_GRAD_TOLERANCES[dtype]


def clamp_sides(inputs, limit=LIMIT) -> dict[str, int]:
    """How many routed pre-activations fall on each side of each clamp."""
    x, w1, b1 = (inputs[n].double() for n in ("hidden", "gate_up_w", "gate_up_b"))
    tokens, slots = torch.nonzero(inputs["top_k_index"] >= 0, as_tuple=True)
    e = inputs["top_k_index"][tokens, slots]
    pre = torch.einsum("mh,mhn->mn", x[tokens], w1[e]) + b1[e]
    gate, up = pre[:, ::2], pre[:, 1::2]
    return {"gate>limit": int((gate > limit).sum()), "gate<limit": int((gate < limit).sum()),
            "up>limit": int((up > limit).sum()), "up<-limit": int((up < -limit).sum()),
            "|up|<limit": int((up.abs() < limit).sum())}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name, T, H, I, E, k", SHAPES, ids=[s[0] for s in SHAPES])
def test_forward_and_gradients_match_reference(name, T, H, I, E, k, dtype):
    # fp16 activations with float32 routing weights: the weights keep their own dtype end to end.
    weights_dtype = torch.float32 if dtype == torch.float16 else None
    inputs = make_block(T, H, I, E, k, dtype, weights_dtype=weights_dtype)
    if T * k * I >= 64:  # enough values that every side of every clamp is hit
        assert min(clamp_sides(inputs).values()) > 0, clamp_sides(inputs)
    grad_out = torch.randn(T, H, dtype=dtype)

    out, grads = run_block(gptoss_experts, inputs, grad_out)
    _, ref_grads = reference(inputs, grad_out)
    ref, _ = reference(inputs, grad_out, exact_h=True)  # the forward is continuous across the clamps

    tol = TOLERANCES[dtype]
    assert out.dtype == dtype and out.shape == (T, H)
    assert relative_error(out, ref) < tol
    for grad_name in DIFFERENTIABLE[:-1]:
        assert grads[grad_name].dtype == inputs[grad_name].dtype, grad_name
        assert relative_error(grads[grad_name], ref_grads[grad_name]) < tol, grad_name
    assert grads["top_k_weights"].dtype == inputs["top_k_weights"].dtype
    assert_weight_grad_close(grads["top_k_weights"], ref_grads["top_k_weights"], inputs, grad_out, dtype)
    routed = set(inputs["top_k_index"].flatten().tolist())
    for e in set(range(E)) - routed:  # an expert with no rows gets exact zero gradients
        for grad_name in ("gate_up_w", "gate_up_b", "down_w", "down_b"):
            assert torch.equal(grads[grad_name][e], torch.zeros_like(grads[grad_name][e])), grad_name


def test_released_limit_and_alpha():
    # gpt-oss's own constants (limit 7, alpha 1.702) with pre-activations wide enough to clamp.
    T, H, I, E, k = 8, 32, 16, 4, 2
    inputs = make_block(T, H, I, E, k, torch.float32)
    inputs["gate_up_w"] *= 4
    inputs["gate_up_b"] *= 4
    assert min(clamp_sides(inputs, 7.0).values()) > 0
    grad_out = torch.randn(T, H)
    out, grads = run_block(gptoss_experts, inputs, grad_out, limit=7.0, alpha=1.702)
    ref, ref_grads = reference(inputs, grad_out, limit=7.0, alpha=1.702)
    assert relative_error(out, ref) < 1e-5
    for grad_name in DIFFERENTIABLE[:-1]:
        assert relative_error(grads[grad_name], ref_grads[grad_name]) < 1e-5, grad_name
    assert_weight_grad_close(grads["top_k_weights"], ref_grads["top_k_weights"], inputs, grad_out, torch.float32, 7.0)


def test_gradient_at_and_beyond_the_limits():
    # Zero hidden rows make the pre-activations exactly the bias: gate and up sit exactly at a
    # limit (gradient passes, like torch.clamp) or just past it (gradient zero).
    T, H, I, E, k = 4, 16, 8, 2, 1
    inputs = make_block(T, H, I, E, k, torch.float32)
    inputs["hidden"].zero_()
    inputs["top_k_index"] = torch.tensor([[0], [0], [1], [1]])
    gate = torch.tensor([LIMIT, LIMIT + 0.25, LIMIT - 0.25, -3.0, LIMIT, 0.5, 2 * LIMIT, -LIMIT])
    up = torch.tensor([LIMIT, -LIMIT, LIMIT + 0.25, -LIMIT - 0.25, 0.0, -LIMIT, LIMIT, 1.0])
    inputs["gate_up_b"] = torch.stack([torch.stack([gate, up], -1).flatten(), torch.stack([up, gate], -1).flatten()])
    grad_out = torch.randn(T, H)
    out, grads = run_block(gptoss_experts, inputs, grad_out)
    ref, ref_grads = reference(inputs, grad_out)
    assert relative_error(out, ref) < 1e-6
    assert relative_error(grads["gate_up_b"], ref_grads["gate_up_b"]) < 1e-6
    # The reference's zeros are exact zeros here, not rounding: clamped columns get none.
    clamped = ref_grads["gate_up_b"] == 0
    assert clamped.sum() >= 6 and torch.equal(grads["gate_up_b"][clamped], torch.zeros(int(clamped.sum())))


def test_clamps_decide_on_the_stored_h():
    # The up pre-activation is 1.5 + 2^-14 exactly: past the limit, so no gradient in float64. The
    # kernels store x·W1 in fp16, which rounds it to 1.5, the limit itself, where gradient passes.
    # This is the mechanism behind d hidden's 2% against the exact reference on a GPU in bf16; the
    # block follows the values it stores, as the rounded-H reference does.
    T, H, I, E, k = 2, 16, 8, 2, 1
    inputs = make_block(T, H, I, E, k, torch.float16)
    inputs["hidden"] = torch.zeros(T, H, dtype=torch.float16)
    inputs["hidden"][:, :2] = 1.0
    inputs["gate_up_w"] = torch.zeros(E, H, 2 * I, dtype=torch.float16)
    inputs["gate_up_w"][:, 0, 0::2] = 0.5  # gate: well inside its limit
    inputs["gate_up_w"][:, 0, 1::2] = LIMIT
    inputs["gate_up_w"][:, 1, 1::2] = 2.0**-14  # below half an fp16 ulp of 1.5 (2^-10)
    inputs["gate_up_b"] = torch.zeros(E, 2 * I, dtype=torch.float16)
    inputs["top_k_index"] = torch.tensor([[0], [1]])
    grad_out = torch.randn(T, H, dtype=torch.float16)

    _, grads = run_block(gptoss_experts, inputs, grad_out)
    _, ref_grads = reference(inputs, grad_out)
    _, exact_grads = reference(inputs, grad_out, exact_h=True)
    assert torch.equal(exact_grads["gate_up_b"][:, 1::2], torch.zeros(E, I, dtype=torch.float64))
    assert (grads["gate_up_b"][:, 1::2] != 0).all()
    for grad_name in DIFFERENTIABLE[:-1]:
        assert relative_error(grads[grad_name], ref_grads[grad_name]) < TOLERANCES[torch.float16], grad_name


def test_op_bodies_launch_nothing_eagerly_on_fake_tensors(monkeypatch):
    # torch.compile runs the op bodies on fake tensors, which have no data pointer: every launch
    # must go through launch.launch_kernel with in_op=True (skipped on fakes). The routing
    # kernel launched eagerly from the forward body failed compiling on an H200 with "Cannot
    # access data pointer of Tensor (e.g. FakeTensor...)".
    def eager_launch(self, *args, **kwargs):
        raise AssertionError(f"{self.fn.__name__} launched eagerly from an op body")

    monkeypatch.setattr(triton.runtime.interpreter.InterpretedFunction, "run", eager_launch)
    T, H, I, E, k = 6, 32, 16, 4, 2
    with FakeTensorMode():
        inputs = make_block(T, H, I, E, k, torch.float32)
        args = tuple(inputs[n] for n in NAMES)
        out, h, offsets, slots = gptoss._gptoss_experts_fwd(*args, LIMIT, ALPHA)
        grad_out = torch.randn(T, H)
        act = gptoss._gptoss_experts_bwd_act(grad_out, inputs["gate_up_b"], inputs["down_w"], inputs["down_b"],
                                             inputs["top_k_weights"], h, offsets, slots, LIMIT, ALPHA, True, True)
        up = gptoss._gptoss_experts_bwd_up(act[0], inputs["hidden"], inputs["gate_up_w"], offsets, slots, k, True,
                                           True)
        down = gptoss._gptoss_experts_bwd_down(grad_out, act[1], inputs["down_w"], offsets, slots, k)
    assert [tuple(t.shape) for t in (out, h, offsets, slots)] == [(T, H), (T * k, 2 * I), (E + 1,), (T * k,)]
    assert [tuple(g.shape) for g in act] == [(T * k, 2 * I), (T * k, I), (E, 2 * I), (E, H), (T, k)]
    assert [tuple(g.shape) for g in (*up, down)] == [(T, H), (E, H, 2 * I), (E, I, H)]


@pytest.mark.parametrize("trainable", [("hidden",), ("gate_up_w",), ("down_w",), ("gate_up_b", "down_b"),
                                       ("top_k_weights",), ("hidden", "down_b")],
                         ids=["hidden-only", "gate-up-only", "down-only", "biases-only", "weights-only",
                              "hidden-and-down-bias"])
def test_partial_gradients(trainable):
    # Frozen experts (hidden-only, biases-only) copy no rows for a dW; the down-bias programs run
    # only when db2 or the routing-weight gradient is wanted.
    T, H, I, E, k = 9, 32, 16, 4, 2
    inputs = make_block(T, H, I, E, k, torch.float32)
    grad_out = torch.randn(T, H)
    _, grads = run_block(gptoss_experts, inputs, grad_out, trainable)
    _, ref_grads = reference(inputs, grad_out, trainable)
    for name in trainable:
        if name == "top_k_weights":
            assert_weight_grad_close(grads[name], ref_grads[name], inputs, grad_out, torch.float32)
        else:
            assert relative_error(grads[name], ref_grads[name]) < 1e-5, name


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiles_without_graph_breaks(dynamic):
    # The interpreter's ops are opaque (moe_tune.ops.launch): this checks Dynamo traces the block
    # whole, the fake implementations and the registered autograd; Inductor tracing into the
    # kernels is exercised by the GPU tests.
    torch._dynamo.reset()
    compiled = torch.compile(gptoss_experts, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for T in (5, 7):  # a second token count: recompiles (static) or reuses the graph (dynamic)
        inputs = make_block(T, 32, 16, 4, 2, torch.float32)
        grad_out = torch.randn(T, 32)
        out, grads = run_block(compiled, inputs, grad_out)
        eager_out, eager_grads = run_block(gptoss_experts, inputs, grad_out)
        assert torch.equal(out, eager_out)
        for name in DIFFERENTIABLE:
            assert torch.equal(grads[name], eager_grads[name]), name


def test_opcheck_forward_op():
    inputs = make_block(6, 32, 16, 4, 2, torch.float32)
    for name in DIFFERENTIABLE:
        inputs[name].requires_grad_()
    torch.library.opcheck(gptoss.gptoss_experts_fwd, (*(inputs[n] for n in NAMES), LIMIT, ALPHA))


@pytest.mark.parametrize("needs", [(True, True, True, True, True), (False, True, False, False, False)],
                         ids=["all", "gate-up-only"])
def test_opcheck_backward_ops(needs):
    need_hidden, need_gate_up, need_down, need_down_b, need_weights = needs
    T, H, I, E, k = 6, 32, 16, 4, 2
    inputs = make_block(T, H, I, E, k, torch.float32)
    routing = build_routing(inputs["top_k_index"], E)
    offsets, slots = routing.expert_offsets, routing.sorted_slots
    torch.library.opcheck(gptoss.gptoss_experts_bwd_act, (
        torch.randn(T, H), inputs["gate_up_b"], inputs["down_w"], inputs["down_b"], inputs["top_k_weights"],
        torch.randn(T * k, 2 * I), offsets, slots, LIMIT, ALPHA, need_down_b, need_weights))
    torch.library.opcheck(gptoss.gptoss_experts_bwd_up, (
        torch.randn(T * k, 2 * I), inputs["hidden"], inputs["gate_up_w"], offsets, slots, k, need_hidden,
        need_gate_up))
    if need_down:
        torch.library.opcheck(gptoss.gptoss_experts_bwd_down, (
            torch.randn(T, H), torch.randn(T * k, I), inputs["down_w"], offsets, slots, k))


# every kernel path of the GEMMs on [E, K, N] weights: pointer loads, TMA loads (the trans_w
# descriptor), TMA stores, and column blocks that leave several routing-weight partials
CONFIG_SETS = [
    ("pointers", dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)),
    ("tma", dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, TMA_LOAD=True)),
    ("tma-store", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, TMA_LOAD=True, TMA_STORE=True)),
]


@pytest.mark.parametrize("name, fields", CONFIG_SETS, ids=[c[0] for c in CONFIG_SETS])
def test_block_kernel_paths(name, fields, monkeypatch):
    def configs(E, H, I, topk, dtype, num_tokens, info):
        out = {}
        for problem in MoeShape(E, H, I, topk, layout="gpt_oss").problems("float32"):
            # TMA stores never apply to scattered outputs (up dx, down forward)
            store = fields.get("TMA_STORE", False) and (problem.gemm, problem.pass_) not in (("up", "dx"),
                                                                                           ("down", "forward"))
            out[problem.gemm, problem.pass_] = KernelConfig(**{**fields, "TMA_STORE": store}, GROUP_M=2, num_warps=1,
                                                            num_stages=1)
        return out

    monkeypatch.setattr(gptoss, "block_configs", configs)
    T, H, I, E, k = 11, 64, 48, 4, 2
    inputs = make_block(T, H, I, E, k, torch.float32)
    grad_out = torch.randn(T, H)
    out, grads = run_block(gptoss_experts, inputs, grad_out)
    ref, ref_grads = reference(inputs, grad_out)
    assert relative_error(out, ref) < 1e-5
    for grad_name in DIFFERENTIABLE[:-1]:
        assert relative_error(grads[grad_name], ref_grads[grad_name]) < 1e-5, grad_name
    assert_weight_grad_close(grads["top_k_weights"], ref_grads["top_k_weights"], inputs, grad_out, torch.float32)


@pytest.mark.parametrize("dtype, packed", [(torch.float32, False), (torch.float16, True), (torch.float16, False)],
                         ids=["fp32", "fp16-pair-words", "fp16-slabs"])
@pytest.mark.parametrize("descriptors", [True, False], ids=["descriptors", "pointers"])
@pytest.mark.parametrize("block_m", [16, 32], ids=["16-row-steps", "32-row-steps"])
def test_activation_backward_through_descriptors_and_pointers(descriptors, block_m, dtype, packed, monkeypatch):
    """The activation backward reads dA and H through tensor descriptors that end at each expert's
    last row (zero-filled loads), or through masked pointers: both match the reference, on experts
    whose row counts are not multiples of the row step, with each program's bias gradients summed
    over all its steps' rows at the end. 16-bit H and dH go as int32 words of (gate, up) pairs
    (``BWD_PACKED``) or as interleaved slabs split in registers; float32 always the latter."""
    from moe_tune.ops import launch

    ran = []
    plain = launch.launch_kernel

    def recording(kernel, in_op, grid, args, meta, outputs):
        if kernel is gptoss.gptoss_bwd_kernel:
            ran.append((meta["TMA"], meta["PACKED"], meta["BLOCK_M"]))
        plain(kernel, in_op, grid, args, meta, outputs)

    monkeypatch.setattr(launch, "launch_kernel", recording)
    monkeypatch.setattr(gptoss, "BWD_TMA", descriptors)
    monkeypatch.setattr(gptoss, "BWD_BLOCK_M", block_m)
    monkeypatch.setattr(gptoss, "BWD_PACKED", packed or dtype == torch.float32)  # fp32 never packs
    T, H, I, E, k = 37, 48, 40, 3, 2  # ~25 rows per expert; 2I = 80 columns: a partial 128-wide tile
    inputs = make_block(T, H, I, E, k, dtype)
    grad_out = torch.randn(T, H, dtype=dtype)
    _, grads = run_block(gptoss_experts, inputs, grad_out)
    _, ref_grads = reference(inputs, grad_out)
    assert ran == [(descriptors, packed, block_m)]
    for grad_name in DIFFERENTIABLE[:-1]:
        assert relative_error(grads[grad_name], ref_grads[grad_name]) < TOLERANCES[dtype], grad_name
    assert_weight_grad_close(grads["top_k_weights"], ref_grads["top_k_weights"], inputs, grad_out, dtype)


def test_unaligned_rows_take_the_pointer_path():
    """A row of 12 float16 values (24 bytes) cannot be a descriptor's row stride."""
    from moe_tune.ops import launch

    assert launch.rows_fit_descriptors(torch.empty(5, 16, dtype=torch.float16))
    assert not launch.rows_fit_descriptors(torch.empty(5, 12, dtype=torch.float16))
    assert not launch.rows_fit_descriptors(torch.empty(5, 17)[:, 1:])  # starts 4 bytes in, stride 68 bytes
    assert not launch.rows_fit_descriptors(torch.empty(16, 5).t())


def test_problems_are_the_gpt_oss_layout():
    keys = [p.key for p in MoeShape(32, 2880, 2880, 4, layout="gpt_oss").problems()]
    assert keys == [
        "forward/E32/N5760/K2880/k4/bfloat16/gather/kn",
        "dx/E32/N5760/K2880/k4/bfloat16/gather/kn",
        "dw/E32/N5760/K2880/k4/bfloat16/gather/sorted/kn",
        "forward/E32/N2880/K2880/k4/bfloat16/scatter/weighted/kn",
        "dx/E32/N2880/K2880/k4/bfloat16/scatter/kn",  # unweighted, as launched
        "dw/E32/N2880/K2880/k4/bfloat16/scatter/weighted/sorted/kn",
    ]
    # the Qwen-layout problems of the same shape are other cache keys
    assert not set(keys) & {p.key for p in MoeShape(32, 2880, 2880, 4).problems()}


def _bad(**changes):
    inputs = make_block(4, 32, 16, 4, 2, torch.float32)
    inputs.update(changes)
    return inputs


# what is wrong, the inputs, a phrase the error must contain
BAD_INPUTS = [
    ("odd-gate-up", lambda: _bad(gate_up_w=torch.randn(4, 32, 31)), "gate_up_w must be [E, H, 2I]"),
    ("down-shape", lambda: _bad(down_w=torch.randn(4, 32, 16)), "down_w must be [E, I, H]"),
    ("gate-up-bias-shape", lambda: _bad(gate_up_b=torch.randn(4, 16)), "gate_up_b must be [E, 2I]"),
    ("down-bias-shape", lambda: _bad(down_b=torch.randn(32)), "down_b must be [E, H]"),
    ("dtype-mix", lambda: _bad(hidden=torch.randn(4, 32, dtype=torch.float16)), "share a dtype"),
    ("k-above-E", lambda: _bad(top_k_index=torch.zeros(4, 5, dtype=torch.long), top_k_weights=torch.rand(4, 5)),
     "top-k must be between 1"),
    ("float-index", lambda: _bad(top_k_index=torch.zeros(4, 2)), "int32 or int64"),
]


@pytest.mark.parametrize("name, make, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_invalid_inputs_raise(name, make, message):
    inputs = make()
    with pytest.raises(InvalidInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        gptoss_experts(*(inputs[n] for n in NAMES), limit=LIMIT, alpha=ALPHA)


def test_non_positive_limit_raises():
    inputs = make_block(4, 32, 16, 4, 2, torch.float32)
    with pytest.raises(InvalidInputError, match="limit must be positive"):
        gptoss_experts(*(inputs[n] for n in NAMES), limit=0.0, alpha=ALPHA)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_backward_frees_h_and_dh_and_copies_rows_only_for_their_dw(monkeypatch, compiled):
    """Eager, H [M, 2I] is handed to the backward, not saved; under torch.compile the backward is
    three ops and the graph drops buffers as it goes. Either way H goes after the activation
    backward and dH after dW1; X's rows are copied to expert order just before dW1 and G's just
    before dW2, each dropped once its dW is made, so the forward keeps no [M, H] buffer and dW2
    (the last allocation) meets only its own copy."""
    from moe_tune.ops import block

    T, H, I, E, k = 9, 40, 24, 4, 2
    inputs = make_block(T, H, I, E, k, torch.float32)

    def alive(made, copies):  # the forward's H and the backward's dH; the row copies X_s, G_s
        return ([ref() is not None for shape, ref in made if shape == (T * k, 2 * I)],
                [ref() is not None for shape, ref in copies])

    seen, made, (out, grads) = alive_at_each_dw(
        monkeypatch, gptoss, gptoss_experts, lambda fn: run_block(fn, inputs, torch.randn(T, H)), alive,
        compiled=compiled, also=(block,))
    assert seen == [([False, True], [True]),  # dW1 reads X_s and dH; H is gone
                    ([False, False], [False, True])]  # dW2 reads G_s; dH and X_s are gone
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_backward_twice_is_a_clear_error():
    T, H, I, E, k = 5, 32, 16, 4, 2
    leaves = {n: t.requires_grad_(n in DIFFERENTIABLE) for n, t in make_block(T, H, I, E, k, torch.float32).items()}
    out = gptoss_experts(*(leaves[n] for n in NAMES), limit=LIMIT, alpha=ALPHA)
    out.backward(torch.randn(T, H), retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        out.backward(torch.randn(T, H))


_BUILD_WITH_FP64 = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moe_tune.kernels import gptoss as kernels
from moe_tune.ops import gptoss

fn = getattr(kernels, sys.argv[1])
signature = {}
for p in fn.params:
    if p.is_constexpr:
        signature[p.name] = "constexpr"
    elif p.name in ("limit", "alpha"):
        signature[p.name] = "fp64"
    elif p.name in ("sorted_slots_ptr", "expert_offsets_ptr", "top_k_index_ptr"):
        signature[p.name] = "*i32"
    elif p.name in ("dsp_ptr", "weights_ptr"):
        signature[p.name] = "*fp32"
    elif p.name.endswith("_ptr"):
        signature[p.name] = "*bf16"
    else:
        signature[p.name] = "i32"
# The LoRA variants (HAS_DELTA, LORA) read more operands: build those, the plain ones share the rest.
values = {"BLOCK_M": gptoss.BWD_BLOCK_M, "BLOCK_N": gptoss.BWD_BLOCK_N, "DB2_BLOCK_M": gptoss.BWD_DB2_BLOCK_M,
          "DB2_BLOCK_N": gptoss.BWD_DB2_BLOCK_N, "I_BLOCKS": 45, "HAS_DELTA": True,
          "LORA": True, "BLOCK_R": 16, "STAGES": gptoss.BWD_STAGES,
          "TMA": True, "PACKED": sys.argv[2] == "packed"}
if values["PACKED"]:  # H and dH as int32 words of (gate, up) pairs
    signature.update(h_ptr="*i32", d_h_ptr="*i32")
constexprs = {n: values[n] for n, t in signature.items() if t == "constexpr"}
triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
print("built")
"""


@pytest.mark.parametrize("kernel_name, variant", [("gptoss_act_fwd_kernel", "-"), ("gptoss_bwd_kernel", "packed"),
                                                  ("gptoss_bwd_kernel", "slabs")])
def test_kernels_build_with_float64_scalars(kernel_name, variant, tmp_path):
    """Under torch.compile, Inductor launches these kernels itself and types ``limit`` and
    ``alpha`` fp64 (eager launches type them fp32); the kernels must still build for sm90 (a
    float32 accumulator met by an fp64 scalar would turn fp64 and stop the build). Compiled on
    the CPU with Triton's own toolchain, in a process where the kernels are not interpreted."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _BUILD_WITH_FP64, kernel_name, variant], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and "built" in done.stdout, done.stderr[-2000:]


def test_non_reentrant_checkpoint_frees_h_and_matches(monkeypatch):
    """Under torch.utils.checkpoint(use_reentrant=False), H goes through the saved-tensor hooks
    like every saved tensor: it is gone once the forward returns, as is every other buffer the
    forward made, and the recomputed block gives the plain block's gradients."""
    from torch.utils.checkpoint import checkpoint

    T, H, I, E, k = 9, 40, 24, 4, 2
    inputs = make_block(T, H, I, E, k, torch.float32)
    grad_out = torch.randn(T, H)
    plain_out, plain_grads = run_block(gptoss_experts, inputs, grad_out)
    made = track_allocations(monkeypatch, gptoss)
    leaves = {name: t.clone().requires_grad_(name in DIFFERENTIABLE) for name, t in inputs.items()}
    out = checkpoint(lambda *a: gptoss_experts(*a, limit=LIMIT, alpha=ALPHA), *(leaves[n] for n in NAMES),
                     use_reentrant=False)
    assert made[0][0] == (T * k, 2 * I)
    assert all(ref() is None for shape, ref in made if shape != (T, H))  # all but the output
    grads = dict(zip(DIFFERENTIABLE, torch.autograd.grad(out, [leaves[n] for n in DIFFERENTIABLE], grad_out)))
    assert relative_error(out, plain_out) < 1e-6
    for name in DIFFERENTIABLE:
        assert relative_error(grads[name], plain_grads[name]) < 1e-6, name
