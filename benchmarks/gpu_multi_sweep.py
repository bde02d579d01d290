"""`moe-tune sweep` on one GPU and on every GPU of the host: wall clock, scaling, same winners.

Two runs of the default sweep (``--model qwen3-30b-a3b``, the default token grid and space), each
a fresh ``python -m moe_tune sweep`` process with its own cold Triton cache (``TRITON_CACHE_DIR``
in a fresh folder: the second run must not load what the first compiled) and its own cache
directory:

1. ``--gpus 0``: one timing lane;
2. every visible GPU (no ``--gpus``): one timing lane per GPU, one compile pool.

Scaling efficiency = t1 / (n · tn) (target ≥ 0.8). Two limits are reported beside it, from the
reports: ``balance_bound`` (the unit of work is one problem, 6 per model: on 4 GPUs two lanes time
two problems, so at best ~0.76 of linear by the cost model) and the compile phase (CPU-bound,
shared by the lanes: its wall time does not shrink with more GPUs, and each extra timing lane
takes one core from the pool). Winners: per (problem, bucket), the same config, or a different one
whose time in its own run is within 3% of the other run's winner (timing noise between two
near-equal configs).

Writes ``OUT/multi_sweep.json`` (the summary, with card, driver, torch and Triton versions),
``OUT/sweep_1gpu.json`` / ``OUT/sweep_ngpu.json`` (the sweeps' own JSON reports) and their stderr
logs. ``--budget`` (default 225 s) caps both runs together so the script finishes inside one
4-minute command: the one-GPU run gets 62% of it (116 s of work on an H200), the rest goes to the
all-GPU run; a run cut short by its budget is reported incomplete and no efficiency is claimed
(pass a smaller ``--tokens`` grid then).

    python benchmarks/gpu_multi_sweep.py OUT                 # on a 2- or 4-GPU box, ~4 min
    python benchmarks/gpu_multi_sweep.py OUT --interpret     # CPU dry run: tiny preset, 2 CPU lanes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # a source checkout works without `pip install -e .`

TARGET_EFFICIENCY = 0.8
NOISE = 0.03
CANDIDATE_TIMEOUT_S = 30  # a healthy candidate takes well under a second


def log(message: str) -> None:
    print(f"[gpu_multi_sweep {time.strftime('%H:%M:%S')}] {message}", flush=True)


def environment(interpret: bool) -> dict:
    import torch
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
           "gpus": 0 if interpret else torch.cuda.device_count()}
    if not interpret and torch.cuda.is_available():
        env["cards"] = [torch.cuda.get_device_properties(i).name for i in range(torch.cuda.device_count())]
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except Exception:  # no nvidia-smi (the CPU dry run): the card names still identify a GPU run
        env["driver"] = "unknown"
    return env


def run_sweep(name: str, gpus: str | None, args, budget: float, out: Path, scratch: Path) -> dict:
    cache_dir, triton_cache = scratch / f"cache_{name}", scratch / f"triton_{name}"
    triton_cache.mkdir(parents=True)
    cmd = [sys.executable, "-m", "moe_tune", "sweep", "--model", args.model, "-o", str(cache_dir), "--json",
           "--budget", f"{budget:.0f}", "--candidate-timeout", str(CANDIDATE_TIMEOUT_S)]
    if gpus is not None:
        cmd += ["--gpus", gpus]
    if args.tokens:
        cmd += ["--tokens", args.tokens]
    if args.interpret:
        cmd += ["--interpret"]
    env = {**os.environ, "TRITON_CACHE_DIR": str(triton_cache), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    log(f"{name}: {' '.join(cmd[1:])}  (budget {budget:.0f} s, cold Triton cache)")
    start = time.monotonic()
    with open(out / f"sweep_{name}.log", "w") as stderr:
        try:
            # The sweep checks its budget between measurements; one candidate and the cache
            # write can follow.
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=REPO,
                                  timeout=budget + CANDIDATE_TIMEOUT_S + 45)
            code, stdout = proc.returncode, proc.stdout.decode()
        except subprocess.TimeoutExpired as exc:
            code, stdout = "timeout", (exc.stdout or b"").decode()
    wall = time.monotonic() - start
    (out / f"sweep_{name}.json").write_text(stdout)
    try:
        report = json.loads(stdout)
    except ValueError:
        log(f"{name}: no JSON report (exit {code}); last lines of the log:\n"
            f"{(out / f'sweep_{name}.log').read_text()[-2000:]}")
        return {"exit_code": code, "wall_s": round(wall, 1), "complete": False}
    stats = report["stats"]
    summary = {"exit_code": code, "wall_s": round(wall, 1), "sweep_elapsed_s": report["elapsed_s"],
               "complete": report["complete"], "stopped": report["stopped"], "lanes": report["lanes"],
               "balance_bound": report["balance_bound"], "units": report["units"], "stats": stats,
               "compile_share": (round(stats["compile_wall_s"] / report["elapsed_s"], 3)
                                 if stats.get("compile_wall_s") and report["elapsed_s"] else None),
               "winners": {f"{p['problem']}@{b['tokens']}": {"config": b["winner_short"], "ms": b["median_ms"]}
                           for p in report["problems"] for b in p["buckets"]}}
    log(f"{name}: exit {code}, {wall:.1f} s wall, {len(report['lanes'])} lane(s), complete={report['complete']}, "
        f"{stats['measurements']} measurements, {stats['compiles']} compiles on {stats['compile_workers']} "
        f"processes ({stats['compile_wall_s']} s wall)")
    return summary


def compare(one: dict, many: dict) -> dict:
    """Same winner, or a different one within NOISE of the other run's winner (in both runs)."""
    same, noise, differ = [], [], []
    for key, a in one["winners"].items():
        b = many["winners"].get(key)
        if b is None:
            differ.append({"point": key, "1gpu": a["config"], "ngpu": None})
        elif a["config"] == b["config"]:
            same.append(key)
        elif a["ms"] and b["ms"] and abs(a["ms"] / b["ms"] - 1) <= NOISE:
            noise.append({"point": key, "1gpu": a, "ngpu": b})
        else:
            differ.append({"point": key, "1gpu": a, "ngpu": b})
    return {"points": len(one["winners"]), "same_config": len(same), "within_noise": noise, "differ": differ,
            "match": not differ and len(one["winners"]) == len(many["winners"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="results folder")
    parser.add_argument("--budget", type=float, default=225.0, help="seconds for both runs together")
    parser.add_argument("--model", default="qwen3-30b-a3b")
    parser.add_argument("--tokens", default=None, help="token grid (default: the sweep's)")
    parser.add_argument("--interpret", action="store_true", help="CPU dry run: tiny preset, 2 CPU lanes")
    args = parser.parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
        args.model, args.tokens = "tiny", args.tokens or "16,32"
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    env = environment(args.interpret)
    lanes = 2 if args.interpret else env["gpus"]
    log(f"env: {env}")
    if lanes < 1:
        log("no GPU is visible (try --interpret)")
        return 2
    with tempfile.TemporaryDirectory(prefix="moe-tune-multi-") as tmp:
        scratch = Path(tmp)
        one = run_sweep("1gpu", "0", args, 0.62 * args.budget, args.out, scratch)
        left = max(30.0, args.budget - (time.monotonic() - started))
        many = run_sweep("ngpu", "0,1" if args.interpret else None, args, left, args.out, scratch)
    summary = {"env": env, "model": args.model, "gpus": lanes, "budget_s": args.budget, "one_gpu": one,
               "all_gpus": many, "target_efficiency": TARGET_EFFICIENCY, "interpret": args.interpret}
    if one.get("complete") and many.get("complete"):
        t1, tn = one["wall_s"], many["wall_s"]
        efficiency = t1 / (lanes * tn)
        summary.update(speedup=round(t1 / tn, 3), efficiency=round(efficiency, 3),
                       meets_target=efficiency >= TARGET_EFFICIENCY, winners=compare(one, many))
        log(f"1 GPU {t1:.1f} s, {lanes} GPUs {tn:.1f} s: speedup {t1 / tn:.2f}x, efficiency {efficiency:.2f} "
            f"(target {TARGET_EFFICIENCY}); balance bound {many['balance_bound']}, compile phase "
            f"{many['stats']['compile_wall_s']} s of {many['sweep_elapsed_s']} s; winners: "
            f"{summary['winners']['same_config']}/{summary['winners']['points']} same config, "
            f"{len(summary['winners']['within_noise'])} within {NOISE:.0%}, {len(summary['winners']['differ'])} differ")
    else:
        summary["efficiency"] = None
        log("a run did not complete within its budget: no efficiency claimed (try a smaller --tokens grid)")
    if args.interpret:
        summary["note"] = "CPU dry run under Triton's interpreter: times are meaningless"
    (args.out / "multi_sweep.json").write_text(json.dumps(summary, indent=2))
    log(f"wrote {args.out / 'multi_sweep.json'} ({time.monotonic() - started:.0f} s)")
    return 0 if one.get("complete") and many.get("complete") else 1


if __name__ == "__main__":
    sys.exit(main())
