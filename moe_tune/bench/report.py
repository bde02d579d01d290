"""Formatting of a ``BenchReport``: rich tables, Markdown, JSON and a TFLOP/s plot. Pure formatting
(no torch; matplotlib only inside ``write_plot``), so every output is testable on synthetic rows.

Every output leads with the environment line (card, driver, torch, Triton, CUDA, transformers,
date) and the timing method, so no figure travels without them.

Tables (text and Markdown alike):

* throughput — per (T, GEMM, pass): TFLOP/s of tuned / default / ``torch._grouped_mm`` / dense,
  and tuned's speed-up over ``grouped_mm`` and over the default, and its fraction of dense;
* times — median ms with the p20–p80 spread of every variant;
* configs — the tuned config and where it came from, the default config, and the sanity check;
* experts block — fwd and fwd+bwd ms with spread, peak memory, speed-up over transformers'
  ``grouped_mm``; or ``skipped: <why>``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from moe_tune.bench.env import header
from moe_tune.bench.results import BLOCK_BASELINE, GEMM_VARIANTS, BenchReport, BlockRow, GemmRow, Timing

VARIANT_LABELS = {"tuned": "tuned", "default": "default", "grouped_mm": "grouped_mm", "dense": "dense"}
BLOCK_LABELS = {BLOCK_BASELINE: "transformers grouped_mm", "moe_tune": "moe-tune",
                "moe_tune+compile": "moe-tune + torch.compile"}


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


def fmt_ms(timing: Timing) -> str:
    return f"{_ms(timing.ms)} [{_ms(timing.p20)}, {_ms(timing.p80)}]"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fmt_error(row: GemmRow | BlockRow) -> str:
    if not row.errors:
        return "-"
    worst = max(row.errors.values())
    text = f"{worst:.1e}"
    return f"FAILED {text}" if row.failed_checks else text


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
    return (f"{how}; median ms [p20, p80]; TFLOP/s = 2·T·k·N·K / median; routing: "
            f"{st.get('routing', '?')}, seed {st.get('seed', '?')}")


# -------------------------------------------------------------------------------------------------
# Rows of each table (shared by rich and Markdown)
# -------------------------------------------------------------------------------------------------

THROUGHPUT_COLUMNS = ("T", "GEMM", "pass", "tuned TFLOP/s", "default TFLOP/s", "grouped_mm TFLOP/s",
                      "dense TFLOP/s", "tuned / grouped_mm", "tuned / default", "tuned / dense")
TIMES_COLUMNS = ("T", "GEMM", "pass", "tuned ms", "default ms", "grouped_mm ms", "dense ms")
CONFIG_COLUMNS = ("T", "GEMM", "pass", "tuned config", "tuned from", "default config", "max rel. diff")
BLOCK_COLUMNS = ("T", "implementation", "fwd ms", "fwd+bwd ms", "peak MiB (fwd+bwd)", "fwd speed-up",
                 "fwd+bwd speed-up", "max rel. diff")


def throughput_rows(report: BenchReport) -> list[list[str]]:
    return [[str(r.tokens), r.problem.gemm, r.problem.pass_, *(fmt_tflops(r.tflops(v)) for v in GEMM_VARIANTS),
             fmt_ratio(r.speedup("tuned", "grouped_mm")), fmt_ratio(r.speedup("tuned", "default")),
             f"{r.speedup('tuned', 'dense'):.0%}"]
            for r in report.gemms]


def times_rows(report: BenchReport) -> list[list[str]]:
    return [[str(r.tokens), r.problem.gemm, r.problem.pass_, *(fmt_ms(r.timings[v]) for v in GEMM_VARIANTS)]
            for r in report.gemms]


def config_rows(report: BenchReport) -> list[list[str]]:
    rows = []
    for r in report.gemms:
        tuned = "= default" if r.tuned_is_default else r.tuned_config.short()
        rows.append([str(r.tokens), r.problem.gemm, r.problem.pass_, tuned, r.tuned_from.describe(),
                     r.default_config.short(), fmt_error(r)])
    return rows


def block_rows(report: BenchReport) -> list[list[str]]:
    block = report.block
    rows = []
    for r in block.rows:
        peak = "-" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        baseline = r.implementation == BLOCK_BASELINE
        rows.append([str(r.tokens), BLOCK_LABELS.get(r.implementation, r.implementation), fmt_ms(r.fwd),
                     fmt_ms(r.fwd_bwd), peak, "1.00x" if baseline else fmt_ratio(block.speedup(r, "fwd")),
                     "1.00x" if baseline else fmt_ratio(block.speedup(r, "fwd_bwd")),
                     "(baseline)" if baseline else fmt_error(r)])
    return rows


def cache_sources(report: BenchReport) -> list[str]:
    """The cache files the tuned configs came from, each once."""
    return sorted({r.tuned_from.path for r in report.gemms if r.tuned_from.path})


# -------------------------------------------------------------------------------------------------
# Text (rich)
# -------------------------------------------------------------------------------------------------


_TEXT_COLUMNS = {"GEMM", "pass", "implementation", "tuned config", "tuned from", "default config"}


def _rich_table(caption: str, columns: Iterable[str], rows: list[list[str]]):
    from rich.table import Table

    from rich.markup import escape

    table = Table(title=escape(caption), title_justify="left")
    for column in columns:
        table.add_column(column, justify="left" if column in _TEXT_COLUMNS else "right")
    for row in rows:
        table.add_row(*row)
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
    console.print(escape(title(report)), style="bold", highlight=False)
    console.print(escape(header(report.environment)), highlight=False)
    console.print(escape(method(report)), highlight=False)
    if report.gemms:
        console.print(_rich_table("grouped GEMMs: throughput", THROUGHPUT_COLUMNS, throughput_rows(report)))
        console.print(_rich_table("grouped GEMMs: times, ms (median [p20, p80])", TIMES_COLUMNS, times_rows(report)))
        console.print(_rich_table("grouped GEMMs: configs (max rel. diff: moe-tune output vs torch._grouped_mm)",
                                  CONFIG_COLUMNS, config_rows(report)))
        for path in cache_sources(report):
            console.print(escape(f"tuned configs read from {path}"), highlight=False)
    if report.block.skipped:
        console.print(escape(f"experts block: skipped: {report.block.skipped}"), highlight=False)
    else:
        console.print(_rich_table("experts block (up GEMM, SwiGLU, down GEMM, routing-weight combine), ms "
                                  "(median [p20, p80]); speed-up over transformers grouped_mm",
                                  BLOCK_COLUMNS, block_rows(report)))


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
    if report.gemms:
        lines += ["### Grouped GEMMs: throughput", "",
                  "tuned: moe-tune with the config the runtime loader resolves (cache, else the heuristic default); "
                  "default: moe-tune with the heuristic default; grouped_mm: `torch._grouped_mm` with the "
                  "gathers/scatters/weighting the layout needs, done as a user would; dense: one cuBLAS matmul of "
                  "the same FLOPs (the practical ceiling).", ""]
        lines += _md_table(THROUGHPUT_COLUMNS, throughput_rows(report)) + [""]
        lines += ["### Grouped GEMMs: times, ms (median [p20, p80])", ""]
        lines += _md_table(TIMES_COLUMNS, times_rows(report)) + [""]
        lines += ["### Grouped GEMMs: configs", "",
                  "max rel. diff: ‖moe-tune − grouped_mm‖ / ‖grouped_mm‖ over the output (a sanity check).",
                  ""]
        lines += _md_table(CONFIG_COLUMNS, config_rows(report)) + [""]
        for path in cache_sources(report):
            lines += [f"Tuned configs read from `{path}`.", ""]
    lines += ["### Experts block", ""]
    if report.block.skipped:
        lines += [f"skipped: {report.block.skipped}", ""]
    else:
        lines += ["Up GEMM, SwiGLU, down GEMM and routing-weight combine, as training runs them: forward with "
                  "autograd recording, and forward+backward into hidden states, routing weights and both weight "
                  "stacks. Same weights and routing for both; speed-up over transformers' `grouped_mm` experts "
                  "implementation.", ""]
        lines += _md_table(BLOCK_COLUMNS, block_rows(report)) + [""]
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
        for variant in GEMM_VARIANTS:
            ax.plot(tokens, [r.tflops(variant) for r in rows], label=VARIANT_LABELS[variant], **_LINE_STYLES[variant])
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
