"""``moe-tune doctor``: what this machine offers the kernels and the tuner, and what the caches hold.

Data flow: torch, Triton and the CUDA driver (device name, capability, SM count, shared memory,
TMA support, versions) plus every cache layer (``cache.paths.search_layers``: its directory and
each cache file's device, Triton version, problem and entry counts, or why it cannot be read) →
a report on stdout, JSON with ``--json``. Informational: exit 0 whatever it finds.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import typer

from moe_tune.cli.options import CacheDirOption, JsonOption
from moe_tune.errors import CacheError


def _versions() -> dict[str, Any]:
    from moe_tune import __version__

    info: dict[str, Any] = {"moe_tune": __version__, "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
    except ImportError:
        info["torch"] = None
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import numpy

        info["numpy"] = numpy.__version__  # Triton 3.6's interpreter needs numpy < 2.3
    except ImportError:
        info["numpy"] = None
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            info["nvidia_driver"] = f.readline().strip()
    except OSError:
        info["nvidia_driver"] = None
    return info


def _gpu() -> dict[str, Any]:
    from moe_tune.device import interpreting, query_device

    gpu: dict[str, Any] = {"available": False, "interpreter": interpreting()}
    try:
        import torch
    except ImportError:
        gpu["error"] = "torch is not installed"
        return gpu
    if not torch.cuda.is_available():
        gpu["error"] = "no CUDA GPU visible (CUDA_VISIBLE_DEVICES=" + os.environ.get("CUDA_VISIBLE_DEVICES", "unset") + ")"
        return gpu
    try:
        device = query_device()
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
    except Exception as exc:  # a broken driver shows up here; doctor reports it, not raises it
        gpu["error"] = f"{type(exc).__name__}: {exc}"
        return gpu
    gpu.update(available=True, count=torch.cuda.device_count(), **device.to_dict(),
               tma=device.supports_tma, memory_gib=round(props.total_memory / 2**30, 1),
               l2_cache_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
    return gpu


def _caches(cache_dir) -> list[dict[str, Any]]:
    from moe_tune.cache import paths
    from moe_tune.cache.store import read_cache_file

    layers = []
    try:
        found = paths.search_layers(cache_dir)
    except ImportError as exc:  # platformdirs missing (GPU images often lack it): report, keep going
        found = [paths.Layer("explicit", Path(cache_dir))] if cache_dir is not None else []
        layers.append({"layer": "user", "root": None, "files": [], "error": f"cannot locate: {exc}"})
    for layer in found:
        entry: dict[str, Any] = {"layer": layer.name, "root": str(layer.root), "files": []}
        try:
            files = layer.cache_files()
        except OSError as exc:
            entry["error"] = f"cannot list: {exc.strerror or exc}"
            layers.append(entry)
            continue
        entry["exists"] = bool(layer.root is not None and (layer.root.is_dir() or layer.root.is_file()))
        for source in files:
            item: dict[str, Any] = {"name": source.name}
            try:
                cache = read_cache_file(source)
                item.update(device=cache.device.name, capability=list(cache.device.capability), triton=cache.triton,
                            problems=len(cache.entries), entries=len(cache),
                            last_write=cache.provenance.writes[-1].time if cache.provenance.writes else None)
            except CacheError as exc:  # report, never fail: doctor runs when something is wrong
                item["error"] = str(exc)
            entry["files"].append(item)
        # Sweep journals live beside a writable cache (see moe_tune.tuning.journal).
        if isinstance(layer.root, Path) and (layer.root / "journals").is_dir():
            try:
                entry["journals"] = sorted(p.name for p in (layer.root / "journals").iterdir() if p.suffix == ".jsonl")
            except OSError as exc:
                entry["journals"] = [f"(cannot list: {exc.strerror or exc})"]
        layers.append(entry)
    return layers


def doctor(cache_dir: CacheDirOption = None, json_output: JsonOption = False) -> None:
    """Report the GPU, software versions, TMA support and what each cache directory holds."""
    report = {"versions": _versions(), "gpu": _gpu(), "caches": _caches(cache_dir),
              "environment": {k: os.environ[k] for k in ("MOE_TUNE_CACHE_DIR", "MOE_TUNE_STRICT", "MOE_TUNE_CUDA_GRAPHS",
                                                          "MOE_TUNE_CUDA_GRAPHS_MIB", "TRITON_INTERPRET",
                                                          "TRITON_CACHE_DIR", "CUDA_VISIBLE_DEVICES") if k in os.environ}}
    if json_output:
        typer.echo(json.dumps(report, indent=2))
        return
    _print(report)


def _print(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console()
    v, gpu = report["versions"], report["gpu"]
    console.print(f"moe-tune {v['moe_tune']}  python {v['python']}  torch {v.get('torch')}  "
                  f"CUDA {v.get('cuda')}  triton {v.get('triton')}  numpy {v.get('numpy')}")
    if v.get("nvidia_driver"):
        console.print(f"driver: {v['nvidia_driver']}")
    if gpu["available"]:
        major, minor = gpu["capability"]
        console.print(f"GPU: {gpu['name']} (sm_{major}{minor}, {gpu['sm_count']} SMs, {gpu['max_shared_mem']} bytes "
                      f"shared memory per block, {gpu['memory_gib']} GiB, L2 {gpu['l2_cache_mib']} MiB), "
                      f"TMA {'yes' if gpu['tma'] else 'no'}, {gpu['count']} visible")
    else:
        console.print(f"GPU: none ({gpu.get('error')})" + ("; TRITON_INTERPRET is set" if gpu["interpreter"] else ""))
    for layer in report["caches"]:
        # Paths, names and errors are data (a file named "x[/red].json" is not markup): escaped.
        state = layer.get("error") or ("" if layer.get("exists") else "(absent)")
        console.print(escape(f"cache layer {layer['layer']}: {layer['root']} {state}".rstrip()))
        for item in layer["files"]:
            if "error" in item:
                console.print(f"  {escape(item['name'])}: [red]unreadable[/red]: {escape(item['error'])}")
            else:
                console.print(escape(f"  {item['name']}: {item['device']}, Triton {item['triton']}, {item['problems']} "
                                     f"problems, {item['entries']} entries, last written {item['last_write']}"))
        for journal in layer.get("journals", []):
            console.print(escape(f"  journal: {journal}"))
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
