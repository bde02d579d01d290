"""How well the search's cost model ranks configs a GPU actually timed (CPU only).

Reads sweep journals (``<cache dir>/journals/*.jsonl``) and, for every (problem, bucket) with at
least eight screened configs, compares ``moe_tune.tuning.search.estimate_ms`` with the screen
medians the journal holds:

* Spearman's rank correlation of estimate and time;
* the regret of the model's top five: the fastest measured time among the five configs the model
  ranks first, over the fastest measured time of all (1.0: the model's top five hold the best).

A fast sweep screens the model's top 32 and re-times the fastest, so a regret near 1.0 is what
matters; the correlation says how far down the ranking stays sensible. A journal of a fast sweep
holds only the configs the model of its day ranked high (a biased sample); an ``--exhaustive``
journal holds every config of its space.

    python3 benchmarks/cost_model_check.py JOURNAL.jsonl [...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_tune.device import DeviceInfo  # noqa: E402
from moe_tune.models import list_presets  # noqa: E402
from moe_tune.problem import KernelConfig, Problem  # noqa: E402
from moe_tune.tuning.search import estimate_ms  # noqa: E402

TOP = 5
MIN_CONFIGS = 8


def screen_times(path: Path) -> tuple[DeviceInfo, dict[tuple[str, int], list[tuple[KernelConfig, float]]]]:
    """The journal's device and, per (problem key, tokens), each screened config's median ms."""
    device, groups = None, {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("type") == "header":
            device = DeviceInfo.from_dict(record["settings"]["device"])
        elif (record.get("type") == "measure" and record.get("stage") == "screen"
              and record.get("outcome", {}).get("ok")):
            groups.setdefault((record["problem"], record["tokens"]), []).append(
                (KernelConfig.from_dict(record["config"]), record["outcome"]["median_ms"]))
    if device is None:
        raise SystemExit(f"{path}: no journal header")
    return device, groups


def ranks(values: list[float]) -> list[int]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0] * len(values)
    for position, index in enumerate(order):
        out[index] = position
    return out


def spearman(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    return 1 - 6 * sum((a - b) ** 2 for a, b in zip(ranks(xs), ranks(ys))) / (n * (n * n - 1))


def known_problems() -> dict[str, Problem]:
    """Every preset's problems by key (a journal names its problems by key only)."""
    found = {}
    for preset in list_presets():
        for dtype in ("bfloat16", "float16", "float32"):
            for problem in preset.shape.problems(dtype):
                found[problem.key] = problem
    return found


def check(paths: list[Path]) -> list[dict]:
    problems = known_problems()
    rows = []
    for path in paths:
        device, groups = screen_times(path)
        for (key, tokens), timed in sorted(groups.items()):
            if key not in problems or len(timed) < MIN_CONFIGS:
                continue
            estimates = [estimate_ms(problems[key], cfg, tokens, device) for cfg, _ in timed]
            times = [ms for _, ms in timed]
            top = sorted(range(len(timed)), key=lambda i: (estimates[i], timed[i][0]))[:TOP]
            rows.append({"journal": path.name, "device": device.name, "problem": key, "tokens": tokens,
                         "configs": len(timed), "spearman": round(spearman(estimates, times), 3),
                         "top5_regret": round(min(times[i] for i in top) / min(times), 4)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("journals", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = check(args.journals)
    if not rows:
        raise SystemExit("no (problem, bucket) with enough screened configs")
    for row in rows:
        print(f"{row['device']:<24} {row['problem']:<58} {row['tokens']:>6} {row['configs']:>4} configs  "
              f"spearman {row['spearman']:+.2f}  top-{TOP} regret {row['top5_regret']:.3f}")
    print(f"{len(rows)} points: mean spearman {statistics.mean(r['spearman'] for r in rows):+.3f}, "
          f"mean top-{TOP} regret {statistics.mean(r['top5_regret'] for r in rows):.4f}, "
          f"worst {max(r['top5_regret'] for r in rows):.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
