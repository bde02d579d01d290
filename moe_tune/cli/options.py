"""Options shared by several commands, defined once with ``Annotated``, and the model filter.

Commands declare ``cache_dir: CacheDirOption = None`` and so on; the help text and flag names
live here so ``show``, ``export``, ``install`` and friends cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from moe_tune.problem import Problem

CacheDirOption = Annotated[
    Optional[Path],
    typer.Option("--cache-dir", help="Cache directory (default: $MOE_TUNE_CACHE_DIR, else the user cache dir).",
                 show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of tables.")]
ModelOption = Annotated[
    Optional[str],
    typer.Option("--model", help="Only this model preset's problems (its six and its LoRA GEMMs; any dtype).",
                 show_default=False),
]
OutputOption = Annotated[Path, typer.Option("-o", "--output", help="File to write (replaced atomically).")]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Report what would change; write nothing.")]


def model_filter(name: str | None) -> Callable[[Problem], bool]:
    """Accepts the problems of model ``name``'s MoE layer (its six GEMM shapes and layouts, in any
    dtype, with or without the fused routing weight, and its LoRA block's GEMMs at any rank);
    everything when ``name`` is None. An unknown model raises ``InvalidInputError`` (from
    ``moe_tune.models``)."""
    if name is None:
        return lambda problem: True
    from moe_tune.models import load_preset

    shape = load_preset(name)
    # The forward down GEMM runs unweighted when the routing weights need a gradient (the
    # autograd path applies them outside the kernel), so `weighted` must not split a model.
    # LoRA block GEMMs (`sweep --lora-rank`) belong to the model at any rank.
    wanted = {_layout(p) for p in (*shape.problems(), *shape.lora_problems(1).values())}
    return lambda problem: _layout(problem) in wanted or shape.lora_rank_of(problem) is not None


def _layout(problem: Problem) -> tuple:
    return (problem.pass_, problem.E, problem.N, problem.K, problem.topk, problem.gather, problem.scatter,
            problem.weight_layout)
