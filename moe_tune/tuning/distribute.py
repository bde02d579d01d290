"""Spreading a sweep over GPUs, torchrun ranks and scheduler shards.

A bucket's search (``search.search_bucket``) has two parts: the screen, a short timing of each of
its ~32 configs, independent of everything; and the settle, the careful re-timing of the fastest
few plus the previous bucket's winner and runner-up (seeds). So a problem's settles form a chain,
and its screens can run anywhere. Each layout keeps what a one-GPU sweep measures and seeds, so
its winners are the one-GPU sweep's (bit for bit with a deterministic timer, up to timing noise
on GPUs):

* the GPUs of one process (``--gpus``, the default): ``schedule.Scheduler`` hands out single
  screen measurements and whole settles, whichever lane is free;
* torchrun ranks, which talk only where they meet: two phases. Phase 1 splits the screens by
  (problem, slice of ``SCREEN_SLICE`` configs of its compile list): each config is compiled on one
  rank and screened there in every bucket that lists it. The ranks exchange every screen outcome
  (``Gather.exchange``, ``all_gather_object``). Phase 2 splits the settle chains by problem. At
  the end rank 0 gathers the settled buckets (``Gather.gather``) and writes the one cache file;
* shards (``--shard i/n``), which never talk: whole problems, screens and chain together.

Data flow:

1. ``bucket_costs`` — per bucket, the estimated milliseconds of one screen measurement and of its
   settle: the planned measurements times the launches each makes (``candidate.LaunchPlan`` at
   ``search.estimate_ms``'s time of the heuristic default) plus a fixed per-measurement overhead.
   Only ratios matter.
2. ``assign`` — longest processing time first: units by cost, largest first (ties by key, so every
   rank computes the same split), each to the least loaded of ``count`` bins. Shards and ranks
   take bin ``i`` / ``RANK``.
3. ``chain_bound`` (one process's lanes) and the sweep's two-phase figure (torchrun) state the best
   scaling the split allows by the cost model: the report's ``balance_bound``.
4. ``Launch.from_env`` — a torchrun rank (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
   ``LOCAL_WORLD_SIZE``): each rank times on its ``LOCAL_RANK`` GPU. ``Gather`` joins the gloo
   process group at the start (so a bad rendezvous fails before any work). A rank that dies
   leaves its measurements in its own journal (``…-rank{r}of{n}.jsonl``): the others stop at the
   next meeting (rank 0 writes what it settled and names the missing ranks), and ``--resume``
   (any layout: all journals of the sweep are read back) finishes only what is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping, Sequence

from moe_tune.device import DeviceInfo
from moe_tune.errors import InvalidInputError

# Per measurement, beyond the launches: a pipe round trip, the gate launch, the CUDA graph capture
# and the L2-flush writes (~30 ms on an H200 for a screen of a small kernel).
MEASURE_OVERHEAD_MS = 30.0
# How long rank 0 waits for the slowest rank at the final gather: a rank that hangs for this long
# is reported missing (its journal keeps what it finished). The sweeps of the largest presets take
# under an hour on one GPU.
GATHER_TIMEOUT = timedelta(hours=6)
# Screen configs per torchrun work unit: 8 of a bucket's 32 are ~0.5 s of GPU time, small enough
# to balance 16 ranks over one model's 36 buckets.
SCREEN_SLICE = 8


# ---------------------------------------------------------------------------------------------
# Parsing --gpus and --shard
# ---------------------------------------------------------------------------------------------


def parse_gpus(text: str, available: int) -> tuple[int, ...]:
    """``--gpus 0,2`` → (0, 2); ``all`` → every one of ``available``. One-line errors."""
    text = text.strip()
    if text == "all":
        if available < 1:
            raise InvalidInputError("--gpus all: no GPU is visible")
        return tuple(range(available))
    picked = []
    for part in text.replace(",", " ").split():  # syntax first, so a typo is named before a count
        try:
            picked.append(int(part))
        except ValueError:
            raise InvalidInputError(f"--gpus takes GPU indices like 0,2 (or all); cannot read {part!r}") from None
    for i, index in enumerate(picked):
        if index < 0 or index >= available:
            seen = f"GPUs 0..{available - 1} are visible" if available else "no GPU is visible"
            raise InvalidInputError(f"--gpus {index}: no such GPU ({seen})")
        if index in picked[:i]:
            raise InvalidInputError(f"--gpus lists GPU {index} twice")
    if not picked:
        raise InvalidInputError("--gpus needs at least one GPU index")
    return tuple(picked)


def parse_shard(text: str) -> tuple[int, int]:
    """``--shard i/n`` → (i, n) with 0 ≤ i < n."""
    index, slash, count = text.strip().partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = -1
    if not slash or n < 1 or not 0 <= i < n:
        raise InvalidInputError(f"--shard takes i/n with 0 <= i < n, like 0/4; got {text!r}")
    return i, n


def physical_gpu(index: int, environ: Mapping[str, str] | None = None) -> str:
    """What ``CUDA_VISIBLE_DEVICES`` must say for a worker to see this process's GPU ``index``
    (as its only GPU): the index through this process's own ``CUDA_VISIBLE_DEVICES``, if set."""
    visible = (environ if environ is not None else os.environ).get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if index < len(ids):
            return ids[index]
    return str(index)


# ---------------------------------------------------------------------------------------------
# Cost and split
# ---------------------------------------------------------------------------------------------


def bucket_costs(plan, policy, device: DeviceInfo) -> dict[int, tuple[float, float]]:
    """Per bucket of ``plan``'s problem, estimated milliseconds of GPU work: (one screen
    measurement, the whole settle)."""
    from moe_tune.tuning.search import estimate_ms, measurements_planned
    from moe_tune.tuning.candidate import plan_for

    costs = {}
    for tokens, count in measurements_planned(plan, policy).items():
        launch_ms = estimate_ms(plan.problem, plan.default, tokens, device)
        screen = MEASURE_OVERHEAD_MS + plan_for("screen", False).launches(launch_ms) * launch_ms
        careful = MEASURE_OVERHEAD_MS + plan_for("careful", False).launches(launch_ms) * launch_ms
        costs[tokens] = (screen, (count - len(plan.screen[tokens])) * careful)
    return costs


def chain_bound(costs: Mapping[Any, tuple[float, float]], lanes: int) -> float:
    """Best scaling efficiency of a dynamically scheduled sweep on ``lanes`` GPUs (by estimated
    cost): screens split freely, but each problem's settles run one after another, so the sweep
    takes at least its longest chain. ``costs``: per problem, (all its work, its settle chain)."""
    if not costs or lanes < 1:
        return 1.0
    total = sum(work for work, _ in costs.values())
    longest = max(chain for _, chain in costs.values())
    return min(1.0, total / (lanes * longest)) if longest > 0 else 1.0


def screen_slices(screen: Sequence, size: int = SCREEN_SLICE) -> list[list]:
    """A bucket's screen list cut into slices of ``size`` configs (the torchrun ranks' unit)."""
    return [list(screen[i:i + size]) for i in range(0, len(screen), size)]


def largest_first(costs: Mapping[Any, float]) -> list:
    """Units by cost, largest first; ties by key so every process orders them alike."""
    return sorted(costs, key=lambda u: (-costs[u], _key(u)))


def assign(costs: Mapping[Any, float], count: int) -> list[list]:
    """Longest-processing-time split of the units into ``count`` bins (deterministic)."""
    bins: list[list] = [[] for _ in range(count)]
    load = [0.0] * count
    for unit in largest_first(costs):
        target = min(range(count), key=lambda b: (load[b], b))
        bins[target].append(unit)
        load[target] += costs[unit]
    return bins


def _key(unit) -> str:
    return getattr(unit, "key", str(unit))


# ---------------------------------------------------------------------------------------------
# torchrun
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Launch | None":
        """The torchrun variables, or None outside torchrun (or a world of one)."""
        env = environ if environ is not None else os.environ
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return None
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local_rank = int(env.get("LOCAL_RANK", rank))
            local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        except ValueError:
            raise InvalidInputError("RANK, WORLD_SIZE, LOCAL_RANK must be integers (set by torchrun)") from None
        if world <= 1:
            return None
        if not 0 <= rank < world or not 0 <= local_rank < local_world:
            raise InvalidInputError(f"inconsistent torchrun variables: RANK={rank} WORLD_SIZE={world} "
                                    f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world}")
        return cls(rank, world, local_rank, local_world)


class Gather:
    """The gloo process group of a torchrun sweep: joined at the start, used once at the end.

    gloo rather than NCCL: the payload is a few hundred KiB of Python objects, and it must work
    before (and without) any CUDA context in the sweep's own process."""

    def __init__(self, launch: Launch, timeout: timedelta = GATHER_TIMEOUT):
        import torch.distributed as dist

        self.launch = launch
        self._owned = not dist.is_initialized()
        if self._owned:
            dist.init_process_group("gloo", rank=launch.rank, world_size=launch.world_size, timeout=timeout)

    def gather(self, payload: dict[str, Any]) -> tuple[list[dict[str, Any]], list[int]]:
        """Every rank's payload on rank 0 (others get ``[]``), and the ranks that did not answer.
        A dead peer makes gloo raise on rank 0; then only rank 0's own payload is returned. On
        another rank, ``[0]`` missing means rank 0 never took this rank's results."""
        import torch.distributed as dist

        received: list | None = [None] * self.launch.world_size if self.launch.rank == 0 else None
        try:
            dist.gather_object(payload, received, dst=0)
        except Exception:  # gloo raises RuntimeError/DistBackendError on a closed or silent peer
            if self.launch.rank != 0:
                return [], [0]
            return [payload], [r for r in range(1, self.launch.world_size)]
        if self.launch.rank != 0:
            return [], []
        missing = [r for r, p in enumerate(received) if p is None]
        return [p for p in received if p is not None], missing

    def exchange(self, payload: Any) -> list[Any] | None:
        """Every rank's payload on every rank (the screen outcomes, between the torchrun sweep's
        two phases), or None when a rank is gone (gloo raises on a closed or silent peer)."""
        import torch.distributed as dist

        received: list = [None] * self.launch.world_size
        try:
            dist.all_gather_object(received, payload)
        except Exception:
            return None
        return received

    def close(self) -> None:
        import torch.distributed as dist

        if self._owned and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a broken group (a dead peer) may refuse a clean shutdown
                pass


def split_settings(kind: str, index: int = 0, count: int = 1) -> dict[str, Any]:
    return {"kind": kind, "index": index, "count": count}

