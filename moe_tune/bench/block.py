"""The experts block as training runs it — up GEMM, SwiGLU, down GEMM, routing-weight combine —
under moe-tune's kernels against transformers v5's ``grouped_mm`` experts implementation, each
eager and (when asked) under ``torch.compile``.

Data flow:

1. ``block_skip_reason(shape, model)`` — None when the comparison can run: the preset's experts
   have the concatenated gate|up SwiGLU layout (every preset but gpt-oss's: Qwen3-MoE, Qwen3-Next,
   OLMoE, Mixtral, DeepSeek's routed experts, GLM-4.5 — transformers v5 runs all of them through
   the same experts computation, which is what is timed; their routers differ, and the router runs
   outside every timer) and transformers v5 with ``ExpertsInterface`` is installed; else the
   reason, which the report prints as ``skipped: <why>``;
2. ``build_block`` — one ``Qwen3MoeSparseMoeBlock`` from a config with the preset's shapes, created
   on the meta device and materialised on the target device with random weights (no download, no
   host copy of the weights);
3. ``block_inputs`` per token count — the router runs once, outside every timer, and its
   ``top_k_index``/``top_k_weights`` are reused by every implementation (same weights, same
   routing);
4. ``prepare`` per implementation — selects it, compiles the experts module when the label says
   so (``fullgraph=True``; where Dynamo refuses, ``fullgraph=False`` and a note saying why), and
   runs one fwd+bwd that compiles and warms up and whose output and gradients are kept for the
   sanity check;
5. ``bench_block`` — per implementation: the sanity check against eager grouped_mm (hidden states,
   routing weights, both weight stacks), the peak memory one fwd+bwd adds (CUDA), the timed
   forward (autograd recording, as in training) and forward+backward of a fixed output gradient
   → ``BlockRow``; a failure is a row with its error. ``moe_tune.bench.host`` reuses 3 and 4.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

from moe_tune.bench.isolation import describe_error, peak_memory_mib, peak_memory_reset, release, reset_compiler
from moe_tune.progress import NullProgress, Progress
from moe_tune.bench.results import BLOCK_BASELINE, BLOCK_IMPLEMENTATIONS, COMPILED, BlockRow, is_baseline
from moe_tune.bench.timing import Timer
from moe_tune.problem import MoeShape

BLOCK_MODEL_FAMILY = "qwen3_moe"  # what build_block builds, whatever the preset's family

# Two bfloat16 implementations with different rounding orders (fp32 SwiGLU and routing-weight
# gradient in moe-tune) differ by up to ~1e-2 each from the exact result; far above that, one of
# them computes something else and its time means nothing.
CHECK_TOLERANCE = {"bfloat16": 5e-2, "float16": 2e-2, "float32": 2e-2}

# transformers' name for each implementation (the label's part before "+compile").
EXPERTS_IMPLEMENTATION = {BLOCK_BASELINE: "grouped_mm", "moe_tune": "moe_tune"}


def block_skip_reason(shape: MoeShape, model: str) -> str | None:
    """Why the experts-block comparison cannot run for ``model`` here (None: it can)."""
    if shape.layout != "concat":
        return (f"the experts-block comparison builds transformers' Qwen3-MoE experts with the preset's shapes; "
                f"{model} has the {shape.layout} layout (benchmarks/bench_gptoss.py times its block)")
    return transformers_missing()


def transformers_missing() -> str | None:
    """Why transformers' v5 experts interface is unavailable (None: it is there)."""
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install 'transformers>=5')"
    try:
        from transformers.integrations.moe import ExpertsInterface  # noqa: F401
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: F401
    except ImportError as exc:
        import transformers

        return f"transformers {transformers.__version__} lacks the v5 experts interface ({exc})"
    return None


def implementations(compile_block: bool = False) -> tuple[str, ...]:
    """Row labels in table order: both implementations eager, and compiled when asked."""
    if compile_block:
        return BLOCK_IMPLEMENTATIONS
    return tuple(label for label in BLOCK_IMPLEMENTATIONS if not label.endswith(COMPILED))


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


@dataclass
class BlockInputs:
    """One token count's inputs, shared by every implementation: hidden states and routing
    (leaves that receive gradients), and the output gradient backpropagated."""

    x: object  # torch.Tensor [T, H], requires grad
    top_k_index: object  # [T, k]
    top_k_weights: object  # [T, k], requires grad
    grad: object  # [T, H]
    leaves: dict  # name → tensor whose .grad a fwd+bwd writes

    def clear(self) -> None:
        # Each backward writes fresh gradients instead of accumulating into old ones (an extra
        # read-modify-write of both weight stacks that a training step does not pay).
        for t in self.leaves.values():
            t.grad = None


def block_inputs(block, shape: MoeShape, tokens: int, dtype: str, device: str, seed: int = 0) -> BlockInputs:
    import torch

    from moe_tune.bench.gemms import torch_dtype

    dt = torch_dtype(dtype)
    gen = torch.Generator(device=device).manual_seed(seed + tokens)
    x = torch.randn(tokens, shape.H, generator=gen, device=device, dtype=dt)
    with torch.no_grad():
        _, top_k_weights, top_k_index = block.gate(x)
    x.requires_grad_()
    top_k_weights = top_k_weights.detach().requires_grad_()
    grad = torch.randn(tokens, shape.H, generator=gen, device=device, dtype=dt)
    experts = block.experts
    return BlockInputs(x, top_k_index, top_k_weights, grad,
                       {"hidden": x, "top_k_weights": top_k_weights, "gate_up_proj": experts.gate_up_proj,
                        "down_proj": experts.down_proj})


@dataclass
class Prepared:
    """An implementation ready to time: ``fwd``/``fwd_bwd`` launch it on the shared inputs;
    ``results``: the first fwd+bwd's output and gradients; ``note``: a compile fallback."""

    fwd: Callable[[], object]
    fwd_bwd: Callable[[], None]
    results: dict
    note: str | None = None


def prepare(block, label: str, inputs: BlockInputs, compile_backend: str = "inductor") -> Prepared:
    """Select ``label``'s implementation, compile it if the label says so, and run one fwd+bwd
    (compile, cache reads, first allocations: outside every timer)."""
    import torch

    experts = block.experts
    experts.config._experts_implementation = EXPERTS_IMPLEMENTATION[label.split("+", 1)[0]]
    compiled = label.endswith(COMPILED)
    note = None
    if compiled:
        reset_compiler()
        module = torch.compile(experts, fullgraph=True, backend=compile_backend, dynamic=False)
    else:
        module = experts

    def first_call():
        inputs.clear()
        out = module(inputs.x, inputs.top_k_index, inputs.top_k_weights)
        out.backward(inputs.grad)
        return {"out": out.detach(), **{name: t.grad for name, t in inputs.leaves.items()}}

    try:
        results = first_call()
    except torch._dynamo.exc.Unsupported as exc:
        if not compiled:
            raise
        # What a user does when fullgraph=True is refused: let Dynamo break the graph.
        note = f"fullgraph=False ({describe_error(exc)})"
        reset_compiler()
        module = torch.compile(experts, backend=compile_backend, dynamic=False)
        results = first_call()
    inputs.clear()

    def fwd():
        return module(inputs.x, inputs.top_k_index, inputs.top_k_weights)

    def fwd_bwd():
        module(inputs.x, inputs.top_k_index, inputs.top_k_weights).backward(inputs.grad)

    return Prepared(fwd, fwd_bwd, results, note)


def bench_block(block, shape: MoeShape, tokens: int, *, dtype: str, device: str, timer: Timer,
                progress: Progress | None = None, compile_block: bool = False, compile_backend: str = "inductor",
                seed: int = 0) -> list[BlockRow]:
    """One ``BlockRow`` per implementation at ``tokens`` tokens, in ``implementations`` order."""
    from moe_tune.bench.gemms import relative_difference

    progress = progress or NullProgress()
    inputs = block_inputs(block, shape, tokens, dtype, device, seed)
    grads = list(inputs.leaves.values())
    rows, reference = [], None
    for label in implementations(compile_block):
        prepared, timed = None, 0  # timed: progress steps ended (two per implementation)
        try:
            progress.begin(f"T={tokens} experts block: {label} first fwd+bwd"
                           + (" (compiling)" if COMPILED in label else ""))
            prepared = prepare(block, label, inputs, compile_backend)
            if reference is None and is_baseline(label):
                reference, errors = prepared.results, {}
            elif reference is None:
                errors = {}
            else:
                errors = {name: relative_difference(prepared.results[name], reference[name]) for name in reference}
            prepared.results = {}
            peak = None
            if device == "cuda":
                base = peak_memory_reset(device)
                prepared.fwd_bwd()
                peak = peak_memory_mib(device, base)
            inputs.clear()
            progress.begin(f"T={tokens} experts block: {label} forward")
            t_fwd = timer(prepared.fwd, grad_to_none=grads)
            progress.end()
            timed += 1
            progress.begin(f"T={tokens} experts block: {label} forward+backward")
            t_fwd_bwd = timer(prepared.fwd_bwd, grad_to_none=grads)
            progress.end()
            timed += 1
            rows.append(BlockRow(tokens=tokens, implementation=label, fwd=t_fwd, fwd_bwd=t_fwd_bwd, peak_mib=peak,
                                 errors=errors, tolerance=CHECK_TOLERANCE[dtype] if errors else None,
                                 note=prepared.note))
        except Exception as exc:  # one failed implementation is a row error; the others still run
            rows.append(BlockRow(tokens=tokens, implementation=label, fwd=None, fwd_bwd=None,
                                 error=describe_error(exc), note=prepared.note if prepared else None))
            for _ in range(2 - timed):
                progress.end()
        finally:
            inputs.clear()
            del prepared
            if COMPILED in label:
                release(device)
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
