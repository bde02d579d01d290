"""What a sweep is asked to do: ``SweepOptions`` (the CLI's flags as data), their defaults and
validation (``resolved``), the problems they select, and the command line that reproduces them
(``sweep_command``: the cache file's provenance).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

from moe_tune.errors import InvalidInputError
from moe_tune.models import ModelSpec
from moe_tune.problem import DTYPES, PASSES, Problem
from moe_tune.space import SPACES
from moe_tune.tuning.routing_spec import RoutingSpec
from moe_tune.tuning.search import SearchPolicy, policy_for

GEMMS = ("up", "down")
# Tokens per micro-batch: 1k-32k covers training micro-batches from one 1k sequence to 8×4k;
# larger counts take the 32k bucket (the runtime picks the nearest bucket) and behave alike.
DEFAULT_TOKENS = (1024, 2048, 4096, 8192, 16384, 32768)
INTERPRETER_TOKENS = (32, 64)
# LoRA ranks a sweep may tune: the factors' small dimension N = r or K = r of moe_tune.ops.lora_block.
MAX_LORA_RANK = 1024
# The interpreter runs a 64-token launch of the tiny preset in ~0.1 s; anything much larger
# would make `--interpret` a coffee break.
_INTERPRETER_MAX_ELEMENTS = 1 << 20
_INTERPRETER_MAX_TOKENS = 1024
DEFAULT_CANDIDATE_TIMEOUT_S = 120.0


@dataclass
class SweepOptions:
    model: ModelSpec
    tokens: tuple[int, ...] | None = None  # None: DEFAULT_TOKENS (INTERPRETER_TOKENS with interpret)
    passes: tuple[str, ...] = PASSES
    gemms: tuple[str, ...] = GEMMS
    dtype: str | None = None  # None: bfloat16 (float32 with interpret)
    routing: RoutingSpec = field(default_factory=RoutingSpec)
    space: str | None = None  # None: "default" ("interpret" with interpret)
    exhaustive: bool = False
    budget_s: float | None = None
    cache_dir: str | os.PathLike | None = None
    resume: bool = False
    interpret: bool = False
    seed: int = 0
    candidate_timeout_s: float = DEFAULT_CANDIDATE_TIMEOUT_S
    compile_workers: int | None = None  # None: automatic (none under the interpreter)
    policy: SearchPolicy | None = None  # None: search.policy_for(space, exhaustive)
    gpus: tuple[int, ...] | None = None  # None: every visible GPU (CPU lanes with interpret: one by default)
    shard: tuple[int, int] | None = None  # (i, n): this job runs its deterministic 1/n of the units
    gather_timeout_s: float | None = None  # None: distribute.GATHER_TIMEOUT
    lora_ranks: tuple[int, ...] = ()  # also tune the LoRA block's GEMMs at these ranks
    lora_only: bool = False  # only those: the base six are left as the cache has them

    def resolved(self) -> "SweepOptions":
        """A copy with every default filled in, validated (``InvalidInputError`` otherwise)."""
        tokens = self.tokens or (INTERPRETER_TOKENS if self.interpret else DEFAULT_TOKENS)
        tokens = tuple(sorted(set(tokens)))
        if any(not isinstance(t, int) or isinstance(t, bool) or t <= 0 for t in tokens):
            raise InvalidInputError(f"--tokens must be positive integers, got {list(tokens)}")
        dtype = self.dtype or ("float32" if self.interpret else "bfloat16")
        if dtype not in DTYPES:
            raise InvalidInputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        space = self.space or ("interpret" if self.interpret else "default")
        if space not in SPACES:
            raise InvalidInputError(f"--space must be one of {', '.join(SPACES)}, got {space!r}")
        for name, values, allowed in (("--passes", self.passes, PASSES), ("--gemms", self.gemms, GEMMS)):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise InvalidInputError(f"{name} takes {', '.join(allowed)}; got {', '.join(values) or 'nothing'}")
        lora_ranks = tuple(sorted(set(self.lora_ranks)))
        if any(not isinstance(r, int) or isinstance(r, bool) or not 0 < r <= MAX_LORA_RANK for r in lora_ranks):
            raise InvalidInputError(f"--lora-rank takes ranks from 1 to {MAX_LORA_RANK}, got {list(self.lora_ranks)}")
        if self.shard is not None:
            i, n = self.shard
            if not 0 <= i < n:
                raise InvalidInputError(f"--shard takes i/n with 0 <= i < n, got {i}/{n}")
        if self.gpus is not None and (not self.gpus or len(set(self.gpus)) != len(self.gpus)
                                      or min(self.gpus) < 0):
            raise InvalidInputError(f"--gpus takes distinct GPU indices, got {list(self.gpus)}")
        if self.gather_timeout_s is not None and not self.gather_timeout_s > 0:
            raise InvalidInputError(f"--gather-timeout must be a positive number of seconds, got {self.gather_timeout_s}")
        if self.budget_s is not None and not self.budget_s > 0:
            raise InvalidInputError(f"--budget must be a positive number of seconds, got {self.budget_s}")
        if self.interpret:
            if dtype == "bfloat16":
                raise InvalidInputError("--interpret runs float32 or float16: Triton's interpreter computes "
                                        "bfloat16 wrongly")
            shape = self.model.shape
            biggest = max(shape.E * 2 * shape.I * shape.H, shape.E * shape.H * shape.I)
            if biggest > _INTERPRETER_MAX_ELEMENTS or tokens[-1] > _INTERPRETER_MAX_TOKENS:
                raise InvalidInputError(
                    f"--interpret runs kernels on the CPU, one program at a time: {self.model.name} with "
                    f"{tokens[-1]} tokens would take hours; use --model tiny (and --tokens ≤ {_INTERPRETER_MAX_TOKENS})")
        if self.lora_only and not lora_ranks:
            raise InvalidInputError("--lora-only needs --lora-rank")
        if self.routing.kind == "trace":
            self.routing.load_trace(self.model.shape.E, self.model.shape.topk)  # fail now, not in a worker
        policy = self.policy or policy_for(space, exhaustive=self.exhaustive, interpreter=self.interpret)
        return dataclasses.replace(self, tokens=tokens, dtype=dtype, space=space, policy=policy,
                                   lora_ranks=lora_ranks)


def named_problems(options: SweepOptions) -> dict[str, Problem]:
    """The problems the options select, each by a name for people.

    The layer's six (either layout) come as ``up.forward`` … ``down.dw``. For each LoRA rank r,
    the factors' GEMMs of the LoRA block follow as ``up_a[r16].forward`` and so on; the base GEMMs
    it launches (up forward and dx, down forward and dx) are four of the six. A name belongs to the
    ``--gemms`` entry it starts with; ``lora_only`` drops the six."""
    shape, dtype = options.model.shape, options.dtype
    base = {f"{p.gemm}.{p.pass_}": p for p in shape.problems(dtype)}
    named = dict(base)
    for rank in options.lora_ranks:
        for name, problem in shape.lora_problems(rank, dtype).items():
            if problem not in named.values():
                matrix, pass_ = name.split(".")
                named[f"{matrix}[r{rank}].{pass_}"] = problem
    return {name: p for name, p in named.items() if not (options.lora_only and name in base)
            and p.pass_ in options.passes and re.match(r"[a-z]+", name).group() in options.gemms}


def select_problems(options: SweepOptions) -> list[Problem]:
    return list(named_problems(options).values())


def problem_label(options: SweepOptions, problem: Problem) -> str:
    """``named_problems``' name of ``problem`` (its key if the options do not select it)."""
    return next((name for name, p in named_problems(options).items() if p == problem), problem.key)


def sweep_command(options: SweepOptions) -> str:
    """The resolved options as a ``moe-tune sweep`` command line (the cache's provenance)."""
    import shlex

    spec = options.model
    if "preset" in spec.details:
        parts = ["--model", spec.details["preset"]]
        for flag in ("ep", "tp"):
            if spec.details.get(flag, 1) > 1:
                parts += [f"--{flag}", str(spec.details[flag])]
    else:  # a config.json path means nothing on another machine: record the per-rank shape
        s = spec.shape
        parts = ["--shape", f"E={s.E},H={s.H},I={s.I},topk={s.topk}"]
    parts += ["--tokens", ",".join(map(str, options.tokens)), "--passes", ",".join(options.passes),
              "--gemms", ",".join(options.gemms), "--dtype", options.dtype, "--routing", str(options.routing),
              "--space", options.space, "--seed", str(options.seed)]
    if options.lora_ranks:
        parts += ["--lora-rank", ",".join(map(str, options.lora_ranks))]
        if options.lora_only:
            parts.append("--lora-only")
    for flag, on in (("--exhaustive", options.exhaustive), ("--interpret", options.interpret)):
        if on:
            parts.append(flag)
    return shlex.join(["moe-tune", "sweep", *parts])
