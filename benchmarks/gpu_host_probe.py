"""GPU probe of where the eager experts block spends host time, and where a gpt-oss block spends
GPU time. One script, so one device call answers both.

    PYTHONPATH=. python3 benchmarks/gpu_host_probe.py --out $OUT [--host] [--gptoss PRESET:T ...]

``--host``: Qwen3-30B-A3B experts at 128 tokens, moe-tune eager, fwd+bwd with the weights trained
and frozen, and the forward alone: host ms per call with the GPU held back by a spin kernel, then
``cProfile`` of the same held loop (top functions by own time). ``--launch``: the same, piece by
piece (a bare compiled-kernel launch, one GEMM launch, the routing, each body). ``--host-method``:
the bench's host figure under held and unheld loops of several lengths. (The hold reads launch
costs high when other launches are queued; ``moe_tune.bench.host`` times unheld, shallow loops.)
``--step-profile MODE:T``: the bench's 2-layer Qwen3-30B-A3B-shaped LM, one eager training step
(``full``, ``frozen`` or ``lora``) at T tokens: host ms per step unprofiled for moe-tune and
grouped_mm, then ``cProfile`` of moe-tune's steps (top functions by cumulative time, and the
moe-tune functions alone), to tell the experts block's share of a host-bound step.
``--gptoss``: per preset and token count, moe-tune's gpt-oss block fwd+bwd under torch.profiler,
GPU time per kernel name. Writes ``host_probe.txt`` / ``gptoss_probe.txt`` under ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

from moe_tune.ops.moe_experts import moe_experts

sys.path.insert(0, str(Path(__file__).resolve().parent))
import probe_args  # noqa: E402
from moe_tune.ops.routing import random_routing

SPIN_CYCLES_PER_MS = 2_000_000  # torch.cuda._sleep cycles per ms at H100/H200 clocks (~2 GHz)
QWEN = (128, 2048, 768, 8)  # Qwen3-30B-A3B's experts: E, H, I, k


def held_loop(call, iterations: int, hold_ms: float = 400.0) -> float:
    torch.cuda._sleep(int(hold_ms * SPIN_CYCLES_PER_MS))
    start = time.perf_counter()
    for _ in range(iterations):
        call()
    elapsed = time.perf_counter() - start
    marker = torch.cuda.Event()
    marker.record()
    held = not marker.query()
    torch.cuda.synchronize()
    return elapsed * 1e3 / iterations if held else float("nan")


def qwen_block_inputs(tokens: int):
    """(w1, w2, x, top_k_index, top_k_weights, grad) at Qwen3-30B-A3B's expert shapes, bf16."""
    E, H, I, k = QWEN
    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    w1 = (torch.randn(E, 2 * I, H, device=dev, generator=gen) * 0.02).to(dt)
    w2 = (torch.randn(E, H, I, device=dev, generator=gen) * 0.02).to(dt)
    x = torch.randn(tokens, H, device=dev, generator=gen).to(dt)
    idx = random_routing(tokens, E, k, device=dev, generator=gen)
    wts = torch.softmax(torch.randn(tokens, k, device=dev, generator=gen), -1)
    grad = torch.randn(tokens, H, device=dev, generator=gen).to(dt)
    return w1, w2, x, idx, wts, grad


def host_probe(out: Path, tokens: int = 128, iterations: int = 20) -> None:
    w1, w2, x, idx, wts, grad = qwen_block_inputs(tokens)
    lines = []
    for mode in ("full", "frozen", "forward"):
        w1.requires_grad_(mode == "full")
        w2.requires_grad_(mode == "full")
        x.requires_grad_(mode != "forward")
        wts.requires_grad_(mode != "forward")
        leaves = [t for t in (x, wts, w1, w2) if t.requires_grad]

        def call():
            for t in leaves:
                t.grad = None
            out = moe_experts(x, w1, w2, idx, wts)
            if mode != "forward":
                out.backward(grad)

        for _ in range(3):
            call()
        torch.cuda.synchronize()
        times = sorted(held_loop(call, iterations) for _ in range(5))
        lines.append(f"## {mode}: host ms per call (held GPU, {iterations} calls x 5): "
                     + ", ".join(f"{t:.3f}" for t in times))
        prof = cProfile.Profile()
        torch.cuda._sleep(int(800 * SPIN_CYCLES_PER_MS))
        prof.enable()
        for _ in range(iterations):
            call()
        prof.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("tottime").print_stats(28)
        stats.sort_stats("cumulative").print_stats(28)
        lines.append(buf.getvalue())
    (out / "host_probe.txt").write_text("\n".join(lines))
    print("\n".join(line for line in lines if line.startswith("##")), flush=True)


def launch_probe(out: Path, tokens: int = 128, calls: int = 200) -> None:
    """Host µs per call of each piece of one eager fwd+bwd, GPU held (no waiting)."""
    from moe_tune.ops import block, launch
    from moe_tune.ops.routing import build_routing
    from moe_tune.kernels.grouped_mm import grouped_mm_kernel
    from moe_tune.device import query_device

    E, H, I, k = QWEN
    dev, dt = "cuda", torch.bfloat16
    w1, w2, x, idx, wts, grad = qwen_block_inputs(tokens)
    info = query_device(x.device)
    cfg = block.block_configs(E, H, I, k, dt, tokens, info)
    routing = build_routing(idx, E)
    h = torch.empty(tokens * k, 2 * I, device=dev, dtype=dt)
    fwd_state = block.forward(x, w1, w2, idx, wts, in_op=False)
    torch.cuda.synchronize()

    def up():
        launch.grouped_mm(x, w1, h, routing, None, trans_w=False, gather_a=True, gather_div=k, scatter_c=False,
                          cfg=cfg["up", "forward"], info=info)

    up()
    up()
    launcher = launch._LAUNCHERS[grouped_mm_kernel]
    compiled = next(iter(launcher.compiled.values()))[0]
    real_run, seen = compiled._run, {}

    def capture(*a):
        seen["args"] = a[9:]
        real_run(*a)

    compiled._run = capture
    up()
    compiled._run = real_run
    full = seen["args"]
    stream = torch._C._cuda_getCurrentRawStream(x.device.index)

    def raw():
        real_run(info.sm_count, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *full)

    pieces = {
        "raw compiled.run (floor)": raw,
        "torch.empty [M, 2I]": lambda: torch.empty(tokens * k, 2 * I, device=dev, dtype=dt),
        "query_device": lambda: query_device(x.device),
        "block_configs": lambda: block.block_configs(E, H, I, k, dt, tokens, info),
        "build_routing": lambda: build_routing(idx, E),
        "launch.grouped_mm (up fwd)": up,
        "block.forward": lambda: block.forward(x, w1, w2, idx, wts, in_op=False),
        "block.backward": lambda: block.backward(grad, x, w1, w2, wts, fwd_state[1], fwd_state[2], fwd_state[3],
                                                 need_hidden=True, need_gate_up=True, need_down=True),
        "moe_experts fwd (no grad)": lambda: moe_experts(x, w1, w2, idx, wts),
    }
    lines = []
    for name, fn in pieces.items():
        fn()
        torch.cuda.synchronize()
        n = calls if "block" not in name else 40
        best = min(held_loop(fn, n) for _ in range(3)) * 1e3
        lines.append(f"{name:<32} {best:8.1f} us")
    (out / "launch_probe.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def gptoss_probe(out: Path, cases: list[str]) -> None:
    from torch.profiler import ProfilerActivity, profile

    from moe_tune.ops.gptoss import gptoss_experts

    presets = {"gpt-oss-20b": (32, 2880, 2880, 4), "gpt-oss-120b": (128, 2880, 2880, 4)}
    dev, dt = "cuda", torch.bfloat16
    text = []
    for case in cases:
        name, T = case.split(":")
        E, H, I, k = presets[name]
        T = int(T)
        gen = torch.Generator(device=dev).manual_seed(0)
        w1 = (torch.randn(E, H, 2 * I, device=dev, generator=gen) * 3.5 / H**0.5).to(dt).requires_grad_()
        b1 = torch.randn(E, 2 * I, device=dev, generator=gen).to(dt).requires_grad_()
        w2 = (torch.randn(E, I, H, device=dev, generator=gen) * 3.5 / I**0.5).to(dt).requires_grad_()
        b2 = torch.randn(E, H, device=dev, generator=gen).to(dt).requires_grad_()
        x = torch.randn(T, H, device=dev, generator=gen).to(dt).requires_grad_()
        idx = random_routing(T, E, k, device=dev, generator=gen)
        wts = torch.softmax(torch.randn(T, k, device=dev, generator=gen), -1).requires_grad_()
        grad = torch.randn(T, H, device=dev, generator=gen).to(dt)
        leaves = (x, wts, w1, b1, w2, b2)

        def call():
            for t in leaves:
                t.grad = None
            gptoss_experts(x, w1, b1, w2, b2, idx, wts, limit=7.0, alpha=1.702).backward(grad)

        for _ in range(3):
            call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                call()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70)
        text.append(f"## {name} T={T} (5 calls)\n{table}")
        print(text[-1], flush=True)
        torch.cuda.empty_cache()
    (out / "gptoss_probe.txt").write_text("\n".join(text))


def bwd_scan(out: Path, cases: list[str]) -> None:
    """fwd+bwd ms of the gpt-oss block per tile of its activation-backward kernel."""
    from triton.testing import do_bench

    from moe_tune.ops import gptoss
    from moe_tune.ops.gptoss import gptoss_experts

    presets = {"gpt-oss-20b": (32, 2880, 2880, 4), "gpt-oss-120b": (128, 2880, 2880, 4)}
    tiles = [(32, 64, 4), (64, 64, 4), (64, 64, 8), (128, 64, 8), (16, 64, 4), (32, 128, 4), (64, 128, 8),
             (128, 32, 4), (64, 32, 4)]
    lines = []
    for case in cases:
        name, T = case.split(":")
        E, H, I, k = presets[name]
        T = int(T)
        gen = torch.Generator(device="cuda").manual_seed(0)
        dt = torch.bfloat16
        w1 = (torch.randn(E, H, 2 * I, device="cuda", generator=gen) * 3.5 / H**0.5).to(dt).requires_grad_()
        b1 = torch.randn(E, 2 * I, device="cuda", generator=gen).to(dt).requires_grad_()
        w2 = (torch.randn(E, I, H, device="cuda", generator=gen) * 3.5 / I**0.5).to(dt).requires_grad_()
        b2 = torch.randn(E, H, device="cuda", generator=gen).to(dt).requires_grad_()
        x = torch.randn(T, H, device="cuda", generator=gen).to(dt).requires_grad_()
        idx = random_routing(T, E, k, device="cuda", generator=gen)
        wts = torch.softmax(torch.randn(T, k, device="cuda", generator=gen), -1).requires_grad_()
        grad = torch.randn(T, H, device="cuda", generator=gen).to(dt)
        leaves = [x, wts, w1, b1, w2, b2]
        ref = None
        shipped = gptoss.BWD_BLOCK_M, gptoss.BWD_BLOCK_N, gptoss.BWD_WARPS
        for bm, bn, warps in tiles:
            gptoss.BWD_BLOCK_M, gptoss.BWD_BLOCK_N, gptoss.BWD_WARPS = bm, bn, warps

            def call():
                gptoss_experts(x, w1, b1, w2, b2, idx, wts, limit=7.0, alpha=1.702).backward(grad)

            for t in leaves:
                t.grad = None
            call()
            got = [t.grad.float().clone() for t in leaves]
            ref = ref or got
            err = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(got, ref))
            ms = do_bench(call, warmup=10, rep=100, grad_to_none=leaves)
            lines.append(f"{name} T={T} bwd tile {bm}x{bn} w{warps}: {ms:.3f} ms (diff vs first {err:.1e})")
            print(lines[-1], flush=True)
        gptoss.BWD_BLOCK_M, gptoss.BWD_BLOCK_N, gptoss.BWD_WARPS = shipped
    (out / "bwd_scan.txt").write_text("\n".join(lines) + "\n")


def host_method(out: Path) -> None:
    """The bench's host figure under several loop lengths, held and unheld, to see how the depth
    of the launch queue moves it."""
    from moe_tune.bench.block import block_inputs, build_block
    from moe_tune.problem import MoeShape

    shape = MoeShape(128, 2048, 768, 8)
    blk = build_block(shape, "bfloat16", "cuda")
    inputs = block_inputs(blk, shape, 128, "bfloat16", "cuda")
    lines = []
    for label in ("grouped_mm", "moe_tune"):
        prepared, call = probe_args.warmed_block_call(blk, label, inputs)
        for n in (2, 4, 10, 20, 36):
            held = sorted(held_loop(call, n) for _ in range(5))
            lines.append(f"{label} held n={n}: " + ", ".join(f"{t:.3f}" for t in held))
        for n in (10, 50):
            host, wall = [], []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(n):
                    call()
                mid = time.perf_counter()
                torch.cuda.synchronize()
                host.append((mid - start) * 1e3 / n)
                wall.append((time.perf_counter() - start) * 1e3 / n)
            lines.append(f"{label} unheld n={n}: host " + ", ".join(f"{t:.3f}" for t in sorted(host))
                         + " | wall " + ", ".join(f"{t:.3f}" for t in sorted(wall)))
        print("\n".join(lines[-7:]), flush=True)
    (out / "host_method.txt").write_text("\n".join(lines) + "\n")


def step_profile(out: Path, cases: list[str], steps: int = 5) -> None:
    import copy

    from moe_tune.bench.lm import build_lm, lm_config, make_optimizer, prepare_mode, token_batch
    from moe_tune.models import load_preset

    shape = load_preset("qwen3-30b-a3b")
    config = lm_config(shape, "qwen3_moe")
    master = build_lm(config, "bfloat16", "cuda")
    lines = []
    for case in cases:
        mode, tokens = case.split(":")
        ids = token_batch(config, int(tokens), 2048, "cuda")
        for impl in ("grouped_mm", "moe_tune"):
            model = prepare_mode(copy.deepcopy(master), impl, mode)
            optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], "cuda")

            def step(model=model, optimizer=optimizer):
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            host, wall = [], []
            for _ in range(steps * 2):
                start = time.perf_counter()
                step()
                launched = time.perf_counter()
                torch.cuda.synchronize()
                host.append((launched - start) * 1e3)
                wall.append((time.perf_counter() - start) * 1e3)
            lines.append(f"## {mode} T={tokens} {impl}: host ms per step {sorted(host)[len(host) // 2]:.2f}, "
                         f"wall {sorted(wall)[len(wall) // 2]:.2f}")
            print(lines[-1], flush=True)
            if impl == "moe_tune":
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(steps):
                    step()
                prof.disable()
                torch.cuda.synchronize()
                for restriction in ((40,), ("moe_tune", 40)):
                    buf = io.StringIO()
                    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(*restriction)
                    lines.append(buf.getvalue())
            del model, optimizer, step
            torch.cuda.empty_cache()
    (out / "step_profile.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--host", action="store_true")
    parser.add_argument("--gptoss", nargs="*", default=[])
    parser.add_argument("--launch", action="store_true")
    parser.add_argument("--host-method", action="store_true")
    parser.add_argument("--bwd-scan", nargs="*", default=[])
    parser.add_argument("--step-profile", nargs="*", default=[])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.host:
        host_probe(out)
    if args.host_method:
        host_method(out)
    if args.launch:
        launch_probe(out)
    if args.bwd_scan:
        bwd_scan(out, args.bwd_scan)
    if args.gptoss:
        gptoss_probe(out, args.gptoss)
    if args.step_profile:
        step_profile(out, args.step_profile)


if __name__ == "__main__":
    main()
