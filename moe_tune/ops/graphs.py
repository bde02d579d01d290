"""CUDA graphs around the eager experts block, for micro-batches small enough that a training step
waits on the host. Opt-in: ``MOE_TUNE_CUDA_GRAPHS=1`` in the environment, or ``enable()``.

At a few hundred tokens the block's GPU work is short and its host work (Python, a dozen launches,
autograd) sets its pace. In an eager training step the host sets the pace well beyond that: the GPU
waits for the host while it runs the attention and norm modules around the experts, so the block's
host time lies on the step's path at 4096 tokens too (BENCHMARKS.md, twenty-first session). Graphed, a forward is one launch copying its three inputs in, one replay
and one launch copying its output out; a backward is one copy in, one replay, one launch copying
its input gradients out and the weight gradients' launches. Those launches are bound to the pair's
buffers at capture (``launch.BoundLaunch``: the arguments built once, fresh tensors swapped in per
call).

What one graph pair holds, per *key* — the weights (by address), the token count, k, the dtypes,
which inputs want gradients and torch's float32 matmul precision:

* forward (``block.forward`` on static copies of hidden, top_k_index, top_k_weights): routing, up
  GEMM, SwiGLU, down GEMM, slot sum;
* backward (``block.backward_act``, and ``block.backward_up`` for d hidden only, on a static copy
  of the output gradient): down dx, SwiGLU backward, up dx and its slot sum, and the rows the
  weight gradients read, copied to expert order (``block.expert_rows``). The two weight-gradient
  GEMMs are launched eagerly after the replay, into fresh tensors: a graph's outputs live in its
  private memory, and weight-sized gradients there would double every layer's gradient memory.

Rules:

* a key is graphed on its second call; the first runs eagerly (kernels compile, configs load);
* only up to ``MAX_ROWS`` routed rows (T·k; 4096 tokens at k = 8): each graph pair keeps its
  activations (H, the routing, the slot rows) allocated between steps, and beyond a few thousand
  tokens a layer's GPU work outlasts the host work around it, so the host time saved no longer
  shortens a step;
* a forward's static buffers must survive until its backward: a key holds up to ``INSTANCES``
  graph pairs, each leased from its forward to the end of its backward (or until autograd drops
  the forward's graph), and a forward that finds every pair leased runs eagerly (gradient
  accumulation over several forwards, pipeline schedules);
* never under torch.compile, while a stream is capturing, while saved-tensor hooks are active
  (non-reentrant checkpointing, offloading: they must see what the backward reads), off CUDA;
* the pairs' buffers together stay under ``MOE_TUNE_CUDA_GRAPHS_MIB`` (default 4096 MiB, counted as
  the device memory each capture leaves allocated): once it is reached, shapes not yet graphed run
  eagerly (one ``GraphWarning``); graphed ones stay graphed, so the choice never thrashes;
* at most ``MAX_KEYS`` keys, least recently used dropped first (a weight re-materialised at a new
  address each step, as FSDP can, makes a new key each step: such a model gains nothing here);
* the tensors must be on the current CUDA device (the graphs are captured and replayed there);
* a capture that fails turns graphs off for its key, with one ``GraphWarning``; the call runs eagerly.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import OrderedDict

import torch

from moe_tune import runtime
from moe_tune.device import query_device
from moe_tune.errors import InvalidInputError
from moe_tune.ops import block, launch
from moe_tune.ops.routing import Routing
from moe_tune.ops.rows import bind_copies

ENV_VAR = "MOE_TUNE_CUDA_GRAPHS"
BUDGET_ENV_VAR = "MOE_TUNE_CUDA_GRAPHS_MIB"
DEFAULT_BUDGET_MIB = 4096
MAX_ROWS = 32768
INSTANCES = 2
MAX_KEYS = 512

_enabled: bool | None = None  # None: read ENV_VAR on first use


class GraphWarning(UserWarning):
    """A CUDA-graph capture failed; the key it was for runs eagerly from then on."""


def enable(on: bool = True) -> None:
    """Turn CUDA graphs for the eager experts block on (or off), overriding ``MOE_TUNE_CUDA_GRAPHS``."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")
    return _enabled


@contextlib.contextmanager
def switched(on: bool):
    """CUDA graphs on (or off) within, as they were after (the graphs captured within are kept)."""
    before = enabled()
    enable(on)
    try:
        yield
    finally:
        enable(before)


def budget_bytes() -> int:
    """The memory all graph pairs may hold together (``MOE_TUNE_CUDA_GRAPHS_MIB``)."""
    raw = os.environ.get(BUDGET_ENV_VAR, "").strip()
    try:
        mib = float(raw) if raw else DEFAULT_BUDGET_MIB
    except ValueError:
        mib = -1.0
    if not mib >= 0.0:  # also NaN
        raise InvalidInputError(f"{BUDGET_ENV_VAR} must be a number of MiB ≥ 0, got {raw!r}")
    return int(mib * 2**20)


def held_bytes() -> int:
    """What the graph pairs now kept hold (counted at capture)."""
    return sum(pair.bytes for key in _KEYS.values() for pair in key.pairs)


def reset() -> None:
    """Drop every captured graph (their memory is freed once no pending backward holds one)."""
    global _budget_warned
    _KEYS.clear()
    _budget_warned = False


class _Pair:
    """One forward graph and its backward graph, with their static buffers."""

    def __init__(self, hidden, top_k_index, top_k_weights):
        self.hidden = torch.empty_like(hidden)
        self.top_k_index = torch.empty_like(top_k_index)
        self.top_k_weights = torch.empty_like(top_k_weights)
        self.grad_out = torch.empty_like(hidden)
        self.leased = False
        self.bytes = 0
        self.forward_graph = self.backward_graph = None
        self.dw_launches: tuple = (None, None)
        # The copies in and out of the static buffers, each one bound launch (torch's copies are
        # one cudaMemcpyAsync each, ~20-50 µs of host time on an H200 machine's host)
        self.copy_in = bind_copies((self.hidden, self.top_k_index, self.top_k_weights),
                                   (self.hidden, self.top_k_index, self.top_k_weights), "sources")
        self.grad_in = bind_copies((self.grad_out,), (self.grad_out,), "sources")
        self.copy_out = None  # the forward's output (bound at capture)
        self.grads_out = None  # the backward's d hidden and d top_k_weights, those wanted

    def capture(self, gate_up_w, down_w, needs: tuple[bool, ...]) -> None:
        """Run the bodies once on a side stream (every launch compiled and loaded), then capture."""
        self.grad_out.zero_()
        E, H, I, k = block.problem_dims(gate_up_w, self.top_k_index.shape[1])
        T = self.hidden.shape[0]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # the captured bodies (the dW are not captured: see below)
            warm = self._forward(gate_up_w, down_w)
            if any(needs):
                self._backward(warm, gate_up_w, down_w, needs)
            del warm
        torch.cuda.current_stream().wait_stream(side)
        self.forward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.forward_graph, capture_error_mode="thread_local"):
            self.out, self.h, self.offsets, self.slots = saved = self._forward(gate_up_w, down_w)
        self.copy_out = bind_copies((self.out,), (self.out,), "destinations")
        if any(needs):
            self.backward_graph = torch.cuda.CUDAGraph()
            # One pool for both: the backward may reuse what the forward freed (its SwiGLU output,
            # slot rows), which the forward writes again only after this pair's backward is done.
            with torch.cuda.graph(self.backward_graph, pool=self.forward_graph.pool(),
                                  capture_error_mode="thread_local"):
                (self.d_act, self.d_h, self.d_weights, self.d_hidden, self.x_sorted,
                 self.g_sorted) = self._backward(saved, gate_up_w, down_w, needs)
            need_hidden, need_gate_up, need_down, need_weights = needs
            wanted = tuple(t for t, need in ((self.d_hidden, need_hidden), (self.d_weights, need_weights)) if need)
            self.grads_out = bind_copies(wanted, wanted, "destinations") if wanted else None
            # The weight gradients' launches, bound to this pair's buffers with their configs: a
            # backward allocates each gradient and launches into it (the first launch compiles
            # or loads the kernel, outside any capture).
            routing = Routing(self.offsets, self.slots, T, k)
            info = query_device(self.hidden.device)
            cfg = block.block_configs(E, H, I, k, gate_up_w.dtype, T, info)
            self.dw_launches = (
                launch.bind_grouped_mm_dw(self.d_h, self.x_sorted, gate_up_w, routing, cfg["up", "dw"], info)
                if need_gate_up else None,
                launch.bind_grouped_mm_dw(self.g_sorted, self.d_act, down_w, routing, cfg["down", "dw"], info)
                if need_down else None)

    def _forward(self, gate_up_w, down_w):
        return block.forward(self.hidden, gate_up_w, down_w, self.top_k_index, self.top_k_weights, in_op=False)

    def _backward(self, saved, gate_up_w, down_w, needs):
        need_hidden, need_gate_up, need_down, _ = needs
        _, h, offsets, slots = saved
        k = self.top_k_index.shape[1]
        d_act, d_h, d_weights = block.backward_act(self.grad_out, down_w, self.top_k_weights, h, offsets, slots,
                                                   in_op=False)
        d_hidden = None
        if need_hidden:
            d_hidden, _ = block.backward_up(d_h, self.hidden, gate_up_w, offsets, slots, k, need_hidden=True,
                                            need_gate_up=False, in_op=False)
        x_sorted = block.expert_rows(self.hidden, slots, k) if need_gate_up else None
        g_sorted = block.expert_rows(self.grad_out, slots, k) if need_down else None
        return d_act, d_h, d_weights, d_hidden, x_sorted, g_sorted


class _Key:
    """What one key holds: how often it was called, its graph pairs, whether capture failed."""

    def __init__(self):
        self.calls = 0
        self.pairs: list[_Pair] = []
        self.failed = False


_KEYS: OrderedDict[tuple, _Key] = OrderedDict()
_budget_warned = False


class _Lease:
    """A pair's static buffers held for one forward's backward; released by the backward, or when
    autograd drops the forward's graph (this object goes with the Function's context)."""

    def __init__(self, pair: _Pair):
        pair.leased = True
        self.pair = pair

    def release(self) -> None:
        if self.pair is not None:
            self.pair.leased = False
            self.pair = None

    __del__ = release


def _eligible(hidden, top_k_index) -> bool:
    return (enabled() and not launch.INTERPRETED and hidden.is_cuda
            and 0 < hidden.shape[0] * top_k_index.shape[1] <= MAX_ROWS
            and hidden.device.index == launch.current_device()
            and not torch.cuda.is_current_stream_capturing() and block.hands_over())


def _pair_for(hidden, gate_up_w, down_w, top_k_index, top_k_weights, needs) -> _Pair | None:
    key = (hidden.shape, hidden.dtype, hidden.device, top_k_index.shape, top_k_index.dtype, top_k_weights.dtype,
           gate_up_w.shape, gate_up_w.data_ptr(), down_w.shape, down_w.data_ptr(), needs, runtime.generation(),
           torch.get_float32_matmul_precision())  # float32 products follow it (launch.dot_precision)
    entry = _KEYS.get(key)
    if entry is None:
        entry = _KEYS[key] = _Key()
        while len(_KEYS) > MAX_KEYS:
            _KEYS.popitem(last=False)
    else:
        _KEYS.move_to_end(key)
    entry.calls += 1
    if entry.failed or entry.calls < 2:
        return None
    for pair in entry.pairs:
        if not pair.leased:
            return pair
    if len(entry.pairs) >= INSTANCES or not _within_budget():
        return None
    allocated = torch.cuda.memory_allocated(hidden.device)
    try:
        pair = _Pair(hidden, top_k_index, top_k_weights)
        pair.copy_in(hidden, top_k_index, top_k_weights)
        with torch.no_grad():  # the bodies' torch ops record nothing for autograd
            pair.capture(gate_up_w, down_w, needs)
    except Exception as exc:  # graphs are a speed-up only: the call runs eagerly
        entry.failed = True
        warnings.warn(f"moe-tune: CUDA-graph capture of the experts block failed ({type(exc).__name__}: {exc}); "
                      f"this shape runs eagerly", GraphWarning, stacklevel=4)
        return None
    pair.bytes = torch.cuda.memory_allocated(hidden.device) - allocated
    entry.pairs.append(pair)
    return pair


def _within_budget() -> bool:
    global _budget_warned
    if held_bytes() < budget_bytes():
        return True
    if not _budget_warned:
        _budget_warned = True
        warnings.warn(f"moe-tune: the experts block's CUDA graphs hold {held_bytes() / 2**20:.0f} MiB, the budget "
                      f"({BUDGET_ENV_VAR}={budget_bytes() / 2**20:.0f}); shapes not yet graphed run eagerly",
                      GraphWarning, stacklevel=5)
    return False


def experts_block(hidden, gate_up_w, down_w, top_k_index, top_k_weights) -> torch.Tensor | None:
    """The graphed block's output, or None where graphs do not apply (the caller runs eagerly).
    Arguments as ``moe_tune.ops.moe_experts`` passes them: checked and contiguous."""
    if not _eligible(hidden, top_k_index):
        return None
    grad = torch.is_grad_enabled()
    needs = tuple(grad and t.requires_grad for t in (hidden, gate_up_w, down_w, top_k_weights))
    pair = _pair_for(hidden, gate_up_w, down_w, top_k_index, top_k_weights, needs)
    if pair is None:
        return None
    return _GraphedBlock.apply(hidden, gate_up_w, down_w, top_k_index, top_k_weights, pair, needs)


def _launched_into(bound: launch.BoundLaunch | None, weight: torch.Tensor) -> torch.Tensor | None:
    """A fresh gradient for ``weight`` (contiguous, as ``moe_experts`` passes it), written by
    ``bound``; None where that gradient is not needed."""
    if bound is None:
        return None
    d_weight = block._alloc(tuple(weight.shape), weight.dtype, weight.device)
    bound(d_weight)
    return d_weight


class _GraphedBlock(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, gate_up_w, down_w, top_k_index, top_k_weights, pair: _Pair, needs):
        pair.copy_in(hidden, top_k_index, top_k_weights)
        pair.forward_graph.replay()
        ctx.lease = _Lease(pair) if any(needs) else None
        ctx.needs = needs
        ctx.save_for_backward(gate_up_w, down_w)
        out = torch.empty_like(pair.out)
        pair.copy_out(out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        lease, ctx.lease = ctx.lease, None
        if lease is None or lease.pair is None:
            raise RuntimeError("moe-tune's graphed experts block keeps one forward's activations for one backward, "
                               "so it cannot be backpropagated through a second time (retain_graph=True); "
                               "run the forward again")
        pair = lease.pair
        gate_up_w, down_w = ctx.saved_tensors
        if grad_out.is_contiguous():
            pair.grad_in(grad_out)
        else:  # (an expanded gradient, as ``out.sum()`` gives)
            pair.grad_out.copy_(grad_out)
        pair.backward_graph.replay()
        d_hidden = torch.empty_like(pair.d_hidden) if ctx.needs[0] else None
        d_weights = torch.empty_like(pair.d_weights) if ctx.needs[3] else None
        if pair.grads_out is not None:
            pair.grads_out(*(t for t in (d_hidden, d_weights) if t is not None))
        d_gate_up, d_down = (_launched_into(bound, weight) for bound, weight in zip(pair.dw_launches,
                                                                                     (gate_up_w, down_w)))
        lease.release()  # stream order: the next forward's writes come after these launches
        return d_hidden, d_gate_up, d_down, None, d_weights, None, None
