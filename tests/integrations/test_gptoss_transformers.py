"""gpt-oss through transformers' experts interface with ``experts_implementation="moe_tune"``, in
Triton's CPU interpreter (float32), against transformers' own eager ``GptOssExperts`` loop.

Skipped when transformers (or its gpt-oss model) is not installed. Models are built from tiny
random configs (no download). The experts' ``limit`` is lowered on the modules so that the tiny
models' pre-activations cross it on both sides; the kernels read it from the module, as they read
``alpha``.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")
modeling_gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")

from transformers import GptOssConfig  # noqa: E402

from moe_tune.integrations.transformers import UnsupportedExpertsLayout, register  # noqa: E402
from moe_tune.reference import relative_error  # noqa: E402

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests; GPU has its own"),
    pytest.mark.filterwarnings("ignore::moe_tune.errors.CacheWarning"),
]

# float32 in the interpreter: summation order only. The router's gradient passes through the
# routing-weight gradient (a dot product over I whose terms cancel) and a softmax: a CI run drew
# 1.05e-5 on one token, hence 5e-5.
TOL = 5e-5
MODEL_TOL = 1e-4  # through two layers of attention and norms

TINY = dict(hidden_size=32, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64, max_position_embeddings=64,
            sliding_window=4)
LIMIT = 0.75  # the tiny blocks' pre-activations have std ~1.5: both tails of both clamps are hit
BLOCK_NAMES = {"experts.gate_up_proj", "experts.gate_up_proj_bias", "experts.down_proj", "experts.down_proj_bias",
               "router.weight", "router.bias"}


def _counted(monkeypatch, owner, name: str) -> list[int]:
    """Replace ``owner.name`` with a wrapper that appends to the returned list on every call."""
    calls = []
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.fixture
def block_calls(monkeypatch) -> list[int]:
    """Counts the moe-tune blocks the integration runs (a test comparing eager with eager would
    pass vacuously)."""
    from moe_tune.integrations import transformers as integration

    return _counted(monkeypatch, integration, "gptoss_experts")


def tiny_config(**overrides) -> GptOssConfig:
    return GptOssConfig(**{**TINY, **overrides})


def lower_limits(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, modeling_gpt_oss.GptOssExperts):
            module.limit = LIMIT


def set_impl(model: torch.nn.Module, name: str) -> None:
    for module in model.modules():
        if isinstance(module, modeling_gpt_oss.GptOssExperts):
            module.config._experts_implementation = name


def mlp_pair(std: float = 0.3):
    """(transformers eager GptOssMLP, moe-tune GptOssMLP), same random weights."""
    register()
    ref = modeling_gpt_oss.GptOssMLP(tiny_config())
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=std)
    lower_limits(ref)
    ours = copy.deepcopy(ref)
    set_impl(ref, "eager")
    set_impl(ours, "moe_tune")
    return ref, ours


def fwd_bwd(mlp, x, grad):
    x = x.clone().requires_grad_()
    out, _router_scores = mlp(x)
    out.backward(grad)
    # A compiled module names its parameters "_orig_mod.<name>".
    return out.detach(), x.grad, {n.removeprefix("_orig_mod."): p.grad for n, p in mlp.named_parameters()}


def assert_same(a, b, tol=TOL):
    out_a, dx_a, grads_a = a
    out_b, dx_b, grads_b = b
    assert relative_error(out_a, out_b) < tol
    assert relative_error(dx_a, dx_b) < tol
    assert set(grads_a) == BLOCK_NAMES
    for name in grads_a:  # router.*: the router's gradient flows through top_k_weights
        assert relative_error(grads_a[name], grads_b[name]) < tol, name


def test_register_makes_the_name_valid_for_gpt_oss():
    register()
    model = modeling_gpt_oss.GptOssForCausalLM(tiny_config())
    model.set_experts_implementation("moe_tune")
    assert model.config._experts_implementation == "moe_tune"


@pytest.mark.parametrize("T", [1, 9], ids=["one-token", "nine-tokens"])
def test_sparse_block_matches_transformers_eager(T, block_calls):
    ref, ours = mlp_pair()
    x = torch.randn(1, T, TINY["hidden_size"])
    grad = torch.randn_like(x)
    assert_same(fwd_bwd(ours, x, grad), fwd_bwd(ref, x, grad))
    assert len(block_calls) == 1


def tiny_causal_lm():
    """A seeded tiny ``GptOssForCausalLM``, every weight and bias random (a zero bias would leave
    its gradient's layout untested), limits lowered."""
    register()
    torch.manual_seed(0)
    model = modeling_gpt_oss.GptOssForCausalLM(tiny_config())
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, std=0.3 if "experts" in name or "router" in name else 0.1)
    lower_limits(model)
    return model


def test_tiny_gpt_oss_for_causal_lm_matches_eager_in_loss_and_every_gradient(block_calls):
    ref = tiny_causal_lm()
    ours = copy.deepcopy(ref)
    ref.set_experts_implementation("eager")
    ours.set_experts_implementation("moe_tune")
    ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    results = []
    for model in (ref, ours):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), (loss, grads) = results
    assert len(block_calls) == TINY["num_hidden_layers"]
    assert loss == pytest.approx(ref_loss, rel=TOL)
    assert set(grads) == set(ref_grads)
    expert_params = [n for n in ref_grads if ".mlp.experts." in n]
    assert len(expert_params) == 4 * TINY["num_hidden_layers"]  # both weights and both biases per layer
    for name, ref_grad in ref_grads.items():
        assert ref_grad is not None and grads[name] is not None, name
        assert relative_error(grads[name], ref_grad) < MODEL_TOL, name


def test_limit_and_alpha_are_read_from_the_module(block_calls):
    ref, ours = mlp_pair()
    for mlp in (ref, ours):
        mlp.experts.limit, mlp.experts.alpha = 0.4, 2.5
    x = torch.randn(1, 6, TINY["hidden_size"])
    grad = torch.randn_like(x)
    assert_same(fwd_bwd(ours, x, grad), fwd_bwd(ref, x, grad))
    assert len(block_calls) == 1


def test_compiles_without_graph_breaks():
    # The interpreter's ops are opaque: Dynamo traces the experts interface, the layout checks and
    # the block whole; Inductor tracing into the kernels is exercised by the GPU tests.
    torch._dynamo.reset()
    ref, ours = mlp_pair()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 7, TINY["hidden_size"])
    grad = torch.randn_like(x)
    assert_same(fwd_bwd(compiled, x, grad), fwd_bwd(ref, x, grad))


def test_expert_parallel_gpt_oss_is_refused_by_name():
    _, ours = mlp_pair()
    ours.experts._is_expert_parallel = True
    with pytest.raises(UnsupportedExpertsLayout, match="GptOssExperts") as info:
        ours(torch.randn(1, 3, TINY["hidden_size"]))
    assert "expert parallelism" in str(info.value) and "grouped_mm" in str(info.value)


def test_gpt_oss_subclass_with_another_gate_is_refused_by_name():
    class SquaredGateExperts(modeling_gpt_oss.GptOssExperts):
        def _apply_gate(self, gate_up):
            return gate_up[..., ::2] ** 2 * gate_up[..., 1::2]

    register()
    config = tiny_config()
    config._experts_implementation = "moe_tune"
    experts = SquaredGateExperts(config)
    for p in experts.parameters():
        torch.nn.init.normal_(p)
    with pytest.raises(UnsupportedExpertsLayout, match=r"SquaredGateExperts\._apply_gate"):
        experts(torch.randn(3, 32), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2))


@pytest.fixture
def lora_block_calls(monkeypatch) -> list[int]:
    """Counts runs of the fused gpt-oss LoRA block's forward body (eager, and the compiled op's)."""
    from moe_tune.ops import gptoss_lora

    return _counted(monkeypatch, gptoss_lora, "forward")


def peft_model(peft, base, seed: int, impl: str, adapters=("default",)):
    """``base`` under PEFT LoRA on both expert stacks (one adapter per name, the first active), B
    drawn non-zero so the adapters contribute; the same seed gives the same adapters."""
    torch.manual_seed(seed)  # PEFT draws lora_A from the global generator
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[],
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = peft.get_peft_model(copy.deepcopy(base), lora, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, lora)
    with torch.no_grad():  # lora_B starts at zero: give the adapters a real contribution
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
    model.base_model.model.set_experts_implementation(impl)
    return model


def lora_case():
    """(tiny gpt-oss causal LM, token ids [2, 8], adapter seed), fresh for each test."""
    return tiny_causal_lm(), torch.randint(0, TINY["vocab_size"], (2, 8)), int(torch.randint(0, 2**31, ()))


def lora_step(model, ids, run=None) -> tuple[float, dict]:
    """One forward+backward of a PEFT causal LM through ``run`` (default: the model): (loss, the
    trainable parameters' gradients by name, a compiled module's prefix removed)."""
    loss = (model if run is None else run)(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.item(), {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_lora_step(result, reference) -> None:
    """Loss and every trainable gradient of ``result`` as ``reference``'s, to MODEL_TOL."""
    (loss, grads), (ref_loss, ref_grads) = result, reference
    assert loss == pytest.approx(ref_loss, rel=MODEL_TOL)
    assert set(grads) == set(ref_grads)
    for name, ref_grad in ref_grads.items():
        assert relative_error(grads[name], ref_grad) < MODEL_TOL, name


def test_peft_lora_on_the_experts_compiles_and_matches_eager(lora_block_calls):
    """PEFT LoRA (``target_parameters``) on gpt-oss's expert stacks, eager and under torch.compile:
    moe-tune runs the fused LoRA block (``moe_tune.ops.gptoss_lora``), without PEFT's per-forward
    parametrization, so the whole causal LM compiles as one graph (PEFT's registration broke it
    twice per weight), and never builds a tensor of an expert stack's shape (PEFT's W + ΔW, a base
    dW); PEFT on transformers' eager experts does (the check is not vacuous)."""
    from output_shapes import OutputShapes

    peft = pytest.importorskip("peft", minversion="0.17")
    torch._dynamo.reset()
    base, ids, seed = lora_case()
    E, H, I = TINY["num_local_experts"], TINY["hidden_size"], TINY["intermediate_size"]
    stacks = {(E, H, 2 * I), (E, I, H)}
    results = []
    for impl, compile_it in (("eager", False), ("moe_tune", False), ("moe_tune", True)):
        model = peft_model(peft, base, seed, impl)
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compile_it else model
        seen = OutputShapes()
        with seen if not compile_it else contextlib.nullcontext():  # a dispatch mode stops Dynamo
            results.append(lora_step(model, ids, run))
        assert compile_it or bool(seen.shapes & stacks) == (impl == "eager"), impl
    reference, *ours = results
    assert len(lora_block_calls) >= 2 * TINY["num_hidden_layers"]  # both moe-tune models ran the LoRA block
    for result in ours:
        assert len(result[1]) == 4 * TINY["num_hidden_layers"]
        assert_same_lora_step(result, reference)


def test_peft_with_several_active_adapters_keeps_peft_path(block_calls, lora_block_calls):
    """Two active adapters are more than the fused block runs: PEFT's own W + ΔW goes into the plain
    gpt-oss block, and loss and gradients still match PEFT on transformers' eager experts."""
    peft = pytest.importorskip("peft", minversion="0.17")
    base, ids, seed = lora_case()
    results = []
    for impl in ("eager", "moe_tune"):
        model = peft_model(peft, base, seed, impl, adapters=("one", "two"))
        model.base_model.set_adapter(["one", "two"])
        results.append(lora_step(model, ids))
    reference, ours = results
    assert block_calls and not lora_block_calls
    assert len(ours[1]) == 8 * TINY["num_hidden_layers"]
    assert_same_lora_step(ours, reference)


def test_peft_lora_under_gradient_checkpointing(lora_block_calls):
    """LoRA fine-tuning recipes for gpt-oss turn on gradient checkpointing (transformers' default:
    non-reentrant): the fused LoRA block runs again in the recomputed forward (PEFT re-activates the
    adapter there) and gives the LoRA gradients of PEFT on eager experts under the same checkpointing."""
    peft = pytest.importorskip("peft", minversion="0.17")
    base, ids, seed = lora_case()
    results = []
    for impl in ("eager", "moe_tune"):
        model = peft_model(peft, base, seed, impl)
        model.train()
        model.base_model.model.gradient_checkpointing_enable()
        before = len(lora_block_calls)
        results.append(lora_step(model, ids))
        if impl == "moe_tune":  # once per layer in the forward, once more in each recomputation
            assert len(lora_block_calls) - before == 2 * TINY["num_hidden_layers"]
    reference, ours = results
    assert all(g is not None for g in ours[1].values())
    assert_same_lora_step(ours, reference)
