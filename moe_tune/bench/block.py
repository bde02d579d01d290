"""The experts block as training runs it — up GEMM, SwiGLU, down GEMM, routing-weight combine —
under moe-tune's kernels against transformers v5's ``grouped_mm`` experts implementation.

Data flow:

1. ``block_skip_reason(family, model)`` — None when the comparison can run: the model is of the
   Qwen3-MoE family (the ``test`` family's tiny preset is built the same way) and transformers v5
   with ``ExpertsInterface`` is installed; else the reason, which the report prints as
   ``skipped: <why>``;
2. ``build_block`` — one ``Qwen3MoeSparseMoeBlock`` from a config with the preset's shapes, created
   on the meta device and materialised on the target device with random weights (no download, no
   host copy of the weights);
3. ``bench_block`` per token count — the router runs once, outside every timer, and its
   ``top_k_index``/``top_k_weights`` are reused by every implementation (same weights, same
   routing). Per implementation: one fwd+bwd to compile and warm up, whose output and gradients
   (hidden states, routing weights, both weight stacks) are compared with transformers' (a sanity
   check); the peak memory one fwd+bwd adds (CUDA); then the timed forward (autograd recording, as
   in training) and forward+backward of a fixed output gradient → ``BlockRow``.
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

from moe_tune.bench.progress import NullProgress, Progress
from moe_tune.bench.results import BLOCK_BASELINE, BlockRow
from moe_tune.bench.timing import Timer
from moe_tune.problem import MoeShape

# Families whose experts block is transformers' Qwen3-MoE block; "test" is the tiny preset, built
# as a Qwen3-MoE block so CI runs this path in Triton's interpreter.
BLOCK_FAMILIES = ("qwen3_moe", "test")
BLOCK_MODEL_FAMILY = "qwen3_moe"  # what build_block builds, whatever the preset's family

# Two bfloat16 implementations with different rounding orders (fp32 SwiGLU and routing-weight
# gradient in moe-tune) differ by up to ~1e-2 each from the exact result; far above that, one of
# them computes something else and its time means nothing.
CHECK_TOLERANCE = {"bfloat16": 5e-2, "float16": 2e-2, "float32": 2e-2}

IMPLEMENTATIONS = (BLOCK_BASELINE, "moe_tune")
COMPILED = "moe_tune+compile"


def block_skip_reason(family: str, model: str) -> str | None:
    """Why the experts-block comparison cannot run for ``model`` here (None: it can)."""
    if family not in BLOCK_FAMILIES:
        return (f"the experts-block comparison builds transformers' Qwen3-MoE block; {model} is a "
                f"{family} model")
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install 'transformers>=5')"
    try:
        from transformers.integrations.moe import ExpertsInterface  # noqa: F401
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: F401
    except ImportError as exc:
        import transformers

        return f"transformers {transformers.__version__} lacks the v5 experts interface ({exc})"
    return None


def implementations(compile_moe_tune: bool = False) -> tuple[str, ...]:
    return IMPLEMENTATIONS + ((COMPILED,) if compile_moe_tune else ())


def build_block(shape: MoeShape, dtype: str, device: str, seed: int = 0):
    """A ``Qwen3MoeSparseMoeBlock`` with ``shape``'s sizes and N(0, 0.02) weights on ``device``."""
    import torch
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from moe_tune.bench.gemms import torch_dtype
    from moe_tune.integrations.transformers import register

    register()
    config = Qwen3MoeConfig(hidden_size=shape.H, moe_intermediate_size=shape.I, num_experts=shape.E,
                            num_experts_per_tok=shape.topk, norm_topk_prob=True)
    # Built on the meta device: the 235B preset's experts are 10 GB in float32, not worth creating
    # on the host only to copy and cast them.
    with torch.device("meta"):
        block = Qwen3MoeSparseMoeBlock(config)
    block = block.to(dtype=torch_dtype(dtype)).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.02, generator=gen)
    return block


def _peak_memory_mib(fn) -> float:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_block(block, shape: MoeShape, tokens: int, *, dtype: str, device: str, timer: Timer,
                progress: Progress | None = None, compile_moe_tune: bool = False,
                seed: int = 0) -> list[BlockRow]:
    """One ``BlockRow`` per implementation at ``tokens`` tokens, transformers' ``grouped_mm`` first."""
    import torch

    from moe_tune.bench.gemms import relative_difference, torch_dtype

    progress = progress or NullProgress()
    dt = torch_dtype(dtype)
    experts = block.experts
    gen = torch.Generator(device=device).manual_seed(seed + tokens)
    x = torch.randn(tokens, shape.H, generator=gen, device=device, dtype=dt)
    with torch.no_grad():
        _, top_k_weights, top_k_index = block.gate(x)
    x.requires_grad_()
    top_k_weights = top_k_weights.detach().requires_grad_()
    grad = torch.randn(tokens, shape.H, generator=gen, device=device, dtype=dt)
    leaves = {"hidden": x, "top_k_weights": top_k_weights, "gate_up_proj": experts.gate_up_proj,
              "down_proj": experts.down_proj}

    def clear(tensors: Sequence[torch.Tensor] = tuple(leaves.values())) -> None:
        # Each backward writes fresh gradients instead of accumulating into old ones (an extra
        # read-modify-write of both weight stacks that a training step does not pay).
        for t in tensors:
            t.grad = None

    rows, reference = [], None
    for label in implementations(compile_moe_tune):
        experts.config._experts_implementation = "grouped_mm" if label == BLOCK_BASELINE else "moe_tune"
        module = torch.compile(experts, fullgraph=True) if label == COMPILED else experts

        def fwd():
            return module(x, top_k_index, top_k_weights)

        def fwd_bwd():
            module(x, top_k_index, top_k_weights).backward(grad)

        # Compile, read caches, allocate; keep what it computed for the sanity check.
        clear()
        out = fwd()
        out.backward(grad)
        results = {"out": out.detach(), **{name: t.grad for name, t in leaves.items()}}
        del out
        if reference is None:
            reference, errors = results, {}
        else:
            errors = {name: relative_difference(results[name], reference[name]) for name in reference}
        del results
        clear()
        peak = _peak_memory_mib(fwd_bwd) if device == "cuda" else None
        clear()
        progress.begin(f"T={tokens} experts block: {label} forward")
        t_fwd = timer(fwd, grad_to_none=list(leaves.values()))
        progress.end()
        progress.begin(f"T={tokens} experts block: {label} forward+backward")
        t_fwd_bwd = timer(fwd_bwd, grad_to_none=list(leaves.values()))
        progress.end()
        clear()
        rows.append(BlockRow(tokens=tokens, implementation=label, fwd=t_fwd, fwd_bwd=t_fwd_bwd, peak_mib=peak,
                             errors=errors, tolerance=CHECK_TOLERANCE[dtype] if errors else None))
    return rows


def config_sources(shape: MoeShape, tokens: int, dtype: str, device: str) -> list[tuple[str, str, str]]:
    """(problem key, config, where it came from) for the six problems the block launches at
    ``tokens`` tokens, as the runtime loader resolves them."""
    from moe_tune import runtime
    from moe_tune.bench.results import ConfigSource
    from moe_tune.device import query_device

    info = query_device(device)
    found = []
    for problem in shape.problems(dtype):
        res = runtime.explain(problem, tokens, info)
        found.append((problem.key, res.config.short(),
                      ConfigSource(res.source, res.path, res.bucket, res.triton).describe()))
    return found
