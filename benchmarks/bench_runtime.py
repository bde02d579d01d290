"""Cost of the runtime loader: a warm ``get_config`` lookup and ``import moe_tune.runtime``.

* warm lookup: a cache of one model's six problems × eight token buckets in a temp dir (the user
  and shipped layers are pointed at empty temp dirs through ``paths.override_roots``, so the
  machine's own caches do not matter); after one resolving call per key, batches of calls
  cycling over the six problems and three token counts are timed with ``perf_counter_ns``;
  per-call time = batch time / batch size; median and p20–p80 over the batches. The loop's own
  cost (the same iteration calling a no-op) is measured the same way and reported beside it.
* cold resolution: the first call for a problem (reads and validates the file once, picks the
  bucket), over fresh ``reset()`` states.
* import: ``import moe_tune.runtime`` in a fresh interpreter, timed inside it, median over runs,
  with cached bytecode (an installed package) and without (``PYTHONDONTWRITEBYTECODE=1``); also
  lists whether torch, triton, typer, rich or filelock got imported (they must not).

Run: ``python benchmarks/bench_runtime.py`` (``--json`` for machine-readable output). CPU only.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"machine": cpu, "python": platform.python_version(), "torch": _version("torch"),
            "triton": _version("triton"), "moe_tune": _version("moe-tune"), "date": time.strftime("%Y-%m-%d")}


def quantiles(samples: list[float]) -> dict:
    q = statistics.quantiles(samples, n=10)
    return {"median": statistics.median(samples), "p20": q[1], "p80": q[7], "n": len(samples)}


def bench_lookup(batches: int, batch: int) -> dict:
    from moe_tune import runtime
    from moe_tune.cache import CacheFile, CacheStore, paths
    from moe_tune.cache.schema import Measurement, Software
    from moe_tune.cache.software import kernel_source_hash, triton_version
    from moe_tune.device import DeviceInfo
    from moe_tune.problem import KernelConfig, MoeShape

    device = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), sm_count=132, max_shared_mem=232448)
    problems = MoeShape(E=128, H=2048, I=768, topk=8).problems()
    software = Software(triton_version(), "2.11.0", "13.0", "0.1.0", kernel_source_hash())
    cfg = KernelConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    with tempfile.TemporaryDirectory() as tmp:
        cache = CacheFile.new(device, software, command="bench_runtime")
        for problem in problems:
            for tokens in (128, 256, 512, 1024, 2048, 4096, 8192, 16384):
                cache.add(problem, tokens, cfg, Measurement(median_ms=1.0, tflops=400.0, default_ms=1.2,
                                                            candidates=50, correct=True))
        CacheStore(Path(tmp) / "store").write(cache)
        with paths.override_roots(user=Path(tmp) / "store", shipped=Path(tmp) / "none"):
            cold = []
            for _ in range(50):
                runtime.reset()
                start = time.perf_counter_ns()
                runtime.get_config(problems[0], 4096, device)
                cold.append((time.perf_counter_ns() - start) / 1e3)
            runtime.reset()
            keys = [(p, t) for p in problems for t in (4096, 5000, 16384)]
            for p, t in keys:
                assert runtime.explain(p, t, device).source == "user"
            calls = (keys * (batch // len(keys) + 1))[:batch]
            get_config = runtime.get_config

            def noop(problem, tokens, device):
                return None

            def timed(fn) -> list[float]:
                out = []
                for _ in range(batches):
                    start = time.perf_counter_ns()
                    for p, t in calls:
                        fn(p, t, device)
                    out.append((time.perf_counter_ns() - start) / batch / 1e3)
                return out

            warm = timed(get_config)
            loop = timed(noop)
    return {"warm_us": quantiles(warm), "loop_overhead_us": quantiles(loop), "cold_us": quantiles(cold)}


IMPORT_PROBE = (
    "import sys, time, json; t = time.perf_counter(); import moe_tune.runtime; d = time.perf_counter() - t; "
    "print(json.dumps({'s': d, 'heavy': sorted(m for m in ('torch', 'triton', 'typer', 'rich', 'filelock') "
    "if m in sys.modules)}))"
)


def bench_import(runs: int) -> dict:
    """Two settings: bytecode cached (what a pip-installed package sees: pip writes .pyc files;
    here they go to a temp PYTHONPYCACHEPREFIX after one warm-up run) and no bytecode (every
    module compiled from source, as under PYTHONDONTWRITEBYTECODE=1)."""
    result, heavy = {}, set()
    with tempfile.TemporaryDirectory() as prefix:
        cached_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached_env["PYTHONPYCACHEPREFIX"] = prefix
        source_env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        source_env.pop("PYTHONPYCACHEPREFIX", None)
        for key, env, warmup in (("import_ms", cached_env, 1), ("import_no_bytecode_ms", source_env, 0)):
            times = []
            for i in range(runs + warmup):
                out = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, check=True,
                                     env=env)
                data = json.loads(out.stdout)
                heavy.update(data["heavy"])
                if i >= warmup:
                    times.append(data["s"] * 1e3)
            result[key] = quantiles(times)
    return {**result, "heavy_modules_imported": sorted(heavy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch", type=int, default=10_000, help="calls per timed batch")
    parser.add_argument("--import-runs", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = {"environment": environment(), **bench_lookup(args.batches, args.batch), **bench_import(args.import_runs)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    env = result["environment"]
    print(f"{env['machine']} | Python {env['python']} | torch {env['torch']} | Triton {env['triton']} | "
          f"moe-tune {env['moe_tune']} | {env['date']}")
    for name, key, unit in (("warm get_config", "warm_us", "us"), ("  loop overhead", "loop_overhead_us", "us"),
                            ("cold resolution", "cold_us", "us"), ("import moe_tune.runtime", "import_ms", "ms"),
                            ("  without bytecode", "import_no_bytecode_ms", "ms")):
        q = result[key]
        print(f"{name:>24}: median {q['median']:.3f} {unit}  (p20 {q['p20']:.3f}, p80 {q['p80']:.3f}, n={q['n']})")
    print(f"{'heavy modules imported':>24}: {', '.join(result['heavy_modules_imported']) or 'none'}")


if __name__ == "__main__":
    main()
