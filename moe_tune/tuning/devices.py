"""Which devices a sweep times on: ``detect_device`` (the GPU, or Triton's interpreter),
``lane_devices`` (one timing lane per GPU of ``--gpus``, default every visible GPU; the
``LOCAL_RANK`` GPU under torchrun; CPU lanes under the interpreter) and ``lane_device_info`` (the
one device they share: lanes of different GPU models are refused, a cache file holds one device).
"""

from __future__ import annotations

import os

from moe_tune.device import INTERPRETER_DEVICE, DeviceInfo
from moe_tune.errors import InvalidInputError
from moe_tune.tuning.options import SweepOptions


def detect_device(interpret: bool) -> DeviceInfo:
    """The device to tune: the current CUDA GPU, or the interpreter (``NoGPUError`` without one)."""
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before any worker starts: they inherit it
        return INTERPRETER_DEVICE
    from moe_tune.device import query_device
    from moe_tune.errors import NoGPUError

    try:
        import torch
    except ImportError:
        raise NoGPUError("torch is not installed") from None
    if not torch.cuda.is_available():
        raise NoGPUError("no CUDA GPU is visible: `moe-tune sweep` times kernels on the GPU it runs on "
                         "(try `--interpret` for a CPU dry run on the tiny preset)")
    return query_device()


def lane_devices(options: SweepOptions, launch) -> tuple[str, ...]:
    """The timing lanes of this process: ``cuda:I`` per GPU, ``cpu`` under the interpreter."""
    if launch is not None and options.gpus is not None:
        raise InvalidInputError("under torchrun each rank times on its LOCAL_RANK GPU: drop --gpus "
                                "(torchrun's --nproc-per-node picks how many GPUs a node uses)")
    if options.interpret:
        return ("cpu",) * len(options.gpus or (0,))
    if launch is not None:
        return (f"cuda:{launch.local_rank}",)
    import torch

    count = torch.cuda.device_count()
    gpus = options.gpus if options.gpus is not None else tuple(range(count))
    missing = [g for g in gpus if g >= count]
    if missing:
        raise InvalidInputError(f"--gpus {missing[0]}: no such GPU (GPUs 0..{count - 1} are visible)")
    return tuple(f"cuda:{g}" for g in gpus)


def lane_device_info(lanes: tuple[str, ...], interpret: bool) -> DeviceInfo:
    """The device every lane times on; lanes of different GPU models are refused (a cache file
    holds one device)."""
    if interpret or not lanes[0].startswith("cuda:"):
        return detect_device(interpret)
    from moe_tune.device import query_device

    infos = {lane: query_device(lane) for lane in lanes}
    names = sorted({i.name for i in infos.values()})
    if len(names) > 1:
        raise InvalidInputError(f"the GPUs differ ({', '.join(names)}): a cache file holds one device; "
                                f"pick GPUs of one kind with --gpus")
    return infos[lanes[0]]
