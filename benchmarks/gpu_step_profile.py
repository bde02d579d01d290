"""Where the host time of an eager training step goes, by phase and by operator.

`moe-tune bench --step` reports a step's host time (until its last launch returned). This probe
builds the same 2-layer LM (``moe_tune.bench.lm``) and, per (mode, implementation), times each
phase of a step on the host without synchronising between them — forward, backward, the
optimizer step, zero_grad — then profiles a few steps (torch.profiler, CPU and CUDA activities)
and keeps the operators and CUDA runtime calls with the most host time; it also records the host
time spent inside each kind of submodule's forward (hooks), Python's garbage collections per step,
and where a step synchronises. A phase whose host time jumps between modes, or a runtime call that
blocks (``cudaStreamSynchronize``, ``cudaMalloc``, ``cudaFree``), is what to look at. Writes
``OUT/step_profile.json``.

    python3 benchmarks/gpu_step_profile.py --out DIR [--model qwen3-30b-a3b] [--tokens 4096]
        [--modes full,frozen] [--steps 20]
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PHASES = ("forward", "backward", "optimizer", "zero_grad")


def train_step(model, optimizer, ids) -> None:
    """One step as `moe-tune bench --step` runs it (``moe_tune.bench.step``)."""
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def phase_times(model, optimizer, ids, steps: int) -> dict[str, float]:
    """Median host ms of each phase and of the whole step (no sync inside a step)."""
    import torch

    samples = {name: [] for name in (*PHASES, "host", "step")}
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        torch.cuda.synchronize()
        t5 = time.perf_counter()
        spans = ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t0, t4), (t0, t5))
        for name, (a, b) in zip((*PHASES, "host", "step"), spans):
            samples[name].append((b - a) * 1e3)
    return {name: round(statistics.median(values), 3) for name, values in samples.items()}


def profile(model, optimizer, ids, steps: int, top: int = 25) -> dict:
    """The operators with the most self CPU time over ``steps`` steps, and the CUDA runtime calls."""
    import torch
    from torch.profiler import ProfilerActivity

    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            train_step(model, optimizer, ids)
        torch.cuda.synchronize()
    events = prof.key_averages()
    rows = [dict(name=e.key, calls=e.count // steps, self_cpu_ms=round(e.self_cpu_time_total / 1e3 / steps, 3),
                 cpu_ms=round(e.cpu_time_total / 1e3 / steps, 3),
                 gpu_ms=round(getattr(e, "self_device_time_total", 0) / 1e3 / steps, 3)) for e in events]
    ops = sorted((r for r in rows if not r["name"].startswith("cuda")), key=lambda r: -r["self_cpu_ms"])[:top]
    runtime = sorted((r for r in rows if r["name"].startswith("cuda")), key=lambda r: -r["self_cpu_ms"])[:12]
    kernels = sorted((r for r in rows if r["gpu_ms"] > 0), key=lambda r: -r["gpu_ms"])
    return {"ops": ops, "runtime": runtime, "kernels": kernels[:top],
            "gpu_ms_total": round(sum(r["gpu_ms"] for r in kernels), 3)}


def module_times(model, optimizer, ids, steps: int) -> dict[str, float]:
    """Median host ms per step spent inside each kind of submodule's forward (by class name, the
    outermost call of a kind only), with the steps run as ``phase_times`` runs them."""
    import collections

    import torch

    spent: collections.Counter = collections.Counter()
    depth: collections.Counter = collections.Counter()
    started = {}

    def pre(module, args):
        kind = type(module).__name__
        depth[kind] += 1
        if depth[kind] == 1:
            started[kind] = time.perf_counter()

    def post(module, args, output):
        kind = type(module).__name__
        depth[kind] -= 1
        if depth[kind] == 0:
            spent[kind] += time.perf_counter() - started[kind]

    handles = []
    for module in model.modules():
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    samples = collections.defaultdict(list)
    try:
        for _ in range(steps):
            torch.cuda.synchronize()
            spent.clear()
            train_step(model, optimizer, ids)
            for kind, seconds in spent.items():
                samples[kind].append(seconds * 1e3)
        torch.cuda.synchronize()
    finally:
        for handle in handles:
            handle.remove()
    return {kind: round(statistics.median(v), 3) for kind, v in sorted(samples.items(), key=lambda kv: -max(kv[1]))}


def gc_per_step(model, optimizer, ids, steps: int) -> dict:
    """Python's garbage collections during ``steps`` steps: per generation, collections and ms
    per step (``gc.callbacks``)."""
    import gc

    import torch

    counts = [0, 0, 0]
    seconds = [0.0, 0.0, 0.0]
    started = {}

    def callback(phase, info):
        if phase == "start":
            started["t"] = time.perf_counter()
        else:
            counts[info["generation"]] += 1
            seconds[info["generation"]] += time.perf_counter() - started["t"]

    gc.callbacks.append(callback)
    try:
        for _ in range(steps):
            train_step(model, optimizer, ids)
        torch.cuda.synchronize()
    finally:
        gc.callbacks.remove(callback)
    return {f"gen{g}": {"per_step": round(counts[g] / steps, 2), "ms_per_step": round(seconds[g] * 1e3 / steps, 3)}
            for g in range(3)}


def synchronising_calls(model, optimizer, ids) -> list[str]:
    """Where one step makes the host wait on the device (``torch.cuda.set_sync_debug_mode``'s
    warnings, each with its innermost frames, torch's own included: the op that waits is often a
    torch function called from the model's code)."""
    import traceback
    import warnings

    import torch

    found = []

    def note(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")][-8:]
        found.append(f"{str(message)[:80]} <- " + " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                                                for f in reversed(frames)))

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():  # restores showwarning and the filters on exit
            warnings.simplefilter("always")
            warnings.showwarning = note
            train_step(model, optimizer, ids)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return found


def main(argv=None) -> None:
    import argparse

    import torch

    from moe_tune.bench.lm import build_lm, lm_config, make_optimizer, prepare_mode, token_batch
    from moe_tune.models import load_preset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--modes", default="full,frozen")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    shape = load_preset(args.model)
    config = lm_config(shape, "qwen3_moe")
    master = build_lm(config, "bfloat16", "cuda")
    ids = token_batch(config, args.tokens, 2048, "cuda")
    report = {"device": torch.cuda.get_device_name(), "model": args.model, "tokens": args.tokens, "runs": []}
    for mode in args.modes.split(","):
        for implementation in ("grouped_mm", "moe_tune"):
            model = prepare_mode(copy.deepcopy(master), implementation, mode)
            optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], "cuda")
            phase_times(model, optimizer, ids, 3)  # warm-up: kernels, configs, optimizer state
            run = {"mode": mode, "implementation": implementation,
                   "phases_ms": phase_times(model, optimizer, ids, args.steps),
                   "module_ms": module_times(model, optimizer, ids, args.steps),
                   "gc": gc_per_step(model, optimizer, ids, args.steps),
                   "profile": profile(model, optimizer, ids, 3),
                   "syncs": synchronising_calls(model, optimizer, ids)}
            report["runs"].append(run)
            print(mode, implementation, run["phases_ms"], run["gc"], flush=True)
            del model, optimizer
            torch.cuda.empty_cache()
    (out / "step_profile.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
