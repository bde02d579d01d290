"""One whole ``moe-tune bench`` report as data: ``BenchReport`` (the environment, the shape and
every section of ``moe_tune.bench.results``), its JSON round trip with the format's version, and
``merge_reports`` for runs of separate sections of one model on one card (``--from`` repeated).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from moe_tune.bench.results import (BlockSection, GROUPED_MM_COMPILED, GemmRow, HostSection, NOT_REQUESTED, STEP_MODES,
                                    StepSection, is_baseline)
from moe_tune.errors import InvalidInputError
from moe_tune.problem import MoeShape

REPORT_KIND = "moe-tune-bench"
REPORT_VERSION = 2
# Version 1 lacks the compiled baselines, host overhead and training steps; every field it has
# kept its meaning, so it reads as a version 2 report with those sections absent.
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class BenchReport:
    """Everything one ``moe-tune bench`` run measured, with the environment it ran in."""

    environment: Mapping[str, Any]
    model: str
    shape: MoeShape
    dtype: str
    tokens: tuple[int, ...]
    settings: Mapping[str, Any]  # timer (warmup/rep ms or wall clock), seed, routing, compile backend
    gemms: tuple[GemmRow, ...]
    block: BlockSection
    host: HostSection = field(default_factory=lambda: HostSection(skipped=NOT_REQUESTED))
    step: StepSection = field(default_factory=lambda: StepSection(skipped=NOT_REQUESTED))

    @property
    def failed_checks(self) -> list[str]:
        """Every moe-tune run that disagreed with its baseline or failed, as ``T=.. what (why)``:
        the figures next to it do not compare. Baseline rows that failed are ``row_errors`` only."""
        failed = [f"T={r.tokens} {r.problem.gemm} {r.problem.pass_} "
                  + ("(torch._grouped_mm under torch.compile)" if name == GROUPED_MM_COMPILED else f"({name} config)")
                  for r in self.gemms for name in r.failed_checks]
        failed += [f"T={r.tokens} experts block {r.implementation} ({name})"
                   for r in self.block.rows for name in r.failed_checks]
        failed += [f"T={r.tokens} {r.mode} training step {r.label} (first-step loss {r.loss:.6g} vs "
                   f"{self.step.reference(r.tokens, r.mode).loss:.6g})" for r in self.step.failed_losses]
        failed += [f"{where} {impl} failed ({error})" for where, impl, error in self.row_errors
                   if not is_baseline(impl)]
        return failed

    @property
    def row_errors(self) -> list[tuple[str, str, str]]:
        """(where, implementation, error) of every measurement that could not run."""
        errors = [(f"T={r.tokens} {r.problem.gemm} {r.problem.pass_}", variant, error)
                  for r in self.gemms for variant, error in r.failures.items()]
        errors += [(f"T={r.tokens} experts block", r.implementation, r.error) for r in self.block.rows if r.error]
        errors += [(f"T={self.host.tokens} host overhead", r.implementation, r.error)
                   for r in self.host.rows if r.error]
        errors += [(f"T={r.tokens} {r.mode} training step", r.label, r.error) for r in self.step.rows if r.error]
        return errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": REPORT_KIND,
            "version": REPORT_VERSION,
            "environment": dict(self.environment),
            "model": self.model,
            "shape": {"E": self.shape.E, "H": self.shape.H, "I": self.shape.I, "topk": self.shape.topk},
            "dtype": self.dtype,
            "tokens": list(self.tokens),
            "settings": dict(self.settings),
            "gemms": [r.to_dict() for r in self.gemms],
            "block": self.block.to_dict(),
            "host": self.host.to_dict(),
            "step": self.step.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BenchReport":
        if not isinstance(data, Mapping) or data.get("kind") != REPORT_KIND:
            raise InvalidInputError("not a moe-tune bench report (no \"kind\": \"moe-tune-bench\")")
        if data.get("version") not in READABLE_VERSIONS:
            raise InvalidInputError(f"bench report version {data.get('version')!r}; "
                                    f"this moe-tune reads {', '.join(map(str, READABLE_VERSIONS))}")
        try:
            return cls(
                environment=dict(data["environment"]),
                model=str(data["model"]),
                shape=MoeShape(**data["shape"]),
                dtype=str(data["dtype"]),
                tokens=tuple(int(t) for t in data["tokens"]),
                settings=dict(data.get("settings", {})),
                gemms=tuple(GemmRow.from_dict(r) for r in data["gemms"]),
                block=BlockSection.from_dict(data["block"]),
                host=HostSection.from_dict(data.get("host", {"skipped": NOT_REQUESTED})),
                step=StepSection.from_dict(data.get("step", {"skipped": NOT_REQUESTED})),
            )
        except (KeyError, TypeError) as exc:
            raise InvalidInputError(f"malformed bench report: {exc!r}") from None


def merge_reports(reports: Sequence[BenchReport]) -> BenchReport:
    """One report from several runs of the same model, dtype and card (sections run separately to
    stay under a time limit): rows are concatenated, a section skipped in one run takes the other
    run's rows. The first report's environment and settings head the result."""
    if not reports:
        raise InvalidInputError("no reports to merge")
    first = reports[0]
    for other in reports[1:]:
        for what, a, b in (("model", first.model, other.model), ("shape", first.shape, other.shape),
                           ("dtype", first.dtype, other.dtype),
                           ("card", first.environment.get("card"), other.environment.get("card"))):
            if a != b:
                raise InvalidInputError(f"cannot merge bench reports of different {what}s: {a} and {b}")

    tokens = tuple(dict.fromkeys(t for r in reports for t in r.tokens))

    def in_order(row) -> tuple:
        # Runs split by token count or by mode read back in one table order (stable within a run).
        mode = getattr(row, "mode", None)
        return (tokens.index(row.tokens) if hasattr(row, "tokens") else 0,
                STEP_MODES.index(mode) if mode in STEP_MODES else 0)

    def section(sections, **extra):
        ran = [s for s in sections if not s.skipped]
        if not ran:
            return sections[0]
        rows = tuple(sorted((r for s in ran for r in s.rows), key=in_order))
        return dataclasses.replace(ran[0], rows=rows, **extra)

    steps = [r.step for r in reports]
    mode_skipped: dict[str, str] = {}
    for s in steps:
        if not s.skipped:
            mode_skipped.update(s.mode_skipped)
    ran_modes = {r.mode for s in steps for r in s.rows}
    mode_skipped = {m: why for m, why in mode_skipped.items() if m not in ran_modes}
    return dataclasses.replace(
        first, tokens=tokens, gemms=tuple(sorted((g for r in reports for g in r.gemms), key=in_order)),
        block=section([r.block for r in reports]),
        host=section([r.host for r in reports]),
        step=section(steps, **({"mode_skipped": mode_skipped} if any(not s.skipped for s in steps)
                                            else {})))
