"""What moe-tune needs to know about a GPU: name, capability, SM count, shared memory.

``DeviceInfo`` is plain data (the cache records it and matches on it). ``query_device`` reads a
CUDA device through torch and Triton's driver, once per device index; with
``TRITON_INTERPRET=1`` and no GPU it describes Triton's CPU interpreter instead, so the same code
paths run in CI.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from moe_tune.errors import InvalidInputError, NoGPUError

INTERPRETER_NAME = "triton-interpreter"


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    capability: tuple[int, int]
    sm_count: int
    max_shared_mem: int

    @property
    def is_interpreter(self) -> bool:
        return self.name == INTERPRETER_NAME

    @property
    def supports_tma(self) -> bool:
        # Tensor descriptors lower to TMA on sm90+; the interpreter emulates them.
        return self.is_interpreter or self.capability >= (9, 0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["capability"] = list(self.capability)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DeviceInfo":
        try:
            major, minor = data["capability"]
            return cls(
                name=str(data["name"]),
                capability=(int(major), int(minor)),
                sm_count=int(data["sm_count"]),
                max_shared_mem=int(data["max_shared_mem"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"malformed device record: {exc}") from None


# The interpreter runs programs one after another; 4 "SMs" keep persistent loops honest
# (several tiles per program) without slowing small CPU tests.
INTERPRETER_DEVICE = DeviceInfo(INTERPRETER_NAME, (0, 0), sm_count=4, max_shared_mem=232448)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _query_cuda(index: int) -> DeviceInfo:
    import torch
    import triton

    props = torch.cuda.get_device_properties(index)
    driver_props = triton.runtime.driver.active.utils.get_device_properties(index)
    return DeviceInfo(
        name=props.name,
        capability=(props.major, props.minor),
        sm_count=props.multi_processor_count,
        max_shared_mem=int(driver_props["max_shared_mem"]),
    )


# A tensor's torch.device → its DeviceInfo: the experts blocks ask once per pass, and a CUDA
# tensor's device always carries its index, so the answer never changes.
_BY_DEVICE: dict[Any, DeviceInfo] = {}


def query_device(device: Any = None) -> DeviceInfo:
    """Describe the device a tensor lives on (``None``: the current CUDA device)."""
    try:
        found = _BY_DEVICE.get(device)
    except TypeError:  # unhashable: torch.device below says what is wrong with it
        found = None
    if found is not None:
        return found
    import torch

    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type == "cuda":
        if torch.cuda.is_available():
            if dev is not None and dev.index is not None:
                info = _BY_DEVICE[device] = _query_cuda(dev.index)
                return info
            return _query_cuda(torch.cuda.current_device())
        if interpreting():
            return INTERPRETER_DEVICE
        raise NoGPUError("no CUDA GPU is visible (and TRITON_INTERPRET is not set)")
    if dev.type == "cpu" and interpreting():
        return INTERPRETER_DEVICE
    raise InvalidInputError(f"moe-tune kernels run on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {dev}")
