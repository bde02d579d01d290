"""``moe-tune sweep``'s run: a model's problems × token buckets → tuned configs in the cache.

Data flow of ``run_sweep(options)``:

1. ``options.resolved()`` (``options``); the timing lanes and the device they share
   (``devices``); the problems and one ``search.ProblemPlan`` each, with cost estimates;
2. the split (``distribute``): a shard (``--shard i/n``) takes whole problems, a torchrun rank its
   share of two phases (``ranked.run_ranked``), a plain sweep everything;
3. the journal (``journal``: one file per shard or rank under ``<cache dir>/journals/``), resumed or
   fresh; with ``--resume`` the other journals of the same sweep are read too, so a re-run in any
   layout redoes only what no journal holds;
4. an ``engine.Engine``: the compile pool and one timing worker per lane, started at once in the
   background; every outcome is journalled (fsynced) before the search sees it;
5. ``Run.phase``: compiles go to the pool problem by problem; the buckets (bucket-major: every
   problem's smallest first) go to a ``schedule.Scheduler``, whose lanes take single screen
   measurements of compiled configs and whole settles (``search.settle_bucket``: careful
   re-timing seeded with the previous bucket's winner and runner-up, then the winner against
   the heuristic default head to head) as they become ready; each settled bucket is journalled,
   and a problem's buckets are merged into the cache file (``results.write_results``) once all
   are settled;
6. under torchrun, every rank's ``ranked.Share`` goes to rank 0, which writes it; a rank that did
   not report is named in ``stopped``;
7. a ``report.SweepReport`` (the CLI prints it as a table or JSON).

``budget_s`` stops the sweep before the next measurement once the wall clock passes it;
finished buckets are written and ``--resume`` carries on from the journal. ``timer`` and
``bench`` replace what measures (``engine.Engine``): the tests' deterministic stand-in for a
GPU, and worker behaviour (crashes, hangs, wrong results) they inject.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any, Callable, Mapping, Sequence

from moe_tune.errors import InvalidInputError
from moe_tune.problem import KernelConfig, Problem
from moe_tune.progress import NullProgress, Progress
from moe_tune.tuning.devices import detect_device, lane_device_info, lane_devices
from moe_tune.tuning.distribute import (GATHER_TIMEOUT, Gather, Launch, assign, bucket_costs, chain_bound,
                                        largest_first, split_settings)
from moe_tune.tuning.engine import BudgetExhausted, Engine, Lane, compile_workers
from moe_tune.tuning.journal import Journal, journal_path, journal_settings, sibling_records
from moe_tune.tuning.options import SweepOptions, named_problems, select_problems, sweep_command
from moe_tune.tuning.protocol import Outcome
from moe_tune.tuning.ranked import Share, gather_shares, run_ranked
from moe_tune.tuning.report import SweepReport
from moe_tune.tuning.results import BucketResult, write_results
from moe_tune.tuning.schedule import Bucket, Scheduler
from moe_tune.tuning.search import ProblemPlan, measurements_planned, plan_problem, settle_bucket


def run_sweep(options: SweepOptions, progress: Progress | None = None, *,
              timer: Callable[[Problem, int, KernelConfig, str], Outcome] | None = None,
              bench: Callable[[], Any] | None = None) -> SweepReport:
    """Tune ``options.model``'s problems on this device (module docstring)."""
    from moe_tune.cache import paths

    started = time.monotonic()
    options = options.resolved()
    progress = progress or NullProgress()
    launch = Launch.from_env()
    if launch is not None and options.shard is not None:
        raise InvalidInputError("--shard is for independent jobs; under torchrun the ranks split the work")
    detect_device(options.interpret)  # no GPU: NoGPUError before anything else
    lanes = lane_devices(options, launch)
    device = lane_device_info(lanes, options.interpret)
    problems = select_problems(options)
    plans = {p: plan_problem(p, device, options.space, options.tokens, options.policy) for p in problems}
    costs = {p: bucket_costs(plans[p], options.policy, device) for p in problems}
    work = {p: sum(len(plans[p].screen[t]) * screen + settle for t, (screen, settle) in costs[p].items())
            for p in problems}
    chains = {p: sum(settle for _, settle in costs[p].values()) for p in problems}

    # -- this process's share ---------------------------------------------------------------------
    if options.shard is not None:
        split = split_settings("shard", *options.shard)
    elif launch is not None:
        split = split_settings("torchrun", launch.rank, launch.world_size)
    else:
        split = split_settings("all")
    # A shard takes whole problems: with no way to talk to the others, it must settle every bucket
    # whose screen it ran, and a problem's settles chain. Torchrun ranks split finer (run_ranked).
    owner = ({p: b for b, units in enumerate(assign(work, split["count"])) for p in units}
             if split["kind"] == "shard" else {p: split["index"] for p in problems})
    mine = [p for p in problems if owner[p] == split["index"]]
    priority = largest_first({p: work[p] for p in mine})
    writes_cache = launch is None or launch.rank == 0
    gather = None
    if launch is not None:  # join the group now: a failed rendezvous costs no tuning
        timeout = GATHER_TIMEOUT if options.gather_timeout_s is None else timedelta(seconds=options.gather_timeout_s)
        gather = Gather(launch, timeout)

    cache_dir = paths.default_store_dir(options.cache_dir)
    jpath = journal_path(cache_dir, options.model, device, options.dtype, split)
    settings = {**journal_settings(options, device, problems), "split": split}
    journal = Journal.open(jpath, settings, resume=options.resume)
    others = sibling_records(jpath, settings) if options.resume else []
    done = {(r["problem"], r["tokens"]): r["result"] for r in [*others, *journal.records] if r.get("type") == "bucket"}
    deadline = started + options.budget_s if options.budget_s else None
    todo = any((p.key, t) not in done for p in mine for t in options.tokens)
    workers = (compile_workers(options.compile_workers, options.interpret or timer is not None, mine,
                               lanes, processes_per_host=launch.local_world_size if launch else 1)
               if todo else 0)
    engine = Engine(device, routing=options.routing, seed=options.seed, buckets=options.tokens,
                    candidate_timeout_s=options.candidate_timeout_s, compile_workers=workers, bench=bench,
                    journal=journal, deadline=deadline, on_measure=lambda problem: progress.end(task=problem),
                    devices=lanes, memo_records=others, timer=timer, epoch=started)
    if todo:
        engine.start()
    written: set[Problem] = set()
    write_lock = threading.Lock()
    cache_path = None

    def write(problem: Problem, buckets: list[BucketResult]) -> None:
        nonlocal cache_path
        if writes_cache and any(b.ok for b in buckets):
            with write_lock:
                cache_path = str(write_results(cache_dir, device, problem, buckets, time.monotonic() - started,
                                               sweep_command(options)))
                written.add(problem)

    run = Run(options, plans, engine, progress, done, write)
    stopped = None
    try:
        labels = {problem: name.replace(".", " ") for name, problem in named_problems(options).items()}
        width = max(map(len, labels.values()), default=0)
        for problem in priority:
            progress.start(sum(measurements_planned(plans[problem], options.policy).values()), task=problem,
                           label=f"{labels.get(problem, problem.key):>{width}}")
        if gather is None:
            run.phase(run.buckets(priority, settle=True))
        else:
            stopped = run_ranked(run, gather, priority, {p: costs[p] for p in priority})
    except BudgetExhausted as exc:
        stopped = f"{exc}; rerun with --resume to finish"
        progress.note(stopped)
    finally:
        engine.close()
        journal.close()

    share = Share(run.results(), engine.stats, stopped, dict(run.settled_on),
                  {k: sorted(v) for k, v in run.screened_on.items()})
    if gather is not None and not run.lost_rank:
        share = gather_shares(gather, device, share, progress.note)
    elif gather is not None:
        gather.close()
    results, stopped, settled_on, screened_on = share.results, share.stopped, share.settled_on, share.screened_on
    for problem, buckets in results.items():  # a stopped sweep's partial problems, the other ranks' results
        if problem not in written:
            write(problem, buckets)
    results = {p: results[p] for p in problems if p in results}
    expected = mine if launch is None else problems if launch.rank == 0 else list(run.chains)
    complete = stopped is None and all(len(results.get(p, [])) == len(options.tokens) for p in expected)
    units = [{"problem": p.key, "tokens": t, "cost_ms": round(len(plans[p].screen[t]) * costs[p][t][0]
                                                               + costs[p][t][1], 1),
              "bin": owner[p], "screened_on": screened_on.get((p.key, t), []),
              "settled_on": settled_on.get((p.key, t))}
             for p in problems if p in mine or p in results for t in options.tokens]
    if split["kind"] == "torchrun":
        bound = run.rank_bound
    else:
        bound = chain_bound({p: (work[p], chains[p]) for p in mine}, len(lanes))
    return SweepReport(options.model, device, options, results, complete, time.monotonic() - started,
                       share.stats, cache_path, str(jpath), stopped, split=split, lanes=lanes, units=units,
                       balance_bound=bound)


class Run:
    """One process's share of a sweep: its buckets, the lanes' scheduler, what they settled."""

    def __init__(self, options: SweepOptions, plans: dict[Problem, ProblemPlan], engine: Engine, progress: Progress,
                 done: Mapping[tuple[str, int], Mapping[str, Any]], write: Callable[[Problem, list[BucketResult]], None]):
        self.options, self.plans, self.engine, self.progress, self.done = options, plans, engine, progress, done
        self._write = write
        self.chains: dict[Problem, list[Bucket]] = {}  # the problems this process settles
        self.settled_on: dict[tuple[str, int], str] = {}
        self.screened_on: dict[tuple[str, int], set[str]] = {}
        self.lost_rank = False  # torchrun: a rank vanished before the screens were exchanged
        self.rank_bound: float | None = None
        self._lock = threading.Lock()

    def buckets(self, problems: Sequence[Problem], *, settle: bool,
                mine: Mapping[tuple[Problem, int], list[KernelConfig]] | None = None,
                screened: Mapping[tuple[str, int], Mapping[KernelConfig, Outcome]] | None = None) -> list[Bucket]:
        """Every bucket of ``problems``, bucket-major (every problem's smallest bucket first, problems
        in the given order). ``mine``: the screen configs this process measures per bucket (None:
        all); ``screened``: outcomes measured elsewhere; ``settle``: this process settles them."""
        tokens = self.options.tokens
        made = []
        for problem in problems:
            screen = self.plans[problem].screen
            chain: list[Bucket] = []
            for t in tokens:
                record = self.done.get((problem.key, t))
                previous = chain[-1] if chain else None
                if record is not None:  # journalled by this or an earlier run: nothing to measure
                    bucket = Bucket(problem, t, screen[t], settle_here=settle, mine=[], previous=previous)
                    bucket.result = BucketResult.from_dict(problem, record)
                else:
                    bucket = Bucket(problem, t, screen[t], settle_here=settle,
                                    mine=None if mine is None else mine.get((problem, t), []), previous=previous,
                                    screened=dict((screened or {}).get((problem.key, t), {})))
                chain.append(bucket)
            if settle:
                self.chains[problem] = chain
            made.append(chain)
        return [chain[i] for i in range(len(tokens)) for chain in made]

    def phase(self, buckets: list[Bucket]) -> None:
        """Compile, screen and settle ``buckets`` on this process's lanes."""
        policy = self.options.policy
        # Compiles go problem by problem, each in its plan's order (the default, then the buckets'
        # rankings round-robin): a problem's config is screened in most of its buckets, so the
        # lanes spread over one problem's buckets get ~5 screens per compile, where compiling
        # bucket by bucket gave them ~1 and left 4 GPUs waiting on the compile pool.
        for problem in dict.fromkeys(b.problem for b in buckets):
            plan = self.plans[problem]
            wanted: set[KernelConfig] = set()
            for bucket in buckets:
                if bucket.problem is not problem or bucket.settled:
                    continue
                # A resumed journal answers what it holds without a kernel: nothing to compile.
                wanted.update(c for c in bucket.todo if not self.engine.answered(problem, bucket.tokens, "screen", c))
                if bucket.settle_here:
                    ok = [c for c, o in bucket.screened.items() if o.ok]
                    wanted.update(sorted(ok, key=lambda c: (bucket.screened[c].median_ms, c))[: policy.finalists])
                    wanted.add(plan.default)
            known = [c for c in dict.fromkeys([plan.default, *plan.compile]) if c in wanted]
            self.engine.precompile(problem, known + sorted(wanted - set(known)))
        scheduler = Scheduler(buckets, measure=self._measure, settle=self._settle, compiled=self.engine.compiled,
                              on_settled=self._settled, stops=(BudgetExhausted,), idle=self.engine.check_budget)
        self.engine.on_compiled = scheduler.wake
        try:
            scheduler.run(self.engine.lanes)
        finally:
            self.engine.on_compiled = None

    def _measure(self, lane: Lane, problem: Problem, tokens: int, cfg: KernelConfig) -> Outcome:
        with self._lock:
            self.screened_on.setdefault((problem.key, tokens), set()).add(lane.name)
        return lane.measure(problem, tokens, cfg, "screen")

    def _settle(self, lane: Lane, bucket: Bucket) -> BucketResult:
        problem, tokens = bucket.problem, bucket.tokens
        self.engine.check_budget()
        for cfg in bucket.screen:  # a screen outcome no rank sent (never, unless a journal was edited)
            if cfg not in bucket.screened:
                bucket.screened[cfg] = lane.measure(problem, tokens, cfg, "screen")
        previous = bucket.previous.result if bucket.previous is not None else None
        plan = self.plans[problem]
        result = settle_bucket(problem, tokens, bucket.screen, bucket.screened, plan.default, lane,
                               self.options.policy, seeds=_seeds([previous] if previous else []))
        self.engine.record({"type": "bucket", "problem": problem.key, "tokens": tokens, "result": result.to_dict()})
        with self._lock:
            self.settled_on[(problem.key, tokens)] = lane.name
        return result

    def _settled(self, bucket: Bucket) -> None:
        chain = self.chains[bucket.problem]
        if all(b.settled for b in chain):
            self.progress.finish(task=bucket.problem)
            self._write(bucket.problem, [b.result for b in chain])

    def results(self) -> dict[Problem, list[BucketResult]]:
        """Per problem this process settles, its settled buckets (a prefix of the buckets: settles chain)."""
        out = {}
        for problem, chain in self.chains.items():
            settled = [b.result for b in chain if b.settled]
            if settled:
                out[problem] = settled
        return out


def _seeds(previous: list[BucketResult]) -> list[KernelConfig]:
    """The previous bucket's winner and runner-up."""
    if not previous or not previous[-1].careful:
        return []
    return [t.config for t in previous[-1].careful[:2]]
