"""A torchrun rank's part of a sweep: two phases over the ranks, then every rank's results to rank 0.

Torchrun ranks talk only where they meet (``distribute.Gather``, gloo), so a rank's share runs in
two phases (``run_ranked``): the screens, split by (problem, slice of its compile list) so that
each config compiles on one rank only; an exchange of every screen outcome; the settles, split by
problem (each problem's chain on one rank). At the end ``gather_shares`` sends every rank's
``Share`` (its settled buckets, where they ran, its engine's counts, why it stopped) to rank 0,
which merges them into its own and writes the one cache file. A rank that did not report is
named in the merged ``stopped``; its journal keeps what it measured, for ``--resume``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

from moe_tune.device import DeviceInfo
from moe_tune.problem import KernelConfig, Problem
from moe_tune.tuning.distribute import Gather, assign, screen_slices
from moe_tune.tuning.engine import BudgetExhausted, EngineStats
from moe_tune.tuning.protocol import Outcome
from moe_tune.tuning.results import BucketResult

if TYPE_CHECKING:
    from moe_tune.tuning.sweep import Run


def run_ranked(run: Run, gather: Gather, problems: list[Problem],
               costs: Mapping[Problem, Mapping[int, tuple[float, float]]]) -> str | None:
    """A torchrun rank's share, in two phases (``distribute``): the screens, split by (problem,
    slice of its compile list) so that each config compiles on one rank only; an exchange of every
    screen outcome (``all_gather_object``); the settles, split by problem (each problem's chain on
    one rank). Returns why it stopped early, or None."""
    rank, world = gather.launch.rank, gather.launch.world_size
    tokens = run.options.tokens
    units: dict[tuple[str, int], tuple[Problem, list[KernelConfig]]] = {}
    unit_costs: dict[tuple[str, int], float] = {}
    for problem in problems:
        plan = run.plans[problem]
        open_ = [t for t in tokens if (problem.key, t) not in run.done]
        screened = [c for c in plan.compile if any(c in plan.screen[t] for t in open_)]
        for i, part in enumerate(screen_slices(screened)):
            units[(problem.key, i)] = (problem, part)
            unit_costs[(problem.key, i)] = sum(costs[problem][t][0] for t in open_ for c in part if c in plan.screen[t])
    bins = assign(unit_costs, world)
    mine: dict[tuple[Problem, int], list[KernelConfig]] = {}
    for key in bins[rank]:
        problem, part = units[key]
        for t in tokens:
            mine.setdefault((problem, t), []).extend(c for c in run.plans[problem].screen[t] if c in part)
    phase1 = run.buckets(problems, settle=False, mine=mine)
    stopped = None
    try:
        run.phase(phase1)
    except BudgetExhausted as exc:
        stopped = f"{exc}; rerun with --resume to finish"
    own = {(b.problem.key, b.tokens): dict(b.screened) for b in phase1 if b.screened}
    payloads = gather.exchange({"rank": rank, "screens": own, "stopped": stopped})
    if payloads is None:
        run.lost_rank = True
        return ("a rank stopped before the ranks exchanged their screens (each rank's journal keeps its "
                "measurements): rerun with --resume to finish")
    halted = [(p["rank"], p["stopped"]) for p in payloads if p["stopped"]]
    if halted:
        return stopped or f"rank {halted[0][0]}: {halted[0][1]}"
    screened: dict[tuple[str, int], dict[KernelConfig, Outcome]] = {}
    for payload in payloads:
        for key, outcomes in payload["screens"].items():
            screened.setdefault(key, {}).update(outcomes)
    chains = {p: sum(costs[p][t][1] for t in tokens if (p.key, t) not in run.done) for p in problems}
    owners = assign(chains, world)
    ours = [p for p in problems if p in owners[rank]]
    # The phases run one after the other: each lasts as long as its most loaded rank.
    longest = (max(sum(unit_costs[k] for k in b) for b in bins) + max(sum(chains[p] for p in b) for b in owners))
    total = sum(unit_costs.values()) + sum(chains.values())
    run.rank_bound = total / (world * longest) if longest > 0 else 1.0
    run.phase(run.buckets(ours, settle=True, screened=screened))
    return None


@dataclass
class Share:
    """What one process settled (per problem, its settled buckets), where each bucket was screened
    and settled (lane names), its engine's counts, and why it stopped early (None: it did not)."""

    results: dict[Problem, list[BucketResult]]
    stats: EngineStats
    stopped: str | None
    settled_on: dict[tuple[str, int], str]
    screened_on: dict[tuple[str, int], list[str]]


def gather_shares(gather: Gather, device: DeviceInfo, share: Share, note: Callable[[str], None]) -> Share:
    """Rank 0: its ``share`` merged with every other rank's (a rank that timed on another device
    is refused: a cache file holds one device). Other ranks: their own, with ``stopped`` set when
    rank 0 never took it. A rank that did not report is named in ``stopped`` (and ``note``d)."""
    rank = gather.launch.rank
    try:
        payloads, missing = gather.gather({"rank": rank, "device": device, "share": share})
    finally:
        gather.close()
    stopped = share.stopped
    for other in payloads:
        if other["rank"] == rank:
            continue
        theirs: Share = other["share"]
        if other["device"].name != device.name:
            stopped = (f"rank {other['rank']} timed on {other['device'].name}, rank 0 on {device.name}: "
                       f"its results were not written (a cache file holds one device)")
            continue
        share.results.update(theirs.results)
        prefix = f"rank{other['rank']}:"
        share.settled_on.update({k: prefix + v for k, v in theirs.settled_on.items()})
        for k, v in theirs.screened_on.items():
            share.screened_on[k] = sorted({*share.screened_on.get(k, []), *(prefix + lane for lane in v)})
        share.stats.merge(theirs.stats)
        if theirs.stopped and not stopped:
            stopped = f"rank {other['rank']}: {theirs.stopped}"
    if missing and rank != 0:
        stopped = "rank 0 did not take this rank's results (its journal keeps them): rerun with --resume to finish"
        note(stopped)
    elif missing:
        stopped = (f"rank(s) {', '.join(map(str, missing))} did not report; their journals keep what they "
                   f"finished: rerun with --resume to finish")
        note(stopped)
    share.stopped = stopped
    return share
