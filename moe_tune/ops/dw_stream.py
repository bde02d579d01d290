"""The experts block's two weight-gradient GEMMs on a second CUDA stream, in eager training.

In an eager step the host launches the small kernels of the layers around the experts (attention,
norms, the loss) more slowly than the GPU runs them, and its last launch, the optimizer, waits for
every gradient. In order on one stream, a block's dW GEMMs (about 40% of its backward's GPU time)
delay everything queued behind them, down to the optimizer. Nothing later in the backward reads
them, so on a side stream they run while the GPU would otherwise wait for the host's next launch.

The dW go to the side stream (``side(weights)`` returns it) when all of these hold, and otherwise
run in order on the current stream as before:

* ``MOE_TUNE_DW_STREAM`` is not ``0`` (or ``enable(False)``);
* CUDA, outside torch.compile and CUDA-graph capture, gradient mode off (no ``create_graph``);
* no ``torch.distributed`` process group: DDP, FSDP and DeepSpeed read gradients from autograd
  hooks that this block cannot see, on their own streams;
* each weight is a leaf that wants a gradient, has none yet and has no hooks (a tensor hook or a
  post-accumulate-grad hook would read the gradient on the current stream before the join). Then
  autograd takes the returned tensor as the weight's ``.grad`` without a kernel; a second
  micro-batch of gradient accumulation (``.grad`` set) adds on the current stream, so it runs in
  order.

Ordering: the side stream first waits for the current stream (the dW's operands are made there).
Every tensor the side stream touches is recorded on it (``record_stream``), so the caching
allocator hands none of their memory to the current stream before the side stream is done with
it. Each block backward that uses the side stream queues an autograd-engine callback that makes
the caller's current stream wait for the side stream when the backward ends: before the
optimizer, gradient clipping or anything else the caller does next.

Not covered: one weight passed to two blocks in one forward (autograd would sum its two gradients
on the current stream before the join). Set ``MOE_TUNE_DW_STREAM=0`` for such a model.
"""

from __future__ import annotations

import contextlib
import os

import torch

ENV_VAR = "MOE_TUNE_DW_STREAM"

_enabled: bool | None = None  # None: read ENV_VAR on first use
_streams: dict[int, torch.cuda.Stream] = {}


def enable(on: bool = True) -> None:
    """Put the dW on a side stream where it applies (or never), overriding ``MOE_TUNE_DW_STREAM``."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get(ENV_VAR, "").strip().lower() not in ("0", "false", "no", "off")
    return _enabled


def _weight_takes_it(weight: torch.Tensor) -> bool:
    """Autograd will make the returned gradient ``weight.grad`` itself, with no kernel and no hook."""
    return (weight.is_leaf and weight.requires_grad and weight.grad is None and not weight._backward_hooks
            and not getattr(weight, "_post_accumulate_grad_hooks", None))


def side(weights) -> torch.cuda.Stream | None:
    """The side stream for the dW of ``weights`` (those that want a gradient), with the join queued
    for the end of the running backward; or None: run them in order on the current stream. Call it
    once per block backward, from inside the backward."""
    if not weights or not enabled() or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if not all(w.is_cuda and _weight_takes_it(w) for w in weights):
        return None
    if torch.cuda.is_current_stream_capturing():
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return None
    device = weights[0].device.index
    stream = _streams.get(device)
    if stream is None:
        stream = _streams[device] = torch.cuda.Stream(device)
    try:
        torch.autograd.Variable._execution_engine.queue_callback(_joiner(stream))
    except RuntimeError:  # not inside a backward (a direct call): nothing would join
        return None
    return stream


@contextlib.contextmanager
def running_on(stream: torch.cuda.Stream | None, touched):
    """Launches within go to ``stream`` (None: the current stream, nothing else done). ``touched``:
    the tensors they read or write, all made on the current stream."""
    if stream is None:
        yield
        return
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    for t in touched:
        t.record_stream(stream)
    with torch.cuda.stream(stream):
        yield


def _joiner(stream: torch.cuda.Stream):
    def join() -> None:
        torch.cuda.current_stream(stream.device).wait_stream(stream)
    return join
