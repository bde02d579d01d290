"""`moe-tune sweep` on one GPU and on several GPUs of the host: wall clock, scaling, same winners.

Runs of the default sweep (``--model qwen3-30b-a3b``, the default token grid and space), each a
fresh ``python -m moe_tune sweep`` process with its own cold Triton cache (``TRITON_CACHE_DIR`` in
a fresh folder: a later run must not load what an earlier one compiled) and its own cache folder:

1. ``--gpus 0``: one timing lane (the baseline);
2. for each count of ``--counts`` above 1 (default: every visible GPU), ``--gpus 0,..,n-1``: one
   timing lane per GPU, one compile pool;
3. with ``--torchrun N``: ``torchrun --standalone --nproc-per-node N -m moe_tune sweep``, N ranks
   of one lane each on the gloo exchange (what a multi-node job does, on one node).

Scaling efficiency = t1 / (n · tn) over the processes' wall clocks, start-up included (target
≥ 0.8). Beside it: each lane's busy time (seconds its worker spent measuring), the compile phase
(first compile submitted → last one finished) and the cost model's bound (``balance_bound``).
Winners: per (problem, bucket), the same config as the one-GPU run, or a different one whose time
in its own run is within 3% of the other run's winner (timing noise between near-equal configs).

Writes ``OUT/multi_sweep.json`` (the summary, with card, driver, torch and Triton versions) and,
per run, ``OUT/sweep_<name>.json`` (the sweep's own JSON report), its stderr log and the cache
file it wrote (``OUT/cache_<name>/``). Each run has
``--run-budget`` seconds (default 240); a run cut short is reported incomplete and no efficiency
is claimed for it.

    python benchmarks/gpu_multi_sweep.py OUT                         # 1 GPU vs every GPU
    python benchmarks/gpu_multi_sweep.py OUT --counts 2,4 --torchrun 4
    python benchmarks/gpu_multi_sweep.py OUT --interpret             # CPU dry run: tiny preset, 2 CPU lanes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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


def run_sweep(name: str, gpus: str | None, args, budget: float, out: Path, scratch: Path,
              torchrun: int | None = None) -> dict:
    cache_dir, triton_cache = scratch / f"cache_{name}", scratch / f"triton_{name}"
    triton_cache.mkdir(parents=True)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"]
                if torchrun else [sys.executable])
    cmd = [*launcher, "-m", "moe_tune", "sweep", "--model", args.model, "-o", str(cache_dir), "--json",
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
    for written in cache_dir.glob("*.json"):  # the cache file itself, to ship or compare
        (out / f"cache_{name}").mkdir(exist_ok=True)
        shutil.copy(written, out / f"cache_{name}" / written.name)
    try:
        report = json.loads(stdout[stdout.index("{"):]) if "{" in stdout else json.loads(stdout)
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
               "lane_busy_s": stats.get("lane_busy_s"), "split": report.get("split"),
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
    parser.add_argument("--run-budget", type=float, default=240.0, help="seconds per sweep run")
    parser.add_argument("--counts", default=None, help="GPU counts to run beside the one-GPU baseline "
                                                       "(default: every visible GPU)")
    parser.add_argument("--torchrun", type=int, default=None, help="also run N torchrun ranks (one GPU each)")
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
    available = 2 if args.interpret else env["gpus"]
    log(f"env: {env}")
    if available < 1:
        log("no GPU is visible (try --interpret)")
        return 2
    counts = [int(c) for c in args.counts.split(",")] if args.counts else [available]
    counts = [c for c in counts if 1 < c <= available]
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="moe-tune-multi-") as tmp:
        scratch = Path(tmp)
        runs["1gpu"] = run_sweep("1gpu", "0", args, args.run_budget, args.out, scratch)
        for count in counts:
            runs[f"{count}gpu"] = run_sweep(f"{count}gpu", ",".join(map(str, range(count))), args, args.run_budget,
                                            args.out, scratch)
        if args.torchrun and not args.interpret:
            runs[f"torchrun{args.torchrun}"] = run_sweep(f"torchrun{args.torchrun}", None, args, args.run_budget,
                                                         args.out, scratch, torchrun=args.torchrun)
    one = runs["1gpu"]
    summary = {"env": env, "model": args.model, "run_budget_s": args.run_budget, "runs": runs,
               "target_efficiency": TARGET_EFFICIENCY, "interpret": args.interpret, "scaling": {}}
    for name, run in runs.items():
        if name == "1gpu":
            continue
        lanes = int(name.removeprefix("torchrun").removesuffix("gpu"))
        if not (one.get("complete") and run.get("complete")):
            summary["scaling"][name] = {"efficiency": None, "note": "a run did not complete within its budget"}
            log(f"{name}: a run did not complete within its budget: no efficiency claimed")
            continue
        t1, tn = one["wall_s"], run["wall_s"]
        efficiency = t1 / (lanes * tn)
        winners = compare(one, run)
        summary["scaling"][name] = {"gpus": lanes, "speedup": round(t1 / tn, 3), "efficiency": round(efficiency, 3),
                                    "meets_target": efficiency >= TARGET_EFFICIENCY, "winners": winners}
        log(f"1 GPU {t1:.1f} s, {name} {tn:.1f} s: speedup {t1 / tn:.2f}x, efficiency {efficiency:.2f} "
            f"(target {TARGET_EFFICIENCY}); bound {run['balance_bound']}, compile phase "
            f"{run['stats']['compile_wall_s']} s of {run['sweep_elapsed_s']} s, lanes busy {run['lane_busy_s']}; "
            f"winners: {winners['same_config']}/{winners['points']} same config, "
            f"{len(winners['within_noise'])} within {NOISE:.0%}, {len(winners['differ'])} differ")
    if args.interpret:
        summary["note"] = "CPU dry run under Triton's interpreter: times are meaningless"
    (args.out / "multi_sweep.json").write_text(json.dumps(summary, indent=2))
    log(f"wrote {args.out / 'multi_sweep.json'} ({time.monotonic() - started:.0f} s)")
    return 0 if all(r.get("complete") for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
