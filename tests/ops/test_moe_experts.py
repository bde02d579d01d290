"""The experts block (``moe_tune.moe_experts``) against the float64 plain-torch reference, in
Triton's CPU interpreter: forward, every gradient, the registered ops under ``opcheck`` and the
block under ``torch.compile(fullgraph=True)``.

Fresh random inputs and routing per case; every buffer the ops write through a kernel starts as
NaN (``block._alloc`` is poisoned), so an element a kernel forgets fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
from alloc_tracking import alive_at_each_dw, track_allocations

from moe_tune.errors import InvalidInputError
from moe_tune.ops import block, custom_ops
from moe_tune.ops.moe_experts import moe_experts
from moe_tune.ops.routing import build_routing
from moe_tune.reference import relative_error
from moe_tune.reference.moe_experts import reference_moe_experts, routing_weight_grad_scale

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests; GPU has its own"),
    # Tiny shapes have no tuned cache entry: the runtime's heuristic-default warning is expected.
    pytest.mark.filterwarnings("ignore::moe_tune.errors.CacheWarning"),
]

# dtype, relative-error bound: fp16 rounds H, A and the down output once each; fp32 is exact
# up to summation order in the interpreter.
TOLERANCES = {torch.float16: 5e-3, torch.float32: 1e-5}
# The routing-weight gradient is one dot product over I per slot whose terms can cancel, so it
# is bounded per slot against the sum of its terms' magnitudes (routing_weight_grad_scale):
# a few units of the dtype's precision (fp16: 2^-11 ≈ 4.9e-4).
WEIGHT_GRAD_TOLERANCES = {torch.float16: 3e-3, torch.float32: 1e-5}

# name, T, H, I, E, k
SHAPES = [
    ("one-token", 1, 32, 16, 4, 2),  # T=1: most experts empty, M=2 rows
    ("empty-expert", 6, 32, 16, 4, 2),  # expert E-1 never routed: its dW must be exactly zero
    ("ragged", 7, 48, 24, 3, 3),  # H, I not multiples of the 32-wide blocks; k = E
    ("top-1", 9, 32, 32, 5, 1),  # one slot per token: the combine is a copy
    ("one-expert", 5, 32, 16, 1, 1),  # E=1, k=1: every row on the only expert
    ("odd-dims", 5, 20, 12, 3, 2),  # H, I not multiples of 16: masked columns in every kernel
]


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    def nan_alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(block, "_alloc", nan_alloc)


def make_block(T, H, I, E, k, dtype, *, leave_last_expert_empty=True, weights_dtype=None, one_hot=False):
    experts = E - 1 if leave_last_expert_empty and k < E else E
    top_k_index = torch.stack([torch.randperm(experts)[:k] for _ in range(T)])
    if one_hot:  # every token's first slot on one expert: a long expert, the others short or empty
        top_k_index = torch.stack([torch.cat([torch.tensor([E - 1]), torch.randperm(E - 1)[:k - 1]]) for _ in range(T)])
    return dict(
        hidden=torch.randn(T, H, dtype=dtype),
        gate_up_w=(torch.randn(E, 2 * I, H) / H**0.5).to(dtype),
        down_w=(torch.randn(E, H, I) / I**0.5).to(dtype),
        top_k_index=top_k_index,
        top_k_weights=torch.rand(T, k, dtype=weights_dtype or dtype),
    )


DIFFERENTIABLE = ("hidden", "gate_up_w", "down_w", "top_k_weights")


def run_block(fn, inputs, grad_out):
    leaves = {name: t.clone().requires_grad_(name in DIFFERENTIABLE) for name, t in inputs.items()}
    out = fn(**leaves)
    grads = torch.autograd.grad(out, [leaves[n] for n in DIFFERENTIABLE], grad_out.to(out.dtype))
    return out, dict(zip(DIFFERENTIABLE, grads))


def assert_weight_grad_close(grad, ref_grad, inputs, grad_out, dtype):
    scale = routing_weight_grad_scale(inputs["hidden"], inputs["gate_up_w"], inputs["down_w"],
                                      inputs["top_k_index"], grad_out)
    assert torch.isfinite(grad).all()
    worst = ((grad.double() - ref_grad.double()).abs() / scale.clamp_min(1e-30)).max().item()
    assert worst < WEIGHT_GRAD_TOLERANCES[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name, T, H, I, E, k", SHAPES, ids=[s[0] for s in SHAPES])
def test_forward_and_gradients_match_reference(name, T, H, I, E, k, dtype):
    # fp16 activations with float32 routing weights: the weights keep their own dtype end to end.
    weights_dtype = torch.float32 if dtype == torch.float16 else None
    inputs = make_block(T, H, I, E, k, dtype, weights_dtype=weights_dtype)
    grad_out = torch.randn(T, H, dtype=dtype)

    out, grads = run_block(moe_experts, inputs, grad_out)
    ref_inputs = {n: t.double() if t.is_floating_point() else t for n, t in inputs.items()}
    ref, ref_grads = run_block(reference_moe_experts, ref_inputs, grad_out.double())

    tol = TOLERANCES[dtype]
    assert out.dtype == dtype and out.shape == (T, H)
    assert relative_error(out, ref) < tol
    for grad_name in ("hidden", "gate_up_w", "down_w"):
        assert grads[grad_name].dtype == inputs[grad_name].dtype, grad_name
        assert relative_error(grads[grad_name], ref_grads[grad_name]) < tol, grad_name
    assert grads["top_k_weights"].dtype == inputs["top_k_weights"].dtype
    assert_weight_grad_close(grads["top_k_weights"], ref_grads["top_k_weights"], inputs, grad_out, dtype)
    routed = set(inputs["top_k_index"].flatten().tolist())
    for e in set(range(E)) - routed:  # an expert with no rows gets an exact zero gradient
        assert torch.equal(grads["gate_up_w"][e], torch.zeros_like(grads["gate_up_w"][e]))
        assert torch.equal(grads["down_w"][e], torch.zeros_like(grads["down_w"][e]))


def test_all_tokens_on_one_expert():
    # 37 tokens' first slot on expert 3: its rows span several row blocks, every other expert few.
    T, H, I, E, k = 37, 32, 16, 4, 2
    inputs = make_block(T, H, I, E, k, torch.float32, one_hot=True)
    grad_out = torch.randn(T, H)
    out, grads = run_block(moe_experts, inputs, grad_out)
    ref_inputs = {n: t.double() if t.is_floating_point() else t for n, t in inputs.items()}
    ref, ref_grads = run_block(reference_moe_experts, ref_inputs, grad_out.double())
    assert relative_error(out, ref) < 1e-5
    for grad_name in ("hidden", "gate_up_w", "down_w"):
        assert relative_error(grads[grad_name], ref_grads[grad_name]) < 1e-5, grad_name


@pytest.mark.parametrize("trainable", [("hidden",), ("gate_up_w",), ("down_w",), ("hidden", "down_w")],
                         ids=["hidden-only", "gate-up-only", "down-only", "hidden-and-down"])
def test_partial_gradients(trainable):
    # Each gradient alone: the backward skips the GEMMs and row copies no one asked for.
    T, H, I, E, k = 9, 32, 16, 4, 2
    inputs = make_block(T, H, I, E, k, torch.float32)
    leaves = {n: t.clone().requires_grad_(n in trainable) for n, t in inputs.items()}
    out = moe_experts(**leaves)
    grad_out = torch.randn(T, H)
    grads = torch.autograd.grad(out, [leaves[n] for n in trainable], grad_out)
    ref_leaves = {n: (t.double() if t.is_floating_point() else t).clone().requires_grad_(n in trainable)
                  for n, t in inputs.items()}
    ref = reference_moe_experts(**ref_leaves)
    ref_grads = torch.autograd.grad(ref, [ref_leaves[n] for n in trainable], grad_out.double())
    for name, grad, ref_grad in zip(trainable, grads, ref_grads):
        assert relative_error(grad, ref_grad) < 1e-5, name


def test_frozen_inputs_get_no_gradient_work():
    # Only the routing weights train: the op returns no hidden or weight gradients.
    inputs = make_block(5, 32, 16, 4, 2, torch.float32)
    w = inputs["top_k_weights"].clone().requires_grad_()
    out = moe_experts(inputs["hidden"], inputs["gate_up_w"], inputs["down_w"], inputs["top_k_index"], w)
    (grad_w,) = torch.autograd.grad(out.sum(), [w])
    w_ref = inputs["top_k_weights"].double().requires_grad_()
    ref = reference_moe_experts(inputs["hidden"], inputs["gate_up_w"], inputs["down_w"], inputs["top_k_index"], w_ref)
    (ref_grad_w,) = torch.autograd.grad(ref.sum(), [w_ref])
    assert_weight_grad_close(grad_w, ref_grad_w, inputs, torch.ones_like(out), torch.float32)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiles_without_graph_breaks(dynamic):
    # The interpreter's ops are opaque (moe_tune.ops.launch): this checks Dynamo traces the block
    # whole, the fake implementations and the registered autograd; Inductor tracing into the
    # kernels is exercised by the GPU tests.
    torch._dynamo.reset()
    compiled = torch.compile(moe_experts, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for T in (5, 7):  # a second token count: recompiles (static) or reuses the graph (dynamic)
        inputs = make_block(T, 32, 16, 4, 2, torch.float32)
        grad_out = torch.randn(T, 32)
        out, grads = run_block(compiled, inputs, grad_out)
        eager_out, eager_grads = run_block(moe_experts, inputs, grad_out)
        assert torch.equal(out, eager_out)
        for name in DIFFERENTIABLE:
            assert torch.equal(grads[name], eager_grads[name]), name


def test_opcheck_forward_op():
    inputs = make_block(6, 32, 16, 4, 2, torch.float32)
    for name in DIFFERENTIABLE:
        inputs[name].requires_grad_()
    args = (*inputs.values(), "silu")
    torch.library.opcheck(custom_ops.moe_experts_fwd, args)


@pytest.mark.parametrize("needs", [(True, True), (False, True), (True, False)],
                         ids=["both", "gate-up-only", "hidden-only"])
def test_opcheck_backward_ops(needs):
    T, H, I, E, k = 6, 32, 16, 4, 2
    inputs = make_block(T, H, I, E, k, torch.float32)
    routing = build_routing(inputs["top_k_index"], E)
    offsets, slots = routing.expert_offsets, routing.sorted_slots
    grad_out = torch.randn(T, H)
    torch.library.opcheck(custom_ops.moe_experts_bwd_act, (grad_out, inputs["down_w"], inputs["top_k_weights"],
                                                          torch.randn(T * k, 2 * I), offsets, slots))
    torch.library.opcheck(custom_ops.moe_experts_bwd_up, (torch.randn(T * k, 2 * I), inputs["hidden"],
                                                         inputs["gate_up_w"], offsets, slots, k, *needs))
    torch.library.opcheck(custom_ops.moe_experts_bwd_down, (grad_out, torch.randn(T * k, I), inputs["down_w"],
                                                           offsets, slots, k))


def _bad(**changes):
    inputs = make_block(4, 32, 16, 4, 2, torch.float32)
    inputs.update(changes)
    return inputs


# what is wrong, the inputs, a phrase the error must contain
BAD_INPUTS = [
    ("down-shape", lambda: _bad(down_w=torch.randn(4, 32, 8)), "down_w must be [E, H, I]"),
    ("odd-gate-up", lambda: _bad(gate_up_w=torch.randn(4, 31, 32)), "gate_up_w must be [E, 2I, H]"),
    ("dtype-mix", lambda: _bad(hidden=torch.randn(4, 32, dtype=torch.float16)), "share a dtype"),
    ("k-above-E", lambda: _bad(top_k_index=torch.zeros(4, 5, dtype=torch.long), top_k_weights=torch.rand(4, 5)),
     "top-k must be between 1"),
    ("weights-shape", lambda: _bad(top_k_weights=torch.rand(4, 3)), "top_k_weights must be [T, k]"),
    ("float-index", lambda: _bad(top_k_index=torch.zeros(4, 2)), "int32 or int64"),
]


@pytest.mark.parametrize("name, make, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_invalid_inputs_raise(name, make, message):
    with pytest.raises(InvalidInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        moe_experts(**make())


def test_unknown_activation_raises():
    with pytest.raises(InvalidInputError, match="activation must be one of silu"):
        moe_experts(**make_block(4, 32, 16, 4, 2, torch.float32), activation="gelu")


# every kernel path the block takes: pointer loads, TMA loads, TMA stores where the output is in
# expert order
CONFIG_SETS = [
    ("pointers", dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)),
    ("tma", dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, TMA_LOAD=True)),
    ("tma-store", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, TMA_LOAD=True, TMA_STORE=True)),
]


@pytest.mark.parametrize("name, fields", CONFIG_SETS, ids=[c[0] for c in CONFIG_SETS])
def test_block_kernel_paths(name, fields, monkeypatch):
    from moe_tune.problem import KernelConfig

    def configs(E, H, I, topk, dtype, num_tokens, info):
        out = {}
        for (gemm, pass_), problem in block._problems(E, H, I, topk, "float32").items():
            # TMA stores never apply to scattered outputs
            store = fields.get("TMA_STORE", False) and (gemm, pass_) in (("up", "forward"), ("down", "dx"),
                                                                         ("up", "dw"), ("down", "dw"))
            out[gemm, pass_] = KernelConfig(**{**fields, "TMA_STORE": store}, GROUP_M=2, num_warps=1, num_stages=1)
        return out

    monkeypatch.setattr(block, "block_configs", configs)
    T, H, I, E, k = 11, 64, 48, 4, 2
    inputs = make_block(T, H, I, E, k, torch.float32)
    grad_out = torch.randn(T, H)
    out, grads = run_block(moe_experts, inputs, grad_out)
    ref_inputs = {n: t.double() if t.is_floating_point() else t for n, t in inputs.items()}
    ref, ref_grads = run_block(reference_moe_experts, ref_inputs, grad_out.double())
    assert relative_error(out, ref) < 1e-5
    for grad_name in ("hidden", "gate_up_w", "down_w"):
        assert relative_error(grads[grad_name], ref_grads[grad_name]) < 1e-5, grad_name
    assert_weight_grad_close(grads["top_k_weights"], ref_grads["top_k_weights"], inputs, grad_out, torch.float32)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_backward_frees_h_and_dh_before_the_weight_gradients(monkeypatch, compiled):
    """Eager, H [M, 2I] is handed to the backward, not saved; under torch.compile the backward is
    three ops, and the graph drops H after the first. Either way H must be gone before dW1 and
    dH before dW2 (the block's memory peak is at the weight gradients)."""
    T, H, I, E, k = 9, 40, 24, 4, 2
    inputs = make_block(T, H, I, E, k, torch.float32)
    alive_at_dw, _, (out, grads) = alive_at_each_dw(
        monkeypatch, block, moe_experts, lambda fn: run_block(fn, inputs, torch.randn(T, H)),
        lambda made: [ref() is not None for shape, ref in made if shape == (T * k, 2 * I)], compiled=compiled)
    # [M, 2I] buffers: the forward's H, then the backward's dH
    assert alive_at_dw == [[False, True], [False, False]]
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_backward_twice_is_a_clear_error():
    T, H, I, E, k = 5, 32, 16, 4, 2
    leaves = {n: t.requires_grad_(n in DIFFERENTIABLE) for n, t in make_block(T, H, I, E, k, torch.float32).items()}
    out = moe_experts(**leaves)
    out.backward(torch.randn(T, H), retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        out.backward(torch.randn(T, H))


def test_non_reentrant_checkpoint_frees_h_and_matches(monkeypatch):
    """Under torch.utils.checkpoint(use_reentrant=False) the block saves H through the saved-tensor
    hooks (handing it over would keep it alive from forward to backward, defeating the
    checkpoint): the forward's H is gone once the forward returns, and the recomputed block gives
    the plain block's gradients."""
    from torch.utils.checkpoint import checkpoint

    T, H, I, E, k = 9, 40, 24, 4, 2
    inputs = make_block(T, H, I, E, k, torch.float32)
    grad_out = torch.randn(T, H)
    plain_out, plain_grads = run_block(moe_experts, inputs, grad_out)
    made = track_allocations(monkeypatch, block)
    leaves = {name: t.clone().requires_grad_(name in DIFFERENTIABLE) for name, t in inputs.items()}
    out = checkpoint(lambda **kw: moe_experts(**kw), use_reentrant=False, **leaves)
    first_h = [ref for shape, ref in made if shape == (T * k, 2 * I)]
    assert len(first_h) == 1 and first_h[0]() is None  # dropped by the checkpoint, not kept by the block
    grads = dict(zip(DIFFERENTIABLE, torch.autograd.grad(out, [leaves[n] for n in DIFFERENTIABLE], grad_out)))
    assert relative_error(out, plain_out) < 1e-6
    for name in DIFFERENTIABLE:
        assert relative_error(grads[name], plain_grads[name]) < 1e-6, name
