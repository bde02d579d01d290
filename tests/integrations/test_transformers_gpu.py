"""moe-tune against transformers' own ``grouped_mm`` experts on a CUDA GPU, bf16: a Qwen3-MoE
sparse block (eager and ``torch.compile(fullgraph=True)``), a few optimizer steps of a tiny
Qwen3-MoE causal LM, peak memory, and no autotuning on the way.

Models come from small random configs (no download). Run:
``python -m pytest -m gpu tests/integrations -q``.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from transformers import Qwen3MoeConfig  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM  # noqa: E402

from moe_tune.integrations.transformers import register  # noqa: E402
from moe_tune.reference import relative_error  # noqa: E402

import qwen3_blocks  # noqa: E402
from qwen3_blocks import qwen3_config  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::moe_tune.errors.CacheWarning")]

# Relative-error bounds between two bf16 implementations (each rounds H, A and the down output
# at different points); the router's gradient is a difference of near-equal terms through the
# softmax, so it gets twice the room.
TOL = {"out": 1e-2, "hidden": 1e-2, "experts.gate_up_proj": 1e-2, "experts.down_proj": 1e-2, "gate.weight": 2e-2}


SMALL = dict(hidden_size=512, moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4,
             norm_topk_prob=True, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=512, max_position_embeddings=256)


def block_config(**overrides) -> Qwen3MoeConfig:
    return qwen3_config(SMALL, **overrides)


def block_pair(config):
    """(transformers grouped_mm block, moe-tune block), same random bf16 weights, on the GPU."""
    return qwen3_blocks.block_pair(config, reference="grouped_mm", std=0.02, device="cuda", dtype=torch.bfloat16)


def fwd_bwd(block, x, grad):
    x = x.clone().requires_grad_()
    out = block(x)
    out.backward(grad)
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in block.named_parameters()}
    return {"out": out.detach(), "hidden": x.grad, **grads}


def assert_close(ours, ref):
    assert set(ours) == set(TOL)
    for name, bound in TOL.items():
        assert relative_error(ours[name], ref[name]) < bound, name


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_sparse_block_matches_grouped_mm(compiled):
    config = block_config()
    ref, ours = block_pair(config)
    if compiled:
        torch._dynamo.reset()
        ours = torch.compile(ours, fullgraph=True)
    x = torch.randn(4, 256, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    assert_close(fwd_bwd(ours, x, grad), fwd_bwd(ref, x, grad))


def train_losses(model, batches) -> list[float]:
    """One AdamW step per batch; the loss of each."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_training_steps_match_grouped_mm():
    register()
    torch.manual_seed(0)
    ref = Qwen3MoeForCausalLM(block_config()).to("cuda", torch.bfloat16)
    ours = copy.deepcopy(ref)
    ref.set_experts_implementation("grouped_mm")
    ours.set_experts_implementation("moe_tune")
    batches = [torch.randint(0, 512, (4, 128), device="cuda") for _ in range(5)]
    losses = {}
    for name, model in (("grouped_mm", ref), ("moe_tune", ours)):
        losses[name] = train_losses(model, batches)
    assert losses["moe_tune"][-1] < losses["moe_tune"][0]  # it trains
    for ref_loss, our_loss in zip(losses["grouped_mm"], losses["moe_tune"]):
        assert our_loss == pytest.approx(ref_loss, rel=2e-2)


def test_cuda_graphs_train_like_the_eager_block():
    """MOE_TUNE_CUDA_GRAPHS: five AdamW steps (weights updated in place between replays) of a tiny
    causal LM at 128 tokens per step, each layer's experts graphed from step 2 on, against the same
    steps eager."""
    from moe_tune.ops import graphs

    register()
    torch.manual_seed(0)
    eager = Qwen3MoeForCausalLM(block_config()).to("cuda", torch.bfloat16)
    eager.set_experts_implementation("moe_tune")
    graphed = copy.deepcopy(eager)
    batches = [torch.randint(0, 512, (1, 128), device="cuda") for _ in range(5)]
    losses = {}
    graphs.reset()
    try:
        for name, model in (("eager", eager), ("graphed", graphed)):
            graphs.enable(name == "graphed")
            losses[name] = train_losses(model, batches)
        assert sum(len(key.pairs) for key in graphs._KEYS.values()) == 2  # one pair per layer, replayed
    finally:
        graphs.enable(False)
        graphs.reset()
    assert losses["graphed"][-1] < losses["graphed"][0]
    for eager_loss, graphed_loss in zip(losses["eager"], losses["graphed"]):
        assert graphed_loss == pytest.approx(eager_loss, rel=5e-3)


def test_compiled_causal_lm_trains_without_graph_breaks():
    register()
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(block_config()).to("cuda", torch.bfloat16)
    model.set_experts_implementation("moe_tune")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    ids = torch.randint(0, 512, (2, 64), device="cuda")
    eager_loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-2)


def test_peak_memory_not_above_grouped_mm():
    config = block_config(hidden_size=1024, moe_intermediate_size=512, num_experts=32, num_experts_per_tok=8)
    ref, ours = block_pair(config)
    x = torch.randn(1, 2048, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    peaks = {}
    for name, block in (("grouped_mm", ref), ("moe_tune", ours)):
        fwd_bwd(block, x, grad)  # warm: kernels compiled, caches read
        block.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(block, x, grad)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        block.zero_grad(set_to_none=True)
    assert peaks["moe_tune"] <= peaks["grouped_mm"], peaks


def test_no_autotuning_through_the_transformers_path(monkeypatch):
    import triton
    import triton.runtime.autotuner

    def forbidden(*args, **kwargs):
        raise AssertionError("moe-tune benchmarked or autotuned at run time")

    monkeypatch.setattr(triton.testing, "do_bench", forbidden)
    monkeypatch.setattr(triton.runtime.autotuner.Autotuner, "run", forbidden)
    config = block_config()
    _, ours = block_pair(config)
    x = torch.randn(2, 64, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    result = fwd_bwd(ours, x, torch.ones_like(x))
    torch.cuda.synchronize()
    assert all(torch.isfinite(t).all() for t in result.values())
