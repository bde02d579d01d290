"""moe-tune as a transformers v5 experts implementation, in Triton's CPU interpreter (float32).

Skipped when transformers is not installed. Models are built from small random configs (no
download). The reference is transformers' own eager experts loop.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from transformers import Qwen3MoeConfig  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM  # noqa: E402

from moe_tune.integrations.transformers import UnsupportedExpertsLayout, register  # noqa: E402
from moe_tune.reference import relative_error  # noqa: E402

import qwen3_blocks  # noqa: E402
from qwen3_blocks import qwen3_config  # noqa: E402

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests; GPU has its own"),
    pytest.mark.filterwarnings("ignore::moe_tune.errors.CacheWarning"),
]

TOL = 1e-5  # float32 in the interpreter: summation order only


TINY = dict(hidden_size=32, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=True, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, vocab_size=64, max_position_embeddings=64)


def tiny_config(**overrides) -> Qwen3MoeConfig:
    return qwen3_config(TINY, **overrides)


def block_pair(config):
    """(transformers eager block, moe-tune block) with the same random weights."""
    return qwen3_blocks.block_pair(config, reference="eager", std=0.3)


def fwd_bwd(block, x, grad):
    x = x.clone().requires_grad_()
    out = block(x)
    out.backward(grad)
    # A compiled module names its parameters "_orig_mod.<name>".
    return out.detach(), x.grad, {n.removeprefix("_orig_mod."): p.grad for n, p in block.named_parameters()}


def assert_same(a, b, tol=TOL):
    out_a, dx_a, grads_a = a
    out_b, dx_b, grads_b = b
    assert relative_error(out_a, out_b) < tol
    assert relative_error(dx_a, dx_b) < tol
    assert set(grads_a) == {"experts.gate_up_proj", "experts.down_proj", "gate.weight"}
    for name in grads_a:  # gate.weight: the router's gradient flows through top_k_weights
        assert relative_error(grads_a[name], grads_b[name]) < tol, name


def test_register_makes_the_name_valid_for_models():
    name = register()
    assert name == register() == "moe_tune"  # idempotent
    model = Qwen3MoeForCausalLM(tiny_config())
    model.set_experts_implementation("moe_tune")
    assert model.config._experts_implementation == "moe_tune"


@pytest.mark.parametrize("T", [1, 9], ids=["one-token", "nine-tokens"])
def test_sparse_block_matches_transformers_eager(T):
    config = tiny_config()
    ref, ours = block_pair(config)
    x = torch.randn(1, T, config.hidden_size)
    grad = torch.randn_like(x)
    assert_same(fwd_bwd(ours, x, grad), fwd_bwd(ref, x, grad))


def test_sparse_block_compiles_fullgraph():
    config = tiny_config()
    ref, ours = block_pair(config)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, config.hidden_size)
    grad = torch.randn_like(x)
    assert_same(fwd_bwd(compiled, x, grad), fwd_bwd(ref, x, grad))


def test_causal_lm_loss_and_step_match():
    register()
    torch.manual_seed(0)
    ref = Qwen3MoeForCausalLM(tiny_config())
    ours = copy.deepcopy(ref)
    ours.set_experts_implementation("moe_tune")
    ref.set_experts_implementation("eager")
    ids = torch.randint(0, 64, (2, 8))
    losses = []
    for model in (ref, ours):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert losses[0][0] == pytest.approx(losses[1][0], rel=TOL)
    for name, grad in losses[0][1].items():
        assert relative_error(losses[1][1][name], grad) < 1e-4, name


def test_non_silu_activation_is_refused():
    ref, ours = block_pair(tiny_config(hidden_act="gelu"))
    with pytest.raises(UnsupportedExpertsLayout, match="activation 'gelu'"):
        ours(torch.randn(1, 3, 32))


def test_layout_is_checked_again_when_the_module_changes():
    # The layout check is remembered per module after a first forward that passes; a parameter
    # added later (an expert bias the block would ignore) is seen on the next forward.
    config = tiny_config()
    ref, ours = block_pair(config)
    x = torch.randn(1, 3, config.hidden_size)
    ours(x)
    experts = ours.experts
    experts.gate_up_proj_bias = torch.nn.Parameter(torch.randn(config.num_experts, 2 * config.moe_intermediate_size))
    with pytest.raises(UnsupportedExpertsLayout, match="expert biases"):
        ours(x)
    del experts.gate_up_proj_bias
    assert_same(fwd_bwd(ours, x, torch.ones_like(x)), fwd_bwd(ref, x, torch.ones_like(x)))


def test_no_autotuning_through_the_transformers_path(monkeypatch):
    # Nothing between the model and the kernels may benchmark or autotune: every config comes
    # from the runtime loader (here its heuristic default).
    import triton
    import triton.runtime.autotuner

    def forbidden(*args, **kwargs):
        raise AssertionError("moe-tune benchmarked or autotuned at run time")

    monkeypatch.setattr(triton.testing, "do_bench", forbidden)
    monkeypatch.setattr(triton.runtime.autotuner.Autotuner, "run", forbidden)
    config = tiny_config()
    ref, ours = block_pair(config)
    x = torch.randn(1, 4, config.hidden_size)
    out, dx, grads = fwd_bwd(ours, x, torch.ones_like(x))
    assert torch.isfinite(out).all() and torch.isfinite(dx).all()


def test_causal_lm_compiles_fullgraph():
    # The whole model, router and attention included, traces into one graph with moe-tune's ops.
    register()
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(tiny_config(num_hidden_layers=2))
    model.set_experts_implementation("moe_tune")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 64, (2, 8))
    eager_loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert loss.item() == pytest.approx(eager_loss.item(), rel=TOL)
