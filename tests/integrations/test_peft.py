"""PEFT's LoRA on the expert parameters with ``experts_implementation="moe_tune"``, in Triton's CPU
interpreter: the same loss and LoRA gradients as transformers' eager experts under PEFT, PEFT's
W + ΔW never built, adapters saved and loaded as before, unsupported adapters refused.

Skipped when transformers or peft is missing. Models are built from small random configs (no
download).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")
peft = pytest.importorskip("peft", minversion="0.17")

from peft import PeftModel  # noqa: E402

from moe_tune.integrations.peft import UnsupportedLoraAdapter  # noqa: E402
from moe_tune.ops import lora_block  # noqa: E402
from moe_tune.reference import relative_error  # noqa: E402

from output_shapes import OutputShapes  # noqa: E402
from peft_models import expert_stack_shapes, lora_config, loss_and_grads, peft_pair  # noqa: E402

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests; GPU has its own"),
    pytest.mark.filterwarnings("ignore::moe_tune.errors.CacheWarning"),
]

TOL = 1e-5  # float32 in the interpreter: summation order only

TINY = dict(hidden_size=32, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=True, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, vocab_size=64, max_position_embeddings=64)


def pair(**kwargs):
    return peft_pair(TINY, reference="eager", **kwargs)


def assert_same_loss_and_grads(ref, ours, ids, tol=TOL):
    ref_loss, ref_grads = loss_and_grads(ref, ids)
    loss, grads = loss_and_grads(ours, ids)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=tol)
    assert set(grads) == set(ref_grads)
    lora_names = [n for n in grads if "lora_" in n]
    assert lora_names  # the LoRA factors of both expert weights of every layer
    for name in lora_names:
        assert relative_error(grads[name], ref_grads[name]) < 10 * tol, name


@pytest.mark.parametrize("targets", [("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
                                     ("mlp.experts.gate_up_proj",), ("mlp.experts.down_proj",)],
                         ids=["both", "gate-up-only", "down-only"])
@pytest.mark.parametrize("r", [4, 3], ids=["r4", "r3"])
def test_loss_and_lora_grads_match_peft_eager(targets, r):
    ref, ours = pair(targets=targets, r=r)
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    assert_same_loss_and_grads(ref, ours, ids)


# E=6 experts at r=4: E != r, so mixing PEFT's expert-major A rows with its rank-major B columns
# cannot cancel out; fp32 rows of r·4 = 16 bytes, the narrowest a TMA descriptor takes.
NON_DEGENERATE = dict(TINY, hidden_size=40, moe_intermediate_size=24, num_experts=6)


def test_same_dtype_adapters_on_tma_loads(monkeypatch):
    # A float32 model keeps float32 adapters: moe-tune cast nothing, and PEFT's permuted lora_B
    # view reached the TMA descriptors (innermost stride taken as 1) as is: lora_A gradients 1.4
    # apart from grouped_mm on an H200. The interpreter's defaults use no TMA: force it.
    configs = lora_block.lora_configs
    monkeypatch.setattr(lora_block, "lora_configs", lambda *args, **kwargs: {
        name: dataclasses.replace(cfg, TMA_LOAD=True) for name, cfg in configs(*args, **kwargs).items()})
    ref, ours = peft_pair(NON_DEGENERATE, reference="eager", r=4)
    assert_same_loss_and_grads(ref, ours, torch.randint(0, TINY["vocab_size"], (2, 7)))


def test_rslora_scaling_matches():
    # use_rslora: scaling = alpha / sqrt(r), read from PEFT's wrapper like any scaling.
    ref, ours = pair(r=4, use_rslora=True)
    assert_same_loss_and_grads(ref, ours, torch.randint(0, TINY["vocab_size"], (1, 5)))


def test_one_token():
    ref, ours = pair()
    assert_same_loss_and_grads(ref, ours, torch.randint(0, TINY["vocab_size"], (1, 2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_peft_delta_is_never_built(dtype):
    # No aten op of the moe-tune step outputs a tensor the shape of an expert stack: neither PEFT's
    # W + ΔW nor a base dW. PEFT's own path on the eager experts does (the check is not vacuous).
    ref, ours = pair(dtype=dtype)
    ids = torch.randint(0, TINY["vocab_size"], (2, 6))
    stacks = expert_stack_shapes(ours)
    with OutputShapes() as seen:
        loss_and_grads(ours, ids)
    assert not seen.shapes & stacks
    with OutputShapes() as seen_ref:
        loss_and_grads(ref, ids)
    assert seen_ref.shapes & stacks


def test_adapter_saves_and_loads_as_before(tmp_path):
    ref, ours = pair()
    ids = torch.randint(0, TINY["vocab_size"], (2, 6))
    with torch.no_grad():
        expected = ours(input_ids=ids, use_cache=False).logits
    ours.save_pretrained(tmp_path)
    _, fresh = pair()  # same base weights (seeded), different adapter weights until loaded
    base = fresh.unload()
    loaded = PeftModel.from_pretrained(base, tmp_path)
    loaded.base_model.model.set_experts_implementation("moe_tune")
    with torch.no_grad():
        logits = loaded(input_ids=ids, use_cache=False).logits
    assert relative_error(logits, expected) < TOL


def test_merged_and_disabled_adapters_run_the_base_path():
    # Merged: PEFT never activates the LoRA, the experts run on W + ΔW folded into W, like PEFT.
    ref, ours = pair()
    ids = torch.randint(0, TINY["vocab_size"], (2, 6))
    with torch.no_grad():
        with ours.disable_adapter(), ref.disable_adapter():
            assert relative_error(ours(input_ids=ids).logits, ref(input_ids=ids).logits) < TOL
        unmerged = ours(input_ids=ids).logits
        ours.merge_adapter()
        ref.merge_adapter()
        merged = ours(input_ids=ids).logits
        assert relative_error(merged, ref(input_ids=ids).logits) < TOL
    assert relative_error(merged, unmerged) < 1e-4


def _add_second_adapter(model, targets=("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
    torch.manual_seed(7)  # PEFT draws lora_A from the global generator: the same adapter on both models
    model.add_adapter("second", lora_config(targets=list(targets)))
    with torch.no_grad():  # lora_B starts at zero: give the adapter a real contribution
        for name, p in model.named_parameters():
            if "lora_B.second" in name:
                p.normal_(std=0.3)
    model.base_model.set_adapter(["default", "second"])


def test_several_active_adapters_run_peft_path():
    """Two active adapters are more than the fused block runs: PEFT's own W + ΔW goes into the plain
    block, with PEFT's loss and gradients for both adapters."""
    ref, ours = pair()
    for model in (ref, ours):
        _add_second_adapter(model)
    assert_same_loss_and_grads(ref, ours, torch.randint(0, TINY["vocab_size"], (2, 6)))


def test_one_weight_fused_and_the_other_not_is_refused():
    """Two adapters active on gate_up_proj's wrapper only: that weight takes PEFT's own path while
    down_proj's runs fused, which the block cannot mix."""
    from peft.tuners.lora.layer import ParamWrapper

    _, ours = pair()
    _add_second_adapter(ours)
    ours.base_model.set_adapter("default")
    for module in ours.modules():
        if isinstance(module, ParamWrapper) and module.parameter_name == "gate_up_proj":
            module.set_adapter(["default", "second"])
    with pytest.raises(UnsupportedLoraAdapter, match="runs fused but the one on gate_up_proj takes PEFT's own path"):
        ours(input_ids=torch.randint(0, TINY["vocab_size"], (1, 4)))


def test_lora_dropout_is_refused():
    # PEFT refuses dropout on expert parameters when the adapter is made; a dropout set on the
    # wrapper afterwards must not slip through as if it were 0.
    _, ours = pair()
    wrapper = ours.base_model.model.model.layers[0].mlp.experts
    wrapper.lora_dropout["default"] = torch.nn.Dropout(0.1)
    with pytest.raises(UnsupportedLoraAdapter, match="LoRA dropout must be 0"):
        ours(input_ids=torch.randint(0, TINY["vocab_size"], (1, 4)))


def test_other_experts_implementations_keep_peft_path():
    # install() reroutes only moe-tune's experts: grouped_mm under PEFT builds W + ΔW as before.
    ref, _ = peft_pair(TINY, reference="grouped_mm")
    with OutputShapes() as seen:
        loss_and_grads(ref, torch.randint(0, TINY["vocab_size"], (1, 4)))
    assert seen.shapes & expert_stack_shapes(ref)


def test_compiles_whole_and_matches_eager():
    # PEFT's own activation registers a parametrization every forward (two graph breaks per
    # wrapped weight); the fused path sets one attribute, so the whole causal LM traces as one
    # graph and gives the eager fused path's loss and LoRA gradients.
    _, ours = pair()
    ids = torch.randint(0, TINY["vocab_size"], (2, 6))
    loss, grads = loss_and_grads(ours, ids)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    compiled_loss, compiled_grads = loss_and_grads(compiled, ids)
    compiled_grads = {name.removeprefix("_orig_mod."): grad for name, grad in compiled_grads.items()}
    assert compiled_loss.item() == pytest.approx(loss.item(), rel=TOL)
    lora_names = [n for n in grads if "lora_" in n]
    assert lora_names and set(compiled_grads) == set(grads)
    for name in lora_names:
        assert relative_error(compiled_grads[name], grads[name]) < 10 * TOL, name
    experts = ours.base_model.model.model.layers[0].mlp.experts.get_base_layer()
    assert not hasattr(experts, "_moe_tune_lora")  # the module is left as found after the forward


def test_later_steps_reuse_the_compiled_graph():
    """A step leaves nothing on the experts modules that the compiled graph's guards see: the
    second and third steps run the first step's graph (an attribute left behind once cost a
    recompile of the whole model)."""
    from torch._dynamo.utils import counters

    _, ours = pair()
    ids = torch.randint(0, TINY["vocab_size"], (2, 6))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        loss_and_grads(compiled, ids)
    assert counters["stats"]["unique_graphs"] == 1
