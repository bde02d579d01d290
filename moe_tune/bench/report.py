"""Formatting of a ``BenchReport``: rich tables, Markdown, JSON and a TFLOP/s plot. Pure formatting
(no torch; matplotlib only inside ``write_plot``), so every output is testable on synthetic rows.

Every output leads with the environment line (card, driver, torch, Triton, CUDA, transformers,
date) and the timing method; in Markdown each of the block, host and training-step sections
repeats the environment line, so a table pasted on its own still names its card and date.

Tables (text and Markdown alike):

* GEMM throughput — per (T, GEMM, pass): TFLOP/s of tuned / default / ``torch._grouped_mm`` eager
  and compiled / dense, tuned's speed-up over the better ``grouped_mm`` and over the default, and
  its fraction of dense;
* GEMM times — median ms with the p20–p80 spread of every variant;
* GEMM configs — the tuned config and where it came from, the default config, the sanity check;
* experts block against the strongest baseline — per T, fwd+bwd ms of every implementation and
  the best moe-tune over the best grouped_mm;
* experts block — fwd and fwd+bwd ms with spread, peak memory, speed-ups over the best
  ``grouped_mm`` row, the sanity check, errors and notes;
* host overhead — host and wall ms per block fwd+bwd, GPU launches;
* training steps — ms per step, tokens/s, host ms, peak memory, first-step loss, speed-up over the
  best grouped_mm run of the same mode;

each section ``skipped: <why>`` when it did not run.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from moe_tune.bench.env import header
from moe_tune.bench.results import (ALL_GEMM_VARIANTS, BLOCK_BASELINE, BLOCK_IMPLEMENTATIONS, GROUPED_MM_COMPILED,
                                    BlockRow, GemmRow, Timing, is_baseline)
from moe_tune.bench.run_report import BenchReport

VARIANT_LABELS = {"tuned": "tuned", "default": "default", "grouped_mm": "grouped_mm",
                  GROUPED_MM_COMPILED: "grouped_mm+compile", "dense": "dense"}
BLOCK_LABELS = {BLOCK_BASELINE: "transformers grouped_mm", "grouped_mm+compile": "transformers grouped_mm + compile",
                "moe_tune": "moe-tune", "moe_tune+compile": "moe-tune + compile",
                "moe_tune+cuda_graphs": "moe-tune + CUDA graphs (MOE_TUNE_CUDA_GRAPHS=1)"}
MODE_LABELS = {"full": "full fine-tuning", "frozen": "experts frozen", "lora": "LoRA on experts"}


# -------------------------------------------------------------------------------------------------
# Cells
# -------------------------------------------------------------------------------------------------


def fmt_tflops(value: float) -> str:
    if value >= 10:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.1f}"
    return f"{value:.2g}"


def _ms(value: float) -> str:
    # Four significant digits, trailing zeros kept so a column reads evenly (21.00, not 21).
    return f"{value:#.4g}".rstrip(".")


def fmt_ms(timing: Timing | None) -> str:
    if timing is None:
        return "-"
    return f"{_ms(timing.ms)} [{_ms(timing.p20)}, {_ms(timing.p80)}]"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fmt_mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def fmt_error(row: GemmRow | BlockRow) -> str:
    if not row.errors:
        return "-"
    worst = max(row.errors.values())
    text = f"{worst:.1e}"
    return f"FAILED {text}" if row.failed_checks else text


def _remark(error: str | None, note: str | None) -> str:
    """The last cell of a row: its error (the row has no figures) and/or a note."""
    parts = ([f"FAILED: {error}"] if error else []) + ([note] if note else [])
    return "; ".join(parts) or "-"


def title(report: BenchReport) -> str:
    s = report.shape
    return f"moe-tune bench: {report.model} (E={s.E}, H={s.H}, I={s.I}, k={s.topk}), {report.dtype}"


def method(report: BenchReport) -> str:
    st = report.settings
    if st.get("timer") == "triton.testing.do_bench":
        least = f" and at least {st['min_samples']} samples" if st.get("min_samples") else ""
        how = (f"triton.testing.do_bench samples (warmup {st.get('warmup_ms')} ms, rep {st.get('rep_ms')} ms{least}, "
               "L2 flushed before each; compilation and warm-up never timed)")
    else:
        how = str(st.get("timer", "unknown timer"))
    text = (f"{how}; median ms [p20, p80]; TFLOP/s = 2·T·k·N·K / median; routing: "
            f"{st.get('routing', '?')}, seed {st.get('seed', '?')}")
    compiled = st.get("compile")
    if compiled:
        text += f"; torch.compile backend {compiled.get('backend', '?')}, compiled fresh per row"
        if str(compiled.get("gemm", "")).startswith("skipped"):
            text += f"; compiled grouped_mm GEMM column {compiled['gemm']}"
    return text


# -------------------------------------------------------------------------------------------------
# GEMM tables
# -------------------------------------------------------------------------------------------------


def gemm_variants(report: BenchReport) -> tuple[str, ...]:
    """The variants any GEMM row timed or tried, in table order."""
    present = {v for r in report.gemms for v in (*r.timings, *r.failures)}
    return tuple(v for v in ALL_GEMM_VARIANTS if v in present)


def _compiled_baseline(report: BenchReport) -> bool:
    return GROUPED_MM_COMPILED in gemm_variants(report)


def throughput_columns(report: BenchReport) -> tuple[str, ...]:
    best = "tuned / best grouped_mm" if _compiled_baseline(report) else "tuned / grouped_mm"
    return ("T", "GEMM", "pass", *(f"{VARIANT_LABELS[v]} TFLOP/s" for v in gemm_variants(report)), best,
            "tuned / default", "tuned / dense")


def times_columns(report: BenchReport) -> tuple[str, ...]:
    return ("T", "GEMM", "pass", *(f"{VARIANT_LABELS[v]} ms" for v in gemm_variants(report)))


CONFIG_COLUMNS = ("T", "GEMM", "pass", "tuned config", "tuned from", "default config", "max rel. diff")


def _gemm_cell(row: GemmRow, variant: str, cell) -> str:
    if variant in row.timings:
        return cell(row.timings[variant])
    return "failed" if variant in row.failures else "-"


def throughput_rows(report: BenchReport) -> list[list[str]]:
    variants = gemm_variants(report)
    return [[str(r.tokens), r.problem.gemm, r.problem.pass_,
             *(_gemm_cell(r, v, lambda t: fmt_tflops(t.tflops(r.flops))) for v in variants),
             fmt_ratio(r.speedup("tuned", r.best_baseline)), fmt_ratio(r.speedup("tuned", "default")),
             f"{r.speedup('tuned', 'dense'):.0%}"]
            for r in report.gemms]


def times_rows(report: BenchReport) -> list[list[str]]:
    variants = gemm_variants(report)
    return [[str(r.tokens), r.problem.gemm, r.problem.pass_, *(_gemm_cell(r, v, fmt_ms) for v in variants)]
            for r in report.gemms]


def config_rows(report: BenchReport) -> list[list[str]]:
    rows = []
    for r in report.gemms:
        tuned = "= default" if r.tuned_is_default else r.tuned_config.short()
        rows.append([str(r.tokens), r.problem.gemm, r.problem.pass_, tuned, r.tuned_from.describe(),
                     r.default_config.short(), fmt_error(r)])
    return rows


def cache_sources(report: BenchReport) -> list[str]:
    """The cache files the tuned configs came from, each once."""
    return sorted({r.tuned_from.path for r in report.gemms if r.tuned_from.path})


def gemm_failures(report: BenchReport) -> list[str]:
    return [f"T={r.tokens} {r.problem.gemm} {r.problem.pass_}: {VARIANT_LABELS.get(v, v)} failed: {why}"
            for r in report.gemms for v, why in r.failures.items()]


# -------------------------------------------------------------------------------------------------
# Experts block
# -------------------------------------------------------------------------------------------------

BLOCK_COLUMNS = ("T", "implementation", "fwd ms", "fwd+bwd ms", "peak MiB (fwd+bwd)", "fwd vs best grouped_mm",
                 "fwd+bwd vs best grouped_mm", "max rel. diff", "note")


def block_rows(report: BenchReport) -> list[list[str]]:
    block = report.block
    rows = []
    for r in block.rows:
        reference = r.implementation == BLOCK_BASELINE
        rows.append([str(r.tokens), BLOCK_LABELS.get(r.implementation, r.implementation), fmt_ms(r.fwd),
                     fmt_ms(r.fwd_bwd), fmt_mib(r.peak_mib), fmt_ratio(block.speedup(r, "fwd")),
                     fmt_ratio(block.speedup(r, "fwd_bwd")),
                     "(reference)" if reference and not r.error else fmt_error(r), _remark(r.error, r.note)])
    return rows


def block_summary_columns(report: BenchReport) -> tuple[str, ...]:
    present = [i for i in BLOCK_IMPLEMENTATIONS if any(r.implementation == i for r in report.block.rows)]
    return ("T", *(BLOCK_LABELS[i] for i in present), "best moe-tune vs best grouped_mm")


def block_summary_rows(report: BenchReport) -> list[list[str]]:
    """Per T: fwd+bwd ms of each implementation (the strongest-baseline table) and the best
    moe-tune row over the best grouped_mm row."""
    block = report.block
    present = [i for i in BLOCK_IMPLEMENTATIONS if any(r.implementation == i for r in block.rows)]
    rows = []
    for tokens in dict.fromkeys(r.tokens for r in block.rows):
        by_impl = {r.implementation: r for r in block.rows if r.tokens == tokens}
        cells = []
        for impl in present:
            row = by_impl.get(impl)
            cells.append("-" if row is None else ("failed" if row.fwd_bwd is None else _ms(row.fwd_bwd.ms)))
        ours = [r for r in by_impl.values() if not is_baseline(r.implementation) and r.fwd_bwd is not None]
        best = min(ours, key=lambda r: r.fwd_bwd.ms, default=None)
        rows.append([str(tokens), *cells, "-" if best is None else
                     f"{fmt_ratio(block.speedup(best, 'fwd_bwd'))} ({BLOCK_LABELS[best.implementation]})"])
    return rows


# -------------------------------------------------------------------------------------------------
# Host overhead
# -------------------------------------------------------------------------------------------------

HOST_COLUMNS = ("implementation", "host ms per fwd+bwd", "wall ms per fwd+bwd", "GPU kernels", "memcpy/memset",
                "note")


def host_rows(report: BenchReport) -> list[list[str]]:
    return [[BLOCK_LABELS.get(r.implementation, r.implementation), fmt_ms(r.host), fmt_ms(r.wall),
             "-" if r.kernels is None else str(r.kernels), "-" if r.memops is None else str(r.memops),
             _remark(r.error, r.note)]
            for r in report.host.rows]


def host_caption(report: BenchReport) -> str:
    h = report.host
    calls = f"{h.iterations} call" + ("s" if h.iterations != 1 else "")
    loops = f"{h.repeats} loop" + ("s" if h.repeats != 1 else "")
    return (f"Experts block forward+backward at T={h.tokens} tokens: host ms = time.perf_counter from the first "
            "call of a loop that never synchronises to the return of its last launch, per call, each loop short "
            "enough (at most 768 launches) that CUDA's launch queue never fills, so no call waits on the GPU: the "
            f"host's work alone (median of {loops}); wall ms = {calls} until the GPU finished them, per call (the "
            "block's real rate at this size: near host ms when host-bound, above it when the GPU is the bound). "
            "GPU kernels and memcpy/memset per call from torch.profiler's CUDA events.")


# -------------------------------------------------------------------------------------------------
# Training steps
# -------------------------------------------------------------------------------------------------

STEP_COLUMNS = ("T", "mode", "implementation", "step ms", "tokens/s", "host ms", "peak MiB", "first-step loss",
                "vs best grouped_mm", "eager vs eager grouped_mm", "graphs", "note")


def _loss_cell(report: BenchReport, row) -> str:
    if row.loss is None:
        return "-"
    diff = report.step.loss_difference(row)
    text = f"{row.loss:.5f}"
    if row in report.step.failed_losses:
        return f"FAILED {text} (rel. diff {diff:.1e})"
    return text


def step_rows(report: BenchReport) -> list[list[str]]:
    section = report.step
    rows = []
    for r in section.rows:
        rows.append([str(r.tokens), MODE_LABELS.get(r.mode, r.mode), BLOCK_LABELS.get(r.label, r.label),
                     fmt_ms(r.step), "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}", fmt_ms(r.host),
                     fmt_mib(r.peak_mib), _loss_cell(report, r), fmt_ratio(section.speedup(r)),
                     fmt_ratio(section.eager_speedup(r)), "-" if r.graphs is None else str(r.graphs),
                     _remark(r.error, r.note)])
    return rows


def step_caption(report: BenchReport) -> str:
    m = report.step.model
    share = m.get("flop_share", {})
    parts = ", ".join(f"{name.replace('_', ' ')} {share[name]:.0%}" for name in ("experts", "attention", "lm_head",
                                                                                 "router") if name in share)
    return (f"A {m.get('layers')}-layer {m.get('config', '?').removesuffix('Config')} causal LM with the preset's "
            f"expert shapes and random weights: hidden {m.get('hidden')}, {m.get('heads')} attention heads "
            f"({m.get('kv_heads')} key/value, head dim {m.get('head_dim')}, {m.get('attention')}) as the family's "
            f"config defaults; vocabulary {m.get('vocab')} (kept moderate so the LM head does not dominate); "
            f"T tokens per step as sequences of {m.get('seq_len')} (one sequence when T is smaller). Each row "
            f"trains a copy of the same weights on the same batch: forward, backward and "
            f"{m.get('optimizer', 'AdamW')}; median of the timed steps after warm-up, the device synchronised "
            f"after each (step ms), host ms = until the step's last launch returned. The implementations of a "
            f"(T, mode, eager or compiled) train side by side, their timed steps alternating, so that a slow "
            f"phase of the host weighs on all (where the copies do not fit the device together, each is timed "
            f"alone and the note says so); moe-tune + CUDA graphs: eager moe-tune with MOE_TUNE_CUDA_GRAPHS=1, "
            f"the experts block replayed as CUDA graphs where it applies (see the README). Modes: full "
            f"fine-tuning; experts frozen (no gradient for the expert weights); LoRA r={m.get('lora_rank')} on "
            f"both expert weight stacks (PEFT target_parameters). Peak MiB: the highest allocation of one step "
            f"timed in a window of its own, above what was allocated before the copy (weights, gradients, "
            f"optimizer state, activations). "
            f"First-step losses of a (T, mode) must agree within {report.step.loss_tolerance} relative. "
            f"Forward matmul FLOPs: {parts}. Eager rows also against eager grouped_mm (what an eager loop gains "
            f"by switching the experts alone). graphs: graphs torch.compile made (1: no graph break).")


def step_mode_notes(report: BenchReport) -> list[str]:
    return [f"{MODE_LABELS.get(mode, mode)}: skipped: {why}" for mode, why in report.step.mode_skipped.items()]


# -------------------------------------------------------------------------------------------------
# Text (rich)
# -------------------------------------------------------------------------------------------------


_TEXT_COLUMNS = {"GEMM", "pass", "implementation", "tuned config", "tuned from", "default config", "mode", "note"}


def _rich_table(caption: str, columns: Iterable[str], rows: list[list[str]]):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(caption), title_justify="left")
    for column in columns:
        table.add_column(column, justify="left" if column in _TEXT_COLUMNS else "right")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    return table


def print_report(report: BenchReport, console=None) -> None:
    """The report as rich tables on ``console`` (default: stdout)."""
    from rich.console import Console
    from rich.markup import escape

    if console is None:
        console = Console()
        if not console.is_terminal:
            # Piped or redirected: 80 columns would fold every row; a file has no width to respect.
            console = Console(width=200)

    def line(text: str) -> None:
        console.print(escape(text), highlight=False)

    console.print(escape(title(report)), style="bold", highlight=False)
    line(header(report.environment))
    line(method(report))
    if report.gemms:
        console.print(_rich_table("grouped GEMMs: throughput", throughput_columns(report), throughput_rows(report)))
        console.print(_rich_table("grouped GEMMs: times, ms (median [p20, p80])", times_columns(report),
                                  times_rows(report)))
        console.print(_rich_table("grouped GEMMs: configs (max rel. diff: moe-tune output vs torch._grouped_mm)",
                                  CONFIG_COLUMNS, config_rows(report)))
        for path in cache_sources(report):
            line(f"tuned configs read from {path}")
        for text in gemm_failures(report):
            line(text)
    if report.block.skipped:
        line(f"experts block: skipped: {report.block.skipped}")
    else:
        console.print(_rich_table("experts block fwd+bwd against the strongest baseline, ms",
                                  block_summary_columns(report), block_summary_rows(report)))
        console.print(_rich_table("experts block (up GEMM, SwiGLU, down GEMM, routing-weight combine), ms "
                                  "(median [p20, p80]); speed-ups over the best transformers grouped_mm row",
                                  BLOCK_COLUMNS, block_rows(report)))
    if report.host.skipped:
        line(f"host overhead: skipped: {report.host.skipped}")
    else:
        console.print(_rich_table(f"host overhead per experts-block fwd+bwd, T={report.host.tokens}", HOST_COLUMNS,
                                  host_rows(report)))
    if report.step.skipped:
        line(f"training steps: skipped: {report.step.skipped}")
    else:
        console.print(_rich_table("training steps (forward, backward, AdamW), ms (median [p20, p80])", STEP_COLUMNS,
                                  step_rows(report)))
        line(step_caption(report))
        for text in step_mode_notes(report):
            line(text)


# -------------------------------------------------------------------------------------------------
# Markdown and JSON
# -------------------------------------------------------------------------------------------------


def _md_table(columns: Iterable[str], rows: list[list[str]]) -> list[str]:
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def markdown(report: BenchReport) -> str:
    env = report.environment
    lines = [f"## {title(report)}", ""]
    card = env.get("card", "unknown card")
    rest = header(env).split(" | ", 1)[1] if " | " in header(env) else ""
    lines += [f"**{card}** | {rest}", "", method(report) + ".", ""]
    # Repeated under each section's heading: a table copied into BENCHMARKS.md keeps its card and date.
    env_line = f"*{header(env)}*"
    if report.gemms:
        compiled = (" grouped_mm+compile: the same under `torch.compile(fullgraph=True)` (Inductor fuses the "
                    "permutes); speed-ups are against the better of the two." if _compiled_baseline(report) else "")
        lines += ["### Grouped GEMMs: throughput", "", env_line, "",
                  "tuned: moe-tune with the config the runtime loader resolves (cache, else the heuristic default); "
                  "default: moe-tune with the heuristic default; grouped_mm: `torch._grouped_mm` with the "
                  "gathers/scatters/weighting the layout needs, done as a user would;" + compiled +
                  " dense: one cuBLAS matmul of the same FLOPs (the practical ceiling).", ""]
        lines += _md_table(throughput_columns(report), throughput_rows(report)) + [""]
        lines += ["### Grouped GEMMs: times, ms (median [p20, p80])", ""]
        lines += _md_table(times_columns(report), times_rows(report)) + [""]
        lines += ["### Grouped GEMMs: configs", "",
                  "max rel. diff: ‖moe-tune − grouped_mm‖ / ‖grouped_mm‖ over the output (a sanity check).",
                  ""]
        lines += _md_table(CONFIG_COLUMNS, config_rows(report)) + [""]
        for path in cache_sources(report):
            lines += [f"Tuned configs read from `{path}`.", ""]
        for text in gemm_failures(report):
            lines += [f"- {text}"]
        if gemm_failures(report):
            lines += [""]
    lines += ["### Experts block against the strongest baseline", "", env_line, ""]
    if report.block.skipped:
        lines += [f"skipped: {report.block.skipped}", ""]
    else:
        lines += ["Up GEMM, SwiGLU, down GEMM and routing-weight combine, as training runs them: forward with "
                  "autograd recording, and forward+backward into hidden states, routing weights and both weight "
                  "stacks. Same weights and routing for every row; transformers' `grouped_mm` experts "
                  "implementation eager and under `torch.compile` (the experts module, `fullgraph=True` unless "
                  "the note says otherwise), moe-tune likewise. Speed-ups are against the best grouped_mm row. "
                  "Forward+backward, ms:", ""]
        lines += _md_table(block_summary_columns(report), block_summary_rows(report)) + [""]
        lines += ["All figures, median [p20, p80]; max rel. diff: output and gradients against eager grouped_mm:",
                  ""]
        lines += _md_table(BLOCK_COLUMNS, block_rows(report)) + [""]
    lines += ["### Host overhead", "", env_line, ""]
    if report.host.skipped:
        lines += [f"skipped: {report.host.skipped}", ""]
    else:
        lines += [host_caption(report), ""]
        lines += _md_table(HOST_COLUMNS, host_rows(report)) + [""]
    lines += ["### Training steps", "", env_line, ""]
    if report.step.skipped:
        lines += [f"skipped: {report.step.skipped}", ""]
    else:
        lines += [step_caption(report), ""]
        lines += _md_table(STEP_COLUMNS, step_rows(report)) + [""]
        notes = step_mode_notes(report)
        lines += [f"- {text}" for text in notes] + ([""] if notes else [])
    return "\n".join(lines)


def to_json(report: BenchReport) -> str:
    return json.dumps(report.to_dict(), indent=2)


def from_json(text: str) -> BenchReport:
    return BenchReport.from_dict(json.loads(text))


# -------------------------------------------------------------------------------------------------
# Plot
# -------------------------------------------------------------------------------------------------

_LINE_STYLES = {
    "tuned": dict(marker="o", linestyle="-", linewidth=2),
    "default": dict(marker="s", linestyle="--"),
    "grouped_mm": dict(marker="^", linestyle="-."),
    GROUPED_MM_COMPILED: dict(marker="v", linestyle="-."),
    "dense": dict(marker="", linestyle=":", color="gray"),
}


def plot_figure(report: BenchReport):
    """A matplotlib ``Figure``: TFLOP/s against token count, one panel per problem."""
    from matplotlib.figure import Figure

    problems: list[Any] = []
    for r in report.gemms:
        if r.problem not in problems:
            problems.append(r.problem)
    cols = 3
    nrows = max(1, -(-len(problems) // cols))
    fig = Figure(figsize=(5 * cols, 3.8 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, problem in zip(axes.flat, problems):
        rows = sorted((r for r in report.gemms if r.problem == problem), key=lambda r: r.tokens)
        tokens = [r.tokens for r in rows]
        for variant in ALL_GEMM_VARIANTS:
            points = [(r.tokens, r.tflops(variant)) for r in rows if variant in r.timings]
            if points:
                ax.plot(*zip(*points), label=VARIANT_LABELS[variant], **_LINE_STYLES[variant])
        ax.set_title(f"{problem.gemm} {problem.pass_}  (N={problem.N}, K={problem.K})", fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xticks(tokens, [str(t) for t in tokens])
        ax.set_xlabel("tokens")
        ax.set_ylabel("TFLOP/s")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(problems):]:
        ax.set_visible(False)
    if problems:
        axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{title(report)}\n{header(report.environment)}", fontsize=10)
    return fig


def write_plot(report: BenchReport, path: str | os.PathLike) -> None:
    """Write the plot as PNG to ``path`` (replaced atomically)."""
    fig = plot_figure(report)
    with _atomic(path, binary=True) as f:
        fig.savefig(f, format="png", dpi=110)


def write_text(text: str, path: str | os.PathLike) -> None:
    with _atomic(path, binary=False) as f:
        f.write(text)


class _atomic:
    """Write through a temporary file in the same folder, renamed over ``path`` on success."""

    def __init__(self, path: str | os.PathLike, binary: bool):
        self.path = Path(path)
        self.binary = binary

    def __enter__(self):
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent or ".")
        self.file = os.fdopen(fd, "wb" if self.binary else "w", **({} if self.binary else {"encoding": "utf-8"}))
        return self.file

    def __exit__(self, exc_type, exc, tb):
        self.file.close()
        if exc_type is None:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp creates 0600; a report is an ordinary file
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)
        return False
