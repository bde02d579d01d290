"""Running one measurement so that its failure becomes a row error, not the end of the run.

A compile that fails, an out-of-memory, a layout an implementation refuses: each is caught where
one row is measured (``except Exception``, never ``BaseException``: Ctrl-C still stops the run),
turned into one line by ``describe_error``, and followed by ``release``, which drops what the
failed row left on the device and in torch.compile's caches so the next row starts clean.
Also the device synchronisation the host-side timers share. Imports torch inside its functions.
"""

from __future__ import annotations

import gc

# A row's error cell: long enough for the exception's first line (a Dynamo message names the
# unsupported construct there), short enough for a table.
ERROR_CHARS = 240


def describe_error(exc: BaseException) -> str:
    """``TypeName: first line of the message``, and Dynamo's ``Explanation:`` line when it has one
    (its first line is often only "RuntimeError when making fake tensor call"), cut to
    ``ERROR_CHARS``."""
    lines = [line.strip() for line in str(exc).strip().splitlines()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    explanation = next((line for line in lines[1:] if line.startswith("Explanation:")), None)
    if explanation:
        text += " (" + explanation.removeprefix("Explanation:").strip() + ")"
    return text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS - 3] + "..."


def synchronize(device: str) -> None:
    """Wait for the device (nothing to wait for on the CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def reset_compiler() -> None:
    """Forget every compiled graph, so the next configuration compiles fresh (static shapes, no
    recompile limit inherited from the previous one)."""
    import torch

    torch._dynamo.reset()


def release(device: str) -> None:
    """Return what dropped objects held: Python cycles, compiled graphs, moe-tune's CUDA graphs of
    the experts block, cached device memory."""
    import torch

    from moe_tune.ops import graphs

    graphs.reset()
    gc.collect()
    reset_compiler()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def allocated_bytes(device: str) -> int | None:
    """Bytes allocated on the device now (None off CUDA)."""
    if device != "cuda":
        return None
    import torch

    return torch.cuda.memory_allocated()


def peak_memory_reset(device: str) -> int | None:
    """Start a peak-memory window; returns the bytes allocated now (None off CUDA)."""
    if device != "cuda":
        return None
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_memory_mib(device: str, base: int | None) -> float | None:
    """Peak allocation since ``peak_memory_reset`` above its ``base``, MiB (None off CUDA)."""
    if device != "cuda" or base is None:
        return None
    import torch

    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
