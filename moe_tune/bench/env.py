"""The environment a benchmark ran in, named beside every figure: card, driver, torch, Triton, CUDA,
transformers, date. Also the checks a benchmark makes before it starts (a CUDA GPU, matplotlib).

``environment()`` imports torch and triton; ``header()`` is pure formatting.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import platform
import subprocess

from moe_tune.errors import InvalidInputError, NoGPUError


class MissingDependencyError(InvalidInputError):
    """An optional package a requested output needs is not installed (CLI exit 2)."""


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:  # containers without nvidia-smi still expose the kernel module's version
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            line = f.readline()
        for word in line.split():
            if word[:1].isdigit() and "." in word:
                return word
    except OSError:
        pass
    return None


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str = "cuda") -> dict:
    """Card, driver and software versions; ``device="cpu"`` describes Triton's interpreter."""
    import torch
    import triton

    from moe_tune import __version__

    if device == "cuda":
        card = torch.cuda.get_device_name()
        driver = _driver_version() or "unknown"
    else:
        card, driver = "triton-interpreter (CPU)", "n/a"
    return {
        "card": card,
        "driver": driver,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "transformers": _package_version("transformers"),
        "moe_tune": __version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def header(env: dict) -> str:
    """One line: ``NVIDIA H200 | driver 580.159.04 | torch 2.11.0 | Triton 3.6.0 | CUDA 13.0 | ...``."""
    parts = [str(env.get("card", "unknown card")), f"driver {env.get('driver', 'unknown')}",
             f"torch {env.get('torch', '?')}", f"Triton {env.get('triton', '?')}"]
    if env.get("cuda"):
        parts.append(f"CUDA {env['cuda']}")
    if env.get("transformers"):
        parts.append(f"transformers {env['transformers']}")
    if env.get("date"):
        parts.append(str(env["date"]))
    return " | ".join(parts)


def require_cuda(command: str = "moe-tune bench") -> None:
    """``NoGPUError`` (CLI exit 2) unless torch sees a CUDA GPU."""
    try:
        import torch
    except ImportError:
        raise NoGPUError(f"`{command}` needs torch with a CUDA GPU; torch is not installed") from None
    if not torch.cuda.is_available():
        raise NoGPUError(f"no CUDA GPU is visible: `{command}` times kernels on the GPU it runs on "
                         "(try `--interpret` for a CPU dry run on the tiny preset)")


def require_matplotlib() -> None:
    """``MissingDependencyError`` unless matplotlib can be imported (checked before any timing)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingDependencyError("--plot needs matplotlib, which is not installed: "
                                     "pip install 'moe-tune[plot]' (or pip install matplotlib)")
