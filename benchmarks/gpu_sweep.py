"""`moe-tune sweep` on a GPU: the default sweep's wall time, and the fast search against an
exhaustive search of the same space.

Two steps, each sized for one 10-minute command (``--step all`` runs both in one):

* ``sweep`` — ``moe-tune sweep --model qwen3-30b-a3b --gpus 0`` as a user runs it on one GPU (a
  fresh process, the default token grid and space, cold Triton cache unless the machine is warm),
  timed end to end with ``--budget`` as a safety cap. Writes ``sweep.json`` (the sweep's own JSON
  report), ``sweep.log`` (its stderr), ``sweep_summary.json`` (wall time against the ≤ 2 min
  target; per problem × bucket: config, TFLOP/s, speedup over the heuristic default, whether the
  head to head kept the default; and the winners against the cache shipped for this GPU:
  ``same``, ``noise`` — another config whose careful time in this run is within 3% of the
  shipped one's, or the default kept where the shipped config's lead is within the noise — or
  ``differs``), ``sweep_cache.json`` and ``sweep_journal.jsonl`` (the cache file written and the
  journal).
* ``check`` — for 6 (problem, bucket) points (up forward, down dx, up dW at 4096 and 16384
  tokens), in one process and one timing worker: the fast search exactly as the sweep runs it
  (same plan, seeded by the previous bucket), then every legal config of the default space
  compiled, screened and the best 16 re-timed (the exhaustive best), then the two picks timed
  head to head in alternating rounds. Writes ``check.json`` after every point: gap =
  fast / exhaustive − 1 (the target is ≤ 3%).

Everything is also printed; every figure is written beside the card, driver, torch and Triton
versions (``env.json``). Budgets stop a step cleanly (partial results stay written).

Run from the repository root on the GPU box (no install needed beyond torch/triton/typer/rich):

    python benchmarks/gpu_sweep.py OUT_DIR --step sweep     # ~2-3 min
    python benchmarks/gpu_sweep.py OUT_DIR --step check     # ~4-7 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # a source checkout works without `pip install -e .`

# The check's points: one per GEMM layout family and pass kind, at DESIGN.md's two anchor sizes.
CHECK_POINTS = (("up", "forward"), ("down", "dx"), ("up", "dw"))
CHECK_TOKENS = (4096, 16384)
HEAD_TO_HEAD_ROUNDS = 3
# The bound on the default sweep, one GPU, start-up included.
TARGET_S = 120
# Two configs whose careful times in one run are this close are the same winner up to noise (the
# multi-GPU benchmark's rule).
NOISE = 0.03
# A healthy candidate takes well under a second; a hung one must not eat a 10-minute command.
CANDIDATE_TIMEOUT_S = 60


class Setup:
    """What the steps run: the real thing, or (``--interpret``) a CPU dry run of the same code on
    the tiny preset under Triton's interpreter, to check this script without a GPU."""

    def __init__(self, interpret: bool, model: str):
        self.interpret = interpret
        self.model = "tiny" if interpret else model
        self.dtype = "float32" if interpret else "bfloat16"
        self.space = "interpret" if interpret else "default"
        self.grid = (16, 32) if interpret else None  # None: the sweep's DEFAULT_TOKENS
        self.points = CHECK_POINTS[:1] if interpret else CHECK_POINTS
        self.check_tokens = (32,) if interpret else CHECK_TOKENS


def log(message: str) -> None:
    print(f"[gpu_sweep {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def environment() -> dict:
    import torch
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(card=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:  # nvidia-smi missing: the card name still identifies the run
        env["driver"] = "unknown"
    return env


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ---------------------------------------------------------------------------------------------
# Step 1: the default sweep, end to end
# ---------------------------------------------------------------------------------------------


def shipped_winners(env_info: dict) -> tuple[str, dict]:
    """The cache shipped for this GPU and Triton version: its file name and (problem key, tokens) →
    config short (empty when none ships)."""
    from moe_tune.cache import paths
    from moe_tune.problem import KernelConfig

    name = paths.file_name(env_info.get("card") or "", env_info.get("triton") or "")
    path = REPO / "caches" / name
    if not path.exists():
        return name, {}
    data = json.loads(path.read_text())
    return name, {(key, b["tokens"]): KernelConfig.from_dict(b["config"]).short()
                  for key, entry in data["entries"].items() for b in entry["buckets"]}


def match_shipped(shipped: dict, problem: str, bucket: dict) -> str | None:
    """``same`` winner as the shipped cache, ``noise`` (a different one within ``NOISE`` of it in
    this run's careful times, or the default kept because the challenger's lead was within the
    head to head's noise), ``differs``; None when nothing ships for this bucket."""
    theirs = shipped.get((problem, bucket["tokens"]))
    if theirs is None or bucket["winner_short"] is None:
        return None
    if theirs == bucket["winner_short"]:
        return "same"
    careful = {c["short"]: c["median_ms"] for c in bucket.get("careful", [])}
    versus = bucket.get("versus") or {}
    if versus.get("kept") == "default" and versus.get("challenger_short") == theirs:
        return "noise"
    ours = careful.get(bucket["winner_short"])
    if theirs in careful and ours and careful[theirs] <= ours * (1 + NOISE):
        return "noise"
    return "differs"


def step_sweep(out: Path, setup: Setup, budget: float, env_info: dict, cache_dir: Path) -> bool:
    cmd = [sys.executable, "-m", "moe_tune", "sweep", "--model", setup.model, "-o", str(cache_dir), "--json",
           "--budget", str(budget), "--candidate-timeout", str(CANDIDATE_TIMEOUT_S), "--gpus", "0"]
    if setup.interpret:
        cmd += ["--interpret", "--tokens", ",".join(map(str, setup.grid))]
    log(f"sweep: {' '.join(cmd[1:])}")
    start = time.monotonic()
    with open(out / "sweep.log", "w") as stderr:
        try:
            # The budget is checked between measurements: one more candidate (bounded by its
            # timeout) and the cache write can follow it.
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=stderr, env=subprocess_env(),
                                  timeout=budget + CANDIDATE_TIMEOUT_S + 30, cwd=REPO)
            code, stdout = proc.returncode, proc.stdout.decode()
        except subprocess.TimeoutExpired as exc:
            code, stdout = "timeout", (exc.stdout or b"").decode()
    wall = time.monotonic() - start
    (out / "sweep.json").write_text(stdout)
    shipped_name, shipped = shipped_winners(env_info)
    summary = {"env": env_info, "command": " ".join(cmd[1:]), "exit_code": code, "wall_s": round(wall, 1),
               "target_s": TARGET_S, "within_target": wall <= TARGET_S}
    try:
        report = json.loads(stdout)
    except ValueError:
        report = None
        tail = (out / "sweep.log").read_text()[-3000:]
        summary["error"] = "the sweep printed no JSON report; see sweep.log"
        log(f"sweep failed (exit {code}); last lines of sweep.log:\n{tail}")
    if report is not None:
        summary.update(complete=report["complete"], stopped=report["stopped"], sweep_elapsed_s=report["elapsed_s"],
                       stats=report["stats"], tokens=report["tokens"], policy=report["policy"])
        rows = []
        for problem in report["problems"]:
            for b in problem["buckets"]:
                versus = b.get("versus") or {}
                rows.append({"problem": problem["problem"], "gemm": problem["gemm"], "pass": problem["pass"],
                             "tokens": b["tokens"], "config": b["winner_short"], "ms": b["median_ms"],
                             "tflops": b["tflops"], "default_ms": b["default_ms"], "speedup": b["speedup"],
                             "timed": b["timed"], "failed": len(b["failed"]), "kept": versus.get("kept"),
                             "versus": versus or None,
                             "match": match_shipped(shipped, problem["problem"], b)})
        summary["results"] = rows
        summary["shipped_cache"] = shipped_name if shipped else None
        matches = [r["match"] for r in rows if r["match"] is not None]
        summary["winners"] = {kind: matches.count(kind) for kind in ("same", "noise", "differs")}
        log(f"sweep: exit {code}, {wall:.0f} s wall ({'within' if wall <= TARGET_S else 'OVER'} the "
            f"{TARGET_S} s target), complete={report['complete']}, stats={report['stats']}")
        log(f"winners against {shipped_name if shipped else '(no shipped cache for this GPU)'}: {summary['winners']}")
        print(f"{'gemm':5} {'pass':8} {'tokens':>6}  {'config':30} {'ms':>8} {'TFLOP/s':>8} {'vs default':>10} "
              f"{'kept':>10} {'shipped':>8}")
        for r in rows:
            tflops = f"{r['tflops']:.0f}" if r["tflops"] else "-"
            speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
            ms = f"{r['ms']:.4f}" if r["ms"] else "-"
            print(f"{r['gemm']:5} {r['pass']:8} {r['tokens']:>6}  {str(r['config']):30} {ms:>8} {tflops:>8} "
                  f"{speedup:>10} {str(r['kept'] or '-'):>10} {str(r['match'] or '-'):>8}")
    # The cache file and the journal, copied flat beside the reports (a results folder that
    # travels back from a GPU box keeps at most two levels).
    for pattern, name in (("*__triton-*.json", "sweep_cache.json"), ("journals/*.jsonl", "sweep_journal.jsonl")):
        found = sorted(cache_dir.glob(pattern))
        if found:
            shutil.copyfile(found[0], out / name)
    write_json(out / "sweep_summary.json", summary)
    return code == 0


# ---------------------------------------------------------------------------------------------
# Step 2: fast search vs exhaustive search
# ---------------------------------------------------------------------------------------------


def step_check(out: Path, setup: Setup, budget: float, env_info: dict) -> bool:
    from moe_tune.models import resolve_model
    from moe_tune.tuning.devices import detect_device
    from moe_tune.tuning.engine import BudgetExhausted, Engine, compile_workers
    from moe_tune.tuning.options import DEFAULT_TOKENS
    from moe_tune.tuning.routing_spec import RoutingSpec
    from moe_tune.tuning.search import EXHAUSTIVE, plan_problem, policy_for, search_bucket

    start = time.monotonic()
    device = detect_device(interpret=setup.interpret)
    shape = resolve_model(setup.model).shape
    by_name = {(p.gemm, p.pass_): p for p in shape.problems(setup.dtype)}
    problems = [by_name[name] for name in setup.points]
    grid = setup.grid or tuple(DEFAULT_TOKENS)
    FAST = policy_for(setup.space, interpreter=setup.interpret)  # what `moe-tune sweep` uses
    fast_plans = {p: plan_problem(p, device, setup.space, grid, FAST) for p in problems}
    full_plans = {p: plan_problem(p, device, setup.space, setup.check_tokens, EXHAUSTIVE) for p in problems}
    workers = compile_workers(None, setup.interpret, problems, ("default",))
    result = {"env": env_info, "device": device.to_dict(), "model": setup.model, "space": setup.space,
              "fast_policy": FAST.to_dict(), "exhaustive_policy": EXHAUSTIVE.to_dict(), "compile_workers": workers,
              "points": [], "complete": False}
    log(f"check: {len(problems)} problems x {setup.check_tokens} tokens, exhaustive compiles "
        f"{sum(len(p.compile) for p in full_plans.values())} configs on {workers} workers, budget {budget:.0f} s")

    def previous_bucket(tokens: int) -> int | None:
        smaller = [t for t in grid if t < tokens]
        return smaller[-1] if smaller else None

    engine = Engine(device, routing=RoutingSpec(), seed=0, buckets=grid, compile_workers=workers,
                    candidate_timeout_s=CANDIDATE_TIMEOUT_S, deadline=start + budget)
    try:
        engine.start()
        for p in problems:  # fast lists first: they are timed first
            engine.precompile(p, fast_plans[p].compile)
        for p in problems:
            engine.precompile(p, full_plans[p].compile)
        for problem in problems:
            fast_plan, full_plan = fast_plans[problem], full_plans[problem]
            for tokens in setup.check_tokens:
                t0 = time.monotonic()
                seeds = []
                before = previous_bucket(tokens)
                if before is not None:  # the sweep seeds each bucket with the previous one's picks
                    prev = search_bucket(problem, before, fast_plan.screen[before], fast_plan.default, engine, FAST)
                    seeds = [t.config for t in prev.careful[:2]]
                fast = search_bucket(problem, tokens, fast_plan.screen[tokens], fast_plan.default, engine, FAST,
                                     seeds=seeds)
                t_fast = time.monotonic() - t0
                full = search_bucket(problem, tokens, full_plan.screen[tokens], full_plan.default, engine, EXHAUSTIVE)
                point = head_to_head(engine, problem, tokens, fast, full)
                point.update(seconds_fast=round(t_fast, 1), seconds_total=round(time.monotonic() - t0, 1),
                             exhaustive_screened=full.screened, exhaustive_failed=len(full.failed),
                             fast_screened=fast.screened)
                result["points"].append(point)
                write_json(out / "check.json", result)
                log(f"check: {problem.gemm} {problem.pass_} T={tokens}: fast {point['fast_config']} "
                    f"{point['fast_ms']:.4f} ms, exhaustive {point['best_config']} {point['best_ms']:.4f} ms, "
                    f"gap {point['gap_pct']:+.2f}% (screened {full.screened}, {time.monotonic() - t0:.0f} s)")
        result["complete"] = True
    except BudgetExhausted as exc:
        result["stopped"] = str(exc)
        log(f"check stopped: {exc}")
    finally:
        engine.close()
        result["stats"] = engine.stats.to_dict()
        result["elapsed_s"] = round(time.monotonic() - start, 1)
        gaps = [p["gap_pct"] for p in result["points"] if p["gap_pct"] is not None]
        result["summary"] = {"points": len(result["points"]), "max_gap_pct": max(gaps) if gaps else None,
                             "mean_gap_pct": statistics.mean(gaps) if gaps else None,
                             "within_3pct": all(g <= 3.0 for g in gaps) if gaps else None}
        write_json(out / "check.json", result)
    log(f"check: {result['summary']} in {result['elapsed_s']} s")
    return result["complete"]


def head_to_head(engine, problem, tokens: int, fast, full) -> dict:
    """Time the two picks in alternating careful rounds; gap from the medians of the rounds."""
    point = {"problem": problem.key, "gemm": problem.gemm, "pass": problem.pass_, "tokens": tokens,
             "fast_config": fast.winner.short() if fast.winner else None,
             "best_config": full.winner.short() if full.winner else None,
             "default_config": full.default.short(), "default_ms": full.default_ms,
             "fast_ms": None, "best_ms": None, "gap_pct": None}
    if fast.winner is None or full.winner is None:
        return point
    ranking = [t.config for t in full.careful]
    point["fast_rank_in_exhaustive"] = ranking.index(fast.winner) + 1 if fast.winner in ranking else None
    samples = {fast.winner: [], full.winner: []}
    for round_ in range(1, HEAD_TO_HEAD_ROUNDS + 1):
        for cfg in samples:  # one entry when both searches agree
            outcome = engine.measure(problem, tokens, cfg, f"final{round_}")
            if outcome.ok:
                samples[cfg].append(outcome.median_ms)
    if samples[fast.winner] and samples[full.winner]:
        fast_ms, best_ms = statistics.median(samples[fast.winner]), statistics.median(samples[full.winner])
        point.update(fast_ms=fast_ms, best_ms=best_ms,
                     gap_pct=0.0 if fast.winner == full.winner else 100.0 * (fast_ms / best_ms - 1.0),
                     fast_tflops=problem.flops(tokens) / (fast_ms * 1e-3) / 1e12,
                     best_tflops=problem.flops(tokens) / (best_ms * 1e-3) / 1e12)
    return point


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory for the JSON results (created)")
    parser.add_argument("--step", choices=("sweep", "check", "all"), default="all")
    parser.add_argument("--model", default="qwen3-30b-a3b")
    parser.add_argument("--sweep-budget", type=float, default=None,
                        help="seconds (default 450 for --step sweep, 300 within --step all)")
    parser.add_argument("--check-budget", type=float, default=None,
                        help="seconds (default 480 for --step check; what is left of 9 min within --step all)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the sweep writes its cache and journal (default: a fresh temp dir; the cache "
                        "file and journal are copied into OUT as sweep_cache.json and sweep_journal.jsonl)")
    parser.add_argument("--interpret", action="store_true",
                        help="CPU dry run of this script on the tiny preset under Triton's interpreter")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    setup = Setup(args.interpret, args.model)
    if setup.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    env_info = environment()
    write_json(args.out / "env.json", env_info)
    log(f"{env_info}")
    if env_info.get("card") is None and not setup.interpret:
        log("no CUDA GPU visible: nothing to benchmark")
        return 2
    ok = True
    if args.step in ("sweep", "all"):
        budget = args.sweep_budget or (300.0 if args.step == "all" else 450.0)
        cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="moe-tune-sweep-"))
        ok &= step_sweep(args.out, setup, budget, env_info, cache_dir)
    if args.step in ("check", "all"):
        budget = args.check_budget or (480.0 if args.step == "check" else max(120.0, 540.0 - (time.monotonic() - started)))
        ok &= step_check(args.out, setup, budget, env_info)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
